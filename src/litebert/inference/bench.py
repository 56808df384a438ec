"""``litebert bench``: inference latency of litebert against ``transformers``, side by side in one process.

    litebert bench                                   # ALBERT-base, DistilBERT-base, BERT-base at 1x128, 32x128, 1x512
    litebert bench --models bert-base --shapes 32x128 --backends transformers,fp32,bf16 --rounds 9
    litebert bench --models runs/rt/final            # a model directory instead of a preset

For every model, one set of weights (a preset with a seeded random initialisation, or a model directory) is loaded
into each contender: ``transformers`` (fp32, ``attn_implementation="sdpa"``, the baseline), litebert fp32, litebert
bf16 (weights cast once, bf16 end to end, as ``pipeline(..., precision="bf16")``), and the ONNX export quantised to int8
run by ONNX Runtime. Each runs a sequence classifier as the text-classification pipeline does: litebert's last layer
computes only the [CLS] position the head reads (``first_token_only``; same logits), transformers computes every
position, as it always does. Before any timing, every contender's logits are compared with transformers' on a padded
batch, and a difference past its tolerance stops the run: a fast wrong model is not a result.

Timing follows the rules of ``litebert.perf``: same inputs, same thread count, contenders interleaved round by round
in a fresh order each round, warm-up excluded, medians reported. The table gives each contender's median latency,
its speed-up over transformers (ratio of medians), and the fraction of the machine's measured matmul peak it reaches
(the full model's FLOPs, the same for every contender, / time / peak: fp32 peak for fp32 contenders, bf16 peak for
bf16; int8 against the fp32 peak, for scale). Each target the issue sets is checked; a missed one is printed with
the middle half of its per-round speed-ups and, for the PyTorch contenders, the %peak it would need. Targets depend
on the CPU class (`TARGETS`). A contender the machine cannot run well is not timed but reported as ``n/a (reason)``:
bf16 where the hardware probe says it is emulated (unless asked for by name in ``--backends``), int8 without ONNX
Runtime. Every result names the CPU and its capability. ``--json FILE`` keeps everything, including each contender's run times and the other processes' CPU load during the run, the figure
to check before trusting a ratio on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PRESETS, EncoderConfig, preset
from ..heads import EncoderForSequenceClassification, from_pretrained
from ..layers import prepack_linears
from ..perf import OtherLoad, format_table, interleaved_step_times, matmul_peak
from ..runtime import hardware, resolve_precision
from .memory import keep_freed_memory
from .peers import PEER_CLASS, PEERS, PeerUnavailable, peer_forward, peers_unavailable

__all__ = ["BACKENDS", "DEFAULT_MODELS", "DEFAULT_SHAPES", "TARGETS", "bench_main", "cpu_class", "forward_flops",
           "prepare_contenders", "run_bench", "unavailable"]

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("albert-base", "distilbert-base", "bert-base")
DEFAULT_SHAPES = ((1, 128), (32, 128), (1, 512))
DEFAULT_BACKENDS = ("transformers", "fp32", "bf16", "int8")
# litebert's own exports (``onnx``: ONNX Runtime fp32, ``openvino``: OpenVINO) join with --peers, so that the bench
# can time every backend `pipeline(backend="auto")` may pick.
OURS = (*DEFAULT_BACKENDS, "onnx", "openvino", "ctranslate2", "ctranslate2-int8")
BACKENDS = (*OURS, *PEERS)
# Largest |logit difference| to transformers fp32 accepted before timing, per contender (fp32 for the rest).
TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "int8": 0.5, "ctranslate2-int8": 0.5,
             **{p: 0.5 for p, c in PEER_CLASS.items() if c == "int8"}}
# Which accuracy class each of litebert's paths competes in (`PEER_CLASS` for the peers).
OUR_CLASS = {"fp32": "fp32", "bf16": "fp32", "onnx": "fp32", "openvino": "fp32", "ctranslate2": "fp32",
             "int8": "int8", "ctranslate2-int8": "int8"}
# What the issues ask for per CPU class, as (contender, shapes it applies to, minimum speed-up over transformers
# fp32). Where bf16 is native, bf16 and int8 carry the speed; where it is not, litebert's fp32 must at least match
# transformers and int8 must beat it.
TARGETS = {
    "native bf16": (("fp32", "batch 1", 1.2), ("fp32", "batch >1", 1.1), ("bf16", "all", 3.0), ("int8", "all", 3.0)),
    "no native bf16": (("fp32", "all", 1.0), ("int8", "all", 1.0)),
}


def cpu_class() -> str:
    """The key of `TARGETS` for this machine."""
    return "native bf16" if hardware().cpu_bf16 else "no native bf16"


def unavailable(backends: Sequence[str], explicit: bool = False) -> dict[str, str]:
    """``{backend: reason}`` for the contenders this machine cannot run (well); bf16 where it is emulated only when
    not ``explicit``ly asked for."""
    reasons = {}
    if "bf16" in backends and not hardware().cpu_bf16 and not explicit:
        reasons["bf16"] = "bf16 is emulated on this CPU (no AVX-512-bf16/AMX); --backends ...,bf16 times it anyway"
    for backend, module in (("int8", "onnxruntime"), ("onnx", "onnxruntime"), ("transformers", "transformers")):
        if backend in backends and not _importable(module):
            reasons[backend] = f"{module} is not installed (pip install 'litebert[test,export]')"
    if "openvino" in backends and not _importable("openvino"):
        reasons["openvino"] = "openvino is not installed (pip install 'litebert[peers]')"
    for backend in ("ctranslate2", "ctranslate2-int8"):
        if backend in backends and not (_importable("ctranslate2") and _importable("transformers")):
            reasons[backend] = ("ctranslate2 (and transformers, for its converter) is not installed "
                                "(pip install 'litebert[peers]')")
    reasons.update(peers_unavailable([b for b in backends if b in PEERS]))
    if any(b in PEERS for b in backends) and not _importable("transformers"):
        reasons.update({b: "the peers start from transformers' model, which is not installed" for b in backends
                        if b in PEERS})
    return reasons


def forward_flops(config: EncoderConfig, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of one encoder forward: the projections and feed-forward of every layer pass, the two
    attention products, and ALBERT's E -> H projection. Embedding lookups, norms and the small head are left out."""
    H, inner, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * H * H + 2 * H * inner) + 4 * batch * seq * seq * H
    E = getattr(config, "embedding_size", H)
    embedding_projection = 2 * tokens * E * H if E != H else 0
    return n * per_layer + embedding_projection


