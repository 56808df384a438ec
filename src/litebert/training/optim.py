"""Optimizers, parameter groups (weight decay, layer-wise LR decay) and LR schedules.

Every param group built here carries ``lr_scale`` (its layer-wise multiplier), ``weight_decay`` and
``trust_ratio`` (LAMB layer adaptation on/off). Group ``lr`` is already ``base_lr * lr_scale``, so a
``LambdaLR`` that multiplies every group's initial lr by one factor keeps the per-layer ratios.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["Lamb", "build_optimizer", "build_scheduler", "default_layer_id", "param_groups"]

SCHEDULES = ("linear", "poly", "cosine", "constant")
OPTIMIZERS = ("adamw", "lamb")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), as ALBERT trains with it.

    Per parameter ``w`` with gradient ``g`` at step ``t``::

        m = b1 * m + (1 - b1) * g              v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r = ||w|| / ||u||   (1 when either norm is 0, or when the group has trust_ratio=False)
        w = w - lr * r * u

    Weight decay is decoupled (added to the update, not the gradient). ALBERT excludes biases and
    LayerNorm weights from both weight decay and layer adaptation: give those a group with
    ``weight_decay=0.0, trust_ratio=False`` (``param_groups`` does). ``bias_correction=False`` gives
    the update of ALBERT's TensorFlow ``LAMBOptimizer``, which has none.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
        bias_correction: bool = True,
    ):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "trust_ratio": trust_ratio, "bias_correction": bias_correction}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"].item()

                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                if group["bias_correction"]:
                    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
                else:
                    bc1 = bc2 = 1.0
                update = (exp_avg / bc1).div_((exp_avg_sq / bc2).sqrt_().add_(eps))
                if wd != 0.0:
                    update.add_(p, alpha=wd)
                if group["trust_ratio"]:
                    # Norms stay on-device: no host sync per parameter.
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(ratio)
                p.add_(update, alpha=-lr)
        return loss


# --------------------------------------------------------------------------- parameter groups

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|attn|ffn)\.(\d+)\.")


def default_layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 = embeddings, 1..L = layers, L + 1 = heads.

    ``...embeddings...`` (any dotted component starting with ``embedding``) and ALBERT's embedding
    projection ``project.`` are 0; ``layers.{i}.`` is ``i + 1``. ALBERT's shared modules
    ``attn.{i}.`` / ``ffn.{i}.`` are also ``i + 1``: with full sharing they are used at every depth,
    so there is no right answer and this at least keeps distinct groups distinct. Anything else
    (pooler, MLM/SOP/task heads, final norms) is ``num_layers + 1``.
    """
    parts = name.split(".")
    if any(part.startswith("embedding") for part in parts) or "project" in parts[:-1]:
        return 0
    m = _LAYER_RE.search(name)
    if m is not None:
        return min(int(m.group(1)) + 1, num_layers)
    return num_layers + 1


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and LayerNorm/RMSNorm weights are 1-D; decaying them only hurts (BERT, ALBERT recipes).
    return p.ndim <= 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str], int] | None = None,
) -> list[dict]:
    """Split ``model``'s trainable parameters into optimizer groups.

    Biases and norm weights (``ndim <= 1``) get ``weight_decay=0`` and ``trust_ratio=False``; the rest
    ``weight_decay`` and ``trust_ratio=True``. With ``layer_decay`` a parameter at depth ``d``
    (``layer_id_fn(name)``, default ``default_layer_id``) gets ``lr_scale = layer_decay ** (L + 1 - d)``:
    heads 1.0, the top layer ``layer_decay``, embeddings ``layer_decay ** (L + 1)``. Each group has
    ``lr = lr * lr_scale`` and records ``lr_scale`` and ``layer_id``. Tied parameters appear once.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if num_layers is None or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int when layer_decay is set, got {num_layers}")
        if layer_id_fn is None:
            layer_id_fn = functools.partial(default_layer_id, num_layers=num_layers)

    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _no_decay(name, p)
        layer_id = layer_id_fn(name) if layer_decay is not None else 0
        key = (layer_id, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "trust_ratio": not no_decay,
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": layer_id,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    layer_decay: float | None = None,
    num_layers: int | None = None,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW or LAMB over ``param_groups(model, ...)`` (no decay on biases/norms, optional LLRD). ``fused``: AdamW's
    one-kernel update (for CUDA; LAMB has none)."""
    groups = param_groups(model, weight_decay, lr, layer_decay=layer_decay, num_layers=num_layers)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")


# --------------------------------------------------------------------------- schedules


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    power: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then decay to ``min_lr_ratio`` at ``total_steps``.

    The factor at step ``s`` (after ``s`` calls to ``scheduler.step()``) multiplies every group's
    initial lr, so per-group ``lr_scale`` ratios hold throughout. With ``p`` the decay progress in [0, 1]:
    ``linear`` = ``poly`` with power 1, ``poly`` ``(1 - p) ** power``, ``cosine`` ``(1 + cos(pi p)) / 2``,
    ``constant`` 1; each mapped to ``min_lr_ratio + (1 - min_lr_ratio) * f``. Past ``total_steps`` the
    factor stays at ``min_lr_ratio``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be <= total_steps ({total_steps})")
    if power <= 0:
        raise ValueError(f"power must be > 0, got {power}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = total_steps - warmup_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
        if schedule == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            f = (1.0 - progress) ** (power if schedule == "poly" else 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
