"""`litebert finetune` / `litebert evaluate` end to end on a tiny random BERT with a tiny WordPiece vocabulary:
every task, best checkpoint, early stopping, layer-wise LR decay, resume after a crash, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import litebert
from litebert.config import ConfigError
from litebert.recipe import resolve
from litebert.tokenizer import train_tokenizer
from litebert.training import finetune, loop
from litebert.training.finetune import default_recipe, evaluate_main, finetune_main, resolve_path, run_finetune

GOOD = ["good", "great", "fine", "superb", "lovely", "brilliant"]
BAD = ["bad", "awful", "poor", "dull", "boring", "terrible"]
FILLER = ["the", "film", "movie", "was", "plot", "acting", "very", "quite", "story", "and", "a", "it"]
ENTITIES = {"PER": ["alice", "bob", "carol"], "LOC": ["paris", "london", "tokyo"]}

# Few steps, fp32 (exact comparisons), evaluate every 2 steps, no progress bar / tensorboard.
FAST = ["--train.max_steps", "6", "--train.batch_size", "8", "--train.eval_every", "2", "--train.log_every", "1",
        "--train.precision", "fp32", "--train.progress", "false", "--train.tensorboard", "false", "--train.lr", "1e-3",
        "--data.max_seq_length", "32"]


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 5) + [rng.choice(GOOD if label else BAD)]
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT (H=32) and a WordPiece vocabulary trained on the words the tests use."""
    root = tmp_path_factory.mktemp("tiny")
    corpus = root / "corpus.txt"
    words = GOOD + BAD + FILLER + [w for ws in ENTITIES.values() for w in ws] + ["who", "where", "lives", "in", "?"]
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(300)))
    out = root / "model"
    tok = train_tokenizer([corpus], kind="wordpiece", vocab_size=200, min_frequency=1, out_dir=out)
    torch.manual_seed(0)
    config = litebert.preset("bert-test", vocab_size=tok.vocab_size, num_hidden_layers=2, hidden_dropout_prob=0.1)
    litebert.BertModel(config).save_pretrained(out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["sentence,label,source"]
    for i in range(160):
        label = i % 2
        rows.append(f"{_sentence(rng, label)},{'pos' if label else 'neg'},{'rt' if i < 140 else 'other'}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _run(model_dir: Path, out: Path, task: str, train: Path, *flags: str, validation: Path | None = None) -> dict:
    args = ["--model.path", str(model_dir), "--model.task", task, "--data.train", str(train), *FAST, *flags]
    if validation is not None:
        args += ["--data.validation", str(validation)]
    return run_finetune(resolve(default_recipe(), None, args), out)


def _evaluate(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert evaluate_main([*argv, "--precision", "fp32"]) == 0
    return json.loads(capsys.readouterr().out)


def _eval_rows(out: Path) -> list[dict]:
    return [r for r in loop.read_metrics(out / "metrics.jsonl") if any(k.startswith("eval_") for k in r)]


# -- classification: the whole command ---------------------------------------------------------------------------
@pytest.mark.slow
def test_classification_cli_best_model_and_evaluate(model_dir, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--task", "classification", "--train", str(sentiment_csv), "--out", str(out),
            "--data.text_column", "sentence", "--data.filter", "{source: rt}", *FAST, "--train.max_steps", "10"]
    assert finetune_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    for name in ("run.yaml", "metrics.jsonl", "metrics.json", "curves.png", "final/config.json", "final/tokenizer.json",
                 "final/litebert_finetune.json", "best/model.safetensors", "best/best.json", "data/test.jsonl",
                 "data/validation.jsonl"):
        assert (out / name).exists(), name
    # 140 filtered rows, split 80/10/10 per label
    assert (summary["n_train"], summary["n_validation"], summary["n_test"]) == (112, 14, 14)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}

    # best/ holds the evaluation with the highest accuracy; final/ is the same model
    evals = _eval_rows(out)
    best_acc = max(r["eval_accuracy"] for r in evals)
    first_best = next(r for r in evals if r["eval_accuracy"] == best_acc)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == best_acc and best["step"] == first_best["step"] == summary["best_step"]
    assert summary["best_eval_accuracy"] == best_acc
    a, b = load_file(out / "best" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # evaluate re-scores the carved splits with the saved label map and reader settings
    val = _evaluate(capsys, "--model", str(out / "best"), "--data", str(out / "data" / "validation.jsonl"))
    assert val["n_examples"] == 14 and val["accuracy"] == pytest.approx(best_acc)
    test = _evaluate(capsys, "--model", str(out / "final"), "--task", "classification",
                     "--data", str(out / "data" / "test.jsonl"))
    assert test["accuracy"] == pytest.approx(summary["test_accuracy"]) and {"f1", "mcc"} <= test.keys()


def test_early_stopping_stops_after_patience_evaluations(model_dir, sentiment_csv, tmp_path):
    # A learning rate too small to change the accuracy: the first evaluation stays the best.
    out = tmp_path / "run"
    summary = _run(model_dir, out, "classification", sentiment_csv, "--data.text_column", "sentence",
                   "--train.lr", "1e-12", "--train.max_steps", "40", "--train.early_stopping_patience", "2",
                   "--train.warmup_steps", "0")
    assert summary["stopped_by"] == "early_stopping"
    assert summary["step"] == 6 and summary["best_step"] == 2
    assert [r["step"] for r in _eval_rows(out)] == [2, 4, 6]


def test_layer_decay_gives_each_depth_its_own_lr(model_dir, sentiment_csv, tmp_path, monkeypatch):
    built = []
    real = loop.build_optimizer

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_optimizer", spy)
    _run(model_dir, tmp_path / "run", "classification", sentiment_csv, "--data.text_column", "sentence",
         "--train.layer_decay", "0.5", "--train.max_steps", "2")
    logged = [r["lr"] for r in loop.read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert logged == pytest.approx([5e-4, 0.0])  # the base (head) lr, linear decay from 1e-3 without warmup
    groups = built[0].param_groups
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales == {0: 0.5 ** 3, 1: 0.5 ** 2, 2: 0.5, 3: 1.0}  # embeddings, 2 layers, head + pooler
    assert type(built[0]).__name__ == "AdamW"


def test_crash_keeps_best_and_resume_finishes(model_dir, sentiment_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = ("--data.text_column", "sentence", "--train.max_steps", "8", "--train.save_every", "4")
    calls = {"n": 0}
    real = finetune.task_objective

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(model, batch)

    monkeypatch.setattr(finetune, "task_objective", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(model_dir, out, "classification", sentiment_csv, *flags)
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] in (2, 4, 6)
    litebert.from_pretrained(str(out / "best"))  # loadable as it stands
    monkeypatch.setattr(finetune, "task_objective", real)
    summary = _run(model_dir, out, "classification", sentiment_csv, *flags)  # resumes from step 4
    assert summary["step"] == 8 and (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "best" / "best.json").read_text())["step"] == summary["best_step"]


def test_splits_carve_what_no_file_gives(sentiment_csv, tmp_path):
    spec = finetune.TASKS["classification"]
    data = {**default_recipe()["data"], "train": str(sentiment_csv), "text_column": "sentence"}
    only = finetune.read_splits(spec, data)
    assert (len(only.train), len(only.validation), len(only.test), only.carved) == (128, 16, 16, ("validation", "test"))
    held = _csv(tmp_path / "test.csv", "sentence,label\nthe film was good,pos\n")
    with_test = finetune.read_splits(spec, {**data, "test": str(held)})
    assert (len(with_test.train), len(with_test.validation), len(with_test.test)) == (144, 16, 1)
    assert with_test.carved == ("validation",)
    # the test split depends only on its seed and fraction: a bigger validation split never moves a test row
    assert finetune.read_splits(spec, {**data, "split": {**data["split"], "validation": 0.3}}).test == only.test
    given = finetune.read_splits(spec, {**data, "validation": str(held)})
    assert (len(given.train), len(given.validation), len(given.test), given.carved) == (160, 1, 0, ())


# -- the other tasks ---------------------------------------------------------------------------------------------
def _write_regression(path: Path) -> Path:
    rng = random.Random(2)
    rows = []
    for _ in range(60):
        label = rng.randint(0, 1)
        rows.append(json.dumps({"text": _sentence(rng, label), "label": label * 4.0 + rng.random()}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _write_conll(path: Path, n: int = 60, seed: int = 3) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        for _ in range(rng.randint(3, 7)):
            if rng.random() < 0.3:
                kind = rng.choice(sorted(ENTITIES))
                lines.append(f"{rng.choice(ENTITIES[kind])}\tB-{kind}")
            else:
                lines.append(f"{rng.choice(FILLER)}\tO")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def _squad(path: Path, n: int, version: str = "v2.0", seed: int = 4) -> Path:
    rng = random.Random(seed)
    articles = []
    for i in range(n):
        name, place = rng.choice(ENTITIES["PER"]), rng.choice(ENTITIES["LOC"])
        context = " ".join(rng.choices(FILLER, k=rng.randint(5, 40))) + f" {name} lives in {place} ."
        qas = [{"id": f"q{i}", "question": f"where lives {name} ?",
                "answers": [{"text": place, "answer_start": context.index(f"in {place}") + 3}]}]
        if version == "v2.0" and i % 3 == 0:
            qas.append({"id": f"q{i}-none", "question": "who lives in london ?", "answers": [], "is_impossible": True})
        articles.append({"title": f"t{i}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": version, "data": articles}))
    return path


def _write_mc(path: Path) -> Path:
    rng = random.Random(5)
    rows = []
    for i in range(40):
        choices = [rng.choice(BAD), rng.choice(GOOD), rng.choice(FILLER)]
        rows.append(json.dumps({"id": str(i), "question": "the film was _", "choices": choices, "label": "B"}))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("task,make,metrics", [
    ("regression", _write_regression, {"pearson", "spearman", "mse"}),
    ("ner", _write_conll, {"precision", "recall", "f1", "per_type"}),
    ("qa", lambda p: _squad(p.with_suffix(".json"), 40), {"exact_match", "f1"}),
    ("multiple-choice", _write_mc, {"accuracy"}),
])
def test_each_task_trains_and_evaluates(model_dir, tmp_path, capsys, task, make, metrics):
    data = make(tmp_path / "train.jsonl")
    flags = ["--data.max_seq_length", "64", "--data.doc_stride", "16", "--data.max_query_length", "16"] \
        if task == "qa" else []
    summary = _run(model_dir, tmp_path / "run", task, data, *flags)
    assert summary["step"] == 6 and summary["n_test"] > 0 and summary["best_step"] in (2, 4, 6)
    main = finetune.TASKS[task].metrics[0]
    assert f"test_{main}" in summary and f"best_eval_{main}" in summary
    written = next((tmp_path / "run" / "data").glob("test.*"))
    result = _evaluate(capsys, "--model", str(tmp_path / "run" / "final"), "--data", str(written))
    assert metrics <= result.keys() and result["task"] == task and result["n_examples"] == summary["n_test"]
    assert result[main] == pytest.approx(summary[f"test_{main}"])


def test_qa_long_context_windows_map_answers_back(model_dir, tmp_path, capsys):
    """Contexts longer than one window: with the answers as logits, predictions are the gold text (EM 100)."""
    data = _squad(tmp_path / "squad.json", 12, version="v1.1", seed=7)
    spec = finetune.TASKS["qa"]
    examples = spec.read(str(data), {})
    tok = litebert.tokenizer.load_tokenizer(model_dir)
    settings = {"max_seq_length": 40, "doc_stride": 12, "max_query_length": 16, "max_answer_length": 30}
    features = spec.featurize(examples, tok, None, settings)
    assert len(features) > len(examples)  # some contexts span several windows
    outputs = []
    for f in features:
        logits = torch.full((len(f["input_ids"]), 2), -10.0)
        if f["start_positions"] > 0:
            logits[f["start_positions"], 0] = logits[f["end_positions"], 1] = 10.0
        outputs.append(logits.numpy())
    assert spec.score(examples, features, outputs, None, settings) == {"exact_match": 100.0, "f1": 100.0}


# -- bad input ---------------------------------------------------------------------------------------------------
def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_validation_label_names_file_and_line(model_dir, sentiment_csv, tmp_path):
    val = _csv(tmp_path / "val.csv", "sentence,label\nthe film was good,pos\nthe plot was dull,meh\n")
    with pytest.raises(ValueError, match=rf"{val}:3: unknown label 'meh'; known labels: neg, pos"):
        _run(model_dir, tmp_path / "run", "classification", sentiment_csv, "--data.text_column", "sentence",
             validation=val)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_missing_column_and_empty_text_name_file_and_line(model_dir, sentiment_csv, tmp_path):
    with pytest.raises(ValueError, match=rf"{sentiment_csv}:2: no column 'text'; available columns: sentence"):
        _run(model_dir, tmp_path / "a", "classification", sentiment_csv)
    empty = _csv(tmp_path / "empty.csv", "text,label\nthe film was good,pos\n  ,neg\n")
    with pytest.raises(ValueError, match=rf"{empty}:3: empty text in column 'text'"):
        _run(model_dir, tmp_path / "b", "classification", empty)


def test_qa_answer_not_in_context_names_question(model_dir, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "alice lives in paris .", "qas": [
        {"id": "q7", "question": "where ?", "answers": [{"text": "london", "answer_start": 15}]}]}]}]}))
    with pytest.raises(ValueError, match=rf"{path}: question 'q7': answer 'london' not found at answer_start=15"):
        _run(model_dir, tmp_path / "run", "qa", path)


