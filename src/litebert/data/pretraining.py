"""ALBERT pre-training examples: sentence-order pairs, n-gram / whole-word masking, packing and batching.

    files ─▶ corpus.iter_file_documents ─▶ tokenizer.encode_words (batched; cached as .npz per file)
          ─▶ create_sop_examples (A, B, order label) ─▶ pack_pair ([CLS] A [SEP] B [SEP])
          ─▶ mask_example (static, at creation) or MaskingCollator (dynamic, at batch time) ─▶ collate

Determinism: every random choice comes from a ``random.Random`` seeded by strings built from
``(seed, epoch, document index, example index)``, never from global state, so the stream depends only on the
files, the tokenizer and the config: ranks, DataLoader workers and resumed runs all regenerate the exact
same examples. Static masking keys on epoch 0 (the same masks every epoch); dynamic masking keys on the
current epoch, so pairs and masks are drawn afresh each epoch (like ALBERT's ``dupe_factor``).

Labels follow ALBERT/``transformers``: ``sentence_order_label`` 0 = segments in document order,
1 = swapped; MLM ``labels`` hold the original id at masked positions and -100 elsewhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from litebert.data.corpus import SPLITTER_VERSION, CorpusStats, PathArg, expand_paths, iter_file_documents

__all__ = [
    "DEFAULT_CACHE_DIR",
    "IGNORE_INDEX",
    "MaskingCollator",
    "PretrainingConfig",
    "PretrainingDataset",
    "PretrainingLoader",
    "PretrainingTokenizer",
    "SegmentPair",
    "SpecialTokens",
    "TokenizedDocument",
    "build_pretraining_loader",
    "collate",
    "count_examples",
    "create_sop_examples",
    "mask_example",
    "mask_tokens",
    "pack_pair",
    "select_ngram_spans",
    "tokenizer_fingerprint",
    "truncate_seq_pair",
    "word_units",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_CACHE_DIR = Path("~/.cache/litebert/pretrain")
CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------- config


@dataclass
class PretrainingConfig:
    """How documents become ALBERT pre-training examples.

    ``max_seq_length`` counts [CLS] and [SEP]s. ``short_seq_prob``: chance that a document's target length is
    drawn from [2, max] instead of the max. ``sop=False`` makes plain MLM examples ``[CLS] A [SEP]``.
    ``masked_lm_prob`` of the maskable tokens (never [CLS]/[SEP]/[PAD] or other special ids) are masked, at
    most ``max_predictions_per_seq``, in spans of 1..``ngram`` words with p(n) ∝ 1/n; each masked token
    becomes [MASK], a random non-special token or itself with the three ``*_prob``. ``shuffle_buffer``
    examples are shuffled in a streaming buffer (0 or 1: document order). ``padding``: "max_length" pads to
    ``max_seq_length``, "longest" to the longest example of the batch, rounded up to ``pad_to_multiple_of``.
    ``text_field``, ``min_chars`` and ``doc_per_file`` are passed to ``corpus.iter_file_documents``.
    """

    max_seq_length: int = 128
    short_seq_prob: float = 0.1
    sop: bool = True
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    ngram: int = 3
    whole_word: bool = True
    dynamic_masking: bool = False
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    keep_prob: float = 0.1
    seed: int = 12345
    shuffle_buffer: int = 10_000
    padding: str = "max_length"
    pad_to_multiple_of: int | None = None
    text_field: str = "text"
    min_chars: int = 1
    doc_per_file: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, need: str) -> None:
            raise ValueError(f"PretrainingConfig.{name} must be {need}, got {getattr(self, name)!r}")

        min_len = 5 if self.sop else 3  # [CLS] A [SEP] B [SEP] with one token each
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < min_len:
            fail("max_seq_length", f"an int >= {min_len}")
        for name in ("short_seq_prob", "masked_lm_prob", "mask_replace_prob", "random_replace_prob", "keep_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                fail(name, "a probability in [0, 1]")
        total = self.mask_replace_prob + self.random_replace_prob + self.keep_prob
        if abs(total - 1.0) > 1e-6:
            fail("keep_prob", f"such that mask_replace_prob + random_replace_prob + keep_prob == 1 (sum is {total:g})")
        for name, low in (("max_predictions_per_seq", 0), ("ngram", 1), ("shuffle_buffer", 0), ("min_chars", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                fail(name, f"an int >= {low}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            fail("seed", "an int")
        if self.padding not in ("max_length", "longest"):
            fail("padding", "'max_length' or 'longest'")
        if self.pad_to_multiple_of is not None and (not isinstance(self.pad_to_multiple_of, int)
                                                    or self.pad_to_multiple_of < 1):
            fail("pad_to_multiple_of", "None or an int >= 1")
        if not isinstance(self.text_field, str) or not self.text_field:
            fail("text_field", "a non-empty string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- tokenizer


class PretrainingTokenizer(Protocol):
    """What the pipeline needs from a tokenizer (``litebert.tokenizer.LiteTokenizer`` provides it)."""

    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    mask_token_id: int
    vocab_size: int
    special_ids: set[int]

    def encode_words(self, texts: list[str]) -> list[tuple[list[int], list[int | None]]]:
        """Token ids and the word index of each token, without special tokens."""
        ...


@dataclass(frozen=True)
class SpecialTokens:
    """The ids masking and packing need; small and picklable, unlike some tokenizers."""

    cls: int
    sep: int
    pad: int
    mask: int
    vocab_size: int
    special_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tok: PretrainingTokenizer) -> SpecialTokens:
        ids = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.mask_token_id)
        special = frozenset(int(i) for i in tok.special_ids) | frozenset(ids)
        out = cls(*(int(i) for i in ids), vocab_size=int(tok.vocab_size), special_ids=special)
        if sum(1 for i in special if 0 <= i < out.vocab_size) >= out.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({out.vocab_size}) has no non-special token to sample")
        return out


def tokenizer_fingerprint(tok: Any) -> str:
    """A string that changes whenever the tokenizer's output could: ``tok.fingerprint`` or a hash of its JSON."""
    fp = getattr(tok, "fingerprint", None)
    if callable(fp):
        fp = fp()
    if isinstance(fp, str) and fp:
        return fp
    inner = getattr(tok, "tokenizer", None)
    if inner is not None and hasattr(inner, "to_str"):
        return hashlib.sha256(inner.to_str().encode("utf-8")).hexdigest()
    raise ValueError(f"cannot fingerprint {type(tok).__name__} for the tokenized cache: give it a `fingerprint` "
                     "string or a `.tokenizer` (tokenizers.Tokenizer), or pass use_cache=False")


