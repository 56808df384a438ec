"""One training loop for pre-training, distillation and fine-tuning.

Read it top to bottom: set up (DDP when launched by torchrun, optimizer, schedule, resume) -> repeat {accumulate
micro-batches under autocast (the precision ``auto`` picks), clip, step, log, evaluate (keep the best model, stop
early), checkpoint} -> write the final model, metrics and curves. What is optimised is an *objective*: a callable ``(model, batch) -> dict`` with a
``loss`` tensor and any other scalars to log. Evaluation is a callable ``(model) -> dict`` of metrics.

With ``metric_for_best`` set, every evaluation that improves that metric rewrites ``OUT/best/`` atomically (a crash
or kill at any moment leaves the previous best or the new one, never a mix); ``early_stopping_patience`` stops after
that many evaluations without improvement; at the end the best weights are loaded back, so ``OUT/final/`` is the best
model. The best value, its step and the evaluations since travel in the resumable checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import atomic_write, load_weights_into
from ..config import ConfigError
from ..runtime import collective_device, ddp_device_args, gather_object, setup_process
from .accel import (
    SWITCHES,
    TRAIN_PRECISIONS,
    apply_tf32,
    autocast_for,
    grad_scaler,
    prepare_model,
    resolve_accel,
    switch,
)
from .optim import build_optimizer, build_scheduler
from .state import (
    _recover_strays,
    atomic_save_dir,
    checkpoint_dir,
    is_complete,
    load_latest_good,
    prune_checkpoints,
    rank_state,
    reseed,
    restore_rng,
    rng_state,
    save_training_state,
)

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, dict[str, Tensor]], dict[str, Tensor]]
Evaluator = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Steps are optimizer updates; batch_size is per process and micro-batch."""

    max_steps: int = 1000
    max_minutes: float | None = None  # stop (and save) after this wall time, whatever max_steps says
    batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = "lamb"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    schedule: str = "linear"
    warmup_steps: int | None = None  # default: warmup_ratio * max_steps
    warmup_ratio: float = 0.05
    power: float = 1.0
    layer_decay: float | None = None
    clip_grad_norm: float | None = 1.0
    # auto | fp32 | bf16 | fp16: auto = bf16 where the hardware runs it natively (fp16 + a gradient scaler on CUDA GPUs
    # without bf16), else fp32
    precision: str = "auto"
    seed: int = 42
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True
    num_threads: int | None = None
    metric_for_best: str | None = None  # an evaluation metric (e.g. "accuracy"); OUT/best/ keeps the model at its best
    greater_is_better: bool | None = None  # default: False for names with loss/mse/perplexity in them, else True
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    # GPU-user switches, each auto / true / false (litebert.training.accel says what auto picks).
    tf32: str | bool = "auto"
    fused_optimizer: str | bool = "auto"
    pin_memory: str | bool = "auto"
    compile: str | bool = "auto"
    activation_checkpointing: str | bool = "auto"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every", "save_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.precision not in ("auto", *TRAIN_PRECISIONS):
            raise ConfigError(f"train.precision must be one of auto, {', '.join(TRAIN_PRECISIONS)}, got "
                              f"{self.precision!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ConfigError(f"train.optimizer must be 'adamw' or 'lamb', got {self.optimizer!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ConfigError(f"train.early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
            if not self.metric_for_best:
                raise ConfigError("train.early_stopping_patience needs train.metric_for_best (the metric to watch)")
        for name in SWITCHES:
            switch(getattr(self, name), name)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * self.max_steps)

    @property
    def maximize(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not any(word in (self.metric_for_best or "") for word in ("loss", "mse", "perplexity"))


@dataclass
class BestTracker:
    """The best value of ``metric_for_best`` so far, its step and evaluation, and evaluations since (JSON-able)."""

    value: float | None = None
    step: int | None = None
    eval: dict[str, float] = field(default_factory=dict)
    evals_since: int = 0

    def update(self, result: dict[str, float], step: int, cfg: TrainConfig) -> bool:
        """Record an evaluation; True when it is a new best. A NaN metric never is."""
        name = cfg.metric_for_best
        if name not in result:
            raise ConfigError(f"train.metric_for_best: {name!r} is not an evaluation metric; the evaluation gives "
                              f"{', '.join(sorted(result))}")
        value = float(result[name])
        better = math.isfinite(value) and (self.value is None or (value > self.value if cfg.maximize
                                                                   else value < self.value))
        if better:
            self.value, self.step, self.eval, self.evals_since = value, step, dict(result), 0
        else:
            self.evals_since += 1
        return better


# -- distributed ------------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """(rank, world_size). Under torchrun, selects this process's GPU and joins the process group (nccl on GPUs,
    gloo on CPUs): see ``litebert.runtime.setup_process``."""
    proc = setup_process()
    return proc.rank, proc.world_size


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64).to(collective_device())
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(keys, t.tolist())}


# -- metrics files ----------------------------------------------------------------------------------------------
class MetricsWriter:
    """``metrics.jsonl`` (one object per log/eval step) and optional TensorBoard events. Rank 0 writes; every rank
    reads what was logged up to the resumed step (they must agree on whether the last evaluation is done)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = is_main_process()
        self.tb = None
        # Rank 0 replaces the file atomically with these same rows, so other ranks read the same either way.
        self.kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        if not self.enabled:
            return
        if self.path.exists():  # a resumed run drops what was logged after its checkpoint
            atomic_write(self.path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in self.kept)))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:
                log.info("tensorboard is not installed; writing metrics.jsonl only (pip install tensorboard)")

    def eval_at(self, step: int) -> dict[str, float]:
        """The evaluation logged at ``step`` before a resume (``eval_`` prefix dropped), or {}."""
        rows = [r for r in self.kept if r.get("step") == step and any(k.startswith("eval_") for k in r)]
        return {k.removeprefix("eval_"): v for k, v in rows[-1].items() if k.startswith("eval_")} if rows else {}

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A torn last line (the process died mid-write) is dropped with a warning; a bad
    line before the end is a ``ValueError`` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for lineno, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not an object")  # noqa: TRY004 - one handler for every bad line
        except ValueError as e:
            if not any(rest.strip() for rest in lines[lineno:]):
                log.warning("%s:%d: dropping a torn last line (the run was killed while writing it)", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e}); fix or delete the line to resume") from None
        rows.append(row)
    return rows


