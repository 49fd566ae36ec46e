"""Multi-blank RNNT loss (Xu et al., 2022, "Multi-blank transducers for speech recognition") on the CPU:
Numba kernels over raw numpy arrays, with NeMo's semantics (``MultiblankRNNTLossPytorch`` and its
``compute_multiblank_*`` CUDA kernels).

Vocabulary layout (NeMo's): ``logits: (B, T, U1, V)`` where ``blank`` is the standard blank (NeMo puts it
last, ``V - 1``) and big blank ``i``, which skips ``big_blank_durations[i]`` frames, is entry
``blank - 1 - i``: the big blanks sit just before the standard blank, in reverse order of their durations
list (``[2, 4, 8]`` with ``V = 12``: entry 11 the blank, 10 the 2-frame, 9 the 4-frame, 8 the 8-frame blank).

Lattice of utterance ``b`` (``T_b`` frames, ``U_b`` labels): from ``(t, u)`` the blank leads to ``(t + 1, u)``,
big blank ``i`` to ``(t + d_i, u)``, label ``y_{u+1}`` to ``(t, u + 1)``; the lattice ends after the last frame
with every label emitted, so the standard blank of ``(T_b - 1, U_b)`` and each big blank of
``(T_b - d_i, U_b)`` end it (a big blank of duration 1 too, as in ``MultiblankRNNTLossPytorch``; NeMo's CUDA
betas leave that one out). Every arc's log-probability is ``log_softmax(logits) - sigma`` (logit
under-normalisation); the costs are ``-(1 + fastemit_lambda) * log P`` and the gradient w.r.t. the logits
is clamped per utterance then scaled by ``grad_scale``, as in :mod:`.cpu` (and NeMo).

Passes: :func:`log_normalizers` (``cpu._normalise_frame``, the RNNT pass's row shifts, blank and label
log-probabilities, plus the big blanks'), :func:`alphas_and_costs`, :func:`betas`, :func:`gradients`
(``cpu._write_frame_gradient``, the RNNT row writer, then the blank-like entries). Entry points :func:`forward`
and :func:`backward`; ``big_blank_durations: (K,) int64``, each ``>= 1``; ``blank`` normalised, ``blank >= K``.
Padded frames and label positions get exactly zero gradient; 16-bit logits as bits views as in :mod:`.cpu`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import cpu
from .cpu import (_JIT, _beta_at, _cells, _launch, _log_prob, _normalise_frame, _row_log_sum, _rows, _section,
                  _serial_variant, _write_frame_gradient, njit, prange)
from .fast_math import cast_like, load, store

__all__ = [
    "Residuals",
    "residual_shapes",
    "allocate_residuals",
    "forward",
    "backward",
    "log_normalizers",
    "alphas_and_costs",
    "betas",
    "gradients",
]


class Residuals(NamedTuple):
    """What the forward pass leaves for the backward pass: :class:`rnnt_xla.kernels.cpu.Residuals`' five
    arrays (same shapes, dtypes and meaning; log-probabilities without ``sigma``) and
    ``log_big_blanks: (B, T, U1, K)`` float64, the log-probability of big blank ``i`` at ``(b, t, u)``."""

    log_norm: np.ndarray
    log_blank: np.ndarray
    log_emit: np.ndarray
    alphas: np.ndarray
    log_likelihood: np.ndarray
    log_big_blanks: np.ndarray


def residual_shapes(batch: int, frames: int, positions: int, num_big_blanks: int,
                    dtype: np.dtype) -> Residuals:
    """``(shape, dtype)`` of each residual array for logits of ``dtype``."""
    base = cpu.residual_shapes(batch, frames, positions, dtype)
    return Residuals(*base, ((batch, frames, positions, num_big_blanks), np.dtype(np.float64)))


def allocate_residuals(batch: int, frames: int, positions: int, num_big_blanks: int,
                       dtype: np.dtype) -> Residuals:
    """Uninitialised numpy residual arrays."""
    shapes = residual_shapes(batch, frames, positions, num_big_blanks, dtype)
    return Residuals(*(np.empty(shape, dt) for shape, dt in shapes))


@njit(parallel=True, **_JIT)
def log_normalizers(logits, targets, logit_lengths, target_lengths, blank, log_norm, log_blank, log_emit, log_big):
    """Pass 1: each used row as ``cpu.log_normalizers`` (``cpu._normalise_frame``: shift, blank and label
    log-probabilities), then ``log_big[b, t, u, i]``, the log-probability of big blank ``i`` (entry
    ``blank - 1 - i``), float64, from the same normaliser while the frame is in cache: a row's ``log_sum``
    is ``(x_blank - shift) - log_blank`` (see ``cpu._PIVOT_LIMIT``; rows with a masked or hopeless blank sum
    their row again). ``log_big: (B, T, U1, K)``."""
    B, T, U1, V = logits.shape
    K = log_big.shape[3]
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        if t >= logit_lengths[b]:
            continue
        U_b = target_lengths[b]
        _normalise_frame(logits[b, t], V, targets[b], U_b, blank, True, log_norm[b, t], log_blank[b, t],
                         log_emit[b, t])
        for u in range(U_b + 1):
            row = logits[b, t, u]
            shift, log_sum = _row_log_sum(row, blank, log_norm[b, t, u], log_blank[b, t, u], log_norm)
            for i in range(K):
                log_big[b, t, u, i] = _log_prob(load(row, blank - 1 - i), shift, log_sum)


@njit(parallel=True, **_JIT)
def alphas_and_costs(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, sigma,
                     fastemit_lambda, alphas, log_likelihood, costs):
    """Pass 2: forward variables, ``log P(y|x)`` and ``cost = -(1 + fastemit_lambda) * log P``.

    ``alphas[t, u] = logsumexp(alphas[t-1, u] + blank[t-1, u], alphas[t, u-1] + emit[t, u-1],
    alphas[t-d_i, u] + big[t-d_i, u, i]) - sigma``, walked by anti-diagonals as in
    :func:`rnnt_xla.kernels.cpu.alphas_and_costs` (every source lies on an earlier diagonal). Each cell's
    log-sum-exp is shifted by its largest term: independent exps and one log, where pairwise log-adds
    would chain ``K + 1`` exp/log1p pairs (twice as slow with three big blanks here).
    """
    B = log_blank.shape[0]
    K = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        alpha = alphas[b]
        blank = log_blank[b]
        emit = log_emit[b]
        big = log_big[b]
        alpha[0, 0] = 0.0
        for d in range(1, T_b + U_b):
            for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                t = d - u
                from_blank = alpha[t - 1, u] + blank[t - 1, u] if t > 0 else -np.inf
                from_label = alpha[t, u - 1] + emit[t, u - 1] if u > 0 else -np.inf
                m = max(from_blank, from_label)
                for i in range(K):
                    s = t - durations[i]
                    if s >= 0:
                        m = max(m, alpha[s, u] + big[s, u, i])
                shift = m if abs(m) < np.inf else 0.0  # -inf: no arc in; NaN and inf propagate through exp
                total = math.exp(from_blank - shift) + math.exp(from_label - shift)
                for i in range(K):
                    s = t - durations[i]
                    if s >= 0:
                        total += math.exp(alpha[s, u] + big[s, u, i] - shift)
                alpha[t, u] = shift + math.log(total) - sigma  # each arc in carries one -sigma
        ll = alpha[T_b - 1, U_b] + blank[T_b - 1, U_b]
        m = ll
        for i in range(K):
            s = T_b - durations[i]
            if s >= 0:
                m = max(m, alpha[s, U_b] + big[s, U_b, i])
        shift = m if abs(m) < np.inf else 0.0
        total = math.exp(ll - shift)
        for i in range(K):
            s = T_b - durations[i]
            if s >= 0:
                total += math.exp(alpha[s, U_b] + big[s, U_b, i] - shift)
        ll = shift + math.log(total) - sigma
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(parallel=True, **_JIT)
def betas(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, sigma, out):
    """Pass 3: backward variables ``out: (B, T, U1)`` float64, anti-diagonal by anti-diagonal from the end
    (every successor lies on a later diagonal); arcs into the frame ``T_b`` end the lattice if ``u = U_b``."""
    B = log_blank.shape[0]
    K = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        beta = out[b]
        blank = log_blank[b]
        emit = log_emit[b]
        big = log_big[b]
        for d in range(T_b + U_b - 1, -1, -1):
            for u in range(max(0, d - T_b + 1), min(d, U_b) + 1):
                t = d - u
                to_blank = _beta_at(beta, t + 1, u, T_b, U_b) + blank[t, u]
                to_label = beta[t, u + 1] + emit[t, u] if u < U_b else -np.inf
                m = max(to_blank, to_label)
                for i in range(K):
                    s = t + durations[i]
                    if s <= T_b:
                        m = max(m, _beta_at(beta, s, u, T_b, U_b) + big[t, u, i])
                shift = m if abs(m) < np.inf else 0.0
                total = math.exp(to_blank - shift) + math.exp(to_label - shift)
                for i in range(K):
                    s = t + durations[i]
                    if s <= T_b:
                        total += math.exp(_beta_at(beta, s, u, T_b, U_b) + big[t, u, i] - shift)
                beta[t, u] = shift + math.log(total) - sigma  # each arc out carries one -sigma


@njit(parallel=True, **_JIT)
def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
              grad_scale, log_norm, log_blank, log_emit, log_big, alphas, betas, log_likelihood, grads):
    """Pass 4: ``grads[b] = clip(d cost_b / d logits[b], -clamp, clamp) * grad_scale[b]``.

    With ``P_blank``, ``P_big_i`` and ``P_label`` the posteriors of the arcs out of ``(t, u)``, every entry
    gets ``softmax_v * (P_blank + sum_i P_big_i + (1 + lambda) * P_label)`` and the arcs' entries minus their
    posterior (``(1 + lambda) * P_label`` at the label); sigma shifts every arc's log-probability, not the
    softmax (NeMo's ``compute_multiblank_grad_kernel``).
    """
    B, T, U1, V = logits.shape
    K = durations.shape[0]
    emit_weight = 1.0 + fastemit_lambda
    limit = clamp if clamp > 0 else np.inf
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if t >= T_b:
            grads[b, t] = 0
            continue
        scale = grad_scale[b]
        ll = log_likelihood[b]
        beta = betas[b]
        n = U_b + 1
        weights = np.empty((3 + K, n))  # per row: P_blank, all blank-like arcs' sum, (1 + lambda) P_label, P_big_i
        p_blank = weights[0]
        blanks = weights[1]
        emit = weights[2]
        p_big = weights[3:]
        for u in range(n):
            alpha = alphas[b, t, u] - sigma - ll  # every arc's posterior: exp(alpha + log_prob - sigma + beta - ll)
            p_blank[u] = math.exp(alpha + log_blank[b, t, u] + _beta_at(beta, t + 1, u, T_b, U_b))
            blanks[u] = p_blank[u]
            for i in range(K):
                s = t + durations[i]
                p_big[i, u] = math.exp(alpha + log_big[b, t, u, i] + _beta_at(beta, s, u, T_b, U_b)) if s <= T_b else 0.0
                blanks[u] += p_big[i, u]
            emit[u] = emit_weight * math.exp(alpha + log_emit[b, t, u] + beta[t, u + 1]) if u < U_b else 0.0
        # the shared frame writer with every blank-like arc's weight at the blank: right for the softmax part
        # of every entry and for the label; the blank and the big blanks are then rewritten
        _write_frame_gradient(logits[b, t], grads[b, t], V, targets[b], U_b, blank, True, log_norm[b, t],
                              log_blank[b, t], log_emit[b, t], blanks, emit, clamp, scale, log_norm)
        for u in range(n):
            g = grads[b, t, u]
            label = targets[b, u] if u < U_b else blank
            occupancy = blanks[u] + emit[u]
            # the arcs' own entries, from the lattice's log-probabilities (exp in the compute dtype, as the
            # writer); a label may coincide with the blank or a big blank
            g_blank = math.exp(cast_like(log_blank[b, t, u], log_norm)) * occupancy - p_blank[u]
            if u < U_b and label == blank:
                g_blank -= emit[u]
            store(g, blank, min(max(g_blank, -limit), limit) * scale)
            for i in range(K):
                g_big = math.exp(cast_like(log_big[b, t, u, i], log_norm)) * occupancy - p_big[i, u]
                if u < U_b and label == blank - 1 - i:
                    g_big -= emit[u]
                store(g, blank - 1 - i, min(max(g_big, -limit), limit) * scale)


log_normalizers_serial = _serial_variant(log_normalizers)
alphas_and_costs_serial = _serial_variant(alphas_and_costs)
betas_serial = _serial_variant(betas)
gradients_serial = _serial_variant(gradients)


def forward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
            blank: int, big_blank_durations: np.ndarray, sigma: float, fastemit_lambda: float,
            costs: np.ndarray, residuals: Residuals) -> None:
    """Costs ``(B,)`` (compute dtype) into ``costs`` and the forward residuals into ``residuals``.

    ``logits: (B, T, U1, V)`` (kernel array, see ``cpu.as_kernel_array``), ``targets: (B, W)``, lengths
    ``(B,)`` int64, ``big_blank_durations: (K,)`` int64, ``blank`` in ``[K, V)``; ``residuals`` a
    :class:`Residuals` or any sequence of its six arrays in that order.
    """
    durations = np.ascontiguousarray(big_blank_durations, dtype=np.int64)
    residuals = Residuals(*residuals)
    rows = _rows(logits)
    with _section("multiblank/log_normalizers", rows, 1):
        _launch(log_normalizers, log_normalizers_serial, rows, logits, targets, logit_lengths, target_lengths, blank,
                residuals.log_norm, residuals.log_blank, residuals.log_emit, residuals.log_big_blanks)
    cells = _cells(residuals.alphas)
    with _section("multiblank/alphas_and_costs", 1, cells):
        _launch(alphas_and_costs, alphas_and_costs_serial, cells, residuals.log_blank, residuals.log_emit,
                residuals.log_big_blanks, logit_lengths, target_lengths, durations, float(sigma),
                float(fastemit_lambda), residuals.alphas, residuals.log_likelihood, costs)


def backward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
             blank: int, big_blank_durations: np.ndarray, sigma: float, fastemit_lambda: float, clamp: float,
             grad_scale: np.ndarray, residuals: Residuals, grads: np.ndarray) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype), clamped per utterance then scaled
    by ``grad_scale: (B,) float64``. Allocates only the ``(B, T, U1)`` betas."""
    durations = np.ascontiguousarray(big_blank_durations, dtype=np.int64)
    residuals = Residuals(*residuals)
    beta = np.empty_like(residuals.alphas)
    cells = _cells(beta)
    with _section("multiblank/betas", 1, cells):
        _launch(betas, betas_serial, cells, residuals.log_blank, residuals.log_emit, residuals.log_big_blanks,
                logit_lengths, target_lengths, durations, float(sigma), beta)
    rows = _rows(logits)
    with _section("multiblank/gradients", rows, 1):
        _launch(gradients, gradients_serial, rows, logits, targets, logit_lengths, target_lengths, blank, durations,
                float(sigma), float(fastemit_lambda), float(clamp), grad_scale, residuals.log_norm,
                residuals.log_blank, residuals.log_emit, residuals.log_big_blanks, residuals.alphas, beta,
                residuals.log_likelihood, grads)
