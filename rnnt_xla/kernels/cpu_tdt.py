"""Token-and-Duration Transducer (TDT) loss on the CPU: Numba kernels over raw numpy arrays.

The TDT (Xu et al., 2023; NeMo's semantics, see ``rnnt_xla.reference.tdt_loss_reference``) scores, at each
lattice cell ``(t, u)``, a label distribution (the first ``V`` logits, the blank among them) and a distribution
over the ``D`` durations (the last ``D`` logits). Every arc emits one token and picks one duration ``d``: a
blank (``d > 0``) goes to ``(t + d, u)``, the label ``y_{u+1}`` to ``(t + d, u + 1)`` while ``t + d < T_b``;
its weight is ``log_softmax(labels)[token] - sigma + log_softmax(durations)[d]``. The blanks that end exactly
at ``T_b`` from ``(T_b - d, U_b)`` reach the final state.

Four passes, as in :mod:`rnnt_xla.kernels.cpu` (whose helpers they share), none of which materialises a
``B*T*(U+1)*(V+D)`` temporary:

1. :func:`normalizers` (parallel over frames): the label rows' log-softmax shifts and blank/label
   log-probabilities (``cpu._normalise_frame``, the same code as the RNNT pass), and each row's duration
   log-softmax (all rows of a frame at once);
2. :func:`alphas_and_costs` (parallel over the batch): forward variables over the duration arcs, costs,
   anti-diagonal by anti-diagonal (the cells of one are independent; :func:`skewed_alphas`, which multi-blank
   RNNT's lattice uses too);
3. :func:`betas` (parallel over the batch): backward variables, the same way (:func:`skewed_betas`);
4. :func:`gradients` (parallel over frames): the arcs' posteriors of all rows of a frame, then one sweep of
   each frame writes its rows' label parts (``cpu._write_frame_gradient``, the RNNT writer) and their duration
   parts.

The float64 lattice values and posteriors use ``fast_math.fast_exp64`` (within 1 ulp of ``math.exp``) in
loops over the rows of a frame or the cells of an anti-diagonal, which LLVM vectorises; a scalar ``math.exp``
per arc cost more than the rest of the loss.

With ``label_head_only`` (NeMo's ``omega`` case) the loss is the plain RNNT loss of ``logits[..., :V]``:
passes 2 and 3 are the RNNT lattice passes of ``cpu``, no sigma, and the duration part's gradient is zero;
the residuals have the same shapes either way.

Semantics of the options, as NeMo's ``compute_tdt_grad_kernel``: FastEmit weighs the label arcs'
posteriors by ``1 + fastemit_lambda`` in the label part only (not in the duration part), and the cost is
``-(1 + fastemit_lambda) * log P``; ``clamp`` clips the label part's gradient only. An utterance that no
alignment fits (``log P = -inf``, e.g. an odd ``T_b`` with durations ``[2]``) costs ``inf`` and gets a zero
gradient.

Arrays: ``logits: (B, T, U1, V + D)`` float32/float64, or float16/bfloat16 as bits
(``cpu.as_kernel_array``), C-contiguous; ``targets: (B, W)``, lengths ``(B,)`` and ``durations: (D,)`` int64
(already validated: durations sorted, distinct, non-negative; ``blank`` in ``[0, V)``); residuals
:class:`Residuals`. Padded frames and label positions receive exactly zero gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import cpu
from .cpu import (_JIT, _launch, _log_prob, _no_extra_entries, _normalise_frame, _rnnt_frame_posteriors, _section,
                  _serial_variant, _write_frame_gradient)
from .fast_math import fast_exp64, load, store
from .numba_startup import paused_garbage_collector

with paused_garbage_collector():
    from numba import njit, prange

__all__ = [
    "Residuals",
    "residual_shapes",
    "allocate_residuals",
    "forward",
    "backward",
    "normalizers",
    "alphas_and_costs",
    "betas",
    "gradients",
]


class Residuals(NamedTuple):
    """What the forward pass leaves for the backward pass, ``O(B*T*U*D)`` memory in all.

    - ``log_norm: (B, T, U1)`` compute dtype, ``log_blank``, ``log_emit: (B, T, U1)`` float64: the label rows'
      shifts and the log-softmax of the blank and of the next label, as ``cpu.Residuals`` (without sigma);
    - ``log_durations: (B, T, U1, D)`` float64: the duration log-softmax of each row;
    - ``alphas: (B, T, U1)`` float64: forward variables (RNNT ones with ``label_head_only``);
    - ``log_likelihood: (B,)`` float64: ``log P(y_b | x_b)``.
    """

    log_norm: np.ndarray
    log_blank: np.ndarray
    log_emit: np.ndarray
    log_durations: np.ndarray
    alphas: np.ndarray
    log_likelihood: np.ndarray


def residual_shapes(batch: int, frames: int, positions: int, num_durations: int, dtype: np.dtype) -> Residuals:
    """``(shape, dtype)`` of each residual array for logits of ``dtype`` with ``num_durations`` durations."""
    grid = (batch, frames, positions)
    f64 = np.dtype(np.float64)
    return Residuals((grid, cpu.compute_dtype(dtype)), (grid, f64), (grid, f64), (grid + (num_durations,), f64),
                     (grid, f64), ((batch,), f64))


def allocate_residuals(batch: int, frames: int, positions: int, num_durations: int, dtype: np.dtype) -> Residuals:
    """Uninitialised numpy residual arrays (the kernels write every entry they later read)."""
    shapes = residual_shapes(batch, frames, positions, num_durations, dtype)
    return Residuals(*(np.empty(shape, dt) for shape, dt in shapes))


@njit(**_JIT)
def _duration_log_softmax(frame, V, rows, out, scratch):
    """The duration log-softmax of the first ``rows`` rows of one frame, ``out[u, i] = (x_i - max) -
    log(sum exp(x - max))`` (float64, as ``cpu._log_prob``).

    ``frame: (U1, V + D)`` logits, ``out: (U1, D)`` float64, ``scratch: (D + 2, >= rows)`` float64. The
    scores are first transposed into ``scratch`` so that the max, the exps and the sums run over the rows of
    the frame, loops LLVM vectorises (``fast_exp64``); a row's ``D`` entries alone are too few.
    """
    D = out.shape[1]
    x = scratch[:D]
    m = scratch[D]
    s = scratch[D + 1]
    for i in range(D):
        for u in range(rows):
            x[i, u] = np.float64(load(frame, (u, V + i)))
    for u in range(rows):
        m[u] = x[0, u]
    for i in range(1, D):
        xi = x[i]
        for u in range(rows):
            m[u] = xi[u] if xi[u] > m[u] else m[u]
    for u in range(rows):
        s[u] = 0.0
    for i in range(D):
        xi = x[i]
        for u in range(rows):
            s[u] += fast_exp64(xi[u] - m[u])
    for u in range(rows):
        log_sum = math.log(s[u])
        for i in range(D):
            out[u, i] = _log_prob(x[i, u], m[u], log_sum)


@njit(parallel=True, **_JIT)
def normalizers(logits, targets, logit_lengths, target_lengths, blank, log_norm, log_blank, log_emit,
                log_durations):
    """Pass 1: the label part of each used row as ``cpu.log_normalizers`` and the duration log-softmax
    ``log_durations[b, t, u, i]`` (float64, ``(x_i - max) - log(sum exp(x - max))`` as ``cpu._log_prob``)."""
    B, T, U1, W = logits.shape
    D = log_durations.shape[3]
    V = W - D
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        if t >= logit_lengths[b]:
            continue
        U_b = target_lengths[b]
        _normalise_frame(logits[b, t], V, targets[b], U_b, blank, True, log_norm[b, t], log_blank[b, t],
                         log_emit[b, t], None, None)
        _duration_log_softmax(logits[b, t], V, U_b + 1, log_durations[b, t], np.empty((D + 2, U_b + 1)))


@njit(**_JIT)
def _fold_max(m, x):
    """The larger of ``m`` and ``x``, NaN once either is (a NaN logit makes its utterance NaN)."""
    return x if (x > m or x != x) else m


@njit(**_JIT)
def _skewed_weights(log_blank, log_emit, log_durations, T_b, U_b, blank_weights, label_weights):
    """The arcs' weights of one utterance in anti-diagonal layout: ``blank_weights[i, t + u, u] =
    log_blank[t, u] + log_durations[t, u, i]`` and ``label_weights`` the same with ``log_emit``.

    ``log_blank, log_emit: (T, U1)``, ``log_durations: (T, U1, D)``; outputs ``(D, >= T_b + U_b, U_b + 1)``
    float64. The cells of an anti-diagonal ``t + u = k`` are then contiguous, and so are the sources (or
    targets) of their arcs of one duration: the lattice passes run over them in vectorised loops.
    """
    D = log_durations.shape[2]
    for t in range(T_b):
        for u in range(U_b + 1):
            lb = log_blank[t, u]
            le = log_emit[t, u]
            for i in range(D):
                ld = log_durations[t, u, i]
                blank_weights[i, t + u, u] = lb + ld
                label_weights[i, t + u, u] = le + ld


# The loops over the cells of an anti-diagonal run over unsigned indices: Numba wraps negative signed indices,
# and the select it adds for an index that LLVM cannot prove non-negative (a loop not starting at 0) keeps the
# loop from being vectorised.

@njit(**_JIT)
def _fold_terms(sweep, m, acc, cell, lattice, row, col, weights, i, weight_row, weight_col, count):
    """One arc kind and duration of ``count`` consecutive cells of an anti-diagonal: the term of cell
    ``cell + j`` is ``lattice[row, col + j] + weights[i, weight_row, weight_col + j]``. Sweep 0 folds it into
    the cell's maximum ``m``, sweep 1 adds ``exp(term - m)`` to ``acc`` (``m`` then the cell's shift)."""
    c = np.uint64(cell)
    c1 = np.uint64(col)
    c2 = np.uint64(weight_col)
    if sweep == 0:
        for j in range(np.uint64(count)):
            m[c + j] = _fold_max(m[c + j], lattice[row, c1 + j] + weights[i, weight_row, c2 + j])
    else:
        for j in range(np.uint64(count)):
            acc[c + j] += fast_exp64(lattice[row, c1 + j] + weights[i, weight_row, c2 + j] - m[c + j])


@njit(**_JIT)
def _alpha_terms(sweep, m, acc, a, wb, we, durations, label_arcs, k, lo, hi):
    """Sweep ``sweep`` (:func:`_fold_terms`) over the arcs into the cells ``lo <= u < hi`` of anti-diagonal
    ``k``: the blank of duration ``d > 0`` from ``(t - d, u)`` (anti-diagonal ``k - d``), the label from
    ``(t - d, u - 1)`` (``k - d - 1``) for the first ``label_arcs`` durations, where ``t - d >= 0``."""
    for i in range(durations.shape[0]):
        d = durations[i]
        end = min(hi, k - d + 1)  # the source (t - d, .) exists: u <= k - d
        if end <= lo:
            break
        if d > 0:
            _fold_terms(sweep, m, acc, lo, a, k - d, lo, wb, i, k - d, lo, end - lo)
        start = max(lo, 1)
        if i < label_arcs and start < end:
            _fold_terms(sweep, m, acc, start, a, k - d - 1, start - 1, we, i, k - d - 1, start - 1, end - start)


@njit(**_JIT)
def _beta_terms(sweep, m, acc, z, wb, we, durations, label_arcs, T_b, U_b, k, lo, hi):
    """Sweep ``sweep`` over the arcs out of the cells ``lo <= u < hi`` of anti-diagonal ``k``: the blank of
    duration ``d > 0`` to ``(t + d, u)`` where ``t + d <= T_b``, the label (the first ``label_arcs`` durations)
    to ``(t + d, u + 1)`` where ``t + d < T_b`` and ``u < U_b``."""
    for i in range(durations.shape[0]):
        d = durations[i]
        start = max(lo, k + d - T_b)  # the blank ends at t + d <= T_b
        if start >= hi:
            break
        if d > 0:
            _fold_terms(sweep, m, acc, start, z, k + d, start, wb, i, k, start, hi - start)
        start = max(lo, k + d - T_b + 1)
        end = min(hi, U_b)
        if i < label_arcs and start < end:
            _fold_terms(sweep, m, acc, start, z, k + d + 1, start + 1, we, i, k, start, end - start)


@njit(**_JIT)
def _start_cells(m, acc, lo, hi):
    """No term yet in the cells ``lo <= u < hi``: maximum ``-inf``, sum 0."""
    for u in range(np.uint64(lo), np.uint64(hi)):
        m[u] = -np.inf
        acc[u] = 0.0


@njit(**_JIT)
def _shifts(m, lo, hi):
    """The shift of each cell's log-sum-exp: its largest term, or 0 where it has none (``m = -inf``), so
    that ``exp(term - shift)`` is 0 there and ``shift + log(0) = -inf``; NaN stays NaN."""
    for u in range(np.uint64(lo), np.uint64(hi)):
        m[u] = 0.0 if m[u] == -np.inf else m[u]


# A cell's sum of exp(term - guess) is trusted in this range: the guess is then within 70 of the largest term
# (log(sum) adds at most 70 * 2**-52 of rounding), and no term overflowed or underflowed everything.
_GUESS_LOW = 2.0**-100
_GUESS_HIGH = 2.0**100


@njit(**_JIT)
def _sums_in_range(acc, lo, hi):
    """Whether every sum of the cells ``lo <= u < hi`` lies in ``[_GUESS_LOW, _GUESS_HIGH]`` (NaN does not)."""
    bad = 0
    for u in range(np.uint64(lo), np.uint64(hi)):
        bad += not (acc[u] >= _GUESS_LOW and acc[u] <= _GUESS_HIGH)
    return bad == 0


@njit(**_JIT)
def _guess_alpha_shifts(a, k, lo, hi, m):
    """``m[u] = max(alpha[t - 1, u], alpha[t, u - 1])`` (of those that exist) for the cells ``lo <= u < hi`` of
    anti-diagonal ``k >= 1``, ``t = k - u``: a cell's value, hence its largest term, is usually close to its
    neighbours'."""
    if lo == 0:
        m[0] = a[k - 1, 0]
    for u in range(np.uint64(max(lo, 1)), np.uint64(min(hi, k))):  # 1 <= u <= k - 1
        m[u] = max(a[k - 1, u], a[k - 1, u - np.uint64(1)])
    if hi == k + 1:  # t = 0
        m[k] = a[k - 1, k - 1]


