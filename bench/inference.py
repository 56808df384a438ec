"""Inference latency of litebert (fp32, bf16, ONNX int8) against transformers fp32 + SDPA, side by side in one run.

    python bench/inference.py [--models albert-base,distilbert-base,bert-base] [--shapes 1x128,32x128,1x512]
                              [--backends transformers,fp32,bf16,int8] [--rounds 7] [--json FILE]

The same as ``litebert bench`` (see `litebert.inference.bench` for the method); by default it also keeps the full
results in ``bench/results/inference.json``.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from litebert.inference.bench import bench_main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:]
    if not any(a == "--json" or a.startswith("--json=") for a in argv):
        argv += ["--json", str(Path(__file__).resolve().parent / "results" / "inference.json")]
    raise SystemExit(bench_main(argv))
