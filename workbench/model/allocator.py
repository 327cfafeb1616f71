"""Keep glibc's malloc from mapping and unmapping every large tensor: called at the start of each process
that runs the network (the CLI, the benchmarks, DataLoader workers, the MLflow pyfunc model).

Why: a full-resolution activation of the paper-size network (32 × 427 × 1025 float32 ≈ 56 MB) is far above
glibc's mmap threshold (at most 32 MB even after its dynamic adjustment), so each new tensor from a
convolution, `cat` or `elu` is a fresh `mmap`, page-faulted in 4 KiB at a time and unmapped again on
free: 3.8 million minor page faults and 9.6 s of kernel time per 5 s chunk, more than half the forward
pass. With mmap off (M_MMAP_MAX = 0) large blocks come from the heap, and with trimming off (a huge
M_TRIM_THRESHOLD) freed memory stays there for the next tensor of the same size. The numbers computed do
not change (the allocator only decides where memory comes from); the cost is that a process keeps its
peak heap until it exits, which for a network this size is the same working set it needs on every chunk.

The same settings also go into the environment (glibc's MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_,
read when a process starts), so spawned children (DDP ranks, spawn-started DataLoader workers) inherit
them; forked children inherit the mallopt state itself. Off glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest, 2 GiB. With 1 GiB the paper network's freed activations at the top of
# the heap still went back to the system each pass (286,790 faults per 5 s chunk instead of 25,544).
TRIM_THRESHOLD_BYTES = 2**31 - 1

_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD_BYTES)}
_applied: bool | None = None


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_allocator(environment: bool = True) -> bool:
    """Turn off glibc's mmap of large blocks and heap trimming in this process (once); True if applied.

    `environment` also sets the MALLOC_* variables so that processes started from this one inherit the
    setting (a variable the user already set wins: the environment is theirs to tune).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both settings or the process is left as it was meant to be seen.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if _applied and environment:
        for name, value in _ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    return _applied


def worker_init(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn` building block: the allocator setting in a (possibly spawned) worker."""
    tune_allocator()