@njit(**_JIT)
def _guess_beta_shifts(z, k, lo, hi, U_b, m):
    """``m[u] = max(beta[t + 1, u], beta[t, u + 1])`` (the latter for ``u < U_b``) for the cells ``lo <= u < hi``
    of anti-diagonal ``k``, as :func:`_guess_alpha_shifts`."""
    for u in range(np.uint64(lo), np.uint64(min(hi, U_b))):
        m[u] = max(z[k + 1, u], z[k + 1, u + np.uint64(1)])
    if hi == U_b + 1:
        m[U_b] = z[k + 1, U_b]


@njit(**_JIT)
def _start_sums(acc, lo, hi):
    """Sums 0 in the cells ``lo <= u < hi``."""
    for u in range(np.uint64(lo), np.uint64(hi)):
        acc[u] = 0.0


@njit(**_JIT)
def _finish_cells(m, acc, lo, hi, sigma, lattice, row):
    """``lattice[row, u] = m[u] + log(acc[u]) - sigma`` for ``lo <= u < hi`` (``-inf`` without terms)."""
    for u in range(lo, hi):
        lattice[row, u] = m[u] + math.log(acc[u]) - sigma


@njit(**_JIT)
def skewed_alphas(wb, we, durations, label_arcs, T_b, U_b, sigma, alpha):
    """The forward variables of one utterance from its arcs' weights in the layout of :func:`_skewed_weights`,
    into ``alpha: (>= T_b, >= U_b + 1)`` float64, and its ``log P`` (returned).

    An arc into ``(t, u)`` of duration ``d = durations[i]`` (ascending) leaves ``(t - d, u)`` (a blank, ``d > 0``,
    weight ``wb[i, t - d + u, u]``) or, for ``i < label_arcs``, ``(t - d, u - 1)`` (a label, weight
    ``we[i, t - d + u - 1, u - 1]``); ``alpha = logsumexp(alpha[source] + weight) - sigma``, and the final state
    ``(T_b, U_b)`` sums the blanks that end exactly at ``T_b``. TDT has label arcs of every duration; multi-blank
    RNNT (durations ``[0, 1, big blanks...]``) only of duration 0.

    Every arc goes to a later anti-diagonal ``t + u``, so the cells of one anti-diagonal are independent: they
    are computed together, one vectorised loop per arc kind and duration. Each cell's log-sum-exp is shifted
    by a guess, the larger of its neighbours ``(t - 1, u)`` and ``(t, u - 1)`` (one loop of ``exp`` per arc,
    ``fast_exp64``, one ``log`` per cell). An anti-diagonal where a sum leaves ``[_GUESS_LOW, _GUESS_HIGH]`` (a
    cell far from its neighbours, unreachable, or NaN) is summed again with each cell's largest term as its
    shift.
    """
    D = durations.shape[0]
    n = U_b + 1
    K = T_b + U_b  # anti-diagonals k = t + u of the cells
    a = np.empty((K, n))  # a[t + u, u] = alpha[t, u]
    m = np.empty(n)
    acc = np.empty(n)
    a[0, 0] = 0.0
    for k in range(1, K):
        lo = max(0, k - T_b + 1)  # the cells (k - u, u) with lo <= u < hi
        hi = min(k, U_b) + 1
        _guess_alpha_shifts(a, k, lo, hi, m)
        _start_sums(acc, lo, hi)
        _alpha_terms(1, m, acc, a, wb, we, durations, label_arcs, k, lo, hi)
        if not _sums_in_range(acc, lo, hi):
            _start_cells(m, acc, lo, hi)
            _alpha_terms(0, m, acc, a, wb, we, durations, label_arcs, k, lo, hi)
            _shifts(m, lo, hi)
            _alpha_terms(1, m, acc, a, wb, we, durations, label_arcs, k, lo, hi)
        _finish_cells(m, acc, lo, hi, sigma, a, k)
    for t in range(T_b):
        for u in range(n):
            alpha[t, u] = a[t + u, u]
    # the final state (T_b, U_b): the blanks that end exactly at T_b
    last = -np.inf
    for i in range(D):
        s = T_b - durations[i]
        if durations[i] > 0 and s >= 0:
            last = _fold_max(last, alpha[s, U_b] + wb[i, s + U_b, U_b])
    if last == -np.inf:
        return -np.inf
    total = 0.0
    for i in range(D):
        s = T_b - durations[i]
        if durations[i] > 0 and s >= 0:
            total += math.exp(alpha[s, U_b] + wb[i, s + U_b, U_b] - last)
    return last + math.log(total) - sigma


