"""Process settings that training on the CPU needs, and whether the CPU multiplies bf16 natively."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch

# Feature flags (/proc/cpuinfo) of instructions that multiply bf16 natively: x86's AVX512_BF16 and AMX, Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def configure_cpu(threads: int | None) -> None:
    """Sets up this process for training on the CPU: call it before its first parallel tensor operation.

    threads: the intra-op threads (None: this process's share of the cores it may run on).
    """
    # Gradients that pass a saturated tanh or a long chain of small weights reach denormal floats (below
    # 1.2e-38), on which the CPU's arithmetic is many times slower: some matrix products of a step took 3-4×
    # their time. Flushed to zero, they change nothing that Adam can see (its eps is 1e-8). The flag is per
    # thread, and threads inherit it when they start: so it is set before the thread pool starts.
    torch.set_flush_denormal(True)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
    keep_freed_memory()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The feature flags of the first processor that lists them (x86's `flags`, Arm's `Features`), or None where
    none does (not Linux, or no such line)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    fields = (line.partition(":") for line in lines)
    return next((set(value.split()) for key, colon, value in fields if colon and key.strip() in ("flags", "Features")),
                None)


def emulates_bf16(flags: set[str] | None) -> bool:
    """Whether a CPU with these flags lacks bf16 instructions, so that torch emulates bf16 products (unknown flags:
    False). Measured with benchmarks/bench.py: 2× slower than fp32 with AVX-512, 50× with AVX2 alone."""
    return flags is not None and not flags & NATIVE_BF16_FLAGS


def keep_freed_memory() -> bool:
    """Stops the C heap from handing freed memory back to the OS, on glibc; returns whether it could.

    Every step allocates and frees the same tens of megabytes (activations, gradients). By default glibc
    serves large blocks with fresh mmaps and trims the heap's free top, so each step faults those pages in
    and has the kernel zero them again: about 10% of a step's time on the CPU. The heap now keeps what it has
    (up to 1 GiB of free top) and serves blocks up to 32 MiB, glibc's largest, from it.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))
