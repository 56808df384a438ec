"""Process-wide memory policy for CPU inference: glibc's allocator and oneDNN's kernel caches.

- `keep_freed_memory` (applied by `pipeline()` on CPU): freed activations stay in the heap for the next forward pass
  instead of going back to the system and being page-faulted in again (`bench/inference_switches.py` times it on and
  off; it helps every contender, transformers included).
- `bound_kernel_caches` and `malloc_trim` (applied by `litebert serve`): a server meets a new (batch, length) shape on
  most forward passes; see their docstrings.

Everything here is a no-op where glibc is not the C library.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["KERNEL_CACHE_CAPACITY", "bound_kernel_caches", "keep_freed_memory", "malloc_trim"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 << 20  # glibc's upper limit: blocks below this come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept before it is given back

# oneDNN, and PyTorch's ideep layer over it, keep one compiled kernel per op and input shape, up to 1,024 each. A
# server meets a new (batch, length) shape on most forward passes, so on the PyTorch backend those caches grew the
# process by ~500 MiB before filling (a MiniLM classifier over 600 random shapes). `bench/serve_load.py`, 1,500
# requests per level: +287 MiB with 1,024 entries, flat with 256 or 32; 32 cost a quarter of the 1-client
# throughput (kernels rebuilt for most lengths), 256 kept the 8- and 32-client throughput.
KERNEL_CACHE_CAPACITY = 256
_KERNEL_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for the whole process (idempotent; True when applied) so activation
    buffers of up to 32 MiB are reused from the heap rather than mapped, zeroed and unmapped on every call."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap oneDNN's kernel caches; a capacity set in the environment wins. Takes effect only before this process's
    first oneDNN call (they read the environment once), which is why `serve_main` calls it before loading the
    model."""
    for name in _KERNEL_CACHE_ENV:
        os.environ.setdefault(name, str(capacity))


def malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, which hands the free pages inside the heap back to the system. Tensors of ever-new
    sizes leave the heap fragmented: 300 random batch shapes through a MiniLM classifier with 128-entry kernel caches
    grew RSS by 560-600 MiB without it and by 370 MiB with a trim every 10 forward passes."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)