@njit(**_JIT)
def skewed_betas(wb, we, durations, label_arcs, T_b, U_b, sigma, beta):
    """The backward variables of one utterance into ``beta: (>= T_b, >= U_b + 1)`` float64,
    ``beta[t, u] = logsumexp(outgoing arcs' weight + beta[next]) - sigma``, over the arcs of
    :func:`skewed_alphas`, anti-diagonal by anti-diagonal from the end of the lattice (the guess: the larger of
    ``(t + 1, u)`` and ``(t, u + 1)``).

    A blank of duration ``d > 0`` needs ``t + d <= T_b`` and a label ``t + d < T_b``, ``u < U_b``; of the
    states past the last frame only the final one, ``(T_b, U_b)``, exists (``beta = 0``).
    """
    n = U_b + 1
    K = T_b + U_b
    z = np.empty((K + 1, n))  # z[t + u, u] = beta[t, u], with the states (T_b, u) of frame T_b
    for u in range(U_b):
        z[T_b + u, u] = -np.inf
    z[K, U_b] = 0.0
    m = np.empty(n)
    acc = np.empty(n)
    for k in range(K - 1, -1, -1):
        lo = max(0, k - T_b + 1)
        hi = min(k, U_b) + 1
        _guess_beta_shifts(z, k, lo, hi, U_b, m)
        _start_sums(acc, lo, hi)
        _beta_terms(1, m, acc, z, wb, we, durations, label_arcs, T_b, U_b, k, lo, hi)
        if not _sums_in_range(acc, lo, hi):
            _start_cells(m, acc, lo, hi)
            _beta_terms(0, m, acc, z, wb, we, durations, label_arcs, T_b, U_b, k, lo, hi)
            _shifts(m, lo, hi)
            _beta_terms(1, m, acc, z, wb, we, durations, label_arcs, T_b, U_b, k, lo, hi)
        _finish_cells(m, acc, lo, hi, sigma, z, k)
    for t in range(T_b):
        for u in range(n):
            beta[t, u] = z[t + u, u]


