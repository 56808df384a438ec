"""``litebert.pipeline(task, model=DIR)`` and ``litebert predict``: a model directory in, predictions out.

    >>> clf = litebert.pipeline("text-classification", model="runs/sst2/final")
    >>> clf(["a gripping film", "a dull film"])
    [{'label': 'pos', 'score': 0.97}, {'label': 'neg', 'score': 0.91}]

Five tasks, the ones ``transformers`` users know: text-classification, token-classification (entities with
character offsets), question-answering (doc-stride windows over long contexts), fill-mask and feature-extraction
(pooled, normalised sentence embeddings). Every pipeline tokenizes without padding, runs the model in
length-bucketed batches (`batching.run_batched`) under ``torch.inference_mode()``, in the precision the
hardware runs best (``precision="auto"``: bf16 where it is native, else fp32), and returns results in input order:
one input in, one result out; a list in, a list out.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import resolve_model_dir
from ..config import read_json_file
from ..data.tasks import (
    MCExample,
    QAExample,
    postprocess_qa,
    prepare_multiple_choice_features,
    prepare_qa_features,
    text_lines,
)
from ..heads import (
    EncoderForMaskedLM,
    EncoderForMultipleChoice,
    EncoderForPreTraining,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    EncoderHead,
    from_pretrained,
    model_class_for,
)
from ..layers import prepack_linears
from ..runtime import PRECISIONS, precision_dtype, resolve_precision
from ..tokenizer import load_tokenizer
from .batching import run_batched
from .memory import keep_freed_memory

__all__ = [
    "TASKS", "FeatureExtractionPipeline", "FillMaskPipeline", "Pipeline", "QuestionAnsweringPipeline",
    "TextClassificationPipeline", "TokenClassificationPipeline", "pipeline", "predict_main", "task_for_model",
]

logger = logging.getLogger(__name__)

TASK_ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}
# ForPreTraining checkpoints carry the same masked-LM head as ForMaskedLM ones.
_TASK_OF_HEAD = {"pretraining": "fill-mask"}


def _unknown(kind: str, name: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(valid)}"
    return ValueError(f"unknown {kind} '{name}'{hint}")


def _text_of(item: Any) -> tuple[str, str | None]:
    """(text, text_pair) of a str or a ``{"text", "text_pair"}`` mapping; ValueError naming what is wrong."""
    if isinstance(item, str):
        return item, None
    if not isinstance(item, Mapping):
        raise _bad_input(f"expected a string or an object with 'text', got a {type(item).__name__}")
    text, pair = item.get("text"), item.get("text_pair")
    if not isinstance(text, str):
        raise _bad_input(f"field 'text' is {_kind(text)}; expected a string")
    if pair is not None and not isinstance(pair, str):
        raise _bad_input(f"field 'text_pair' is {_kind(pair)}; expected a string")
    return text, pair


def _kind(value: Any) -> str:
    return "missing" if value is None else repr(value) if isinstance(value, str) else f"a {type(value).__name__}"


def _int_option(low: int, high: int | None = None, extra: tuple[Any, ...] = ()) -> Any:
    def check(self: Pipeline, name: str, value: Any) -> None:
        if value in extra and isinstance(value, str):
            return
        top = high(self) if callable(high) else high
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (top is not None and value > top):
            kind = "a positive int" if low == 1 else f"an int >= {low}"
            bound = f" (at most {top})" if top is not None else ""
            alt = "".join(f" or {e!r}" for e in extra)
            raise ValueError(f"{name} must be {kind}{bound}{alt}, got {value!r}")
    return check


def _choice_option(*choices: Any) -> Any:
    def check(self: Pipeline, name: str, value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise _unknown(f"option {name}", str(value)[:40], choices)
    return check


def _bool_option(self: Pipeline, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")  # noqa: TRY004 - a bad request, not a bug


def _labels_option(self: Pipeline, name: str, value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of label names, got {value!r}")


# Call options checked before any work (a server answers 422 instead of failing mid-batch); None means the default.
_OPTION_RULES: dict[str, Any] = {
    "doc_stride": _int_option(0, lambda p: p.max_length - 1),
    "max_question_length": _int_option(1, lambda p: p.max_length),
    "max_answer_length": _int_option(1, 100_000),
    "n_best": _int_option(1, 1000),
    "handle_impossible_answer": _bool_option,
    "ignore_labels": _labels_option,
    "pooling": _choice_option("mean", "cls"),
    "normalize": _bool_option,
    "return_tensors": _bool_option,
}


def _bad_input(message: str) -> ValueError:
    # ValueError, not TypeError: a bad input line is a data error, reported with its location like every other
    # input error (the CLI turns ValueErrors into messages).
    return ValueError(message)


# ------------------------------------------------------------------------------------------------------- base


class Pipeline:
    """Tokenize -> bucketed forward passes -> per-input results. Subclasses name their ``task``, the model
    classes they accept, their call options (``options``: name -> default), and implement ``check_input`` and
    ``_predict``.

    Options given to the constructor become this pipeline's defaults; options given to a call override them
    for that call. Unknown options are errors that suggest the closest valid one.
    """

    task: ClassVar[str] = ""
    model_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    options: ClassVar[dict[str, Any]] = {}
    option_rules: ClassVar[dict[str, Any]] = {}  # per-task checks, over the shared _OPTION_RULES
    default_max_length: ClassVar[int] = 512
    backend: str = "torch"  # what runs the model: "torch", or "ENGINE:FILE" for an export (`engines.BACKEND_FILES`)

    def __init__(self, model: nn.Module, tokenizer: Any, device: str | torch.device = "cpu", batch_size: int = 32,
                 precision: str = "auto", max_length: int | None = None, max_tokens: int | None = None,
                 pad_to_multiple_of: int | None = None, bf16: bool | None = None, **options: Any) -> None:
        if self.model_classes and not isinstance(model, self.model_classes):
            raise ValueError(self._wrong_model_message(model))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        if bf16 is not None:  # the older switch: True asked for the fast precision
            precision = "auto" if bf16 else "fp32"
        self.precision = resolve_precision(precision, self.device)
        dtype = precision_dtype(self.precision)
        param = next(model.parameters(), None)  # None: an exported graph, whose precision is its own
        if param is not None and param.dtype != dtype:  # cast once (no per-call casts); a copy, the caller's stays
            model = copy.deepcopy(model).to(dtype)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":  # encoder weights reordered once for oneDNN; activation buffers reused
            prepack_linears(self.model)
            keep_freed_memory()
        self.config = model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        positions = self.config.max_position_embeddings
        if max_length is not None and not 2 < max_length <= positions:
            raise ValueError(f"max_length must be in [3, {positions}] (the model's max_position_embeddings), "
                             f"got {max_length}")
        self.max_length = max_length or min(self.default_max_length, positions)
        self.defaults = self._options(options, dict(self.options))

    def _wrong_model_message(self, model: nn.Module) -> str:
        wanted = " or ".join(c.__name__ for c in self.model_classes)
        return (f"{self.task} needs a {wanted}, got a {type(model).__name__}; load a checkpoint trained for "
                f"{self.task} (config.json 'architectures' names the head)")

    def _options(self, given: Mapping[str, Any], base: dict[str, Any]) -> dict[str, Any]:
        for key in given:
            if key not in self.options:
                raise _unknown(f"{self.task} option", key, sorted(self.options))
        return {**base, **given}

    def __call__(self, inputs: Any, **options: Any) -> Any:
        """One input -> one result; a list (or tuple) of inputs -> a list of results, in input order."""
        opts = self._options(options, self.defaults)
        self.check_options(opts)
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        for i, item in enumerate(items):
            try:
                self.check_input(item)
            except ValueError as err:
                raise ValueError(f"{self.task} input {i}: {err}") from None
        results = self._predict(items, opts) if items else []
        return results[0] if single else results

    def check_input(self, item: Any) -> None:
        """ValueError (without a location: callers add input index or file:line) when ``item`` is unusable."""
        _text_of(item)

    def example(self) -> Any:
        """A small valid input, for `warm_up`."""
        return "litebert warm-up"

    def warm_up(self) -> None:
        """One forward pass on `example`, so a model that cannot run here (a precision or kernel this machine lacks)
        fails now, with a RuntimeError that says so, rather than on the first request."""
        try:
            self(self.example())
        except Exception as err:
            raise RuntimeError(f"{self.task} pipeline ({self.precision} on {self.device}) cannot run on this machine: "
                               f"{type(err).__name__}: {err}") from err

    def check_options(self, options: Mapping[str, Any]) -> None:
        """ValueError naming the option when a call option has the wrong type or range (``None``: the default)."""
        for key, value in options.items():
            rule = self.option_rules.get(key, _OPTION_RULES.get(key))
            if rule is not None and value is not None:
                rule(self, key, value)

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        raise NotImplementedError

    # -- shared steps ----------------------------------------------------------------------------------------------

    def _encode(self, items: Sequence[Any], offsets: bool = False, word_ids: bool = False) -> list[dict[str, Any]]:
        """Unpadded rows (lists) for str / ``{"text", "text_pair"}`` inputs, truncated to ``max_length``."""
        texts = [_text_of(item) for item in items]
        rows: list[dict[str, Any]] = [{}] * len(texts)
        # The tokenizer takes pairs for a whole call or not at all, so single texts and pairs go in two calls.
        for with_pair in (False, True):
            idx = [i for i, (_, pair) in enumerate(texts) if (pair is not None) == with_pair]
            if not idx:
                continue
            pairs = [texts[i][1] for i in idx] if with_pair else None
            enc = self.tokenizer([texts[i][0] for i in idx], pairs, padding=False, truncation=True,
                                 max_length=self.max_length, return_tensors=None, return_offsets_mapping=offsets,
                                 **({"return_word_ids": True} if word_ids else {}))
            for j, i in enumerate(idx):
                rows[i] = {key: values[j] for key, values in enc.items()}
        return rows

    def _run(self, forward: Any, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        return run_batched(forward, rows, self.batch_size, max_tokens=self.max_tokens,
                           pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                           max_width=self.config.max_position_embeddings, device=self.device)

    def _labels(self) -> list[str]:
        id2label = self.config.id2label or {}
        return [id2label.get(i, f"LABEL_{i}") for i in range(self.config.num_labels)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, device={self.device}, "
                f"batch_size={self.batch_size}, precision={self.precision}, max_length={self.max_length})")


# ------------------------------------------------------------------------------------------- text classification


class TextClassificationPipeline(Pipeline):
    """Inputs: a text or ``{"text", "text_pair"}``. Output: ``{"label", "score"}`` (softmax probability of the
    best label); with ``top_k`` (an int, or ``"all"``) a list of the best labels, most likely first. A regression
    head (``num_labels == 1``) gives ``{"score": value}``, the raw prediction."""

    task = "text-classification"
    model_classes = (EncoderForSequenceClassification,)
    options: ClassVar[dict[str, Any]] = {"top_k": None}
    option_rules: ClassVar[dict[str, Any]] = {"top_k": _int_option(1, None, ("all",))}

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        top_k = opts["top_k"]
        if top_k is not None and top_k != "all" and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int, 'all' or None, got {top_k!r}")
        # The head reads [CLS] alone, so the last layer computes only that position (same logits, 1/L less work).
        logits = self._run(lambda b: self.model(**b, first_token_only=True).logits.float().cpu().unbind(0),
                           self._encode(items))
        if self.config.num_labels == 1:
            return [{"score": float(row[0])} for row in logits]
        labels = self._labels()
        results: list[Any] = []
        for row in logits:
            probs = row.softmax(-1)
            if top_k is None:
                best = int(probs.argmax())
                results.append({"label": labels[best], "score": float(probs[best])})
            else:
                k = len(labels) if top_k == "all" else min(top_k, len(labels))
                scores, ids = probs.topk(k)
                results.append([{"label": labels[i], "score": float(s)} for s, i in zip(scores.tolist(), ids.tolist())])
        return results


# ------------------------------------------------------------------------------------------ token classification


def _split_tag(label: str) -> tuple[str, str]:
    """("B" | "I", entity type): B-/S- start an entity, I-/E- continue one; a bare label (``O``, ``PER``)
    continues a run of the same label."""
    if len(label) > 2 and label[1] == "-" and label[0] in "BISE":
        return ("B" if label[0] in "BS" else "I"), label[2:]
    return "I", label


class TokenClassificationPipeline(Pipeline):
    """Inputs: a text. Output: a list of entities with character offsets into the text, ``text[start:end] ==
    word``.

    Words are the tokenizer's pre-tokenised words (for WordPiece, punctuation is a word of its own), the units
    fine-tuning labels. ``aggregation_strategy`` picks each word's label from its pieces, then groups consecutive
    words whose labels share an entity type (a ``B-`` label starts a new entity) into ``{"entity_group", "score"
    (mean over words), "word", "start", "end"}``: ``"first"`` (default) takes the first piece's label and score, as
    fine-tuning trains it; ``"average"`` averages the pieces' probabilities; ``"max"`` takes the most confident
    piece's label. ``"simple"`` groups pieces instead of words (a word can then be split between two entities);
    ``"none"`` gives one entry per word piece: ``{"entity", "score", "index" (token position), "word", "start",
    "end"}``. Entities (or pieces) labelled one of ``ignore_labels`` are left out. Texts longer than
    ``max_length`` tokens are truncated; their tail gets no entities.
    """

    task = "token-classification"
    model_classes = (EncoderForTokenClassification,)
    options: ClassVar[dict[str, Any]] = {"aggregation_strategy": "first", "ignore_labels": ("O",)}
    strategies: ClassVar[tuple[str, ...]] = ("first", "average", "max", "simple", "none")
    option_rules: ClassVar[dict[str, Any]] = {"aggregation_strategy": _choice_option(*strategies)}

    def check_input(self, item: Any) -> None:
        if _text_of(item)[1] is not None:
            raise _bad_input("token-classification takes one text; got a 'text_pair'")

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        strategy = opts["aggregation_strategy"]
        if strategy not in self.strategies:
            raise _unknown("aggregation_strategy", str(strategy), self.strategies)
        rows = self._encode(items, offsets=True, word_ids=strategy in ("first", "average", "max"))
        # A row filling max_length was (almost surely) cut short.
        truncated = sum(1 for row in rows if len(row["input_ids"]) >= self.max_length)
        if truncated:
            logger.warning("%d of %d texts are longer than max_length=%d tokens and were truncated; their tail gets "
                           "no entities", truncated, len(items), self.max_length)
        probs = self._run(lambda b: self.model(**b).logits.float().softmax(-1).cpu().unbind(0), rows)
        labels = self._labels()
        ignore = set(opts["ignore_labels"] or ())
        results = []
        for item, row, p in zip(items, rows, probs):
            text = _text_of(item)[0]
            scores, ids = p[:len(row["input_ids"])].max(-1)
            pieces = [
                {"entity": labels[k], "score": s, "index": t, "word": text[start:end], "start": start, "end": end}
                for t, ((start, end), s, k) in enumerate(zip(row["offset_mapping"], scores.tolist(), ids.tolist()))
                if end > start  # special tokens and padding carry no text (their offsets are (0, 0))
            ]
            if strategy == "none":
                results.append([piece for piece in pieces if piece["entity"] not in ignore])
            elif strategy != "simple":
                words = self._words(p[:len(row["input_ids"])], row, text, strategy, labels)
                results.append([g for g in self._group(words, text) if g["entity_group"] not in ignore])
            else:
                results.append([g for g in self._group(pieces, text) if g["entity_group"] not in ignore])
        return results

    @staticmethod
    def _words(p: Tensor, row: Mapping[str, Any], text: str, strategy: str, labels: list[str]
               ) -> list[dict[str, Any]]:
        """One ``{"entity", "score", "start", "end"}`` per word, from the (T, labels) probabilities of its pieces."""
        spans: dict[int, list[int]] = {}
        for t, (w, (start, end)) in enumerate(zip(row["word_ids"], row["offset_mapping"])):
            if w is not None and end > start:
                spans.setdefault(w, []).append(t)
        words = []
        for pieces in spans.values():
            probs = p[pieces]  # (pieces, labels)
            if strategy == "first":
                score, k = probs[0].max(-1)
            elif strategy == "average":
                score, k = probs.mean(0).max(-1)
            else:
                best = int(probs.max(-1).values.argmax())
                score, k = probs[best].max(-1)
            start, end = row["offset_mapping"][pieces[0]][0], row["offset_mapping"][pieces[-1]][1]
            words.append({"entity": labels[int(k)], "score": float(score), "start": start, "end": end})
        return words

    @staticmethod
    def _group(pieces: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        scores: list[list[float]] = []
        for piece in pieces:
            bi, tag = _split_tag(piece["entity"])
            if groups and bi == "I" and tag == groups[-1]["entity_group"]:
                groups[-1]["end"] = piece["end"]
                scores[-1].append(piece["score"])
            else:
                groups.append({"entity_group": tag, "start": piece["start"], "end": piece["end"]})
                scores.append([piece["score"]])
        return [{"entity_group": g["entity_group"], "score": sum(s) / len(s), "word": text[g["start"]:g["end"]],
                 "start": g["start"], "end": g["end"]} for g, s in zip(groups, scores)]


# ------------------------------------------------------------------------------------------- question answering


class QuestionAnsweringPipeline(Pipeline):
    """Inputs: ``{"question", "context"}`` (or ``qa(question=..., context=...)``). Output: ``{"answer", "start",
    "end", "score"}`` with ``context[start:end] == answer`` and ``score`` = p(start) * p(end), each a softmax over
    the window's context tokens and [CLS].

    A context longer than ``max_length`` (default 384 tokens, or the model's position count) is split into
    windows overlapping by ``doc_stride`` tokens (`prepare_qa_features`); the best span over all windows wins
    (`postprocess_qa`). With ``handle_impossible_answer`` the answer is "" (start = end = -1) when the [CLS]
    score beats every span.
    """

    task = "question-answering"
    model_classes = (EncoderForQuestionAnswering,)
    options: ClassVar[dict[str, Any]] = {"doc_stride": None, "max_question_length": None, "max_answer_length": 30,
               "handle_impossible_answer": False, "n_best": 20}

    def example(self) -> Any:
        return {"question": "what warms up?", "context": "litebert warms up"}
    default_max_length = 384

    def __call__(self, inputs: Any = None, **options: Any) -> Any:
        if inputs is None and "question" in options and "context" in options:
            inputs = {"question": options.pop("question"), "context": options.pop("context")}
        return super().__call__(inputs, **options)

    def check_input(self, item: Any) -> None:
        if not isinstance(item, Mapping):
            raise _bad_input(f"expected an object with 'question' and 'context', got a {type(item).__name__}")
        for key in ("question", "context"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                raise _bad_input(f"field {key!r} is {_kind(value)}; expected a non-empty string")

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        max_len = self.max_length
        # Defaults scaled to the window so that small models (64 positions in tests) still leave room for context.
        stride = opts["doc_stride"] if opts["doc_stride"] is not None else min(128, max_len // 4)
        max_q = opts["max_question_length"] if opts["max_question_length"] is not None else min(64, max_len // 2)
        examples = [QAExample(str(i), item["question"], item["context"], [], False, "input")
                    for i, item in enumerate(items)]
        features = prepare_qa_features(examples, self.tokenizer, max_seq_length=max_len, doc_stride=stride,
                                       max_query_length=max_q)

        def forward(batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
            out = self.model(**batch)
            return list(zip(out.start_logits.float().cpu().unbind(0), out.end_logits.float().cpu().unbind(0)))

        logits = self._run(forward, features)
        starts, ends = [], []
        for feat, (start, end) in zip(features, logits):
            # Softmax over the window's context tokens and [CLS] only (as transformers does), in log space so that
            # postprocess_qa's "start + end" is log p(start) + log p(end) and comparable across windows.
            keep = torch.tensor([t == 0 or off is not None for t, off in enumerate(feat["offset_mapping"])])
            n = len(keep)
            starts.append(start[:n].masked_fill(~keep, -math.inf).log_softmax(-1))
            ends.append(end[:n].masked_fill(~keep, -math.inf).log_softmax(-1))
        answers = postprocess_qa(examples, features, starts, ends, n_best=opts["n_best"],
                                 max_answer_length=opts["max_answer_length"],
                                 version_2=bool(opts["handle_impossible_answer"]), null_threshold=0.0)
        results = []
        for ex in examples:
            a = answers[ex.id]
            results.append({"answer": a["text"], "start": a["start"], "end": a["end"], "score": math.exp(a["score"])})
        return results


# ------------------------------------------------------------------------------------------------------ fill mask


class FillMaskPipeline(Pipeline):
    """Inputs: a text with the tokenizer's mask token (``[MASK]``). Output: the ``top_k`` (default 5) fillers,
    most likely first, ``{"token_str", "token" (id), "score", "sequence" (the text with the filler)}``; a text
    with several masks gives one such list per mask. Only the masked positions are projected onto the
    vocabulary."""

    task = "fill-mask"
    model_classes = (EncoderForMaskedLM, EncoderForPreTraining)
    options: ClassVar[dict[str, Any]] = {"top_k": 5}
    option_rules: ClassVar[dict[str, Any]] = {"top_k": _int_option(1, 1000)}

    def _wrong_model_message(self, model: nn.Module) -> str:
        return (f"fill-mask needs a masked-LM head (EncoderForMaskedLM or EncoderForPreTraining), got a "
                f"{type(model).__name__} with none; this checkpoint has no MLM weights (sentence-embedding models "
                f"such as all-MiniLM-L6-v2 ship none): use feature-extraction, or a checkpoint saved with an MLM head")

    def example(self) -> Any:
        return f"litebert {self.tokenizer.special_tokens['mask']} up"

    def check_input(self, item: Any) -> None:
        text, pair = _text_of(item)
        mask = self.tokenizer.special_tokens["mask"]
        if mask not in text and (pair is None or mask not in pair):
            raise ValueError(f"no mask token {mask!r} in the text")

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        top_k = opts["top_k"]
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        mask_id = self.tokenizer.mask_token_id
        rows = self._encode(items)
        for i, row in enumerate(rows):
            if mask_id not in row["input_ids"]:
                raise ValueError(f"fill-mask input {i}: the mask token lies beyond max_length={self.max_length} "
                                 f"tokens and was truncated away")
        k = min(top_k, self.config.vocab_size)

        def forward(batch: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
            ids = batch["input_ids"]
            is_mask = ids == mask_id
            # Labels at the masked positions make the head project only those rows onto the vocabulary: (N, V).
            out = self.model(**batch, labels=torch.where(is_mask, ids, -100))
            scores, top = out.logits.float().softmax(-1).topk(k)  # (N, k) each, N masks in row-major order
            counts = is_mask.sum(1).tolist()
            return list(zip(scores.cpu().split(counts), top.cpu().split(counts)))

        results = []
        for row, (scores, top) in zip(rows, self._run(forward, rows)):
            ids = list(row["input_ids"])
            positions = [t for t, token in enumerate(ids) if token == mask_id]
            per_mask = []
            for pos, s_row, id_row in zip(positions, scores.tolist(), top.tolist()):
                fills = []
                for score, token in zip(s_row, id_row):
                    filled = ids[:pos] + [token] + ids[pos + 1:]
                    fills.append({"token_str": self.tokenizer.decode([token]), "token": token, "score": score,
                                  "sequence": self.tokenizer.decode(filled)})
                per_mask.append(fills)
            results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results


# -------------------------------------------------------------------------------------------- feature extraction


class FeatureExtractionPipeline(Pipeline):
    """Inputs: a text or ``{"text", "text_pair"}``. Output: one sentence embedding (H floats) per input:
    ``pooling="mean"`` (default; the attention-mask weighted mean of the last hidden states, as
    sentence-transformers pools) or ``"cls"`` (the [CLS] state), L2-normalised unless ``normalize=False``.
    ``return_tensors=True`` gives a (N, H) float32 tensor ((H,) for one input) instead of lists. Works on any
    checkpoint: a task model's encoder is used without its head."""

    task = "feature-extraction"
    options: ClassVar[dict[str, Any]] = {"pooling": "mean", "normalize": True, "return_tensors": False}

    def __call__(self, inputs: Any, **options: Any) -> Any:
        opts = self._options(options, self.defaults)
        results = super().__call__(inputs, **options)
        if opts["return_tensors"] and isinstance(results, list):
            return torch.stack(results) if results else torch.empty(0, self.config.hidden_size)
        return results

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        pooling, normalize = opts["pooling"], opts["normalize"]
        if pooling not in ("mean", "cls"):
            raise _unknown("pooling", str(pooling), ["cls", "mean"])
        encoder = self.model.encoder if isinstance(self.model, EncoderHead) else self.model

        def forward(batch: dict[str, Tensor]) -> list[Tensor]:
            hidden = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
            hidden = hidden.float()  # (B, T, H)
            if pooling == "cls":
                pooled = hidden[:, 0]  # (B, H)
            else:
                mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
            if normalize:
                pooled = F.normalize(pooled, p=2, dim=-1)
            return pooled.cpu().unbind(0)

        vectors = self._run(forward, self._encode(items))
        if opts["return_tensors"]:
            return vectors
        return [v.tolist() for v in vectors]


# ------------------------------------------------------------------------------------------------ multiple choice


class MultipleChoicePipeline(Pipeline):
    """Inputs: ``{"question", "choices": [at least two strings], "context" (optional)}``, laid out the way
    fine-tuning lays them out (``prepare_multiple_choice_features``). Output: ``{"label" (the best choice's index),
    "choice", "score" (its softmax probability), "scores" (one per choice)}``."""

    task = "multiple-choice"
    model_classes = (EncoderForMultipleChoice,)

    def check_input(self, item: Any) -> None:
        if not isinstance(item, Mapping):
            raise _bad_input(f"expected an object with 'question' and 'choices', got a {type(item).__name__}")
        question, choices, context = item.get("question"), item.get("choices"), item.get("context", "")
        if not isinstance(question, str):
            raise _bad_input(f"field 'question' is {_kind(question)}; expected a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise _bad_input("field 'choices' must be a list of at least two strings")
        if not isinstance(context, str):
            raise _bad_input(f"field 'context' is {_kind(context)}; expected a string")

    def _predict(self, items: list[Any], opts: dict[str, Any]) -> list[Any]:
        examples = [MCExample(it["question"], it["choices"], None, "input", i, it.get("context", ""))
                    for i, it in enumerate(items)]
        features = prepare_multiple_choice_features(examples, self.tokenizer, self.max_length)
        results = []
        with torch.inference_mode():
            for feat, ex in zip(features, examples):
                batch = {k: torch.tensor([feat[k]], device=self.device) for k in MODEL_INPUTS}  # (1, C, T)
                probs = self.model(**batch).logits.float().softmax(-1)[0].cpu()  # (C,)
                best = int(probs.argmax())
                results.append({"label": best, "choice": ex.choices[best], "score": float(probs[best]),
                                "scores": probs.tolist()})
        return results


# ------------------------------------------------------------------------------------------------------ factory


PIPELINES: dict[str, type[Pipeline]] = {cls.task: cls for cls in (
    TextClassificationPipeline, TokenClassificationPipeline, QuestionAnsweringPipeline, FillMaskPipeline,
    FeatureExtractionPipeline, MultipleChoicePipeline)}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TASKS = tuple(PIPELINES)


def _task_of_class(cls: type[nn.Module]) -> str:
    head_task = getattr(cls, "task", "")
    if not head_task:  # a bare encoder: BertModel, AlbertModel, DistilBertModel
        return "feature-extraction"
    return _TASK_OF_HEAD.get(head_task, head_task)


def task_for_model(model: nn.Module | str | Path) -> str:
    """The pipeline task a model (or a model directory, from its config.json ``architectures``) is made for:
    ``*ForSequenceClassification`` -> text-classification, ``*ForTokenClassification`` -> token-classification,
    ``*ForQuestionAnswering`` -> question-answering, ``*ForMaskedLM`` / ``*ForPreTraining`` -> fill-mask, a bare
    encoder -> feature-extraction."""
    if isinstance(model, nn.Module):
        return _task_of_class(type(model))
    config_json = read_json_file(resolve_model_dir(model) / "config.json")
    return _task_of_class(model_class_for(config_json))


def _resolve_task(task: str | None) -> str | None:
    if task is None or task == "auto":
        return None
    task = TASK_ALIASES.get(task, task)
    if task not in PIPELINES:
        raise _unknown("task", task, [*TASKS, "auto"])
    return task


def pipeline(task: str | None = None, model: nn.Module | str | Path | None = None, tokenizer: Any = None,
             device: str | torch.device = "cpu", batch_size: int = 32, precision: str = "auto",
             max_length: int | None = None, max_tokens: int | None = None, pad_to_multiple_of: int | None = None,
             backend: str = "auto", **options: Any) -> Pipeline:
    """A ready-to-call pipeline for ``task`` (None or "auto": the task the model was trained for, see
    `task_for_model`).

    ``model`` is a model directory or a loaded model (then ``tokenizer`` is required: a LiteTokenizer or a
    directory). A directory may hold PyTorch weights (litebert or ``transformers``) and/or ``litebert export``
    outputs (ONNX fp32, ONNX int8, OpenVINO); ``backend`` picks which runs: ``torch``, ``onnx``, ``onnx-int8``,
    ``openvino``, or ``auto`` (default), the fastest present for this machine by the measured rule of
    `litebert.inference.engines.choose_backend` (int8 only under ``precision="auto"``). The choice is logged and
    kept in the pipeline's ``backend``. Its tokenizer is loaded from the directory unless given. ``batch_size``
    rows per forward pass, at most ``max_tokens`` padded tokens per pass when set; each batch is padded to its
    longest row (rounded up to ``pad_to_multiple_of`` when set). ``precision``: ``auto`` (bf16 where the hardware
    runs it natively, else fp32), ``fp32`` or ``bf16`` (runs anywhere; warns where bf16 is emulated and slow); a
    model whose weights are in another dtype is cast once, into a copy; an ONNX graph keeps its own precision, an
    OpenVINO one takes it as its precision hint. ``max_length`` truncates inputs (default: 512, 384 for question
    answering, capped at the model's positions). Remaining keyword arguments are the task's options (e.g.
    ``top_k``, ``aggregation_strategy``) and become its defaults.
    """
    if model is None:
        raise ValueError("pipeline needs model=: a model directory or a loaded model")
    task = _resolve_task(task)
    kwargs = {"device": device, "batch_size": batch_size, "precision": precision, "max_length": max_length,
              "max_tokens": max_tokens, "pad_to_multiple_of": pad_to_multiple_of}
    if isinstance(model, (str, Path)):
        from .engines import BACKEND_FILES, backends_in, choose_backend, engine_pipeline

        model_dir = resolve_model_dir(model)
        if backend not in ("auto", *BACKEND_FILES):
            raise _unknown("backend", backend, ["auto", *BACKEND_FILES])
        chosen = choose_backend(backends_in(model_dir), precision) if backend == "auto" else backend
        if chosen != "torch":
            if torch.device(device).type != "cpu":
                raise ValueError(f"backend {chosen} runs on the CPU; use backend='torch' for device={device}")
            kwargs.pop("device")
            pipe = engine_pipeline(model_dir, task, chosen, tokenizer=tokenizer, **kwargs, **options)
            logger.info("pipeline %s: backend %s (%s) for %s", pipe.task, pipe.backend, pipe.precision, model_dir)
            return pipe
        if tokenizer is None:
            tokenizer = load_tokenizer(model_dir)
        model = from_pretrained(str(model_dir))
        logger.info("pipeline: backend torch for %s", model_dir)
    elif tokenizer is None:
        raise ValueError("pipeline: a loaded model needs tokenizer= (a LiteTokenizer or a tokenizer directory)")
    elif backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r} needs a model directory; a loaded model runs in PyTorch")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    task = task or task_for_model(model)
    return PIPELINES[task](model, tokenizer, **kwargs, **options)


# ---------------------------------------------------------------------------------------------------------- CLI

_TEXT_SUFFIXES = (".txt", ".text")
_CHUNK = 4096  # inputs per pipeline call: bounds memory on big files while leaving plenty to bucket


def read_inputs(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, input) for every non-blank line: the line itself for ``.txt`` files, a JSON object per line
    for anything else (JSON Lines). ValueError naming file:line for a line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    records: list[tuple[int, Any]] = []
    for lineno, raw in enumerate(text_lines(path), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if path.suffix.lower() in _TEXT_SUFFIXES:
            records.append((lineno, line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg}); inputs other than .txt are read as JSON "
                             f"Lines, one object per line") from None
        if not isinstance(obj, dict):
            raise _bad_input(f"{path}:{lineno}: expected a JSON object such as {{\"text\": ...}} or "
                             f"{{\"question\": ..., \"context\": ...}}, got {line.strip()[:80]}")
        records.append((lineno, obj))
    return records


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_main(argv: list[str]) -> int:
    """litebert predict --model DIR --input FILE [--task auto] [--output FILE]: one JSON object per input line."""
    parser = argparse.ArgumentParser(
        prog="litebert predict",
        description="Run a model directory over a file of inputs and write one JSON object per input line, in order: "
                    "{\"line\": N, \"prediction\": ...} (plus \"id\" when the input has one). Blank lines are skipped.")
    parser.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--input", required=True,
                        help="JSON Lines with {\"text\"[, \"text_pair\"]} or {\"question\", \"context\"} per line, "
                             "or a .txt file with one text per line")
    parser.add_argument("--task", default="auto", choices=["auto", *TASKS],
                        help="default: the task the model was trained for (config.json architectures)")
    parser.add_argument("--output", default="-", help="output JSON Lines file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on padded tokens per forward pass")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate inputs to this many tokens (default: 512, 384 for QA, capped by the model)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default): bf16 where the hardware runs it natively, else fp32")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "onnx-int8", "openvino"],
                        help="what runs the model when --model holds several (weights, litebert export outputs); "
                             "auto (default): the fastest present for this machine")
    parser.add_argument("--top-k", type=int, default=None,
                        help="text-classification: the k best labels; fill-mask: k fillers (default 5)")
    parser.add_argument("--aggregation", choices=list(TokenClassificationPipeline.strategies), default=None,
                        help="token-classification: group word pieces into entities (simple, default) or not")
    parser.add_argument("--handle-impossible-answer", action="store_true",
                        help="question-answering: answer \"\" when no span beats [CLS] (SQuAD 2.0 models)")
    args = parser.parse_args(argv)

    task = _resolve_task(args.task) or task_for_model(args.model)
    options: dict[str, Any] = {}
    if args.top_k is not None:
        if task not in ("text-classification", "fill-mask"):
            raise ValueError(f"--top-k applies to text-classification and fill-mask, not {task}")
        options["top_k"] = args.top_k
    if args.aggregation is not None:
        if task != "token-classification":
            raise ValueError(f"--aggregation applies to token-classification, not {task}")
        options["aggregation_strategy"] = args.aggregation
    if args.handle_impossible_answer:
        if task != "question-answering":
            raise ValueError(f"--handle-impossible-answer applies to question-answering, not {task}")
        options["handle_impossible_answer"] = True

    records = read_inputs(args.input)  # syntax errors surface before the model is loaded
    pipe = pipeline(task, model=args.model, device=args.device, batch_size=args.batch_size, precision=args.precision,
                    max_length=args.max_length, max_tokens=args.max_tokens, backend=args.backend, **options)
    for lineno, item in records:
        try:
            pipe.check_input(item)
        except ValueError as err:
            raise ValueError(f"{args.input}:{lineno}: {err}") from None

    t0 = time.perf_counter()
    out_path = None if args.output == "-" else Path(args.output)
    tmp = out_path.with_name(out_path.name + ".tmp") if out_path else None
    if tmp is not None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    out = tmp.open("w", encoding="utf-8") if tmp is not None else sys.stdout
    try:
        for chunk in _chunks(records, _CHUNK):
            predictions = pipe([item for _, item in chunk])
            for (lineno, item), prediction in zip(chunk, predictions):
                record: dict[str, Any] = {"line": lineno}
                if isinstance(item, dict) and "id" in item:
                    record["id"] = item["id"]
                record["prediction"] = prediction
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    except BaseException:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        out.close()
    if out_path is not None and tmp is not None:
        os.replace(tmp, out_path)  # a crash mid-way leaves no half-written output under the real name
    elapsed = time.perf_counter() - t0
    logger.info("%s: %d inputs in %.2f s (%.1f inputs/s)%s", task, len(records), elapsed,
                len(records) / max(elapsed, 1e-9), f" -> {out_path}" if out_path else "")
    return 0
