"""Keep tensor-sized buffers in glibc's heap so CPU inference does not spend its time in page faults.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically only up to what
has been freed) with a fresh ``mmap`` and returns them with ``munmap``: every activation of every
forward pass is then a new zero-filled mapping, faulted in page by page, a large share of the
encoder's and the sampler's CPU time (the README gives the measurement). Fixing the thresholds at
glibc's own dynamic maximum (32 MiB mmap, 64 MiB trim) keeps those buffers in the heap; at most 64 MiB of freed memory
is kept by the process.

Process-wide and applied once, on Linux/glibc only. It leaves thresholds alone when the user set
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` or ``NAPARI_STEM_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # the ratio glibc's dynamic rule keeps
OPT_OUT_VARIABLE = "NAPARI_STEM_MALLOC_TUNING"


@functools.cache
def keep_tensor_buffers_in_heap() -> bool:
    """Set glibc's mmap/trim thresholds once; True when they were set by this call's process."""
    if os.environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False  # the user tuned malloc themselves
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting either threshold turns off glibc's dynamic adjustment.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
