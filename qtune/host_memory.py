"""Host memory that goes back to the system when it is freed (glibc's allocator on Linux).

glibc serves small allocations from its heaps and large ones with their own memory maps. Freed heap
blocks stay resident for reuse, and tensors of many sizes fragment them: a process that allocates and
frees weight-sized tensors over and over (a model run block by block, CPU training that dequantizes
each weight per use) then grows with the number of blocks it has seen, not with the largest. On other
C libraries these calls do nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20
HEAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """Serve every allocation of ``threshold`` bytes or more with its own memory map, which goes back to
    the system the moment it is freed. glibc's default raises this threshold up to 32 MB as large blocks
    are freed, after which tensors come from its heap, fragment there and stay resident; block-by-block
    work frees and allocates block-sized tensors all the time, and training on CPU dequantizes every
    weight in each forward and backward. Generation, which allocates many mid-sized tensors per token,
    is slowed by it: ``map_large_allocations(HEAP_THRESHOLD)`` after the streamed pass restores glibc's
    usual behaviour for the rest of the process."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def return_freed_memory() -> None:
    """glibc keeps freed blocks below 32 MB (one weight matrix, typically) in its heap for reuse, where
    they fragment and stay resident: without this, memory grows with each block processed."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
