"""Fine-tuning data: readers for task files and the features a model trains on.

Readers turn a file into examples and refuse bad input loudly: every error names the file and the line (or, for
SQuAD JSON, the question id / field) so a broken row in a 100k-line file is found in one look.

- ``read_text_classification``: CSV / TSV / JSON Lines, one text (or text pair) and a label per row;
- ``read_conll``: one token per line, BIO tags, blank lines between sentences (CoNLL-2003, WNUT);
- ``read_squad``: SQuAD v1.1 / v2.0 JSON;
- ``read_multiple_choice``: JSON Lines with a question, choices and the index (or letter) of the right one (RACE).

Feature builders tokenize examples into a list of per-example dicts, which is a map-style dataset as it stands:
``DataLoader(features, batch_size=32, collate_fn=collate_features)`` pads each batch to its longest row.
Keys that are not model inputs (``example_id``, ``offset_mapping``, ``word_ids``) stay in the features for
post-processing (`postprocess_qa`, `align_predictions`) and are left out of batches.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "DataSplits",
    "MCExample",
    "QAExample",
    "TextExample",
    "TokenExample",
    "align_predictions",
    "build_label_map",
    "check_labels",
    "collate_features",
    "postprocess_qa",
    "prepare_classification_features",
    "prepare_multiple_choice_features",
    "prepare_qa_features",
    "prepare_token_classification_features",
    "read_conll",
    "read_multiple_choice",
    "read_squad",
    "read_text_classification",
    "split_train_test",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # what F.cross_entropy skips: special tokens and non-first word pieces
PathLike = str | Path
Task = Literal["classification", "regression"]

_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_DOCSTART = "-DOCSTART-"


# ---------------------------------------------------------------------------------------------------------- examples


@dataclass
class TextExample:
    """One row of a classification / regression file; ``label`` is a str (classification), a float (regression)
    or None (unlabelled). ``source``:``line`` is where the row starts."""

    text: str
    text_pair: str | None
    label: str | float | None
    source: str
    line: int


@dataclass
class TokenExample:
    """One sentence of a CoNLL file: words and their BIO tags; ``line`` is the line of its first word."""

    tokens: list[str]
    tags: list[str]
    source: str
    line: int


@dataclass
class QAExample:
    """One SQuAD question. ``answers`` are ``{"text", "answer_start"}`` with ``answer_start`` in characters of
    ``context``; empty for an impossible (v2.0) question or a file without answers."""

    id: str
    question: str
    context: str
    answers: list[dict[str, Any]]
    is_impossible: bool
    source: str
    title: str = ""


@dataclass
class MCExample:
    """One multiple-choice question; ``label`` is the 0-based index of the right choice (None if unlabelled)."""

    question: str
    choices: list[str]
    label: int | None
    source: str
    line: int
    context: str = ""
    id: str = ""


def _at(source: str, line: int) -> str:
    return f"{source}:{line}"


def _not_utf8(path: PathLike, lineno: int, err: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path}:{lineno}: not UTF-8 text (byte {err.object[err.start]:#04x} at column "
                      f"{err.start + 1}); save the file as UTF-8")


def text_lines(path: PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file (a leading BOM dropped, line ends kept), read lazily. A line that is not UTF-8
    is a ``ValueError`` naming the file and line, where ``open(encoding="utf-8")`` would name neither."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, lineno, err) from None
            yield line.removeprefix("\ufeff") if lineno == 1 else line


def read_text_file(path: PathLike) -> str:
    """A whole UTF-8 file (BOM dropped); ``ValueError`` naming file and line when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        lineno = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte "
                         f"{data[err.start]:#04x} at column {err.start - line_start + 1}); save the file as UTF-8"
                         ) from None


# ---------------------------------------------------------------------------------- classification / regression


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[int, list[str] | dict[str, Any]]]:
    """(line where the record starts, header list first, then row lists) of a CSV/TSV file."""
    # GLUE-style TSV files contain unbalanced quotes inside texts; only CSV uses quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text_lines(path), delimiter=delimiter, quoting=quoting)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValueError(f"{_at(str(path), reader.line_num)}: malformed row ({err})") from None
        yield start, row
        start = reader.line_num + 1  # a quoted field may span lines: the next record starts after this one


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, raw in enumerate(text_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{_at(str(path), lineno)}: invalid JSON ({err.msg}); {path.suffix} files are read "
                             f"as JSON Lines, one object per line") from None
        if not isinstance(obj, dict) or not obj:
            raise ValueError(f"{_at(str(path), lineno)}: expected a non-empty JSON object, got {raw.strip()[:80]}")
        yield lineno, obj


