"""Inference: task pipelines (`litebert.pipeline`, `litebert predict`) and length-bucketed batching.

The ``pipeline`` function is exported from the top-level package, not from here: re-exporting it in this package
would shadow the ``litebert.inference.pipeline`` module with the function of the same name.
"""

from .batching import length_bucketed_batches, naive_batches, pad_rows, padded_tokens, run_batched
from .pipeline import PIPELINES, TASKS, Pipeline, predict_main, task_for_model

__all__ = [
    "PIPELINES", "TASKS", "Pipeline", "length_bucketed_batches", "naive_batches", "pad_rows", "padded_tokens",
    "predict_main", "run_batched", "task_for_model",
]
