"""A floor for the loss on this CPU: the least memory traffic and arithmetic any two-pass kernel needs.

The fused RNN-T loss must (1) read every logit to get each row's log-normaliser, then, once the lattice is
solved, (2) read every logit again and write the gradient. :func:`roofline` does only that, with the same
tools as ``rnnt_xla``'s kernels (``numba.njit(parallel=True)``, rows split across threads, the vectorisable
float32 ``fast_exp``): pass 1 reads the logits and computes one ``exp`` per element (a sum per row), pass 2
reads them again and writes a gradient-sized array (``x * c_row``, no second exp). Each call allocates its
output with ``np.empty_like``, as the loss allocates its gradient, so both pay the same first-touch page
faults. ``rnnt_xla time / roofline time`` says how far the loss is from this memory + exp floor.

It has no lattice (alphas/betas), a single exp per element where the loss needs two (log-normaliser and
softmax), and nothing per (t, u) row but a sum; it is not a loss, only a lower bound on one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from rnnt_xla.kernels.fast_math import fast_exp

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # the kernels' own flags: vectorised sums, IEEE inf/NaN


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _row_sums_of_exp(x, sums):
    """Pass 1: read every element once, one exp each."""
    for r in prange(x.shape[0]):
        row = x[r]
        s = np.float32(0.0)
        for v in range(x.shape[1]):
            s += fast_exp(row[v])
        sums[r] = s


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _scale_rows(x, sums, out):
    """Pass 2: read every element again and write the output once."""
    for r in prange(x.shape[0]):
        row = x[r]
        o = out[r]
        c = np.float32(1.0) / sums[r]
        for v in range(x.shape[1]):
            o[v] = row[v] * c


def roofline(logits: np.ndarray) -> np.ndarray:
    """Two passes over ``logits`` (any shape, float32, C-contiguous): returns a new array of the same shape."""
    x = logits.reshape(-1, logits.shape[-1])
    sums = np.empty(x.shape[0], dtype=x.dtype)
    out = np.empty_like(x)
    _row_sums_of_exp(x, sums)
    _scale_rows(x, sums, out)
    return out.reshape(logits.shape)


def bytes_moved(logits: np.ndarray) -> int:
    """Minimum DRAM traffic of the two passes: two reads of the logits and one write of the output."""
    return 3 * logits.nbytes