def _iter_records(path: Path, delimiter: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, {column: value}) for every record; ValueError on a row whose field count differs from the header."""
    if delimiter is None:
        suffix = path.suffix.lower()
        if suffix in _JSON_SUFFIXES:
            yield from _iter_jsonl(path)
            return
        if suffix not in _DELIMITERS:
            raise ValueError(f"{path}: cannot tell the format from the suffix {suffix!r}; pass delimiter= "
                             f"(',' or '\\t') or use .csv, .tsv, .jsonl or .json")
        delimiter = _DELIMITERS[suffix]
    rows = _iter_delimited(path, delimiter)
    header = next((row for _, row in rows), None)
    if header is None:
        raise ValueError(f"{path}: empty file (no header row)")
    for lineno, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != len(header):
            raise ValueError(f"{_at(str(path), lineno)}: {len(row)} fields but the header has {len(header)} "
                             f"({', '.join(header)})")
        yield lineno, dict(zip(header, row))


def _require(record: Mapping[str, Any], column: str, path: Path, lineno: int) -> Any:
    if column not in record:
        raise ValueError(f"{_at(str(path), lineno)}: no column {column!r}; available columns: "
                         f"{', '.join(map(str, record))}")
    return record[column]


def read_text_classification(
    path: PathLike,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    task: Task = "classification",
    delimiter: str | None = None,
    filter: Mapping[str, Any] | None = None,
) -> list[TextExample]:
    """Read a CSV (``.csv``), TSV (``.tsv``, no quoting, as GLUE ships them) or JSON Lines (``.jsonl``/``.json``)
    file with a header (CSV/TSV) or keys (JSONL) naming the columns.

    ``label_column=None`` reads an unlabelled file. ``filter`` keeps only rows whose column equals the value (or is
    one of the values, when a list/set/tuple is given), e.g. ``{"source": "rotten_tomatoes"}``; values compare as
    strings. Regression labels are floats; classification labels stay strings (see `build_label_map`).
    ``ValueError`` naming file:line for a missing column, an empty text or label, or a label that is not a number in
    a regression file.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    path = Path(path)
    source = str(path)
    wanted = {c: _allowed(v) for c, v in (filter or {}).items()}
    examples: list[TextExample] = []
    for lineno, record in _iter_records(path, delimiter):
        if any(str(_require(record, c, path, lineno)) not in allowed for c, allowed in wanted.items()):
            continue
        text = _text_field(record, text_column, path, lineno)
        pair = _text_field(record, text_pair_column, path, lineno) if text_pair_column else None
        label: str | float | None = None
        if label_column is not None:
            raw = _require(record, label_column, path, lineno)
            if raw is None or not str(raw).strip():
                raise ValueError(f"{_at(source, lineno)}: empty label in column {label_column!r}")
            if task == "regression":
                try:
                    label = float(raw)
                except (TypeError, ValueError):
                    raise ValueError(f"{_at(source, lineno)}: regression label {raw!r} in column {label_column!r} "
                                     f"is not a number") from None
                if not np.isfinite(label):
                    raise ValueError(f"{_at(source, lineno)}: regression label {raw!r} is not finite")
            else:
                label = str(raw).strip()
        examples.append(TextExample(text, pair, label, source, lineno))
    if not examples:
        raise ValueError(f"{path}: no examples" + (f" matching filter {dict(filter or {})}" if filter else ""))
    return examples


def _allowed(value: Any) -> set[str]:
    if isinstance(value, (list, tuple, set, frozenset)):
        return {str(v) for v in value}
    return {str(value)}


def _text_field(record: Mapping[str, Any], column: str, path: Path, lineno: int) -> str:
    value = _require(record, column, path, lineno)
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"{_at(str(path), lineno)}: empty text in column {column!r} (got {value!r})")


# ------------------------------------------------------------------------------------------------------- labels


def _labels_of(example: Any) -> list[Any]:
    if isinstance(example, TokenExample):
        return example.tags
    return [] if example.label is None else [example.label]