@njit(parallel=True, **_JIT)
def alphas_and_costs(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma,
                     fastemit_lambda, alphas, log_likelihood, costs):
    """Pass 2: ``alphas[b, t, u] = logsumexp(incoming arcs) - sigma``, ``log P`` and
    ``cost = -(1 + fastemit_lambda) * log P`` (:func:`skewed_alphas`).

    An arc into ``(t, u)`` with duration ``d`` leaves ``(t - d, u)`` (blank, ``d > 0``) or ``(t - d, u - 1)``
    (label); its weight minus sigma is ``log_blank/log_emit + log_durations`` there.
    """
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        wb = np.empty((D, T_b + U_b, U_b + 1))
        we = np.empty((D, T_b + U_b, U_b + 1))
        _skewed_weights(log_blank[b], log_emit[b], log_durations[b], T_b, U_b, wb, we)
        ll = skewed_alphas(wb, we, durations, D, T_b, U_b, sigma, alphas[b])
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(parallel=True, **_JIT)
def betas(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma, out):
    """Pass 3: backward variables ``out: (B, T, U1)`` float64 (:func:`skewed_betas`)."""
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        wb = np.empty((D, T_b + U_b, U_b + 1))
        we = np.empty((D, T_b + U_b, U_b + 1))
        _skewed_weights(log_blank[b], log_emit[b], log_durations[b], T_b, U_b, wb, we)
        skewed_betas(wb, we, durations, D, T_b, U_b, sigma, out[b])


