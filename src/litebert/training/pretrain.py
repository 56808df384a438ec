"""``litebert pretrain``: MLM + sentence-order prediction from raw text, on one process or under torchrun.

Recipe sections (defaults below < ``--config`` YAML < ``--section.key value`` flags):

- ``model``: ``preset`` (e.g. ``albert-base``) plus any encoder config field to override, or ``init_from`` a
  model directory to continue pre-training.
- ``tokenizer``: ``path`` of an existing tokenizer, or the settings to train one (``kind``, ``vocab_size``...)
  on ``files`` (default: the training files). A trained tokenizer is saved under ``OUT/tokenizer``.
- ``data``: ``train`` and ``validation`` files (globs, directories, .txt or .jsonl) and the example settings of
  :class:`~litebert.data.pretraining.PretrainingConfig`.
- ``train``: :class:`~litebert.training.loop.TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from torch import Tensor, nn

from ..config import ConfigError, preset
from ..data.corpus import expand_paths
from ..data.pretraining import PretrainingConfig, build_pretraining_loader
from ..heads import EncoderForMaskedLM, EncoderForPreTraining, from_pretrained
from ..recipe import build, resolve
from ..runtime import current_process
from ..tokenizer import LiteTokenizer, load_tokenizer, train_tokenizer
from .accel import pin_memory
from .loop import TrainConfig, init_distributed, train
from .rundir import claim_run, release_lock
from .state import MANIFEST, atomic_save_dir, is_complete

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "sentence_order_label")


def default_recipe() -> dict[str, Any]:
    data = {"train": [], "validation": [], "cache_dir": None, "eval_batches": 20, "num_workers": 0,
            **dataclasses.asdict(PretrainingConfig())}
    return {
        "model": {"preset": "albert-base", "init_from": None},
        "tokenizer": {"path": None, "kind": "unigram", "vocab_size": 30000, "lowercase": True, "min_frequency": 2,
                      "files": None},
        "data": data,
        "train": dataclasses.asdict(TrainConfig()),
    }


# -- objective and evaluation -----------------------------------------------------------------------------------
def pretraining_objective(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Masked LM (+ SOP when the batch has sentence-order labels). Returns the summed loss and each term."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if not isinstance(_unwrap(model), EncoderForPreTraining):
        inputs.pop("sentence_order_label", None)
    out = model(**inputs)
    return {"loss": out.loss, **out.losses}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def make_evaluator(batches: list[dict[str, Tensor]]):
    """MLM accuracy / loss / perplexity and SOP accuracy on fixed held-out batches, plus the accuracy of always
    predicting the most frequent masked token (the unigram baseline MLM accuracy must beat)."""
    counts = Counter()
    for b in batches:
        counts.update(b["labels"][b["labels"] != -100].tolist())
    baseline = counts.most_common(1)[0][1] / max(1, sum(counts.values())) if counts else 0.0

    def evaluate(model: nn.Module) -> dict[str, float]:
        correct = total = sop_correct = sop_total = 0
        nll = 0.0
        device = next(model.parameters()).device
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            sop = inputs.pop("sentence_order_label", None)
            out = model.encoder(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            labels = inputs["labels"]
            selected = labels != -100
            logits = model.mlm_head(out.last_hidden_state[selected], model.encoder.word_embeddings.weight).float()
            target = labels[selected]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            total += target.numel()
            if sop is not None and isinstance(model, EncoderForPreTraining):
                sop_logits = model.sentence_head(out.pooler_output)
                sop_correct += int((sop_logits.argmax(-1) == sop).sum())
                sop_total += sop.numel()
        result = {"mlm_acc": correct / max(1, total), "mlm_loss": nll / max(1, total),
                  "unigram_baseline_acc": baseline}
        result["perplexity"] = float(torch.tensor(result["mlm_loss"]).exp())
        if sop_total:
            result["sop_acc"] = sop_correct / sop_total
        return result

    return evaluate


# -- set-up -----------------------------------------------------------------------------------------------------
def _files(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _usable_tokenizer_dir(tok_dir: Path) -> bool:
    """A sealed (manifest-verified) tokenizer directory, or one written before directories were sealed whose
    ``tokenizer.json`` loads: that one is re-sealed from ``tokenizer.json`` (the other files derive from it, and a
    kill used to leave them torn). Anything else is trained again."""
    if is_complete(tok_dir, verify_hashes=True):
        return True
    if not (tok_dir / "tokenizer.json").is_file() or (tok_dir / MANIFEST).exists():
        return False
    try:
        tok = LiteTokenizer(Tokenizer.from_file(str(tok_dir / "tokenizer.json")))
    except Exception:  # noqa: BLE001 - a torn tokenizer.json: train a new one
        return False
    with atomic_save_dir(tok_dir) as tmp:
        tok.save(tmp)
    log.warning("%s: re-wrote the tokenizer files from its tokenizer.json (the directory was not sealed)", tok_dir)
    return True


def prepare_tokenizer(section: dict[str, Any], train_files: list[str], out_dir: Path, rank: int) -> LiteTokenizer:
    if section["path"]:
        return load_tokenizer(section["path"])
    tok_dir = out_dir / "tokenizer"
    if rank == 0 and not _usable_tokenizer_dir(tok_dir):
        files = [str(p) for p in expand_paths(_files(section["files"]) or train_files)]
        log.info("training a %s tokenizer (vocab %d) on %d file pattern(s)", section["kind"], section["vocab_size"],
                 len(files))
        # Written whole or not at all: a resume reads every file of it, so a kill mid-save must not leave a torn one.
        with atomic_save_dir(tok_dir) as tmp:
            train_tokenizer(files, kind=section["kind"], vocab_size=section["vocab_size"],
                            lowercase=section["lowercase"], min_frequency=section["min_frequency"], out_dir=tmp)
    if dist.is_initialized():
        dist.barrier()
    return load_tokenizer(tok_dir)


def build_model(section: dict[str, Any], tokenizer: LiteTokenizer, sop: bool) -> nn.Module:
    section = dict(section)
    init_from = section.pop("init_from", None)
    name = section.pop("preset", "albert-base")
    task = "pretraining" if sop else "masked-lm"
    if init_from:
        model = from_pretrained(init_from, task=task)
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ConfigError(f"model.init_from: the model's vocab_size ({model.config.vocab_size}) differs from the "
                              f"tokenizer's ({tokenizer.vocab_size})")
        return model
    config = preset(name, **{"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.pad_token_id, **section})
    if sop and config.model_type == "distilbert":
        raise ConfigError("data.sop: DistilBERT has no sentence-order head; set data.sop false for MLM only")
    return (EncoderForPreTraining if sop else EncoderForMaskedLM)(config)


def run_pretraining(recipe: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Pre-train as the recipe says; returns the final metrics (also written to ``OUT/metrics.json``)."""
    out_dir = Path(out_dir)
    rank, world = init_distributed()
    data = dict(recipe["data"])
    train_files, val_files = _files(data.pop("train")), _files(data.pop("validation"))
    if not train_files:
        raise ConfigError("data.train: no training files given (e.g. --data.train 'corpus/*.txt')")
    cache_dir, eval_batches, num_workers = data.pop("cache_dir"), data.pop("eval_batches"), data.pop("num_workers")
    ex_cfg = build(PretrainingConfig, data, "data")
    train_cfg = build(TrainConfig, recipe["train"], "train")
    if rank == 0:
        claim_run(out_dir, recipe, train_cfg.resume)
    tokenizer = prepare_tokenizer(recipe["tokenizer"], train_files, out_dir, rank)
    torch.manual_seed(train_cfg.seed)
    model = build_model(recipe["model"], tokenizer, ex_cfg.sop)
    if rank == 0:
        log.info("%s: %.2fM parameters", type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)

    cache = Path(cache_dir) if cache_dir else out_dir / "cache"
    pin = pin_memory(train_cfg.pin_memory, current_process().device)
    loader = build_pretraining_loader(train_files, tokenizer, ex_cfg, batch_size=train_cfg.batch_size, rank=rank,
                                      world_size=world, num_workers=num_workers, cache_dir=cache, drop_last=True,
                                      pin_memory=pin)
    if not val_files:
        log.warning("data.validation is empty: evaluating on training text (figures will be optimistic)")
    eval_cfg = dataclasses.replace(ex_cfg, dynamic_masking=False, shuffle_buffer=0, seed=ex_cfg.seed + 1)
    eval_loader = build_pretraining_loader(val_files or train_files, tokenizer, eval_cfg,
                                           batch_size=train_cfg.batch_size, rank=rank, world_size=world,
                                           cache_dir=cache)
    held_out = []
    for batch in eval_loader:
        held_out.append(batch)
        if len(held_out) >= eval_batches:
            break

    def save_final(m: nn.Module, d: Path) -> None:
        m.save_pretrained(d, tokenizer=tokenizer)

    summary = train(model, pretraining_objective, loader, train_cfg, out_dir, evaluate=make_evaluator(held_out),
                    save_final=save_final)
    release_lock(out_dir)
    return summary


def pretrain_main(argv: list[str]) -> int:
    """litebert pretrain [--config FILE.yaml] --out DIR [--section.key value ...]"""
    parser = argparse.ArgumentParser(
        prog="litebert pretrain",
        description="Pre-train an encoder (ALBERT by default) with MLM + sentence-order prediction.",
        epilog="Any recipe key can be set as --section.key value, e.g. --train.max_steps 200 --data.train "
               "'corpus/*.txt' --model.preset albert-base --model.num_hidden_layers 6. See configs/pretrain-*.yaml.",
    )
    parser.add_argument("--config", help="YAML recipe (sections model, tokenizer, data, train)")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds checkpoints)")
    args, rest = parser.parse_known_args(argv)
    recipe = resolve(default_recipe(), args.config, rest)
    summary = run_pretraining(recipe, args.out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        import json

        print(json.dumps(summary))
        print(f"model: {Path(args.out) / 'final'}\nmetrics: {Path(args.out) / 'metrics.jsonl'}\n"
              f"curves: {Path(args.out) / 'curves.png'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