def test_label_count_mismatch_names_the_field_unless_reset_head(model_dir, sentiment_csv, tmp_path, capsys):
    trained = tmp_path / "two"
    _run(model_dir, trained, "classification", sentiment_csv, "--data.text_column", "sentence",
         "--train.max_steps", "2")
    three = _csv(tmp_path / "three.csv", "text,label\n" + "".join(
        f"the film was {w},{lab}\n" for w, lab in [("good", "pos"), ("bad", "neg"), ("fine", "mixed")] * 10))
    with pytest.raises(ConfigError, match=r"num_labels=2 \(id2label \{0: 'neg', 1: 'pos'\}\).* has 3 labels .*"
                                          r"reset_head"):
        _run(model_dir, tmp_path / "run", "classification", three, "--model.path", str(trained / "final"))
    summary = _run(model_dir, tmp_path / "reset", "classification", three, "--model.path", str(trained / "final"),
                   "--model.reset_head", "true", "--train.max_steps", "2")
    config = json.loads((tmp_path / "reset" / "final" / "config.json").read_text())
    assert summary["step"] == 2 and config["id2label"] == {"0": "mixed", "1": "neg", "2": "pos"}
    # the encoder came from the checkpoint, not a fresh init
    model = litebert.from_pretrained(str(tmp_path / "reset" / "best"))
    assert model.config.num_labels == 3
    # evaluate: a label the checkpoint does not know is named with its file and line
    with pytest.raises(ValueError, match=rf"{three}:4: unknown label 'mixed'; known labels: neg, pos"):
        evaluate_main(["--model", str(trained / "final"), "--data", str(three), "--data.text_column", "text"])