@njit(**_JIT)
def _frame_posteriors(durations, t, T_b, U_b, sigma, ll, alpha, log_blank, log_emit, log_durations, beta,
                      blank_posteriors, label_posteriors):
    """The posteriors of the arcs out of the rows ``u <= U_b`` of frame ``t``, ``blank_posteriors[i, u]`` and
    ``label_posteriors[i, u]`` for duration ``durations[i]`` (0 for the arcs that do not exist), as
    ``exp(alpha[t, u] + weight - sigma + beta[next] - log P)``.

    ``alpha, log_blank, log_emit: (U1,)`` of the frame, ``log_durations: (D, >= U_b + 1)`` its duration
    log-softmax transposed, ``beta: (T, U1)`` of the utterance. For one duration the next states of the rows
    are contiguous in ``beta[t + d]``: one vectorised loop per duration and arc kind.
    """
    D = durations.shape[0]
    for i in range(D):
        d = durations[i]
        nt = t + d
        qb = blank_posteriors[i]
        ql = label_posteriors[i]
        w = log_durations[i]
        # an arc to a state the end cannot be reached from has posterior 0 (a NaN utterance too)
        if nt < T_b and d > 0:
            nb = beta[nt]
            for u in range(U_b):
                q_blank = fast_exp64(alpha[u] - sigma - ll + w[u] + log_blank[u] + nb[u])
                q_label = fast_exp64(alpha[u] - sigma - ll + w[u] + log_emit[u] + nb[u + 1])
                qb[u] = q_blank if nb[u] != -np.inf else 0.0
                ql[u] = q_label if nb[u + 1] != -np.inf else 0.0
            q_blank = fast_exp64(alpha[U_b] - sigma - ll + w[U_b] + log_blank[U_b] + nb[U_b])
            qb[U_b] = q_blank if nb[U_b] != -np.inf else 0.0
        elif nt < T_b:  # d = 0: labels only
            nb = beta[nt]
            for u in range(U_b):
                q_label = fast_exp64(alpha[u] - sigma - ll + w[u] + log_emit[u] + nb[u + 1])
                qb[u] = 0.0
                ql[u] = q_label if nb[u + 1] != -np.inf else 0.0
            qb[U_b] = 0.0
        else:
            for u in range(U_b + 1):
                qb[u] = 0.0
                ql[u] = 0.0
            if nt == T_b and d > 0:  # the blank that ends the lattice, from (T_b - d, U_b)
                qb[U_b] = fast_exp64(alpha[U_b] - sigma - ll + w[U_b] + log_blank[U_b])
        ql[U_b] = 0.0


