"""Host-memory policy for training on CPU: reuse freed memory instead of handing it back to the kernel.

glibc serves large blocks (activations and gradients, megabytes each) with fresh mmap'd pages and unmaps them when
they are freed, so every training step page-faults its whole working set again. With mmap'd blocks off and heap
trimming off, freed blocks are reused from step to step; the resident size settles at the peak of one step, which
the step needed anyway. GPU runs are unaffected (their tensors live in the CUDA caching allocator).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def reuse_freed_host_memory() -> bool:
    """Apply the policy to this process (and processes it forks later); False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))
