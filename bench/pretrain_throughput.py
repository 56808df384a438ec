"""ALBERT pre-training throughput and peak memory: litebert vs ``transformers.AlbertForPreTraining``, side by side.

    .venv/bin/python bench/pretrain_throughput.py            # hidden 256, 4 layers, batch 32 x seq 128 (~2 min quiet)
    .venv/bin/python bench/pretrain_throughput.py --quick    # tiny sizes, a smoke test (seconds)
    .venv/bin/python bench/pretrain_throughput.py --json     # ... and one JSON object on the last line

One training step is forward + backward (MLM + SOP loss) + a fused AdamW step (``transformers.Trainer``'s default
optimizer with torch >= 2.8), bf16 rows under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Four rows:

- ``litebert bf16``     litebert with bf16 autocast, ``attn_implementation="sdpa"``;
- ``transformers fp32`` ``AlbertForPreTraining`` out of the box (fp32, its default attention);
- ``transformers bf16`` and ``litebert fp32``, the like-for-like rows, so the table shows how much of the speedup is
  bf16 (available to both) and how much is litebert doing less work (the MLM head on masked positions only).

The headline ratio (targets: >= 3x tokens/s at <= 60% of the peak memory) is litebert at the precision ``auto``
picks on this CPU (bf16 where it is native, else fp32) against transformers fp32. Where bf16 is emulated the bf16
rows are n/a unless ``--emulated-bf16`` asks for them (then the table shows what emulation costs).

Why the numbers can be trusted:

- Same computation: a random-init ``AlbertForPreTraining`` is saved and loaded by both libraries, and before timing
  the fp32 losses of both on the first batch must agree (printed; the run stops if they do not).
- Same inputs: full-length synthetic batches (no padding), 15% of positions per row carry MLM labels (exactly
  ``round(0.15 * seq)``, so every step does the same work), random SOP labels; every row cycles through the same
  batches. Same optimizer, same thread count (``--threads``).
- Throughput: all rows live in one process and are timed interleaved (``--rounds`` rounds; each row runs ``--steps``
  steps per round; a fresh order each round) after ``--warmup`` untimed steps, so load from other processes
  lands on all rows alike. Tokens/s = batch * seq / median step time; the 25-75% range of step times is printed
  so the noise is visible. The share of the CPUs that other processes took meanwhile is measured (``/proc/stat``)
  and printed: on a busy machine the ratios shrink, because a descheduled OpenMP thread stalls each of litebert's
  many small ops. The CPU-seconds per step are recorded too; with ``--threads 1`` they are what the step takes on
  a quiet machine, so their ratio is the figure to trust when the machine cannot be had to oneself.
- Peak memory: each row runs a few steps in a fresh subprocess of its own (the allocator's cached blocks and
  high-water mark would otherwise leak between rows; the four run at once, before the timing): peak RSS during training minus RSS with the model and
  optimizer built, i.e. what training adds on top of the weights (gradients, AdamW state, activations, logits,
  allocator slack). The kernel's peak-RSS mark is reset at that point (``/proc/self/clear_refs``); where that is
  not possible the peak since process start (``ru_maxrss``) is used and the JSON says so.
- FLOPs: "useful" FLOPs per step are what litebert executes — 3x the forward matmuls (forward + 2x backward),
  counted per *pass* (ALBERT reuses one layer's weights 4 times, the work is still done 4 times), the attention
  score and value products, and the MLM head on the masked positions only. The same useful figure divides every
  row's step time, so rows compare directly; ``transformers`` also projects the 85% unmasked positions onto the
  vocabulary, which is printed as its executed FLOPs. The fraction of peak divides by the machine's measured
  matmul peak in the row's dtype (best of a few 2048^3 matmuls, measured before and after the timing).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import litebert
from litebert.perf import (
    MiB,
    OtherLoad,
    current_rss,
    format_table,
    interleaved_step_times,
    matmul_peak,
    median,
    peak_rss,
    reset_peak_rss,
    run_json_children,
)
from litebert.runtime import hardware, resolve_precision

# row name -> (library, dtype). The headline compares litebert at the precision `auto` picks with transformers fp32.
ROWS = {
    "litebert bf16": ("litebert", "bf16"),
    "transformers fp32": ("transformers", "fp32"),
    "transformers bf16": ("transformers", "bf16"),
    "litebert fp32": ("litebert", "fp32"),
}
BASELINE = "transformers fp32"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_SPEEDUP, TARGET_MEMORY = 3.0, 0.60
MASK_ID, CLS_ID, SEP_ID, FIRST_NORMAL_ID = 4, 2, 3, 5
MLM_FRACTION = 0.15
BUSY = 0.10  # share of the CPUs taken by other processes above which the report warns
MEMORY_STEPS = 3  # the first step allocates AdamW's state; later steps reach the steady-state peak


# -- model, data, FLOPs --------------------------------------------------------------------------------------------
def model_config(quick: bool) -> litebert.AlbertConfig:
    if quick:
        return litebert.preset("albert-base", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128, vocab_size=1000, embedding_size=32, max_position_embeddings=64)
    return litebert.preset("albert-base", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, vocab_size=30000)


def make_batches(config: litebert.AlbertConfig, batch: int, seq: int, count: int = 4, seed: int = 0) -> list[dict]:
    """``count`` full-length sentence pairs ``[CLS] a [SEP] b [SEP]`` of random ids, ``round(0.15 * seq)`` masked
    positions per row (labels -100 elsewhere), random SOP labels. Shapes: (batch, seq), SOP (batch,)."""
    g = torch.Generator().manual_seed(seed)
    mid = seq // 2
    n_masked = max(1, round(MLM_FRACTION * seq))
    special = torch.zeros(seq, dtype=torch.bool)
    special[[0, mid - 1, seq - 1]] = True
    batches = []
    for _ in range(count):
        ids = torch.randint(FIRST_NORMAL_ID, config.vocab_size, (batch, seq), generator=g)
        ids[:, 0], ids[:, mid - 1], ids[:, seq - 1] = CLS_ID, SEP_ID, SEP_ID
        score = torch.rand(batch, seq, generator=g).masked_fill(special, -1.0)
        masked = torch.zeros(batch, seq, dtype=torch.bool).scatter_(1, score.topk(n_masked, dim=1).indices, True)
        labels = ids.masked_fill(~masked, -100)
        token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
        token_type_ids[:, mid:] = 1
        batches.append({"input_ids": ids.masked_fill(masked, MASK_ID), "attention_mask": torch.ones_like(ids),
                        "token_type_ids": token_type_ids, "labels": labels,
                        "sentence_order_label": torch.randint(0, 2, (batch,), generator=g)})
    return batches


def forward_flops(config: litebert.AlbertConfig, tokens: int, sequences: int, seq: int, mlm_positions: int) -> float:
    """Matmul FLOPs of one forward pass (2 per multiply-add). ALBERT shares weights across passes, but each of the
    ``num_hidden_layers`` passes still does the full work."""
    H, E, I, V = config.hidden_size, config.embedding_size, config.intermediate_size, config.vocab_size
    per_pass = 2 * H * 3 * H + 2 * H * H + 2 * 2 * H * I + 2 * 2 * seq * H  # qkv, out, ffn up+down, QK^T and PV
    per_token = 2 * E * H + config.num_hidden_layers * per_pass  # + the E -> H projection
    per_mlm_position = 2 * H * E + 2 * E * V  # transform + decoder
    per_sequence = 2 * H * H + 2 * H * 2  # pooler + SOP classifier
    return tokens * per_token + mlm_positions * per_mlm_position + sequences * per_sequence


def train_flops(config: litebert.AlbertConfig, batch: int, seq: int, mlm_positions: int) -> float:
    """Forward + backward (2x forward: gradients of activations and of weights)."""
    return 3 * forward_flops(config, batch * seq, batch, seq, mlm_positions)


# -- building and stepping -----------------------------------------------------------------------------------------
def save_reference_checkpoint(config: litebert.AlbertConfig, out_dir: str, seed: int = 0) -> None:
    """A random-init ``AlbertForPreTraining`` in ``transformers``' own format, for both libraries to load."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    transformers.AlbertForPreTraining(transformers.AlbertConfig(**config.to_hf_dict())).save_pretrained(out_dir)


