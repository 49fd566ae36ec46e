"""Greedy transducer decoding, error rates and the alignment posterior (numpy only, both frameworks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rnnt_xla.demo.data import BLANK
from rnnt_xla.reference import backward_variables, forward_variables, log_softmax

# The decoder only needs two functions from a model, so one implementation serves both frameworks; they
# take and return numpy arrays (the model converts), for a batch of B utterances at once:
#   predict(labels (B,) int, state (B, S) or None) -> (pred (B, H), state (B, S)): one prediction-network
#       step; state=None starts the sequences.
#   join(encoded (B, T, H), pred (B, H)) -> logits (B, T, V): the joiner for every frame at once.
PredictFn = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]
JoinFn = Callable[[Any, np.ndarray], np.ndarray]


def greedy_alignments(encoded: Any, lengths: np.ndarray, predict: PredictFn, join: JoinFn,
                      max_symbols_per_frame: int = 3) -> list[list[tuple[int, int]]]:
    """Greedy transducer decoding of a batch; returns ``(label, frame)`` per emitted label per utterance.

    At each frame, emit the best non-blank label and feed it to the prediction network, until the joiner
    prefers the blank (then move to the next frame) or ``max_symbols_per_frame`` labels were emitted there
    (a guard against an untrained model emitting forever). The joiner's output only changes when a label
    is emitted, so it is evaluated for all frames at once and each utterance jumps to its next emitting
    frame; all utterances advance together: two model calls per emitted label position, not one per frame
    and utterance.

    Args:
        encoded: ``(B, T, H)`` encoder output (numpy or the model's framework); only the first
            ``lengths[b]`` frames of utterance ``b`` are read.
        lengths: ``(B,)`` int valid frames.
    """
    lengths = np.asarray(lengths)
    B = len(lengths)
    emitted: list[list[tuple[int, int]]] = [[] for _ in range(B)]
    pred, state = predict(np.full(B, BLANK), None)  # the blank doubles as the start-of-sequence token
    t = np.zeros(B, np.int64)  # each utterance's current frame
    at_t = np.zeros(B, np.int64)  # labels it emitted there so far
    active = lengths > 0
    rows = np.arange(B)
    while True:
        best = np.argmax(join(encoded, pred), axis=-1)  # (B, T)
        frames = np.arange(best.shape[1])[None, :]
        emitting = (best != BLANK) & (frames >= t[:, None]) & (frames < lengths[:, None])
        active &= emitting.any(axis=1)
        if not active.any():
            return emitted
        first = np.argmax(emitting, axis=1)  # the first emitting frame from t on
        at_t = np.where(active & (first > t), 0, at_t)
        t = np.where(active, first, t)
        labels = np.where(active, best[rows, t], BLANK)
        for b in np.flatnonzero(active):
            emitted[b].append((int(labels[b]), int(t[b])))
        new_pred, new_state = predict(labels, state)
        pred = np.where(active[:, None], new_pred, pred)
        state = np.where(active[:, None], new_state, state)
        at_t += active
        full = active & (at_t == max_symbols_per_frame)
        t, at_t = t + full, np.where(full, 0, at_t)


def greedy_tdt_alignments(encoded: Any, lengths: np.ndarray, predict: PredictFn, join: JoinFn,
                          durations: tuple[int, ...], max_symbols_per_frame: int = 3) -> list[list[tuple[int, int]]]:
    """Greedy Token-and-Duration Transducer decoding of a batch; ``(label, frame)`` per emitted label.

    ``join`` returns ``(B, T, V + D)``: the label scores, then the scores of ``durations`` (D of them). At
    frame t the best label and the best duration d are taken: a blank moves on ``max(d, 1)`` frames (it
    must advance); a label is emitted, fed to the prediction network, and moves on d frames (d = 0 stays
    on the frame, at most ``max_symbols_per_frame`` times, then moves on one). So the decoder skips the
    frames the model says the last token lasts, the point of TDT. As in :func:`greedy_alignments`, the
    joiner is evaluated for all frames at once per emitted label position (its output changes only when a
    label is emitted) and each utterance walks its blanks from it.

    Args:
        encoded: ``(B, T, H)`` encoder output; only the first ``lengths[b]`` frames of utterance b are read.
        lengths: ``(B,)`` int valid frames.
        durations: the D durations of the model's duration head, in its order.
    """
    lengths = np.asarray(lengths)
    steps = np.asarray(durations, np.int64)
    D = len(steps)
    B = len(lengths)
    emitted: list[list[tuple[int, int]]] = [[] for _ in range(B)]
    pred, state = predict(np.full(B, BLANK), None)
    t = np.zeros(B, np.int64)
    at_t = np.zeros(B, np.int64)  # labels emitted at frame t so far
    active = lengths > 0
    rows = np.arange(B)
    while True:
        scores = np.asarray(join(encoded, pred))  # (B, T, V + D)
        best = np.argmax(scores[..., :-D], axis=-1)  # (B, T) labels
        skip = steps[np.argmax(scores[..., -D:], axis=-1)]  # (B, T) durations
        labels = np.full(B, BLANK)
        for b in np.flatnonzero(active):
            frame = t[b]
            while frame < lengths[b] and best[b, frame] == BLANK:
                frame += max(int(skip[b, frame]), 1)
            if frame >= lengths[b]:
                active[b] = False
                continue
            if frame != t[b]:
                t[b], at_t[b] = frame, 0
            labels[b] = best[b, frame]
            emitted[b].append((int(labels[b]), int(frame)))
        if not active.any():
            return emitted
        new_pred, new_state = predict(labels, state)
        pred = np.where(active[:, None], new_pred, pred)
        state = np.where(active[:, None], new_state, state)
        d = np.where(active, skip[rows, np.minimum(t, skip.shape[1] - 1)], 0)
        at_t = np.where(active & (d == 0), at_t + 1, np.where(active, 0, at_t))
        full = at_t >= max_symbols_per_frame
        t = t + d + full
        at_t = np.where(full, 0, at_t)


def greedy_decode(encoded: Any, lengths: np.ndarray, predict: PredictFn, join: JoinFn,
                  max_symbols_per_frame: int = 3) -> list[list[int]]:
    """The labels of :func:`greedy_alignments`."""
    return [[label for label, _ in emitted]
            for emitted in greedy_alignments(encoded, lengths, predict, join, max_symbols_per_frame)]


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
