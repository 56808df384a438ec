"""Compression report: teacher vs student parameters, on-disk size, CPU latency and task score with retention.

Latency is measured side by side in one process and interleaved: every repeat times each model once, in
alternating order, on the same random (B, T) input without padding, so machine load (other jobs on a shared CPU)
hits both models alike. The speed-up is the median over repeats of the paired ratio teacher / student, which is
more robust to load spikes than a ratio of medians; both are reported.

``compression_report`` returns a JSON-able dict; ``write_report`` writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .perf import interleaved_step_times
from .runtime import hardware, resolve_precision

__all__ = ["compression_report", "count_parameters", "disk_size", "mcnemar", "measure_latency", "render_markdown",
           "write_report"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Distinct parameters (shared / tied counted once): total, in embeddings, and the rest."""
    seen: set[int] = set()
    total = embedding = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".embeddings." in f".{name}" or name.startswith("embeddings."):
            embedding += p.numel()
    return {"total": total, "embeddings": embedding, "non_embedding": total - embedding}


def disk_size(model_dir: str | Path | None) -> int | None:
    """Bytes of the weight files of a model directory (safetensors or legacy .bin), None when there are none."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    files = list(d.glob("*.safetensors")) or list(d.glob("pytorch_model*.bin"))
    return sum(f.stat().st_size for f in files) if files else None


@torch.inference_mode()
def measure_latency(models: Mapping[str, nn.Module], batch_size: int, seq_len: int, vocab_size: int,
                    repeats: int = 10, warmup: int = 2, precision: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """Interleaved forward timings (ms) of each model on one (batch_size, seq_len) input, under bf16 autocast when
    ``precision`` is ``"bf16"``.

    Returns ``{"ms": {name: median}, "best_ms": {name: fastest run}, "runs": {name: [ms, ...]},
    "paired_speedup": {name: median ratio of the first model's time to this one's}}``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    names = list(models)
    for m in models.values():
        m.eval()

    def step(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                return model(ids, mask, types)

        return run

    times = interleaved_step_times({n: step(models[n]) for n in names}, rounds=repeats, steps_per_round=1,
                                   warmup=warmup)
    runs = {n: [t * 1e3 for t in times[n]["wall"]] for n in names}
    base = names[0]
    return {
        "ms": {n: statistics.median(v) for n, v in runs.items()},
        "best_ms": {n: min(v) for n, v in runs.items()},  # load from other jobs only ever slows a run down
        "runs": {n: [round(x, 3) for x in v] for n, v in runs.items()},
        "paired_speedup": {n: statistics.median(a / b for a, b in zip(runs[base], runs[n])) for n in names},
    }


def mcnemar(a_right: Sequence[bool], b_right: Sequence[bool]) -> dict[str, Any]:
    """Paired comparison of two models on the same examples: how many only A / only B gets right, and the exact
    two-sided McNemar p-value (binomial on the discordant pairs): a small gap on a few hundred examples is often
    noise, and this says how often."""
    import math

    if len(a_right) != len(b_right):
        raise ValueError(f"{len(a_right)} vs {len(b_right)} examples")
    only_a = sum(1 for a, b in zip(a_right, b_right) if a and not b)
    only_b = sum(1 for a, b in zip(a_right, b_right) if b and not a)
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"examples": len(a_right), "only_first_right": only_a, "only_second_right": only_b, "p_value": p}


