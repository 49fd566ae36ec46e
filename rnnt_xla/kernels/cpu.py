"""RNNT loss on the CPU: Numba kernels over raw numpy arrays (no framework imports).

The loss is computed in four passes, none of which materialises a ``B*T*(U+1)*V`` temporary:

1. :func:`log_normalizers` (parallel over frames): the log-softmax normaliser of every used
   ``(b, t, u)`` row of the logits, and the two log-probabilities the lattice needs, blank and next label.
   The normaliser is kept as a shift plus the log of a sum, never as their rounded sum, so that costs and
   gradients are as accurate far from 0 (a common offset of 1e5, rows of -1e20) as near it.
2. :func:`alphas_and_costs` (parallel over the batch): forward variables and costs.
3. :func:`betas` (parallel over the batch): backward variables, only when a gradient is wanted.
4. :func:`gradients` (parallel over frames): the gradient w.r.t. the logits (or log-probabilities), already
   clamped and scaled by the caller's per-utterance factor (reduction times incoming gradient), written once.

Array arguments (``B`` batch, ``T`` max frames, ``U1 = U + 1`` label positions, ``V`` vocabulary):

- ``logits: (B, T, U1, V)`` float32/float64, or float16/bfloat16 as bits (:func:`as_kernel_array`),
  C-contiguous; 16-bit logits are computed in float32 and their gradient written back in 16 bits;
- ``targets: (B, W)`` int64; ``logit_lengths``, ``target_lengths: (B,)`` int64 (already validated);
- residuals of the forward pass, see :class:`Residuals`.

Padded frames (``t >= T_b``) and label positions (``u > U_b``) receive exactly zero gradient.
The pass entry points :func:`forward` and :func:`backward` hold no math; they call the kernels in order.
The other losses' kernel modules (``cpu_tdt``) reuse this module's row passes: :func:`_normalise_frame`
(pass 1 on one frame) and :func:`_write_frame_gradient` (one frame of pass 4), and its thread choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import types
from typing import NamedTuple

import numpy as np

from . import threads
from .numba_startup import drop_stale_caches, import_arraymath_without_scipy, paused_garbage_collector

drop_stale_caches()  # before any kernel of the package is loaded from Numba's cache

with paused_garbage_collector():  # Numba's import is part of its start-up (see numba_startup)
    import numba
    from numba import njit, prange

    from .fast_math import cast_like, fast_exp, fast_exp64, fence, load, prefetch_row, store, wide_vectors

    import_arraymath_without_scipy()

__all__ = [
    "Residuals",
    "as_kernel_array",
    "compute_dtype",
    "residual_shapes",
    "allocate_residuals",
    "advise_huge_pages",
    "forward",
    "backward",
    "normalise",
    "lattice_forward",
    "lattice_backward",
    "gradient",
    "log_normalizers",
    "alphas_and_costs",
    "betas",
    "gradients",
    "RNNT_TYPES",
    "alphas_and_costs_variant",
    "betas_variant",
    "gradients_variant",
]

# Reassociation lets LLVM vectorise the sum over the vocabulary; no 'nnan'/'ninf', so infinities
# (masked vocabulary entries) and NaNs keep IEEE semantics.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# nogil: other Python threads (data loading, a second JAX device's callback) run while a kernel computes.
_JIT = dict(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")

# Numba's "workqueue" threading layer (the fallback when neither OpenMP nor TBB is available) aborts the
# process when two threads launch parallel kernels at once; serialise the passes unless a thread-safe
# layer is active.
_WORKQUEUE_LOCK = threading.Lock()


# Entry points and kernel variants ("forward/serial", ...) whose kernels this process has loaded or compiled.
_STARTED: set[str] = set()


def _start_up_section(entry: str):
    """The first call of an entry point loads its kernels (Numba's start-up); see ``numba_startup``."""
    if entry in _STARTED:
        return contextlib.nullcontext()
    _STARTED.add(entry)
    return paused_garbage_collector()


def _parallel_section(parallel: bool = True):
    """Around a call that may launch parallel kernels: Numba's thread pool started first, the way
    ``threads.starting_pool`` describes, and the call serialised under Numba's workqueue layer (see
    ``_WORKQUEUE_LOCK``)."""
    if not parallel:
        return contextlib.nullcontext()
    threads.start_pool()
    return contextlib.nullcontext() if numba.threading_layer() in ("omp", "tbb") else _WORKQUEUE_LOCK


class Residuals(NamedTuple):
    """What the forward pass leaves for the backward pass, ``O(B*T*U)`` memory in all.

    - ``log_norm: (B, T, U1)`` compute dtype: the shift of each row's log-sum-exp, a logit of the frame
      (0 without fused log-softmax); the rest, ``log(sum_v exp(x_v - shift))``, is kept exactly in
      ``log_blank`` (:func:`log_normalizers`);
    - ``log_blank: (B, T, U1)`` float64: log-probability of the blank at ``(b, t, u)``;
    - ``log_emit: (B, T, U1)`` float64: log-probability of label ``targets[b, u]`` at ``(b, t, u)``;
    - ``alphas: (B, T, U1)`` float64: forward variables;
    - ``log_likelihood: (B,)`` float64: ``log P(y_b | x_b)``.
    """

    log_norm: np.ndarray
    log_blank: np.ndarray
    log_emit: np.ndarray
    alphas: np.ndarray
    log_likelihood: np.ndarray


# 16-bit floats reach the kernels as raw bits (Numba has no 16-bit float): float16 as uint16, bfloat16 as int16.
_BITS_OF = {"float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.int16)}


def as_kernel_array(array: np.ndarray) -> np.ndarray:
    """The array the kernels take for ``array``: itself, or a same-memory bits view for float16/bfloat16."""
    bits = _BITS_OF.get(array.dtype.name)
    return array if bits is None else array.view(bits)


def compute_dtype(dtype) -> np.dtype:
    """Arithmetic dtype of the kernels for logits of ``dtype`` (also the dtype of the costs): float64 for
    float64, float32 for everything narrower (float32, float16, bfloat16 and their bits views)."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def residual_shapes(batch: int, frames: int, positions: int, dtype: np.dtype) -> Residuals:
    """``(shape, dtype)`` of each residual array for logits of ``dtype``, for adapters that allocate them
    in their framework."""
    grid = (batch, frames, positions)
    f64 = np.dtype(np.float64)
    return Residuals((grid, compute_dtype(dtype)), (grid, f64), (grid, f64), (grid, f64), ((batch,), f64))


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def advise_huge_pages(array: np.ndarray) -> None:
    """Ask Linux to back the untouched pages of a large output buffer with transparent huge pages.

    Writing a fresh gradient buffer is dominated by first-touch page faults on this kind of machine (one per
    4 KiB page); numpy already gives its own large allocations this advice, but buffers from other
    allocators (XLA's) do not get it. Only advice: a no-op where unsupported or for small arrays.
    """
    if _libc is None or array.nbytes < 2 * _HUGE_PAGE:
        return
    start = -(-array.ctypes.data // _HUGE_PAGE) * _HUGE_PAGE  # first huge-page boundary inside the buffer
    end = (array.ctypes.data + array.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def allocate_residuals(batch: int, frames: int, positions: int, dtype: np.dtype) -> Residuals:
    """Uninitialised numpy residual arrays (the kernels write every entry they later read)."""
    return Residuals(*(np.empty(shape, dt) for shape, dt in residual_shapes(batch, frames, positions, dtype)))


@njit(**_JIT)
def _row_max(row):
    """Maximum of a 1-d array (NaNs skipped). Eight independent running maxima let LLVM use one SIMD
    max per eight elements; a single running maximum is a serial dependency chain (2x slower here)."""
    wide_vectors()
    V = row.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = load(row, 0)
    end = V - V % 8
    for i in range(0, end, 8):
        x0, x1, x2, x3 = load(row, i), load(row, i + 1), load(row, i + 2), load(row, i + 3)
        x4, x5, x6, x7 = load(row, i + 4), load(row, i + 5), load(row, i + 6), load(row, i + 7)
        m0 = x0 if x0 > m0 else m0
        m1 = x1 if x1 > m1 else m1
        m2 = x2 if x2 > m2 else m2
        m3 = x3 if x3 > m3 else m3
        m4 = x4 if x4 > m4 else m4
        m5 = x5 if x5 > m5 else m5
        m6 = x6 if x6 > m6 else m6
        m7 = x7 if x7 > m7 else m7
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for v in range(end, V):
        x = load(row, v)
        m = x if x > m else m
    return m


@njit(**_JIT)
def _sum_of_exp(row, shift, like):
    """``sum_v exp(row[v] - shift)`` in the compute dtype of ``like`` (vectorised: one fast_exp per entry)."""
    wide_vectors()
    s = cast_like(0.0, like)
    c = cast_like(shift, like)
    for v in range(row.shape[0]):
        s += fast_exp(load(row, v) - c)
    return s


# A row's sum of exp(x - shift) is trusted when it lies in this range: the largest term is then below
# float32's overflow (no exp argument was clipped) and entries that underflowed to 0 weigh < 1e-18 of it.
_SUM_LOW = 1e-20
_SUM_HIGH = 1e30


@njit(**_JIT)
def _log_prob(x, shift, log_sum):
    """``(x - shift) - log_sum`` in float64, in this order (:func:`fence`): ``x - (shift + log_sum)``
    loses ``log_sum`` next to a large shift (rows of -1e20 came out with log-probabilities of 0)."""
    return fence(np.float64(x) - np.float64(shift)) - log_sum


@njit(**_JIT)
def _normalise_frame(frame, width, labels, U_b, blank, fused_log_softmax, norms, log_blank, log_emit, extra_entries,
                     log_extra):
    """Pass 1 on the used rows ``u <= U_b`` of one frame, each a distribution over its first ``width`` entries.

    ``frame: (U1, >= width)`` logits of one ``(b, t)`` (a TDT row has its duration scores after them),
    ``labels: (>= U_b,)``; writes ``norms, log_blank, log_emit: (U1,)`` (see :func:`log_normalizers`) and the
    log-probabilities of the entries ``extra_entries: (K,) int64`` (multi-blank's big blanks) into
    ``log_extra: (U1, K)`` float64; the other losses pass ``None`` for both (the code is then left out).
    """
    frame_shift = _row_max(frame[0, :width]) if fused_log_softmax else cast_like(0.0, norms)
    if fused_log_softmax:
        for u in range(U_b + 1):
            if u + 2 <= U_b:
                prefetch_row(frame[u + 2, :width])
            norms[u] = _sum_of_exp(frame[u, :width], frame_shift, norms)
    for u in range(U_b + 1):
        row = frame[u, :width]
        shift = frame_shift
        log_sum = 0.0  # float64: the lattice's log-probabilities keep the digits the compute dtype drops
        if fused_log_softmax:
            s = norms[u]
            if s >= _SUM_LOW and s <= _SUM_HIGH:
                log_sum = math.log(np.float64(s))
            else:
                shift = _row_max(row)  # -inf for a row with every entry masked: its utterance is NaN
                log_sum = math.log(np.float64(_sum_of_exp(row, shift, norms)))
        norms[u] = shift
        log_blank[u] = _log_prob(load(row, blank), shift, log_sum)
        log_emit[u] = _log_prob(load(row, labels[u]), shift, log_sum) if u < U_b else -np.inf
        if extra_entries is not None:
            for i in range(extra_entries.shape[0]):
                log_extra[u, i] = _log_prob(load(row, extra_entries[i]), shift, log_sum)


@njit(**_JIT)
def _no_extra_entries(positions):
    """The ``extra_entries, log_extra, p_extra`` arguments of :func:`_write_frame_gradient` for a loss without
    extra blank-like arcs (empty arrays).

    The two row passes leave out the extra entries in different ways because each way was measured faster
    where it is (at (16, 150, 41, 1024), alternating processes): ``None`` arguments, whose code Numba prunes,
    in :func:`_normalise_frame` (empty arrays there: 2.5% slower), empty arrays in the frame writer (``None``
    there: 6% slower; the generated code differs in more than the pruned loops)."""
    return np.empty(0, np.int64), np.empty((positions, 0)), np.empty((0, positions))


@njit(parallel=True, **_JIT)
def log_normalizers(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax,
                    log_norm, log_blank, log_emit):
    """Pass 1: per-row shift of the log-normaliser and the blank/label log-probabilities the lattice uses.

    Each row's log-sum-exp is kept in two parts, a shift (a logit of the frame, in the compute dtype,
    stored in ``log_norm``) and ``log_sum = log(sum_v exp(x_v - shift))``: the log-probabilities are
    ``(x - shift) - log_sum`` in float64, exact for any finite logits, whereas the rounded sum
    ``shift + log_sum`` would lose ``log_sum`` next to a large shift. ``log_sum`` itself is not stored: the
    gradient pass recovers it from ``log_blank`` (see ``_PIVOT_LIMIT``).

    The rows of one frame share its encoder output, so their maxima are close: each row's sum of exps is
    shifted by the maximum of the frame's first row instead of its own maximum, which saves a pass over
    the row. A row whose sum leaves ``[_SUM_LOW, _SUM_HIGH]`` (a very different range, infinities, NaN)
    is summed again with its own maximum as its shift. The sums of a frame are taken before their logs so
    that the rows do not wait for each other's scalar ``log`` (:func:`_normalise_frame`).
    """
    B, T, U1, V = logits.shape
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        if t >= logit_lengths[b]:
            continue
        _normalise_frame(logits[b, t], V, targets[b], target_lengths[b], blank, fused_log_softmax,
                         log_norm[b, t], log_blank[b, t], log_emit[b, t], None, None)


# The gradient pass recovers a row's log_sum as (x_blank - shift) - log_blank, exact up to the rounding of
# the float64 log_blank and x_blank - shift, about |log_blank| * 2**-52: trusted while |log_blank| <= 2**10
# (an error below 3e-13, also for float64 logits). Rows whose blank is masked or has a probability below
# e**-1024 recompute their own maximum and sum instead (two more passes over those rows).
_PIVOT_LIMIT = 2.0**10


@njit
def _log_add(a, b):
    """``log(exp(a) + exp(b))`` in float64, exact for infinite arguments."""
    if a < b:
        a, b = b, a
    if b == -np.inf:
        return a
    return a + math.log1p(math.exp(b - a))


@njit(parallel=True, **_JIT)
def alphas_and_costs(log_blank, log_emit, logit_lengths, target_lengths, fastemit_lambda,
                     alphas, log_likelihood, costs):
    """Pass 2: forward variables, ``log P(y|x)`` and ``cost = -(1 + fastemit_lambda) * log P``.

    ``alphas[t, u]`` needs ``alphas[t-1, u]`` and ``alphas[t, u-1]``, so the cells of one anti-diagonal
    ``t + u = d`` are independent: walking the lattice diagonal by diagonal lets the CPU overlap their
    ``exp``/``log1p`` calls, where a row-by-row walk waits for each cell's (1.75x slower here).
    """
    B = log_blank.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        alpha = alphas[b]
        blank = log_blank[b]
        emit = log_emit[b]
        alpha[0, 0] = 0.0
        for d in range(1, T_b + U_b):
            for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                t = d - u
                if u == 0:
                    alpha[t, 0] = alpha[t - 1, 0] + blank[t - 1, 0]
                elif t == 0:
                    alpha[0, u] = alpha[0, u - 1] + emit[0, u - 1]
                else:
                    alpha[t, u] = _log_add(alpha[t - 1, u] + blank[t - 1, u], alpha[t, u - 1] + emit[t, u - 1])
        ll = alpha[T_b - 1, U_b] + blank[T_b - 1, U_b]
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(parallel=True, **_JIT)
def betas(log_blank, log_emit, logit_lengths, target_lengths, out):
    """Pass 3: backward variables ``out: (B, T, U1)`` float64, anti-diagonal by anti-diagonal from the
    end of the lattice (as in :func:`alphas_and_costs`)."""
    B = log_blank.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        beta = out[b]
        blank = log_blank[b]
        emit = log_emit[b]
        beta[T_b - 1, U_b] = blank[T_b - 1, U_b]
        for d in range(T_b + U_b - 2, -1, -1):
            for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                t = d - u
                if u == U_b:
                    beta[t, U_b] = beta[t + 1, U_b] + blank[t, U_b]
                elif t == T_b - 1:
                    beta[t, u] = beta[t, u + 1] + emit[t, u]
                else:
                    beta[t, u] = _log_add(beta[t + 1, u] + blank[t, u], beta[t, u + 1] + emit[t, u])


# A float32 row whose gradient entries are all below this in magnitude (``occupancy * scale``: a row far from
# every likely alignment) but not all below the normal range (those get 0) would still get mostly subnormal
# products exp(x - shift) * weight, each a microcode assist (such rows made the gradient pass of a TDT problem
# 1.5x slower). Its entries are computed as exp(x - shift + log(weight)) instead: 0 below float32's normal
# range, otherwise within about 1e-5 relative (the rounding of the summed exponent) of the product, below
# 1e-24 in absolute terms.
_TINY_GRADIENT = 2.0**-64


@njit(**_JIT)
def _row_log_sum(row, blank, shift, log_blank, like):
    """``(shift, log(sum_v exp(row[v] - shift)))`` of a row that pass 1 normalised, without summing it again:
    ``log_sum = (x_blank - shift) - log_blank`` (see ``_PIVOT_LIMIT``); a row whose blank is masked or
    hopeless (rare) takes its own maximum as the shift and sums again. ``like``: an array of the compute dtype."""
    if abs(log_blank) <= _PIVOT_LIMIT:
        return shift, _log_prob(load(row, blank), shift, log_blank)
    own = _row_max(row)
    return own, math.log(np.float64(_sum_of_exp(row, own, like)))


@njit(inline="always", **_JIT)  # inlined in Numba's IR: a call per row cost 10% of the pass at V=256
def _write_softmax_part(row, g, shift, occupancy, inv_sum, scale, like, tiny):
    """``g[v] = exp(row[v] - shift) * inv_sum * occupancy * scale`` (the softmax part of a row's gradient,
    unclamped), in one of three ways by the size of ``occupancy * scale``:

    - below the smallest normal number of the compute dtype: every entry (``softmax_v <= 1``) would be
      subnormal, so 0, as under flush-to-zero (JAX runs the callbacks so). Computed, each would be a
      subnormal product, a slow microcode assist on x86: rows far from the likely alignments took 10-15% of
      the pass at (16, 150, 40, 1024);
    - float32 compute below ``_TINY_GRADIENT``: ``exp(x_v - shift + log(weight))``, the weight joined to the
      exponent (see there);
    - otherwise one multiply per entry.

    ``shift`` and ``inv_sum`` (``1 / sum_v exp(x_v - shift)``) from pass 1, see :func:`_row_log_sum`;
    ``x - shift`` is exact-ish whatever the logits' common offset (the rounded log-sum-exp is not), and
    ``exp(x - shift)`` cannot overflow (a frame's shared shift is only kept for rows whose sum is at most
    ``_SUM_HIGH``). ``tiny``: the smallest normal number of the compute dtype.
    """
    wide_vectors()
    V = row.shape[0]
    size = abs(occupancy * scale)
    if size < tiny:
        for v in range(V):
            store(g, v, 0.0)
    elif size < _TINY_GRADIENT and tiny > 1e-300:
        weight = occupancy * inv_sum * scale
        log_weight = cast_like(math.log(abs(weight)), like)
        sign = cast_like(1.0 if weight >= 0 else -1.0, like)
        for v in range(V):
            store(g, v, fast_exp(load(row, v) - shift + log_weight) * sign)
    else:
        weight = cast_like(occupancy * inv_sum * scale, like)
        for v in range(V):
            store(g, v, fast_exp(load(row, v) - shift) * weight)


@njit(inline="always", **_JIT)
def _write_blank_like_entry(g, entry, label, has_label, softmax, occupancy, posterior, emit, limit, scale):
    """``g[entry] = softmax * occupancy - posterior`` (minus ``emit`` too where the row's label is that entry),
    clamped to ``limit`` and scaled: the entry of a blank (or a big blank) of a row's gradient."""
    value = softmax * occupancy - posterior
    if has_label and label == entry:
        value -= emit
    store(g, entry, min(max(value, -limit), limit) * scale)


@njit(inline="always", **_JIT)  # inlined in Numba's IR: a call per row cost 10% of the pass at V=256
def _write_arc_entries(g, blank, label, has_label, softmax_blank, softmax_label, occupancy, p_blank, emit, limit,
                       scale):
    """The blank's and the label's entries of a row's gradient, ``softmax * occupancy - posterior`` each
    (both posteriors at the blank when the label is the blank), clamped to ``limit`` and scaled."""
    _write_blank_like_entry(g, blank, label, has_label, softmax_blank, occupancy, p_blank, emit, limit, scale)
    if has_label and label != blank:
        g_label = softmax_label * occupancy - emit
        store(g, label, min(max(g_label, -limit), limit) * scale)


@njit(**_JIT)
def _write_row_gradient(row, g, blank, label, has_label, fused_log_softmax, shift, log_blank, log_emit,
                        p_blank, emit, clamp, scale, like):
    """The gradient of one row's cost w.r.t. its ``V`` logits (or log-probabilities), clamped and scaled.

    ``row, g: (V,)`` the row's logits and its gradient (same dtype; 16-bit as bits); ``shift`` and
    ``log_blank``/``log_emit`` (float64 log-softmax of the blank and of ``label``) from pass 1; ``p_blank``
    and ``emit`` the weights of the blank and label transitions out of the row (posteriors, the label's
    already times ``1 + fastemit_lambda``); ``like`` an array of the compute dtype.

    The gradient w.r.t. the log-probabilities is ``-p_blank`` at the blank and ``-emit`` at the label (both
    when they coincide); through the fused log-softmax every entry also gets ``softmax_v * (p_blank + emit)``,
    with ``softmax_v = exp(x_v - shift) / sum`` (:func:`_write_softmax_part`; the blank and label entries from
    the lattice's log-probabilities, :func:`_write_arc_entries`).
    """
    wide_vectors()
    V = row.shape[0]
    limit = clamp if clamp > 0 else np.inf
    if not fused_log_softmax:
        g[:] = 0
        _write_arc_entries(g, blank, label, has_label, 0.0, 0.0, 0.0, p_blank, emit, limit, scale)
        return
    occupancy = p_blank + emit
    shift, log_sum = _row_log_sum(row, blank, shift, log_blank, like)
    inv_sum = math.exp(-log_sum)
    tiny = np.finfo(like.dtype).tiny
    if clamp > 0 and abs(occupancy * scale) >= tiny:
        occ = cast_like(occupancy * inv_sum, like)
        lim = cast_like(limit, like)
        sc = cast_like(scale, like)
        for v in range(V):
            x = fast_exp(load(row, v) - shift) * occ
            x = lim if x > lim else x
            x = -lim if x < -lim else x
            store(g, v, x * sc)
    else:  # unclamped, or every entry below the normal range whatever the clamp
        _write_softmax_part(row, g, shift, occupancy, inv_sum, scale, like, tiny)
    # the blank and the label from the lattice's log-probabilities, exponentiated in the compute dtype (a
    # float32 exp is cheaper; its absolute error exp(lp) * |lp| * eps is at most eps)
    _write_arc_entries(g, blank, label, has_label, math.exp(cast_like(log_blank, like)),
                       math.exp(cast_like(log_emit, like)), occupancy, p_blank, emit, limit, scale)


@njit(**_JIT)
def _write_frame_gradient(frame, grads, width, labels, U_b, blank, fused_log_softmax, shifts, log_blank, log_emit,
                          p_blank, emit, clamp, scale, like, extra_entries, log_extra, p_extra):
    """The gradient of one frame's rows, each as :func:`_write_row_gradient` writes it; rows past ``U_b`` 0.

    ``frame, grads: (U1, W)`` the frame's logits and gradient; the rows ``u <= U_b`` get their first ``width``
    entries written (a TDT row's duration scores follow, the caller's), the rows past ``U_b`` all ``W``.
    ``labels: (>= U_b,)``; ``shifts, log_blank, log_emit: (U1,)`` from pass 1; ``p_blank, emit: (>= U_b + 1,)``
    float64 arc weights (see :func:`_write_row_gradient`; ``emit[U_b]`` unused); ``like`` an array of the
    compute dtype.

    Extra blank-like arcs (multi-blank's big blanks; none for the other losses, :func:`_no_extra_entries`): arc
    ``i`` leaves each row through entry ``extra_entries[i]``, with log-probability ``log_extra[u, i]`` and
    posterior ``p_extra[i, u]`` (float64). A row's occupancy counts them, and their entries get
    ``softmax * occupancy - posterior`` like the blank's (:func:`_write_blank_like_entry`).

    The per-row scalars (``1 / sum``, the arcs' softmax) are exponentials of float64 values: taken for all rows
    at once in loops LLVM vectorises (``fast_exp64``), a row then costs its loop over the vocabulary only (a
    row's own scalar exps were a third of the pass at V=256). The rows that need a special case (a clamp, no
    fused log-softmax, a hopeless blank) go through :func:`_write_row_gradient` itself.
    """
    wide_vectors()
    n = U_b + 1
    K = extra_entries.shape[0]
    for u in range(n, grads.shape[0]):
        grads[u, :] = 0
    scratch = np.empty((5 + K, n))
    centred = scratch[0]  # x_blank - shift: exact, kept apart from log_blank (see _log_prob)
    inv_sum = scratch[1]
    exp_blank = scratch[2]
    exp_label = scratch[3]
    blank_like = scratch[4]  # the posteriors of the blank and the extra arcs
    exp_extra = scratch[5:]
    for u in range(n):
        centred[u] = np.float64(load(frame, (u, blank))) - np.float64(shifts[u])
    for u in range(n):
        inv_sum[u] = fast_exp64(log_blank[u] - centred[u])  # exp(-log_sum), see _row_log_sum
        exp_blank[u] = fast_exp64(log_blank[u])
        exp_label[u] = fast_exp64(log_emit[u])
        blank_like[u] = p_blank[u]
    for i in range(K):
        for u in range(n):
            exp_extra[i, u] = fast_exp64(log_extra[u, i]) if fused_log_softmax else 0.0
            blank_like[u] += p_extra[i, u]
    tiny = np.finfo(like.dtype).tiny
    limit = clamp if clamp > 0 else np.inf
    for u in range(n):
        row = frame[u, :width]
        g = grads[u, :width]
        if u + 2 < n:
            prefetch_row(frame[u + 2, :width])
        has_label = u < U_b
        label = labels[u] if has_label else blank
        row_emit = emit[u] if has_label else 0.0
        occupancy = blank_like[u] + row_emit
        if not fused_log_softmax or clamp > 0 or abs(log_blank[u]) > _PIVOT_LIMIT:
            _write_row_gradient(row, g, blank, label, has_label, fused_log_softmax, shifts[u], log_blank[u],
                                log_emit[u], blank_like[u], row_emit, clamp, scale, like)
            if K > 0:  # its blank entry took every blank-like arc's posterior: write the blank's own
                _write_blank_like_entry(g, blank, label, has_label, exp_blank[u] if fused_log_softmax else 0.0,
                                        occupancy, p_blank[u], row_emit, limit, scale)
        else:
            _write_softmax_part(row, g, shifts[u], occupancy, inv_sum[u], scale, like, tiny)
            _write_arc_entries(g, blank, label, has_label, exp_blank[u], exp_label[u], occupancy, p_blank[u],
                               row_emit, np.inf, scale)
        for i in range(K):
            _write_blank_like_entry(g, extra_entries[i], label, has_label, exp_extra[i, u], occupancy, p_extra[i, u],
                                    row_emit, limit, scale)


@njit(**_JIT)
def _blank_posteriors(alpha, log_blank, beta, t, T_b, U_b, log_likelihood, p_blank):
    """``p_blank[u] = exp(alpha + log_blank + beta[t + 1, u] - log P)`` for the rows ``u <= U_b`` of frame ``t``
    (on the last frame only the final blank, which ends the lattice), in a vectorised loop (``fast_exp64``).

    ``alpha, log_blank: (>= U_b + 1,)`` of the frame, ``beta: (T, U1)`` of the utterance."""
    wide_vectors()
    n = U_b + 1
    if t < T_b - 1:
        next_beta = beta[t + 1]
        for u in range(n):
            p_blank[u] = fast_exp64(alpha[u] + log_blank[u] + next_beta[u] - log_likelihood)
    else:
        for u in range(n):
            p_blank[u] = 0.0
        p_blank[U_b] = fast_exp64(alpha[U_b] + log_blank[U_b] - log_likelihood)


@njit(**_JIT)
def _rnnt_frame_posteriors(alpha, log_blank, log_emit, beta, t, T_b, U_b, log_likelihood, label_weight, p_blank,
                           p_label):
    """The posteriors of the blank and label arcs out of the rows ``u <= U_b`` of frame ``t``,
    ``p_blank`` as :func:`_blank_posteriors` and ``p_label[u] = label_weight * exp(alpha + log_emit +
    beta[t, u + 1] - log P)`` (0 at ``U_b``), in vectorised loops (``fast_exp64``).

    ``alpha, log_blank, log_emit: (>= U_b + 1,)`` of the frame, ``beta: (T, U1)`` of the utterance."""
    wide_vectors()
    _blank_posteriors(alpha, log_blank, beta, t, T_b, U_b, log_likelihood, p_blank)
    this_beta = beta[t]
    for u in range(U_b):
        p_label[u] = label_weight * fast_exp64(alpha[u] + log_emit[u] + this_beta[u + 1] - log_likelihood)
    p_label[U_b] = 0.0


@njit(parallel=True, **_JIT)
def gradients(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
              clamp, grad_scale, log_norm, log_blank, log_emit, alphas, betas, log_likelihood, grads):
    """Pass 4: ``grads[b] = clip(d cost_b / d logits[b], -clamp, clamp) * grad_scale[b]``.

    With P_blank and P_label the posteriors of the blank and label transitions out of ``(t, u)``, each row's
    gradient is written as :func:`_write_row_gradient` does (FastEmit weighs P_label by ``1 + lambda``), a frame
    at a time (:func:`_write_frame_gradient`).
    """
    B, T, U1, V = logits.shape
    emit_weight = 1.0 + fastemit_lambda
    no_entries, no_log_probs, no_posteriors = _no_extra_entries(U1)
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if t >= T_b:
            grads[b, t] = 0
            continue
        weights = np.empty((2, U_b + 1))  # the blank's and the label's posteriors of each row
        p_blank = weights[0]
        emit = weights[1]
        lb = log_blank[b, t]
        le = log_emit[b, t]
        _rnnt_frame_posteriors(alphas[b, t], lb, le, betas[b], t, T_b, U_b, log_likelihood[b], emit_weight, p_blank,
                               emit)
        _write_frame_gradient(logits[b, t], grads[b, t], V, targets[b], U_b, blank, fused_log_softmax,
                              log_norm[b, t], lb, le, p_blank, emit, clamp, grad_scale[b], log_norm, no_entries,
                              no_log_probs, no_posteriors)


def _serial_variant(kernel):
    """``kernel`` compiled without ``parallel=True`` (its ``prange`` runs as ``range``): the same rows, each
    computed in the same order, hence the same bits. Its own name keeps Numba's on-disk cache entries of the
    two variants apart (Numba's cache index does not tell compile options apart)."""
    func = kernel.py_func
    serial = types.FunctionType(func.__code__, func.__globals__, f"{func.__name__}_serial", func.__defaults__,
                                func.__closure__)
    serial.__qualname__ = serial.__name__
    serial.__module__ = func.__module__
    serial.__doc__ = f"Serial variant of :func:`{func.__name__}` (same arguments, same results)."
    return njit(**_JIT)(serial)


log_normalizers_serial = _serial_variant(log_normalizers)
alphas_and_costs_serial = _serial_variant(alphas_and_costs)
betas_serial = _serial_variant(betas)
gradients_serial = _serial_variant(gradients)


def _rows(logits: np.ndarray) -> int:
    """Threads for a pass over ``logits: (B, T, U1, V)`` (1: the serial kernel; see ``threads``)."""
    return threads.thread_count(logits.size, threads.PARALLEL_MIN_ELEMENTS)


def _cells(lattice: np.ndarray) -> int:
    """Threads for a lattice pass over ``lattice: (B, T, U1)``, one of the residuals."""
    return threads.thread_count(lattice.size, threads.PARALLEL_MIN_CELLS, batch=lattice.shape[0])


def _choose(logits: np.ndarray, lattice: np.ndarray) -> tuple[int, int]:
    """Threads for the logits passes and for the lattice passes of one problem."""
    return _rows(logits), _cells(lattice)


def _section(entry: str, rows: int, cells: int) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(_parallel_section(max(rows, cells) > 1))
    stack.enter_context(_start_up_section(f"{entry}/{min(rows, 2)}/{min(cells, 2)}"))  # variants loaded
    return stack


def _launch(parallel_kernel, serial_kernel, count: int, *args) -> None:
    """``serial_kernel(*args)`` for ``count == 1``, else ``parallel_kernel(*args)`` on ``count`` threads."""
    if count == 1:
        serial_kernel(*args)
        return
    before = numba.get_num_threads()  # per calling thread in Numba
    if count != before:
        numba.set_num_threads(count)
    try:
        parallel_kernel(*args)
    finally:
        if count != before:
            numba.set_num_threads(before)


def normalise(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
              blank: int, fused_log_softmax: bool, residuals: Residuals) -> None:
    """Pass 1 (:func:`log_normalizers`) into ``residuals.log_norm/log_blank/log_emit``, serial or parallel."""
    rows = _rows(logits)
    with _section("log_normalizers", rows, 1):
        _launch(log_normalizers, log_normalizers_serial, rows, logits, targets, logit_lengths, target_lengths,
                blank, fused_log_softmax, residuals.log_norm, residuals.log_blank, residuals.log_emit)


def lattice_forward(logit_lengths: np.ndarray, target_lengths: np.ndarray, fastemit_lambda: float,
                    residuals: Residuals, costs: np.ndarray) -> None:
    """Pass 2 (:func:`alphas_and_costs`) into ``residuals.alphas/log_likelihood`` and ``costs``."""
    cells = _cells(residuals.alphas)
    with _section("alphas_and_costs", 1, cells):
        _launch(alphas_and_costs, alphas_and_costs_serial, cells, residuals.log_blank, residuals.log_emit,
                logit_lengths, target_lengths, fastemit_lambda, residuals.alphas, residuals.log_likelihood, costs)


def lattice_backward(logit_lengths: np.ndarray, target_lengths: np.ndarray, residuals: Residuals,
                     out: np.ndarray) -> None:
    """Pass 3 (:func:`betas`) into ``out: (B, T, U1)`` float64."""
    cells = _cells(out)
    with _section("betas", 1, cells):
        _launch(betas, betas_serial, cells, residuals.log_blank, residuals.log_emit, logit_lengths,
                target_lengths, out)


def gradient(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
             blank: int, fused_log_softmax: bool, fastemit_lambda: float, clamp: float, grad_scale: np.ndarray,
             residuals: Residuals, betas_: np.ndarray, grads: np.ndarray) -> None:
    """Pass 4 (:func:`gradients`) into ``grads``. ``betas_`` may have one frame more than ``logits`` (a tile
    of frames whose last frame needs the next one's betas)."""
    rows = _rows(logits)
    with _section("gradients", rows, 1):
        _launch(gradients, gradients_serial, rows, logits, targets, logit_lengths, target_lengths, blank,
                fused_log_softmax, fastemit_lambda, clamp, grad_scale, residuals.log_norm, residuals.log_blank,
                residuals.log_emit, residuals.alphas, betas_, residuals.log_likelihood, grads)


def forward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
            blank: int, fused_log_softmax: bool, fastemit_lambda: float,
            costs: np.ndarray, residuals: Residuals, rnnt_type: str = "regular", delay_penalty: float = 0.0) -> None:
    """Costs ``(B,)`` into ``costs`` and the forward residuals into ``residuals`` (caller-allocated).
    ``rnnt_type`` (``"regular"``, ``"modified"``, ``"constrained"``) and ``delay_penalty``: k2's variants of
    the lattice (see :func:`alphas_and_costs_variant`); same residuals."""
    normalise(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, residuals)
    if _is_variant(rnnt_type, delay_penalty):
        _variant_forward(logit_lengths, target_lengths, fastemit_lambda, rnnt_type, delay_penalty, residuals, costs)
        return
    lattice_forward(logit_lengths, target_lengths, fastemit_lambda, residuals, costs)


def backward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
             blank: int, fused_log_softmax: bool, fastemit_lambda: float, clamp: float,
             grad_scale: np.ndarray, residuals: Residuals, grads: np.ndarray, rnnt_type: str = "regular",
             delay_penalty: float = 0.0) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype), each utterance's gradient clamped
    and then multiplied by ``grad_scale: (B,) float64``. Allocates only the ``(B, T, U1)`` betas.
    ``rnnt_type`` and ``delay_penalty`` as given to :func:`forward`."""
    if _is_variant(rnnt_type, delay_penalty):
        _variant_backward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                          clamp, grad_scale, residuals, grads, rnnt_type, delay_penalty)
        return
    beta = np.empty_like(residuals.alphas)
    lattice_backward(logit_lengths, target_lengths, residuals, beta)
    gradient(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda, clamp,
             grad_scale, residuals, beta, grads)


# ---------------------------------------------------------------------------------------------------------
# Variants of the RNNT lattice (k2): rnnt_type "modified" / "constrained" and the delay penalty.
#
# They change only the label arc out of (t, u), never the log-probabilities, so pass 1 is the regular
# log_normalizers. The label arc's score is log_emit[t, u], plus log_blank[t, u + 1] for "constrained" (the
# blank of the next context on the same frame), plus delay_penalty * ((T_b - 1) / 2 - t); for "modified" and
# "constrained" it leads to (t + 1, u + 1) instead of (t, u + 1). The passes below are separate kernels so
# that the regular ones stay as they are (and as fast); forward/backward pick them.
# ---------------------------------------------------------------------------------------------------------

RNNT_TYPES = ("regular", "modified", "constrained")


def _variant_flags(rnnt_type: str) -> tuple[bool, bool]:
    """``(one_symbol_per_frame, context_blank)`` of ``rnnt_type``."""
    if rnnt_type not in RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {RNNT_TYPES}, got {rnnt_type!r}")
    return rnnt_type != "regular", rnnt_type == "constrained"


def _is_variant(rnnt_type: str, delay_penalty: float) -> bool:
    return rnnt_type != "regular" or delay_penalty != 0.0


@njit
def _beta_at(beta, t, u, T_b, U_b):
    """Backward variable of state ``(t, u)`` for ``t <= T_b``: past the last frame only the end of the
    lattice, ``(T_b, U_b)``, is a state (log-probability 0); ``beta`` holds the frames ``t < T_b``."""
    if t < T_b:
        return beta[t, u]
    return 0.0 if u == U_b else -np.inf


@njit
def _label_score(log_blank, log_emit, t, u, T_b, context_blank, delay_penalty):
    """Score of the label arc out of ``(t, u)`` (one utterance's ``(T, U1)`` log-probabilities)."""
    score = log_emit[t, u]
    if context_blank:
        score += log_blank[t, u + 1]
    if delay_penalty != 0.0:
        score += delay_penalty * ((T_b - 1) * 0.5 - t)
    return score


@njit(parallel=True, **_JIT)
def alphas_and_costs_variant(log_blank, log_emit, logit_lengths, target_lengths, fastemit_lambda,
                             one_symbol_per_frame, context_blank, delay_penalty, alphas, log_likelihood, costs):
    """Pass 2 of the variants (see the section comment): forward variables, ``log P`` and the costs.

    With one symbol per frame ``alphas[t]`` needs only ``alphas[t - 1]``: the cells of a frame are independent
    and computed frame by frame; the regular lattice with a delay penalty is walked by anti-diagonals as in
    :func:`alphas_and_costs`.
    """
    B = log_blank.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        alpha = alphas[b]
        blank = log_blank[b]
        emit = log_emit[b]
        alpha[0, 0] = 0.0
        if one_symbol_per_frame:
            for u in range(1, U_b + 1):
                alpha[0, u] = -np.inf
            for t in range(1, T_b):
                alpha[t, 0] = alpha[t - 1, 0] + blank[t - 1, 0]
                for u in range(1, U_b + 1):
                    label = alpha[t - 1, u - 1] + _label_score(blank, emit, t - 1, u - 1, T_b, context_blank,
                                                               delay_penalty)
                    alpha[t, u] = _log_add(alpha[t - 1, u] + blank[t - 1, u], label)
            ll = alpha[T_b - 1, U_b] + blank[T_b - 1, U_b]
            if U_b > 0:  # the last label on the last frame also ends the lattice
                ll = _log_add(ll, alpha[T_b - 1, U_b - 1] + _label_score(blank, emit, T_b - 1, U_b - 1, T_b,
                                                                         context_blank, delay_penalty))
        else:
            for d in range(1, T_b + U_b):
                for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                    t = d - u
                    if u == 0:
                        alpha[t, 0] = alpha[t - 1, 0] + blank[t - 1, 0]
                        continue
                    label = alpha[t, u - 1] + _label_score(blank, emit, t, u - 1, T_b, False, delay_penalty)
                    alpha[t, u] = label if t == 0 else _log_add(alpha[t - 1, u] + blank[t - 1, u], label)
            ll = alpha[T_b - 1, U_b] + blank[T_b - 1, U_b]
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(parallel=True, **_JIT)
def betas_variant(log_blank, log_emit, logit_lengths, target_lengths, one_symbol_per_frame, context_blank,
                  delay_penalty, out):
    """Pass 3 of the variants: backward variables ``out: (B, T, U1)`` float64 (frame by frame with one
    symbol per frame, else by anti-diagonals)."""
    B = log_blank.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        beta = out[b]
        blank = log_blank[b]
        emit = log_emit[b]
        if one_symbol_per_frame:
            for t in range(T_b - 1, -1, -1):
                beta[t, U_b] = _beta_at(beta, t + 1, U_b, T_b, U_b) + blank[t, U_b]
                for u in range(U_b):
                    label = _beta_at(beta, t + 1, u + 1, T_b, U_b) + _label_score(blank, emit, t, u, T_b,
                                                                                  context_blank, delay_penalty)
                    beta[t, u] = _log_add(_beta_at(beta, t + 1, u, T_b, U_b) + blank[t, u], label)
        else:
            beta[T_b - 1, U_b] = blank[T_b - 1, U_b]
            for d in range(T_b + U_b - 2, -1, -1):
                for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                    t = d - u
                    if u == U_b:
                        beta[t, U_b] = beta[t + 1, U_b] + blank[t, U_b]
                        continue
                    label = beta[t, u + 1] + _label_score(blank, emit, t, u, T_b, False, delay_penalty)
                    beta[t, u] = label if t == T_b - 1 else _log_add(beta[t + 1, u] + blank[t, u], label)


@njit(**_JIT)
def _variant_frame_posteriors(alpha, log_blank, log_emit, beta, t, T_b, U_b, log_likelihood, label_weight,
                              one_symbol_per_frame, context_blank, delay_penalty, p_blank, p_label):
    """The posteriors of the variant's arcs out of the rows ``u <= U_b`` of frame ``t``, as
    :func:`_rnnt_frame_posteriors`: the blank's, and ``p_label[u]`` (times ``label_weight``) that of the label
    arc to ``(t + 1, u + 1)`` (``(t, u + 1)`` without ``one_symbol_per_frame``) with the score of
    :func:`_label_score` (the delay penalty, a constant of the frame, goes with ``log P``). With
    ``context_blank`` the label arc out of ``(t, u - 1)`` also uses the blank of ``(t, u)``, so its posterior
    is added to ``p_blank[u]``. Vectorised loops (``fast_exp64``)."""
    wide_vectors()
    _blank_posteriors(alpha, log_blank, beta, t, T_b, U_b, log_likelihood, p_blank)
    offset = log_likelihood - delay_penalty * ((T_b - 1) * 0.5 - t)
    for u in range(U_b):
        p_label[u] = alpha[u] + log_emit[u] - offset  # the exponent, less the next state's beta
    if context_blank:
        for u in range(U_b):
            p_label[u] += log_blank[u + 1]
    target = t + 1 if one_symbol_per_frame else t
    if target < T_b:
        next_beta = beta[target]
        for u in range(U_b):
            p_label[u] = label_weight * fast_exp64(p_label[u] + next_beta[u + 1])
    else:  # past the last frame only the end of the lattice, (T_b, U_b), is a state
        last = p_label[U_b - 1] if U_b > 0 else 0.0
        for u in range(U_b):
            p_label[u] = 0.0
        if U_b > 0:
            p_label[U_b - 1] = label_weight * fast_exp64(last)
    p_label[U_b] = 0.0
    if context_blank:
        for u in range(1, U_b + 1):
            p_blank[u] += p_label[u - 1]


@njit(parallel=True, **_JIT)
def gradients_variant(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                      clamp, one_symbol_per_frame, context_blank, delay_penalty, grad_scale, log_norm, log_blank,
                      log_emit, alphas, betas, log_likelihood, grads):
    """Pass 4 of the variants, as :func:`gradients` (the same frame writer, :func:`_write_frame_gradient`);
    the posteriors are those of the variant's arcs (:func:`_variant_frame_posteriors`)."""
    B, T, U1, V = logits.shape
    emit_weight = 1.0 + fastemit_lambda
    no_entries, no_log_probs, no_posteriors = _no_extra_entries(U1)
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if t >= T_b:
            grads[b, t] = 0
            continue
        weights = np.empty((2, U_b + 1))
        p_blank = weights[0]
        emit = weights[1]
        lb = log_blank[b, t]
        le = log_emit[b, t]
        _variant_frame_posteriors(alphas[b, t], lb, le, betas[b], t, T_b, U_b, log_likelihood[b], emit_weight,
                                  one_symbol_per_frame, context_blank, delay_penalty, p_blank, emit)
        _write_frame_gradient(logits[b, t], grads[b, t], V, targets[b], U_b, blank, fused_log_softmax, log_norm[b, t],
                              lb, le, p_blank, emit, clamp, grad_scale[b], log_norm, no_entries, no_log_probs,
                              no_posteriors)


alphas_and_costs_variant_serial = _serial_variant(alphas_and_costs_variant)
betas_variant_serial = _serial_variant(betas_variant)
gradients_variant_serial = _serial_variant(gradients_variant)


def _variant_forward(logit_lengths, target_lengths, fastemit_lambda, rnnt_type, delay_penalty, residuals, costs):
    one_per_frame, context_blank = _variant_flags(rnnt_type)
    cells = _cells(residuals.alphas)
    with _section("alphas_and_costs_variant", 1, cells):
        _launch(alphas_and_costs_variant, alphas_and_costs_variant_serial, cells, residuals.log_blank,
                residuals.log_emit, logit_lengths, target_lengths, fastemit_lambda, one_per_frame, context_blank,
                float(delay_penalty), residuals.alphas, residuals.log_likelihood, costs)


def _variant_backward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                      clamp, grad_scale, residuals, grads, rnnt_type, delay_penalty):
    one_per_frame, context_blank = _variant_flags(rnnt_type)
    delay_penalty = float(delay_penalty)
    beta = np.empty_like(residuals.alphas)
    cells = _cells(beta)
    with _section("betas_variant", 1, cells):
        _launch(betas_variant, betas_variant_serial, cells, residuals.log_blank, residuals.log_emit, logit_lengths,
                target_lengths, one_per_frame, context_blank, delay_penalty, beta)
    rows = _rows(logits)
    with _section("gradients_variant", rows, 1):
        _launch(gradients_variant, gradients_variant_serial, rows, logits, targets, logit_lengths, target_lengths,
                blank, fused_log_softmax, fastemit_lambda, clamp, one_per_frame, context_blank, delay_penalty,
                grad_scale, residuals.log_norm, residuals.log_blank, residuals.log_emit, residuals.alphas, beta,
                residuals.log_likelihood, grads)
