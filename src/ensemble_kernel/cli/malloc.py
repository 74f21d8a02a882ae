"""The program's allocator setting: freed blocks go back to the system.

glibc's malloc serves a block from its heap unless it is at least the "mmap threshold",
and raises that threshold (up to 32 MiB) each time a large block is freed. Blocks of the
engine's size (a few MiB to tens of MiB: one block of runs, one tile) then come from the
heap, and once freed they stay in the process (RSS) for as long as any block above them
lives. Over the passes of a sweep or a report, that retained memory grew the peak RSS by
twice the budget. A fixed threshold keeps every block of 4 MiB or more in its own
mapping, returned when freed, so the peak follows the plan.

Fixing the threshold also stops glibc from raising its "trim threshold" with it, which
stays at 128 KiB: each freed block at the top of the heap (the pieces of rows that
log-softmax and the sums work on, 1-2 MiB each) was handed back to the system and the
next piece faulted its pages in again, about half a million page faults per `evaluate` at
CIFAR shape. The trim threshold is set to 64 MiB: at most that much freed heap stays in
the process, for the next piece to reuse.

This is process-wide, so the command-line program sets it (in `main`); the library never
does. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "return_large_blocks"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20  # bytes: blocks at least this large are mapped, and unmapped on free
TRIM_THRESHOLD = 64 << 20  # bytes of free heap top kept in the process for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def return_large_blocks(threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes and its trim threshold at `trim`;
    True if both were set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim) == 1
    logger.debug("mallopt(M_MMAP_THRESHOLD, %d), mallopt(M_TRIM_THRESHOLD, %d): %s",
                 threshold, trim, done)
    return done
