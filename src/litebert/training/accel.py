"""What a GPU user expects of a trainer, each switchable in the recipe's ``train`` section and chosen by ``auto``.

=========================  =====================================================================================
``precision``              bf16 autocast where bf16 is native; on a CUDA GPU without bf16, fp16 autocast with a
                           gradient scaler (:func:`training_precision`, :func:`autocast_for`, :func:`grad_scaler`)
``tf32``                   TF32 matmuls on Ampere and newer (``auto``: on there)
``fused_optimizer``        the fused AdamW kernel (``auto``: on CUDA with AdamW; LAMB has none)
``pin_memory``             page-locked batches copied with ``non_blocking`` (``auto``: on CUDA)
``compile``                ``torch.compile`` of the encoder (``auto``: off; compiling costs minutes, which short
                           runs never win back)
``activation_checkpointing``  recompute each layer in the backward pass instead of keeping its activations
                           (``auto``: on CUDA for the wide presets, albert-xlarge and up, whose activations fill
                           a GPU first)
=========================  =====================================================================================

Each switch is ``auto``, ``true`` or ``false``; :func:`resolve_accel` turns them into decisions for one device,
asking the hardware probe (:mod:`litebert.runtime`), and :func:`prepare_model` applies the model-side ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..runtime import cuda_capability, hardware, resolve_precision

__all__ = ["SWITCHES", "Accel", "apply_tf32", "autocast_for", "enable_activation_checkpointing", "grad_scaler",
           "pin_memory", "prepare_model", "resolve_accel", "switch", "training_precision"]

log = logging.getLogger(__name__)

SWITCHES = ("tf32", "fused_optimizer", "pin_memory", "compile", "activation_checkpointing")
TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")
# Hidden size from which activation checkpointing is on by default (albert-xlarge's).
_CHECKPOINT_FROM_HIDDEN = 2048


def switch(value: Any, name: str) -> bool | None:
    """A recipe switch: True / False, or None for ``auto``. Accepts booleans and auto/true/false/on/off."""
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("true", "on", "yes", "1"):
        return True
    if text in ("false", "off", "no", "0"):
        return False
    raise ConfigError(f"train.{name} must be auto, true or false, got {value!r}")


def pin_memory(value: Any, device: str | torch.device) -> bool:
    """The ``pin_memory`` switch for ``device``: page-locked batches only speed up copies to a CUDA GPU."""
    return torch.device(device).type == "cuda" and switch(value, "pin_memory") is not False


def training_precision(precision: str | bool | None, device: str | torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for training on ``device``.

    ``precision`` is a recipe's ``auto`` / ``fp32`` / ``bf16`` / ``fp16`` (``True``/``False`` from the ``bf16:``
    flag mean bf16 / fp32). Asking for bf16 (or ``auto``) on a CUDA GPU without bf16 gives fp16, which needs
    :func:`grad_scaler`; fp16 elsewhere is refused (CPUs gain nothing from it)."""
    device = torch.device(device)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"precision fp16 is for CUDA GPUs without bf16; on {device.type} use auto, fp32 or bf16")
        return "fp16"
    wants_half = precision is None or precision is True or precision in ("auto", "bf16")
    if device.type == "cuda" and wants_half and not hardware().native_bf16(device):
        return "fp16"
    return resolve_precision(precision, device)


def autocast_for(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved training precision (none for fp32)."""
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only: fp16 gradients underflow without one. Disabled, its ``scale``,
    ``unscale_``, ``step`` and ``update`` pass straight through, so one loop serves every precision."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


@dataclasses.dataclass(frozen=True)
class Accel:
    """The decisions for one training run on one device."""

    precision: str
    tf32: bool
    fused_optimizer: bool
    pin_memory: bool
    compile: bool
    activation_checkpointing: bool

    def describe(self) -> str:
        """``precision bf16, tf32 on, ...`` for the log."""
        words = {True: "on", False: "off"}
        return ", ".join(f"{name} {words.get(value, value)}" for name, value in dataclasses.asdict(self).items())


def resolve_accel(cfg: Any, device: str | torch.device, precision: str | bool | None,
                  model_config: Any = None) -> Accel:
    """Decide every switch of ``cfg`` (a ``TrainConfig``) for ``device``; ``precision`` is the recipe's."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    chosen = {name: switch(getattr(cfg, name, "auto"), name) for name in SWITCHES}
    capability = cuda_capability(device) if cuda else None
    auto = {
        "tf32": bool(capability and capability >= (8, 0)),
        "fused_optimizer": cuda and cfg.optimizer == "adamw",
        "pin_memory": pin_memory(cfg.pin_memory, device),
        "compile": False,
        "activation_checkpointing": cuda and getattr(model_config, "hidden_size", 0) >= _CHECKPOINT_FROM_HIDDEN,
    }
    decided = {name: auto[name] if chosen[name] is None else chosen[name] for name in SWITCHES}
    decided["pin_memory"] = auto["pin_memory"]
    if decided["fused_optimizer"] and cfg.optimizer != "adamw":
        if chosen["fused_optimizer"]:
            log.warning("train.fused_optimizer: %s has no fused kernel; running the plain one", cfg.optimizer)
        decided["fused_optimizer"] = False
    if not cuda:
        decided["tf32"] = False  # a CUDA matmul mode; CPUs have no TF32
    return Accel(precision=training_precision(precision, device), **decided)


def apply_tf32(enabled: bool) -> None:
    """TF32 for CUDA fp32 matmuls and convolutions (process-wide; fp32 parameters, ~fp16-class products)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        mode = "tf32" if enabled else "ieee"
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every layer of ``model``'s encoder in the backward pass instead of storing its activations.

    Wraps the forward of each module held in a ``ModuleList`` of the encoder (BERT / DistilBERT blocks, ALBERT's
    attention and FFN modules); parameters and their names are untouched, so checkpoints are unchanged. Dropout is
    replayed with the same random numbers. Returns the number of modules wrapped."""
    from torch.utils.checkpoint import checkpoint

    encoder = getattr(model, "encoder", model)
    wrapped = 0
    for holder in encoder.modules():
        if not isinstance(holder, nn.ModuleList):
            continue
        for layer in holder:
            if getattr(layer, "_litebert_checkpointed", False):
                continue
            plain = layer.forward

            def forward(*args: Any, _plain: Any = plain, _layer: nn.Module = layer, **kwargs: Any) -> Any:
                if _layer.training and torch.is_grad_enabled():
                    return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
                return _plain(*args, **kwargs)

            layer.forward = forward
            layer._litebert_checkpointed = True
            wrapped += 1
    return wrapped


def prepare_model(model: nn.Module, accel: Accel) -> nn.Module:
    """Apply the model-side decisions in place: activation checkpointing, then ``torch.compile`` of the encoder
    (in place, so parameter names and checkpoints stay as they are)."""
    if accel.activation_checkpointing:
        enable_activation_checkpointing(model)
    if accel.compile:
        getattr(model, "encoder", model).compile()
    return model