class TokenizedDocument(NamedTuple):
    """A tokenized document: sentence ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    ``word_starts`` marks tokens that begin a word (not a ``##`` / continuation piece of the previous token).
    """

    ids: np.ndarray  # (T,) int32
    word_starts: np.ndarray  # (T,) bool
    offsets: np.ndarray  # (S + 1,) int64

    @property
    def num_sentences(self) -> int:
        return len(self.offsets) - 1

    def segments(self) -> tuple[list[list[int]], list[list[bool]]]:
        ids, starts, o = self.ids, self.word_starts, self.offsets
        n = len(o) - 1
        return ([ids[o[i]: o[i + 1]].tolist() for i in range(n)], [starts[o[i]: o[i + 1]].tolist() for i in range(n)])


def _tokenized_document(encoded: Sequence[tuple[Sequence[int], Sequence[int | None]]]) -> TokenizedDocument:
    ids: list[int] = []
    starts: list[bool] = []
    offsets = [0]
    for sent_ids, word_ids in encoded:
        if not sent_ids:
            continue  # e.g. a sentence of characters the tokenizer drops
        prev: int | None = None
        for j, w in enumerate(word_ids):
            starts.append(j == 0 or w is None or w != prev)
            prev = w
        ids.extend(sent_ids)
        offsets.append(len(ids))
    return TokenizedDocument(np.asarray(ids, dtype=np.int32), np.asarray(starts, dtype=bool),
                             np.asarray(offsets, dtype=np.int64))


# ------------------------------------------------------------------------------------------ SOP pairs


@dataclass
class SegmentPair:
    """Two token spans and their order label (0 = A precedes B in the document, 1 = swapped).

    With ``sop=False``, ``tokens_b`` is empty and the label is -100 (no sentence-order target).
    """

    tokens_a: list[int]
    tokens_b: list[int]
    starts_a: list[bool]
    starts_b: list[bool]
    sentence_order_label: int