def _machine() -> dict[str, Any]:
    hw = hardware()
    return {"cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability, "native_bf16": hw.cpu_bf16,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def compression_report(
    models: Mapping[str, nn.Module],
    model_dirs: Mapping[str, str | Path | None] | None = None,
    scores: Mapping[str, float] | None = None,
    metric: str | None = None,
    ablation: Mapping[str, float | None] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 10,
    precisions: Sequence[str] | str = ("fp32", "auto"),
    vocab_size: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure ``models`` (``{"teacher": ..., "student": ...}``, the teacher first) and collect the figures.

    ``scores`` are task scores (fractions) on a held-out split; retention = student / teacher. ``ablation`` adds
    rows of other students' scores (e.g. the same student trained without distillation). Latency is measured in each
    of ``precisions`` as :func:`~litebert.runtime.resolve_precision` resolves it on the CPU (``auto`` is bf16 only
    where it is native), each once."""
    names = list(models)
    teacher_name = names[0]
    vocab_size = vocab_size or min(m.config.vocab_size for m in models.values())
    model_dirs = model_dirs or {}
    report: dict[str, Any] = {"machine": _machine(), "details": dict(details or {}), "models": {}}
    for name, m in models.items():
        report["models"][name] = {"parameters": count_parameters(m), "disk_bytes": disk_size(model_dirs.get(name))}
    latency = []
    resolved = [resolve_precision(p, "cpu") for p in ([precisions] if isinstance(precisions, str) else precisions)]
    for precision in dict.fromkeys(resolved):
        for b in batch_sizes:
            warmup = 5 if b == 1 else 2
            res = measure_latency(models, b, seq_len, vocab_size, repeats=repeats, warmup=warmup, precision=precision)
            latency.append({"batch_size": b, "seq_len": seq_len, "precision": precision, **res})
    report["latency"] = latency
    if hasattr(os, "getloadavg"):  # other jobs on the machine: the paired ratios hold up, absolute times do not
        report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    if scores:
        report["metric"] = metric
        report["scores"] = dict(scores)
        if scores.get(teacher_name):
            report["retention_pct"] = {n: 100.0 * s / scores[teacher_name] for n, s in scores.items()
                                       if n != teacher_name}
    if ablation:
        report["ablation"] = {k: v for k, v in ablation.items() if v is not None}
        if scores and scores.get(teacher_name):
            report["ablation_retention_pct"] = {k: 100.0 * v / scores[teacher_name]
                                                for k, v in report["ablation"].items()}
    return report


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: a table per aspect, teacher first, ratios against the teacher."""
    models = report["models"]
    names = list(models)
    t = names[0]
    lines = ["# Compression report", ""]
    d = report.get("details", {})
    if d:
        lines += [f"- {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items()]
        lines.append("")
    mach = report["machine"]
    load = ""
    if mach.get("load_average_1min") is not None:
        load = (f" Load average during the timings: {mach['load_average_1min']:.1f} -> "
                f"{mach.get('load_average_1min_after', float('nan')):.1f} (on {mach['cores']} cores).")
    lines += [f"Machine: {mach['cpu']}, {mach['threads']} threads, torch {mach['torch']}.{load}", ""]

    lines += ["## Size", "", "| model | parameters | embeddings | non-embedding | on disk |",
              "|---|---:|---:|---:|---:|"]
    for n in names:
        p = models[n]["parameters"]
        lines.append(f"| {n} | {_m(p['total'])} | {_m(p['embeddings'])} | {_m(p['non_embedding'])} | "
                     f"{_mb(models[n]['disk_bytes'])} |")
    for n in names[1:]:
        pt, pn = models[t]["parameters"], models[n]["parameters"]
        ratio = f"{pt['total'] / pn['total']:.2f}x fewer parameters ({pt['non_embedding'] / pn['non_embedding']:.2f}x " \
                "fewer outside the embeddings)"
        db_t, db_n = models[t]["disk_bytes"], models[n]["disk_bytes"]
        if db_t and db_n:
            ratio += f", {db_t / db_n:.2f}x smaller on disk"
        lines += ["", f"{n}: {ratio}."]

    lines += ["", "## CPU latency (ms per forward, median of interleaved runs)", "",
              "| batch x seq | precision | " + " | ".join(names) + " | speed-up (paired median) | speed-up (ratio of medians) "
              "| speed-up (best runs) |",
              "|---|---|" + "---:|" * len(names) + "---:|---:|---:|"]
    for row in report["latency"]:
        ms = row["ms"]
        cells = " | ".join(f"{ms[n]:.1f}" for n in names)
        paired = ", ".join(f"{row['paired_speedup'][n]:.2f}x" for n in names[1:])
        medians = ", ".join(f"{ms[t] / ms[n]:.2f}x" for n in names[1:])
        best = row.get("best_ms")
        bests = ", ".join(f"{best[t] / best[n]:.2f}x" for n in names[1:]) if best else "—"
        lines.append(f"| {row['batch_size']} x {row['seq_len']} | {row['precision']} | {cells} | "
                     f"{paired} | {medians} | {bests} |")

    if report.get("scores"):
        lines += ["", f"## Task score: {report.get('metric') or 'score'}", "", "| model | score | retention |",
                  "|---|---:|---:|"]
        ret = report.get("retention_pct", {})
        for n, s in report["scores"].items():
            r = "100.0%" if n == t else (f"{ret[n]:.1f}%" if n in ret else "—")
            lines.append(f"| {n} | {100 * s:.2f}% | {r} |")
        for n, s in report.get("ablation", {}).items():
            r = report.get("ablation_retention_pct", {}).get(n)
            lines.append(f"| student, {n} | {100 * s:.2f}% | {'—' if r is None else f'{r:.1f}%'} |")
        pair = report.get("ablation_paired")
        if pair:
            lines += ["", (f"Paired on the same {pair['examples']} examples: only the distilled student is right on "
                          f"{pair['only_first_right']}, only the ablation on {pair['only_second_right']} (exact McNemar "
                          f"p = {pair['p_value']:.3g}).")]
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "report.json", out / "report.md"
    j.write_text(json.dumps(report, indent=2) + "\n")
    m.write_text(render_markdown(report))
    return j, m