def test_evaluate_refuses_a_model_without_a_trained_head(model_dir, sentiment_csv):
    with pytest.raises(ConfigError, match=r"--model: .* has no trained classification head \(the checkpoint lacks "
                                          r"classifier.weight, classifier.bias\)"):
        evaluate_main(["--model", str(model_dir), "--task", "classification", "--data", str(sentiment_csv)])


def test_pkg_paths_resolve_inside_installed_packages():
    assert Path(resolve_path("pkg:litebert/training")) == Path(finetune.__file__).parent
    assert resolve_path("plain/path") == "plain/path"
    with pytest.raises(ConfigError, match="no installed Python package 'no_such_pkg'"):
        resolve_path("pkg:no_such_pkg/model")


def test_unknown_keys_and_metrics_are_config_errors(model_dir, sentiment_csv, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.num_epochs'"):
        resolve(default_recipe(), None, ["--train.num_epoch", "3"])
    with pytest.raises(ConfigError, match="'pearson' is not a classification metric"):
        _run(model_dir, tmp_path / "run", "classification", sentiment_csv, "--data.text_column", "sentence",
             "--train.metric_for_best", "pearson")
    with pytest.raises(ConfigError, match="model.task: 'clasification' is not a task.*did you mean 'classification'"):
        _run(model_dir, tmp_path / "run", "clasification", sentiment_csv)
