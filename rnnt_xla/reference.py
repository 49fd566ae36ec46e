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
    "multiblank_arcs",
    "rnnt_variant_arcs",
    "multiblank_rnnt_loss_reference",
    "rnnt_variant_loss_reference",
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


# ---------------------------------------------------------------------------------------------------------
# Multi-blank RNNT (Xu et al., 2022, NeMo) and the RNNT variants of k2 (rnnt_type, delay_penalty).
#
# Both are transducer lattices whose arcs differ from the regular ones, so they share one explicit
# forward-backward over a list of arcs. The lattice of one utterance has the states ``(t, u)`` with
# ``t = 0..T`` and ``u = 0..U``; it starts at ``(0, 0)`` and ends at ``(T, U)`` (every frame consumed, every
# label emitted), so ``log P(y|x) = alpha[T, U]``. Each arc leaves a state with ``t < T`` and carries a
# score, the log-probability entries ``(t', u', k)`` its score is made of (their gradient), and whether it
# emits a label (FastEmit weighs the posteriors of those by ``1 + fastemit_lambda``). Arcs only go forward
# in ``t`` or, at the same ``t``, forward in ``u``, so the states in ``(t, u)`` order are topologically
# sorted.
# ---------------------------------------------------------------------------------------------------------

RNNT_TYPES = ("regular", "modified", "constrained")


def _lattice_cost_and_gradient(arcs, T: int, U: int, shape: tuple[int, ...], fastemit_lambda: float):
    """Forward-backward over ``arcs``: ``{(t, u): [(t_next, u_next, score, entries, emits), ...]}``.

    ``alpha[t, u] = logsumexp over the arcs (s -> (t, u)) of alpha[s] + score``, ``beta[s] = logsumexp
    over the arcs (s -> n) of score + beta[n]`` with ``beta[T, U] = 0``; an arc's posterior is
    ``exp(alpha[s] + score + beta[n] - log P)`` and the gradient of ``-log P`` w.r.t. each log-probability
    entry of its score is minus that posterior (times ``1 + fastemit_lambda`` for a label arc).

    Returns:
        ``cost = -(1 + fastemit_lambda) * log P`` and ``grad: shape float64`` w.r.t. the log-probabilities.
    """
    states = [(t, u) for t in range(T + 1) for u in range(U + 1)]
    alpha = {s: -math.inf for s in states}
    alpha[0, 0] = 0.0
    for s in states:
        for t_next, u_next, score, _, _ in arcs.get(s, ()):
            alpha[t_next, u_next] = _logaddexp(alpha[t_next, u_next], alpha[s] + score)
    beta = {s: -math.inf for s in states}
    beta[T, U] = 0.0
    for s in reversed(states):
        for t_next, u_next, score, _, _ in arcs.get(s, ()):
            beta[s] = _logaddexp(beta[s], score + beta[t_next, u_next])
    log_likelihood = alpha[T, U]
    grad = np.zeros(shape)
    for s in states:
        for t_next, u_next, score, entries, emits in arcs.get(s, ()):
            posterior = math.exp(alpha[s] + score + beta[t_next, u_next] - log_likelihood)
            for entry in entries:
                grad[entry] -= (1.0 + fastemit_lambda if emits else 1.0) * posterior
    return -(1.0 + fastemit_lambda) * log_likelihood, grad


def multiblank_arcs(log_probs: np.ndarray, labels: np.ndarray, blank: int, big_blank_durations, sigma: float):
    """Arcs of the multi-blank lattice of one utterance (NeMo's ``MultiblankRNNTLossPytorch``).

    ``log_probs: (T, U+1, V) float64``; the standard blank is ``blank``, big blank ``i`` (duration
    ``big_blank_durations[i]``) is entry ``blank - 1 - i``. From ``(t, u)``: the blank to ``(t + 1, u)``,
    big blank ``i`` to ``(t + d_i, u)`` where ``t + d_i <= T`` (it skips ``d_i`` frames; one that lands on
    ``T`` ends the lattice when ``u = U``), label ``y_{u+1}`` to ``(t, u + 1)``. Every arc's score is its
    log-probability minus ``sigma`` (logit under-normalisation).
    """
    T, U1, _ = log_probs.shape
    arcs = {}
    for t in range(T):
        for u in range(U1):
            out = [(t + 1, u, log_probs[t, u, blank] - sigma, [(t, u, blank)], False)]
            for i, d in enumerate(big_blank_durations):
                k = blank - 1 - i
                if t + d <= T:
                    out.append((t + d, u, log_probs[t, u, k] - sigma, [(t, u, k)], False))
            if u < U1 - 1:
                k = labels[u]
                out.append((t, u + 1, log_probs[t, u, k] - sigma, [(t, u, k)], True))
            arcs[t, u] = out
    return arcs


