"""One prepared GPU check (at most a few minutes on one GPU): does litebert train and serve correctly and fast there?

    .venv/bin/python bench/gpu_smoke.py                         # on the GPU: albert-base, bf16, a few hundred steps
    .venv/bin/python bench/gpu_smoke.py --device cpu --quick    # the same checks on tiny presets, on a CPU (seconds)
    .venv/bin/python bench/gpu_smoke.py --json-out result.json  # ... and every figure as one JSON object

Five checks, each printed with its figures and PASS / FAIL (the exit status is 1 when one fails):

1. parity: every family's encoder (BERT, ALBERT, DistilBERT) in fp32 on the device against the same weights on the
   CPU, on a padded batch (TF32 off for this check, so both sides do fp32 arithmetic).
2. pretrain: ``litebert pretrain`` of albert-base on a synthetic corpus (written here; nothing is downloaded) in the
   device's precision (bf16 on a GPU with it), with tokens/s and the model FLOPs utilisation: useful training FLOPs
   (3x the forward matmuls, the MLM head on masked positions only) per second over the GPU's dense bf16 peak (its
   spec sheet's, where this script knows the GPU, else a measured large matmul; ``--peak-tflops`` overrides).
   Tokens are real tokens; the MFU with the padding positions counted too is printed next to it, and before the
   run the data loader's own rate, so that a run the CPUs cannot feed shows as such.
3. torchrun: the same run through ``torchrun --nproc_per_node 1`` (the multi-GPU code path with one process):
   same losses, same speed.
4. kill and resume: the run killed (SIGKILL) after its first checkpoint, started again, and compared with the
   uninterrupted run. On a CPU the losses must agree exactly; GPU kernels with atomics may differ in the last bits
   from run to run, so there the difference must stay within that of two uninterrupted runs (check 3).
5. inference: a sequence classifier's forward, litebert against ``transformers`` (SDPA attention), same weights,
   same precision, same GPU: sequences/s of each and the ratio (logits compared first).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import litebert
from litebert.config import load_config, preset
from litebert.perf import matmul_peak
from litebert.runtime import hardware
from litebert.training.state import latest_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import train_flops  # one FLOPs count for both pre-training benchmarks

# Dense bf16 tensor-core peaks from the vendors' spec sheets, in TFLOP/s (without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}
PRECISION_FLAG = "--train.precision"  # the recipe switch for mixed precision
MLM_FRACTION = 0.15


# -- inputs ---------------------------------------------------------------------------------------------------------
def write_corpus(root: Path, documents: int, seed: int = 0) -> Path:
    """Documents of pseudo-words with a Zipf-like frequency (so the tokenizer learns a real vocabulary), long enough
    to fill 512-token examples, blank-line separated; ``train.txt`` and a smaller ``val.txt``."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "mu", "sen", "dal", "or", "pe", "lin", "vo", "ta", "ne", "gor", "bi", "shu", "el",
                 "an", "qui", "ra", "zo", "mi", "fer", "ul", "po"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)})
    weights = [1.0 / (i + 1) for i in range(len(words))]

    def document() -> str:
        return " ".join(" ".join(rng.choices(words, weights, k=rng.randint(6, 18))).capitalize() + "."
                        for _ in range(rng.randint(120, 240)))

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n\n".join(document() for _ in range(documents)))
    (root / "val.txt").write_text("\n\n".join(document() for _ in range(max(4, documents // 10))))
    return root


def padded_inputs(vocab: int, batch: int, seq: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, seq - i * max(1, seq // (2 * batch)):] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def bf16_peak(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(TFLOP/s, where the figure comes from) for the MFU denominator."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return BF16_PEAK_TFLOPS[key], f"spec sheet ({key})"
    return measured_peak(device, dtype), "measured matmul"


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few large matmuls in ``dtype`` on ``device``, TFLOP/s."""
    if device.type == "cpu":
        return matmul_peak(dtype)
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the checks -----------------------------------------------------------------------------------------------------
def check_parity(args: argparse.Namespace, device: torch.device) -> dict:
    from litebert.training.accel import apply_tf32

    if device.type == "cuda":
        apply_tf32(False)
    rows = {}
    for name in (("bert-test", "albert-test", "distilbert-test") if args.quick else
                 ("bert-base", "albert-base", "distilbert-base")):
        torch.manual_seed(0)
        model = litebert.build_encoder(preset(name)).eval()
        inputs = padded_inputs(model.config.vocab_size, 4, 16 if args.quick else 128, "cpu")
        with torch.inference_mode():
            ref = model(**inputs).last_hidden_state
            got = model.to(device)(**{k: v.to(device) for k, v in inputs.items()}).last_hidden_state.cpu()
        real = inputs["attention_mask"].bool()
        rows[name] = float((got - ref)[real].abs().max())
    ok = all(v <= 1e-3 for v in rows.values())
    print(f"[{'PASS' if ok else 'FAIL'}] parity fp32 {device} vs cpu, max |diff| of hidden states: "
          + ", ".join(f"{k} {v:.2e}" for k, v in rows.items()))
    return {"ok": ok, "max_abs_diff": rows}


def prepare_data(args: argparse.Namespace, corpus: Path) -> tuple[Path, dict]:
    """The tokenizer and the tokenized-text cache, made once before the timed runs, which all share them; then the
    data loader alone, as the runs configure it: real tokens/s (what the GPU can be fed at most) and the share of
    batch positions that are real tokens, not padding."""
    from litebert.data.pretraining import PretrainingConfig, PretrainingDataset, build_pretraining_loader
    from litebert.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = corpus / "tokenizer"
    train_tokenizer([corpus / "train.txt"], kind="unigram", vocab_size=args.vocab, out_dir=tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    config = PretrainingConfig(max_seq_length=args.seq)
    for name in ("train.txt", "val.txt"):
        PretrainingDataset([str(corpus / name)], tokenizer, config, cache_dir=corpus / "cache").prepare_cache()
    loader = build_pretraining_loader([str(corpus / "train.txt")], tokenizer, config, batch_size=args.batch,
                                      num_workers=args.workers, cache_dir=corpus / "cache", drop_last=True)
    real = positions = 0
    batches = iter(loader)
    next(batches)  # workers start
    start = time.perf_counter()
    for batch, _ in zip(batches, range(5 if args.quick else 40)):
        real += int(batch["attention_mask"].sum())
        positions += batch["attention_mask"].numel()
    return tok_dir, {"tokens_per_s": real / (time.perf_counter() - start), "fill": real / positions,
                     "workers": args.workers}


def pretrain_flags(args: argparse.Namespace, corpus: Path, tokenizer: Path) -> list[str]:
    flags = ["--data.train", str(corpus / "train.txt"), "--data.validation", str(corpus / "val.txt"),
             "--data.cache_dir", str(corpus / "cache"), "--data.max_seq_length", str(args.seq),
             "--data.eval_batches", "2", "--data.num_workers", str(args.workers),
             "--model.preset", "albert-test" if args.quick else "albert-base",
             "--train.batch_size", str(args.batch), "--train.max_steps", str(args.steps), "--train.optimizer", "adamw",
             "--train.lr", "5e-4", "--train.log_every", str(args.log_every), "--train.eval_every", str(10**9),
             "--train.save_every", str(args.steps // 2), "--train.progress", "false", "--train.tensorboard", "false",
             PRECISION_FLAG, args.precision, "--train.compile", str(args.compile),
             "--tokenizer.path", str(tokenizer)]
    return flags


def run_pretrain(out: Path, flags: list[str], launcher: list[str] | None = None,
                 kill_after_checkpoint: bool = False) -> dict:
    """``litebert pretrain`` in this process (``launcher`` None), or as ``launcher + [-m litebert pretrain ...]``;
    the killed run is killed with SIGKILL as soon as its first checkpoint is complete."""
    start = time.perf_counter()
    killed_at = None
    if launcher is None:
        from litebert.cli import main as litebert_main

        if litebert_main(["pretrain", "--out", str(out), *flags]) != 0:
            raise RuntimeError(f"litebert pretrain --out {out} failed")
    else:
        cmd = [*launcher, "-m", "litebert", "pretrain", "--out", str(out), *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        if kill_after_checkpoint:
            while proc.poll() is None and latest_checkpoint(out, cleanup=False) is None:
                time.sleep(0.01)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = int(latest_checkpoint(out, cleanup=False).name.split("-")[1])
        _, stderr = proc.communicate()
        if killed_at is None and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    return {"losses": {r["step"]: r["loss"] for r in rows}, "rows": rows, "seconds": time.perf_counter() - start,
            "killed_at": killed_at}


def throughput(args: argparse.Namespace, run: dict, model_dir: Path, peak: float) -> dict:
    """Median tokens/s over the logged windows after the first fifth of the run (start-up, compilation)."""
    rows = run["rows"][max(1, len(run["rows"]) // 5):] or run["rows"]
    tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
    per_token = train_flops(load_config(model_dir), 1, args.seq, round(MLM_FRACTION * args.seq)) / args.seq
    return {"tokens_per_s": tps, "tflops": tps * per_token / 1e12, "mfu": tps * per_token / 1e12 / peak}


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    steps = sorted(set(a) & set(b))
    return max((abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps), default=float("inf"))


def check_training(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    corpus = write_corpus(work / "corpus", 12 if args.quick else 150)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, source = bf16_peak(device, dtype, args.peak_tflops)
    started = time.perf_counter()
    tokenizer, data = prepare_data(args, corpus)
    flags = pretrain_flags(args, corpus, tokenizer)
    print(f"       corpus, tokenizer and tokenized cache made in {time.perf_counter() - started:.0f}s; the data loader "
          f"alone gives {data['tokens_per_s']:,.0f} tokens/s ({data['workers']} workers), "
          f"{100 * data['fill']:.0f}% of batch positions real tokens")
    direct = run_pretrain(work / "direct", flags)
    summary = json.loads((work / "direct" / "metrics.json").read_text())
    speed = throughput(args, direct, work / "direct" / "final", peak)
    ok = summary.get("device", "").startswith(device.type) and summary.get("step") == args.steps
    target = " (target >= 40%)" if device.type == "cuda" else ""
    print(f"[{'PASS' if ok else 'FAIL'}] pretrain {'albert-test' if args.quick else 'albert-base'} {args.precision} "
          f"on {summary.get('device')}: {args.steps} steps of {args.batch}x{args.seq}, {speed['tokens_per_s']:,.0f} "
          f"tokens/s, {speed['tflops']:.3g} TFLOP/s, MFU {100 * speed['mfu']:.1f}% of {peak:.3g} TFLOP/s "
          f"({source}){target}; loss {direct['losses'][1]:.3f} -> {direct['losses'][args.steps]:.3f}")
    print(f"       MFU counting the padding positions too (the work done): {100 * speed['mfu'] / data['fill']:.1f}%")
    result = {"pretrain": {"ok": ok, **speed, "mfu_with_padding": speed["mfu"] / data["fill"], "peak_tflops": peak,
                           "peak_source": source, "data_loader": data, "summary": summary}}

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                str(args.port)]
    tr = run_pretrain(work / "torchrun", flags, torchrun)
    tr_speed = throughput(args, tr, work / "direct" / "final", peak)
    spread = max_rel_diff(tr["losses"], direct["losses"])
    ok = sorted(tr["losses"]) == sorted(direct["losses"]) and spread <= (1e-5 if device.type == "cpu" else 2e-2)
    print(f"[{'PASS' if ok else 'FAIL'}] torchrun --nproc_per_node 1: {tr_speed['tokens_per_s']:,.0f} tokens/s "
          f"({tr_speed['tokens_per_s'] / speed['tokens_per_s']:.2f}x the direct run), max relative loss difference "
          f"to it {spread:.1e}")
    result["torchrun"] = {"ok": ok, **tr_speed, "max_rel_loss_diff": spread}

    killed = run_pretrain(work / "resumed", flags, [sys.executable], kill_after_checkpoint=True)
    unfinished = killed["killed_at"] is not None and not (work / "resumed" / "final").exists()
    resumed = run_pretrain(work / "resumed", flags)
    diff = max_rel_diff(resumed["losses"], direct["losses"])
    allowed = 1e-5 if device.type == "cpu" else max(2 * spread, 1e-3)
    ok = unfinished and sorted(resumed["losses"]) == list(range(1, args.steps + 1)) and diff <= allowed
    print(f"[{'PASS' if ok else 'FAIL'}] kill -9 after the step-{killed['killed_at']} checkpoint and resume: max "
          f"relative loss difference to the uninterrupted run {diff:.1e} (allowed {allowed:.0e})"
          + ("" if unfinished else "; the run ended before it could be killed (raise --steps)"))
    result["resume"] = {"ok": ok, "killed_at": killed["killed_at"], "max_rel_loss_diff": diff}
    return result


def check_inference(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    try:
        import transformers
    except ImportError:
        print("[SKIP] inference: transformers is not installed")
        return {"ok": True, "skipped": "transformers is not installed"}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    name = "albert-test" if args.quick else "albert-base"
    torch.manual_seed(0)
    model_dir = litebert.EncoderForSequenceClassification(preset(name)).save_pretrained(work / "clf")
    ours = litebert.from_pretrained(str(model_dir)).to(device, dtype).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), attn_implementation="sdpa").to(device, dtype).eval()
    batch, seq = (4, 16) if args.quick else (64, 128)
    inputs = padded_inputs(ours.config.vocab_size, batch, seq, device)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    forwards = {"litebert": lambda: ours(**inputs, first_token_only=True).logits,
                "transformers": lambda: theirs(**inputs).logits}
    times: dict[str, list[float]] = {k: [] for k in forwards}
    with torch.inference_mode():
        diff = float((forwards["litebert"]().float() - forwards["transformers"]().float()).abs().max())
        for _ in range(3):
            for f in forwards.values():
                f()
        for _ in range(args.inference_rounds):  # interleaved, so a slow spell hits both
            for k, f in forwards.items():
                sync(device)
                t = time.perf_counter()
                f()
                sync(device)
                times[k].append(time.perf_counter() - t)
    seq_s = {k: batch / sorted(v)[len(v) // 2] for k, v in times.items()}
    ratio = seq_s["litebert"] / seq_s["transformers"]
    ok = diff <= (0.1 if dtype == torch.bfloat16 else 1e-3)
    print(f"[{'PASS' if ok else 'FAIL'}] inference {name} {args.precision} {batch}x{seq} on {device}: litebert "
          f"{seq_s['litebert']:,.0f} seq/s, transformers {seq_s['transformers']:,.0f} seq/s ({ratio:.2f}x); max "
          f"|logit diff| {diff:.2e}")
    return {"ok": ok, "sequences_per_s": seq_s, "ratio": ratio, "max_abs_logit_diff": diff,
            "transformers": transformers.__version__}


# -- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny presets and few steps (a smoke test of the script)")
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 where native, else fp32")
    p.add_argument("--steps", type=int, help="pre-training steps (default 300; quick 16)")
    p.add_argument("--batch", type=int, help="sequences per step (default 64; quick 4)")
    p.add_argument("--seq", type=int, help="sequence length (default 512; quick 32)")
    p.add_argument("--vocab", type=int, help="tokenizer vocabulary (default 8000; quick 300)")
    p.add_argument("--workers", type=int,
                   help="data-loading processes (default: all CPUs but two, at most 12, on a GPU; else 0)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile of the encoder")
    p.add_argument("--peak-tflops", type=float, help="the MFU denominator, TFLOP/s (default: spec sheet or measured)")
    p.add_argument("--inference-rounds", type=int, default=20)
    p.add_argument("--port", type=int, default=29561, help="torchrun's rendezvous port")
    p.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    p.add_argument("--json-out", help="write every figure to this JSON file")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    defaults = {"steps": 16, "batch": 4, "seq": 32, "vocab": 300} if args.quick else \
        {"steps": 300, "batch": 64, "seq": 512, "vocab": 8000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:  # masking runs in Python: on a GPU, most of the CPUs feed it
        args.workers = max(1, min(12, (os.cpu_count() or 4) - 2)) if gpu else 0
    if args.precision is None:
        args.precision = "bf16" if hardware().native_bf16(args.device) else "fp32"
    args.log_every = max(1, args.steps // 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu --quick for the CPU smoke test", file=sys.stderr)
        return 2
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else hardware().cpu_model
    print(f"litebert {litebert.__version__}, torch {torch.__version__}, {device}: {where}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        work = Path(args.work or tmp)
        results = {"device": str(device), "device_name": where, "torch": torch.__version__, "args": vars(args),
                   "parity": check_parity(args, device)}
        results.update(check_training(args, device, work))
        results["inference"] = check_inference(args, device, work)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["ok"] = all(v["ok"] for v in results.values() if isinstance(v, dict) and "ok" in v)
    print(f"{'all checks passed' if results['ok'] else 'SOME CHECKS FAILED'} in {results['seconds']:.0f}s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
