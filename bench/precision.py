"""fp32 against bf16 training steps of litebert on this CPU, side by side, and what ``precision: auto`` picks here.

    .venv/bin/python bench/precision.py            # the demo's ALBERT (H=256, 4 passes), batch 16 x seq 128
    .venv/bin/python bench/precision.py --quick    # tiny sizes, a smoke test (seconds)
    LITEBERT_CPU=avx2 .venv/bin/python bench/precision.py   # what auto picks on the AVX2 class, on this machine

One step is forward + backward (MLM + SOP) + an AdamW step, as `litebert pretrain` runs it; bf16 under
``torch.autocast`` (the recipe's ``precision: bf16``). Both precisions start from the same weights and see the same
batches, interleaved round by round in one process (`litebert.perf.interleaved_step_times`), so load from other
processes lands on both alike. The figure to read is the ratio: bf16 step time / fp32 step time, > 1 where bf16 is
emulated. The result names the CPU, its capability and whether bf16 is native (`litebert.runtime`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

import litebert
from litebert.perf import OtherLoad, interleaved_step_times, median
from litebert.runtime import hardware, resolve_precision


def make_step(model: torch.nn.Module, batch: dict, bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "embedding_size": 32, "vocab_size": 1000} if args.quick else
            {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
             "embedding_size": 128, "vocab_size": 30000})
    config = litebert.preset("albert-base", **size)
    model = litebert.EncoderForPreTraining(config).train()
    ids = torch.randint(5, config.vocab_size, (args.batch, args.seq))
    labels = torch.full_like(ids, -100)
    masked = torch.rand(ids.shape) < 0.15
    labels[masked] = ids[masked]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": labels, "sentence_order_label": torch.randint(0, 2, (args.batch,))}
    steps = {"fp32": make_step(model, batch, bf16=False), "bf16": make_step(copy.deepcopy(model), batch, bf16=True)}
    with OtherLoad() as load:
        times = interleaved_step_times(steps, args.rounds, args.steps, args.warmup)
    hw = hardware()
    ms = {name: 1e3 * median(t["wall"]) for name, t in times.items()}
    return {"cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability, "native_bf16": hw.cpu_bf16, "amx": hw.amx,
            "simulated": hw.simulated, "auto_picks": resolve_precision("auto", "cpu", warn=False),
            "threads": args.threads, "shape": f"{args.batch}x{args.seq}", "hidden_size": config.hidden_size,
            "step_ms": ms, "bf16_over_fp32": ms["bf16"] / ms["fp32"], "runs_ms": {
                name: [round(1e3 * x, 1) for x in t["wall"]] for name, t in times.items()},
            "other_load": load.fraction}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and batch: a smoke test")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128; quick 16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per precision per round (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per precision first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure on the last line")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 16)
    args.seq = args.seq or (16 if args.quick else 128)
    r = run(args)
    print(f"CPU: {r['cpu']} ({r['cpu_capability']}, native bf16: {'yes' if r['native_bf16'] else 'no'}"
          + (f", simulated {r['simulated']}" if r["simulated"] else "") + f"), {r['threads']} threads")
    print(f"ALBERT H={r['hidden_size']} training step, batch {r['shape']}: fp32 {r['step_ms']['fp32']:.0f} ms, "
          f"bf16 autocast {r['step_ms']['bf16']:.0f} ms -> bf16 / fp32 = {r['bf16_over_fp32']:.2f}x the time")
    print(f"precision auto picks: {r['auto_picks']}"
          + ("" if r["other_load"] is None else f"   (other processes: {100 * r['other_load']:.0f}% of the CPUs)"))
    if args.json:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
