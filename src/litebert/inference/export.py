"""``litebert export``: a model directory -> ONNX (and int8) that checks itself against eager PyTorch.

    litebert export --model runs/rt/final --out runs/rt/onnx --quantize int8 --validation runs/rt/data/test.jsonl

OUT receives ``model.onnx`` (fp32, dynamic batch and sequence axes), ``model.int8.onnx`` with ``--quantize int8``,
``config.json`` and the tokenizer files, so OUT is itself a model directory that `litebert.pipeline` and
``litebert serve`` load (``--format openvino`` adds ``openvino_model.xml/.bin``, see `litebert.inference.engines`),
and ``export_report.json``: the largest difference of every output to eager PyTorch on
padded and unpadded batches whose shapes differ from the traced one, and, with ``--validation``, the accuracy of
eager, ONNX fp32 and int8 on that file, the change in points, and the examples/s of each backend.

The graph is traced (the TorchScript exporter, ``dynamo=False``): the encoders drop the key-padding mask when
nothing is padded (`litebert.layers.key_padding_mask`), a data-dependent Python branch that ``torch.export`` refuses.
Tracing a padded batch records the masked path, which is exact for unpadded inputs too (an all-ones mask masks
nothing); the check batches prove it.

int8 is dynamic quantisation (`onnxruntime.quantization.quantize_dynamic`): 8-bit weights, per output channel, in
one of `INT8_FORMATS` (``--int8-format``; the default is one that cannot saturate on any x86 CPU), for every matrix
product with a constant weight: the projections and feed-forward of every layer pass (ALBERT's shared
weights included, see `_bypass_initializer_identities`) and the head's projections; activations are quantised per
call. The embedding tables, attention score products and LayerNorms stay fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import TOKENIZER_FILES, resolve_model_dir
from ..config import EncoderConfig, load_config
from ..heads import EncoderForMaskedLM, EncoderForPreTraining, EncoderHead, HeadOutput, from_pretrained
from ..layers import onnx_attention_op
from ..perf import interleaved_step_times
from ..runtime import hardware
from ..tokenizer import load_tokenizer
from .pipeline import PIPELINES, Pipeline, _resolve_task, task_for_model

__all__ = [
    "DEFAULT_INT8_FORMAT", "DISABLED_ORT_OPTIMIZERS", "INT8_FILE", "INT8_FORMATS", "ONNX_FILE", "REPORT_FILE", "TASK_OUTPUTS", "OnnxEncoder", "OnnxTaskModel",
    "check_cases", "check_inputs", "check_onnx", "export_main", "export_onnx", "onnx_pipeline", "quantize_int8",
    "within_tolerance",
]

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
REPORT_FILE = "export_report.json"
FORMATS = ("onnx", "openvino", "ctranslate2")  # `litebert export --format`; the engines are in `engines`
# int8 weight formats (ONNX Runtime dynamic quantisation; activations are u8 in all three). `bench/int8_formats.py`
# measures their accuracy and speed on a trained model. "s8" pairs u8 activations with s8 weights: on CPUs without
# VNNI/AMX, ONNX Runtime's u8s8 kernels add two u8 x s8 products in 16 bits (vpmaddubsw), which saturates, so its
# results there can be far off. "s8-7bit" keeps the weights in [-64, 63], so the pair sum fits; "u8" uses the u8u8
# kernels, which widen first. An exported file runs wherever it is copied, so the default must be safe everywhere.
INT8_FORMATS: dict[str, dict[str, Any]] = {
    "s8": {"weight_type": "QInt8", "reduce_range": False},
    "s8-7bit": {"weight_type": "QInt8", "reduce_range": True},
    "u8": {"weight_type": "QUInt8", "reduce_range": False},
}
DEFAULT_INT8_FORMAT = "s8-7bit"
# 23: the first opset with an Attention op: each attention is one node (`litebert.layers.onnx_attention_op`), which
# ONNX Runtime runs faster than the spelled-out matmul-softmax-matmul graph. 20 gave a Gelu op (ALBERT's tanh GELU was
# ten unfused elementwise ops at 17). Runtimes need opset-23 support (ONNX Runtime >= 1.23); --opset 17 to 22 still
# export, with the attention spelled out (and, below 20, GELU too).
OPSET = 23
MIN_OPSET = 17  # LayerNormalization
# The TorchScript exporter writes opsets up to this one; a higher opset is written at it and declared afterwards (the
# ops it writes mean the same at 21-23, which only add element types; the ONNX checker confirms each).
_TRACER_MAX_OPSET = 20
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Outputs per pipeline task, with their dynamic axes. Fill-mask projects only the [MASK] positions onto the
# vocabulary, (N, V) in row-major order, as the eager fill-mask pipeline does: full (B, T, V) logits would be
# ~100x the work and memory.
TASK_OUTPUTS: dict[str, dict[str, dict[int, str]]] = {
    "text-classification": {"logits": {0: "batch"}},
    "token-classification": {"logits": {0: "batch", 1: "sequence"}},
    "question-answering": {"start_logits": {0: "batch", 1: "sequence"}, "end_logits": {0: "batch", 1: "sequence"}},
    "fill-mask": {"mask_logits": {0: "masked"}},
    "feature-extraction": {"last_hidden_state": {0: "batch", 1: "sequence"}},
}
# ONNX Runtime graph passes `OnnxEncoder` turns off. Its SkipLayerNormalization kernel (residual add + LayerNorm in
# one op) ran slower than the Add and LayerNormalization it replaces on the 2-core AMX machine: without the fusion
# int8 BERT-base ran 5% faster at 32 x 128 and 11% at 1 x 128 (`python bench/inference_switches.py`, which times it on
# and off). Our fp32 graphs are not fused by it anyway.
DISABLED_ORT_OPTIMIZERS = ("SkipLayerNormFusion",)
_TRACE_SHAPE = (2, 16)
_CHECK_SHAPES = ((3, 23, True), (1, 9, False), (5, 61, True))  # (batch, sequence, padded): none is the traced shape


# --------------------------------------------------------------------------------------------------------- export


class ExportModule(nn.Module):
    """A task model as ONNX wants it: plain tensors in (``input_ids``, ``attention_mask`` and, except for
    DistilBERT, ``token_type_ids``, each (B, T) int64), a tuple of plain tensors out (`TASK_OUTPUTS`)."""

    def __init__(self, model: nn.Module, task: str, mask_token_id: int | None = None):
        super().__init__()
        if task == "fill-mask" and (mask_token_id is None or not isinstance(model, (EncoderForMaskedLM,
                                                                                    EncoderForPreTraining))):
            raise ValueError("fill-mask export needs a masked-LM model and the tokenizer's mask token id")
        self.model = model
        self.task = task
        self.mask_token_id = mask_token_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.task == "feature-extraction":
            encoder = self.model.encoder if isinstance(self.model, EncoderHead) else self.model
            return (encoder(input_ids, attention_mask, token_type_ids).last_hidden_state,)  # (B, T, H)
        if self.task == "fill-mask":
            hidden = self.model.encoder(input_ids, attention_mask, token_type_ids).last_hidden_state  # (B, T, H)
            selected = hidden[input_ids == self.mask_token_id]  # (N, H)
            return (self.model.mlm_head(selected, self.model.encoder.word_embeddings.weight),)  # (N, V)
        sentence = self.task == "text-classification"  # the head reads [CLS] alone: the last layer computes only it
        out = self.model(input_ids, attention_mask, token_type_ids, **({"first_token_only": True} if sentence else {}))
        return tuple(getattr(out, name) for name in TASK_OUTPUTS[self.task])


def _input_names(config: EncoderConfig) -> tuple[str, ...]:
    return INPUTS if config.type_vocab_size else INPUTS[:2]


def check_inputs(config: EncoderConfig, batch: int, length: int, padded: bool, mask_token_id: int | None = None,
                 seed: int = 0) -> dict[str, Tensor]:
    """A random (batch, length) input: with ``padded`` the rows after the first end early (the first is full, so
    the width is really ``length``); a second segment in every row when the model has token types; with
    ``mask_token_id`` one or two masks per row (fill-mask)."""
    g = torch.Generator().manual_seed(seed)
    length = min(length, config.max_position_embeddings)
    low = min(5, config.vocab_size - 1)  # past the usual specials, so ids are ordinary tokens
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=g)
    if mask_token_id is not None:
        ids[ids == mask_token_id] = low
    mask = torch.ones(batch, length, dtype=torch.int64)
    types = torch.zeros(batch, length, dtype=torch.int64)
    for b in range(batch):
        n = length if not padded or b == 0 else int(torch.randint(2, length, (1,), generator=g))
        mask[b, n:] = 0
        ids[b, n:] = config.pad_token_id
        if config.type_vocab_size > 1:
            types[b, n // 2:n] = 1
        if mask_token_id is not None:
            ids[b, 1] = mask_token_id
            if n > 4:
                ids[b, n - 2] = mask_token_id
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: inputs[name] for name in _input_names(config)}


def check_cases(config: EncoderConfig, mask_token_id: int | None = None) -> list[dict[str, Tensor]]:
    """The batches every export is checked on: (3, 23) padded, (1, 9) unpadded, (5, 61) padded (capped by the
    model's positions), none of them the traced (2, 16)."""
    return [check_inputs(config, b, t, padded, mask_token_id, seed=i) for i, (b, t, padded) in enumerate(_CHECK_SHAPES)]


def export_onnx(model: nn.Module, path: str | Path, task: str | None = None, mask_token_id: int | None = None,
                opset: int = OPSET) -> Path:
    """Trace ``model`` for ``task`` (default: the one it was trained for; any model also exports for
    feature-extraction) into ``path``, with dynamic batch and sequence axes. The model is put in eval mode, fp32,
    on CPU, in place. The task and the mask token id are stored in the ONNX file's metadata."""
    import onnx

    trained_for = task_for_model(model)
    task = _resolve_task(task) or trained_for
    if task not in (trained_for, "feature-extraction"):
        raise ValueError(f"a {type(model).__name__} exports for {trained_for} or feature-extraction, not {task}")
    if not MIN_OPSET <= opset <= OPSET:
        raise ValueError(f"--opset: {opset} is not supported (choose {MIN_OPSET} to {OPSET})")
    model = model.float().eval().cpu()
    module = ExportModule(model, task, mask_token_id).eval()
    names = _input_names(model.config)
    # Padded, so the trace records the key-padding-mask path (see the module docstring).
    sample = check_inputs(model.config, *_TRACE_SHAPE, padded=True, mask_token_id=mask_token_id, seed=1)
    outputs = TASK_OUTPUTS[task]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_op = onnx_attention_op() if opset >= 23 else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), attention_op:
        # The tracer warns about the branches it freezes (the mask shortcut, the position-table bound check) and
        # the exporter about being the legacy one; both are expected here and checked by `check_onnx`.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(sample[n] for n in names), str(path), dynamo=False,
                          opset_version=min(opset, _TRACER_MAX_OPSET), input_names=list(names),
                          output_names=list(outputs), do_constant_folding=True,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, **outputs})
    proto = onnx.load(str(path))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    _bypass_initializer_identities(proto.graph)
    onnx.checker.check_model(proto)
    meta = {"litebert.task": task, "litebert.model_type": model.config.model_type}
    if mask_token_id is not None:
        meta["litebert.mask_token_id"] = str(mask_token_id)
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))
    return path


