"""The one place that knows the hardware: device, CPU capability, native bf16, AMX, int8 VNNI, threads.

Every other module asks :func:`hardware` and never probes on its own; every fast path checks it and falls back to
the plain path, which gives the same numbers. ``litebert env`` prints the probe and what litebert does with it.

Tests (and users reproducing a report from a smaller machine) can make the probe answer for a lesser CPU:

- ``LITEBERT_CPU=avx2`` in the environment, read once when the probe first runs: "AVX2, no AVX-512, no native
  bf16, no VNNI, no AMX". It also caps oneDNN and PyTorch's kernel dispatch at AVX2 (``ONEDNN_MAX_CPU_ISA``,
  ``ATEN_CPU_CAPABILITY``) when those are unset and nothing has run a kernel yet, so a capable machine really runs
  the AVX2 kernels.
- :func:`simulate` (a context manager) inside one process: the same answer, for the code that asks the probe.

This is the only module that reads environment variables for hardware decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "SIMULATE_ENV", "Hardware", "hardware", "precision_dtype", "resolve_precision", "simulate"]

log = logging.getLogger(__name__)

SIMULATE_ENV = "LITEBERT_CPU"
PRECISIONS = ("auto", "fp32", "bf16")
# What the simulated classes switch off (field -> value); "native" is the probe as measured.
_CLASSES: dict[str, dict[str, object]] = {
    "avx2": {"cpu_capability": "AVX2", "avx512": False, "cpu_bf16": False, "amx": False, "vnni": False},
}
# Where bf16 is emulated, a bf16 matmul runs several times slower than fp32 (`bench/precision.py` measures it).
_EMULATED_BF16 = "bf16 is emulated on this CPU (no AVX-512-bf16/AMX): expect it to run several times slower than fp32"



@dataclass(frozen=True)
class Hardware:
    """What this process can run on. ``device`` is where litebert runs by default (cuda > mps > cpu)."""

    device: str
    cpu_model: str
    cpu_capability: str  # PyTorch's kernel dispatch level: "AVX512", "AVX2", "DEFAULT", "NEON", "SVE256", ...
    avx512: bool
    cpu_bf16: bool  # bf16 matmuls in hardware (AVX-512-bf16, AMX, AVX-NE-CONVERT, Arm BF16), oneDNN's own check
    amx: bool
    vnni: bool  # int8 dot products without saturation (AVX-512 VNNI, AVX-VNNI, AMX-INT8, Arm i8mm)
    onednn: bool  # this torch build has oneDNN's fused linear and weight packing
    threads: int
    cuda_name: str | None = None
    cuda_bf16: bool = False
    mps: bool = False
    simulated: str | None = None

    def native_bf16(self, device: str | torch.device | None = None) -> bool:
        """Whether bf16 runs natively (faster than fp32) on ``device`` (default: :attr:`device`)."""
        kind = torch.device(device or self.device).type
        if kind == "cuda":
            return self.cuda_bf16
        if kind == "mps":
            return False  # MPS bf16 support varies by macOS version; fp32 is the safe default
        return self.cpu_bf16

    def fused_linear(self, dtype: torch.dtype) -> bool:
        """oneDNN's fused linear (+ bias + activation) for CPU inference in ``dtype``; bf16 needs native bf16."""
        return self.onednn and (dtype == torch.float32 or (dtype == torch.bfloat16 and self.cpu_bf16))

    def prepack(self, dtype: torch.dtype) -> bool:
        """Weight pre-packing into oneDNN's blocked layout; same condition as the fused linear it feeds."""
        return self.fused_linear(dtype)

    def report(self) -> dict[str, object]:
        """The probe plus what litebert will do with it (``litebert env``)."""
        def on_off(check) -> str:
            return ", ".join(f"{name} {'on' if check(dt) else 'off'}"
                             for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)))

        cpu = resolve_precision("auto", "cpu", warn=False)
        info = dataclasses.asdict(self)
        info["decisions"] = {
            "precision auto (cpu)": cpu + ("" if self.cpu_bf16 else " (bf16 would be emulated here: several times "
                                                                  "slower than fp32)"),
            **({f"precision auto ({self.device})": resolve_precision("auto", self.device, warn=False)}
               if self.device != "cpu" else {}),
            "fused linear (cpu inference)": on_off(self.fused_linear),
            "weight pre-packing": on_off(self.prepack),
            "int8 kernels": "VNNI" if self.vnni else "no VNNI: exports use a format that cannot saturate",
        }
        return info


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, ValueError):
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip() or platform.processor()
    return platform.processor() or platform.machine()


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _probe() -> Hardware:
    flags = _cpu_flags()
    onednn = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
              and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        threads = os.cpu_count() or 1
    return Hardware(
        device="cuda" if cuda else "mps" if mps else "cpu",
        cpu_model=_cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        avx512=any(f.startswith("avx512") for f in flags),
        cpu_bf16=_onednn_bf16(),
        amx=bool({"amx_bf16", "amx_tile"} & flags),
        vnni=bool({"avx512_vnni", "avx_vnni", "amx_int8", "i8mm"} & flags),
        onednn=onednn,
        threads=min(threads, torch.get_num_threads()),
        cuda_name=torch.cuda.get_device_name() if cuda else None,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        mps=mps,
    )


def _simulated(hw: Hardware, name: str) -> Hardware:
    if name not in _CLASSES:
        raise ValueError(f"{SIMULATE_ENV}={name!r}: unknown CPU class; choose from {', '.join(['native', *_CLASSES])}")
    return dataclasses.replace(hw, simulated=name, **_CLASSES[name])  # type: ignore[arg-type]


