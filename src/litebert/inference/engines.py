"""Exported models on the engines users run them on, and the rule `litebert.pipeline` picks one by.

A model directory may hold any of these backends side by side (``litebert export`` writes the exported ones next to
``config.json`` and the tokenizer):

====================  ==========================  ============================================================
backend               file                        engine
====================  ==========================  ============================================================
``torch``             ``model.safetensors``       litebert's PyTorch model (fp32, or bf16 where it is native)
``onnx``              ``model.onnx``              ONNX Runtime, fp32
``onnx-int8``         ``model.int8.onnx``         ONNX Runtime, dynamic int8 (int8 weights, activations per call)
``openvino``          ``openvino_model.xml/.bin`` OpenVINO on CPU, converted from ``model.onnx``; precision hint
                                                  f32, or bf16 where the probe says bf16 is native
``ctranslate2``       ``ctranslate2/model.bin``   CTranslate2 float32 (BERT and DistilBERT sequence classifiers:
                                                  its converter has no ALBERT, its encoder no classifier, so the
                                                  head runs in PyTorch from ``ctranslate2/head.safetensors``)
``ctranslate2-int8``  the same files              CTranslate2 int8 (weights quantised when loaded)
====================  ==========================  ============================================================

Every exported graph keeps litebert's edge over the engines' own exports: a sequence classifier computes the last
layer for [CLS] alone, fill-mask projects only the [MASK] rows, and the pipeline in front of it tokenizes once and
runs length-bucketed batches, whatever the backend.

`choose_backend` is the ``backend="auto"`` rule: the first backend of `backend_order` present in the directory, whose
engine is installed and that ``precision`` allows. The order is per CPU class, from ``python bench/inference.py
--peers`` and ``bench/engines_pipeline.py`` (figures and the CPU in ``docs/engines.md``):

- no native bf16 (AVX2, AVX-512 without bf16): int8 first (it changes outputs by a little, so only when exported
  and ``precision`` is ``auto``), CTranslate2's before ONNX Runtime's (far ahead on DistilBERT at batch 1, level
  elsewhere); then fp32: litebert's PyTorch path (fastest or level with the fastest fp32 engine in most model x
  shape cells), CTranslate2, ONNX Runtime, and OpenVINO, which was never the fastest there.
- native bf16 (AMX, AVX-512-bf16): PyTorch bf16 first, which beat transformers several times over there, then int8,
  OpenVINO (bf16 hint), CTranslate2, ONNX Runtime. Only the AVX2 order is measured against the engines; this one
  follows the PyTorch figures and is the first to revisit on such a machine.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime import hardware, resolve_precision

__all__ = ["BACKEND_FILES", "OPENVINO_FILE", "OpenVinoEncoder", "backend_order", "backends_in", "choose_backend",
           "engine_pipeline", "export_openvino"]

logger = logging.getLogger(__name__)

OPENVINO_FILE = "openvino_model.xml"
CT2_DIR = "ctranslate2"
CT2_FAMILIES = ("bert", "distilbert")  # CTranslate2 4.x converts these encoders; ALBERT it does not
BACKEND_FILES = {"torch": "model.safetensors", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx",
                 "openvino": OPENVINO_FILE, "ctranslate2": f"{CT2_DIR}/model.bin",
                 "ctranslate2-int8": f"{CT2_DIR}/model.bin"}
_HEAD_FILE = "head.safetensors"
_TASK_KEY = ["litebert", "task"]  # where the OpenVINO IR keeps the task, as the ONNX file keeps it in its metadata


def backends_in(model_dir: str | Path) -> list[str]:
    """The backends whose files ``model_dir`` holds, in `BACKEND_FILES` order."""
    from ..checkpoint import WEIGHT_FILES

    model_dir = Path(model_dir)
    present = []
    for backend, name in BACKEND_FILES.items():
        names = WEIGHT_FILES if backend == "torch" else (name,)
        if any((model_dir / n).is_file() for n in names):
            present.append(backend)
    return present


def backend_order() -> tuple[str, ...]:
    """Fastest first, for this machine's CPU class (see the module docstring for the measurements behind it)."""
    if hardware().cpu_bf16:
        return ("torch", "onnx-int8", "ctranslate2-int8", "openvino", "ctranslate2", "onnx")
    return ("ctranslate2-int8", "onnx-int8", "torch", "ctranslate2", "onnx", "openvino")


