"""Greedy transducer decoding, error rates and the alignment posterior (numpy only, both frameworks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rnnt_xla.demo.data import BLANK
from rnnt_xla.reference import backward_variables, forward_variables, log_softmax

# The decoder only needs two functions from a model, so one implementation serves both frameworks (it
# passes the model's own arrays through untouched and reads only the joiner's numpy output):
#   predict(label, state) -> (pred (H,), state): one prediction-network step; state=None starts a sequence.
#   join(encoded (T, H), pred (H,)) -> logits (T, V) as numpy: the joiner for every frame at once.
PredictFn = Callable[[int, Any], tuple[Any, Any]]
JoinFn = Callable[[Any, Any], np.ndarray]


def greedy_alignment(encoded: Any, length: int, predict: PredictFn, join: JoinFn,
                     max_symbols_per_frame: int = 3) -> list[tuple[int, int]]:
    """Greedy transducer decoding of one utterance; returns ``(label, frame)`` per emitted label.

    At each frame, emit the best non-blank label and feed it to the prediction network, until the joiner
    prefers the blank (then move to the next frame) or ``max_symbols_per_frame`` labels were emitted there
    (a guard against an untrained model emitting forever). The joiner's output only changes when a label
    is emitted, so it is evaluated for all frames at once and the decoder jumps to the next frame that
    emits: two model calls per emitted label rather than one per frame.

    Args:
        encoded: ``(T, H)`` encoder output (an array of the model's framework); only the first ``length``
            frames are read.
    """
    emitted: list[tuple[int, int]] = []
    pred, state = predict(BLANK, None)  # the blank doubles as the start-of-sequence token
    t, at_t = 0, 0  # the current frame and the labels emitted there so far
    while t < length:
        best = np.argmax(join(encoded, pred)[t:length], axis=-1)
        emitting = np.flatnonzero(best != BLANK)
        if len(emitting) == 0:
            break
        if emitting[0] > 0:
            t, at_t = t + int(emitting[0]), 0
        label = int(best[emitting[0]])
        emitted.append((label, t))
        pred, state = predict(label, state)
        at_t += 1
        if at_t == max_symbols_per_frame:
            t, at_t = t + 1, 0
    return emitted


def greedy_decode(encoded: Any, length: int, predict: PredictFn, join: JoinFn,
                  max_symbols_per_frame: int = 3) -> list[int]:
    """The labels of :func:`greedy_alignment`."""
    return [label for label, _ in greedy_alignment(encoded, length, predict, join, max_symbols_per_frame)]


def edit_distance(reference: list[int], hypothesis: list[int]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def label_error_rate(references: list[list[int]], hypotheses: list[list[int]]) -> float:
    """Total edit distance over the total number of reference labels."""
    errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses))
    return errors / max(1, sum(len(r) for r in references))


def sequence_error_rate(references: list[list[int]], hypotheses: list[list[int]]) -> float:
    """The fraction of utterances with any error."""
    return sum(r != h for r, h in zip(references, hypotheses)) / max(1, len(references))


def alignment_posterior(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The posterior occupancy of the transducer lattice for one utterance, from the float64 reference.

    ``occupancy[t, u] = exp(alpha[t, u] + beta[t, u] - log P(y|x))``: the probability that an alignment
    drawn from the model's posterior visits node ``(t, u)`` (frame ``t`` with ``u`` labels emitted). Each
    frame's column sums to the expected number of nodes visited at that frame (>= 1).

    Args:
        logits: ``(T, U+1, V)`` joiner output (unnormalised) of the valid frames and labels.
        labels: ``(U,)`` int target labels.

    Returns:
        ``(T, U+1)`` float64 occupancy in [0, 1].
    """
    log_probs = log_softmax(np.asarray(logits, np.float64))
    alpha, log_likelihood = forward_variables(log_probs, labels, BLANK)
    beta, _ = backward_variables(log_probs, labels, BLANK)
    return np.exp(alpha + beta - log_likelihood)