@functools.cache
def _measured() -> Hardware:
    hw = _probe()
    name = os.environ.get(SIMULATE_ENV, "native").strip().lower() or "native"
    return hw if name == "native" else _simulated(hw, name)


def _cap_kernels_from_env() -> None:
    """Under ``LITEBERT_CPU=avx2``, make oneDNN and ATen pick AVX2 kernels too (they read these once, at their first
    kernel; this runs when litebert is imported, before litebert runs any)."""
    if os.environ.get(SIMULATE_ENV, "").strip().lower() == "avx2":
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")


_cap_kernels_from_env()
_override: list[Hardware] = []


def hardware() -> Hardware:
    """The probe's answer for this process (measured once), or the innermost :func:`simulate` in force."""
    return _override[-1] if _override else _measured()


@contextlib.contextmanager
def simulate(cpu_class: str = "avx2", **fields: object) -> Iterator[Hardware]:
    """Make :func:`hardware` answer for ``cpu_class`` (plus any field overrides) inside the block."""
    hw = _simulated(hardware(), cpu_class) if cpu_class != "native" else hardware()
    hw = dataclasses.replace(hw, **fields)  # type: ignore[arg-type]
    _override.append(hw)
    try:
        yield hw
    finally:
        _override.remove(hw)


def resolve_precision(precision: str | bool | None, device: str | torch.device | None = None,
                      warn: bool = True) -> str:
    """``"fp32"`` or ``"bf16"`` for ``precision`` (``auto`` / ``fp32`` / ``bf16``; ``True``/``False`` from old
    recipes' ``bf16:`` flag mean bf16 / fp32) on ``device``. ``auto`` is bf16 only where it is native. An explicit
    bf16 where it is emulated runs, with a warning naming the slowdown."""
    if precision is None:
        precision = "auto"
    elif isinstance(precision, bool):
        precision = "bf16" if precision else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = hardware().native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native and warn:
        kind = torch.device(device or hardware().device).type
        log.warning("precision bf16 on %s: %s", kind, _EMULATED_BF16 if kind == "cpu"
                    else "this device has no native bf16; expect it to run slower than fp32")
    return precision


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


# -- device and process setup -----------------------------------------------------------------------------------
# One code path for 1 process, N processes on one machine and N machines: torchrun describes this process with
# RANK / LOCAL_RANK / WORLD_SIZE (the only other environment variables litebert reads); LOCAL_RANK picks the GPU.

__all__ += ["Process", "collective_device", "cuda_capability", "current_process", "ddp_device_args", "gather_object",
            "process_device", "setup_process", "teardown_process", "torchrun_env"]


@dataclass(frozen=True)
class Process:
    """This process's place in the job and the device it trains on (``cuda:LOCAL_RANK`` on a CUDA host)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None = None  # the process group's ("nccl" / "gloo"); None for a single process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_process: list[Process] = []


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


def torchrun_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun set them; (0, 0, 1) outside torchrun."""
    return _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)


def process_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """Where this process trains: ``device`` when given (a bare ``cuda`` gets this process's GPU), else this
    process's GPU on a CUDA host, else the CPU."""
    if device is None:
        device = "cuda" if hardware().device == "cuda" else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda" or dev.index is not None:
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but this machine shows {count} GPU(s): start at most {count} "
                         "processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def setup_process(device: str | torch.device | None = None) -> Process:
    """Pick this process's device and, under torchrun, join the process group (nccl on GPUs, gloo on CPUs).

    Under ``torchrun --nproc_per_node 1`` the process joins a group of one, so that a single GPU runs the very
    path that many do (NCCL, ``DistributedDataParallel``, collectives). The GPU is selected first
    (``torch.cuda.set_device``) so that NCCL, the CUDA RNG and pinned memory use it; the group is then bound to it. Calling again gives the same answer; the group is destroyed at exit
    (:func:`teardown_process`)."""
    import atexit

    import torch.distributed as dist

    rank, local_rank, world = torchrun_env()
    dev = process_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world > 1 or "WORLD_SIZE" in os.environ:  # torchrun sets it, even to 1
        if not dist.is_initialized():
            # Bound to its device, NCCL sets up eagerly on the right GPU and barriers need not guess it.
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
            atexit.register(teardown_process)
        backend, rank, world = str(dist.get_backend()), dist.get_rank(), dist.get_world_size()
    proc = Process(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)
    _process[:] = [proc]
    return proc


def current_process() -> Process | None:
    """What the last :func:`setup_process` answered; None before any."""
    return _process[0] if _process else None


def teardown_process() -> None:
    """Leave the process group, if this process joined one (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """The device of tensors handed to collectives: NCCL reduces GPU tensors only, gloo CPU ones."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        proc = current_process()
        if proc is not None and proc.device.type == "cuda":
            return proc.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ddp_device_args(device: torch.device) -> dict[str, object]:
    """``DistributedDataParallel`` keywords for a module on ``device``: its one GPU, or nothing on a CPU."""
    return {"device_ids": [device.index], "output_device": device.index} if device.type == "cuda" else {}


def gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (``[obj]`` for a single process). Collective: every rank calls it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cuda_capability(device: str | torch.device | None = None) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device (Ampere is 8.0); None off CUDA or when it cannot say."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return None
    try:
        major, minor = torch.cuda.get_device_capability(dev)
    except (AssertionError, RuntimeError):
        return None
    return int(major), int(minor)