def _runnable(backend: str) -> bool:
    module = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime", "openvino": "openvino",
              "ctranslate2": "ctranslate2", "ctranslate2-int8": "ctranslate2"}.get(backend)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def choose_backend(present: Sequence[str], precision: str = "auto") -> str:
    """The ``backend="auto"`` pick among ``present``: the first of `backend_order` that is present, whose engine is
    installed and that ``precision`` allows (int8 only under ``auto``: an explicit precision asks for its numbers)."""
    for backend in backend_order():
        if backend in present and _runnable(backend) and not (backend.endswith("int8") and precision != "auto"):
            return backend
    if present:
        raise ValueError(f"no usable backend among {', '.join(present)} (precision={precision}); install the engine "
                         "(pip install 'litebert[export,peers]') or pick one with backend=")
    raise ValueError("no weights and no export found (looked for "
                     + ", ".join(sorted({*BACKEND_FILES.values(), 'model.safetensors.index.json'})) + ")")


# ------------------------------------------------------------------------------------------------------ OpenVINO


def export_openvino(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Convert an exported ONNX file (`litebert.inference.export.export_onnx`) to OpenVINO IR in ``out_dir``: fp32
    weights (the precision is chosen when the model is compiled, so one IR serves f32 and bf16 CPUs), the task kept in
    the IR. Returns the ``.xml`` path."""
    import onnx
    import openvino as ov

    task = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}.get(
        "litebert.task")
    model = ov.Core().read_model(str(onnx_path))
    if task:
        model.set_rt_info(task, _TASK_KEY)
    path = Path(out_dir) / OPENVINO_FILE
    ov.save_model(model, str(path), compress_to_fp16=False)  # fp16 storage would round every weight
    return path


class OpenVinoEncoder:
    """An OpenVINO model compiled for the CPU, called like `litebert.inference.export.OnnxEncoder`: ``enc(input_ids,
    attention_mask, token_type_ids)`` -> ``{output name: np.ndarray}``. ``precision`` (fp32 / bf16 / auto, resolved by
    the hardware probe) sets the inference precision hint; ``threads`` defaults to torch's intra-op thread count, so
    every engine in one process uses the same cores. Safe to call from several threads (one request per thread)."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "fp32"):
        import openvino as ov

        self.path = Path(path)
        self.precision = resolve_precision(precision, "cpu")
        core = ov.Core()
        model = core.read_model(str(path))
        self.task = model.get_rt_info(_TASK_KEY).astype(str) if model.has_rt_info(_TASK_KEY) else None
        config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._local = threading.local()

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, np.ndarray]:
        from .export import encoder_feed

        feed = encoder_feed(self.input_names, input_ids, attention_mask, token_type_ids)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer(feed)
        # The request reuses its output buffers on the next call: copy out.
        return {name: np.array(request.get_tensor(name).data, dtype=np.float32) for name in self.output_names}


# --------------------------------------------------------------------------------------------------- CTranslate2