def _bypass_initializer_identities(graph: Any) -> int:
    """Point the consumers of ``Identity(initializer)`` at the initializer itself and drop the Identity.

    The exporter stores a weight used more than once (ALBERT's shared layers, tied embeddings) once, and feeds every
    use after the first through an Identity node. The int8 quantiser only quantises a MatMul whose weight is an
    initializer, so without this it would leave every ALBERT layer pass after the first in fp32."""
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in graph_outputs}
    if not alias:
        return 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(keep)
    return len(alias)


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True,
                  int8_format: str = DEFAULT_INT8_FORMAT) -> Path:
    """Dynamic int8 quantisation of ``src`` into ``dst`` in ``int8_format`` (one of `INT8_FORMATS`; see the module
    docstring for what is quantised)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8 format must be one of {', '.join(INT8_FORMATS)}, got {int8_format!r}")
    settings = INT8_FORMATS[int8_format]

    root = logging.getLogger()  # the quantiser logs on the root logger
    quiet = _QuietQuantizer()
    root.addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=getattr(QuantType, settings["weight_type"]),
                         per_channel=per_channel, reduce_range=settings["reduce_range"], op_types_to_quantize=["MatMul"])
    finally:
        root.removeFilter(quiet)
    return Path(dst)


class _QuietQuantizer(logging.Filter):
    """Drops the quantiser's per-tensor INFO lines (hundreds per model) and its hint to run its pre-pass: that
    pass's symbolic shape inference fails on these graphs, and without it the pass measured no faster on MiniLM."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not str(record.msg).startswith("Please consider to run pre")


