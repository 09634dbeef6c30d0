"""Hand the heap's free pages back to the operating system.

A host that evicts aggregates frees their memory, but glibc's allocator keeps
freed pages mapped for later allocations, so the process's resident memory
stays near its peak. ``malloc_trim`` returns the free pages of every arena.
On a C library without it (musl, macOS) releasing does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _find_malloc_trim()


def can_release_free_memory() -> bool:
    """Return whether this process's C library can hand free heap pages back."""
    return _MALLOC_TRIM is not None


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system; True if any were."""
    if _MALLOC_TRIM is None:
        return False
    return bool(_MALLOC_TRIM(0))