def convert_ctranslate2(model_dir: str | Path, out: str | Path, scratch: str | Path) -> Path:
    """CTranslate2's own converter on a checkpoint directory (it loads it with ``transformers``), fp32 weights, into
    ``out``; ``scratch`` receives a linked copy of the checkpoint with what the converter reads and this checkpoint
    may lack: BERT's ``position_embedding_type`` (transformers 5 no longer keeps it in its config) and a vocabulary
    (a bench preset has no tokenizer; ids are fed directly)."""
    import json

    import ctranslate2

    model_dir, out, scratch = Path(model_dir), Path(out), Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not (scratch / f.name).exists():
            (scratch / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") not in CT2_FAMILIES:
        raise ValueError(f"CTranslate2 has no {config.get('model_type')} converter (it converts "
                         f"{', '.join(CT2_FAMILIES)})")
    (scratch / "config.json").write_text(json.dumps({"position_embedding_type": "absolute", **config}))
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = specials + [f"t{i}" for i in range(len(specials), config["vocab_size"])]
        (scratch / "vocab.txt").write_text("\n".join(vocab))
    ctranslate2.converters.TransformersConverter(str(scratch)).convert(str(out), quantization=None, force=True)
    return out


def export_ctranslate2(model: Any, model_dir: str | Path, out_dir: str | Path) -> Path:
    """A sequence classifier (``model``, loaded from ``model_dir``) as CTranslate2 runs it: its encoder converted into
    ``out_dir/ctranslate2`` and the small head CTranslate2 has no place for (DistilBERT's pre-classifier, the
    classifier) beside it in ``head.safetensors``. Returns the CTranslate2 directory."""
    from safetensors.torch import save_file

    from ..heads import EncoderForSequenceClassification

    if not isinstance(model, EncoderForSequenceClassification):
        raise TypeError(f"--format ctranslate2 exports sequence classifiers (text-classification), not a "
                         f"{type(model).__name__}")
    out = Path(out_dir) / CT2_DIR
    convert_ctranslate2(model_dir, out, Path(out_dir) / ".ct2-src")
    head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    if model.pre_classifier is not None:
        head.update({f"pre_classifier.{k}": v for k, v in model.pre_classifier.state_dict().items()})
    save_file({k: v.detach().float().contiguous() for k, v in head.items()}, str(out / _HEAD_FILE))
    shutil.rmtree(Path(out_dir) / ".ct2-src", ignore_errors=True)
    return out


class CTranslate2Encoder:
    """A CTranslate2 encoder plus the classifier head, called like `litebert.inference.export.OnnxEncoder` and
    returning ``{"logits"}``. ``compute_type`` ``float32`` or ``int8`` (weights quantised when loaded). CTranslate2
    computes every position of the last layer (it has no [CLS]-only mode); padding is given to it as lengths."""

    output_names = ("logits",)
    task = "text-classification"

    def __init__(self, path: str | Path, threads: int | None = None, compute_type: str = "float32"):
        import ctranslate2
        from safetensors.torch import load_file

        self.path = Path(path)
        self.encoder = ctranslate2.Encoder(str(path), device="cpu", compute_type=compute_type,
                                           intra_threads=threads or torch.get_num_threads())
        head = load_file(str(self.path / _HEAD_FILE))
        self.classifier = (head["classifier.weight"], head["classifier.bias"])
        self.pre_classifier = ((head["pre_classifier.weight"], head["pre_classifier.bias"])
                               if "pre_classifier.weight" in head else None)
        # DistilBERT (the family with a pre-classifier) has no token types, and CTranslate2 no table for them.
        types = ("token_type_ids",) if self.pre_classifier is None else ()
        self.input_names = ("input_ids", "attention_mask", *types)

    def __call__(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, np.ndarray]:
        import ctranslate2

        from .export import _numpy

        ids = _numpy(input_ids)
        lengths = (_numpy(attention_mask).sum(1) if attention_mask is not None else
                   np.full(ids.shape[0], ids.shape[1]))
        bert = self.pre_classifier is None
        types = _numpy(token_type_ids).tolist() if token_type_ids is not None and bert else None
        out = self.encoder.forward_batch(ctranslate2.StorageView.from_array(ids.astype(np.int32)),
                                         ctranslate2.StorageView.from_array(lengths.astype(np.int32)), types)
        with torch.inference_mode():
            if bert:  # BERT: the engine's tanh pooler over [CLS]
                vector = torch.as_tensor(np.asarray(out.pooler_output))  # (B, H)
            else:  # DistilBERT: pre-classifier + ReLU over [CLS]
                cls = torch.as_tensor(np.asarray(out.last_hidden_state))[:, 0]  # (B, H)
                vector = torch.relu(torch.nn.functional.linear(cls, *self.pre_classifier))
            return {"logits": torch.nn.functional.linear(vector, *self.classifier).numpy()}


# ------------------------------------------------------------------------------------------------------- pipeline


def engine_pipeline(model_dir: str | Path, task: str | None, backend: str, threads: int | None = None,
                    **kwargs: Any) -> Any:
    """The ``task`` pipeline over an exported ``backend`` (not torch) of ``model_dir``; keyword arguments as for
    `litebert.pipeline`. ``precision`` is the graph's own for ONNX; for OpenVINO it sets the precision hint."""
    from ..config import load_config
    from ..tokenizer import load_tokenizer
    from .export import OnnxEncoder, OnnxTaskModel, _onnx_pipeline_class
    from .pipeline import _resolve_task

    model_dir = Path(model_dir)
    path = model_dir / BACKEND_FILES[backend]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create it with litebert export --model DIR --out {model_dir}"
                                + (" --format openvino" if backend == "openvino" else
                                   " --quantize int8" if backend == "onnx-int8" else ""))
    precision = kwargs.pop("precision", "auto")
    kwargs.pop("bf16", None)
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(model_dir if tokenizer is None else tokenizer)
    if backend == "openvino":
        encoder: Any = OpenVinoEncoder(path, threads, precision)
        graph_precision = encoder.precision
    elif backend.startswith("ctranslate2"):
        int8 = backend.endswith("int8")
        encoder = CTranslate2Encoder(path.parent, threads, "int8" if int8 else "float32")
        graph_precision = "int8" if int8 else "fp32"
    else:
        encoder = OnnxEncoder(path, threads)
        graph_precision = "int8" if backend == "onnx-int8" else "fp32"
    exported = encoder.task or "text-classification"
    task = _resolve_task(task) or exported
    if task != exported:
        raise ValueError(f"{path} was exported for {exported}, not {task}; export again with --task {task}")
    model = OnnxTaskModel(encoder, load_config(model_dir))
    # "fp32" here only tells the pipeline not to cast: the graph's precision is its own.
    pipe = _onnx_pipeline_class(task)(model, tokenizer, precision="fp32", **kwargs)
    pipe.precision = graph_precision
    pipe.backend = f"{backend}:{BACKEND_FILES[backend]}"
    return pipe