@njit(parallel=True, **_JIT)
def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
              label_head_only, grad_scale, log_norm, log_blank, log_emit, log_durations, alphas, betas,
              log_likelihood, grads):
    """Pass 4: ``grads[b]``, the gradient of ``cost_b`` w.r.t. ``logits[b]`` times ``grad_scale[b]`` (the label
    part clipped to ``[-clamp, clamp]`` first).

    With ``P_blank(i)`` and ``P_label(i)`` the posteriors of the blank and label arcs of duration
    ``durations[i]`` out of ``(t, u)`` (:func:`_frame_posteriors`, all rows of a frame at once), the label part
    is the RNNT row gradient with ``P_blank = sum_i P_blank(i)`` and ``P_label = sum_i P_label(i)``
    (``cpu._write_frame_gradient``); the duration part, through its log-softmax, is
    ``softmax_i * (P_blank + P_label) - (P_blank(i) + P_label(i))``.
    With ``label_head_only`` the posteriors are the RNNT ones (as ``cpu.gradients``), the duration part 0.
    """
    B, T, U1, W = logits.shape
    D = durations.shape[0]
    V = W - D
    emit_weight = 1.0 + fastemit_lambda
    no_entries, no_log_probs, no_posteriors = _no_extra_entries(U1)
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        ll = log_likelihood[b]
        if t >= T_b or (ll == -np.inf and not label_head_only):  # padding, or an utterance without alignment
            grads[b, t] = 0
            continue
        scale = grad_scale[b]
        beta = betas[b]
        n = U_b + 1
        # per row u: P_blank, P_label; per (duration, row): log-softmax, softmax, blank and label posteriors;
        # per row: (1 + lambda) * P_label
        scratch = np.empty((3 + 4 * D, n))
        p_blank = scratch[0]
        p_label = scratch[1]
        log_dur = scratch[2:2 + D]
        softmax = scratch[2 + D:2 + 2 * D]
        blank_post = scratch[2 + 2 * D:2 + 3 * D]
        label_post = scratch[2 + 3 * D:2 + 4 * D]
        emit = scratch[2 + 4 * D]
        alpha = alphas[b, t]
        lb = log_blank[b, t]
        le = log_emit[b, t]
        if label_head_only:  # the RNNT posteriors of the label head
            _rnnt_frame_posteriors(alpha, lb, le, beta, t, T_b, U_b, ll, 1.0, p_blank, p_label)
        else:
            frame_durations = log_durations[b, t]
            for i in range(D):
                for u in range(n):
                    log_dur[i, u] = frame_durations[u, i]
            for i in range(D):
                for u in range(n):
                    softmax[i, u] = fast_exp64(log_dur[i, u])
            _frame_posteriors(durations, t, T_b, U_b, sigma, ll, alpha, lb, le, log_dur, beta, blank_post,
                              label_post)
            for u in range(n):
                p_blank[u] = 0.0
                p_label[u] = 0.0
            for i in range(D):
                for u in range(n):
                    p_blank[u] += blank_post[i, u]
                for u in range(n):
                    p_label[u] += label_post[i, u]
        for u in range(n):
            emit[u] = emit_weight * p_label[u]
        _write_frame_gradient(logits[b, t], grads[b, t], V, targets[b], U_b, blank, True, log_norm[b, t], lb, le,
                              p_blank, emit, clamp, scale, log_norm, no_entries, no_log_probs, no_posteriors)
        for u in range(n):
            g = grads[b, t, u]
            if label_head_only:
                for i in range(D):
                    store(g, V + i, 0.0)
            else:
                occupancy = p_blank[u] + p_label[u]
                for i in range(D):
                    posterior = blank_post[i, u] + label_post[i, u]
                    store(g, V + i, (softmax[i, u] * occupancy - posterior) * scale)


