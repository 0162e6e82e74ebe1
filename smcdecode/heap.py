"""Handing freed heap memory back to the operating system.

glibc's allocator keeps freed blocks in its arenas (one per thread that allocated, up to 8 per
core) instead of returning them, so a long run whose tensors change size from step to step (KV
caches growing, compacted and resampled; problems of different lengths admitted into freed rows;
SMC problems running in their own threads) holds its high-water mark per arena, fragmented, and
its resident set creeps up with the number of problems. :func:`trim` calls ``malloc_trim(0)``,
which releases the free pages of every arena; evaluation calls it as each problem's record is
made, in the process that sampled it (this one, or a Ray worker), the demo between chunks. A
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any

_TRIM: Any = None


def trim(collect: bool = False) -> None:
    """Return free heap pages to the OS (``malloc_trim(0)``); with ``collect``, run the garbage
    collector first (objects in reference cycles hold their tensors until it runs)."""
    global _TRIM
    if collect:
        gc.collect()
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)