def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random,
                      starts_a: list[bool] | None = None, starts_b: list[bool] | None = None) -> None:
    """Trim in place, one token at a time from the longer side, at its front or back with p = 0.5 (BERT)."""
    starts_a = starts_a if starts_a is not None else [True] * len(a)
    starts_b = starts_b if starts_b is not None else [True] * len(b)
    while len(a) + len(b) > max_num_tokens:
        toks, starts = (a, starts_a) if len(a) > len(b) else (b, starts_b)
        # removing at the front or back avoids a bias toward keeping the start of every sequence
        if rng.random() < 0.5:
            del toks[0], starts[0]
        else:
            toks.pop()
            starts.pop()
    # a continuation piece left at the front after trimming masks as its own word
    for starts in (starts_a, starts_b):
        if starts:
            starts[0] = True


def create_sop_examples(
    doc_token_ids: Sequence[Sequence[int]],
    rng: random.Random,
    cfg: PretrainingConfig,
    doc_word_starts: Sequence[Sequence[bool]] | None = None,
) -> list[SegmentPair]:
    """ALBERT's ``create_instances_from_document`` for one document given as token ids per sentence.

    Sentences are gathered into a chunk until it reaches the target length (``max_seq_length - 3``, or with
    ``short_seq_prob`` a random length in [2, that]); the chunk is cut at a random sentence boundary into A
    and B, which are swapped with p = 0.5 (label 1, else 0), then the pair is trimmed to fit.

    One deliberate difference from ALBERT: for a chunk of a single sentence ALBERT takes B from a random
    *other* document (a leftover of next-sentence prediction) and labels it like a swap. Here a pair is always
    two consecutive spans of the same document: a chunk is closed only once it holds two sentences, and a last
    lone sentence joins the chunk before it. A document with fewer than two (non-empty) sentences therefore
    gives no SOP example; callers count those.

    With ``cfg.sop=False`` every chunk becomes one segment A (label -100), single-sentence documents included.
    """
    sents = [list(s) for s in doc_token_ids]
    starts = ([list(s) for s in doc_word_starts] if doc_word_starts is not None
              else [[True] * len(s) for s in sents])
    keep = [i for i, s in enumerate(sents) if s]
    sents, starts = [sents[i] for i in keep], [starts[i] for i in keep]
    n = len(sents)
    max_num_tokens = cfg.max_seq_length - (3 if cfg.sop else 2)
    target = max_num_tokens
    if rng.random() < cfg.short_seq_prob:
        target = rng.randint(2, max_num_tokens)
    if cfg.sop and n < 2:
        return []

    out: list[SegmentPair] = []
    chunk: list[int] = []  # sentence indices
    length = 0
    for i in range(n):
        chunk.append(i)
        length += len(sents[i])
        full = length >= target
        if cfg.sop:
            # need two sentences, and never leave a lone last sentence behind
            close = i == n - 1 or (full and len(chunk) >= 2 and i != n - 2)
        else:
            close = i == n - 1 or full
        if not close:
            continue
        if not cfg.sop:
            a = [t for j in chunk for t in sents[j]]
            sa = [s for j in chunk for s in starts[j]]
            truncate_seq_pair(a, [], max_num_tokens, rng, sa, [])
            out.append(SegmentPair(a, [], sa, [], IGNORE_INDEX))
        else:
            a_end = rng.randint(1, len(chunk) - 1)
            a = [t for j in chunk[:a_end] for t in sents[j]]
            sa = [s for j in chunk[:a_end] for s in starts[j]]
            b = [t for j in chunk[a_end:] for t in sents[j]]
            sb = [s for j in chunk[a_end:] for s in starts[j]]
            label = 0
            if rng.random() < 0.5:
                a, b, sa, sb, label = b, a, sb, sa, 1
            truncate_seq_pair(a, b, max_num_tokens, rng, sa, sb)
            out.append(SegmentPair(a, b, sa, sb, label))
        chunk, length = [], 0
    return out


def pack_pair(pair: SegmentPair, special: SpecialTokens) -> dict[str, Any]:
    """``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]``) as arrays: input_ids, token_type_ids, word_starts."""
    ids = [special.cls, *pair.tokens_a, special.sep]
    starts = [True, *pair.starts_a, True]
    types = [0] * len(ids)
    if pair.tokens_b:
        ids += [*pair.tokens_b, special.sep]
        starts += [*pair.starts_b, True]
        types += [1] * (len(pair.tokens_b) + 1)
    return {
        "input_ids": np.asarray(ids, dtype=np.int32),
        "token_type_ids": np.asarray(types, dtype=np.int8),
        "word_starts": np.asarray(starts, dtype=bool),
        "sentence_order_label": pair.sentence_order_label,
    }