def _number(label: str) -> float | None:
    try:
        return float(label)
    except ValueError:
        return None


def build_label_map(train_examples: Sequence[TextExample | TokenExample]) -> dict[str, int]:
    """label -> id over the training labels (tags, for token examples): sorted, so the same labels always get the
    same ids; labels that all look like numbers sort numerically ("2" before "10")."""
    labels = {str(lab) for ex in train_examples for lab in _labels_of(ex)}
    if not labels:
        raise ValueError("no labels in the training examples")
    numbers = {lab: _number(lab) for lab in labels}
    if all(v is not None for v in numbers.values()):
        ordered = sorted(labels, key=lambda lab: (numbers[lab], lab))
    else:
        ordered = sorted(labels)
    return {lab: i for i, lab in enumerate(ordered)}


def check_labels(examples: Sequence[TextExample | TokenExample], label2id: Mapping[str, int],
                 path: PathLike | None = None) -> None:
    """``ValueError`` naming file:line and the label for the first example whose label (or tag) is not in
    ``label2id`` — e.g. a validation label never seen in training, or one outside a checkpoint's ``id2label``.
    ``path`` overrides the file named in the message (examples carry their own)."""
    for ex in examples:
        for lab in _labels_of(ex):
            if str(lab) not in label2id:
                where = _at(str(path) if path is not None else ex.source, ex.line)
                raise ValueError(f"{where}: unknown label {str(lab)!r}; known labels: {', '.join(label2id)}")


# ---------------------------------------------------------------------------------------------------------- CoNLL


def _valid_tag(tag: str) -> bool:
    return tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-"))


