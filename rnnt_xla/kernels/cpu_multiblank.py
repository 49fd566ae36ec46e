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
log-probabilities, the big blanks' as its extra entries), :func:`alphas_and_costs` and :func:`betas` (TDT's
anti-diagonal lattice passes, ``cpu_tdt.skewed_alphas``/``skewed_betas``, over the arcs of
:func:`arc_durations`), :func:`gradients` (``cpu._write_frame_gradient``, the RNNT frame writer, with the big
blanks as its extra blank-like arcs). Entry points :func:`forward`
and :func:`backward`; ``big_blank_durations: (K,) int64``, each ``>= 1``; ``blank`` normalised, ``blank >= K``.
Padded frames and label positions get exactly zero gradient; 16-bit logits as bits views as in :mod:`.cpu`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import cpu
from .cpu import (_JIT, _beta_at, _cells, _launch, _normalise_frame, _rows, _section, _serial_variant,
                  _write_frame_gradient, njit, prange)
from .cpu_tdt import skewed_alphas, skewed_betas

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


@njit(**_JIT)
def _big_blank_entries(blank, K):
    """The vocabulary entries of the ``K`` big blanks, ``blank - 1 - i``: ``(K,) int64``."""
    entries = np.empty(K, np.int64)
    for i in range(K):
        entries[i] = blank - 1 - i
    return entries


@njit(parallel=True, **_JIT)
def log_normalizers(logits, targets, logit_lengths, target_lengths, blank, log_norm, log_blank, log_emit, log_big):
    """Pass 1: each used row as ``cpu.log_normalizers`` (``cpu._normalise_frame``: shift, blank and label
    log-probabilities) and ``log_big[b, t, u, i]``, the log-probability of big blank ``i`` (entry
    ``blank - 1 - i``), float64, from the same normaliser. ``log_big: (B, T, U1, K)``."""
    B, T, U1, V = logits.shape
    entries = _big_blank_entries(blank, log_big.shape[3])
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        if t >= logit_lengths[b]:
            continue
        _normalise_frame(logits[b, t], V, targets[b], target_lengths[b], blank, True, log_norm[b, t],
                         log_blank[b, t], log_emit[b, t], entries, log_big[b, t])