# -------------------------------------------------------------------------------------------- masking


def word_units(input_ids: Sequence[int], special_ids: frozenset[int] | set[int],
               word_starts: Sequence[bool] | None = None) -> tuple[list[list[int]], list[int]]:
    """Maskable units and the run each belongs to.

    A unit is a list of positions: one token, or with ``word_starts`` a whole word (a word-initial token plus
    the continuation pieces after it). Special tokens are never in a unit; they separate runs, and an n-gram
    never spans two runs (so never crosses [SEP]).
    """
    units: list[list[int]] = []
    runs: list[int] = []
    run, prev_in_unit = 0, False
    for i, t in enumerate(input_ids):
        if t in special_ids:
            run += 1
            prev_in_unit = False
            continue
        if word_starts is not None and prev_in_unit and not word_starts[i]:
            units[-1].append(i)
        else:
            units.append([i])
            runs.append(run)
        prev_in_unit = True
    return units, runs


def select_ngram_spans(units: Sequence[Sequence[int]], runs: Sequence[int], num_to_predict: int,
                       rng: random.Random, ngram: int) -> list[tuple[int, int]]:
    """ALBERT's n-gram selection: ``(first unit, n)`` spans covering at most ``num_to_predict`` tokens.

    Visit span starts in random order; draw n from 1..``ngram`` with p(n) ∝ 1/n (limited to the units left in
    the run); while the span would exceed the budget, shorten it; skip it if it still does or overlaps a
    chosen span. Filling the budget exactly shortens the last span of a sequence, and longer spans overlap
    chosen ones more often, so accepted spans run a little shorter than p(n) in short sequences (as in ALBERT).
    """
    weights = [1.0 / n for n in range(1, ngram + 1)]
    covered = [False] * len(units)
    order = list(range(len(units)))
    rng.shuffle(order)
    spans: list[tuple[int, int]] = []
    used = 0
    for s in order:
        if used >= num_to_predict:
            break
        max_n = 1
        while max_n < ngram and s + max_n < len(units) and runs[s + max_n] == runs[s]:
            max_n += 1
        n = rng.choices(range(1, max_n + 1), weights=weights[:max_n])[0]
        size = sum(len(units[k]) for k in range(s, s + n))
        while n > 1 and used + size > num_to_predict:
            n -= 1
            size -= len(units[s + n])
        if used + size > num_to_predict or any(covered[s: s + n]):
            continue
        covered[s: s + n] = [True] * n
        used += size
        spans.append((s, n))
    return spans


def mask_tokens(input_ids: Sequence[int], rng: random.Random, cfg: PretrainingConfig, special: SpecialTokens,
                word_starts: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """(masked input ids, labels): MLM targets at masked positions, -100 elsewhere.

    Masks ``min(max_predictions_per_seq, max(1, round(masked_lm_prob * maskable)))`` tokens, where maskable
    counts non-special tokens. Each masked token independently becomes [MASK] / a random non-special token /
    itself with ``mask_replace_prob`` / ``random_replace_prob`` / ``keep_prob``.
    """
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    units, runs = word_units(ids, special.special_ids, word_starts if cfg.whole_word else None)
    maskable = sum(len(u) for u in units)
    if maskable == 0 or cfg.masked_lm_prob == 0 or cfg.max_predictions_per_seq == 0:
        return ids, labels
    num_to_predict = min(cfg.max_predictions_per_seq, max(1, round(maskable * cfg.masked_lm_prob)))
    p_mask = cfg.mask_replace_prob
    p_random = cfg.mask_replace_prob + cfg.random_replace_prob
    for s, n in select_ngram_spans(units, runs, num_to_predict, rng, cfg.ngram):
        for k in range(s, s + n):
            for pos in units[k]:
                labels[pos] = ids[pos]
                r = rng.random()
                if r < p_mask:
                    ids[pos] = special.mask
                elif r < p_random:
                    ids[pos] = _random_token(rng, special)
    return ids, labels


def _random_token(rng: random.Random, special: SpecialTokens) -> int:
    while True:
        t = rng.randrange(special.vocab_size)
        if t not in special.special_ids:
            return t


def mask_example(example: dict[str, Any], rng: random.Random, cfg: PretrainingConfig,
                 special: SpecialTokens) -> dict[str, Any]:
    """A copy of a packed example with masked ``input_ids`` and MLM ``labels``."""
    starts = example.get("word_starts")
    ids, labels = mask_tokens(np.asarray(example["input_ids"]).tolist(), rng, cfg, special,
                              None if starts is None else np.asarray(starts).tolist())
    out = dict(example)
    out["input_ids"] = np.asarray(ids, dtype=np.int32)
    out["labels"] = np.asarray(labels, dtype=np.int32)
    return out


def _seeded(*key: object) -> random.Random:
    # str seeds hash through sha512: stable across processes and Python versions, unlike hash()
    return random.Random(":".join(map(str, ("litebert", *key))))


def _seed_int(*key: object) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest(), "little")


