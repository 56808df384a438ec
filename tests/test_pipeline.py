"""Inference pipelines and length-bucketed batching: real MiniLM weights for feature extraction, tiny random
models (with forced predictions where the answer must be deterministic) for the task heads."""

import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F

import litebert
from conftest import minilm_dir
from litebert.inference.batching import length_bucketed_batches, naive_batches, pad_rows, padded_tokens, run_batched
from litebert.inference.pipeline import TokenClassificationPipeline, pipeline, predict_main, task_for_model
from litebert.tokenizer import load_tokenizer

NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
TEXTS = [
    "A short one.",
    "Angela Merkel visited Washingtonville yesterday, and nobody noticed the unbelievable commotion.",
    "Hi",
    "The quick brown fox jumps over the lazy dog while the band plays on.",
    "Tokenization of unusual words: antidisestablishmentarianism!",
]


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    return minilm_dir()


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return load_tokenizer(minilm)


def _close(a, b, tol=1e-5):
    """Nested lists / dicts equal, floats within ``tol``."""
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b


def _tiny(cls, tokenizer, tmp_path_factory, name, **config):
    torch.manual_seed(0)
    model = cls(litebert.preset("bert-test", vocab_size=30522, **config))
    if hasattr(model, "classifier"):
        with torch.no_grad():
            model.classifier.weight.mul_(200.0)  # spread the logits: inputs get clearly different predictions
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def cls_dir(tokenizer, tmp_path_factory):
    return _tiny(litebert.EncoderForSequenceClassification, tokenizer, tmp_path_factory, "cls",
                 id2label={0: "neg", 1: "pos"})


@pytest.fixture(scope="module")
def ner_dir(tokenizer, tmp_path_factory):
    return _tiny(litebert.EncoderForTokenClassification, tokenizer, tmp_path_factory, "ner", id2label=NER_LABELS)


@pytest.fixture(scope="module")
def qa_dir(tokenizer, tmp_path_factory):
    return _tiny(litebert.EncoderForQuestionAnswering, tokenizer, tmp_path_factory, "qa")


@pytest.fixture(scope="module")
def mlm_dir(tokenizer, tmp_path_factory):
    return _tiny(litebert.EncoderForMaskedLM, tokenizer, tmp_path_factory, "mlm")


# ---------------------------------------------------------------------------------------------------- batching


def test_bucketing_covers_every_index_and_respects_limits():
    lengths = [random.randint(1, 200) for _ in range(300)]
    batches = length_bucketed_batches(lengths, batch_size=16, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024
    # A row longer than the token budget still runs, alone.
    assert length_bucketed_batches([5, 50, 5], batch_size=8, max_tokens=10) == [[1], [0, 2]]


def test_bucketing_pads_less_than_naive_batching():
    lengths = [random.randint(3, 256) for _ in range(512)]
    bucketed = padded_tokens(lengths, length_bucketed_batches(lengths, 32))
    naive = padded_tokens(lengths, naive_batches(len(lengths), 32))
    assert bucketed < naive / 5, (bucketed, naive)


def test_pad_rows_rounds_up_but_not_past_the_model_positions():
    rows = [{"input_ids": [1] * 9}, {"input_ids": [2] * 3, "attention_mask": [1] * 3, "token_type_ids": [0, 1, 1]}]
    batch = pad_rows(rows, pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist() == [9, 3]
    assert batch["token_type_ids"][1, :4].tolist() == [0, 1, 1, 0]
    assert pad_rows(rows, pad_to_multiple_of=8, max_width=12)["input_ids"].shape == (2, 12)


def test_run_batched_returns_results_in_input_order():
    rows = [{"input_ids": list(range(1, n + 1)), "attention_mask": [1] * n} for n in (7, 2, 9, 1, 5, 5, 3)]
    seen_widths = []

    def forward(batch):
        seen_widths.append(batch["input_ids"].shape[1])
        return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]

    out = run_batched(forward, rows, batch_size=3)
    assert out == [r["input_ids"] for r in rows]
    assert seen_widths == [9, 5, 1]  # each batch padded to its own longest row


# ------------------------------------------------------------------------------------------ feature extraction


def test_feature_extraction_matches_manual_mean_pool_and_ranks_paraphrase(minilm, tokenizer):
    model = litebert.from_pretrained(str(minilm))
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "A man is riding a horse."]
    pipe = pipeline("feature-extraction", model=minilm, batch_size=3)
    got = pipe(sentences, return_tensors=True)
    assert got.shape == (4, 384)
    with torch.inference_mode():
        for i, s in enumerate(sentences):
            enc = tokenizer(s)
            hidden = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
            expected = F.normalize(hidden.mean(1), dim=-1)[0]
            torch.testing.assert_close(got[i], expected, atol=2e-5, rtol=1e-4)
    sims = got @ got[0]
    assert sims[1] > sims[2] and sims[1] > sims[3]

    single = pipe(sentences[0])  # one input -> one list of floats
    assert isinstance(single, list) and len(single) == 384 and isinstance(single[0], float)
    raw = pipe(sentences[0], normalize=False, pooling="cls")
    assert abs(sum(v * v for v in raw) - 1.0) > 1e-3
    assert task_for_model(minilm) == "feature-extraction"


