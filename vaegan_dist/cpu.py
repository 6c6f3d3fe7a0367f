"""Process settings that training on the CPU needs."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


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
