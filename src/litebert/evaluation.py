"""Task metrics: accuracy, F1, MCC, Pearson/Spearman (GLUE), entity F1 (CoNLL), SQuAD EM/F1, perplexity.

Pure functions over lists, numpy arrays or tensors; ``preds`` are class ids, not logits. Classification
and correlation metrics return fractions in [0, 1] (or [-1, 1]); ``squad_scores`` returns percent, as
the official SQuAD script does. Empty or mismatched inputs raise ``ValueError``.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "accuracy",
    "entity_f1",
    "f1_score",
    "matthews_corrcoef",
    "pearson",
    "perplexity",
    "spearman",
    "squad_exact_match",
    "squad_f1",
    "squad_normalize",
    "squad_scores",
]


def _array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        x = x.numpy()
    a = np.asarray(x).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _pair(a: Any, b: Any, names: tuple[str, str] = ("preds", "labels")) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(a, names[0]), _array(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {x.size} vs {y.size}")
    return x, y


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


# --------------------------------------------------------------------------- classification


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of positions where ``preds == labels``."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_score(preds: Any, labels: Any, average: str = "binary", pos_label: Any = 1) -> float:
    """F1 over class ids, as ``sklearn.metrics.f1_score`` with ``zero_division=0``.

    ``binary``: F1 of ``pos_label``. ``macro``: unweighted mean over every class seen in ``preds`` or
    ``labels``. ``micro``: from pooled counts, which for single-label data equals accuracy.
    """
    p, y = _pair(preds, labels)

    def f1(c: Any) -> float:
        tp = int(np.sum((p == c) & (y == c)))
        fp = int(np.sum((p == c) & (y != c)))
        fn = int(np.sum((p != c) & (y == c)))
        return _safe_div(2 * tp, 2 * tp + fp + fn)

    if average == "binary":
        return f1(pos_label)
    if average == "macro":
        return float(np.mean([f1(c) for c in np.union1d(p, y)]))
    if average == "micro":
        return float(np.mean(p == y))
    raise ValueError(f"average must be 'binary', 'macro' or 'micro', got {average!r}")


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin 2004); 0.0 when undefined (as sklearn)."""
    p, y = _pair(preds, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    yi, pi = inv[: y.size], inv[y.size :]
    k = classes.size
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (yi, pi), 1.0)
    t, q = cm.sum(axis=1), cm.sum(axis=0)  # true and predicted counts per class
    n, c = cm.sum(), np.trace(cm)
    cov_pt = c * n - t @ q
    cov_pp, cov_tt = n * n - q @ q, n * n - t @ t
    den = math.sqrt(cov_pp * cov_tt)
    return float(cov_pt / den) if den else 0.0


# --------------------------------------------------------------------------- correlation


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation; ``nan`` when either input is constant (as scipy)."""
    a, b = _pair(x, y, ("x", "y"))
    a, b = a.astype(np.float64), b.astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        return float("nan")
    return float(np.clip((a @ b) / den, -1.0, 1.0))


def _rank(a: np.ndarray) -> np.ndarray:
    # 1-based ranks; ties share the mean of the ranks they span (scipy.stats.rankdata "average").
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], a.size]
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation with average ranks for ties; ``nan`` when either input is constant."""
    a, b = _pair(x, y, ("x", "y"))
    return pearson(_rank(a), _rank(b))


# --------------------------------------------------------------------------- entity F1 (CoNLL)


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"malformed tag {tag!r}: expected 'O' or B-/I-/E-/S- followed by a type")
    return prefix, kind


def _chunks(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end_inclusive)`` spans under conlleval's rules (IOB1, IOB2/BIO and IOBES)."""
    spans, start = set(), None
    prev, prev_kind = "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):
        cur, kind = _split_tag(str(tag))
        # conlleval endOfChunk
        end = (
            prev in ("E", "S")
            or (prev in ("B", "I") and cur in ("B", "S", "O"))
            or (prev != "O" and kind != prev_kind)
        )
        # conlleval startOfChunk: an I-/E- after O, E-, S- or a different type opens a new entity
        begin = (
            cur in ("B", "S")
            or (cur in ("I", "E") and prev in ("O", "E", "S"))
            or (cur != "O" and kind != prev_kind)
        )
        if end and start is not None:
            spans.add((prev_kind, start, i - 1))
            start = None
        if begin:
            start = i
        prev, prev_kind = cur, kind
    return spans


def entity_f1(true_seqs: Sequence[Sequence[str]], pred_seqs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision/recall/F1 as ``conlleval`` computes them (fractions, not percent).

    An entity counts as correct only when type, first and last token all match. Each sequence is one
    sentence (entities never cross sequences). Returns ``precision, recall, f1`` and ``per_type``:
    ``{type: {precision, recall, f1, support}}`` where ``support`` is the number of gold entities.
    """
    if len(true_seqs) == 0:
        raise ValueError("true_seqs is empty")
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"true_seqs and pred_seqs differ in length: {len(true_seqs)} vs {len(pred_seqs)}")
    gold: set[tuple[int, str, int, int]] = set()
    pred: set[tuple[int, str, int, int]] = set()
    for s, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
        if len(t) != len(p):
            raise ValueError(f"sequence {s}: {len(t)} gold tags vs {len(p)} predicted")
        gold |= {(s, *c) for c in _chunks(t)}
        pred |= {(s, *c) for c in _chunks(p)}

    def prf(g: set, q: set) -> tuple[float, float, float]:
        correct = len(g & q)
        precision, recall = _safe_div(correct, len(q)), _safe_div(correct, len(g))
        return precision, recall, _safe_div(2 * precision * recall, precision + recall)

    per_type = {}
    for kind in sorted({c[1] for c in gold | pred}):
        g = {c for c in gold if c[1] == kind}
        q = {c for c in pred if c[1] == kind}
        precision, recall, f1 = prf(g, q)
        per_type[kind] = {"precision": precision, "recall": recall, "f1": f1, "support": len(g)}
    precision, recall, f1 = prf(gold, pred)
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type}


# --------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def squad_normalize(s: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    # SQuAD v2: answers that normalise to nothing are dropped; no answer left means unanswerable,
    # which only the empty prediction matches.
    return [g for g in golds if squad_normalize(g)] or [""]


def _token_f1(pred: str, gold: str) -> float:
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(pred: str, golds: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0.

    An empty ``golds`` marks an unanswerable (v2) question: only an empty prediction matches.
    """
    return float(max(squad_normalize(pred) == squad_normalize(g) for g in _golds(golds)))


def squad_f1(pred: str, golds: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalised prediction and any gold answer (v2 rules as EM)."""
    return max(_token_f1(pred, g) for g in _golds(golds))


def squad_scores(preds: Mapping[str, str], dataset_answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over every question of ``dataset_answers``.

    A question with no prediction scores 0 (the v1.1 script's rule; v2's skips it). Predictions for ids
    not in ``dataset_answers`` are ignored.
    """
    if not dataset_answers:
        raise ValueError("dataset_answers is empty")
    em = f1 = 0.0
    for qid, golds in dataset_answers.items():
        if qid in preds:
            em += squad_exact_match(preds[qid], golds)
            f1 += squad_f1(preds[qid], golds)
    n = len(dataset_answers)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# --------------------------------------------------------------------------- language modelling


def perplexity(mean_nll: float | torch.Tensor) -> float:
    """``exp(mean_nll)`` for a mean negative log-likelihood in nats per token; ``inf`` on overflow."""
    value = float(mean_nll.item() if isinstance(mean_nll, torch.Tensor) else mean_nll)
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")
