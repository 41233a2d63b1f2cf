"""The process's memory allocator, set up for registrations: freed volumes reused, not refaulted.

glibc's ``malloc`` (Linux) serves a request above its *mmap threshold* with fresh pages from the
kernel and hands them back when the block is freed. That threshold adapts up to 32 MB only, and a
240 x 240 x 155 float32 volume is 36 MB, so every volume-sized temporary of a registration (the
inputs as float32, block averages, the resampled and difference volumes) is new memory each time:
one page fault per 4 KB page it touches. Measured on that pair, two CPU threads, repeated engine
calls: 45,000-56,000 page faults and 0.09-0.12 s of system time a call. With glibc's mmap
threshold at :data:`REUSE_BYTES` and its trim threshold at :data:`KEEP_FREE_BYTES`, freed blocks
stay in the heap and are reused: 3 page faults a call, also between calls of elastix in the same
process (a trim threshold of 256 MiB still left 17,000: a registration's temporaries free more than
that at the heap's top at once). The arithmetic is the same, so are the results (bit for bit).
Peak memory (maximum RSS) of one command line registration is unchanged: 0.94-0.97 GB either way.

The setting is process-wide and kept: up to :data:`KEEP_FREE_BYTES` of freed memory stay with the
process (for its next allocations) instead of going back to the system at once. Where the
environment sets glibc's own ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (how to keep
glibc's behaviour), those are respected and nothing is changed. Elsewhere (macOS, Windows, musl)
nothing is done. Torch-free.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

#: Blocks up to this size come from (and return to) the heap. A 256^3 float32 volume is 64 MiB;
#: 512 x 512 x 256 is 256 MiB.
REUSE_BYTES = 256 * 2**20

#: Free memory at the heap's top up to this much is kept for the next allocations.
KEEP_FREE_BYTES = 2**30

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: glibc's environment variables for the two thresholds: when either is set, the user chose.
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_state: bool | None = None  # None: not tried yet; then whether the thresholds were set


def uses_glibc() -> bool:
    """True when this process runs on Linux with glibc's C library (``os.confstr``; no file read)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def reuse_freed_memory(limit_bytes: int = REUSE_BYTES, keep_free_bytes: int = KEEP_FREE_BYTES) -> bool:
    """Set glibc's mmap threshold to ``limit_bytes`` and its trim threshold to ``keep_free_bytes``
    (module docstring), once per process; later calls return the first call's outcome. True when
    they are set (now or before), False where nothing was changed (not glibc, the user's own
    ``MALLOC_*_THRESHOLD_`` variables, or ``mallopt`` refused)."""
    global _state
    with _lock:
        if _state is None:
            _state = _set_thresholds(int(limit_bytes), int(keep_free_bytes))
        return _state


def _set_thresholds(limit_bytes: int, keep_free_bytes: int) -> bool:
    if min(limit_bytes, keep_free_bytes) <= 0 or not uses_glibc() or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # the mmap threshold first: setting either one stops glibc adapting the other
    return mallopt(M_MMAP_THRESHOLD, limit_bytes) == 1 and mallopt(M_TRIM_THRESHOLD, keep_free_bytes) == 1
