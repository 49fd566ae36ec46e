"""Memory reuse on the CPU: a gradient buffer the backward pass hands out again once nothing refers to it any
more (:class:`ReusableBuffer`), and an opt-in switch that makes glibc keep freed memory for the whole process
(:func:`keep_freed_memory`).

A fresh ``B*T*(U+1)*V`` gradient costs the kernel's first-touch page faults: Linux maps and zeroes every
page when the gradient pass first writes it, a third of that pass at (8, 200, 51, 256) and half of it at
(16, 150, 41, 1024) on a 2-core VM (the buffers are above glibc's mmap threshold, so every ``malloc`` gets
new pages and every ``free`` returns them). A training loop calls the loss with the same or a bounded set of
shapes every step, and the previous step's gradient was consumed (by the joint network's backward) and
dropped before the next one: its pages can be written again without a fault.

:class:`ReusableBuffer` keeps the last buffer it gave out. It gives the same memory out again only when no
other object refers to it: every numpy view and every tensor made from one (``torch.from_numpy`` keeps the
array alive while any tensor shares its storage, ``.grad`` included) holds a reference, so a gradient the
caller still holds is never overwritten; such a call gets a new buffer instead. The memory kept between
calls is the largest gradient of the recent calls (a smaller one uses a prefix of it); :meth:`release`
gives it back to the system.
"""

from __future__ import annotations

import ctypes
import sys
import threading

import numpy as np

__all__ = ["ReusableBuffer", "keep_freed_memory"]


class ReusableBuffer:
    """One reusable byte buffer for arrays of any shape and dtype (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: np.ndarray | None = None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous array ``(shape)`` of ``dtype``: the kept buffer's memory when it is
        large enough and unreferenced, otherwise new memory (which is then kept)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            # references to an unused buffer: self._buffer and getrefcount's own argument
            if self._buffer is None or self._buffer.nbytes < nbytes or sys.getrefcount(self._buffer) > 2:
                self._buffer = np.empty(max(nbytes, 1), np.uint8)
            return self._buffer[:nbytes].view(dtype).reshape(shape)

    def release(self) -> None:
        """Drop the kept buffer (its memory returns to the system once no array uses it)."""
        with self._lock:
            self._buffer = None

    @property
    def kept_bytes(self) -> int:
        """Size of the kept buffer in bytes (0 when none is kept)."""
        buffer = self._buffer
        return 0 if buffer is None else buffer.nbytes


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse, for the rest of the process; opt-in.

    By default glibc serves every allocation above its mmap threshold (at most 32 MB) with new pages from
    the kernel and hands them back on ``free``, so each such buffer pays first-touch page faults again. That
    hits JAX on the CPU hardest: XLA allocates its output buffers anew on every call, so each step's
    gradient (and the loss's residuals) is new memory; the torch adapter reuses its gradient buffer
    (:class:`ReusableBuffer`) but the joint network's tensors do not. This sets glibc's mmap and trim
    thresholds to their largest values, as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do at
    start-up: large buffers then come from the heap, and freed ones stay there for the next step (what
    jemalloc and tcmalloc do by default). The price: the process's resident memory stays at its high-water
    mark instead of shrinking after a peak.

    Returns True when glibc took the settings, False where there is no glibc ``mallopt`` (macOS, musl's
    returns 0) and nothing changed.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                              _LARGEST_THRESHOLD))