# --------------------------------------------------------------------------------------------------------- runtime


class OnnxEncoder:
    """An ONNX Runtime session on CPU with the exported model's signature: ``enc(input_ids, attention_mask,
    token_type_ids)`` -> ``{output name: np.ndarray}``. Inputs may be tensors or arrays, (B, T) integers; a missing
    mask means no padding, missing token types are zeros. Safe to call from several threads at once.

    ``threads`` defaults to torch's intra-op thread count, so ONNX and eager timings use the same cores;
    ``disabled_optimizers`` names ONNX Runtime graph passes to skip (default `DISABLED_ORT_OPTIMIZERS`).
    """

    def __init__(self, path: str | Path, threads: int | None = None,
                 disabled_optimizers: Sequence[str] = DISABLED_ORT_OPTIMIZERS):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's worker threads keep spinning after a run by default, taking a core from whatever runs next in
        # the process (PyTorch, the tokenizer, another request): in one-off timings, transformers right after an int8
        # run was far slower than with this setting. Spinning within a run is kept.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=list(disabled_optimizers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def task(self) -> str | None:
        return self.metadata.get("litebert.task")

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, np.ndarray]:
        feed = encoder_feed(self.input_names, input_ids, attention_mask, token_type_ids)
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))


def encoder_feed(input_names: Sequence[str], input_ids: Any, attention_mask: Any = None,
                 token_type_ids: Any = None) -> dict[str, np.ndarray]:
    """The numpy inputs an exported graph takes, by name: a missing mask means no padding, missing token types
    are zeros."""
    ids = _numpy(input_ids)
    given = {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    feed = {}
    for name in input_names:
        value = given.get(name)
        if value is None:
            value = np.ones_like(ids) if name == "attention_mask" else np.zeros_like(ids)
        feed[name] = _numpy(value)
    return feed


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64)


