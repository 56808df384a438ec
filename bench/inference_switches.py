"""What each CPU inference switch buys, measured interleaved in one process: pre-packed weights, the allocator, the
[CLS]-only last layer and, for ONNX int8, the opset-23 Attention node and ONNX Runtime's SkipLayerNormalization fusion.

    python bench/inference_switches.py [--model bert-base] [--shape 32x128] [--rounds 4]

- ``prepack``: litebert fp32 and bf16 with the encoder weights pre-packed (`layers.prepack_linears`, as `pipeline()`
  runs) against the same model unpacked (oneDNN reorders the weight on every call); transformers fp32 alongside.
- ``allocator``: every contender with glibc keeping freed buffers (the thresholds `inference.memory.keep_freed_memory`
  sets) against fixed 128 KiB thresholds (glibc's starting point: large buffers mapped and unmapped on every call).
  mallopt is switched before each timed call, so the two settings alternate in the same process.
- ``first_token_only``: every litebert contender runs the classifier as the text-classification pipeline does, its
  last layer computing only the [CLS] position; ``fp32/bf16 all positions`` run the same packed models computing
  every position of the last layer too (allocator setting ``keep`` only).
- ``SkipLayerNormFusion``: the int8 export as `OnnxEncoder` runs it (the fusion off, `DISABLED_ORT_OPTIMIZERS`)
  against the same file with ONNX Runtime's default passes (``int8 SkipLN fused``; allocator setting ``keep`` only).
- ``opset``: the int8 export (opset 23: one Attention node per layer) against the same model exported at opset 20,
  where attention is spelled out as matmul, softmax, matmul and the head transposes (``int8 opset 20``).

Prints median ms per contender and each setting's speed-up over transformers fp32 under the same setting.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from litebert.heads import from_pretrained
from litebert.inference import bench, memory
from litebert.inference.export import OnnxEncoder
from litebert.layers import prepack_linears
from litebert.perf import interleaved_step_times, median


def _mallopt(mmap_threshold: int, trim_threshold: int):
    mallopt = ctypes.CDLL(None).mallopt

    def apply() -> None:
        mallopt(memory._M_MMAP_THRESHOLD, mmap_threshold)
        mallopt(memory._M_TRIM_THRESHOLD, trim_threshold)

    return apply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--shape", default="32x128", help="BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    batch, seq = (int(v) for v in args.shape.split("x"))
    workdir = Path(tempfile.mkdtemp())
    model_dir = bench._model_dir(args.model, workdir)
    threads = torch.get_num_threads()
    config, forwards = bench.prepare_contenders(model_dir, ["transformers", "fp32", "bf16"], workdir, threads)
    inputs = bench._inputs(config, batch, seq)
    plain = from_pretrained(str(model_dir)).eval()  # never opted into packing
    int8_file = bench.int8_export(plain, workdir / "int8")
    int8 = {"int8": OnnxEncoder(int8_file, threads),
            "int8 SkipLN fused": OnnxEncoder(int8_file, threads, disabled_optimizers=()),
            "int8 opset 20": OnnxEncoder(bench.int8_export(plain, workdir / "opset-20", opset=20), threads)}
    unpacked = {"fp32": bench._torch_forward(plain), "bf16": bench._torch_forward(copy.deepcopy(plain).bfloat16())}
    every = {"fp32": bench._torch_forward(prepack_linears(copy.deepcopy(plain)), first_token_only=False),
             "bf16": bench._torch_forward(prepack_linears(copy.deepcopy(plain).bfloat16()), first_token_only=False)}

    steps = {"transformers": lambda: forwards["transformers"](inputs)}
    for dtype in ("fp32", "bf16"):
        steps[f"{dtype} packed"] = lambda d=dtype: forwards[d](inputs)
        steps[f"{dtype} unpacked"] = lambda d=dtype: unpacked[d](inputs)
    keep = _mallopt(memory._MMAP_THRESHOLD, memory._TRIM_THRESHOLD)
    start = _mallopt(128 << 10, 128 << 10)
    timed = {}
    for name, step in steps.items():
        for label, setting in (("keep", keep), ("128 KiB", start)):
            timed[f"{name} / {label}"] = lambda s=step, a=setting: (a(), s())
    for dtype in ("fp32", "bf16"):
        timed[f"{dtype} all positions / keep"] = lambda d=dtype: (keep(), every[d](inputs))
    for name, encoder in int8.items():
        timed[f"{name} / keep"] = lambda e=encoder: (keep(), e(**inputs))
    times = interleaved_step_times(timed, rounds=args.rounds, steps_per_round=1, warmup=1)
    ms = {name: median(t["wall"]) * 1e3 for name, t in times.items()}
    print(f"{args.model} {batch}x{seq}, {threads} threads, median ms of {args.rounds} interleaved rounds")
    for name, value in ms.items():
        label = name.rsplit(" / ", 1)[1]
        print(f"  {name:28s} {value:9.1f} ms  {ms['transformers / ' + label] / value:5.2f}x transformers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
