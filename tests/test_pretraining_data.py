"""ALBERT pre-training data: corpus reading, SOP pairs, n-gram masking, caching, resume, DDP split."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from litebert.data.corpus import (
    CorpusStats,
    expand_paths,
    iter_documents,
    shard_documents,
    shard_files,
    split_sentences,
)
from litebert.data.pretraining import (
    IGNORE_INDEX,
    MaskingCollator,
    PretrainingConfig,
    PretrainingDataset,
    SpecialTokens,
    build_pretraining_loader,
    collate,
    create_sop_examples,
    mask_tokens,
    select_ngram_spans,
    word_units,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "gu", "be", "zo", "fa", "ri", "mu", "te", "ba"]


# ------------------------------------------------------------------------------------------ fixtures


def make_lexicon(rng: random.Random, n: int = 400) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def make_docs(rng: random.Random, lexicon: list[str], n_docs: int, sentences: tuple[int, int] = (2, 8)) -> list[list[str]]:
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]  # Zipf: rare words split into pieces
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.randint(*sentences)):
            words = rng.choices(lexicon, weights, k=rng.randint(4, 14))
            doc.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
        docs.append(doc)
    return docs


def write_txt(path: Path, docs: list[list[str]]) -> Path:
    path.write_text("\n\n".join(" ".join(d) for d in docs) + "\n", encoding="utf-8")
    return path


class FakeTokenizer:
    """The interface of litebert.tokenizer.LiteTokenizer over a WordPiece `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        self.tokenizer = tok
        vocab = tok.get_vocab()
        self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id = (
            vocab[t] for t in SPECIALS
        )
        self.vocab_size = tok.get_vocab_size()
        self.special_ids = {vocab[t] for t in SPECIALS}
        self.calls = 0

    def encode_words(self, texts: list[str]) -> list[tuple[list[int], list[int | None]]]:
        self.calls += 1
        return [(e.ids, e.word_ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


class RefusingTokenizer(FakeTokenizer):
    def encode_words(self, texts):
        raise AssertionError("the tokenizer was called although the cache should have been used")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated corpus of 400 documents in two files and a WordPiece tokenizer trained on it."""
    rng = random.Random(7)
    lexicon = make_lexicon(rng)
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(rng, lexicon, 400)
    files = [write_txt(root / "a.txt", docs[:240]), write_txt(root / "b.txt", docs[240:])]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator((s for d in docs for s in d),
                            trainers.WordPieceTrainer(vocab_size=160, special_tokens=SPECIALS, show_progress=False))
    return {"root": root, "files": files, "docs": docs, "tok": tok, "lexicon": lexicon}


def dataset(world, tmp_path, tokenizer=None, **cfg):
    return PretrainingDataset(world["files"], tokenizer or FakeTokenizer(world["tok"]),
                              PretrainingConfig(**{"max_seq_length": 64, "shuffle_buffer": 0, **cfg}),
                              cache_dir=tmp_path / "cache")


def key(ex) -> tuple:
    return tuple(ex["input_ids"].tolist()), tuple(ex.get("labels", np.zeros(0)).tolist()), ex["sentence_order_label"]


# ---------------------------------------------------------------------------------------------- corpus


def test_split_sentences():
    assert split_sentences("Mr. Smith met Dr. Jones, e.g. at the U.S. Capitol. It rained! 42 came? “Yes.” No.") == [
        "Mr. Smith met Dr. Jones, e.g. at the U.S. Capitol.", "It rained!", "42 came?", "“Yes.”", "No."]
    # wrapped prose joins lines; <br /> and blank lines are breaks
    assert split_sentences("A line that wraps\nonto the next. Then\nmore text.<br /><br />After a break") == [
        "A line that wraps onto the next.", "Then more text.", "After a break"]
    # one sentence per line, even without final punctuation
    assert split_sentences("A heading\nFirst sentence.\nSecond sentence.") == [
        "A heading", "First sentence.", "Second sentence."]
    assert split_sentences("lower case after a period. stays together etc. And so on.") == [
        "lower case after a period. stays together etc. And so on."]


def test_iter_documents_formats(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("One. Two.\n\n\nThree here.\nFour here.\n")
    (tmp_path / "d" / "a.jsonl").write_text(
        json.dumps({"text": "J one. J two."}) + "\n\n" + json.dumps({"body": "x", "text": "J three."}) + "\n")
    with gzip.open(tmp_path / "d" / "c.txt.gz", "wt") as f:
        f.write("Zipped one. Zipped two.\n")
    (tmp_path / "d" / ".hidden").write_text("Never read.")
    docs = list(iter_documents(tmp_path / "d"))
    assert [(Path(d.source).name, d.line, d.sentences) for d in docs] == [
        ("a.jsonl", 1, ["J one.", "J two."]),
        ("a.jsonl", 3, ["J three."]),
        ("b.txt", 1, ["One.", "Two."]),
        ("b.txt", 4, ["Three here.", "Four here."]),
        ("c.txt.gz", 1, ["Zipped one.", "Zipped two."]),
    ]
    per_file = list(iter_documents(str(tmp_path / "d" / "*.txt"), doc_per_file=True))
    assert [d.sentences for d in per_file] == [["One.", "Two.", "Three here.", "Four here."]]
    stats = CorpusStats()
    assert len(list(iter_documents([tmp_path / "d" / "a.jsonl"], min_chars=9, stats=stats))) == 1
    assert (stats.documents, stats.short_documents, stats.single_sentence_documents) == (1, 1, 0)


def test_bad_inputs_are_logged_and_skipped(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("Good one. Good two.\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.bin").write_bytes(b"PK\x03\x04\x00\x00 Not. Text.")
    (tmp_path / "latin1.txt").write_bytes(b"Fine line. Also fine.\nBad \xe9\xff line. Gone.\nLast. Line.\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "Ok. Ok two."}\n{"text": broken\n{"other": 1}\n["list"]\n')
    with caplog.at_level(logging.WARNING, logger="litebert"):
        stats = CorpusStats()
        docs = list(iter_documents(tmp_path, stats=stats))
    log = caplog.text
    assert "empty.txt: empty file" in log
    assert "binary.bin: looks binary" in log
    assert "latin1.txt:2: not valid UTF-8" in log
    assert "bad.jsonl:2: malformed JSON" in log
    assert "bad.jsonl:3: no string field 'text'" in log and "bad.jsonl:4:" in log
    text = [s for d in docs for s in d.sentences]
    assert text == ["Ok.", "Ok two.", "Good one.", "Good two.", "Fine line.", "Also fine.", "Last.", "Line."]
    assert (stats.skipped_files, stats.skipped_lines) == (2, 4)

    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable documents in .*only_bad"):
        list(iter_documents(tmp_path / "only_bad"))
    with pytest.raises(ValueError, match="no input files"):
        PretrainingDataset(tmp_path / "missing", None, use_cache=False)


def test_shard_files_and_documents(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("\n\n".join(f"Doc {i}{j}. Two." for j in range(3)))
    files = expand_paths(tmp_path)
    parts = [shard_files(tmp_path, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == files and not set(parts[0]) & set(parts[1])
    docs = [d.sentences[0] for d in iter_documents(tmp_path)]
    split = [[d.sentences[0] for d in shard_documents(iter_documents(tmp_path), r, 3)] for r in range(3)]
    assert sorted(s for part in split for s in part) == sorted(docs) and sum(map(len, split)) == len(docs)


# ------------------------------------------------------------------------------------------- SOP pairs


def numbered_documents(rng: random.Random, n_docs: int) -> list[list[list[int]]]:
    """Documents whose tokens count up, so every token's position in its document is its value."""
    docs, nxt = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(rng.randint(2, 10)):
            length = rng.randint(3, 25)
            doc.append(list(range(nxt, nxt + length)))
            nxt += length
        docs.append(doc)
    return docs


def test_sop_pairs_balanced_and_ordered():
    cfg = PretrainingConfig(max_seq_length=64)
    rng = random.Random(0)
    pairs = [p for doc in numbered_documents(random.Random(1), 300) for p in create_sop_examples(doc, rng, cfg)]
    assert len(pairs) >= 300
    labels = [p.sentence_order_label for p in pairs]
    assert 0.4 <= sum(labels) / len(labels) <= 0.6
    for p in pairs:
        a, b = p.tokens_a, p.tokens_b
        assert a and b and len(a) + len(b) <= cfg.max_seq_length - 3
        # each segment is a contiguous span of the document
        assert a == list(range(a[0], a[0] + len(a))) and b == list(range(b[0], b[0] + len(b)))
        if p.sentence_order_label == 0:
            assert a[-1] < b[0]  # in document order
        else:
            assert b[-1] < a[0]  # swapped: B came first in the document


def test_single_sentence_documents_make_no_sop_pair():
    rng = random.Random(0)
    assert create_sop_examples([[5, 6, 7]], rng, PretrainingConfig()) == []
    assert create_sop_examples([[5, 6, 7], []], rng, PretrainingConfig()) == []
    (only,) = create_sop_examples([[5, 6, 7]], rng, PretrainingConfig(sop=False))
    assert (only.tokens_a, only.tokens_b, only.sentence_order_label) == ([5, 6, 7], [], IGNORE_INDEX)
    # a lone last sentence joins the chunk before it rather than being dropped
    doc = [list(range(i * 100, i * 100 + 30)) for i in range(3)]
    pairs = create_sop_examples(doc, random.Random(3), PretrainingConfig(max_seq_length=64, short_seq_prob=0))
    assert len(pairs) == 1


# --------------------------------------------------------------------------------------------- masking


def test_masking_rate_cap_and_replacement_split(world, tmp_path):
    ds = dataset(world, tmp_path, max_predictions_per_seq=1000)
    examples = list(ds)
    special = ds.special
    maskable = masked = n_mask = n_random = n_keep = 0
    for ex in examples:
        ids, labels = ex["input_ids"], ex["labels"]
        sel = labels != IGNORE_INDEX
        is_special = np.isin(np.where(sel, labels, ids), list(special.special_ids))  # of the original tokens
        assert not (sel & is_special).any()  # no special token is ever a target
        maskable += int((~is_special).sum())
        masked += int(sel.sum())
        n_mask += int((ids[sel] == special.mask).sum())
        n_keep += int((ids[sel] == labels[sel]).sum())
        rand = ids[sel][(ids[sel] != special.mask) & (ids[sel] != labels[sel])]
        n_random += len(rand)
        assert not set(rand.tolist()) & special.special_ids
    assert masked > 3500
    assert abs(masked / maskable - 0.15) < 0.01
    assert abs(n_mask / masked - 0.8) < 0.03
    assert abs(n_random / masked - 0.1) < 0.03
    assert abs(n_keep / masked - 0.1) < 0.03

    capped = list(dataset(world, tmp_path, max_predictions_per_seq=5))
    counts = [int((ex["labels"] != IGNORE_INDEX).sum()) for ex in capped]
    assert max(counts) == 5 and min(counts) >= 1


def test_whole_word_masking_and_special_tokens(world, tmp_path):
    ds = dataset(world, tmp_path)
    multi_piece = 0
    for ex in ds:
        units, _ = word_units(ex["input_ids"].tolist(), set(), ex["word_starts"].tolist())
        sel = ex["labels"] != IGNORE_INDEX
        for u in units:
            if len(u) > 1 and ex["word_starts"][u[1]] == 0:
                multi_piece += bool(sel[u].any())
            assert sel[u].all() or not sel[u].any(), "a word was masked in part"
        specials = np.isin(ex["labels"], list(ds.special.special_ids)) & sel
        assert not specials.any()
        assert ex["input_ids"][0] == ds.special.cls and ex["input_ids"][-1] == ds.special.sep
    assert multi_piece > 50  # the check above had multi-piece words to look at


def assert_inverse_n(lengths: Counter[int], tolerance: tuple[float, float, float]) -> None:
    total = sum(lengths.values())
    assert total > 1000 and lengths[1] > lengths[2] > lengths[3] > 0 and set(lengths) == {1, 2, 3}
    for n, p, tol in zip((1, 2, 3), (6 / 11, 3 / 11, 2 / 11), tolerance):
        assert abs(lengths[n] / total - p) < tol, (n, lengths)


def test_ngram_span_lengths_follow_inverse_n():
    rng = random.Random(0)
    lengths: Counter[int] = Counter()
    for _ in range(50):
        units = [[i] for i in range(1000)]
        lengths.update(n for _, n in select_ngram_spans(units, [0] * 1000, 150, rng, 3))
    assert_inverse_n(lengths, (0.04, 0.03, 0.03))


def test_ngram_spans_in_words_and_never_cross_sep(world, tmp_path):
    # long examples, so that the last span of each, which is shortened to fill the budget exactly (as in
    # ALBERT), weighs little; unmasked (dynamic) examples, so no [MASK] splits the runs
    ds = dataset(world, tmp_path, max_seq_length=512, doc_per_file=True, dynamic_masking=True)
    rng = random.Random(0)
    lengths: Counter[int] = Counter()
    for ex in ds:
        ids = ex["input_ids"].tolist()
        units, runs = word_units(ids, ds.special.special_ids, ex["word_starts"].tolist())
        assert max(map(len, units)) > 1
        budget = max(1, round(0.15 * sum(map(len, units))))
        for s, n in select_ngram_spans(units, runs, budget, rng, 3):
            assert len({runs[k] for k in range(s, s + n)}) == 1  # within one segment
            lengths[n] += 1
    assert_inverse_n(lengths, (0.06, 0.04, 0.04))


def test_mask_tokens_without_whole_word_and_zero_prob():
    special = SpecialTokens(cls=1, sep=2, pad=0, mask=3, vocab_size=100, special_ids=frozenset({0, 1, 2, 3}))
    ids = [1, *range(10, 50), 2]
    cfg = PretrainingConfig(whole_word=False, masked_lm_prob=0.5, max_predictions_per_seq=100)
    out, labels = mask_tokens(ids, random.Random(0), cfg, special, word_starts=[True] + [False] * 40 + [True])
    assert sum(x != IGNORE_INDEX for x in labels) == 20  # pieces are single units without whole_word
    out, labels = mask_tokens(ids, random.Random(0), PretrainingConfig(masked_lm_prob=0.0), special)
    assert out == ids and set(labels) == {IGNORE_INDEX}


# --------------------------------------------------------------------------------- static vs dynamic


def test_static_masks_repeat_across_epochs_dynamic_do_not(world, tmp_path):
    ds = dataset(world, tmp_path, shuffle_buffer=50)
    first = sorted(map(key, ds))
    ds.set_epoch(1)
    second = list(map(key, ds))
    assert sorted(second) == first  # same examples and masks
    ds.set_epoch(1)
    assert list(map(key, ds)) == second  # deterministic

    dyn = dataset(world, tmp_path, dynamic_masking=True)
    collator = MaskingCollator(dyn.special, dyn.config)
    batches = []
    for epoch in (0, 1, 0):
        dyn.set_epoch(epoch)
        exs = list(dyn)
        assert "labels" not in exs[0]
        batches.append(collator(exs[:32]))
    assert torch.equal(batches[0]["input_ids"], batches[2]["input_ids"])
    assert torch.equal(batches[0]["labels"], batches[2]["labels"])
    assert not torch.equal(batches[0]["labels"], batches[1]["labels"])


# ---------------------------------------------------------------------------------- resume, cache, DDP


def test_resume_reproduces_the_stream(world, tmp_path):
    full = list(map(key, dataset(world, tmp_path, shuffle_buffer=40)))
    ds = dataset(world, tmp_path, shuffle_buffer=40)
    it = iter(ds)
    head = [key(next(it)) for _ in range(37)]
    state = ds.state_dict()
    assert state == {"epoch": 0, "examples_yielded": 37}
    resumed = dataset(world, tmp_path, shuffle_buffer=40)
    resumed.load_state_dict(state)
    assert head + list(map(key, resumed)) == full


def loader_batches(loader, n=None):
    return list(itertools.islice(loader, n))


def test_loader_resume_with_and_without_workers(world, tmp_path):
    cfg = PretrainingConfig(max_seq_length=64, shuffle_buffer=40)

    def build(**kw):
        return build_pretraining_loader(world["files"], FakeTokenizer(world["tok"]), cfg, batch_size=8,
                                        cache_dir=tmp_path / "cache", **kw)

    full = loader_batches(build())
    loader = build()
    head = loader_batches(loader, 3)
    state = loader.state_dict()
    assert state == {"epoch": 0, "examples_yielded": 24}
    for workers in (0, 2):
        resumed = build(num_workers=workers)
        resumed.load_state_dict(state)
        rest = loader_batches(resumed)
        assert len(head) + len(rest) == len(full)
        for a, b in zip(head + rest, full):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert resumed.state_dict()["examples_yielded"] == sum(len(b["input_ids"]) for b in full)


def test_loader_leaves_the_global_rng_alone(world, tmp_path):
    loader = build_pretraining_loader(world["files"], FakeTokenizer(world["tok"]), PretrainingConfig(max_seq_length=64),
                                      batch_size=8, cache_dir=tmp_path / "cache")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in itertools.islice(loader, 2):
        pass
    assert torch.equal(torch.rand(3), expected)


def test_tokenized_cache_is_reused(world, tmp_path):
    tok = FakeTokenizer(world["tok"])
    first = list(map(key, dataset(world, tmp_path, tokenizer=tok)))
    assert tok.calls > 0
    assert len(list((tmp_path / "cache").rglob("manifest.json"))) == 2
    assert list((tmp_path / "cache").rglob("*.npz"))
    assert not list((tmp_path / "cache").rglob(".*tmp*"))
    second = list(map(key, dataset(world, tmp_path, tokenizer=RefusingTokenizer(world["tok"]))))
    assert second == first
    uncached = PretrainingDataset(world["files"], FakeTokenizer(world["tok"]),
                                  PretrainingConfig(max_seq_length=64, shuffle_buffer=0), use_cache=False)
    assert list(map(key, uncached)) == first

    # a changed file is tokenized again; a different tokenizer gets its own entries
    edited = tmp_path / "edited.txt"
    write_txt(edited, world["docs"][:5])

    def ds(tokenizer):
        return PretrainingDataset([edited], tokenizer, PretrainingConfig(), cache_dir=tmp_path / "cache")

    list(ds(FakeTokenizer(world["tok"])))
    list(ds(RefusingTokenizer(world["tok"])))
    write_txt(edited, world["docs"][:6])
    with pytest.raises(AssertionError, match="tokenizer was called"):
        list(ds(RefusingTokenizer(world["tok"])))


def test_ddp_ranks_are_disjoint_and_complete(world, tmp_path):
    def examples(rank, world_size):
        ds = PretrainingDataset(world["files"], FakeTokenizer(world["tok"]), PretrainingConfig(max_seq_length=64),
                                rank=rank, world_size=world_size, use_cache=rank == 1,
                                cache_dir=tmp_path / "cache")
        return Counter(map(key, ds))

    single = examples(0, 1)
    r0, r1 = examples(0, 2), examples(1, 2)
    assert r0 and r1 and not set(r0) & set(r1)
    assert r0 + r1 == single


def test_small_corpus_raises(tmp_path, world):
    write_txt(tmp_path / "tiny.txt", world["docs"][:2] + [["Only one sentence here."]])
    with pytest.raises(ValueError, match=r"produced only \d+ pre-training example\(s\).*batch of 64.*tiny\.txt"):
        build_pretraining_loader(tmp_path / "tiny.txt", FakeTokenizer(world["tok"]), batch_size=64, use_cache=False)
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no usable documents in .*blank\\.txt"):
        build_pretraining_loader(tmp_path / "blank.txt", FakeTokenizer(world["tok"]), batch_size=1, use_cache=False)


# ------------------------------------------------------------------------------------------- batching


def test_collate_shapes_and_padding(world, tmp_path):
    ds = dataset(world, tmp_path)
    exs = list(ds)[:5]
    batch = MaskingCollator(ds.special, ds.config)(exs)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "sentence_order_label"}
    assert batch["input_ids"].shape == (5, 64) and batch["input_ids"].dtype == torch.int64
    assert batch["sentence_order_label"].shape == (5,)
    ex = exs[0]
    n = len(ex["input_ids"])
    assert batch["attention_mask"][0].sum() == n
    assert (batch["input_ids"][0, n:] == ds.special.pad).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    types = ex["token_type_ids"].tolist()
    first_sep = ex["input_ids"].tolist().index(ds.special.sep)
    assert types == [0] * (first_sep + 1) + [1] * (n - first_sep - 1)

    short = collate(exs, pad_token_id=ds.special.pad, padding="longest", pad_to_multiple_of=8)
    longest = max(len(e["input_ids"]) for e in exs)
    assert short["input_ids"].shape[1] == -(-longest // 8) * 8

    mlm = dataset(world, tmp_path, sop=False)
    exs = list(mlm)[:4]
    assert all(ds.special.sep not in e["input_ids"][:-1] for e in exs)
    assert "sentence_order_label" not in collate(exs)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="masked_lm_prob"):
        PretrainingConfig(masked_lm_prob=1.5)
    with pytest.raises(ValueError, match="keep_prob"):
        PretrainingConfig(keep_prob=0.3)
    with pytest.raises(ValueError, match="max_seq_length"):
        PretrainingConfig(max_seq_length=4)
    with pytest.raises(ValueError, match="padding"):
        PretrainingConfig(padding="left")
    assert PretrainingConfig(**PretrainingConfig().to_dict()) == PretrainingConfig()