class OnnxTaskModel(nn.Module):
    """An exported model behind the eager model's call: ``model(input_ids, attention_mask, token_type_ids)`` ->
    `HeadOutput` with the task's fields as CPU tensors, so the pipelines run it unchanged. For fill-mask the
    ``labels`` argument is accepted and ignored: the graph already projects exactly the [MASK] positions, which are
    the positions the fill-mask pipeline labels."""

    def __init__(self, encoder: OnnxEncoder, config: EncoderConfig):
        super().__init__()
        self.onnx = encoder
        self.config = config
        self.task = encoder.task

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                labels: Tensor | None = None, **_: Any) -> HeadOutput:
        out = {k: torch.from_numpy(v) for k, v in self.onnx(input_ids, attention_mask, token_type_ids).items()}
        if "mask_logits" in out:
            out["logits"] = out.pop("mask_logits")
        return HeadOutput(**out)


def _onnx_pipeline_class(task: str) -> type[Pipeline]:
    # The pipelines check the model's class (a classifier for text-classification...); the ONNX file was checked
    # at export and carries its task, so the check is left out here.
    base = PIPELINES[task]
    return type("Onnx" + base.__name__, (base,), {"model_classes": ()})


def onnx_pipeline(model_dir: str | Path, task: str | None = None, onnx_file: str | None = None,
                  threads: int | None = None, **kwargs: Any) -> Pipeline:
    """The ``task`` pipeline over an export directory (``model.onnx`` or ``onnx_file`` in it, plus config.json and
    the tokenizer). ``task`` defaults to the one the file was exported for; another task is an error. Remaining
    keyword arguments are those of `litebert.pipeline` (batch_size, max_length, task options)."""
    model_dir = Path(model_dir)
    path = model_dir / (onnx_file or ONNX_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create it with litebert export --model DIR --out {model_dir}")
    encoder = OnnxEncoder(path, threads)
    exported = encoder.task or "text-classification"
    task = _resolve_task(task) or exported
    if task != exported:
        raise ValueError(f"{path} was exported for {exported}, not {task}; export again with --task {task}")
    model = OnnxTaskModel(encoder, load_config(model_dir))
    kwargs.pop("bf16", None)
    kwargs["precision"] = "fp32"  # the graph's precision is its own (fp32 or int8): nothing to cast or autocast
    return _onnx_pipeline_class(task)(model, load_tokenizer(model_dir), **kwargs)


# ----------------------------------------------------------------------------------------------------------- check


def check_onnx(reference: Callable[..., tuple[Tensor, ...]], encoder: OnnxEncoder,
               cases: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """Run every case through ``reference`` (eager) and ``encoder`` (ONNX). Per case: its shape, whether it is
    padded, and per output the largest absolute difference. Overall, per output: the worst difference
    (``max_abs_diff``) and the output's scale (``max_abs_value``, the largest eager magnitude), and for logits the
    fraction of rows whose argmax agrees."""
    results = []
    worst: dict[str, float] = {}
    scale: dict[str, float] = {}
    agree = []
    with torch.no_grad():
        for case in cases:
            ref = reference(*(case[n] for n in encoder.input_names))
            got = encoder(*(case[n] for n in encoder.input_names))
            diffs = {}
            for name, r in zip(encoder.output_names, ref):
                r, g = r.float().numpy(), got[name]
                if r.shape != g.shape:
                    raise RuntimeError(f"ONNX output {name} has shape {g.shape}, eager {r.shape}")
                diffs[name] = float(np.abs(r - g).max()) if r.size else 0.0
                worst[name] = max(worst.get(name, 0.0), diffs[name])
                scale[name] = max(scale.get(name, 0.0), float(np.abs(r).max()) if r.size else 0.0)
                if name in ("logits", "mask_logits") and r.shape[-1] > 1:
                    agree.append((r.argmax(-1) == g.argmax(-1)).ravel())
            results.append({"shape": list(case["input_ids"].shape), "padded": bool((case["attention_mask"] == 0).any()),
                            "max_abs_diff": diffs})
    report: dict[str, Any] = {"max_abs_diff": worst, "max_abs_value": scale, "cases": results}
    if agree:
        report["argmax_agreement"] = float(np.concatenate(agree).mean())
    return report


def within_tolerance(check: Mapping[str, Any], atol: float, rtol: float) -> bool:
    """Every output of a `check_onnx` report within ``atol + rtol * max_abs_value`` of eager."""
    return all(d <= atol + rtol * check["max_abs_value"][name] for name, d in check["max_abs_diff"].items())


# ------------------------------------------------------------------------------------------------------ validation


@dataclass
class _Backend:
    name: str
    pipe: Pipeline


def _hf_model(model_dir: Path, attn_implementation: str = "sdpa") -> nn.Module:
    """The same checkpoint as ``transformers`` fp32 runs it, behind our model's call (for timing only)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation=attn_implementation,
                                                            **{dtype_key: torch.float32}).eval()

    class HF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf
            self.config = load_config(model_dir)

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None, **_: Any) -> HeadOutput:
            kwargs = {"token_type_ids": token_type_ids} if self.config.type_vocab_size else {}
            return HeadOutput(logits=self.hf(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits)

    return HF()


def validate(model_dir: Path, out_dir: Path, files: Sequence[str], path: str | Path, text_column: str = "text",
             text_pair_column: str | None = None, label_column: str = "label", filter: Mapping[str, Any] | None = None,
             batch_size: int = 32, max_length: int | None = None, rounds: int = 3,
             compare_transformers: bool = False) -> dict[str, Any]:
    """Accuracy of eager PyTorch and of each ONNX file in ``files`` on a labelled text-classification file, and the
    examples/s of each: every backend runs through the same text-classification pipeline (tokenization, length
    bucketing, ``batch_size``), timed in ``rounds`` interleaved rounds, median taken. ``compare_transformers`` adds
    the checkpoint as ``transformers`` runs it in fp32 (timing and accuracy)."""
    from ..data.tasks import check_labels, read_text_classification
    from ..evaluation import accuracy

    examples = read_text_classification(path, text_column, text_pair_column, label_column, filter=filter)
    config = load_config(model_dir)
    id2label = config.id2label or {i: f"LABEL_{i}" for i in range(config.num_labels)}
    label2id = {str(v): int(k) for k, v in id2label.items()}
    if all(str(ex.label) not in label2id for ex in examples) and all(str(ex.label).isdigit() for ex in examples):
        label2id = {str(i): i for i in id2label}  # the file names labels by id
    check_labels(examples, label2id, path)
    gold = [label2id[str(ex.label)] for ex in examples]
    inputs = [ex.text if ex.text_pair is None else {"text": ex.text, "text_pair": ex.text_pair} for ex in examples]
    names = {v: k for k, v in id2label.items()}

    opts = {"batch_size": batch_size, "max_length": max_length}
    backends = [_Backend("eager", PIPELINES["text-classification"](from_pretrained(str(model_dir)),
                                                                   load_tokenizer(model_dir), **opts))]
    if compare_transformers:
        backends.append(_Backend("transformers", _onnx_pipeline_class("text-classification")(
            _hf_model(model_dir), load_tokenizer(model_dir), **opts)))
    for name in files:
        if name.endswith(".xml") or name.startswith("ctranslate2"):  # OpenVINO IR, CTranslate2 (fp32 / int8)
            from .engines import engine_pipeline

            backend = "openvino" if name.endswith(".xml") else name
            pipe = engine_pipeline(out_dir, "text-classification", backend, **opts)
        else:
            pipe = onnx_pipeline(out_dir, "text-classification", onnx_file=name, **opts)
        backends.append(_Backend(name, pipe))

    result: dict[str, Any] = {"file": str(path), "examples": len(examples), "metric": "accuracy", "backends": {}}
    for b in backends:  # the first pass scores and warms up
        preds = [names[p["label"]] for p in b.pipe(inputs)]
        result["backends"][b.name] = {"accuracy": accuracy(np.array(preds), np.array(gold))}
    steps = {b.name: (lambda pipe=b.pipe: pipe(inputs)) for b in backends}
    seconds = {name: t["wall"] for name, t in interleaved_step_times(steps, rounds, 1, warmup=0).items()}
    for b in backends:
        if seconds[b.name]:
            result["backends"][b.name]["examples_per_s"] = len(inputs) / float(np.median(seconds[b.name]))
            result["backends"][b.name]["seconds_per_pass"] = [round(t, 3) for t in seconds[b.name]]
    acc = {k: v["accuracy"] for k, v in result["backends"].items()}
    if ONNX_FILE in acc:
        result["onnx_vs_eager_points"] = 100 * (acc[ONNX_FILE] - acc["eager"])
    if INT8_FILE in acc:
        result["int8_vs_onnx_points"] = 100 * (acc[INT8_FILE] - acc.get(ONNX_FILE, acc["eager"]))
        result["int8_vs_eager_points"] = 100 * (acc[INT8_FILE] - acc["eager"])
    if rounds and INT8_FILE in acc:
        speed = {k: v["examples_per_s"] for k, v in result["backends"].items()}
        result["int8_speedup_vs_eager"] = speed[INT8_FILE] / speed["eager"]
        if "transformers" in speed:
            result["int8_speedup_vs_transformers"] = speed[INT8_FILE] / speed["transformers"]
    return result


# -------------------------------------------------------------------------------------------------------------- CLI


def _parse_filter(items: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--filter expects COLUMN=VALUE, got {item!r}")
        out.setdefault(key, []).append(value)
    return out


def export_main(argv: list[str]) -> int:
    """litebert export --model DIR --out DIR [--quantize int8] [--validation FILE]: ONNX that checks itself."""
    description = (__doc__.split("\n\n")[0].replace("``", "") + " Writes OUT/model.onnx (+ model.int8.onnx), "
                   "config.json, the tokenizer and export_report.json, and prints the report's summary as one JSON "
                   "line.")
    parser = argparse.ArgumentParser(prog="litebert export", description=description)
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="onnx",
                        help="comma-separated: onnx (default, always written); openvino: its OpenVINO IR "
                             "(openvino_model.xml/.bin), run in bf16 where the CPU has it natively; ctranslate2: "
                             "ctranslate2/ (BERT and DistilBERT sequence classifiers; fp32, or int8 when loaded)")
    parser.add_argument("--task", default="auto", choices=["auto", *TASK_OUTPUTS],
                        help="outputs to export; default: the task the model was trained for")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write model.int8.onnx (dynamic quantisation, int8 weights)")
    parser.add_argument("--int8-format", choices=list(INT8_FORMATS), default=DEFAULT_INT8_FORMAT,
                        help="int8 weight format (default: %(default)s, which cannot saturate on any x86 CPU; s8 is "
                             "for CPUs with VNNI/AMX only)")
    parser.add_argument("--no-per-channel", action="store_true", help="int8: one scale per weight, not per column")
    parser.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="fp32 check: allowed |onnx - eager| is atol + rtol * max|eager| (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="see --atol (default: %(default)s)")
    parser.add_argument("--validation", default=None,
                        help="labelled text-classification file (CSV/TSV/JSONL): accuracy and examples/s of eager, "
                             "ONNX and int8, and the change in points")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--text-pair-column", default=None)
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep only rows whose COLUMN equals VALUE (repeatable), e.g. source=rotten_tomatoes")
    parser.add_argument("--batch-size", type=int, default=32, help="validation: inputs per forward pass")
    parser.add_argument("--max-length", type=int, default=None, help="validation: truncate inputs to this many tokens")
    parser.add_argument("--rounds", type=int, default=3,
                        help="validation: timed passes per backend, interleaved, median taken; 0: accuracy only")
    parser.add_argument("--compare-transformers", action="store_true",
                        help="validation: also time the checkpoint as transformers runs it in fp32")
    args = parser.parse_args(argv)
    formats = {f.strip() for f in args.format.split(",") if f.strip()}
    if not formats or formats - set(FORMATS):
        parser.error(f"--format: unknown {', '.join(sorted(formats - set(FORMATS))) or '(none given)'}; choose from "
                     f"{', '.join(FORMATS)}")

    model_dir = resolve_model_dir(args.model)
    out = Path(args.out)
    filters = _parse_filter(args.filter)
    if args.validation is not None and not Path(args.validation).is_file():
        raise FileNotFoundError(f"--validation {args.validation} does not exist")
    model = from_pretrained(str(model_dir)).eval()
    task = _resolve_task(args.task) or task_for_model(model)
    if args.validation is not None and task != "text-classification":
        raise ValueError(f"--validation scores text-classification models; this export is for {task}")
    try:
        tokenizer = load_tokenizer(model_dir)
    except FileNotFoundError:
        if task == "fill-mask":
            raise
        tokenizer = None
    mask_id = tokenizer.mask_token_id if task == "fill-mask" else None

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, out / ONNX_FILE, task, mask_id, args.opset)
    shutil.copy2(model_dir / "config.json", out / "config.json")
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    export_s = time.perf_counter() - t0

    reference = ExportModule(model, task, mask_id).eval()
    cases = check_cases(model.config, mask_id)
    files = {ONNX_FILE: onnx_path}
    if args.quantize == "int8":
        files[INT8_FILE] = quantize_int8(onnx_path, out / INT8_FILE, per_channel=not args.no_per_channel,
                                         int8_format=args.int8_format)
        if args.int8_format == "s8" and not hardware().vnni:
            logger.warning("--int8-format s8 on a CPU without VNNI: ONNX Runtime's u8s8 kernels can saturate here")
    hw = hardware()
    report: dict[str, Any] = {"model": str(model_dir), "task": task, "model_type": model.config.model_type,
                              "validated_on": {"cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability,
                                               "vnni": hw.vnni, "amx": hw.amx, "simulated": hw.simulated},
                              **({"int8_format": args.int8_format} if args.quantize == "int8" else {}),
                              "opset": args.opset, "inputs": list(_input_names(model.config)),
                              "outputs": list(TASK_OUTPUTS[task]), "export_seconds": round(export_s, 2),
                              "tolerance": {"atol": args.atol, "rtol": args.rtol}, "files": {}}
    for name, path in files.items():
        check = check_onnx(reference, OnnxEncoder(path), cases)
        check["size_mb"] = round(path.stat().st_size / 2**20, 2)
        report["files"][name] = check
    fp32_ok = within_tolerance(report["files"][ONNX_FILE], args.atol, args.rtol)
    if "openvino" in formats:
        from .engines import OpenVinoEncoder, export_openvino

        ov_path = export_openvino(onnx_path, out)
        encoder = OpenVinoEncoder(ov_path)  # precision auto: what pipeline() will run
        check = check_onnx(reference, encoder, cases)
        check["precision"] = encoder.precision
        report["files"][ov_path.name] = check
        files[ov_path.name] = ov_path
        if encoder.precision == "fp32":  # a bf16 hint rounds every product: judged by argmax and validation instead
            fp32_ok = fp32_ok and within_tolerance(check, args.atol, args.rtol)
    if "ctranslate2" in formats:
        from .engines import CT2_DIR, CTranslate2Encoder, export_ctranslate2

        ct2_dir = export_ctranslate2(model, model_dir, out)
        for compute_type, name in (("float32", CT2_DIR), ("int8", f"{CT2_DIR}-int8")):
            check = check_onnx(reference, CTranslate2Encoder(ct2_dir, compute_type=compute_type), cases)
            report["files"][name] = check
            files[name] = ct2_dir
        fp32_ok = fp32_ok and within_tolerance(report["files"][CT2_DIR], args.atol, args.rtol)
    report["fp32_within_tolerance"] = fp32_ok

    if args.validation is not None:
        report["validation"] = validate(model_dir, out, list(files), args.validation, args.text_column,
                                        args.text_pair_column, args.label_column, filters, args.batch_size,
                                        args.max_length, args.rounds, args.compare_transformers)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    summary = {"out": str(out), "task": task, "fp32_within_tolerance": fp32_ok,
               **{f"{name}_max_abs_diff": max(check["max_abs_diff"].values())
                  for name, check in report["files"].items()}}
    if "argmax_agreement" in report["files"].get(INT8_FILE, {}):
        summary["int8_argmax_agreement"] = report["files"][INT8_FILE]["argmax_agreement"]
    for key, value in report.get("validation", {}).items():
        if key.endswith(("_points", "_speedup_vs_eager", "_speedup_vs_transformers")):
            summary[key] = round(value, 3)
    if "validation" in report:
        summary["accuracy"] = {k: round(v["accuracy"], 4) for k, v in report["validation"]["backends"].items()}
        summary["examples_per_s"] = {k: round(v["examples_per_s"], 1)
                                     for k, v in report["validation"]["backends"].items() if "examples_per_s" in v}
    print(json.dumps(summary))
    for name, check in report["files"].items():
        logger.info("%s: max |onnx - eager| %s (%s)", name,
                    ", ".join(f"{k} {v:.2e}" for k, v in check["max_abs_diff"].items()),
                    ", ".join(f"{c['shape']}{' padded' if c['padded'] else ''}" for c in check["cases"]))
    if not fp32_ok:
        logger.error("%s differs from eager beyond atol=%g + rtol=%g * scale; see %s", ONNX_FILE, args.atol,
                     args.rtol, out / REPORT_FILE)
        return 1
    return 0