def load_model(library: str, model_dir: str) -> torch.nn.Module:
    if library == "litebert":
        model = litebert.from_pretrained(model_dir)
        report = model.load_report
        if report.missing or report.unexpected:
            raise RuntimeError(f"litebert did not load every weight: {report.summary()}")
        return model.train()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers.AlbertForPreTraining.from_pretrained(model_dir).train()


def attention_name(library: str, model: torch.nn.Module) -> str:
    if library == "litebert":
        return model.config.attn_implementation + "*"  # see the footnote under the table
    return getattr(model.config, "_attn_implementation", None) or "default"


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict], dtype: str):
    cycle = itertools.cycle(batches)
    bf16 = dtype == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**next(cycle)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def first_batch_loss(model: torch.nn.Module, batch: dict) -> float:
    """fp32 loss in eval mode (the SOP head's dropout off), before any training step."""
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train()
    return loss


# -- peak memory (child process) -----------------------------------------------------------------------------------
def machine_rows(with_emulated_bf16: bool = False) -> dict[str, tuple[str, str]]:
    """The rows this machine runs: the bf16 ones only where bf16 is native (or when asked for anyway)."""
    native = hardware().cpu_bf16
    return {name: row for name, row in ROWS.items() if row[1] == "fp32" or native or with_emulated_bf16}


