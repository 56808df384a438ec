"""Measurement helpers shared by ``litebert bench`` and the scripts in ``bench/``: the machine's matmul peak,
interleaved step timing, peak memory of a fresh process, other processes' load, and the table printer.

Timing is noisy on a small shared machine, so every comparison here follows the same rules: all contenders are timed
in one process, interleaved round by round in a fresh order each round (background load then hits each of them
alike, and no contender always runs right after the same other one), warm-up excluded, and summarised by the median.
Peak memory, in contrast, is measured in one fresh subprocess per contender, because the allocator's high-water mark
and its cached free blocks would otherwise leak from one contender into the next.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .runtime import hardware

MiB = 1 << 20


# -- matmul peak ---------------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` throughput of an (n, n) @ (n, n) matmul, in TFLOP/s: what the machine can do on a GEMM at
    the current thread count, taking the faster of ``torch.matmul`` and, where the hardware probe says it applies,
    the oneDNN matmul that litebert's inference linears use. The best run, not the median, because load from elsewhere only ever
    slows it down."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    kernels = [lambda: a @ b]
    if hardware().fused_linear(dtype):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        kernel()  # first call: primitive creation, page faults
        best = min(best, *(_timed(kernel) for _ in range(reps)))
    return 2 * n**3 / best / 1e12


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- interleaved timing --------------------------------------------------------------------------------------------
def interleaved_step_times(steps: dict[str, Callable[[], object]], rounds: int, steps_per_round: int,
                           warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each ``steps[name]``, as ``{"wall": [...], "cpu": [...]}``: ``warmup`` untimed calls
    each, then ``rounds`` rounds in which every contender runs ``steps_per_round`` timed calls back to back, in a
    seeded random order per round. (A rotation would keep every contender right after the same neighbour in all but
    one position, so one that leaves the CPU busy, e.g. ONNX Runtime's spinning worker threads, or cold, would
    always hit the same other one.)

    ``cpu`` is this process's CPU time (all its threads) per call. Single-threaded, it is what the wall time would be
    on a quiet machine, whatever other processes do; with more threads it also counts their spin-waits."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in random.Random(r).sample(names, len(names)):
            for _ in range(steps_per_round):
                cpu0, wall0 = time.process_time(), time.perf_counter()
                steps[name]()
                times[name]["wall"].append(time.perf_counter() - wall0)
                times[name]["cpu"].append(time.process_time() - cpu0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# -- memory --------------------------------------------------------------------------------------------------------
def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). False where that is not possible,
    in which case :func:`peak_rss` falls back to ``ru_maxrss``, the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process since start or since the last :func:`reset_peak_rss`, in bytes."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def run_json_children(argvs: Sequence[Sequence[str]], timeout: float = 600.0) -> list[dict]:
    """Run ``python argv`` for each argv, all at once (each is its own process, so their peak memory is their own),
    and return the JSON object each printed on its last stdout line."""
    procs = [subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    results = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child {' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# -- contention -----------------------------------------------------------------------------------------------------
class OtherLoad:
    """How busy other processes kept the CPUs while the block ran: their CPU seconds (plus hypervisor steal) over
    the CPU seconds available, from ``/proc/stat`` minus this process's own time. 0 on a quiet machine; ``fraction``
    stays None where ``/proc/stat`` cannot be read.

        with OtherLoad() as load:
            ...
        load.fraction
    """

    fraction: float | None = None

    def __enter__(self) -> OtherLoad:  # noqa: PYI034 (3.10 has no typing.Self)
        self._start = (_busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, t0 = self._start
        busy1, own1, t1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
        if busy0 is not None and busy1 is not None:
            self.fraction = max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * (os.cpu_count() or 1))


def _busy_cpu_seconds() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- output --------------------------------------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
