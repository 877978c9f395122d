"""The agent's own heap: handing back to the kernel the memory that start-up used and freed."""

from __future__ import annotations

import ctypes
import gc
import os


def resident_bytes() -> int:
    """This process's resident set, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> int:
    """Collect garbage, then ask the C library to return its free pages (glibc's malloc_trim): what the start-up
    left freed (the byte-code compiler's and the schema builders' temporaries, the bootstrap's buffers) stops
    counting against the host. Returns how many bytes the resident set shrank by; 0 where the C library has no
    malloc_trim (musl) or nothing was free."""
    gc.collect()
    before = resident_bytes()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter is linked with
    except (OSError, AttributeError):
        return 0
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return max(0, before - resident_bytes())