def test_fill_mask_without_mlm_head_is_a_clear_error(minilm):
    with pytest.raises(ValueError, match="masked-LM head.*feature-extraction"):
        pipeline("fill-mask", model=minilm)


# ----------------------------------------------------------------------------------------- text classification


def test_text_classification_structure_probabilities_and_pairs(cls_dir):
    clf = pipeline(model=cls_dir)  # task from config.json architectures
    assert clf.task == "text-classification"
    one = clf("a gripping film")
    assert set(one) == {"label", "score"} and one["label"] in ("neg", "pos") and 0.5 <= one["score"] <= 1
    ranked = clf(TEXTS, top_k="all")
    assert len(ranked) == len(TEXTS)
    for r in ranked:
        assert [x["label"] for x in r] in (["neg", "pos"], ["pos", "neg"])
        assert r[0]["score"] >= r[1]["score"]
        assert sum(x["score"] for x in r) == pytest.approx(1.0, abs=1e-6)
    # Results are in input order, whatever the bucketing did.
    assert _close([clf(t, top_k="all") for t in TEXTS], ranked)
    assert len({round(r[0]["score"], 3) for r in ranked}) > 1
    mixed = clf(["one text", {"text": "premise", "text_pair": "hypothesis"}, {"text": "alone"}])
    assert len(mixed) == 3 and all(set(m) == {"label", "score"} for m in mixed)
    with pytest.raises(ValueError, match="top_k"):
        clf("x", topk=2)
    with pytest.raises(ValueError, match="input 1: field 'text'"):
        clf(["fine", {"txt": "typo"}])


def test_regression_head_returns_a_score(tokenizer):
    model = litebert.EncoderForSequenceClassification(litebert.preset("bert-test", vocab_size=30522,
                                                                      id2label={0: "similarity"}))
    out = pipeline("text-classification", model=model, tokenizer=tokenizer)(["a", "b c"])
    assert [set(o) for o in out] == [{"score"}, {"score"}]


