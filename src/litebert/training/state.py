"""Atomic checkpoints and exact resume: model tensors, optimizer, scheduler, step, data position, RNG.

A checkpoint directory is written as ``<target>.tmp-<pid>``; the last file written is ``COMPLETE``, a
JSON manifest with the size and sha256 of every other file, then the directory is fsynced and renamed
to ``<target>``. A ``kill -9`` at any point therefore leaves the old complete checkpoint, the new
complete one, or a stray ``.tmp-``/``.old-`` directory that ``latest_checkpoint`` repairs or removes;
a directory without a valid manifest is never loaded.

Layout::

    model.safetensors    model tensors (tied tensors stored as separate copies)
    trainer_state.pt     optimizer, scheduler, RNG states (one per rank under torchrun, with each rank's data
                         position); loads with torch.load(weights_only=True)
    trainer_state.json   step, data_state, extra (human-readable)
    COMPLETE             manifest, written last
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "IncompleteCheckpointError",
    "atomic_save_dir",
    "checkpoint_dir",
    "is_complete",
    "latest_checkpoint",
    "load_latest_good",
    "load_training_state",
    "prune_checkpoints",
    "rank_state",
    "reseed",
    "restore_rng",
    "rng_state",
    "save_training_state",
    "write_training_state",
]

MANIFEST = "COMPLETE"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
JSON_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
_STRAY_RE = re.compile(r"^(?P<base>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


class IncompleteCheckpointError(ValueError):
    """The directory has no valid ``COMPLETE`` manifest, or its files do not match it."""


# --------------------------------------------------------------------------- atomic directories


def _fsync_path(path: Path, directory: bool = False) -> None:
    if directory and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def _write_manifest(root: Path) -> None:
    files = {}
    for p in _files(root):
        _fsync_path(p)
        files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    for d in sorted({p.parent for p in _files(root)} | {root}, key=lambda d: len(d.parts), reverse=True):
        _fsync_path(d, directory=True)
    tmp = root / (MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    _fsync_path(root, directory=True)


def is_complete(path: str | os.PathLike, verify_hashes: bool = False) -> bool:
    """True when ``path`` has a ``COMPLETE`` manifest and every listed file exists with its size
    (and, with ``verify_hashes``, its sha256)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        for rel, meta in files.items():
            f = path / rel
            if not f.is_file() or f.stat().st_size != meta["size"]:
                return False
            if verify_hashes and _sha256(f) != meta["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def atomic_save_dir(target_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on clean exit, seal it with a manifest and move it to ``target_dir``.

    An existing ``target_dir`` is first renamed to ``<target>.old-<pid>`` and removed after the new one
    is in place. On an exception the temporary directory is removed and ``target_dir`` is untouched.
    """
    target = Path(target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(target.parent, directory=True)
    if old is not None:
        _remove_checkpoint(old)


def _remove_checkpoint(path: Path) -> None:
    # Drop the manifest first so a half-deleted directory can never pass is_complete().
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _recover_strays(parent: Path) -> None:
    """Finish or undo atomic saves whose writer died (its pid is gone).

    A sealed ``.tmp-`` whose target is missing died between the two renames: it is the newest
    checkpoint, so it takes the target name. Failing that, a sealed ``.old-`` is put back. Everything
    else stray is deleted. Writers on other hosts sharing the filesystem cannot be told apart from dead
    ones, so only call this where a single host writes.
    """
    strays = []
    for entry in parent.iterdir():
        m = _STRAY_RE.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m["pid"])):
            strays.append((0 if m["kind"] == "tmp" else 1, entry, parent / m["base"]))
    for _, entry, base in sorted(strays):
        try:
            if not base.exists() and is_complete(entry):
                os.replace(entry, base)
            else:
                _remove_checkpoint(entry)
        except OSError:
            pass  # another process (e.g. a second rank) got there first


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and current-CUDA-device generator states as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": (int(version), tuple(int(x) for x in internal), gauss),
        # weights_only loading refuses numpy arrays: store the MT19937 key as an int64 tensor.
        "numpy": (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # Current device only: get_rng_state_all() would create a context on every GPU of the host.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any] | None) -> None:
    """Restore generator states from ``rng_state()`` output or a dict from ``load_training_state``."""
    rng = state.get("rng", state) if state is not None else None
    if rng is None:
        raise ValueError("checkpoint has no RNG state (saved with rng=False)")
    version, internal, gauss = rng["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())


def reseed(seed: int, rank: int, step: int) -> None:
    """Fresh random streams, distinct per rank and step, for a resumed rank that cannot continue its saved ones."""
    value = (seed * 1_000_003 + step) * 1009 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


# --------------------------------------------------------------------------- save / load


def _untie(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied embeddings/decoder); store copies.
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(key)
        out[name] = t
    return out


def _state_dict(obj: Any) -> Any:
    if obj is None:
        return None
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def write_training_state(
    directory: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer: Any = None,
    scheduler: Any = None,
    step: int,
    data_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
    rank_states: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write the training-state files into an existing directory (use inside ``atomic_save_dir``).

    ``optimizer``/``scheduler`` are objects with ``state_dict()`` or state dicts. ``data_state`` and
    ``extra`` must be JSON-serializable (tuples come back as lists). ``rank_states``: under torchrun, every
    rank's ``{"rng": rng_state(), "data_state": ...}`` in rank order (see :func:`rank_state`).
    """
    directory = Path(directory)
    payload = json.dumps({"step": int(step), "data_state": dict(data_state or {}), "extra": dict(extra or {})},
                         indent=2, sort_keys=True)
    safetensors.torch.save_file(_untie(model_state), str(directory / MODEL_FILE), metadata={"format": "pt"})
    torch.save(
        {"step": int(step), "optimizer": _state_dict(optimizer), "scheduler": _state_dict(scheduler),
         "rng": rng_state() if rng else None,
         "ranks": [dict(r) for r in rank_states] if rank_states is not None else None},
        directory / STATE_FILE,
    )
    (directory / JSON_FILE).write_text(payload + "\n")


def save_training_state(
    directory: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer: Any = None,
    scheduler: Any = None,
    step: int,
    data_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
    rank_states: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Atomically write a resumable checkpoint to ``directory`` (replacing one already there)."""
    with atomic_save_dir(directory) as tmp:
        write_training_state(tmp, model_state=model_state, optimizer=optimizer, scheduler=scheduler, step=step,
                             data_state=data_state, extra=extra, rng=rng, rank_states=rank_states)
    return Path(directory)


def load_training_state(
    directory: str | os.PathLike, map_location: str | torch.device = "cpu", verify_hashes: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by ``save_training_state``; refuses directories that are not sealed.

    Returns ``model_state, optimizer_state, scheduler_state, step, data_state, extra, rng, ranks``. The RNG is
    not touched; call ``restore_rng(state)`` for that. Pickled objects other than tensors and plain
    containers are refused (``torch.load(weights_only=True)``).
    """
    directory = Path(directory)
    if not is_complete(directory, verify_hashes=verify_hashes):
        raise IncompleteCheckpointError(f"{directory} is not a complete checkpoint (missing or mismatched {MANIFEST})")
    meta = json.loads((directory / JSON_FILE).read_text())
    blob = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    device = str(map_location) if not isinstance(map_location, torch.device) else map_location.type
    return {
        "model_state": safetensors.torch.load_file(str(directory / MODEL_FILE), device=device),
        "optimizer_state": blob["optimizer"],
        "scheduler_state": blob["scheduler"],
        "step": int(meta["step"]),
        "data_state": meta["data_state"],
        "extra": meta["extra"],
        "rng": blob["rng"],
        "ranks": blob.get("ranks"),
    }


def rank_state(state: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's ``{"rng", "data_state"}`` from ``load_training_state`` output, when the checkpoint holds one
    per rank of a job of the same size (or is a single process's, resumed by a single process); else None: the
    ranks of a job of another size cannot continue the saved streams exactly."""
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) == world_size:
        return dict(ranks[rank])
    if ranks is None and world_size == 1 and state.get("rng") is not None:
        return {"rng": state["rng"], "data_state": state.get("data_state") or {}}
    return None


# --------------------------------------------------------------------------- run directories


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """``run_dir/checkpoints/step-XXXXXXXX``."""
    return Path(run_dir) / CHECKPOINTS / f"step-{int(step):08d}"


def _complete_checkpoints(run_dir: str | os.PathLike, cleanup: bool) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    if cleanup:
        _recover_strays(root)
    found = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and is_complete(entry):
            found.append((int(m[1]), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, cleanup: bool = True) -> Path | None:
    """The complete ``run_dir/checkpoints/step-*`` with the highest step, or None.

    Incomplete directories are skipped. With ``cleanup``, stray ``.tmp-``/``.old-`` directories left by
    dead writers are first promoted (when sealed and their target is missing) or removed.
    """
    found = _complete_checkpoints(run_dir, cleanup)
    return found[-1][1] if found else None


def load_latest_good(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
                      ) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that passes full verification (sha256 of every file) and loads, with its state.

    A sealed checkpoint whose files were altered afterwards (bit rot, a disk that lied about a flush, a hand edit)
    is renamed ``step-N.corrupt`` (kept for inspection, never picked again) and the previous one is tried."""
    for _, path in reversed(_complete_checkpoints(run_dir, cleanup=True)):
        # Only files that no longer match their manifest count as corrupt: a checkpoint that verifies but fails to
        # load (another torch, no memory) is an error to see, not a reason to discard it.
        if is_complete(path, verify_hashes=True):
            return path, load_training_state(path, map_location=map_location, verify_hashes=False)
        corrupt = path.with_name(path.name + ".corrupt")
        logging.getLogger(__name__).warning("%s fails its sha256 check; moved to %s, falling back to the previous "
                                            "checkpoint", path, corrupt.name)
        with contextlib.suppress(OSError):
            if corrupt.exists():
                shutil.rmtree(corrupt)
            os.replace(path, corrupt)
    return None, None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-step complete checkpoints; return the removed paths.

    Incomplete ``step-*`` directories are left alone (nothing here wrote them).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = _complete_checkpoints(run_dir, cleanup=True)
    removed = [path for _, path in found[:-keep]]
    for path in removed:
        _remove_checkpoint(path)
    return removed
