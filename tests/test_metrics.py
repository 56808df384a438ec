"""Metrics against hand-computed values (no sklearn/scipy in the venv); the arithmetic is in the comments."""

import math

import numpy as np
import pytest
import torch

from litebert.evaluation import (
    _rank,
    accuracy,
    entity_f1,
    f1_score,
    matthews_corrcoef,
    pearson,
    perplexity,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_normalize,
    squad_scores,
)

# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("wrap", [list, np.array, torch.tensor])
def test_accuracy_accepts_lists_arrays_tensors(wrap):
    assert accuracy(wrap([1, 0, 1, 1]), wrap([1, 1, 1, 0])) == 0.5


def test_binary_f1_depends_on_pos_label():
    preds, labels = [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]
    # class 1: tp=1 fp=1 fn=0 -> 2/3; class 0: tp=4 fp=0 fn=1 -> 8/9
    assert f1_score(preds, labels) == pytest.approx(2 / 3)
    assert f1_score(preds, labels, pos_label=0) == pytest.approx(8 / 9)
    assert f1_score(preds, labels, average="macro") == pytest.approx((2 / 3 + 8 / 9) / 2)
    assert f1_score(preds, labels, average="micro") == pytest.approx(5 / 6)


def test_multiclass_f1():
    preds, labels = torch.tensor([0, 1, 2, 2, 1, 0]), np.array([0, 2, 2, 1, 1, 0])
    # class 0: perfect (1.0); classes 1 and 2: tp=1 fp=1 fn=1 -> 0.5 each
    assert f1_score(preds, labels, average="macro") == pytest.approx(2 / 3)
    assert f1_score(preds, labels, average="micro") == pytest.approx(4 / 6)
    # a class only predicted still counts in the macro mean (sklearn: union of labels): (2/3 + 0) / 2
    assert f1_score([0, 3], [0, 0], average="macro") == pytest.approx(1 / 3)
    # no positive predicted or present: 0 rather than a division error
    assert f1_score([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="average"):
        f1_score([0], [0], average="weighted")


def test_matthews_corrcoef():
    # binary TP=1 FP=1 TN=4 FN=0: (1*4 - 1*0) / sqrt(2*1*5*4)
    assert matthews_corrcoef([1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]) == pytest.approx(4 / math.sqrt(40))
    # 3 classes, true/pred counts all 2, trace 4, n 6: (4*6 - 12) / sqrt((36-12)(36-12)) = 0.5
    assert matthews_corrcoef([0, 1, 2, 2, 1, 0], [0, 2, 2, 1, 1, 0]) == pytest.approx(0.5)
    assert matthews_corrcoef([2, 0, 1], [2, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction: undefined -> 0


@pytest.mark.parametrize("fn", [accuracy, f1_score, matthews_corrcoef, pearson, spearman])
def test_empty_and_mismatched_inputs_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="length"):
        fn([1, 0], [1, 0, 1])


# --------------------------------------------------------------------------- correlation


def test_pearson():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    # centred a=[-1,0,1], b=[-1,1,0]: a.b=1, |a|^2=|b|^2=2
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), np.array([1, 3, 2])) == pytest.approx(0.5)
    assert math.isnan(pearson([3, 3, 3], [1, 2, 3]))  # constant input: nan, as scipy


def test_spearman_average_ranks_for_ties():
    np.testing.assert_array_equal(_rank(np.array([10, 20, 10, 30])), [1.5, 3, 1.5, 4])
    # ranks x=[1,2.5,2.5,4], y=[1,2,3,4]; centred a.b=4.5, |a|^2=4.5, |b|^2=5 -> 4.5/sqrt(22.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [9, 5, 2, 0]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1], [1, 2]))


# --------------------------------------------------------------------------- entity F1


def test_entity_f1_perfect_and_partial():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    # LOC predicted one token too long: that entity is wrong as a whole
    pred = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-ORG"]]
    out = entity_f1(gold, pred)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert out["per_type"]["PER"]["f1"] == 1.0


def test_entity_f1_boundaries():
    # adjacent same-type entities are two; B-PER I-PER is one: 0 correct of 1 predicted, 2 gold
    out = entity_f1([["B-PER", "B-PER"]], [["B-PER", "I-PER"]])
    assert (out["precision"], out["recall"], out["f1"]) == (0.0, 0.0, 0.0)
    # an I- after O opens an entity (conlleval), so IOB1-style predictions match BIO gold
    assert entity_f1([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]])["f1"] == 1.0
    # an I- of another type opens a new entity: PER(0,0) + LOC(1,1)
    assert entity_f1([["B-PER", "B-LOC"]], [["B-PER", "I-LOC"]])["f1"] == 1.0
    # IOB1: I I B of one type is two entities
    assert entity_f1([["B-PER", "I-PER", "B-PER"]], [["I-PER", "I-PER", "B-PER"]])["f1"] == 1.0
    # entities end at the sequence boundary
    out = entity_f1([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
    assert out["f1"] == 1.0 and out["per_type"]["PER"]["support"] == 2
    # IOBES
    assert entity_f1([["S-PER", "B-LOC", "E-LOC", "O"]], [["B-PER", "B-LOC", "I-LOC", "O"]])["f1"] == 1.0


def test_entity_f1_no_entities_and_errors():
    out = entity_f1([["O", "O"]], [["O", "O"]])
    assert out["f1"] == 0.0 and out["per_type"] == {}
    with pytest.raises(ValueError, match="empty"):
        entity_f1([], [])
    with pytest.raises(ValueError, match="sequence 0"):
        entity_f1([["O"]], [["O", "O"]])
    with pytest.raises(ValueError, match="malformed tag"):
        entity_f1([["PER"]], [["O"]])


# --------------------------------------------------------------------------- SQuAD


def test_squad_normalize():
    assert squad_normalize("The Cat!") == "cat"
    assert squad_normalize("  A  quick, brown fox.  ") == "quick brown fox"
    assert squad_normalize("an apple and THE pie") == "apple and pie"
    assert squad_normalize("theater anew") == "theater anew"  # articles only as whole words


def test_squad_em_f1():
    assert squad_exact_match("The Cat!", ["cat"]) == 1.0
    assert squad_exact_match("cat", ["dog", "Cat."]) == 1.0
    assert squad_exact_match("cats", "cat") == 0.0
    # pred [quick, brown, fox] vs gold [quick, fox, jumps]: 2 shared -> P = R = 2/3
    assert squad_f1("the quick brown fox", ["quick fox jumps"]) == pytest.approx(2 / 3)
    assert squad_f1("the quick brown fox", ["zebra", "quick fox jumps", "brown"]) == pytest.approx(2 / 3)
    # SQuAD v2: no gold answer means unanswerable; only the empty prediction matches
    assert squad_exact_match("", []) == 1.0 and squad_f1("", []) == 1.0
    assert squad_exact_match("a cat", []) == 0.0 and squad_f1("a cat", []) == 0.0
    assert squad_f1("", ["cat"]) == 0.0


def test_squad_scores_percent_and_missing_predictions():
    preds = {"q1": "cat", "q2": "a dog", "extra": "ignored"}
    answers = {"q1": ["The cat"], "q2": ["dog house"], "q3": ["x"]}
    # q1 EM 1 F1 1; q2 EM 0, F1 2*1*0.5/1.5 = 2/3; q3 missing -> 0
    out = squad_scores(preds, answers)
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="empty"):
        squad_scores({}, {})


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(torch.tensor(math.log(5.0))) == pytest.approx(5.0)
    assert perplexity(1e6) == math.inf
