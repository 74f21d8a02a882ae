"""The program's allocator setting: freed blocks go back to the system.

glibc's malloc serves a block from its heap unless it is at least the "mmap threshold",
and raises that threshold (up to 32 MiB) each time a large block is freed. Blocks of the
engine's size (a few MiB to tens of MiB: one block of runs, one tile) then come from the
heap, and once freed they stay in the process (RSS) for as long as any block above them
lives. Over the passes of a sweep or a report, that retained memory grew the peak RSS by
twice the budget. A fixed threshold keeps every block of 4 MiB or more in its own
mapping, returned when freed, so the peak follows the plan.

This is process-wide, so the command-line program sets it (in `main`); the library never
does. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MMAP_THRESHOLD", "return_large_blocks"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20  # bytes: blocks at least this large are mapped, and unmapped on free
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; True if it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1
    logger.debug("mallopt(M_MMAP_THRESHOLD, %d): %s", threshold, done)
    return done
