"""Streaming text corpora: files -> documents -> sentences.

Two input formats:

- plain text (any suffix but ``.jsonl``/``.ndjson``): one document per blank-line-separated block, or one
  document per file with ``doc_per_file=True``;
- JSON Lines (``.jsonl``, ``.ndjson``): one document per line, its text in ``text_field``.

A ``.gz`` suffix on either is read through gzip. Directories expand to every non-hidden file below them and
glob patterns to their matches, each sorted, so every process sees the same file and document order.
Files are read line by line: nothing holds more than one document in memory.

Bad input never stops a run: an empty file, a binary file (NUL bytes in its first 8 KiB), a line that is
not valid UTF-8, a malformed JSON line or one without the text field is logged as a warning naming the
file (and line) and skipped. Only when nothing usable is left does ``iter_documents`` raise ``ValueError``.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "CorpusStats",
    "Document",
    "expand_paths",
    "iter_documents",
    "iter_file_documents",
    "shard_documents",
    "shard_files",
    "split_sentences",
]

logger = logging.getLogger(__name__)

PathArg = str | os.PathLike | Iterable[str | os.PathLike]

#: bumped whenever document or sentence boundaries change, so tokenized caches keyed on it are rebuilt
SPLITTER_VERSION = 1
BINARY_SNIFF_BYTES = 8192
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_GLOB_MAGIC = re.compile(r"[*?[]")


@dataclass
class Document:
    """One document: ``source`` file, 1-based ``line`` where it starts, and its ``sentences``."""

    source: str
    line: int
    sentences: list[str]


@dataclass
class CorpusStats:
    """Counters filled while reading; pass one to the readers to see what was skipped."""

    files: int = 0
    skipped_files: int = 0
    documents: int = 0
    single_sentence_documents: int = 0
    short_documents: int = 0  # dropped: fewer than min_chars characters
    skipped_lines: int = 0
    sources: list[str] = field(default_factory=list)

    def merge(self, other: CorpusStats) -> None:
        for name in ("files", "skipped_files", "documents", "single_sentence_documents", "short_documents",
                     "skipped_lines"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.sources.extend(other.sources)


# --------------------------------------------------------------------------------------------- sentences

# Words that end with a period without ending the sentence (compared lower-case, without the final period).
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "rev", "hon", "gen", "col", "lt", "capt", "sgt",
    "gov", "pres", "vs", "etc", "cf", "al", "fig", "figs", "eq", "eqs", "no", "nos", "vol", "vols", "ch", "sec", "p",
    "pp", "ed", "eds", "op", "approx", "ca", "dept", "est", "inc", "ltd", "co", "corp", "bros", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "e.g", "i.e", "a.m", "p.m", "u.s", "u.k", "ph.d",
))
_OPENERS = "\"'“‘«([{"
_CLOSERS = "\"'”’»)]}"
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
# terminal punctuation, optional closing quotes/brackets, then the whitespace we may split at
_INLINE_END = re.compile(r"[.!?…]+[" + re.escape(_CLOSERS) + r"]*(\s+)")
_LINE_END = re.compile(r"[.!?…]+[" + re.escape(_CLOSERS) + r"]*$")
_INITIALS = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")  # "J", "U.S", "e.g"


def _is_abbreviation(text_before_period: str) -> bool:
    words = text_before_period.split()
    if not words:
        return False
    word = words[-1].lstrip(_OPENERS).lower()
    return word in _ABBREVIATIONS or (_INITIALS.fullmatch(word) is not None and len(word) <= 5)


def _ends_sentence(line: str) -> bool:
    m = _LINE_END.search(line)
    if m is None:
        return False
    return not (line[m.start()] == "." and m.end() - m.start() == 1 and _is_abbreviation(line[: m.start()]))


def _split_inline(text: str) -> list[str]:
    """Split one run of text at ``. ! ?`` followed by whitespace and a capital letter, digit or opening quote."""
    out, start = [], 0
    for m in _INLINE_END.finditer(text):
        nxt = m.end()
        if nxt >= len(text):
            break
        c = text[nxt]
        if not (c.isupper() or c.isdigit() or c in _OPENERS):
            continue
        punct = text[m.start() : m.start(1)].rstrip(_CLOSERS)
        if punct == "." and _is_abbreviation(text[start : m.start()]):
            continue
        sentence = text[start : m.start(1)].strip()
        if sentence:
            out.append(sentence)
        start = nxt
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def split_sentences(text: str) -> list[str]:
    """Split a block of text into sentences with a dependency-free rule set.

    ``<br />`` tags become newlines. A newline ends a sentence when the line ends with terminal
    punctuation (not an abbreviation such as ``Mr.``), and every newline does when the block looks like one
    sentence per line (at least half of its lines end a sentence). Blank lines always do. Inside a line,
    the text is split at ``.``, ``!`` or ``?`` (plus closing quotes) followed by whitespace and a capital
    letter, digit or opening quote, except after common abbreviations (``Mr.``, ``Dr.``, ``e.g.``, ``i.e.``,
    ``etc.``, ...) and initials (``J. Smith``, ``U.S.``).
    """
    lines = [ln.strip() for ln in _BR.sub("\n", text).split("\n")]
    nonblank = [ln for ln in lines if ln]
    ends = [_ends_sentence(ln) for ln in nonblank[:-1]]
    per_line = len(ends) > 0 and 2 * sum(ends) >= len(ends)
    chunks: list[str] = []
    current: list[str] = []
    for ln in lines:
        if ln:
            current.append(ln)
        if current and (not ln or per_line or _ends_sentence(ln)):
            chunks.append(" ".join(current))
            current = []
    if current:
        chunks.append(" ".join(current))
    return [s for chunk in chunks for s in _split_inline(chunk)]


# ------------------------------------------------------------------------------------------------- files


def expand_paths(paths: PathArg) -> list[Path]:
    """Files named by ``paths`` (files, directories, glob patterns), each argument's files sorted, no repeats."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    seen: set[str] = set()
    for arg in paths:
        s = os.path.expanduser(os.fspath(arg))
        p = Path(s)
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(
                (f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)),
                key=str,
            )
        elif _GLOB_MAGIC.search(s):
            found = sorted((Path(f) for f in glob.glob(s, recursive=True) if os.path.isfile(f)), key=str)
        else:
            found = []
        if not found:
            logger.warning("%s: no such file, or no files in that directory / matching that pattern", s)
        for f in found:
            key = os.path.abspath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def shard_files(paths: PathArg, rank: int, world_size: int) -> list[Path]:
    """This rank's files: every ``world_size``-th file starting at ``rank`` (disjoint; together, all files).

    Balanced only when files are many and similar in size; ``shard_documents`` splits finer.
    """
    _check_rank(rank, world_size)
    return expand_paths(paths)[rank::world_size]