# ------------------------------------------------------------------------------------------- batching


def collate(batch: Sequence[dict[str, Any]], *, pad_token_id: int = 0, padding: str = "longest",
            max_length: int | None = None, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad packed examples into int64 tensors of shape (B, T).

    Returns ``input_ids``, ``attention_mask`` (1 = real token), ``token_type_ids``, ``labels`` (-100 where not
    masked, all -100 for an unmasked example) and, when any example has a sentence-order target,
    ``sentence_order_label`` (B,). Plain-MLM batches (``sop=False``) have no ``sentence_order_label`` so that
    a model computes no SOP loss for them. T is the longest example (``padding="longest"``) or
    ``max_length`` (``"max_length"``), rounded up to a multiple of ``pad_to_multiple_of``.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(ex["input_ids"]) for ex in batch)
    if padding == "max_length":
        if max_length is None or max_length < longest:
            raise ValueError(f"padding='max_length' needs max_length >= the longest example ({longest}), "
                             f"got {max_length}")
        width = max_length
    elif padding == "longest":
        width = longest
    else:
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(batch)
    input_ids = np.full((b, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((b, width), dtype=np.int64)
    token_type_ids = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
    for r, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[r, :n] = ex["input_ids"]
        attention_mask[r, :n] = 1
        if "token_type_ids" in ex:
            token_type_ids[r, :n] = ex["token_type_ids"]
        if "labels" in ex:
            labels[r, :n] = ex["labels"]
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
        "labels": torch.from_numpy(labels),
    }
    order = [int(ex.get("sentence_order_label", IGNORE_INDEX)) for ex in batch]
    if any(v >= 0 for v in order):
        out["sentence_order_label"] = torch.tensor(order, dtype=torch.int64)
    return out


class MaskingCollator:
    """``collate_fn`` that masks at batch time (dynamic masking), then pads with ``collate``.

    Examples that already carry ``labels`` (static masking) are only padded. An unmasked example is masked
    with an RNG seeded by its ``mask_seed`` (set by ``PretrainingDataset`` from seed, epoch, document and
    example index: a fresh draw every epoch, yet reproducible and independent of batch composition and
    workers); examples without one draw from this collator's own stream, seeded by ``cfg.seed``.
    """

    def __init__(self, tokenizer: PretrainingTokenizer | SpecialTokens, config: PretrainingConfig | None = None):
        self.special = tokenizer if isinstance(tokenizer, SpecialTokens) else SpecialTokens.from_tokenizer(tokenizer)
        self.config = config or PretrainingConfig()
        self._rng = _seeded("collator", self.config.seed)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        cfg = self.config
        masked = []
        for ex in batch:
            if "labels" not in ex:
                seed = ex.get("mask_seed")
                rng = random.Random(seed) if seed is not None else self._rng
                ex = mask_example(ex, rng, cfg, self.special)
            masked.append(ex)
        return collate(masked, pad_token_id=self.special.pad, padding=cfg.padding, max_length=cfg.max_seq_length,
                       pad_to_multiple_of=cfg.pad_to_multiple_of)


# -------------------------------------------------------------------------------------- tokenized cache


class _CacheWriter:
    """Writes one input file's tokenized documents as ``NNNNN.npz`` shards plus ``manifest.json`` (last).

    Every file is written under a temporary name and moved into place with ``os.replace``, so a reader sees
    whole files only, and a directory without a manifest (an interrupted run) is simply rebuilt.
    """

    def __init__(self, directory: Path, meta: dict[str, Any], shard_docs: int):
        self.dir = directory
        self.meta = meta
        self.shard_docs = shard_docs
        self.docs: list[TokenizedDocument] = []
        self.shards: list[str] = []
        self.documents = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, doc: TokenizedDocument) -> None:
        self.docs.append(doc)
        self.documents += 1
        if len(self.docs) >= self.shard_docs:
            self._flush()

    def _flush(self) -> None:
        if not self.docs:
            return
        sent_lengths = np.concatenate([np.diff(d.offsets) for d in self.docs])
        name = f"{len(self.shards):05d}.npz"
        arrays = {
            "ids": np.concatenate([d.ids for d in self.docs]).astype(np.int32),
            "word_starts": np.concatenate([d.word_starts for d in self.docs]).astype(bool),
            "sentence_offsets": np.concatenate([[0], np.cumsum(sent_lengths)]).astype(np.int64),
            "doc_offsets": np.concatenate([[0], np.cumsum([d.num_sentences for d in self.docs])]).astype(np.int64),
        }
        _atomic_write(self.dir / name, lambda f: np.savez(f, **arrays))
        self.shards.append(name)
        self.docs = []

    def close(self) -> None:
        self._flush()
        manifest = {**self.meta, "documents": self.documents, "shards": self.shards}
        _atomic_write(self.dir / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _atomic_write(path: Path, write: Callable[[Any], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cache_complete(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return all((directory / name).is_file() for name in manifest.get("shards", []))


def _read_cache(directory: Path) -> Iterator[TokenizedDocument]:
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["shards"]:
        with np.load(directory / name) as z:
            ids, starts = z["ids"], z["word_starts"]
            so, do = z["sentence_offsets"], z["doc_offsets"]
        for d in range(len(do) - 1):
            o = so[do[d]: do[d + 1] + 1]
            yield TokenizedDocument(ids[o[0]: o[-1]], starts[o[0]: o[-1]], o - o[0])


# -------------------------------------------------------------------------------------------- dataset


class PretrainingDataset(IterableDataset):
    """Streams packed ALBERT pre-training examples from text files; deterministic given the config.

    Documents are numbered globally across the (sorted) files; rank ``r`` of ``world_size`` takes documents
    ``r, r + world_size, ...``, so ranks are disjoint and together give exactly the single-process examples.
    DataLoader workers of one rank each generate that rank's stream and keep every ``num_workers``-th batch
    of ``loader_batch_size`` examples (set by ``build_pretraining_loader``), so the loader yields batches in
    the single-worker order.

    Tokenized files are cached under ``cache_dir`` (default ``~/.cache/litebert/pretrain``), keyed by the
    tokenizer fingerprint, the corpus settings and each file's path, mtime and size. A file not yet cached
    is tokenized in full (all ranks' documents) while it streams, so the cache is complete; call
    ``prepare_cache()`` on one rank before the others start to tokenize only once. Without the cache a rank
    tokenizes only its own documents.

    Position: ``state_dict()`` is ``{"epoch", "examples_yielded"}`` for this object's iterator (DataLoader
    with ``num_workers=0``; use ``PretrainingLoader.state_dict`` with workers). ``load_state_dict`` makes
    the next iteration regenerate the epoch and skip that many examples, reproducing the exact stream.
    Each example is a dict of numpy arrays (``input_ids``, ``token_type_ids``, ``word_starts``; ``labels``
    when masked statically) plus ``sentence_order_label`` and ``mask_seed``.
    """

    def __init__(
        self,
        paths: PathArg,
        tokenizer: PretrainingTokenizer,
        config: PretrainingConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        encode_batch_size: int = 1024,
        shard_docs: int = 8192,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.paths = paths
        self.files = expand_paths(paths)
        if not self.files:
            raise ValueError(f"no input files found for {paths!r}")
        self.tokenizer = tokenizer
        self.config = config or PretrainingConfig()
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self.rank, self.world_size = rank, world_size
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        self.fingerprint = tokenizer_fingerprint(tokenizer) if use_cache else None
        self.encode_batch_size = encode_batch_size
        self.shard_docs = shard_docs
        self.loader_batch_size: int | None = None
        self.epoch = 0
        self.examples_yielded = 0
        self._skip = 0
        self.stats: Counter[str] = Counter()

    # ---- position
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.examples_yielded, self._skip = int(epoch), 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "examples_yielded": self.examples_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.examples_yielded = self._skip = int(state["examples_yielded"])

    # ---- tokenized documents
    def _cache_entry(self, path: Path) -> tuple[Path, dict[str, Any]]:
        st = path.stat()
        cfg = self.config
        meta = {
            "format": CACHE_FORMAT,
            "splitter": SPLITTER_VERSION,
            "tokenizer": self.fingerprint,
            "text_field": cfg.text_field,
            "min_chars": cfg.min_chars,
            "doc_per_file": cfg.doc_per_file,
            "source": os.path.abspath(path),
            "mtime_ns": st.st_mtime_ns,
            "size": st.st_size,
        }
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / key, meta

    def _tokenize(self, path: Path, first_index: int, owned: Callable[[int], bool] | None,
                  stats: CorpusStats) -> Iterator[TokenizedDocument | None]:
        """Tokenized documents of one file (None for documents ``owned`` rejects), batching sentences."""
        cfg = self.config
        docs = iter_file_documents(path, text_field=cfg.text_field, min_chars=cfg.min_chars,
                                   doc_per_file=cfg.doc_per_file, stats=stats)
        index = first_index
        while True:
            batch, n_sent = [], 0
            for doc in docs:
                mine = owned is None or owned(index)
                batch.append(doc.sentences if mine else None)
                index += 1
                n_sent += len(doc.sentences) if mine else 0
                if n_sent >= self.encode_batch_size:
                    break
            if not batch:
                return
            texts = [s for sents in batch if sents is not None for s in sents]
            encoded: list[tuple[Sequence[int], Sequence[int | None]]] = []
            for k in range(0, len(texts), self.encode_batch_size):  # one huge document (doc_per_file) included
                encoded.extend(self.tokenizer.encode_words(texts[k: k + self.encode_batch_size]))
            pos = 0
            for sents in batch:
                if sents is None:
                    yield None
                    continue
                yield _tokenized_document(encoded[pos: pos + len(sents)])
                pos += len(sents)

    def _iter_file(self, path: Path, first_index: int, stats: CorpusStats,
                   write_cache: bool = True) -> Iterator[TokenizedDocument | None]:
        if not self.use_cache:
            return self._tokenize(path, first_index, lambda i: i % self.world_size == self.rank, stats)
        directory, meta = self._cache_entry(path)
        if _cache_complete(directory):
            return _read_cache(directory)
        if not write_cache:
            return self._tokenize(path, first_index, None, stats)
        return self._tokenize_and_cache(path, first_index, stats, directory, meta)

    def _tokenize_and_cache(self, path: Path, first_index: int, stats: CorpusStats, directory: Path,
                            meta: dict[str, Any]) -> Iterator[TokenizedDocument]:
        writer = _CacheWriter(directory, meta, self.shard_docs)
        for doc in self._tokenize(path, first_index, None, stats):
            assert doc is not None
            writer.add(doc)
            yield doc
        writer.close()

    def iter_tokenized_documents(self, write_cache: bool = True) -> Iterator[tuple[int, TokenizedDocument]]:
        """(global document index, tokenized document) for this rank's documents, in corpus order."""
        stats = CorpusStats()
        index = 0
        for path in self.files:
            for doc in self._iter_file(path, index, stats, write_cache):
                if doc is not None and index % self.world_size == self.rank:
                    yield index, doc
                index += 1
        if index == 0:
            raise ValueError(f"no usable documents in {[str(f) for f in self.files]} (see the warnings above for "
                             "skipped files and lines)")

    def prepare_cache(self) -> None:
        """Tokenize every input file not cached yet (run on one rank, then barrier, in DDP)."""
        if not self.use_cache:
            return
        for path in self.files:
            directory, meta = self._cache_entry(path)
            if not _cache_complete(directory):
                for _ in self._tokenize_and_cache(path, 0, CorpusStats(), directory, meta):
                    pass

    # ---- examples
    def _document_examples(self, index: int, doc: TokenizedDocument) -> list[dict[str, Any]]:
        cfg = self.config
        epoch = self.epoch if cfg.dynamic_masking else 0
        segments, starts = doc.segments()
        pairs = create_sop_examples(segments, _seeded("pairs", cfg.seed, epoch, index), cfg, starts)
        if cfg.sop and not pairs:
            self.stats["single_sentence_documents"] += 1
        examples = []
        for j, pair in enumerate(pairs):
            ex = pack_pair(pair, self.special)
            ex["mask_seed"] = _seed_int("mask", cfg.seed, epoch, index, j)
            examples.append(ex)
        return examples

    def _iter_unmasked(self, write_cache: bool = True) -> Iterator[dict[str, Any]]:
        for index, doc in self.iter_tokenized_documents(write_cache):
            self.stats["documents"] += 1
            yield from self._document_examples(index, doc)

    def count_examples(self, limit: int | None = None) -> int:
        """Examples this rank yields per epoch (stops counting at ``limit``); writes no cache."""
        self.stats = Counter()
        stream = self._iter_unmasked(write_cache=False)
        return sum(1 for _ in itertools.islice(stream, limit))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.config
        skip, self._skip = self._skip, 0
        self.examples_yielded = skip
        self.stats = Counter()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        block = self.loader_batch_size or 1
        stream = _shuffled(self._iter_unmasked(), cfg.shuffle_buffer, _seeded("shuffle", cfg.seed, self.epoch,
                                                                              self.rank))
        total = yielded = 0
        for i, ex in enumerate(stream):
            total = i + 1
            if i < skip or ((i - skip) // block) % workers != worker:
                continue
            if not cfg.dynamic_masking:
                ex = mask_example(ex, random.Random(ex["mask_seed"]), cfg, self.special)
            self.examples_yielded = i + 1
            yielded += 1
            yield ex
        if worker == 0:
            logger.info("epoch %d, rank %d: %d documents -> %d examples (%d yielded here); %d documents with "
                        "fewer than two sentences made no SOP pair", self.epoch, self.rank, self.stats["documents"],
                        total, yielded, self.stats["single_sentence_documents"])


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: a reservoir of ``size`` items, each output replaced by the next input."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def count_examples(dataset: PretrainingDataset, limit: int | None = None) -> int:
    """Examples ``dataset`` yields per epoch on its rank, counting at most ``limit``."""
    return dataset.count_examples(limit)


# --------------------------------------------------------------------------------------------- loader


class PretrainingLoader(DataLoader):
    """A DataLoader over a ``PretrainingDataset`` that knows its position, with or without workers.

    ``state_dict()`` counts the examples of the batches handed out this epoch; ``load_state_dict`` resumes
    right after them. Do not use ``persistent_workers``: each epoch must restart the workers' streams.
    """

    dataset: PretrainingDataset

    def __init__(self, dataset: PretrainingDataset, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self._position = dataset.state_dict()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        ds = self.dataset
        count = ds._skip
        self._position = {"epoch": ds.epoch, "examples_yielded": count}
        batches = super().__iter__()
        if self.num_workers > 0:
            ds._skip = 0  # the workers took their copies of the resume position when they started
        for batch in batches:
            count += len(batch["input_ids"])
            self._position = {"epoch": ds.epoch, "examples_yielded": count}
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._position = self.dataset.state_dict()

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.load_state_dict(state)
        self._position = {"epoch": int(state["epoch"]), "examples_yielded": int(state["examples_yielded"])}


def build_pretraining_loader(
    paths: PathArg,
    tokenizer: PretrainingTokenizer,
    config: PretrainingConfig | None = None,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    pin_memory: bool = False,
) -> PretrainingLoader:
    """A ``PretrainingLoader`` of collated batches (see ``collate``) for this rank.

    Raises ``ValueError`` saying how many examples were produced, from which files, when the rank's share of
    the corpus does not fill one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = config or PretrainingConfig()
    ds = PretrainingDataset(paths, tokenizer, config, rank=rank, world_size=world_size, cache_dir=cache_dir,
                            use_cache=use_cache)
    ds.loader_batch_size = batch_size
    n = ds.count_examples(limit=batch_size)
    if n < batch_size:
        files = ", ".join(str(f) for f in ds.files[:10]) + (" ..." if len(ds.files) > 10 else "")
        hint = (f"; {ds.stats['single_sentence_documents']} document(s) had fewer than two sentences, which "
                "makes no SOP pair (sop=False uses them)" if ds.stats["single_sentence_documents"] else "")
        raise ValueError(f"the corpus produced only {n} pre-training example(s) on rank {rank} of {world_size}, "
                         f"fewer than one batch of {batch_size}, from {len(ds.files)} file(s): {files}{hint}. "
                         "Add text or lower batch_size.")
    # A private generator: DataLoader draws a worker base seed from it at every iter(); from the global RNG
    # that draw would shift dropout etc. differently in a resumed run than in an uninterrupted one.
    generator = torch.Generator().manual_seed(config.seed)
    return PretrainingLoader(ds, batch_size=batch_size, collate_fn=MaskingCollator(ds.special, config),
                             num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory, generator=generator)