def test_bf16_agrees_with_fp32_in_argmax(cls_dir, tokenizer, cpu_class, caplog):
    """An explicit bf16 runs on every CPU class (warned where it is emulated), leaves the caller's model in fp32,
    and agrees with fp32 in argmax."""
    model = litebert.from_pretrained(str(cls_dir))
    fp32 = pipeline("text-classification", model=model, tokenizer=tokenizer, precision="fp32")(TEXTS, top_k="all")
    with caplog.at_level(logging.WARNING, logger="litebert.runtime"):
        pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, precision="bf16")
    assert ("emulated" in caplog.text) == (not cpu_class.cpu_bf16)
    bf16 = pipe(TEXTS, top_k="all")
    assert pipe.precision == "bf16" and next(pipe.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not cast
    margins = [abs(r[0]["score"] - r[1]["score"]) for r in fp32]
    assert min(margins) > 0.05, margins
    assert [r[0]["label"] for r in bf16] == [r[0]["label"] for r in fp32]


def test_auto_precision_follows_the_hardware(cls_dir, tokenizer, cpu_class):
    pipe = pipeline("text-classification", model=str(cls_dir), tokenizer=tokenizer)
    assert pipe.precision == ("bf16" if cpu_class.cpu_bf16 else "fp32")
    assert pipe(TEXTS[:2]) and pipeline("text-classification", model=str(cls_dir), bf16=False).precision == "fp32"


# ---------------------------------------------------------------------------------------- token classification


def _forced_ner(ner_dir, label):
    model = litebert.from_pretrained(str(ner_dir))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0.0)
        model.classifier.bias[{v: k for k, v in NER_LABELS.items()}[label]] = 5.0
    return pipeline(model=model, tokenizer=ner_dir)


def test_token_classification_entities_have_character_offsets(ner_dir, tokenizer):
    text = TEXTS[1]
    n_pieces = len(tokenizer.tokenize(text))

    per_piece = _forced_ner(ner_dir, "B-PER")(text, aggregation_strategy="simple")  # each piece its own entity
    assert len(per_piece) == n_pieces
    per_word = _forced_ner(ner_dir, "B-PER")(text)  # the default groups by words: a word is never cut (issue 17)
    words = {w for w in tokenizer.encode_words([text])[0][1] if w is not None}
    assert len(per_word) == len(words) < n_pieces and all(text[e["start"]:e["end"]] == e["word"] for e in per_word)
    for e in per_piece:
        assert set(e) == {"entity_group", "score", "word", "start", "end"}
        assert e["entity_group"] == "PER" and text[e["start"]:e["end"]] == e["word"] and 0 < e["score"] <= 1

    (whole,) = _forced_ner(ner_dir, "I-LOC")(text)  # consecutive I- pieces of one type merge into one entity
    assert whole["entity_group"] == "LOC" and whole["start"] == 0 and whole["end"] == len(text)
    assert whole["word"] == text

    pipe = _forced_ner(ner_dir, "O")
    assert pipe([text, "Hi"]) == [[], []]
    tokens = pipe(text, aggregation_strategy="none", ignore_labels=())
    assert len(tokens) == n_pieces and all(text[t["start"]:t["end"]] == t["word"] for t in tokens)
    assert {t["entity"] for t in tokens} == {"O"} and tokens[0]["index"] == 1  # index 0 is [CLS]


