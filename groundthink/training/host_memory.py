"""How the training process's CPU memory allocator treats the memory a step frees (`trainer.keep_freed_memory`).

A training step on CPU allocates and frees hundreds of activation and gradient tensors of 0.1-40 MB. glibc's malloc
returns freed memory to the kernel: blocks above its mmap threshold are unmapped on free, and the top of the heap is
trimmed once it holds more than the trim threshold. Every reused page then faults in again, zero-filled by the
kernel. On the 2-core VMs GroundThink is measured on that costs 2-8k page faults per `small` step and 14-41k per
`8m` / `30m` step, about 7 µs each. With the settings below the freed memory stays in the process and is reused:
under 300 faults per step, resident memory unchanged (README "Speed on CPU" has the step times).

The settings are process-wide and never change what is computed. Where the C library is not glibc (macOS, Windows,
musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest mmap threshold on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: the heap's free top goes back only beyond 2 GiB
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


def running_glibc() -> bool:
    """Whether the C library this process runs on is glibc."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # the name is unknown off glibc; Windows has no confstr
        return False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse. True when the C library took all three settings; False
    (and nothing changed) where the C library is not glibc."""
    if not running_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The threshold first: setting it explicitly also stops glibc from moving it (and the trim threshold) itself.
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    ok = mallopt(M_TOP_PAD, TOP_PAD) == 1 and ok
    return ok
