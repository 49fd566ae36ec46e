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
    return np.asarray((costs * per_target).sum() / B), grad * (per_target / B)[:, None, None, None]
