"""Tokenizers for litebert: train, load and call BERT-style (WordPiece) and ALBERT-style (Unigram) vocabularies.

Everything here is a thin layer over the Rust `tokenizers` library; the only text handling we do ourselves is reading
training files defensively and padding batches. Three on-disk formats load into the same `LiteTokenizer`:

- ``tokenizer.json`` (what we save, and what every `transformers` fast tokenizer ships),
- ``vocab.txt`` (original BERT / DistilBERT checkpoints), rebuilt as the BERT WordPiece pipeline,
- ``spiece.model`` (original ALBERT checkpoints), converted to a `tokenizers` Unigram model.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

__all__ = ["LiteTokenizer", "load_tokenizer", "train_tokenizer", "train_tokenizer_main"]

logger = logging.getLogger(__name__)

TokenizerKind = Literal["unigram", "wordpiece"]
PathLike = str | Path

# Special tokens in the order that fixes their ids. BERT's trainer-made vocabularies start with [PAD] so that
# padding is id 0; ALBERT's spiece.model has exactly this order (<pad>=0, <unk>=1, [CLS]=2, [SEP]=3, [MASK]=4).
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
UNIGRAM_SPECIALS = ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")
# Spellings recognised when wrapping a tokenizer we did not build, first match wins.
_SPECIAL_CANDIDATES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}
_SPIECE_UNDERLINE = "▁"
_BINARY_SNIFF_BYTES = 8192
_MAX_LINE_WARNINGS_PER_FILE = 10  # a mis-encoded file can have millions of bad lines; the log should stay readable
# One for all tokenizers: a lock per object would not survive pickling (DataLoader workers), and encoding is fast.
_TRUNCATION_LOCK = threading.Lock()
_TRAIN_BATCH_LINES = 1000  # train_from_iterator is much faster fed lists than single strings


# ----------------------------------------------------------------------------------------------------------------------
# The wrapper


class LiteTokenizer:
    """A `tokenizers.Tokenizer` with the BERT-family conveniences the rest of litebert needs.

    The wrapped tokenizer is a private copy with truncation and padding switched off: a ``tokenizer.json`` saved by
    `transformers` often carries a fixed padding length (MiniLM pads everything to 128), and our callers pass their
    lengths per call instead, as `transformers` does.
    """

    def __init__(self, tokenizer: Tokenizer, do_lower_case: bool | None = None) -> None:
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        if do_lower_case is None:
            # Ask the normaliser rather than trust a side config: it is what actually runs on the text.
            normalizer = self._tok.normalizer
            do_lower_case = normalizer is not None and normalizer.normalize_str("A") == "a"
        self.do_lower_case = do_lower_case
        self.special_tokens = self._find_special_tokens()
        self._special_ids = self._collect_special_ids()

    def _find_special_tokens(self) -> dict[str, str]:
        added = {tok.content for tok in self._tok.get_added_tokens_decoder().values()}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        found: dict[str, str] = {}
        missing: list[str] = []
        for role, candidates in _SPECIAL_CANDIDATES.items():
            # Prefer a registered added token: a plain vocabulary entry that merely looks like "<pad>" is weaker
            # evidence.
            match = next((c for c in candidates if c in added), None)
            match = match or next((c for c in candidates if c in vocab), None)
            if match is None:
                missing.append(f"{role} ({' or '.join(candidates)})")
            else:
                found[role] = match
        if missing:
            raise ValueError(f"tokenizer lacks special tokens needed by BERT-family models: {', '.join(missing)}")
        return found

    def _collect_special_ids(self) -> frozenset[int]:
        ids = {self._id(token) for token in self.special_tokens.values()}
        ids |= {i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special}
        return frozenset(ids)

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    # -- properties --------------------------------------------------------------------------------------------------

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (truncation and padding off)."""
        return self._tok

    @property
    def fingerprint(self) -> str:
        """A hash of the full tokenizer definition: keys caches of tokenized data."""
        import hashlib

        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    @property
    def kind(self) -> str:
        """Model type in lower case: ``"wordpiece"``, ``"unigram"`` (or ``"bpe"`` for a foreign tokenizer.json)."""
        return type(self._tok.model).__name__.lower()

    @property
    def vocab_size(self) -> int:
        # Includes added tokens: the embedding matrix must have a row for every id the tokenizer can emit.
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        return self._id(self.special_tokens["pad"])

    @property
    def unk_token_id(self) -> int:
        return self._id(self.special_tokens["unk"])

    @property
    def cls_token_id(self) -> int:
        return self._id(self.special_tokens["cls"])

    @property
    def sep_token_id(self) -> int:
        return self._id(self.special_tokens["sep"])

    @property
    def mask_token_id(self) -> int:
        return self._id(self.special_tokens["mask"])

    @property
    def special_ids(self) -> set[int]:
        """Ids never to mask, predict or count as words: the five roles plus any other special added token."""
        return set(self._special_ids)

    def __repr__(self) -> str:
        return f"LiteTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case})"

    # -- single texts ------------------------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        pair: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: bool = True,
    ) -> list[int]:
        """Token ids of ``text`` (and ``pair``); ``max_length`` counts the special tokens, as in `transformers`."""
        return self._encode_batch([(text, pair) if pair is not None else text], add_special_tokens,
                                  max_length if truncation else None)[0].ids

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor)."""
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Unknown tokens map to the unk id, as in `transformers`."""
        if isinstance(tokens, str):
            token_id = self._tok.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """One id gives one token string; a list or tensor of ids (a 0-d tensor counts as one id) gives a list."""
        if not isinstance(ids, int):
            ids = _as_int_list(ids)  # a 0-d tensor comes back as a plain int
        if isinstance(ids, int):
            token = self._tok.id_to_token(ids)
            if token is None:
                raise IndexError(f"token id {ids} out of range for vocabulary of {self.vocab_size}")
            return token
        return [self.convert_ids_to_tokens(i) for i in ids]  # type: ignore[misc]

    # -- batches for the pre-training pipeline -----------------------------------------------------------------------

    def encode_batch_plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids without special tokens, parallel in Rust; offsets are not computed, which is what makes it fast."""
        return [enc.ids for enc in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_words(self, texts: Sequence[str]) -> list[tuple[list[int], list[int | None]]]:
        """Per text: ids without special tokens and the index of the pre-tokenised word each id belongs to.

        Whole-word masking masks every id sharing a word index. The word index comes from the pre-tokeniser, so for
        WordPiece punctuation is its own word, and for Unigram a word is a whitespace-separated chunk.
        """
        return [(enc.ids, enc.word_ids) for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    # -- the transformers-like call ----------------------------------------------------------------------------------

    def __call__(
        self,
        texts: str | Sequence[str],
        text_pairs: str | Sequence[str] | None = None,
        padding: bool | Literal["longest", "max_length", "do_not_pad"] = True,
        truncation: bool | Literal["longest_first", "only_first", "only_second"] = True,
        max_length: int | None = 512,
        return_tensors: Literal["pt"] | None = "pt",
        return_offsets_mapping: bool = False,
        stride: int = 0,
        return_overflowing_tokens: bool = False,
        return_word_ids: bool = False,
    ) -> dict[str, Any]:
        """Encode a text or a batch the way a `transformers` fast tokenizer does.

        Returns ``input_ids``, ``attention_mask`` and ``token_type_ids``, each (B, T), plus ``offset_mapping``
        (B, T, 2) in characters of the input text (special and pad tokens get (0, 0)), and
        ``overflow_to_sample_mapping`` (B,) and ``word_ids`` (B, T: the pre-tokenised word of each token, None for
        special and pad tokens) when asked. With ``return_overflowing_tokens`` a text longer than
        ``max_length`` becomes several rows, consecutive rows sharing ``stride`` tokens; B then counts rows, not texts.
        ``padding=True`` pads to the longest row, ``"max_length"`` to ``max_length``. A single string with
        ``return_tensors=None`` gives unbatched lists.
        """
        single = isinstance(texts, str)
        batch_texts = [texts] if single else list(texts)
        if text_pairs is not None:
            batch_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
            if len(batch_pairs) != len(batch_texts):
                raise ValueError(f"got {len(batch_texts)} texts but {len(batch_pairs)} text_pairs")
            inputs: list[Any] = list(zip(batch_texts, batch_pairs))
        else:
            inputs = batch_texts
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

        strategy = "longest_first" if truncation is True else truncation
        encodings = self._encode_batch(inputs, True, max_length if strategy else None, strategy or "longest_first",
                                       stride)

        rows: list[Encoding] = []
        sample_of_row: list[int] = []
        for sample, enc in enumerate(encodings):
            windows = [enc, *enc.overflowing] if return_overflowing_tokens else [enc]
            rows.extend(windows)
            sample_of_row.extend([sample] * len(windows))

        if padding in (True, "longest"):
            target = max((len(r.ids) for r in rows), default=0)
        elif padding == "max_length":
            target = max_length
        else:
            target = 0
        pad_id = self.pad_token_id
        out: dict[str, Any] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        if return_offsets_mapping:
            out["offset_mapping"] = []
        if return_word_ids:
            out["word_ids"] = []
        for row in rows:
            n_pad = max(0, target - len(row.ids))  # type: ignore[operator]
            out["input_ids"].append(row.ids + [pad_id] * n_pad)
            out["attention_mask"].append(row.attention_mask + [0] * n_pad)
            out["token_type_ids"].append(row.type_ids + [0] * n_pad)
            if return_offsets_mapping:
                out["offset_mapping"].append(list(row.offsets) + [(0, 0)] * n_pad)
            if return_word_ids:
                out["word_ids"].append(list(row.word_ids) + [None] * n_pad)
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = sample_of_row

        if return_tensors == "pt":
            if return_word_ids:
                raise ValueError("word_ids hold None for special tokens: use return_tensors=None with them")
            return _to_tensors(out)
        if single and not return_overflowing_tokens:
            # Same rule as transformers: one string in, one unbatched sequence out (overflow keeps the batch axis).
            return {key: value[0] for key, value in out.items()}
        return out

    def _encode_batch(
        self,
        inputs: list[Any],
        add_special_tokens: bool,
        max_length: int | None,
        strategy: str = "longest_first",
        stride: int = 0,
    ) -> list[Encoding]:
        # Truncation is state on the Rust tokenizer, so it is set for this call and cleared again; our copy is private,
        # and the lock keeps threads that share this object (the server's handlers) from seeing each other's setting.
        with _TRUNCATION_LOCK:
            if max_length is not None:
                self._tok.enable_truncation(max_length, stride=stride, strategy=strategy)
            try:
                return self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
            finally:
                self._tok.no_truncation()

    # -- persistence -------------------------------------------------------------------------------------------------

    def save(self, out_dir: PathLike) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and, for WordPiece, ``vocab.txt``; returns ``out_dir``.

        The directory loads with `load_tokenizer` and with `transformers.AutoTokenizer.from_pretrained`.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        if self.kind == "wordpiece":
            # vocab.txt lets tools that only know original BERT checkpoints read the vocabulary; line number = id.
            by_id = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            (out / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in by_id), encoding="utf-8")
        config = {
            # Not AlbertTokenizer: transformers 5 rebuilds ALBERT's normaliser from flags instead of reading
            # tokenizer.json, which would drop our NFKC. The generic class loads tokenizer.json verbatim.
            "tokenizer_class": "BertTokenizer" if self.kind == "wordpiece" else "PreTrainedTokenizerFast",
            "do_lower_case": self.do_lower_case,
            **{f"{role}_token": token for role, token in self.special_tokens.items()},
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return out


def _as_int_list(ids: Any) -> Any:
    # Model outputs arrive as tensors; the Rust side accepts only Python ints.
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _to_tensors(batch: dict[str, Any]) -> dict[str, Any]:
    import torch  # imported here so that training a tokenizer from the CLI does not pay for importing torch

    lengths = {len(row) for row in batch["input_ids"]}
    if len(lengths) > 1:
        raise ValueError("sequences have different lengths; pass padding=True or 'max_length' to get tensors")
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Building the two pipelines


def _bert_template(cls: str, sep: str, cls_id: int, sep_id: int) -> TemplateProcessing:
    # BERT and ALBERT share the layout: the second segment and its closing [SEP] get token type 1.
    return TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )


def _finish(tok: Tokenizer, specials: Sequence[str], source: str) -> None:
    """Register the specials (pad, unk, cls, sep, mask order) as never-split added tokens; attach the template."""
    # Only tokens the vocabulary has: adding a missing one would silently grow the vocabulary past the checkpoint's
    # embedding matrix. LiteTokenizer reports whichever role is then missing.
    present = [s for s in specials if tok.token_to_id(s) is not None]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in present])
    cls, sep = specials[2], specials[3]
    cls_id, sep_id = tok.token_to_id(cls), tok.token_to_id(sep)
    if cls_id is None or sep_id is None:
        raise ValueError(f"{source} has no {cls} / {sep} tokens; BERT-family inputs need both")
    tok.post_processor = _bert_template(cls, sep, cls_id, sep_id)


def _bert_normalizer(lowercase: bool, config: dict[str, Any] | None = None) -> normalizers.Normalizer:
    config = config or {}
    # strip_accents=None means "follow lowercase", which is what BERT's uncased checkpoints were trained with.
    return normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=lowercase,
    )


def _new_wordpiece(lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = _bert_normalizer(lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _new_unigram(lowercase: bool) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    # NFKC is what SentencePiece's default normalisation rule (nmt_nfkc) amounts to for ordinary text.
    steps: list[normalizers.Normalizer] = [normalizers.NFKC()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    # SentencePiece's remove_extra_whitespaces: runs of whitespace would otherwise become runs of "▁" tokens.
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme="always")
    return tok


# ----------------------------------------------------------------------------------------------------------------------
# Training


def _sniff(path: Path) -> str | None:
    """Why ``path`` cannot be used for training, or None if it has at least one non-blank UTF-8 line."""
    try:
        with path.open("rb") as f:
            if b"\x00" in f.read(_BINARY_SNIFF_BYTES):
                return "binary file (NUL bytes in the first 8 KiB)"
            f.seek(0)
            saw_bad_line = False
            for raw in f:
                try:
                    if raw.decode("utf-8").strip():
                        return None
                except UnicodeDecodeError:
                    saw_bad_line = True
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return "no valid UTF-8 text" if saw_bad_line else "empty"


def _usable_files(files: Sequence[PathLike]) -> list[Path]:
    usable: list[Path] = []
    skipped: list[str] = []
    for name in files:
        path = Path(name)
        reason = _sniff(path)
        if reason is None:
            usable.append(path)
        else:
            logger.warning("skipping %s: %s", path, reason)
            skipped.append(f"{path} ({reason})")
    if not usable:
        listed = "; ".join(skipped) if skipped else "no files given"
        raise ValueError(f"no usable training text in: {listed}")
    return usable


def _iter_lines(paths: Sequence[Path]) -> Iterator[list[str]]:
    """Non-blank lines of every file in batches; lines that are not valid UTF-8 are logged as file:line and dropped.

    Decoding per line (in binary mode) rather than per file means one corrupt line costs one line, not the file.
    """
    batch: list[str] = []
    for path in paths:
        bad = 0
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad += 1
                    if bad <= _MAX_LINE_WARNINGS_PER_FILE:
                        logger.warning("skipping %s:%d: invalid UTF-8 (%s)", path, lineno, err.reason)
                    continue
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a BOM would otherwise become part of the first token
                line = line.strip()
                if line:
                    batch.append(line)
                    if len(batch) >= _TRAIN_BATCH_LINES:
                        yield batch
                        batch = []
        if bad > _MAX_LINE_WARNINGS_PER_FILE:
            logger.warning("%s: %d lines with invalid UTF-8 skipped in total", path, bad)
    if batch:
        yield batch


def train_tokenizer(
    files: Sequence[PathLike],
    kind: TokenizerKind = "unigram",
    vocab_size: int = 30000,
    lowercase: bool = True,
    min_frequency: int = 2,
    out_dir: PathLike | None = None,
) -> LiteTokenizer:
    """Train a WordPiece (BERT) or Unigram (ALBERT / SentencePiece) tokenizer on plain-text files, one text per line.

    Specials come first in the vocabulary: WordPiece ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, Unigram
    ``<pad>=0 <unk>=1 [CLS]=2 [SEP]=3 [MASK]=4`` (ALBERT's order). Empty, binary and unreadable files are skipped
    with a warning; ``ValueError`` if nothing usable is left. ``min_frequency`` only applies to WordPiece: the
    Unigram trainer prunes by likelihood instead. ``vocab_size`` is an upper bound; a small corpus gives fewer tokens.
    """
    if kind == "wordpiece":
        tok, specials = _new_wordpiece(lowercase), WORDPIECE_SPECIALS
        trainer: trainers.Trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            continuing_subword_prefix="##",
            show_progress=False,
        )
    elif kind == "unigram":
        tok, specials = _new_unigram(lowercase), UNIGRAM_SPECIALS
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=list(specials),
            unk_token="<unk>",
            show_progress=False,
        )
    else:
        raise ValueError(f"kind must be 'unigram' or 'wordpiece', got {kind!r}")

    paths = _usable_files(files)
    tok.train_from_iterator(_iter_lines(paths), trainer=trainer)
    _finish(tok, specials, "the trained vocabulary")
    lite = LiteTokenizer(tok, do_lower_case=lowercase)
    if out_dir is not None:
        lite.save(out_dir)
    return lite


# ----------------------------------------------------------------------------------------------------------------------
# Loading


_LOOKUP_ORDER = ("tokenizer.json", "vocab.txt", "spiece.model")


def _read_config(directory: Path) -> dict[str, Any]:
    from .config import ConfigError, read_json_file

    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = read_json_file(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, got {type(config).__name__}")
    return config


def _special(config: dict[str, Any], role: str, default: str) -> str:
    # transformers writes special tokens either as strings or as serialised AddedToken dicts.
    value = config.get(f"{role}_token", default)
    return value["content"] if isinstance(value, dict) else value


def _load_vocab_txt(path: Path, config: dict[str, Any]) -> LiteTokenizer:
    """The BertWordPieceTokenizer pipeline around an original BERT ``vocab.txt`` (one token per line, line = id)."""
    lowercase = config.get("do_lower_case", True)
    unk = _special(config, "unk", "[UNK]")
    tok = Tokenizer(models.WordPiece.from_file(str(path), unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = _bert_normalizer(lowercase, config)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    specials = [_special(config, role, f"[{role.upper()}]") for role in ("pad", "unk", "cls", "sep", "mask")]
    _finish(tok, specials, str(path))
    return LiteTokenizer(tok, do_lower_case=lowercase)


def _load_spiece(path: Path, config: dict[str, Any]) -> LiteTokenizer:
    """Convert a SentencePiece Unigram model the way `transformers` converts ALBERT's ``spiece.model``."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))

    lowercase = config.get("do_lower_case", True)
    # ALBERT maps LaTeX-style quotes to '"' and, unless keep_accents, strips accents (AlbertTokenizer's defaults).
    steps: list[normalizers.Normalizer] = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"')]
    if not config.get("keep_accents", False):
        steps += [normalizers.NFKD(), normalizers.StripAccents()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    charsmap, add_dummy_prefix, remove_extra_whitespaces = _spiece_normalizer_spec(sp)
    if charsmap:
        # The model's own compiled normalisation table (NFKC plus SentencePiece's rules), applied exactly.
        steps.append(normalizers.Precompiled(charsmap))
    if remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    prepend = "always" if add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme=prepend)
    tok.decoder = decoders.Metaspace(replacement=_SPIECE_UNDERLINE, prepend_scheme=prepend)

    defaults = {"pad": sp.id_to_piece(sp.pad_id()) if sp.pad_id() >= 0 else "<pad>",
                "unk": sp.id_to_piece(sp.unk_id()), "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
    specials = [_special(config, role, default) for role, default in defaults.items()]
    _finish(tok, specials, str(path))
    return LiteTokenizer(tok, do_lower_case=lowercase)


def _spiece_normalizer_spec(sp: Any) -> tuple[bytes, bool, bool]:
    """(precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces) from the model's protobuf."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    spec = proto.normalizer_spec
    return spec.precompiled_charsmap, spec.add_dummy_prefix, spec.remove_extra_whitespaces


def load_tokenizer(path: PathLike) -> LiteTokenizer:
    """Load a tokenizer from a directory or a file.

    A directory is searched for ``tokenizer.json``, then ``vocab.txt``, then ``spiece.model``; a
    ``tokenizer_config.json`` next to the file supplies ``do_lower_case`` (default True) and special-token names
    for the latter two. ``FileNotFoundError`` if the path is missing or holds none of these files.
    """
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in _LOOKUP_ORDER if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no tokenizer in {path}: looked for {', '.join(_LOOKUP_ORDER)}")
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"tokenizer path {path} does not exist (expected a directory or one of "
                                f"{', '.join(_LOOKUP_ORDER)})")

    config = _read_config(path.parent)
    if path.suffix == ".json":
        from .config import ConfigError, read_json_file

        read_json_file(path, "tokenizer JSON")  # names the file and line for a torn or hand-edited file
        try:
            return LiteTokenizer(Tokenizer.from_file(str(path)))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception for every malformed field
            raise ConfigError(f"{path}: not a tokenizers tokenizer.json ({str(e)[:200]})") from None
    if path.suffix == ".txt":
        return _load_vocab_txt(path, config)
    if path.suffix == ".model":
        return _load_spiece(path, config)
    raise ValueError(f"cannot tell the format of {path}: expected a .json, .txt (WordPiece vocab) or .model file")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    """Train a tokenizer on plain-text files and save it to a directory (`litebert train-tokenizer`)."""
    parser = argparse.ArgumentParser(prog="litebert train-tokenizer", description=train_tokenizer_main.__doc__)
    parser.add_argument("--files", nargs="+", required=True,
                        help="plain-text training files, one text per line; globs (quoted) are expanded, ** included")
    parser.add_argument("--kind", choices=("unigram", "wordpiece"), default="unigram",
                        help="unigram: ALBERT/SentencePiece style; wordpiece: BERT style (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=30000, help="upper bound on vocabulary size")
    parser.add_argument("--min-frequency", type=int, default=2, help="WordPiece only: minimum pair count to merge")
    parser.add_argument("--no-lowercase", action="store_true", help="keep case (default: lowercase)")
    parser.add_argument("--out", required=True, help="output directory for tokenizer.json and friends")
    args = parser.parse_args(argv)

    files: list[str] = []
    for pattern in args.files:
        # A pattern that matches nothing is kept verbatim so that it is reported as unreadable, not silently dropped.
        files.extend(sorted(glob.glob(pattern, recursive=True)) or [pattern])
    try:
        tok = train_tokenizer(files, kind=args.kind, vocab_size=args.vocab_size, lowercase=not args.no_lowercase,
                              min_frequency=args.min_frequency, out_dir=args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"trained {tok.kind} tokenizer: vocab_size={tok.vocab_size} files={len(files)} -> {args.out}")
    return 0