normalizers_serial = _serial_variant(normalizers)
alphas_and_costs_serial = _serial_variant(alphas_and_costs)
betas_serial = _serial_variant(betas)
gradients_serial = _serial_variant(gradients)


def forward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
            blank: int, durations: np.ndarray, sigma: float, fastemit_lambda: float, label_head_only: bool,
            costs: np.ndarray, residuals: Residuals) -> None:
    """Costs ``(B,)`` into ``costs`` and the forward residuals into ``residuals`` (caller-allocated)."""
    rows = cpu._rows(logits)
    with _section("tdt.normalizers", rows, 1):
        _launch(normalizers, normalizers_serial, rows, logits, targets, logit_lengths, target_lengths, blank,
                residuals.log_norm, residuals.log_blank, residuals.log_emit, residuals.log_durations)
    if label_head_only:
        cpu.lattice_forward(logit_lengths, target_lengths, fastemit_lambda, residuals, costs)
        return
    cells = cpu._cells(residuals.alphas)
    with _section("tdt.alphas_and_costs", 1, cells):
        _launch(alphas_and_costs, alphas_and_costs_serial, cells, residuals.log_blank, residuals.log_emit,
                residuals.log_durations, durations, logit_lengths, target_lengths, float(sigma),
                float(fastemit_lambda), residuals.alphas, residuals.log_likelihood, costs)