def rnnt_variant_arcs(log_probs: np.ndarray, labels: np.ndarray, blank: int, rnnt_type: str = "regular",
                      delay_penalty: float = 0.0):
    """Arcs of the RNNT lattice of one utterance for k2's ``rnnt_type`` and ``delay_penalty``.

    ``log_probs: (T, U+1, V) float64``. From ``(t, u)``: the blank to ``(t + 1, u)``; label ``y_{u+1}`` to
    ``(t, u + 1)`` (``"regular"``) or to ``(t + 1, u + 1)`` (``"modified"``, ``"constrained"``: a label also
    consumes the frame, so at most one per frame and ``T >= U`` is needed). ``"constrained"`` adds to the
    label arc the blank of the next context on the same frame, ``log_probs[t, u + 1, blank]`` (k2's
    ``px += py[:, 1:]``). The delay penalty adds ``delay_penalty * ((T - 1) / 2 - t)`` to every label arc
    (k2's ``penalty``; it rewards early labels and sums to zero over the frames).
    """
    if rnnt_type not in RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {RNNT_TYPES}, got {rnnt_type!r}")
    T, U1, _ = log_probs.shape
    frame_step = 0 if rnnt_type == "regular" else 1
    arcs = {}
    for t in range(T):
        for u in range(U1):
            out = [(t + 1, u, log_probs[t, u, blank], [(t, u, blank)], False)]
            if u < U1 - 1:
                k = labels[u]
                score = log_probs[t, u, k] + delay_penalty * ((T - 1) / 2 - t)
                entries = [(t, u, k)]
                if rnnt_type == "constrained":
                    score += log_probs[t, u + 1, blank]
                    entries.append((t, u + 1, blank))
                out.append((t + frame_step, u + 1, score, entries, True))
            arcs[t, u] = out
    return arcs


def _lattice_loss(logits, targets, logit_lengths, target_lengths, arcs_of, clamp, reduction, fused_log_softmax,
                  fastemit_lambda):
    """Per-utterance lattice costs and gradients w.r.t. the logits (through the log-softmax), clamped,
    then reduced; ``arcs_of(log_probs, labels)`` gives an utterance's arcs."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x = np.asarray(logits, dtype=np.float64)
    B = x.shape[0]
    costs = np.zeros(B)
    grad = np.zeros_like(x)
    for b in range(B):
        T_b, U_b = int(logit_lengths[b]), int(target_lengths[b])
        labels = np.asarray(targets[b, :U_b], dtype=np.int64)
        scores = x[b, :T_b, : U_b + 1]
        log_probs = log_softmax(scores) if fused_log_softmax else scores
        costs[b], grad_log_probs = _lattice_cost_and_gradient(arcs_of(log_probs, labels), T_b, U_b,
                                                              log_probs.shape, fastemit_lambda)
        if fused_log_softmax:  # dL/dz_k = dL/dlp_k - softmax_k * sum_j dL/dlp_j
            g = grad_log_probs - np.exp(log_probs) * grad_log_probs.sum(axis=-1, keepdims=True)
        else:
            g = grad_log_probs
        if clamp > 0:
            g = np.clip(g, -clamp, clamp)
        grad[b, :T_b, : U_b + 1] = g
    return reduce_costs_and_gradient(costs, grad, target_lengths, reduction)


def multiblank_rnnt_loss_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    logit_lengths: np.ndarray,
    target_lengths: np.ndarray,
    big_blank_durations,
    blank: int = -1,
    sigma: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-blank RNNT loss (Xu et al., 2022, "Multi-blank transducers for speech recognition") and its
    gradient, in float64, with NeMo's semantics (``MultiblankRNNTLossPytorch``).

    Args:
        logits: ``(B, T, U+1, V)`` unnormalised scores; the vocabulary is the labels, then the big blanks in
            reverse order of ``big_blank_durations``, then the standard blank: big blank ``i`` is entry
            ``blank - 1 - i`` (NeMo: ``blank = V - 1``, big blanks just before it).
        big_blank_durations: ``(K,)`` frames each big blank skips (e.g. ``[2, 4, 8]``).
        blank: the standard blank; negative values count from the end. ``blank - K >= 0``.
        sigma: logit under-normalisation: every arc uses ``log_softmax(logits) - sigma``.
        targets, logit_lengths, target_lengths, clamp, reduction, fastemit_lambda: as in
            :func:`rnnt_loss_reference` (log-softmax always fused).

    Returns:
        ``(loss, grad)`` as in :func:`rnnt_loss_reference`.
    """
    V = np.shape(logits)[-1]
    blank = blank % V
    durations = [int(d) for d in big_blank_durations]
    if blank - len(durations) < 0:
        raise ValueError(f"blank={blank} leaves no room for {len(durations)} big blanks before it")

    def arcs_of(log_probs, labels):
        return multiblank_arcs(log_probs, labels, blank, durations, sigma)

    return _lattice_loss(logits, targets, logit_lengths, target_lengths, arcs_of, clamp, reduction, True,
                         fastemit_lambda)


def rnnt_variant_loss_reference(
    logits: np.ndarray,
    targets: np.ndarray,
    logit_lengths: np.ndarray,
    target_lengths: np.ndarray,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
    rnnt_type: str = "regular",
    delay_penalty: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """RNNT loss with k2's ``rnnt_type`` (``"regular"``, ``"modified"``, ``"constrained"``) and
    ``delay_penalty`` (see :func:`rnnt_variant_arcs`), and its gradient, in float64. The other arguments
    are those of :func:`rnnt_loss_reference`, which this equals for ``"regular"`` without delay penalty.
    ``T_b`` in the delay penalty is each utterance's own frame count (k2 with a ``boundary``). An
    utterance of a modified/constrained lattice with ``T_b < U_b`` has no path (cost ``inf``).
    """
    blank = blank % np.shape(logits)[-1]

    def arcs_of(log_probs, labels):
        return rnnt_variant_arcs(log_probs, labels, blank, rnnt_type, delay_penalty)

    return _lattice_loss(logits, targets, logit_lengths, target_lengths, arcs_of, clamp, reduction,
                         fused_log_softmax, fastemit_lambda)