def plot_curves(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """One panel per logged quantity (losses, eval metrics, learning rate) against the step."""
    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    keys = [k for k in keys if k not in ("elapsed_s", "epoch")]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


# -- the loop ---------------------------------------------------------------------------------------------------
def _batches(loader: Iterable, dataset: Any) -> Iterable[dict[str, Tensor]]:
    """Endless batches; each pass over the data is an epoch (``dataset.set_epoch`` reshuffles / remasks)."""
    position = dataset.state_dict() if hasattr(dataset, "state_dict") else {}
    epoch = position.get("epoch", 0)
    resumed_mid_epoch = position.get("examples_yielded", 0) > 0
    while True:
        produced = False
        for batch in loader:
            produced = True
            yield batch
        # A run resumed right at the end of an epoch legitimately finds nothing left in it.
        if not produced and not resumed_mid_epoch:
            raise ValueError("the training data produced no batch (is the corpus smaller than one batch?)")
        resumed_mid_epoch = False
        epoch += 1
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def train(
    model: nn.Module,
    objective: Objective,
    loader: Iterable,
    cfg: TrainConfig,
    out_dir: str | Path,
    evaluate: Evaluator | None = None,
    save_final: Callable[[nn.Module, Path], None] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Train ``model`` on batches from ``loader`` and return the final metrics.

    ``loader.dataset`` may expose ``state_dict()``/``load_state_dict()`` (its position, for exact resume) and
    ``set_epoch(e)``. Only ``model``'s parameters are optimised and checkpointed; an objective may hold other
    modules (distillation's frozen teacher). ``save_final(model, dir)`` writes the final model directory (default:
    ``model.save_pretrained``), and ``OUT/best/`` when ``cfg.metric_for_best`` is set; what it writes must load back
    with ``litebert.checkpoint.load_weights_into`` (``save_pretrained`` does). ``OUT/best/best.json`` records the
    step and the evaluation of the best model.
    """
    out_dir = Path(out_dir)
    proc = setup_process(device)
    rank, world, device = proc.rank, proc.world_size, proc.device
    accel = resolve_accel(cfg, device, cfg.precision, getattr(model, "config", None))
    if device.type == "cuda":
        apply_tf32(accel.tf32)
    if rank == 0:
        log.info("training on %s (%d process%s): %s", device, world, "es" if world > 1 else "", accel.describe())
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed + rank)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    core = prepare_model(model.to(device), accel)
    optimizer = build_optimizer(core, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.eps,
                                layer_decay=cfg.layer_decay,
                                num_layers=getattr(getattr(core, "config", None), "num_hidden_layers", None),
                                fused=accel.fused_optimizer)
    scaler = grad_scaler(accel.precision, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.warmup, cfg.max_steps, power=cfg.power)
    # Whatever knows the data position: a loader that tracks it (with workers), else its dataset.
    dataset = loader if hasattr(loader, "state_dict") else getattr(loader, "dataset", None)

    step = 0
    best = BestTracker()
    best_dir = out_dir / "best"
    save_model = save_final or (lambda m, d: m.save_pretrained(d))
    if rank == 0 and out_dir.is_dir():
        _recover_strays(out_dir)  # a kill between the two renames of a best/ update left best.tmp-PID / best.old-PID
    ckpt, state = load_latest_good(out_dir) if cfg.resume else (None, None)
    if ckpt is not None:
        core.load_state_dict(state["model_state"], strict=False)
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        mine = rank_state(state, rank, world)  # each rank continues its own data position and random streams
        data_state = mine["data_state"] if mine is not None else state["data_state"]
        if data_state and hasattr(dataset, "load_state_dict"):
            dataset.load_state_dict(data_state)
        step = state["step"]
        if mine is not None:
            restore_rng(mine["rng"])
        else:
            reseed(cfg.seed, rank, step)
            if rank == 0:
                log.warning("%s was saved by a job of another size: the ranks start fresh random streams, so this "
                            "run does not continue the saved one exactly", ckpt)
        if state["extra"].get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["extra"]["scaler"])
        if state["extra"].get("best"):
            best = BestTracker(**state["extra"]["best"])
        if rank == 0:
            log.warning("resuming from %s (step %d)", ckpt, step)
    resumed_step = step if ckpt is not None else None

    ddp = proc.backend is not None  # a torchrun job, even of one process: the same path as many
    train_model = nn.parallel.DistributedDataParallel(core, **ddp_device_args(device)) if ddp else core
    metrics = MetricsWriter(out_dir, step, cfg.tensorboard)
    precision = accel.precision
    # A run resumed where it ended has evaluated at this step already (the row is in metrics.jsonl): evaluating
    # again would append a duplicate final row and count an extra evaluation towards early stopping.
    last_eval: dict[str, float] = metrics.eval_at(step) if ckpt is not None else {}
    last_eval_step = step if last_eval else None
    progress = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.max_steps, initial=step, desc=out_dir.name, dynamic_ncols=True)

    def data_position() -> dict[str, Any]:
        return dataset.state_dict() if hasattr(dataset, "state_dict") else {}

    def checkpoint(data_state: dict[str, Any] | None = None) -> None:
        data_state = data_position() if data_state is None else data_state
        # Rank 0 writes every rank's random streams and data position, so each rank resumes its own.
        ranks = gather_object({"rng": rng_state(), "data_state": data_state})
        if rank == 0:
            extra = {"best": asdict(best), **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
            save_training_state(checkpoint_dir(out_dir, step), model_state=core.state_dict(), optimizer=optimizer,
                                scheduler=scheduler, step=step, data_state=data_state, extra=extra, rank_states=ranks)
            prune_checkpoints(out_dir, cfg.keep_checkpoints)
        if ddp:
            dist.barrier()

    def run_eval() -> dict[str, float]:
        if evaluate is None:
            return {}
        train_model.eval()
        with torch.no_grad(), autocast_for(precision, device):
            result = _all_reduce_mean(evaluate(core))
        train_model.train()
        metrics.write(step, {f"eval_{k}": v for k, v in result.items()})
        if cfg.metric_for_best and best.update(result, step, cfg) and rank == 0:
            with atomic_save_dir(best_dir) as tmp:
                save_model(core, tmp)
                (tmp / "best.json").write_text(json.dumps({"step": step, "metric": cfg.metric_for_best,
                                                           "value": best.value, "eval": result}, indent=2) + "\n")
            log.info("step %d: new best %s = %.4g (saved to %s)", step, cfg.metric_for_best, best.value, best_dir)
        return result

    start = time.perf_counter()
    window: dict[str, float] = {}
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    stopped_by = "max_steps"
    batches = iter(_batches(loader, dataset))
    train_model.train()
    step_start: tuple[dict[str, Any], dict[str, Any]] | None = None
    try:
        while step < cfg.max_steps:
            if cfg.max_minutes is not None and time.perf_counter() - start > cfg.max_minutes * 60:
                stopped_by = "max_minutes"
                break
            if cfg.early_stopping_patience and best.evals_since >= cfg.early_stopping_patience:
                stopped_by = "early_stopping"
                log.warning("step %d: no better %s in %d evaluations (best %.4g at step %s); stopping", step,
                            cfg.metric_for_best, best.evals_since, best.value, best.step)
                break
            # Where this step starts (data position, RNG): an interruption mid-step resumes from here exactly.
            step_start = (data_position(), rng_state())
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                # Counted before the copy: on a GPU, reading the count back would wait for the copy.
                window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                batch = _to_device(batch, device)
                sync = not ddp or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast_for(precision, device):
                    out = objective(train_model, batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step + 1}: {loss.item()}")
                scaler.scale(loss / cfg.grad_accum).backward()
                for k, v in out.items():
                    if isinstance(v, Tensor) and v.numel() == 1:
                        window[k] = window.get(k, 0.0) + v.item() / cfg.grad_accum
            grad_norm = None
            if cfg.clip_grad_norm:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                grad_norm = float(torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.clip_grad_norm))
            scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_steps += 1
            if progress is not None:
                progress.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                row = {k: v / window_steps for k, v in window.items()}
                row = _all_reduce_mean(row)
                row.update(lr=max(scheduler.get_last_lr()),  # the base lr: with layer decay, the head's
                           tokens_per_s=window_tokens * world / max(elapsed, 1e-9),
                           elapsed_s=time.perf_counter() - start)
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                metrics.write(step, row)
                if progress is not None:
                    progress.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "lr") if k in row})
                window, window_steps, window_tokens, window_start = {}, 0, 0, time.perf_counter()
            if step % cfg.eval_every == 0:
                last_eval, last_eval_step = run_eval(), step
            if step % cfg.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        log.warning("interrupted at step %d: saving a checkpoint to resume from", step)
        optimizer.zero_grad(set_to_none=True)
        if step_start is not None:
            restore_rng(step_start[1])
        checkpoint(step_start[0] if step_start is not None else None)
        raise
    finally:
        if progress is not None:
            progress.close()

    if last_eval_step != step:
        last_eval = run_eval()
    if step % cfg.save_every and step != resumed_step:
        checkpoint()
    metrics.close()
    summary = {"step": step, "stopped_by": stopped_by, "train_seconds": round(time.perf_counter() - start, 1),
               "device": str(device), "world_size": world, "precision": precision,
               **{f"eval_{k}": v for k, v in last_eval.items()}}
    if cfg.metric_for_best and best.step is not None:
        summary.update(best_step=best.step, best_metric=cfg.metric_for_best,
                       **{f"best_eval_{k}": v for k, v in best.eval.items()})
        if ddp:
            dist.barrier()  # rank 0 may still be writing best/
        if best.step != step:  # the final model is the best one
            if not is_complete(best_dir):
                raise RuntimeError(f"{best_dir} is missing or incomplete; the best model (step {best.step}) is lost")
            load_weights_into(core, best_dir)
    rows = read_metrics(out_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    if train_rows:
        summary["final_train_loss"] = train_rows[-1]["loss"]
        summary["tokens_per_s"] = sum(r["tokens_per_s"] for r in train_rows) / len(train_rows)
    if rank == 0:
        save_model(core, out_dir / "final")
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", title=out_dir.name)
    if ddp:
        dist.barrier()
    return summary


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