def arc_durations(big_blank_durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lattice's arcs as :func:`rnnt_xla.kernels.cpu_tdt.skewed_alphas` takes them: ``durations``
    ``[0, 1, big blanks in ascending order]`` (the label arc, the standard blank, the big blanks) and ``order:
    (K,) int64``, the big blank of each of the last ``K`` arcs (an index into ``big_blank_durations``)."""
    order = np.argsort(big_blank_durations, kind="stable").astype(np.int64)
    durations = np.concatenate([np.array([0, 1], np.int64), big_blank_durations[order]]).astype(np.int64)
    return durations, order


@njit(**_JIT)
def _skewed_weights(log_blank, log_emit, log_big, order, T_b, U_b, blank_weights, label_weights):
    """The arcs' weights of one utterance in the anti-diagonal layout of ``cpu_tdt._skewed_weights``, for the
    arcs of :func:`arc_durations`: ``blank_weights[1, t + u, u] = log_blank[t, u]``, ``blank_weights[2 + j, t +
    u, u] = log_big[t, u, order[j]]``, ``label_weights[0, t + u, u] = log_emit[t, u]`` (``blank_weights[0]``, a
    blank of duration 0, is not an arc). Outputs ``(K + 2, >= T_b + U_b, U_b + 1)`` and ``(1, ..., ...)``."""
    K = order.shape[0]
    for t in range(T_b):
        for u in range(U_b + 1):
            blank_weights[1, t + u, u] = log_blank[t, u]
            label_weights[0, t + u, u] = log_emit[t, u]
            for j in range(K):
                blank_weights[2 + j, t + u, u] = log_big[t, u, order[j]]


@njit(parallel=True, **_JIT)
def alphas_and_costs(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, order, sigma,
                     fastemit_lambda, alphas, log_likelihood, costs):
    """Pass 2: forward variables, ``log P(y|x)`` and ``cost = -(1 + fastemit_lambda) * log P``.

    ``alphas[t, u] = logsumexp(alphas[t-1, u] + blank[t-1, u], alphas[t, u-1] + emit[t, u-1],
    alphas[t-d_i, u] + big[t-d_i, u, i]) - sigma``: TDT's lattice pass (``cpu_tdt.skewed_alphas``, by
    anti-diagonals in vectorised loops) with the arcs of :func:`arc_durations` (``durations``, ``order``),
    labels only of duration 0. The final state sums the standard blank of ``(T_b - 1, U_b)`` and each big blank
    of ``(T_b - d_i, U_b)``.
    """
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        wb = np.empty((D, T_b + U_b, U_b + 1))
        we = np.empty((1, T_b + U_b, U_b + 1))
        _skewed_weights(log_blank[b], log_emit[b], log_big[b], order, T_b, U_b, wb, we)
        ll = skewed_alphas(wb, we, durations, 1, T_b, U_b, sigma, alphas[b])
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(parallel=True, **_JIT)
def betas(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, order, sigma, out):
    """Pass 3: backward variables ``out: (B, T, U1)`` float64 (``cpu_tdt.skewed_betas`` over the arcs of
    :func:`arc_durations`); arcs into the frame ``T_b`` end the lattice if ``u = U_b``."""
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        wb = np.empty((D, T_b + U_b, U_b + 1))
        we = np.empty((1, T_b + U_b, U_b + 1))
        _skewed_weights(log_blank[b], log_emit[b], log_big[b], order, T_b, U_b, wb, we)
        skewed_betas(wb, we, durations, 1, T_b, U_b, sigma, out[b])


@njit(parallel=True, **_JIT)
def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
              grad_scale, log_norm, log_blank, log_emit, log_big, alphas, betas, log_likelihood, grads):
    """Pass 4: ``grads[b] = clip(d cost_b / d logits[b], -clamp, clamp) * grad_scale[b]``.

    With ``P_blank``, ``P_big_i`` and ``P_label`` the posteriors of the arcs out of ``(t, u)``, every entry
    gets ``softmax_v * (P_blank + sum_i P_big_i + (1 + lambda) * P_label)`` and the arcs' entries minus their
    posterior (``(1 + lambda) * P_label`` at the label); sigma shifts every arc's log-probability, not the
    softmax (NeMo's ``compute_multiblank_grad_kernel``). The rows are written by the RNNT frame writer
    (``cpu._write_frame_gradient``) with the big blanks as its extra blank-like arcs.
    """
    B, T, U1, V = logits.shape
    K = durations.shape[0]
    emit_weight = 1.0 + fastemit_lambda
    entries = _big_blank_entries(blank, K)
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if t >= T_b:
            grads[b, t] = 0
            continue
        ll = log_likelihood[b]
        beta = betas[b]
        n = U_b + 1
        weights = np.empty((2 + K, n))  # per row: P_blank, (1 + lambda) P_label, P_big_i
        p_blank = weights[0]
        emit = weights[1]
        p_big = weights[2:]
        for u in range(n):
            alpha = alphas[b, t, u] - sigma - ll  # every arc's posterior: exp(alpha + log_prob - sigma + beta - ll)
            p_blank[u] = math.exp(alpha + log_blank[b, t, u] + _beta_at(beta, t + 1, u, T_b, U_b))
            for i in range(K):
                s = t + durations[i]
                p_big[i, u] = (math.exp(alpha + log_big[b, t, u, i] + _beta_at(beta, s, u, T_b, U_b)) if s <= T_b
                               else 0.0)
            emit[u] = emit_weight * math.exp(alpha + log_emit[b, t, u] + beta[t, u + 1]) if u < U_b else 0.0
        _write_frame_gradient(logits[b, t], grads[b, t], V, targets[b], U_b, blank, True, log_norm[b, t],
                              log_blank[b, t], log_emit[b, t], p_blank, emit, clamp, grad_scale[b], log_norm, entries,
                              log_big[b, t], p_big)


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
    arcs, order = arc_durations(durations)
    residuals = Residuals(*residuals)
    rows = _rows(logits)
    with _section("multiblank/log_normalizers", rows, 1):
        _launch(log_normalizers, log_normalizers_serial, rows, logits, targets, logit_lengths, target_lengths, blank,
                residuals.log_norm, residuals.log_blank, residuals.log_emit, residuals.log_big_blanks)
    cells = _cells(residuals.alphas)
    with _section("multiblank/alphas_and_costs", 1, cells):
        _launch(alphas_and_costs, alphas_and_costs_serial, cells, residuals.log_blank, residuals.log_emit,
                residuals.log_big_blanks, logit_lengths, target_lengths, arcs, order, float(sigma),
                float(fastemit_lambda), residuals.alphas, residuals.log_likelihood, costs)


def backward(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
             blank: int, big_blank_durations: np.ndarray, sigma: float, fastemit_lambda: float, clamp: float,
             grad_scale: np.ndarray, residuals: Residuals, grads: np.ndarray) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype), clamped per utterance then scaled
    by ``grad_scale: (B,) float64``. Allocates only the ``(B, T, U1)`` betas."""
    durations = np.ascontiguousarray(big_blank_durations, dtype=np.int64)
    arcs, order = arc_durations(durations)
    residuals = Residuals(*residuals)
    beta = np.empty_like(residuals.alphas)
    cells = _cells(beta)
    with _section("multiblank/betas", 1, cells):
        _launch(betas, betas_serial, cells, residuals.log_blank, residuals.log_emit, residuals.log_big_blanks,
                logit_lengths, target_lengths, arcs, order, float(sigma), beta)
    rows = _rows(logits)
    with _section("multiblank/gradients", rows, 1):
        _launch(gradients, gradients_serial, rows, logits, targets, logit_lengths, target_lengths, blank, durations,
                float(sigma), float(fastemit_lambda), float(clamp), grad_scale, residuals.log_norm,
                residuals.log_blank, residuals.log_emit, residuals.log_big_blanks, residuals.alphas, beta,
                residuals.log_likelihood, grads)
