"""Results that used to be wrong without an error (issue 17): rare labels carved out of training, entities cut
inside words, no multiple-choice pipeline."""

from __future__ import annotations

import pytest
import torch

import litebert
from litebert.data.tasks import TokenExample, split_train_test
from litebert.inference.pipeline import MultipleChoicePipeline, TokenClassificationPipeline, pipeline
from litebert.tokenizer import load_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "me", "##t", "alice", ",", "in", "paris", "who", "is",
         "she", "a", "b", "c", "?"]


@pytest.fixture()
def tok(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return load_tokenizer(tmp_path / "vocab.txt")


def test_carved_split_keeps_rare_tags_in_training():
    common = [TokenExample(["alice", "in", "paris"], ["B-PER", "O", "B-LOC"], "f", i) for i in range(19)]
    rare = TokenExample(["new", "york"], ["B-geo-loc", "I-geo-loc"], "f", 99)
    examples = [*common[:7], rare, *common[7:]]
    for seed in range(5):
        parts = split_train_test(examples, 0.3, seed=seed, validation_fraction=0.3)
        assert rare in parts.train
        assert len(parts.validation) + len(parts.test) >= 10  # the rest is still held out


def _ner_pipeline(tok, strategy):
    config = litebert.preset("bert-test", vocab_size=len(VOCAB), id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    pipe = TokenClassificationPipeline(litebert.EncoderForTokenClassification(config), tok,
                                       aggregation_strategy=strategy)
    # [CLS] me ##t alice , [SEP]: "me" looks like a person, "##t" does not; alice is one.
    probs = torch.tensor([[1.0, 0, 0], [0.3, 0.6, 0.1], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [1.0, 0, 0],
                          [1.0, 0, 0]])
    pipe._run = lambda forward, rows: [probs[: len(r["input_ids"])] for r in rows]
    return pipe


@pytest.mark.parametrize("strategy,expected", [
    ("first", [("PER", "met", 0.6), ("PER", "alice", 0.8)]),
    ("max", [("PER", "alice", 0.8)]),  # the most confident piece of "met" is "##t" (O, 0.9)
    ("average", [("PER", "alice", 0.8)]),  # mean of me/##t: O 0.6 > B-PER 0.325
    ("simple", [("PER", "me", 0.6), ("PER", "alice", 0.8)]),  # pieces, not words: the old default
])
def test_token_classification_groups_words_not_pieces(tok, strategy, expected):
    assert tok.tokenize("met alice,") == ["me", "##t", "alice", ","]
    out = _ner_pipeline(tok, strategy)("met alice,")
    got = [(e["entity_group"], e["word"], round(e["score"], 3)) for e in out]
    assert got == expected


def test_multiple_choice_pipeline_scores_each_choice(tok, tmp_path):
    torch.manual_seed(0)
    model = litebert.EncoderForMultipleChoice(litebert.preset("bert-test", vocab_size=len(VOCAB)))
    model.save_pretrained(tmp_path / "mc", tokenizer=tok)
    pipe = pipeline(model=str(tmp_path / "mc"))
    assert isinstance(pipe, MultipleChoicePipeline)
    item = {"question": "who is she ?", "choices": ["alice", "paris", "a b c"], "context": "alice in paris"}
    out = pipe(item)
    assert set(out) == {"label", "choice", "score", "scores"} and len(out["scores"]) == 3
    assert out["choice"] == item["choices"][out["label"]]
    assert abs(sum(out["scores"]) - 1) < 1e-5
    from litebert.data.tasks import MCExample, prepare_multiple_choice_features

    feat = prepare_multiple_choice_features([MCExample(item["question"], item["choices"], None, "x", 1,
                                                       item["context"])], tok, 64)[0]
    with torch.no_grad():
        ref = pipe.model(**{k: torch.tensor([feat[k]]) for k in ("input_ids", "attention_mask",
                                                                 "token_type_ids")}).logits.softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(out["scores"]), ref)
    assert len(pipe([item, {**item, "choices": ["a", "b"]}])) == 2
    for bad, match in (({"question": "q", "choices": ["one"]}, "at least two strings"),
                       ({"question": 3, "choices": ["a", "b"]}, "'question' is a int"),
                       ("text", "expected an object")):
        with pytest.raises(ValueError, match=match):
            pipe(bad)