def test_simple_grouping_follows_bio_tags():
    text = "Ann Lee met Bob in Paris"
    pieces = [{"entity": tag, "score": s, "start": a, "end": b} for tag, s, a, b in [
        ("B-PER", 0.9, 0, 3), ("I-PER", 0.7, 4, 7), ("O", 0.9, 8, 11), ("B-PER", 0.8, 12, 15), ("O", 0.6, 16, 18),
        ("B-LOC", 0.5, 19, 21), ("I-LOC", 0.7, 21, 24)]]
    groups = [g for g in TokenClassificationPipeline._group(pieces, text) if g["entity_group"] != "O"]
    assert [(g["entity_group"], g["word"]) for g in groups] == [("PER", "Ann Lee"), ("PER", "Bob"), ("LOC", "Paris")]
    assert groups[0]["score"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------ question answering


def test_question_answering_spans_index_the_context_even_past_max_length(qa_dir, tokenizer):
    qa = pipeline(model=qa_dir)
    assert qa.task == "question-answering" and qa.max_length == 64
    short = {"question": "Where does Anna live?", "context": "Anna lives in a small house in Lisbon, near the river."}
    long_context = " ".join(f"Sentence number {i} talks about topic {i * 7} in some detail." for i in range(30))
    long = {"question": "Which topic is number 12 about?", "context": long_context}
    assert len(tokenizer.tokenize(long_context)) > 4 * qa.max_length
    results = qa([short, long])
    for inp, r in zip([short, long], results):
        assert set(r) == {"answer", "start", "end", "score"}
        assert r["answer"] and inp["context"][r["start"]:r["end"]] == r["answer"]
        assert 0.0 < r["score"] <= 1.0
    assert _close(qa(question=short["question"], context=short["context"]), results[0])
    impossible = qa(long, handle_impossible_answer=True)
    assert impossible["answer"] == long_context[impossible["start"]:impossible["end"]]
    with pytest.raises(ValueError, match="'context' is missing"):
        qa({"question": "no context?"})


# ------------------------------------------------------------------------------------------------- fill mask


def test_fill_mask_top_k_sorted_and_sequence_has_the_token(mlm_dir):
    fill = pipeline(model=mlm_dir)
    assert fill.task == "fill-mask"
    out = fill("The capital of France is [MASK].", top_k=4)
    assert len(out) == 4
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
    for r in out:
        assert set(r) == {"token_str", "token", "score", "sequence"}
        assert r["token_str"].removeprefix("##") in r["sequence"]
        assert r["sequence"].startswith("the capital of france is")
    two = fill(["[MASK] is [MASK].", "Paris [MASK]."], top_k=2)
    assert len(two[0]) == 2 and all(len(per_mask) == 2 for per_mask in two[0]) and len(two[1]) == 2
    with pytest.raises(ValueError, match=r"input 1: no mask token '\[MASK\]'"):
        fill(["ok [MASK]", "no mask here"])


# ---------------------------------------------------------------------------------------------------- the CLI


def test_predict_main_writes_one_line_per_input_in_order(cls_dir, tmp_path):
    inputs = [{"id": f"q{i}", "text": t} for i, t in enumerate(TEXTS)] + [{"text": "p", "text_pair": "h"}]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in inputs[:3]) + "\n\n" +
                    "\n".join(json.dumps(x) for x in inputs[3:]) + "\n")
    out = tmp_path / "out" / "pred.jsonl"
    assert predict_main(["--model", str(cls_dir), "--input", str(path), "--output", str(out), "--top-k", "2",
                         "--batch-size", "2"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 5, 6, 7]  # the blank line 4 is no input
    assert [x.get("id") for x in lines] == ["q0", "q1", "q2", "q3", "q4", None]
    expected = pipeline("text-classification", model=cls_dir)(inputs, top_k=2)
    assert _close([x["prediction"] for x in lines], expected)


def test_predict_main_txt_input_and_stdout(ner_dir, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("Angela lives in Berlin.\nBob\n")
    assert predict_main(["--model", str(ner_dir), "--input", str(path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["line"] for x in lines] == [1, 2] and all(isinstance(x["prediction"], list) for x in lines)


def test_predict_main_names_file_and_line_of_a_bad_input(cls_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        predict_main(["--model", str(cls_dir), "--input", str(path)])
    path.write_text('{"text": "fine"}\n\n{"question": "wrong task", "context": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: field 'text' is missing"):
        predict_main(["--model", str(cls_dir), "--input", str(path), "--output", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ValueError, match="--top-k applies"):
        predict_main(["--model", str(cls_dir), "--input", str(path), "--task", "feature-extraction", "--top-k", "3"])


def test_cli_reports_a_broken_checkpoint_without_a_traceback(cls_dir, tmp_path, capsys):
    import shutil

    from litebert.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(cls_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "in.txt").write_text("hello\n")
    assert main(["predict", "--model", str(broken), "--input", str(tmp_path / "in.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("litebert predict: error:") and "model.safetensors" in err
