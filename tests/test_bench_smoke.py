"""The pre-training benchmark runs end to end on tiny sizes and reports every figure (not that the targets are met:
that needs the real sizes and a quiet machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pretrain_throughput.py"
ROWS = ("litebert bf16", "transformers fp32", "transformers bf16", "litebert fp32")
ROW_KEYS = ("step_s_median", "cpu_s_median", "tokens_per_s", "peak_mem_mib", "useful_tflops", "frac_of_peak")


def test_pretrain_throughput_quick_prints_all_figures():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", "--rounds", "1", "--steps", "1"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any("tokens/s" in line for line in lines[:-1])  # the table comes before the JSON
    result = json.loads(lines[-1])

    assert set(result["rows"]) == set(ROWS)
    for name, row in result["rows"].items():
        for key in ROW_KEYS:
            assert row[key] > 0, (name, key, row[key])
    for dtype in ("fp32", "bf16"):
        assert result["matmul_peak_tflops"][dtype] > 0
    assert result["speedup"] > 0 and result["memory_ratio"] > 0
    assert set(result["fair"]) == {"bf16_speedup", "fp32_speedup", "bf16_memory_ratio", "fp32_memory_ratio"}
    assert {"speedup_met", "memory_met"} <= set(result["targets"])
    # Same weights, same batch: the two libraries compute the same fp32 loss.
    losses = result["first_batch_loss_fp32"]
    assert abs(losses["litebert"] - losses["transformers"]) < 1e-3
    # transformers projects every position onto the vocabulary, litebert only the masked ones.
    assert result["executed_flops_per_step"]["transformers"] > result["useful_flops_per_step"]