# -------------------------------------------------------------------------------------------------- contenders
def _check_model_name(name: str) -> None:
    if name not in PRESETS and not (Path(name) / "config.json").exists():
        raise ValueError(f"--models: '{name}' is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def _model_dir(name: str, workdir: Path) -> Path:
    """A preset -> a saved, seeded random sequence classifier; a directory -> itself."""
    _check_model_name(name)
    if name not in PRESETS:
        return Path(name)
    torch.manual_seed(0)
    model = EncoderForSequenceClassification(preset(name)).eval()
    return model.save_pretrained(workdir / name)


def _inputs(config: EncoderConfig, batch: int, seq: int, padded: bool = False, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # row i keeps seq - i * step tokens
        for i in range(1, batch):
            mask[i, max(1, seq - i * max(1, seq // (2 * batch))):] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if config.type_vocab_size:
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


Forward = Callable[[dict[str, Tensor]], Tensor]


def _torch_forward(model: nn.Module, first_token_only: bool = True) -> Forward:
    """``model``'s logits under inference mode; ``first_token_only`` as the text-classification pipeline runs it
    (transformers' wrapper ignores it)."""

    def forward(inputs: dict[str, Tensor]) -> Tensor:
        with torch.inference_mode():
            return model(**inputs, first_token_only=first_token_only).logits.float()

    return forward


def prepare_contenders(model_dir: Path, backends: Sequence[str], workdir: Path, threads: int,
                       missing: dict[str, str] | None = None) -> tuple[EncoderConfig, dict[str, Forward]]:
    """Load the same weights into every backend asked for; returns the config and ``{backend: forward}``. A peer that
    cannot run this model is left out, its reason put in ``missing``. The process's allocator is set up as
    `pipeline()` sets it (`keep_freed_memory`), for every contender alike."""
    keep_freed_memory()
    ours = from_pretrained(str(model_dir)).eval()
    config = ours.config
    forwards: dict[str, Forward] = {}
    hf = None
    for backend in backends:
        if backend == "transformers" or (backend in PEERS and hf is None):
            from .export import _hf_model

            hf = _hf_model(model_dir, attn_implementation="sdpa")
        if backend == "transformers":
            forwards[backend] = _torch_forward(hf)
        elif backend == "fp32":
            forwards[backend] = _torch_forward(prepack_linears(ours))
        elif backend == "bf16":
            # As `pipeline(..., precision="bf16")` runs: weights cast once, bf16 end to end (autocast would re-cast every
            # weight on every call, most of a batch-1 call, and rule out the fused oneDNN linears).
            forwards[backend] = _torch_forward(prepack_linears(copy.deepcopy(ours).to(torch.bfloat16)))
        elif backend in ("int8", "onnx"):
            from .export import OnnxEncoder

            out = workdir / f"{model_dir.name}-onnx"
            path = int8_export(ours, out) if backend == "int8" else _onnx_export(ours, out)
            encoder = OnnxEncoder(path, threads)
            forwards[backend] = lambda inputs, enc=encoder: torch.from_numpy(enc(**inputs)["logits"])
        elif backend == "openvino":
            from .engines import OpenVinoEncoder, export_openvino

            out = workdir / f"{model_dir.name}-onnx"
            encoder = OpenVinoEncoder(export_openvino(_onnx_export(ours, out), out), threads, precision="auto")
            forwards[backend] = lambda inputs, enc=encoder: torch.from_numpy(enc(**inputs)["logits"])
        elif backend in ("ctranslate2", "ctranslate2-int8"):
            from .engines import CT2_DIR, CTranslate2Encoder, export_ctranslate2

            out = workdir / f"{model_dir.name}-onnx"
            try:
                path = out / CT2_DIR if (out / CT2_DIR / "model.bin").is_file() else export_ctranslate2(ours, model_dir,
                                                                                                          out)
            except ValueError as err:  # a family CTranslate2 cannot convert
                if missing is None:
                    raise
                missing[backend] = str(err)
                continue
            encoder = CTranslate2Encoder(path, threads, "int8" if backend.endswith("int8") else "float32")
            forwards[backend] = lambda inputs, enc=encoder: torch.from_numpy(enc(**inputs)["logits"])
        elif backend in PEERS:
            try:
                forwards[backend] = peer_forward(backend, model_dir, hf, workdir, threads)
            except PeerUnavailable as err:
                if missing is None:
                    raise
                missing[backend] = str(err)
        else:
            raise ValueError(f"--backends: unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    return config, forwards


def int8_export(model: nn.Module, out_dir: Path, opset: int | None = None) -> Path:
    """A copy of ``model`` exported to ``out_dir`` (at ``opset``, default the exporter's) and quantised to int8;
    returns the int8 file."""
    from .export import INT8_FILE, quantize_int8

    return quantize_int8(_onnx_export(model, out_dir, opset), out_dir / INT8_FILE)


def _onnx_export(model: nn.Module, out_dir: Path, opset: int | None = None) -> Path:
    """A copy of ``model`` exported to ``out_dir`` once (the fp32 file the int8 and OpenVINO contenders start from)."""
    from .export import ONNX_FILE, OPSET, export_onnx

    path = out_dir / ONNX_FILE
    if path.is_file() and opset in (None, OPSET):
        return path
    return export_onnx(copy.deepcopy(model), path, opset=opset or OPSET)


def check_outputs(config: EncoderConfig, forwards: dict[str, Forward], reference: str) -> dict[str, float]:
    """Largest |logit difference| of each contender to ``reference`` on a padded batch; raises past tolerance."""
    inputs = _inputs(config, 4, 64, padded=True, seed=1)
    with torch.no_grad():
        ref = forwards[reference](inputs)
        diffs = {name: float((fwd(inputs) - ref).abs().max()) for name, fwd in forwards.items() if name != reference}
    for name, diff in diffs.items():
        limit = TOLERANCE.get(name, TOLERANCE["fp32"])
        if not diff <= limit:
            raise RuntimeError(f"{name}: logits differ from {reference} by {diff:.3g} (> {limit}); not timing")
    return diffs


# ------------------------------------------------------------------------------------------------------ timing
def _rounds_for(seconds_per_call: float, rounds: int, budget_s: float) -> int:
    """``rounds``, fewer when one round of all contenders would blow the per-shape time budget (min 3)."""
    return max(3, min(rounds, int(budget_s / max(seconds_per_call, 1e-6))))


def run_bench(models: Sequence[str], shapes: Sequence[tuple[int, int]], backends: Sequence[str], rounds: int = 7,
              budget_s: float = 60.0, threads: int | None = None, workdir: Path | None = None,
              skipped: dict[str, str] | None = None) -> dict[str, Any]:
    """Time every (model, shape, backend) except the ``skipped`` ones (``{backend: reason}``, reported as n/a); see
    the module docstring. Returns a JSON-able dict."""
    for name in models:  # before the slow set-up below
        _check_model_name(name)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    skipped = {b: r for b, r in (skipped or {}).items() if b in backends}
    backends = [b for b in backends if b not in skipped]
    if not backends:
        raise ValueError("no backend left to time: " + "; ".join(f"{b}: {r}" for b, r in skipped.items()))
    baseline = backends[0]
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if "bf16" in backends else {})}
    # An emulated bf16 matmul is slow enough that the usual 2048^3 would dominate a short run; a smaller one shows
    # its (low) peak as well.
    sizes = {key: 2048 if key == "fp32" or hardware().cpu_bf16 else 512 for key in dtypes}
    peaks = {key: matmul_peak(dtype, sizes[key]) for key, dtype in dtypes.items()}
    hw = hardware()
    results: dict[str, Any] = {"threads": threads, "baseline": baseline, "backends": list(backends),
                               "skipped": skipped, "cpu": hw.cpu_model, "cpu_capability": hw.cpu_capability,
                               "cpu_class": cpu_class(), "simulated": hw.simulated,
                               "matmul_peak_tflops": peaks, "rows": [], "capped_shapes": [], "missing": {}}
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="litebert-bench-")))
        with OtherLoad() as load:
            for name in models:
                model_dir = _model_dir(name, workdir)
                missing: dict[str, str] = {}
                config, forwards = prepare_contenders(model_dir, backends, workdir, threads, missing)
                if missing:
                    results["missing"][name] = missing
                diffs = check_outputs(config, forwards, baseline)
                logger.info("%s: max |logit diff| to %s: %s", name, baseline,
                            ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
                done = set()
                for batch, seq in shapes:
                    if seq > config.max_position_embeddings:  # what the model can take, as a pipeline truncates
                        results["capped_shapes"].append(f"{name} {batch}x{seq} ran as {batch}x"
                                                        f"{config.max_position_embeddings} (the model's positions)")
                        seq = config.max_position_embeddings
                    if (batch, seq) in done:
                        continue
                    done.add((batch, seq))
                    inputs = _inputs(config, batch, seq)
                    steps = {b: (lambda f=f, x=inputs: f(x)) for b, f in forwards.items()}
                    probe = interleaved_step_times(steps, rounds=1, steps_per_round=1, warmup=1)
                    per_round = sum(t["wall"][0] for t in probe.values())
                    n = _rounds_for(per_round, rounds, budget_s)
                    times = interleaved_step_times(steps, rounds=n, steps_per_round=1, warmup=0)
                    results["rows"].append(_row(name, config, batch, seq, times, baseline, diffs))
                    logger.info("%s %dx%d: %s", name, batch, seq, ", ".join(
                        f"{b} {1e3 * statistics.median(t['wall']):.1f} ms" for b, t in times.items()))
    # Measured again at the end, the higher kept: a burst of other work during either measurement only lowers it.
    for key, dtype in dtypes.items():
        peaks[key] = max(peaks[key], matmul_peak(dtype, sizes[key]))
    for row in results["rows"]:
        row["peak_fraction"] = {b: row["gflops"] * 1e9 / (ms / 1e3) / (peaks["bf16" if b == "bf16" else "fp32"] * 1e12)
                                for b, ms in row["ms"].items()}
    results["other_load"] = load.fraction
    results["targets"] = check_targets(results)
    for row in results["rows"]:
        row["vs_peers"] = compare_with_peers(row)
    return results


# Bench name of each `pipeline()` backend (torch runs in the precision `auto` resolves to).
_PIPELINE_BACKEND = {"onnx-int8": "int8", "openvino": "openvino", "onnx": "onnx", "ctranslate2": "ctranslate2",
                     "ctranslate2-int8": "ctranslate2-int8"}


def auto_choice(timed: Sequence[str]) -> str | None:
    """The contender `pipeline(backend="auto")` would run for a directory holding every litebert export timed here."""
    from .engines import choose_backend

    torch_name = "bf16" if hardware().cpu_bf16 else "fp32"
    names = {**_PIPELINE_BACKEND, "torch": torch_name}
    present = [b for b, n in names.items() if n in timed]
    return names[choose_backend(present)] if present else None


def compare_with_peers(row: dict[str, Any]) -> dict[str, Any]:
    """litebert against the fastest peer at equal accuracy, for one row: ``auto`` (the automatic choice against the
    fastest peer of its class), ``fp32`` and ``int8`` (litebert's fastest path of each class against the class's
    fastest peer). Each entry: our contender, the peer, and ``x`` = peer time / ours (>= 1: litebert is as fast)."""
    ms = row["ms"]
    if not any(b in PEER_CLASS for b in ms):
        return {}

    def fastest(names: Sequence[str]) -> str | None:
        return min(names, key=ms.__getitem__) if names else None

    out: dict[str, Any] = {}
    for cls in ("fp32", "int8"):
        ours = fastest([b for b in ms if OUR_CLASS.get(b) == cls])
        peer = fastest([b for b in ms if PEER_CLASS.get(b) == cls])
        if ours and peer:
            out[cls] = {"ours": ours, "peer": peer, "x": ms[peer] / ms[ours]}
    auto = auto_choice(list(ms))
    peer = fastest([b for b in ms if auto and PEER_CLASS.get(b) == OUR_CLASS[auto]])
    if auto and peer:
        out["auto"] = {"ours": auto, "peer": peer, "x": ms[peer] / ms[auto]}
    return out


def _row(name: str, config: EncoderConfig, batch: int, seq: int, times: dict[str, dict[str, list[float]]],
         baseline: str, diffs: dict[str, float]) -> dict[str, Any]:
    flops = forward_flops(config, batch, seq)
    ms = {b: 1e3 * statistics.median(t["wall"]) for b, t in times.items()}
    # Per round: the baseline's time / the contender's in the same round.
    rounds = {b: [x / y for x, y in zip(times[baseline]["wall"], t["wall"])] for b, t in times.items()}
    return {
        "model": name, "model_type": config.model_type, "batch": batch, "seq": seq, "gflops": flops / 1e9,
        "ms": ms,
        "speedup": {b: ms[baseline] / ms[b] for b in ms},
        "paired_speedup": {b: statistics.median(r) for b, r in rounds.items()},
        "round_speedup_quartiles": {b: _quartiles(r) for b, r in rounds.items()},
        "max_logit_diff": diffs, "runs_ms": {b: [round(1e3 * x, 2) for x in t["wall"]] for b, t in times.items()},
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue against each row it applies to (ALBERT's batch-1 fp32 target is 1.3x). For the
    PyTorch contenders, ``needed_peak_fraction`` is the fraction of the measured matmul peak the contender would have
    to reach to meet its target (the full model's FLOPs, as the %peak column): the target times transformers' own
    fraction, which shows how much room a target leaves when transformers already runs near the peak."""
    if results["baseline"] != "transformers":
        return []
    out = []
    for row in results["rows"]:
        for backend, applies, minimum in TARGETS[results["cpu_class"]]:
            if backend not in row["speedup"]:
                continue
            if (applies == "batch 1" and row["batch"] != 1) or (applies == "batch >1" and row["batch"] == 1):
                continue
            if (backend, applies, row["model_type"]) == ("fp32", "batch 1", "albert"):
                minimum = 1.3
            target = {"model": row["model"], "shape": f"{row['batch']}x{row['seq']}", "backend": backend,
                      "target": minimum, "speedup": row["speedup"][backend],
                      "met": row["speedup"][backend] >= minimum,
                      "round_speedup_quartiles": row["round_speedup_quartiles"][backend]}
            if backend in ("fp32", "bf16"):
                # Both fractions against the contender's own peak: the baseline's time at the contender's peak.
                baseline_fraction = row["peak_fraction"][backend] / row["speedup"][backend]
                target["needed_peak_fraction"] = minimum * baseline_fraction
            out.append(target)
    return out


def _quartiles(ratios: list[float]) -> list[float]:
    """First and third quartiles of the per-round speed-ups: how far one round's ratio strays, the figure to read a
    near miss against on a shared machine."""
    if len(ratios) < 2:
        return [ratios[0]] * 2
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return [q1, q3]


def render(results: dict[str, Any]) -> str:
    backends, baseline = results["backends"], results["baseline"]
    header = ["model", "shape", *(f"{b} ms" for b in backends), *(f"{b} x" for b in backends if b != baseline),
              *(f"{b} %peak" for b in backends)]
    rows = []
    for r in results["rows"]:
        rows.append([r["model"], f"{r['batch']}x{r['seq']}",
                     *(f"{r['ms'][b]:.1f}" if b in r["ms"] else "n/a" for b in backends),
                     *(f"{r['speedup'][b]:.2f}" if b in r["ms"] else "n/a" for b in backends if b != baseline),
                     *(f"{100 * r['peak_fraction'][b]:.0f}%" if b in r["ms"] else "n/a" for b in backends)])
    peaks = results["matmul_peak_tflops"]
    legend = (f"x = speed-up over {baseline} (ratio of medians); %peak = model FLOPs / time / measured matmul peak "
              f"({', '.join(f'{k} {v:.2f}' for k, v in peaks.items())} TFLOP/s at {results['threads']} threads; int8 "
              "against fp32).")
    machine = (f"CPU: {results['cpu']} ({results['cpu_capability']}, {results['cpu_class']}"
               + (f", simulated {results['simulated']}" if results.get("simulated") else "") + ")")
    lines = [machine, format_table(header, rows), "", legend]
    lines += [f"{backend}: n/a ({reason})" for backend, reason in results.get("skipped", {}).items()]
    lines += results.get("capped_shapes", [])
    lines += [f"{backend} on {model}: n/a ({reason})" for model, missing in results.get("missing", {}).items()
              for backend, reason in missing.items()]
    lines += _render_peers(results)
    if results.get("other_load") is not None:
        lines.append(f"Other processes used {100 * results['other_load']:.0f}% of the CPUs during the run.")
    if results["targets"]:
        met = sum(t["met"] for t in results["targets"])
        lines.append(f"Targets met: {met}/{len(results['targets'])}; missed: " + (", ".join(
            f"{t['backend']} {t['model']} {t['shape']} {t['speedup']:.3f}x < {t['target']}x (rounds "
            f"{t['round_speedup_quartiles'][0]:.2f}-{t['round_speedup_quartiles'][1]:.2f}x"
            + (f"; needs {100 * t['needed_peak_fraction']:.0f}% of peak" if "needed_peak_fraction" in t else "") + ")"
            for t in results["targets"] if not t["met"]) or "none"))
        if met < len(results["targets"]):
            lines.append("(rounds: the middle half of the per-round speed-ups, each transformers' time / the contender's "
                         "in the same round; needs: the %peak the contender would have to reach to meet its target)")
    return "\n".join(lines)


def _render_peers(results: dict[str, Any]) -> list[str]:
    """The peers table: per row, litebert's automatic choice and its fastest path per accuracy class against the
    fastest peer of that class, with %peak, and litebert fp32 against transformers; a cell below 1.0x says by how much
    it falls short."""
    rows, short = [], []
    for r in results["rows"]:
        vs = r.get("vs_peers")
        if not vs:
            continue
        shape = f"{r['batch']}x{r['seq']}"
        cells = [r["model"], shape]
        for key in ("auto", "fp32", "int8"):
            c = vs.get(key)
            if c is None:
                cells += ["n/a"] * 2
                continue
            frac = r["peak_fraction"]
            cells += [f"{c['ours']} {100 * frac[c['ours']]:.0f}% vs {c['peer']} {100 * frac[c['peer']]:.0f}%",
                      f"{c['x']:.2f}"]
            if c["x"] < 1.0:
                short.append(f"{key} {r['model']} {shape}: {c['ours']} is {100 * (1 - c['x']):.0f}% short of "
                             f"{c['peer']} ({c['x']:.2f}x)")
        vs_tf = r["speedup"].get("fp32") if "transformers" in r["ms"] else None
        cells.append(f"{vs_tf:.2f}" if vs_tf is not None else "n/a")
        if vs_tf is not None and vs_tf < 1.0:
            short.append(f"fp32 vs transformers {r['model']} {shape}: {100 * (1 - vs_tf):.0f}% short ({vs_tf:.2f}x)")
        rows.append(cells)
    if not rows:
        return []
    header = ["model", "shape", "auto vs fastest peer, same class (%peak)", "x", "best fp32-class vs fp32 peer",
              "x", "best int8 vs int8 peer", "x", "fp32 vs transformers x"]
    return ["", "litebert against the engines (x = peer time / litebert time; >= 1.00 means litebert is as fast):",
            format_table(header, rows), *(["Short: " + "; ".join(short)] if short else ["Short: none"])]


# --------------------------------------------------------------------------------------------------------- CLI
def _shape(text: str) -> tuple[int, int]:
    try:
        batch, seq = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not BATCHxSEQ (e.g. 32x128)") from None
    if batch < 1 or seq < 2:
        raise argparse.ArgumentTypeError(f"'{text}': batch must be >= 1 and seq >= 2")
    return batch, seq


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="litebert bench", description=(
        "Inference latency of litebert (fp32, bf16, ONNX int8) against transformers fp32 with SDPA: same weights, "
        "same inputs, interleaved in one process; prints latency ratios and the fraction of the matmul peak."))
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated presets or model directories (default: %(default)s)")
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in DEFAULT_SHAPES),
                        help="comma-separated BATCHxSEQ (default: %(default)s)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, the first is the baseline (default: {','.join(DEFAULT_BACKENDS)}, "
                             "less those this machine cannot run well)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per shape (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per shape; fewer rounds (min 3) when they would take longer (default: 60)")
    parser.add_argument("--threads", type=int, help="intra-op threads for every backend (default: torch's)")
    parser.add_argument("--peers", action="store_true",
                        help="also time litebert's ONNX/OpenVINO exports and the engines users pick instead (ONNX "
                             "Runtime plain/optimised/int8, OpenVINO, CTranslate2 fp32/int8), each skipped as n/a "
                             "when its package is absent; adds the litebert-vs-peers table")
    parser.add_argument("--json", help="also write the full results here")
    args = parser.parse_args(argv)
    try:
        shapes = [_shape(s) for s in args.shapes.split(",") if s]
    except argparse.ArgumentTypeError as e:
        parser.error(f"--shapes: {e}")
    default = ",".join(BACKENDS if args.peers else DEFAULT_BACKENDS)
    backends = [b for b in (args.backends or default).split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"--backends: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}")
    skipped = unavailable(backends, explicit=args.backends is not None)
    if "bf16" in backends and "bf16" not in skipped:
        resolve_precision("bf16", "cpu")  # warns where it is emulated
    results = run_bench([m for m in args.models.split(",") if m], shapes, backends, args.rounds, args.budget,
                        args.threads, skipped=skipped)
    print(render(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
