"""Guard rails of an ``--out`` directory: one writer at a time, and a resume that matches the run's record.

``OUT/.lock`` is held with ``flock`` for as long as a run writes there, so a second run on the same directory is
refused with the holder's pid; the kernel drops the lock when its process dies (``kill -9`` included), so a stale
lock is taken over without anyone deleting it. ``OUT/run.yaml`` records the recipe that produced the checkpoints: a
resume whose recipe differs in anything but bookkeeping (how long, how often, how visibly) is refused with the
differences listed, and the record is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..recipe import save_yaml
from .state import CHECKPOINTS, latest_checkpoint

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RECORD_FILE = "run.yaml"
# What a resumed run may change: these steer how long, how often and how visibly it runs, not what it computes.
# Everything else (model, tokenizer, data, optimizer, schedule shape, seed) would make the checkpoints mean
# something else, so a change is refused rather than trusted.
RESUMABLE = {
    "train.max_steps", "train.num_epochs", "train.max_minutes", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep_checkpoints", "train.progress", "train.tensorboard", "train.num_threads",
    "train.early_stopping_patience", "train.resume", "train.eval_batch_size", "train.bf16", "train.precision",
    "data.num_workers", "data.cache_dir",
}

_held: dict[Path, Any] = {}  # lock files this process holds, by resolved directory


def acquire_lock(out_dir: str | os.PathLike) -> None:
    """Hold ``OUT/.lock`` until :func:`release_lock` or the end of the process; re-entrant within a process.

    ``ConfigError`` naming the holder's pid when another live process holds it."""
    out = Path(out_dir)
    key = out.resolve()
    if key in _held:
        return
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - kept open: the open file holds the lock
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the directory is unguarded, as before
        _held[key] = f
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{out}: another litebert run (pid {holder}) is writing into this directory; wait for "
                          f"it to finish or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = f


def release_lock(out_dir: str | os.PathLike) -> None:
    f = _held.pop(Path(out_dir).resolve(), None)
    if f is not None:
        f.close()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every recipe key that differs, bookkeeping keys (:data:`RESUMABLE`) aside."""
    a, b = _flatten(old), _flatten(yaml.safe_load(yaml.safe_dump(new)))  # compare as the record stores values
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE and a.get(k) != b.get(k)]


def claim_run(out_dir: str | os.PathLike, recipe: dict[str, Any], resume: bool = True) -> None:
    """Lock ``OUT`` and record the recipe in ``OUT/run.yaml`` (atomically).

    When ``OUT`` holds a checkpoint to resume from, the recipe must match the record except for bookkeeping keys:
    otherwise ``ConfigError`` lists the differences and nothing is written. With ``resume`` false, the previous
    run's checkpoints and best model are removed, so none of them can be picked up later as this run's."""
    out = Path(out_dir)
    acquire_lock(out)
    record = out / RECORD_FILE
    has_checkpoint = latest_checkpoint(out, cleanup=False) is not None
    if has_checkpoint and resume and record.is_file():
        try:
            old = yaml.safe_load(record.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{record}: unreadable run record ({e}); it describes the checkpoints in {out}, so "
                              "fix or remove it by hand") from None
        changes = recipe_changes(old if isinstance(old, dict) else {}, recipe)
        if changes:
            listing = "\n  ".join(changes)
            raise ConfigError(f"{out} holds checkpoints of a run with another recipe ({record} is kept as it "
                              f"was). Changed:\n  {listing}\nResume with the recorded recipe, use another --out, "
                              "or pass --train.resume false to start over in this directory")
    elif has_checkpoint and not resume:
        log.warning("%s: train.resume is false: removing the previous run's checkpoints and best model", out)
        for name in (CHECKPOINTS, "best"):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(out / name)
    save_yaml(recipe, record)
