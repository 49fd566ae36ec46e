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


def _reduce(costs: np.ndarray, grad: np.ndarray, target_lengths: np.ndarray, reduction: str):
    """The reductions of :func:`rnnt_loss_reference` applied to per-utterance ``costs`` and ``grad``."""
    B = costs.shape[0]
    if reduction == "none":
        return costs, grad
    if reduction == "sum":
        return np.asarray(costs.sum()), grad
    if reduction == "mean":
        return np.asarray(costs.sum() / B), grad / B
    if reduction == "mean_volume":
        volume = max(float(np.sum(target_lengths)), 1.0)
        return np.asarray(costs.sum() / volume), grad / volume
    if reduction == "mean_by_target_length":
        per_target = 1.0 / np.maximum(np.asarray(target_lengths, dtype=np.float64), 1.0)
        return np.asarray((costs * per_target).sum() / B), grad * (per_target / B)[:, None, None, None]
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


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
    return _reduce(costs, grad, target_lengths, reduction)


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
