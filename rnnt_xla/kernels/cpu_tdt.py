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
   log-softmax;
2. :func:`alphas_and_costs` (parallel over the batch): forward variables over the duration arcs, costs;
3. :func:`betas` (parallel over the batch): backward variables;
4. :func:`gradients` (parallel over frames): one sweep of each row writes its label part
   (``cpu._write_row_gradient``, the RNNT writer) and its duration part.

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
from .cpu import _JIT, _launch, _log_prob, _normalise_frame, _section, _serial_variant, _write_row_gradient
from .fast_math import load, store
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
                         log_emit[b, t])
        for u in range(U_b + 1):
            row = logits[b, t, u]
            out = log_durations[b, t, u]
            m = np.float64(load(row, V))
            for i in range(1, D):
                x = np.float64(load(row, V + i))
                m = x if x > m else m
            s = 0.0
            for i in range(D):
                s += math.exp(np.float64(load(row, V + i)) - m)
            log_sum = math.log(s)
            for i in range(D):
                out[i] = _log_prob(load(row, V + i), m, log_sum)


@njit(**_JIT)
def _fold_max(m, x):
    """The larger of ``m`` and ``x``, NaN once either is (a NaN logit makes its utterance NaN)."""
    return x if (x > m or x != x) else m


@njit(**_JIT)
def _log_sum_exp_step(m, x):
    """``exp(x - m)``: a term of a log-sum-exp shifted by its maximum ``m``."""
    return math.exp(x - m)


@njit(parallel=True, **_JIT)
def alphas_and_costs(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma,
                     fastemit_lambda, alphas, log_likelihood, costs):
    """Pass 2: ``alphas[b, t, u] = logsumexp(incoming arcs) - sigma``, ``log P`` and
    ``cost = -(1 + fastemit_lambda) * log P``.

    An arc into ``(t, u)`` with duration ``d`` leaves ``(t - d, u)`` (blank, ``d > 0``) or ``(t - d, u - 1)``
    (label); its weight minus sigma is ``log_blank/log_emit + log_durations`` there. Each cell takes the
    maximum of its terms first, then one ``exp`` per term and one ``log``. ``t``-major order: the label
    arcs of duration 0 come from ``(t, u - 1)``, computed just before.
    """
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        alpha = alphas[b]
        blank = log_blank[b]
        emit = log_emit[b]
        dur = log_durations[b]
        for t in range(T_b):
            for u in range(U_b + 1):
                if t == 0 and u == 0:
                    alpha[0, 0] = 0.0
                    continue
                m = -np.inf
                for i in range(D):
                    d = durations[i]
                    s = t - d
                    if s < 0:
                        break
                    if d > 0:
                        m = _fold_max(m, alpha[s, u] + blank[s, u] + dur[s, u, i])
                    if u > 0:
                        m = _fold_max(m, alpha[s, u - 1] + emit[s, u - 1] + dur[s, u - 1, i])
                if m == -np.inf:  # unreachable (e.g. odd t with durations [0, 2])
                    alpha[t, u] = -np.inf
                    continue
                acc = 0.0
                for i in range(D):
                    d = durations[i]
                    s = t - d
                    if s < 0:
                        break
                    if d > 0:
                        acc += _log_sum_exp_step(m, alpha[s, u] + blank[s, u] + dur[s, u, i])
                    if u > 0:
                        acc += _log_sum_exp_step(m, alpha[s, u - 1] + emit[s, u - 1] + dur[s, u - 1, i])
                alpha[t, u] = m + math.log(acc) - sigma
        # the final state (T_b, U_b): the blanks that end exactly at T_b
        m = -np.inf
        for i in range(D):
            s = T_b - durations[i]
            if durations[i] > 0 and s >= 0:
                m = _fold_max(m, alpha[s, U_b] + blank[s, U_b] + dur[s, U_b, i])
        ll = -np.inf
        if m != -np.inf:
            acc = 0.0
            for i in range(D):
                s = T_b - durations[i]
                if durations[i] > 0 and s >= 0:
                    acc += _log_sum_exp_step(m, alpha[s, U_b] + blank[s, U_b] + dur[s, U_b, i])
            ll = m + math.log(acc) - sigma
        log_likelihood[b] = ll
        costs[b] = -(1.0 + fastemit_lambda) * ll


@njit(**_JIT)
def _next_beta(beta, t, u, d, T_b, U_b, label):
    """``beta`` of the state an arc of duration ``d`` from ``(t, u)`` reaches (0 for the final state,
    ``-inf`` where the arc is not allowed): a blank (``label`` False) needs ``d > 0``, a label ``u < U_b``;
    only a blank from ``u = U_b`` may end at ``T_b``."""
    n = t + d
    if label:
        return beta[n, u + 1] if (u < U_b and n < T_b) else -np.inf
    if d == 0 or n > T_b:
        return -np.inf
    if n < T_b:
        return beta[n, u]
    return 0.0 if u == U_b else -np.inf