def ours() -> str:
    return f"litebert {resolve_precision('auto', 'cpu', warn=False)}"


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: build one row's model and optimizer, then report how far training raises the RSS."""
    torch.set_num_threads(args.threads)
    library, dtype = ROWS[args.memory_child]
    config = model_config(args.quick)
    batches = make_batches(config, args.batch, args.seq)
    model = load_model(library, args.model_dir)
    step = make_train_step(model, make_optimizer(model), batches, dtype)
    gc.collect()
    baseline = current_rss()
    exact = reset_peak_rss()
    for _ in range(MEMORY_STEPS):
        step()
    peak = peak_rss()
    print(json.dumps({"row": args.memory_child, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
                      "peak_delta_bytes": peak - baseline, "peak_reset": exact}))


def measure_memory(args: argparse.Namespace, model_dir: str) -> dict[str, dict]:
    """One fresh process per row, all started together: each one's peak RSS is its own."""
    common = [str(Path(__file__).resolve()), "--model-dir", model_dir, "--batch", str(args.batch), "--seq",
              str(args.seq), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    results = run_json_children([common + ["--memory-child", row] for row in machine_rows(args.emulated_bf16)])
    return {r["row"]: r for r in results}


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps per row per round (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row before timing (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; quick 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence, no padding (default 128; quick 32)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every row (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test that runs in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure on the last line")
    p.add_argument("--emulated-bf16", action="store_true",
                   help="time the bf16 rows even where bf16 is emulated (slow; by default they are n/a there)")
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", choices=list(ROWS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {"steps": 2, "warmup": 1, "rounds": 2, "batch": 4, "seq": 32}
    full = {"steps": 3, "warmup": 2, "rounds": 5, "batch": 32, "seq": 128}
    defaults = quick if args.quick else full
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "rounds", "batch", "seq", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.seq < 4:
        p.error("--seq must be >= 4 ([CLS] a [SEP] b [SEP])")
    return args


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    import transformers

    torch.set_num_threads(args.threads)
    config = model_config(args.quick)
    batches = make_batches(config, args.batch, args.seq)
    mlm_positions = int((batches[0]["labels"] != -100).sum())
    tokens = args.batch * args.seq
    peak_n, peak_reps = (256, 2) if args.quick else (2048, 5)

    with tempfile.TemporaryDirectory() as model_dir:
        save_reference_checkpoint(config, model_dir)
        rows_run = machine_rows(args.emulated_bf16)
        log(f"peak memory: {len(rows_run)} subprocesses ...")
        memory = measure_memory(args, model_dir)

        log("matmul peak ...")
        dtypes = {d: DTYPES[d] for _, d in rows_run.values()}
        peaks = {name: matmul_peak(dtype, peak_n, peak_reps) for name, dtype in dtypes.items()}
        models, steps, attention = {}, {}, {}
        for name, (library, dtype) in rows_run.items():
            models[name] = load_model(library, model_dir)
            attention[name] = attention_name(library, models[name])
            steps[name] = make_train_step(models[name], make_optimizer(models[name]), batches, dtype)

    losses = {lib: first_batch_loss(models[f"{lib} fp32"], batches[0]) for lib in ("litebert", "transformers")}
    loss_diff = abs(losses["litebert"] - losses["transformers"])
    if loss_diff > 1e-3 * max(1.0, abs(losses["transformers"])):
        raise RuntimeError(f"the two libraries compute different losses on the same weights and batch: {losses}")

    log(f"timing: {args.rounds} rounds x {args.steps} steps x {len(rows_run)} rows (+{args.warmup} warm-up each) ...")
    with OtherLoad() as other_load:
        times = interleaved_step_times(steps, args.rounds, args.steps, args.warmup)
    for name, dtype in dtypes.items():  # the best of before and after: load elsewhere only ever lowers it
        peaks[name] = max(peaks[name], matmul_peak(dtype, peak_n, peak_reps))

    useful = train_flops(config, args.batch, args.seq, mlm_positions)
    executed = {"litebert": useful, "transformers": train_flops(config, args.batch, args.seq, tokens)}
    rows = {}
    for name, (library, dtype) in rows_run.items():
        ts = sorted(times[name]["wall"])
        step_s = median(ts)
        rows[name] = {
            "library": library, "dtype": dtype, "attention": attention[name],
            "step_s_median": step_s, "step_s_p25": ts[len(ts) // 4], "step_s_p75": ts[(3 * len(ts)) // 4],
            "cpu_s_median": median(times[name]["cpu"]),
            "tokens_per_s": tokens / step_s,
            "peak_mem_mib": memory[name]["peak_delta_bytes"] / MiB,
            "peak_rss_mib": memory[name]["peak_rss_bytes"] / MiB,
            "useful_tflops": useful / step_s / 1e12,
            "frac_of_peak": useful / step_s / 1e12 / peaks[dtype],
        }

    def speed(a: str, b: str) -> float:
        return rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]

    def mem(a: str, b: str) -> float:
        return rows[a]["peak_mem_mib"] / rows[b]["peak_mem_mib"]

    headline = ours()
    speedup, memory_ratio = speed(headline, BASELINE), mem(headline, BASELINE)
    fair = {}
    for dtype in dtypes:
        fair.update({f"{dtype}_speedup": speed(f"litebert {dtype}", f"transformers {dtype}"),
                     f"{dtype}_memory_ratio": mem(f"litebert {dtype}", f"transformers {dtype}")})
    hw = hardware()
    return {
        "config": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                   "num_attention_heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
                   "embedding_size": config.embedding_size, "vocab_size": config.vocab_size, "batch": args.batch,
                   "seq": args.seq, "mlm_positions": mlm_positions, "threads": args.threads, "steps": args.steps,
                   "warmup": args.warmup, "rounds": args.rounds, "quick": args.quick},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "litebert": litebert.__version__, "cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability,
                     "native_bf16": hw.cpu_bf16, "simulated": hw.simulated, "machine": platform.machine()},
        "ours": headline,
        "not_run": {name: "bf16 is emulated on this CPU (no AVX-512-bf16/AMX); --emulated-bf16 times it"
                    for name in ROWS if name not in rows_run},
        "matmul_peak_tflops": peaks,
        "matmul_peak_size": peak_n,
        "useful_flops_per_step": useful,
        "executed_flops_per_step": executed,
        "first_batch_loss_fp32": losses,
        "rows": rows,
        "speedup": speedup,
        "memory_ratio": memory_ratio,
        "cpu_time_speedup": rows[BASELINE]["cpu_s_median"] / rows[headline]["cpu_s_median"],
        "fair": fair,
        "targets": {"speedup": TARGET_SPEEDUP, "memory_ratio": TARGET_MEMORY,
                    "speedup_met": speedup >= TARGET_SPEEDUP, "memory_met": memory_ratio <= TARGET_MEMORY},
        "peak_reset_exact": all(m["peak_reset"] for m in memory.values()),
        "other_load": other_load.fraction,
    }


def report(r: dict) -> str:
    c, rows, base, t = r["config"], r["rows"], r["rows"][BASELINE], r["targets"]
    peaks, flops, fair, load = r["matmul_peak_tflops"], r["executed_flops_per_step"], r["fair"], r["other_load"]
    header = ["row", "dtype", "attention", "step ms (p25-p75)", "tokens/s", "x tok/s", "peak MiB", "x mem",
              "useful TFLOP/s", "% of peak"]
    body = [[name, row["dtype"], row["attention"],
             f"{row['step_s_median'] * 1e3:.0f} ({row['step_s_p25'] * 1e3:.0f}-{row['step_s_p75'] * 1e3:.0f})",
             f"{row['tokens_per_s']:.0f}", f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}",
             f"{row['peak_mem_mib']:.0f}", f"{row['peak_mem_mib'] / base['peak_mem_mib']:.2f}",
             f"{row['useful_tflops']:.3f}", f"{100 * row['frac_of_peak']:.0f}% {row['dtype']}"]
            for name, row in rows.items()]
    busy = load is not None and load > BUSY

    def verdict(met: bool) -> str:
        return "MET" if met else "NOT MET"

    return "\n".join([
        (f"ALBERT pre-training step (MLM + SOP, fused AdamW): hidden {c['hidden_size']}, {c['num_hidden_layers']} "
         f"passes, vocab {c['vocab_size']}, batch {c['batch']} x seq {c['seq']} ({c['mlm_positions']} MLM "
         f"positions), {c['threads']} threads; torch {r['versions']['torch']}, transformers "
         f"{r['versions']['transformers']}, CPU {r['versions']['cpu']} ({r['versions']['cpu_capability']}"
         + (f", simulated {r['versions']['simulated']}" if r["versions"]["simulated"] else "") + ")"),
        (f"matmul peak (best {r['matmul_peak_size']}^3): "
         + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items())
         + f" TFLOP/s; useful work {flops['litebert'] / 1e9:.1f} GFLOP/step (transformers executes "
         f"{flops['transformers'] / 1e9:.1f}: its MLM decoder runs on every position)"),
        ("other processes' share of the CPUs while timing: " + ("unknown" if load is None else f"{100 * load:.0f}%")
         + (" -- a busy machine slows the many small ops of litebert's rows most: the ratios understate a quiet "
            "machine's" if busy else "")),
        (f"first-batch fp32 loss: litebert {r['first_batch_loss_fp32']['litebert']:.6f}, "
         f"transformers {r['first_batch_loss_fp32']['transformers']:.6f}"),
        "",
        format_table(header, body),
        *(f"{name}: n/a ({reason})" for name, reason in r["not_run"].items()),
        "",
        ("x = relative to transformers fp32 (out of the box). peak MiB = peak RSS during training above the RSS with "
         "model + optimizer built, one fresh process per row" + ("" if r["peak_reset_exact"] else
                                                                   " (peak since process start)")),
        ("* litebert's 'sdpa' trains in bf16 at seq <= 384 with the explicit softmax, faster on CPU "
         "(layers._explicit_attention_is_faster)"),
        "",
        (f"headline, {r['ours']} (precision auto) vs transformers fp32: {r['speedup']:.2f}x tokens/s (target >= "
         f"{t['speedup']:.0f}x: {verdict(t['speedup_met'])}), {100 * r['memory_ratio']:.0f}% of the peak memory "
         f"(target <= {100 * t['memory_ratio']:.0f}%: {verdict(t['memory_met'])})"),
        (f"CPU-seconds per step, transformers fp32 / {r['ours']}: {r['cpu_time_speedup']:.2f}x"
         + (" (single-threaded, so unaffected by other processes)" if c["threads"] == 1 else
            " (includes OpenMP spin-waits; run with --threads 1 for a figure other processes cannot skew)")),
        "like for like: " + "; ".join(f"{d} {fair[d + '_speedup']:.2f}x tokens/s at "
                                      f"{100 * fair[d + '_memory_ratio']:.0f}% memory"
                                      for d in ("bf16", "fp32") if d + "_speedup" in fair),
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    result = run(args)
    print(report(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
