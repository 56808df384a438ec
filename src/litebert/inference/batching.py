"""Length-bucketed batching for inference: sort by length, pad each batch only to its longest row, and hand the
results back in input order.

Padding is pure waste for an encoder: a batch padded to its longest member spends ``B * T_max - sum(T)`` token
slots on nothing. Sorting by length first makes neighbours similar, so most of that waste disappears; the cost is
one index permutation, undone when the results are scattered back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["autocast", "length_bucketed_batches", "naive_batches", "pad_rows", "padded_tokens", "run_batched"]

T = TypeVar("T")


def _round_up(n: int, multiple: int | None, cap: int | None = None) -> int:
    width = -(-n // multiple) * multiple if multiple else n
    # Rounding must never ask for more positions than the model has: the extra columns would index past the
    # position-embedding table.
    return max(n, min(width, cap)) if cap is not None else width


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                            pad_to_multiple_of: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches of similar length, longest batch first.

    A batch holds at most ``batch_size`` rows and, with ``max_tokens``, at most that many padded token slots
    (rows x the batch's padded width); a single row longer than ``max_tokens`` still gets a batch of its own. The
    sort is stable, so equal lengths keep their input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    width = 0
    for i in order:
        # Descending order: the first row of a batch is its longest, so its width is fixed at the first row.
        if batch and (len(batch) == batch_size or (max_tokens is not None and (len(batch) + 1) * width > max_tokens)):
            batches.append(batch)
            batch = []
        if not batch:
            width = _round_up(lengths[i], pad_to_multiple_of)
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def naive_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``batch_size`` in input order: the baseline that bucketing is measured against."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]], pad_to_multiple_of: int | None = None) -> int:
    """Pad-token slots the batches spend: sum over batches of ``rows x padded width - real tokens``."""
    total = 0
    for batch in batches:
        width = _round_up(max(lengths[i] for i in batch), pad_to_multiple_of)
        total += len(batch) * width - sum(lengths[i] for i in batch)
    return total


def pad_rows(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
             max_width: int | None = None) -> dict[str, Tensor]:
    """``input_ids`` / ``attention_mask`` / ``token_type_ids`` of unpadded rows as (B, T) int64 tensors, T the longest
    row rounded up to ``pad_to_multiple_of`` (but not past ``max_width``, the model's position count). A missing
    ``attention_mask`` is all ones; a missing ``token_type_ids`` all zeros."""
    if not rows:
        raise ValueError("cannot pad an empty batch")
    longest = max(len(r["input_ids"]) for r in rows)
    width = _round_up(longest, pad_to_multiple_of, max_width)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    types = torch.zeros((len(rows), width), dtype=torch.int64)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.int64)
        mask[b, :n] = torch.as_tensor(row["attention_mask"], dtype=torch.int64) if "attention_mask" in row else 1
        if "token_type_ids" in row:
            types[b, :n] = torch.as_tensor(row["token_type_ids"], dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def autocast(device: torch.device | str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when asked (AMX on recent Xeons, tensor cores on GPUs), else a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def run_batched(
    forward: Callable[[dict[str, Tensor]], Sequence[T]],
    rows: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
    *,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    max_width: int | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> list[T]:
    """Run ``forward`` over ``rows`` (each with unpadded ``input_ids``, optionally ``attention_mask`` /
    ``token_type_ids``) in length-bucketed batches, under ``torch.inference_mode()`` and, with ``bf16``, autocast.

    ``forward`` receives one padded batch (tensors on ``device``, (B, T)) and returns one result per row, in the
    batch's row order (e.g. ``logits.float().cpu().unbind(0)``). The results come back as a list in the order of
    ``rows``.
    """
    lengths = [len(r["input_ids"]) for r in rows]
    results: list[Any] = [None] * len(rows)
    with torch.inference_mode(), autocast(device, bf16):
        for batch in length_bucketed_batches(lengths, batch_size, max_tokens, pad_to_multiple_of):
            tensors = pad_rows([rows[i] for i in batch], pad_token_id, pad_to_multiple_of, max_width)
            outputs = forward({k: v.to(device) for k, v in tensors.items()})
            if len(outputs) != len(batch):
                raise RuntimeError(f"forward returned {len(outputs)} results for a batch of {len(batch)} rows")
            for i, out in zip(batch, outputs):
                results[i] = out
    return results
