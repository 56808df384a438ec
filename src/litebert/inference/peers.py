"""The engines a user picks instead of litebert, run the way their docs show, as ``litebert bench --peers`` contenders.

Every peer starts from the same ``transformers`` checkpoint directory the bench gives ``transformers`` itself, and
computes every position of every layer, as those engines do for a sequence classifier:

- ``ort-fp32``: the checkpoint traced to ONNX (what ``optimum`` exports) run by ONNX Runtime, graph optimisations
  on (its default);
- ``ort-opt``: the same file through ``onnxruntime.transformers.optimizer`` (attention, LayerNorm, GELU fusions);
- ``ort-int8``: the plain file quantised dynamically (``quantize_dynamic``, u8 weights per channel: the format
  that does not saturate on CPUs without VNNI, where s8 weights do; the quantiser cannot type the optimiser's fused
  ops);
- ``ov-fp32``: OpenVINO from the plain ONNX file, f32 precision hint, latency hint;
- ``ct2-fp32`` / ``ct2-int8``: CTranslate2's converter on the checkpoint directory, the encoder run in float32 or
  int8 (weights quantised at load); its encoder returns hidden states (and BERT's pooled output), so the checkpoint's
  own small classifier head runs on top in PyTorch.

Each engine runs with the bench's thread count. ONNX Runtime's sessions stop spinning after a run (as litebert's own
do), so no contender takes cores from the one timed after it.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["PEERS", "PEER_CLASS", "PEER_PACKAGES", "peer_forward", "peers_unavailable"]

logger = logging.getLogger(__name__)

PEERS = ("ort-fp32", "ort-opt", "ort-int8", "ov-fp32", "ct2-fp32", "ct2-int8")
# Which litebert paths each peer is compared with: fp32-exact peers against litebert's fp32/bf16 paths, int8 with int8.
PEER_CLASS = {"ort-fp32": "fp32", "ort-opt": "fp32", "ort-int8": "int8", "ov-fp32": "fp32", "ct2-fp32": "fp32",
              "ct2-int8": "int8"}
PEER_PACKAGES = {"ort-fp32": "onnxruntime", "ort-opt": "onnxruntime", "ort-int8": "onnxruntime",
                 "ov-fp32": "openvino", "ct2-fp32": "ctranslate2", "ct2-int8": "ctranslate2"}

Forward = Callable[[dict[str, Tensor]], Tensor]


class PeerUnavailable(RuntimeError):
    """This peer cannot run this model (its converter lacks the architecture); the bench reports it as n/a."""


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def peers_unavailable(peers: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``{peer: reason}`` for the peers whose package is not installed."""
    return {p: f"{PEER_PACKAGES[p]} is not installed (pip install 'litebert[peers]')"
            for p in peers if p in PEER_PACKAGES and not _importable(PEER_PACKAGES[p])}


# ------------------------------------------------------------------------------------------------------- exports
def _hf_onnx(hf: nn.Module, model_dir: Path, out: Path) -> Path:
    """The checkpoint as a user exports it: ``transformers``' own model traced to ONNX (opset 17, dynamic axes)."""
    path = out / "hf.onnx"
    if path.is_file():
        return path
    from ..config import load_config
    from .bench import _inputs

    config = load_config(model_dir)
    sample = _inputs(config, 2, 16, padded=True)
    names = list(sample)
    module = copy.deepcopy(hf.hf).eval()
    module.config._attn_implementation = "eager"  # the attention every exporter traces

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, *args: Tensor) -> Tensor:
            return self.m(**dict(zip(names, args))).logits

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits().eval(), tuple(sample.values()), str(path), dynamo=False, opset_version=17,
                          input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
    return path


def _ort_optimized(src: Path, model_dir: Path) -> Path:
    path = src.with_name("hf.opt.onnx")
    if path.is_file():
        return path
    from onnxruntime.transformers import optimizer

    from ..config import load_config

    config = load_config(model_dir)
    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size)
    model.save_model_to_file(str(path))
    return path


def _ort_int8(src: Path) -> Path:
    from .export import quantize_int8

    path = src.with_name("hf.int8.onnx")
    return path if path.is_file() else quantize_int8(src, path, per_channel=True, int8_format="u8")


def _ct2_dir(model_dir: Path, out: Path, model_type: str, vocab_size: int) -> Path:
    from .engines import CT2_FAMILIES, convert_ctranslate2

    path = out / "ct2"
    if (path / "model.bin").is_file():
        return path
    if model_type not in CT2_FAMILIES:
        raise PeerUnavailable(f"CTranslate2 has no {model_type} converter")
    return convert_ctranslate2(model_dir, path, out / "ct2-src")


# ------------------------------------------------------------------------------------------------------ forwards
def _ort_forward(path: Path, threads: int) -> Forward:
    from .export import OnnxEncoder

    encoder = OnnxEncoder(path, threads, disabled_optimizers=())
    return lambda inputs: torch.from_numpy(encoder(**inputs)["logits"])


def _ov_forward(path: Path, threads: int) -> Forward:
    from .engines import OpenVinoEncoder

    encoder = OpenVinoEncoder(path, threads, precision="fp32")
    return lambda inputs: torch.from_numpy(encoder(**inputs)["logits"])


def _ct2_forward(path: Path, hf: nn.Module, compute_type: str, threads: int) -> Forward:
    import ctranslate2

    encoder = ctranslate2.Encoder(str(path), device="cpu", compute_type=compute_type, intra_threads=threads)
    model = hf.hf
    bert = model.config.model_type == "bert"

    def forward(inputs: dict[str, Tensor]) -> Tensor:
        ids = ctranslate2.StorageView.from_array(inputs["input_ids"].numpy().astype(np.int32))
        lengths = ctranslate2.StorageView.from_array(inputs["attention_mask"].sum(1).numpy().astype(np.int32))
        types = inputs["token_type_ids"].tolist() if "token_type_ids" in inputs else None
        out = encoder.forward_batch(ids, lengths, types)
        with torch.inference_mode():
            if bert:  # pooled [CLS] from the engine, then the checkpoint's classifier
                return model.classifier(torch.as_tensor(np.array(out.pooler_output))).float()
            cls = torch.as_tensor(np.array(out.last_hidden_state))[:, 0]  # (B, H)
            return model.classifier(torch.relu(model.pre_classifier(cls))).float()

    return forward


def peer_forward(peer: str, model_dir: Path, hf: nn.Module, workdir: Path, threads: int) -> Forward:
    """``{inputs} -> logits`` of ``peer`` on the checkpoint in ``model_dir`` (``hf``: the bench's transformers
    contender, whose head the CTranslate2 peers reuse); conversions are written under ``workdir`` once per model."""
    from ..config import load_config

    out = workdir / f"{model_dir.name}-peers"
    if peer.startswith("ort-") or peer == "ov-fp32":
        plain = _hf_onnx(hf, model_dir, out)
        if peer == "ort-fp32":
            return _ort_forward(plain, threads)
        if peer == "ov-fp32":
            return _ov_forward(plain, threads)
        if peer == "ort-int8":
            return _ort_forward(_ort_int8(plain), threads)
        return _ort_forward(_ort_optimized(plain, model_dir), threads)
    if peer.startswith("ct2-"):
        config = load_config(model_dir)
        path = _ct2_dir(model_dir, out, config.model_type, config.vocab_size)
        return _ct2_forward(path, hf, "float32" if peer == "ct2-fp32" else "int8", threads)
    raise ValueError(f"unknown peer '{peer}' (choose from {', '.join(PEERS)})")