def backward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
             blank: int, durations: np.ndarray, sigma: float, fastemit_lambda: float, clamp: float,
             label_head_only: bool, grad_scale: np.ndarray, residuals: Residuals, grads: np.ndarray) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype), each utterance's gradient (label part)
    clamped and then multiplied by ``grad_scale: (B,) float64``. Allocates only the ``(B, T, U1)`` betas."""
    beta = np.empty_like(residuals.alphas)
    if label_head_only:
        cpu.lattice_backward(logit_lengths, target_lengths, residuals, beta)
    else:
        cells = cpu._cells(beta)
        with _section("tdt.betas", 1, cells):
            _launch(betas, betas_serial, cells, residuals.log_blank, residuals.log_emit, residuals.log_durations,
                    durations, logit_lengths, target_lengths, float(sigma), beta)
    rows = cpu._rows(logits)
    with _section("tdt.gradients", rows, 1):
        _launch(gradients, gradients_serial, rows, logits, targets, logit_lengths, target_lengths, blank, durations,
                float(sigma), float(fastemit_lambda), float(clamp), bool(label_head_only), grad_scale,
                residuals.log_norm, residuals.log_blank, residuals.log_emit, residuals.log_durations,
                residuals.alphas, beta, residuals.log_likelihood, grads)
