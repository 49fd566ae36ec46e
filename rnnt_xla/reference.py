"""Explicit-loop float64 reference of the RNN-Transducer loss (Graves, 2012).

Slow on purpose: every quantity is computed with plain Python loops over numpy float64 arrays, in the
notation of the paper, so that the fast kernels can be checked against it. Semantics are those of the
library (FastEmit, clamp, reductions, blank as a label, padding), documented in :func:`rnnt_loss_reference`.

Notation for one utterance with ``T`` frames and ``U`` target labels ``y_1..y_U``:

- ``log_probs[t, u, :]`` is the log-distribution over the vocabulary after frame ``t`` with ``u`` labels
  emitted (``u = 0..U``);
- ``alpha[t, u]`` is the log-probability of having emitted ``y_1..y_u`` when at frame ``t``;
- ``beta[t, u]`` is the log-probability of emitting ``y_{u+1}..y_U`` from frame ``t`` to the end;
- ``log P(y|x) = alpha[T-1, U] + log_probs[T-1, U, blank] = beta[0, 0]``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "log_softmax",
    "forward_variables",
    "backward_variables",
    "sequence_gradient",
    "rnnt_loss_reference",
    "reduce_costs_and_gradient",
    "tdt_forward_variables",
    "tdt_backward_variables",
    "tdt_sequence_gradient",
    "tdt_loss_reference",
]

REDUCTIONS = ("none", "sum", "mean", "mean_by_target_length", "mean_volume")


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64. ``logits: (..., V)`` -> ``(..., V) float64``."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def forward_variables(log_probs: np.ndarray, labels: np.ndarray, blank: int) -> tuple[np.ndarray, float]:
    """Alphas of one utterance.

    Args:
        log_probs: ``(T, U+1, V) float64`` log-probabilities of this utterance (unpadded).
        labels: ``(U,)`` integer labels.
        blank: blank index in ``[0, V)``.

    Returns:
        ``alpha: (T, U+1) float64`` and ``log P(y|x)``.
    """
    T, U1, _ = log_probs.shape
    alpha = np.full((T, U1), -math.inf)
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[t, u] = 0.0
                continue
            from_blank = alpha[t - 1, u] + log_probs[t - 1, u, blank] if t > 0 else -math.inf
            from_label = alpha[t, u - 1] + log_probs[t, u - 1, labels[u - 1]] if u > 0 else -math.inf
            alpha[t, u] = _logaddexp(from_blank, from_label)
    return alpha, alpha[T - 1, U1 - 1] + log_probs[T - 1, U1 - 1, blank]


def backward_variables(log_probs: np.ndarray, labels: np.ndarray, blank: int) -> tuple[np.ndarray, float]:
    """Betas of one utterance; same arguments as :func:`forward_variables`.

    Returns:
        ``beta: (T, U+1) float64`` and ``log P(y|x) = beta[0, 0]``.
    """
    T, U1, _ = log_probs.shape
    beta = np.full((T, U1), -math.inf)
    for t in reversed(range(T)):
        for u in reversed(range(U1)):
            if t == T - 1 and u == U1 - 1:
                beta[t, u] = log_probs[t, u, blank]
                continue
            to_blank = beta[t + 1, u] + log_probs[t, u, blank] if t < T - 1 else -math.inf
            to_label = beta[t, u + 1] + log_probs[t, u, labels[u]] if u < U1 - 1 else -math.inf
            beta[t, u] = _logaddexp(to_blank, to_label)
    return beta, beta[0, 0]


def sequence_gradient(
    log_probs: np.ndarray, labels: np.ndarray, blank: int, fastemit_lambda: float = 0.0
) -> tuple[float, np.ndarray]:
    """Cost and gradient w.r.t. the log-probabilities of one utterance.

    The gradient of ``-log P`` w.r.t. ``log_probs[t, u, k]`` is minus the posterior probability of the
    transition that uses that entry: ``alpha[t, u] + log_probs[t, u, k] + beta[next] - log P``, where next
    is ``(t+1, u)`` for the blank and ``(t, u+1)`` for the label ``y_{u+1}``; the final blank at
    ``(T-1, U)`` ends the lattice (its "next" beta is 0). FastEmit scales the label transitions by
    ``1 + fastemit_lambda`` and the cost by the same factor.

    Returns:
        ``cost = -(1 + fastemit_lambda) * log P`` and ``grad: (T, U+1, V) float64``.
    """
    T, U1, _ = log_probs.shape
    alpha, log_likelihood = forward_variables(log_probs, labels, blank)
    beta, _ = backward_variables(log_probs, labels, blank)
    grad = np.zeros_like(log_probs)
    for t in range(T):
        for u in range(U1):
            next_beta = beta[t + 1, u] if t < T - 1 else (0.0 if u == U1 - 1 else -math.inf)
            grad[t, u, blank] -= math.exp(alpha[t, u] + log_probs[t, u, blank] + next_beta - log_likelihood)
            if u < U1 - 1:
                k = labels[u]
                posterior = math.exp(alpha[t, u] + log_probs[t, u, k] + beta[t, u + 1] - log_likelihood)
                grad[t, u, k] -= (1.0 + fastemit_lambda) * posterior
    return -(1.0 + fastemit_lambda) * log_likelihood, grad


def rnnt_loss_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    logit_lengths: np.ndarray,
    target_lengths: np.ndarray,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """RNNT loss and its gradient, in float64, with the library's semantics.

    Args:
        logits: ``(B, T, U+1, V)`` unnormalised scores (or log-probabilities if ``fused_log_softmax`` is
            False, used as given).
        targets: ``(B, W)`` integer labels, ``W >= max(target_lengths)``; columns past a target length
            are ignored. A label may equal the blank (then both transitions use that entry).
        logit_lengths: ``(B,)`` frames per utterance, ``1 <= T_b <= T``.
        target_lengths: ``(B,)`` labels per utterance, ``0 <= U_b <= min(U, W)``.
        blank: blank index; negative values count from the end (``-1`` is ``V-1``).
        clamp: if ``> 0``, each utterance's gradient w.r.t. ``logits`` is clipped to ``[-clamp, clamp]``
            before the reduction is applied.
        reduction: ``"none"`` (costs ``(B,)``), ``"sum"``, ``"mean"`` (sum / B), or
            ``"mean_by_target_length"`` (mean over the batch of ``cost_b / max(U_b, 1)``), or ``"mean_volume"``
            (``sum_b cost_b / max(sum_b U_b, 1)``, NeMo's).
        fused_log_softmax: apply log-softmax to ``logits`` (True) or take them as log-probabilities.
        fastemit_lambda: FastEmit regularisation weight (>= 0).

    Returns:
        ``(loss, grad)``: the reduced loss (``(B,)`` for ``"none"``, else a 0-d array) and the gradient of
        ``loss.sum()`` w.r.t. ``logits``, ``(B, T, U+1, V) float64``; zero outside each utterance's
        ``T_b`` frames and ``U_b + 1`` label positions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x = np.asarray(logits, dtype=np.float64)
    B, _, _, V = x.shape
    blank = blank % V
    costs = np.zeros(B)
    grad = np.zeros_like(x)
    for b in range(B):
        T_b, U_b = int(logit_lengths[b]), int(target_lengths[b])
        labels = np.asarray(targets[b, :U_b], dtype=np.int64)
        scores = x[b, :T_b, : U_b + 1]
        log_probs = log_softmax(scores) if fused_log_softmax else scores
        costs[b], grad_log_probs = sequence_gradient(log_probs, labels, blank, fastemit_lambda)
        if fused_log_softmax:
            # Chain rule through log-softmax: dL/dz_k = dL/dlp_k - softmax_k * sum_j dL/dlp_j.
            softmax = np.exp(log_probs)
            g = grad_log_probs - softmax * grad_log_probs.sum(axis=-1, keepdims=True)
        else:
            g = grad_log_probs
        if clamp > 0:
            g = np.clip(g, -clamp, clamp)
        grad[b, :T_b, : U_b + 1] = g

    return reduce_costs_and_gradient(costs, grad, target_lengths, reduction)


def reduce_costs_and_gradient(
    costs: np.ndarray, grad: np.ndarray, target_lengths: np.ndarray, reduction: str
) -> tuple[np.ndarray, np.ndarray]:
    """The library's reductions of per-utterance ``costs: (B,)`` and their gradients ``grad: (B, ...)``.

    Returns the reduced loss (``(B,)`` for ``"none"``, else a 0-d array) and the gradient of its sum.
    """
    B = costs.shape[0]
    per_utterance = (slice(None),) + (None,) * (grad.ndim - 1)
    if reduction == "none":
        return costs, grad
    if reduction == "sum":
        return np.asarray(costs.sum()), grad
    if reduction == "mean":
        return np.asarray(costs.sum() / B), grad / B
    if reduction == "mean_volume":
        volume = max(float(np.sum(target_lengths)), 1.0)
        return np.asarray(costs.sum() / volume), grad / volume
    per_target = 1.0 / np.maximum(np.asarray(target_lengths, dtype=np.float64), 1.0)
    return np.asarray((costs * per_target).sum() / B), grad * (per_target / B)[per_utterance]


# ---------------------------------------------------------------------------------------------------------------
# Token-and-Duration Transducer (TDT; Xu et al., 2023, "Efficient Sequence Transduction by Jointly Predicting
# Tokens and Durations"), with NeMo's semantics (TDTLossPytorch and the compute_tdt_* CUDA kernels).
#
# The joint network scores, at each (t, u), the label distribution ``log_probs[t, u, :]`` (V entries, the blank
# among them; log-softmax minus ``sigma``, the paper's logit under-normalisation) and a distribution over the D
# durations ``duration_log_probs[t, u, :]``. Every arc out of (t, u) emits one token and picks one duration d:
#
# - a blank with duration d > 0 goes to (t + d, u) (a blank must advance; duration 0 is not a blank arc);
# - the label y_{u+1} with duration d >= 0 goes to (t + d, u + 1), only while t + d < T (no label arc jumps
#   past the last frame);
#
# with weight ``log_probs[t, u, token] - sigma + duration_log_probs[t, u, i]``. The lattice gets one more row,
# t = T: the final state (T, U) is reached by the blanks of every positive duration that end exactly at T, and
# the states (T, u < U) are dead ends. ``log P(y|x) = alpha[T, U] = beta[0, 0]``.
# ---------------------------------------------------------------------------------------------------------------


def _logsumexp(terms: list[float]) -> float:
    """``log(sum(exp(terms)))`` in float64, ``-inf`` for no terms."""
    total = -math.inf
    for term in terms:
        total = _logaddexp(total, term)
    return total


def tdt_forward_variables(
    log_probs: np.ndarray,
    duration_log_probs: np.ndarray,
    labels: np.ndarray,
    blank: int,
    durations: np.ndarray,
    sigma: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Alphas of one utterance on the TDT lattice (Equation 7 of the paper).

    Args:
        log_probs: ``(T, U+1, V) float64`` label log-probabilities (log-softmax, without ``sigma``).
        duration_log_probs: ``(T, U+1, D) float64`` duration log-probabilities.
        labels: ``(U,)`` integer labels.
        blank: blank index in ``[0, V)``.
        durations: ``(D,)`` sorted distinct non-negative ints.
        sigma: subtracted from every token log-probability.

    Returns:
        ``alpha: (T+1, U+1) float64`` (row ``T`` is the frame past the end) and ``log P(y|x) = alpha[T, U]``.
    """
    T, U1, _ = log_probs.shape
    U = U1 - 1
    alpha = np.full((T + 1, U1), -math.inf)
    for t in range(T + 1):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[t, u] = 0.0
                continue
            incoming = []
            for i, d in enumerate(durations):
                s = t - int(d)  # the frame the arc leaves from
                if s < 0:
                    continue
                if d > 0 and (t < T or u == U):  # a blank from (s, u)
                    incoming.append(alpha[s, u] + log_probs[s, u, blank] - sigma + duration_log_probs[s, u, i])
                if u > 0 and t < T:  # the label y_u from (s, u - 1)
                    k = labels[u - 1]
                    incoming.append(alpha[s, u - 1] + log_probs[s, u - 1, k] - sigma + duration_log_probs[s, u - 1, i])
            alpha[t, u] = _logsumexp(incoming)
    return alpha, alpha[T, U]


def tdt_backward_variables(
    log_probs: np.ndarray,
    duration_log_probs: np.ndarray,
    labels: np.ndarray,
    blank: int,
    durations: np.ndarray,
    sigma: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Betas of one utterance on the TDT lattice; same arguments as :func:`tdt_forward_variables`.

    Returns:
        ``beta: (T+1, U+1) float64`` (``beta[T, U] = 0``, ``beta[T, u < U] = -inf``) and
        ``log P(y|x) = beta[0, 0]``.
    """
    T, U1, _ = log_probs.shape
    U = U1 - 1
    beta = np.full((T + 1, U1), -math.inf)
    beta[T, U] = 0.0
    for t in reversed(range(T)):
        for u in reversed(range(U1)):
            outgoing = []
            for i, d in enumerate(durations):
                if d > 0 and t + d <= T:  # a blank to (t + d, u)
                    outgoing.append(log_probs[t, u, blank] - sigma + duration_log_probs[t, u, i] + beta[t + d, u])
                if u < U and t + d < T:  # the label y_{u+1} to (t + d, u + 1)
                    k = labels[u]
                    outgoing.append(log_probs[t, u, k] - sigma + duration_log_probs[t, u, i] + beta[t + d, u + 1])
            beta[t, u] = _logsumexp(outgoing)
    return beta, beta[0, 0]


def tdt_sequence_gradient(
    log_probs: np.ndarray,
    duration_log_probs: np.ndarray,
    labels: np.ndarray,
    blank: int,
    durations: np.ndarray,
    sigma: float = 0.0,
    fastemit_lambda: float = 0.0,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Cost and gradients w.r.t. the label and duration log-probabilities of one utterance.

    Each arc's weight enters as ``log_probs[t, u, token] + duration_log_probs[t, u, i]``: the gradient of
    ``-log P`` w.r.t. both is minus the arc's posterior ``alpha[t, u] + weight + beta[next] - log P``. FastEmit
    scales the label arcs' posteriors by ``1 + fastemit_lambda`` at the label token only, not at their
    durations (as NeMo's compute_tdt_grad_kernel), and the cost by the same factor. An utterance without any
    alignment (``log P = -inf``, e.g. odd T with durations ``[2]``) costs ``inf`` and gets a zero gradient.

    Returns:
        ``cost = -(1 + fastemit_lambda) * log P``, ``grad: (T, U+1, V) float64`` and
        ``duration_grad: (T, U+1, D) float64``.
    """
    T, U1, _ = log_probs.shape
    U = U1 - 1
    alpha, log_likelihood = tdt_forward_variables(log_probs, duration_log_probs, labels, blank, durations, sigma)
    beta, _ = tdt_backward_variables(log_probs, duration_log_probs, labels, blank, durations, sigma)
    grad = np.zeros_like(log_probs)
    duration_grad = np.zeros_like(duration_log_probs)
    if log_likelihood == -math.inf:
        return math.inf, grad, duration_grad
    for t in range(T):
        for u in range(U1):
            for i, d in enumerate(durations):
                if d > 0 and t + d <= T:
                    weight = log_probs[t, u, blank] - sigma + duration_log_probs[t, u, i]
                    posterior = math.exp(alpha[t, u] + weight + beta[t + d, u] - log_likelihood)
                    grad[t, u, blank] -= posterior
                    duration_grad[t, u, i] -= posterior
                if u < U and t + d < T:
                    k = labels[u]
                    weight = log_probs[t, u, k] - sigma + duration_log_probs[t, u, i]
                    posterior = math.exp(alpha[t, u] + weight + beta[t + d, u + 1] - log_likelihood)
                    grad[t, u, k] -= (1.0 + fastemit_lambda) * posterior
                    duration_grad[t, u, i] -= posterior
    return -(1.0 + fastemit_lambda) * log_likelihood, grad, duration_grad


def tdt_loss_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    logit_lengths: np.ndarray,
    target_lengths: np.ndarray,
    durations,
    blank: int = -1,
    sigma: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
    label_head_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """TDT loss and its gradient w.r.t. the whole logits, in float64.

    Args:
        logits: ``(B, T, U+1, V + D)``: the V label scores (the blank among them), then the D duration scores.
        targets, logit_lengths, target_lengths: as for :func:`rnnt_loss_reference`.
        durations: ``(D,)`` sorted distinct non-negative ints, e.g. ``[0, 1, 2, 3, 4]``.
        blank: blank index in the label part; negative values count from its end (``-1`` is ``V-1``).
        sigma: logit under-normalisation: label log-probabilities are ``log_softmax(label part) - sigma``.
        clamp: if ``> 0``, the gradient w.r.t. the label part is clipped to ``[-clamp, clamp]`` per utterance
            before the reduction (the duration part is not clipped, as in NeMo).
        reduction: as for :func:`rnnt_loss_reference`.
        fastemit_lambda: FastEmit weight (see :func:`tdt_sequence_gradient`).
        label_head_only: the omega case of NeMo: the plain RNNT loss of ``logits[..., :V]`` (no sigma, no
            durations; zero gradient w.r.t. the duration part).

    Returns:
        ``(loss, grad)``: the reduced loss and the gradient of ``loss.sum()`` w.r.t. ``logits``,
        ``(B, T, U+1, V + D) float64``, zero outside each utterance's frames and label positions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    durations = np.asarray(durations, dtype=np.int64)
    x = np.asarray(logits, dtype=np.float64)
    B = x.shape[0]
    V = x.shape[-1] - len(durations)
    blank = blank % V
    grad = np.zeros_like(x)
    if label_head_only:
        costs, grad[..., :V] = rnnt_loss_reference(x[..., :V], targets, logit_lengths, target_lengths, blank,
                                                   clamp, "none", True, fastemit_lambda)
        return reduce_costs_and_gradient(costs, grad, target_lengths, reduction)
    costs = np.zeros(B)
    for b in range(B):
        T_b, U_b = int(logit_lengths[b]), int(target_lengths[b])
        labels = np.asarray(targets[b, :U_b], dtype=np.int64)
        scores = x[b, :T_b, : U_b + 1]
        log_probs, duration_log_probs = log_softmax(scores[..., :V]), log_softmax(scores[..., V:])
        costs[b], g, g_duration = tdt_sequence_gradient(log_probs, duration_log_probs, labels, blank, durations,
                                                        sigma, fastemit_lambda)
        # Chain rule through each log-softmax: dL/dz_k = dL/dlp_k - softmax_k * sum_j dL/dlp_j.
        g = g - np.exp(log_probs) * g.sum(axis=-1, keepdims=True)
        g_duration = g_duration - np.exp(duration_log_probs) * g_duration.sum(axis=-1, keepdims=True)
        if clamp > 0:
            g = np.clip(g, -clamp, clamp)
        grad[b, :T_b, : U_b + 1, :V] = g
        grad[b, :T_b, : U_b + 1, V:] = g_duration
    return reduce_costs_and_gradient(costs, grad, target_lengths, reduction)
