"""``heap.trim`` hands freed, fragmented heap pages back to the OS (glibc)."""

import ctypes.util
import sys

import pytest

from smcdecode import heap


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc" not in str(ctypes.util.find_library("c")), reason="glibc"
)
def test_trim_returns_freed_pages_that_free_alone_keeps():
    """200 MB in 64 KB blocks (below glibc's mmap threshold: they live in the heap), then every
    block but one in 16 freed: the free space is fragmented, so ``free`` keeps it resident;
    ``trim`` gives back a good part of it."""
    blocks = [bytearray(b"x" * (64 << 10)) for _ in range(3200)]
    kept = blocks[::16]
    del blocks
    before = rss_mb()
    heap.trim(collect=True)
    after = rss_mb()
    assert len(kept) == 200
    assert before - after > 50, (before, after)  # free alone gives back nothing here
