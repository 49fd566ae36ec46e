"""Padded batches, the synthetic task, and a fixed corpus of utterances (numpy only).

A *task* is anything with ``vocab_size``, ``feature_dim``, ``max_frames``, ``max_labels`` and
``sample(rng, batch_size) -> Batch``: :class:`SyntheticTask` draws fresh utterances, :class:`Corpus` draws
from a fixed set (the synthesised speech). The trainers only see that interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BLANK = 0  # label 0 is the blank; real labels are 1..num_labels


@dataclass
class Batch:
    """A padded batch. Shapes are fixed by the task (not by the batch) so that ``jax.jit`` compiles once."""

    frames: np.ndarray  # (B, T, F) float32, zero after each frame length
    frame_lengths: np.ndarray  # (B,) int32
    labels: np.ndarray  # (B, U) int32, BLANK after each label length
    label_lengths: np.ndarray  # (B,) int32

    def references(self) -> list[list[int]]:
        """The label sequences without padding."""
        return [row[:n].tolist() for row, n in zip(self.labels, self.label_lengths)]


@dataclass
class SyntheticTask:
    """Label sequences rendered as noisy "acoustic" frames; deterministic given ``seed``.

    Every label ``1..K`` has a fixed random prototype vector, and an utterance is a sequence of labels,
    each shown as a few noisy copies of its prototype, with noisy silence frames between some of them.
    """

    num_labels: int = 10  # vocabulary V = num_labels + 1 (the blank)
    feature_dim: int = 16
    min_labels: int = 2
    max_labels: int = 8
    frames_per_label: tuple[int, int] = (2, 4)  # inclusive range
    max_silence: int = 2  # 0..max_silence silence frames before, between and after labels
    noise: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        # Row 0 (the blank) stands for silence: no signal, only noise.
        self.prototypes = rng.standard_normal((self.vocab_size, self.feature_dim)).astype(np.float32)
        self.prototypes[BLANK] = 0.0

    @property
    def vocab_size(self) -> int:
        return self.num_labels + 1

    @property
    def max_frames(self) -> int:
        return self.max_labels * self.frames_per_label[1] + (self.max_labels + 1) * self.max_silence

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """``batch_size`` fresh utterances padded to ``(max_frames, max_labels)``."""
        frames = np.zeros((batch_size, self.max_frames, self.feature_dim), np.float32)
        labels = np.full((batch_size, self.max_labels), BLANK, np.int32)
        frame_lengths = np.zeros(batch_size, np.int32)
        label_lengths = rng.integers(self.min_labels, self.max_labels + 1, size=batch_size).astype(np.int32)
        for b, n in enumerate(label_lengths):
            labels[b, :n] = rng.integers(1, self.vocab_size, size=n)
            ids = [BLANK] * int(rng.integers(0, self.max_silence + 1))
            for i, label in enumerate(labels[b, :n]):
                if i > 0:
                    gap = int(rng.integers(0, self.max_silence + 1))
                    # A repeated label needs silence in between, or "A A" would look like one long "A".
                    ids += [BLANK] * (max(gap, 1) if label == labels[b, i - 1] else gap)
                ids += [int(label)] * int(rng.integers(self.frames_per_label[0], self.frames_per_label[1] + 1))
            ids += [BLANK] * int(rng.integers(0, self.max_silence + 1))
            frame_lengths[b] = len(ids)
            noise = self.noise * rng.standard_normal((len(ids), self.feature_dim))
            frames[b, :len(ids)] = self.prototypes[ids] + noise
        return Batch(frames, frame_lengths, labels, label_lengths)


@dataclass
class Corpus:
    """A fixed set of utterances, padded to common shapes; :meth:`sample` draws random batches from it."""

    frames: np.ndarray  # (N, T, F) float32, zero after each frame length
    frame_lengths: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N, U) int32, BLANK after each label length
    label_lengths: np.ndarray  # (N,) int32
    vocab_size: int
    speakers: list[str] = field(default_factory=list)  # (N,) a name per utterance, for the report

    def __len__(self) -> int:
        return len(self.frame_lengths)

    @property
    def feature_dim(self) -> int:
        return self.frames.shape[2]

    @property
    def max_frames(self) -> int:
        return self.frames.shape[1]

    @property
    def max_labels(self) -> int:
        return self.labels.shape[1]

    def batch(self, indices: np.ndarray | slice = slice(None)) -> Batch:
        return Batch(self.frames[indices], self.frame_lengths[indices], self.labels[indices],
                     self.label_lengths[indices])

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch:
        """``batch_size`` different utterances drawn at random."""
        return self.batch(np.sort(rng.choice(len(self), size=min(batch_size, len(self)), replace=False)))

    @staticmethod
    def from_lists(features: list[np.ndarray], labels: list[list[int]], vocab_size: int,
                   speakers: list[str] | None = None, max_frames: int | None = None) -> Corpus:
        """Pad ``features`` (each ``(T_i, F)`` float32) and ``labels`` (each of length ``U_i``) into a corpus;
        ``max_frames`` (default: the longest utterance) fixes T, so that two corpora can share one shape."""
        T = max(len(f) for f in features) if max_frames is None else max_frames
        U = max(len(y) for y in labels)
        frames = np.zeros((len(features), T, features[0].shape[1]), np.float32)
        padded = np.full((len(labels), U), BLANK, np.int32)
        for i, (f, y) in enumerate(zip(features, labels)):
            if len(f) > T:
                raise ValueError(f"utterance {i} has {len(f)} frames, more than max_frames={T}")
            frames[i, :len(f)] = f
            padded[i, :len(y)] = y
        return Corpus(frames, np.array([len(f) for f in features], np.int32), padded,
                      np.array([len(y) for y in labels], np.int32), vocab_size, list(speakers or []))