def read_conll(path: PathLike, token_col: int = 0, tag_col: int = -1, validate_tags: bool = True) -> list[TokenExample]:
    """Read a CoNLL-style file: one token per line with tab- (or, without tabs, whitespace-) separated columns,
    blank lines between sentences, ``-DOCSTART-`` lines skipped.

    The first token line fixes the column count; a line with another count is an error, as is (with
    ``validate_tags``) a tag that is not ``O``, ``B-X`` or ``I-X``. Errors name file:line.
    """
    path = Path(path)
    source = str(path)
    examples: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0
    n_cols: int | None = None

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            examples.append(TokenExample(tokens, tags, source, first_line))
        tokens, tags = [], []

    for lineno, raw in enumerate(text_lines(path), start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():  # WNUT separates sentences with a lone tab
            flush()
            continue
        cols = line.split("\t") if "\t" in line else line.split()
        if cols[0].strip() == _DOCSTART:
            flush()
            continue
        if n_cols is None:
            n_cols = len(cols)
            if n_cols < 2:
                raise ValueError(f"{_at(source, lineno)}: expected a token and a tag, got {line!r}")
        if len(cols) != n_cols:
            raise ValueError(f"{_at(source, lineno)}: {len(cols)} columns, expected {n_cols} like the first "
                             f"token line; got {line!r}")
        try:
            token, tag = cols[token_col].strip(), cols[tag_col].strip()
        except IndexError:
            raise ValueError(f"{_at(source, lineno)}: no column {token_col} / {tag_col} in {line!r}") from None
        if not token:
            raise ValueError(f"{_at(source, lineno)}: empty token in {line!r}")
        if validate_tags and not _valid_tag(tag):
            raise ValueError(f"{_at(source, lineno)}: tag {tag!r} is not BIO (O, B-X or I-X)")
        if not tokens:
            first_line = lineno
        tokens.append(token)
        tags.append(tag)
    flush()
    if not examples:
        raise ValueError(f"{path}: no sentences")
    return examples


# ---------------------------------------------------------------------------------------------------------- SQuAD


def read_squad(path: PathLike) -> list[QAExample]:
    """Read SQuAD v1.1 / v2.0 JSON. ``ValueError`` naming the file and question id for a missing field or an answer
    whose text is not at its ``answer_start`` in the context."""
    path = Path(path)
    source = str(path)
    try:
        root = json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{_at(source, err.lineno)}: invalid JSON ({err.msg})") from None

    def need(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
        value = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise ValueError(f"{source}: {where}: field {key!r} is {got}")

    examples: list[QAExample] = []
    for a, article in enumerate(need(root, "data", "top level", list)):
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, para in enumerate(need(article, "paragraphs", f"data[{a}]", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = need(para, "context", where, str)
            if not context.strip():
                raise ValueError(f"{source}: {where}: empty context")
            for q, qa in enumerate(need(para, "qas", where, list)):
                qid = str(need(qa, "id", f"{where}.qas[{q}]", (str, int)))
                at = f"question {qid!r}"
                question = need(qa, "question", at, str)
                if not question.strip():
                    raise ValueError(f"{source}: {at}: empty question")
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else need(qa, "answers", at, list)
                checked = []
                for answer in answers:
                    text = need(answer, "text", at, str)
                    start = need(answer, "answer_start", at, int)
                    if context[start:start + len(text)] != text:
                        raise ValueError(f"{source}: {at}: answer {text!r} not found at answer_start={start} in its "
                                         f"context (found {context[start:start + len(text)]!r})")
                    checked.append({"text": text, "answer_start": start})
                examples.append(QAExample(qid, question, context, checked, impossible, source, title))
    if not examples:
        raise ValueError(f"{path}: no questions")
    return examples


# ------------------------------------------------------------------------------------------------ multiple choice


def _first_key(record: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in record), None)


def read_multiple_choice(path: PathLike) -> list[MCExample]:
    """Read JSON Lines, one question per line: ``question``, ``choices`` (or ``options`` / ``endings``), optional
    ``context`` (or ``article``), optional ``label`` (or ``answer``) as a 0-based index or a letter ("A" = 0), and
    optional ``id``. Errors name file:line."""
    path = Path(path)
    source = str(path)
    examples: list[MCExample] = []
    for lineno, record in _iter_jsonl(path):
        at = _at(source, lineno)
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{at}: missing or empty 'question'; keys: {', '.join(record)}")
        choices_key = _first_key(record, ("choices", "options", "endings"))
        choices = record.get(choices_key) if choices_key else None
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{at}: 'choices' must be a list of at least two strings; keys: {', '.join(record)}")
        context_key = _first_key(record, ("context", "article"))
        context = record.get(context_key) if context_key else ""
        if context is None or not isinstance(context, str):
            raise ValueError(f"{at}: {context_key!r} must be a string, got {context!r}")
        label_key = _first_key(record, ("label", "answer"))
        label = _choice_index(record[label_key], len(choices), at) if label_key else None
        examples.append(MCExample(question, choices, label, source, lineno, context, str(record.get("id", ""))))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _choice_index(raw: Any, n_choices: int, at: str) -> int:
    if isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().isalpha():
        index = ord(raw.strip().upper()) - ord("A")
    elif (isinstance(raw, int) and not isinstance(raw, bool)) or (isinstance(raw, str) and raw.strip().isdigit()):
        index = int(raw)
    else:
        raise ValueError(f"{at}: label {raw!r} is neither an index nor a letter")
    if not 0 <= index < n_choices:
        raise ValueError(f"{at}: label {raw!r} points past the {n_choices} choices")
    return index


# -------------------------------------------------------------------------------------------------------- splits


class DataSplits(NamedTuple):
    train: list[Any]
    validation: list[Any]
    test: list[Any]


def _labels_of(example: Any) -> set[str]:
    tags = getattr(example, "tags", None)
    if tags is not None:
        return set(tags)
    label = getattr(example, "label", None)
    return set() if label is None or isinstance(label, float) else {str(label)}


def _keep_rare_labels_in_training(examples: Sequence[Any], test: list[int], validation: list[int]
                                  ) -> tuple[list[int], list[int]]:
    held = set(test) | set(validation)
    trained: set[str] = set()
    for i, ex in enumerate(examples):
        if i not in held:
            trained |= _labels_of(ex)
    moved = set()
    for i in sorted(held):
        labels = _labels_of(examples[i])
        if labels - trained:
            moved.add(i)
            trained |= labels
    if moved:
        logger.info("split: %d held-out example(s) moved to training: their labels occur nowhere else", len(moved))
    return [i for i in test if i not in moved], [i for i in validation if i not in moved]


def split_train_test(examples: Sequence[Any], test_fraction: float, seed: int = 0,
                     validation_fraction: float = 0.0, stratify: bool = True) -> DataSplits:
    """Split a dataset that ships as one file into train / validation / test, stratified by label.

    Fractions are of all examples, rounded per label. The test split depends only on ``seed`` and
    ``test_fraction`` (not on ``validation_fraction``), so tuning on validation never touches it; keep it
    held out. Each split keeps the input order. Regression labels (floats) and ``stratify=False`` split without
    strata.
    """
    if not 0.0 <= test_fraction < 1.0 or not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"fractions must be in [0, 1), got test={test_fraction}, validation={validation_fraction}")
    if test_fraction + validation_fraction >= 1.0:
        raise ValueError(f"test_fraction + validation_fraction must be < 1, got {test_fraction + validation_fraction}")
    strata: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        label = getattr(ex, "label", None)
        key = str(label) if stratify and not isinstance(label, float) else ""
        strata[key].append(i)
    test: list[int] = []
    validation: list[int] = []
    for key in sorted(strata):
        idx = strata[key]
        # Seeded per stratum so that one label's rows never shift another's assignment.
        random.Random(f"{seed}:{key}").shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * validation_fraction)
        test += idx[:n_test]
        # Validation comes from the far end: growing validation_fraction never moves rows in or out of test.
        validation += idx[len(idx) - n_val:] if n_val else []
    # A label (or BIO tag) seen only in held-out rows could never be learned, and its id would be unknown to the
    # head built from the training labels: such rows go back to training, so every label is trained on.
    test, validation = _keep_rare_labels_in_training(examples, test, validation)
    taken = set(test) | set(validation)
    return DataSplits(
        train=[ex for i, ex in enumerate(examples) if i not in taken],
        validation=[examples[i] for i in sorted(validation)],
        test=[examples[i] for i in sorted(test)],
    )


# -------------------------------------------------------------------------------------------- features: sequences


def _call(tokenizer: Any, texts: list[str], pairs: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The tokenizer's HF-like ``__call__`` returning unpadded Python lists."""
    return tokenizer(texts, pairs, padding=False, return_tensors=None, **kwargs)


def prepare_classification_features(
    examples: Sequence[TextExample],
    tokenizer: Any,
    label2id: Mapping[str, int] | None = None,
    max_seq_length: int = 128,
    task: Task = "classification",
) -> list[dict[str, Any]]:
    """Per example ``input_ids``, ``attention_mask``, ``token_type_ids`` (T,) truncated to ``max_seq_length``, and
    ``labels``: the class id (classification, needs ``label2id``) or the float target (regression); no ``labels``
    for unlabelled examples. ``ValueError`` naming file:line for a label missing from ``label2id``."""
    if not examples:
        return []
    has_pair = [ex.text_pair is not None for ex in examples]
    if any(has_pair) and not all(has_pair):
        bad = examples[has_pair.index(False)]
        raise ValueError(f"{_at(bad.source, bad.line)}: no text pair, unlike other examples")
    pairs = [ex.text_pair for ex in examples] if has_pair[0] else None
    enc = _call(tokenizer, [ex.text for ex in examples], pairs, truncation=True, max_length=max_seq_length)
    if task == "classification" and label2id is not None:
        check_labels(examples, label2id)
    features = []
    for i, ex in enumerate(examples):
        feat = {k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")}
        if ex.label is not None:
            if task == "regression":
                feat["labels"] = float(ex.label)
            elif label2id is None:
                raise ValueError("classification features need label2id (see build_label_map)")
            else:
                feat["labels"] = label2id[str(ex.label)]
        features.append(feat)
    return features


def prepare_token_classification_features(
    examples: Sequence[TokenExample],
    tokenizer: Any,
    label2id: Mapping[str, int] | None = None,
    max_seq_length: int = 128,
    label_all_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Tokenize pre-split words and align word tags to word pieces.

    Each word is tokenized on its own (what joining the words with spaces gives for WordPiece and SentencePiece),
    and a word that tokenizes to nothing (a zero-width character) becomes ``[UNK]`` so every word keeps a slot.
    ``labels`` (T,) carry the tag id on each word's first piece and -100 on the other pieces and on special tokens;
    with ``label_all_tokens`` the other pieces get the word's tag too (``B-X`` as ``I-X`` when that tag exists).
    ``word_ids`` (T,) give the word index of each token (None for specials); `align_predictions` maps token
    predictions back to words with them. Words past ``max_seq_length`` are dropped, with a warning.
    """
    if not examples:
        return []
    if label2id is not None:
        check_labels(examples, label2id)
    words = [w for ex in examples for w in ex.tokens]
    enc = _call(tokenizer, words, truncation=False, max_length=None)
    # Strip the [CLS] ... [SEP] the template added around each word.
    pieces = [ids[1:-1] or [tokenizer.unk_token_id] for ids in enc["input_ids"]]
    budget = max_seq_length - 2
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    features: list[dict[str, Any]] = []
    truncated = 0
    offset = 0
    for ex in examples:
        ids: list[int] = [cls_id]
        word_ids: list[int | None] = [None]
        labels = [IGNORE_INDEX]
        for w, tag in enumerate(ex.tags):
            word_pieces = pieces[offset + w]
            if len(ids) - 1 + len(word_pieces) > budget:
                truncated += 1
                break
            first_label = label2id[tag] if label2id is not None else IGNORE_INDEX
            rest_label = IGNORE_INDEX
            if label_all_tokens and label2id is not None:
                inside = "I-" + tag[2:] if tag.startswith("B-") else tag
                rest_label = label2id.get(inside, first_label)
            ids += word_pieces
            word_ids += [w] * len(word_pieces)
            labels += [first_label] + [rest_label] * (len(word_pieces) - 1)
        offset += len(ex.tokens)
        ids.append(sep_id)
        word_ids.append(None)
        labels.append(IGNORE_INDEX)
        feat: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids),
                                "word_ids": word_ids}
        if label2id is not None:
            feat["labels"] = labels
        features.append(feat)
    if truncated:
        logger.warning("%d of %d sentences longer than max_seq_length=%d were truncated; their last words get no "
                       "prediction", truncated, len(examples), max_seq_length)
    return features


def align_predictions(
    pred_ids: Sequence[int] | torch.Tensor | np.ndarray,
    word_ids: Sequence[int | None],
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    num_words: int | None = None,
    fill: str | int = "O",
) -> list[Any]:
    """Word-level predictions from per-token ones: the prediction on each word's first piece.

    ``pred_ids`` (T,) may be longer than ``word_ids`` (batch padding). With ``id2label`` the result is tags,
    otherwise ids. ``num_words`` (the sentence length) pads words that were truncated away with ``fill``.
    """
    preds = pred_ids.tolist() if isinstance(pred_ids, (torch.Tensor, np.ndarray)) else list(pred_ids)
    if len(preds) < len(word_ids):
        raise ValueError(f"{len(preds)} predictions for {len(word_ids)} tokens")
    by_word: dict[int, Any] = {}
    for pred, w in zip(preds, word_ids):
        if w is not None and w not in by_word:
            by_word[w] = id2label[int(pred)] if id2label is not None else int(pred)
    n = num_words if num_words is not None else (max(by_word) + 1 if by_word else 0)
    return [by_word.get(w, fill) for w in range(n)]


# ------------------------------------------------------------------------------------------------- features: QA


def prepare_qa_features(
    examples: Sequence[QAExample],
    tokenizer: Any,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[dict[str, Any]]:
    """Split each (question, context) into windows of ``max_seq_length`` tokens: ``[CLS] question [SEP] context
    window [SEP]``, consecutive windows overlapping by ``doc_stride`` tokens (the HF ``stride``); questions are cut
    to ``max_query_length`` tokens first.

    Per window: ``input_ids``, ``attention_mask``, ``token_type_ids`` (T,); ``start_positions`` /
    ``end_positions``, the token span of the first answer, or 0 (the [CLS] token) when the answer is not wholly in
    this window or the question is impossible; ``example_id``; and ``offset_mapping`` (T,) with (start, end)
    characters in the context for context tokens and None for everything else, for `postprocess_qa`.
    """
    if not examples:
        return []
    if doc_stride >= max_seq_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")
    questions = [_cut_question(tokenizer, ex.question.lstrip(), max_query_length) for ex in examples]
    q_lens = [len(ids) - 2 for ids in _call(tokenizer, questions, truncation=False, max_length=None)["input_ids"]]
    for ex, q_len in zip(examples, q_lens):
        room = max_seq_length - q_len - 3  # context tokens per window, after [CLS] q [SEP] ... [SEP]
        if room <= doc_stride:
            raise ValueError(f"{ex.source}: question {ex.id!r}: {q_len} question tokens leave {room} context tokens "
                             f"per window, not more than doc_stride={doc_stride}; raise max_seq_length or lower "
                             f"doc_stride / max_query_length")
    enc = _call(tokenizer, questions, [ex.context for ex in examples], truncation="only_second",
                max_length=max_seq_length, stride=doc_stride, return_overflowing_tokens=True,
                return_offsets_mapping=True)
    features: list[dict[str, Any]] = []
    for row, sample in enumerate(enc["overflow_to_sample_mapping"]):
        ex = examples[sample]
        ids = enc["input_ids"][row]
        first_ctx = q_lens[sample] + 2
        last_ctx = len(ids) - 2
        offsets: list[tuple[int, int] | None] = [None] * len(ids)
        for t in range(first_ctx, last_ctx + 1):
            offsets[t] = tuple(enc["offset_mapping"][row][t])  # type: ignore[assignment]
        start, end = _answer_tokens(ex, offsets, first_ctx, last_ctx)
        features.append({
            "input_ids": ids,
            "attention_mask": enc["attention_mask"][row],
            "token_type_ids": enc["token_type_ids"][row],
            "start_positions": start,
            "end_positions": end,
            "example_id": ex.id,
            "offset_mapping": offsets,
        })
    return features


def _cut_question(tokenizer: Any, question: str, max_query_length: int) -> str:
    enc = _call(tokenizer, [question], truncation=False, max_length=None, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][0]
    if len(offsets) - 2 <= max_query_length:
        return question
    return question[:offsets[max_query_length][1]]  # offsets[0] is [CLS]: index k is the k-th question token


def _answer_tokens(ex: QAExample, offsets: Sequence[tuple[int, int] | None], first: int, last: int) -> tuple[int, int]:
    if ex.is_impossible or not ex.answers:
        return 0, 0
    answer = ex.answers[0]
    start_char = answer["answer_start"]
    end_char = start_char + len(answer["text"])
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):  # type: ignore[index]
        return 0, 0
    start = first
    while start <= last and offsets[start][0] <= start_char:  # type: ignore[index]
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:  # type: ignore[index]
        end -= 1
    return start - 1, end + 1


def postprocess_qa(
    examples: Sequence[QAExample],
    features: Sequence[Mapping[str, Any]],
    start_logits: Sequence[Any] | torch.Tensor | np.ndarray,
    end_logits: Sequence[Any] | torch.Tensor | np.ndarray,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Best answer per question from per-window logits: id -> ``{"text", "start", "end", "score"}``.

    ``start_logits`` / ``end_logits`` are one row per feature, (N, T) or a list of (T_i,); rows may be longer than
    the feature (batch padding). A span is the best ``start + end`` logit among the ``n_best`` starts and ends
    of a window that lie in the context, end >= start, at most ``max_answer_length`` tokens. ``text`` is sliced
    from the original context by characters: ``context[start:end]``. With ``version_2``, the answer is ""
    (start = end = -1, score = the null score) when the lowest [CLS] score over the windows beats the best span
    by more than ``null_threshold``. Without any valid span the answer is "" too.
    """
    by_example: dict[str, list[int]] = defaultdict(list)
    for i, feat in enumerate(features):
        by_example[feat["example_id"]].append(i)
    starts, ends = _rows(start_logits), _rows(end_logits)
    if len(starts) != len(features) or len(ends) != len(features):
        raise ValueError(f"{len(features)} features but {len(starts)} start and {len(ends)} end logit rows")
    predictions: dict[str, dict[str, Any]] = {}
    for ex in examples:
        best: dict[str, Any] | None = None
        null_score: float | None = None
        for i in by_example.get(ex.id, []):
            offsets = features[i]["offset_mapping"]
            s_logits, e_logits = starts[i][:len(offsets)], ends[i][:len(offsets)]
            feature_null = float(s_logits[0] + e_logits[0])
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            for s in np.argsort(s_logits)[::-1][:n_best]:
                for e in np.argsort(e_logits)[::-1][:n_best]:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(s_logits[s] + e_logits[e])
                    if best is None or score > best["score"]:
                        best = {"start": offsets[s][0], "end": offsets[e][1], "score": score}
        if best is None or (version_2 and null_score is not None and null_score - best["score"] > null_threshold):
            predictions[ex.id] = {"text": "", "start": -1, "end": -1,
                                  "score": null_score if null_score is not None else 0.0}
        else:
            predictions[ex.id] = {"text": ex.context[best["start"]:best["end"]], **best}
    return predictions


def _rows(logits: Any) -> list[np.ndarray]:
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().float().cpu().numpy()
    return [np.asarray(row, dtype=np.float64) for row in logits]


# ------------------------------------------------------------------------------------- features: multiple choice


def prepare_multiple_choice_features(
    examples: Sequence[MCExample],
    tokenizer: Any,
    max_seq_length: int = 128,
) -> list[dict[str, Any]]:
    """Per example, C rows ``[CLS] context [SEP] question + choice [SEP]`` (``[CLS] question [SEP] choice [SEP]``
    without a context; a ``_`` blank in the question is filled with the choice, as ALBERT's RACE recipe does),
    truncated longest-first so a long article gives way before the question: ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (C, T) padded to the example's longest choice, and ``labels`` (the choice index)."""
    firsts: list[str] = []
    seconds: list[str] = []
    for ex in examples:
        for choice in ex.choices:
            filled = ex.question.replace("_", choice) if "_" in ex.question else f"{ex.question} {choice}".strip()
            if ex.context:
                firsts.append(ex.context)
                seconds.append(filled)
            else:
                firsts.append(ex.question)
                seconds.append(choice)
    enc = _call(tokenizer, firsts, seconds, truncation="longest_first", max_length=max_seq_length)
    pad_id = tokenizer.pad_token_id
    features = []
    row = 0
    for ex in examples:
        rows = range(row, row + len(ex.choices))
        row += len(ex.choices)
        width = max(len(enc["input_ids"][r]) for r in rows)
        feat: dict[str, Any] = {
            key: [enc[key][r] + [pad] * (width - len(enc[key][r])) for r in rows]
            for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0))
        }
        if ex.label is not None:
            feat["labels"] = ex.label
        features.append(feat)
    return features


# ------------------------------------------------------------------------------------------------------- batching

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
_SCALAR_KEYS = ("labels", "start_positions", "end_positions")


def collate_features(batch: Sequence[Mapping[str, Any]], pad_token_id: int = 0,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad features from any ``prepare_*_features`` into a batch of tensors.

    Sequences become (B, T) — or (B, C, T) for multiple choice — padded to the longest row in the batch
    (``input_ids`` with ``pad_token_id``, per-token ``labels`` with -100, masks and token types with 0).
    Scalar ``labels`` become (B,) int64 (float32 for regression); ``start_positions`` / ``end_positions`` (B,).
    Other keys (``example_id``, ``offset_mapping``, ``word_ids``) are not model inputs and are left out.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    first = batch[0]
    multiple_choice = isinstance(first["input_ids"][0], list)
    out: dict[str, torch.Tensor] = {}
    for key in _SEQUENCE_KEYS:
        if key not in first or (key == "labels" and not isinstance(first[key], (list, tuple))):
            continue
        rows = [ex[key] for ex in batch]
        if multiple_choice:
            n_choices = {len(r) for r in rows}
            if len(n_choices) != 1:
                raise ValueError(f"multiple-choice batch mixes choice counts {sorted(n_choices)}")
            width = _width(max(len(c) for r in rows for c in r), pad_to_multiple_of)
            array = np.full((len(rows), n_choices.pop(), width), pad_values.get(key, 0), dtype=np.int64)
            for b, r in enumerate(rows):
                for c, seq in enumerate(r):
                    array[b, c, :len(seq)] = seq
        else:
            width = _width(max(len(r) for r in rows), pad_to_multiple_of)
            array = np.full((len(rows), width), pad_values.get(key, 0), dtype=np.int64)
            for b, seq in enumerate(rows):
                array[b, :len(seq)] = seq
        out[key] = torch.from_numpy(array)
    for key in _SCALAR_KEYS:
        if key in first and key not in out:
            values = [ex[key] for ex in batch]
            dtype = torch.float32 if isinstance(values[0], float) else torch.int64
            out[key] = torch.tensor(values, dtype=dtype)
    return out


def _width(longest: int, multiple: int | None) -> int:
    return -(-longest // multiple) * multiple if multiple else longest