def shard_documents(documents: Iterable[Document], rank: int, world_size: int) -> Iterator[Document]:
    """This rank's documents: every ``world_size``-th document starting at ``rank``.

    Each rank still reads every file (cheap next to tokenization), but gets a disjoint, balanced slice whose
    union over ranks is the whole corpus in the same order.
    """
    _check_rank(rank, world_size)
    return itertools.islice(documents, rank, None, world_size)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_jsonl(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith(JSONL_SUFFIXES)


def _iter_lines(path: Path, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its line ending); bad files and lines are logged and skipped."""
    with _open(path) as f:
        try:
            head = f.read(BINARY_SNIFF_BYTES)
        except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz file
            logger.warning("%s: cannot read (%s); file skipped", path, e)
            stats.skipped_files += 1
            return
        if not head:
            logger.warning("%s: empty file; skipped", path)
            stats.skipped_files += 1
            return
        if b"\0" in head:
            logger.warning("%s: looks binary (NUL bytes in the first %d bytes); file skipped", path, BINARY_SNIFF_BYTES)
            stats.skipped_files += 1
            return
        f.seek(0)
        stats.files += 1
        stats.sources.append(str(path))
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                logger.warning("%s:%d: not valid UTF-8 (%s); line skipped", path, lineno, e.reason)
                stats.skipped_lines += 1
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")
            yield lineno, line.rstrip("\r\n")


def _make_document(path: Path, line: int, text: str, min_chars: int, stats: CorpusStats) -> Document | None:
    sentences = split_sentences(text)
    if sum(len(s) for s in sentences) < max(min_chars, 1):
        stats.short_documents += 1
        return None
    stats.documents += 1
    if len(sentences) < 2:
        stats.single_sentence_documents += 1
    return Document(source=str(path), line=line, sentences=sentences)


def iter_file_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    min_chars: int = 1,
    doc_per_file: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Documents of one file (see ``iter_documents``); yields nothing, with a warning, for an unusable file."""
    path = Path(path)
    stats = stats if stats is not None else CorpusStats()
    lines = _iter_lines(path, stats)
    if _is_jsonl(path):
        for lineno, line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: malformed JSON (%s); line skipped", path, lineno, e.msg)
                stats.skipped_lines += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                logger.warning("%s:%d: no string field %r; line skipped", path, lineno, text_field)
                stats.skipped_lines += 1
                continue
            doc = _make_document(path, lineno, text, min_chars, stats)
            if doc is not None:
                yield doc
        return
    block: list[str] = []
    start = 0
    for lineno, line in lines:
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block and not doc_per_file:
            doc = _make_document(path, start, "\n".join(block), min_chars, stats)
            block = []
            if doc is not None:
                yield doc
        elif block:
            block.append("")  # keep the paragraph break: a sentence boundary inside the one document
    if block:
        doc = _make_document(path, start, "\n".join(block), min_chars, stats)
        if doc is not None:
            yield doc


def iter_documents(
    paths: PathArg,
    text_field: str = "text",
    min_chars: int = 1,
    *,
    doc_per_file: bool = False,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Stream the documents of ``paths`` (files, directories, globs) in a deterministic order.

    Documents with fewer than ``min_chars`` characters of sentence text are dropped (counted in
    ``stats.short_documents``). Documents with a single sentence are **yielded** and counted in
    ``stats.single_sentence_documents``: plain-MLM pre-training uses them as single-segment examples, while
    sentence-order prediction, which needs two consecutive segments, skips them (see
    ``litebert.data.pretraining.create_sop_examples``); they are never used as a "random next" segment.

    Raises ``ValueError`` naming the inputs once the files are exhausted without a single usable document.
    """
    files = expand_paths(paths)
    stats = stats if stats is not None else CorpusStats()
    before = stats.documents
    for path in files:
        yield from iter_file_documents(path, text_field=text_field, min_chars=min_chars, doc_per_file=doc_per_file,
                                       stats=stats)
    if stats.documents == before:
        raise ValueError(f"no usable documents in {_describe(paths)} ({len(files)} file(s) found; see the warnings "
                         f"above for skipped files and lines)")
    if stats.single_sentence_documents:
        logger.info("%d of %d documents have a single sentence", stats.single_sentence_documents, stats.documents)


def _describe(paths: PathArg) -> str:
    if isinstance(paths, (str, os.PathLike)):
        return repr(os.fspath(paths))
    names = [os.fspath(p) for p in paths]
    return ", ".join(map(repr, names[:10])) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "[]"