@njit(parallel=True, **_JIT)
def betas(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma, out):
    """Pass 3: backward variables ``out: (B, T, U1)`` float64,
    ``beta[t, u] = logsumexp(outgoing arcs' weight + beta[next]) - sigma`` (``t`` and ``u`` descending)."""
    B = log_blank.shape[0]
    D = durations.shape[0]
    for b in prange(B):
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        beta = out[b]
        blank = log_blank[b]
        emit = log_emit[b]
        dur = log_durations[b]
        for t in range(T_b - 1, -1, -1):
            for u in range(U_b, -1, -1):
                m = -np.inf
                for i in range(D):
                    d = durations[i]
                    if t + d > T_b:
                        break
                    m = _fold_max(m, blank[t, u] + dur[t, u, i] + _next_beta(beta, t, u, d, T_b, U_b, False))
                    m = _fold_max(m, emit[t, u] + dur[t, u, i] + _next_beta(beta, t, u, d, T_b, U_b, True))
                if m == -np.inf:
                    beta[t, u] = -np.inf
                    continue
                acc = 0.0
                for i in range(D):
                    d = durations[i]
                    if t + d > T_b:
                        break
                    acc += _log_sum_exp_step(m, blank[t, u] + dur[t, u, i] + _next_beta(beta, t, u, d, T_b, U_b, False))
                    acc += _log_sum_exp_step(m, emit[t, u] + dur[t, u, i] + _next_beta(beta, t, u, d, T_b, U_b, True))
                beta[t, u] = m + math.log(acc) - sigma


@njit(parallel=True, **_JIT)
def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
              label_head_only, grad_scale, log_norm, log_blank, log_emit, log_durations, alphas, betas,
              log_likelihood, grads):
    """Pass 4: ``grads[b]``, the gradient of ``cost_b`` w.r.t. ``logits[b]`` times ``grad_scale[b]`` (the label
    part clipped to ``[-clamp, clamp]`` first).

    With ``P_blank(i)`` and ``P_label(i)`` the posteriors of the blank and label arcs of duration
    ``durations[i]`` out of ``(t, u)``, the label part is the RNNT row gradient with
    ``P_blank = sum_i P_blank(i)`` and ``P_label = sum_i P_label(i)`` (``cpu._write_row_gradient``); the
    duration part, through its log-softmax, is ``softmax_i * (P_blank + P_label) - (P_blank(i) + P_label(i))``.
    With ``label_head_only`` the posteriors are the RNNT ones (as ``cpu.gradients``), the duration part 0.
    """
    B, T, U1, W = logits.shape
    D = durations.shape[0]
    V = W - D
    emit_weight = 1.0 + fastemit_lambda
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
        posterior = np.empty(D)
        for u in range(U1):
            g = grads[b, t, u]
            if u > U_b:
                g[:] = 0
                continue
            alpha = alphas[b, t, u]
            lb = log_blank[b, t, u]
            le = log_emit[b, t, u]
            if label_head_only:
                if t < T_b - 1:
                    p_blank = math.exp(alpha + lb + beta[t + 1, u] - ll)
                elif u == U_b:  # the final blank, which ends the lattice
                    p_blank = math.exp(alpha + lb - ll)
                else:
                    p_blank = 0.0
                p_label = math.exp(alpha + le + beta[t, u + 1] - ll) if u < U_b else 0.0
            else:
                base = alpha - sigma - ll
                p_blank = 0.0
                p_label = 0.0
                for i in range(D):
                    d = durations[i]
                    w = base + log_durations[b, t, u, i]
                    next_blank = _next_beta(beta, t, u, d, T_b, U_b, False)
                    next_label = _next_beta(beta, t, u, d, T_b, U_b, True)
                    # only the arcs that exist: a scalar exp costs about as much as 20 entries of the row
                    q_blank = math.exp(w + lb + next_blank) if next_blank != -np.inf else 0.0
                    q_label = math.exp(w + le + next_label) if next_label != -np.inf else 0.0
                    p_blank += q_blank
                    p_label += q_label
                    posterior[i] = q_blank + q_label
            label = targets[b, u] if u < U_b else blank
            row = logits[b, t, u]
            _write_row_gradient(row[:V], g[:V], blank, label, u < U_b, True, log_norm[b, t, u], lb, le, p_blank,
                                emit_weight * p_label, clamp, scale, log_norm)
            if label_head_only:
                for i in range(D):
                    store(g, V + i, 0.0)
            else:
                occupancy = p_blank + p_label
                for i in range(D):
                    softmax = math.exp(log_durations[b, t, u, i])
                    store(g, V + i, (softmax * occupancy - posterior[i]) * scale)


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
