"""The demo (``python -m rnnt_xla demo``): data, decoding helpers, and a shortened training run per framework."""

from __future__ import annotations

import numpy as np
import pytest

from rnnt_xla import demo

SMALL_TASK = dict(max_labels=4, seed=1)
STEPS, BATCH = 25, 16


def _check_hypotheses(hypotheses: object, batch: demo.Batch, vocab_size: int) -> None:
    assert isinstance(hypotheses, list) and len(hypotheses) == len(batch.frame_lengths)
    for hypothesis, n_frames in zip(hypotheses, batch.frame_lengths):
        assert isinstance(hypothesis, list)
        assert all(type(label) is int and 1 <= label < vocab_size for label in hypothesis)
        assert len(hypothesis) <= 3 * n_frames  # max_symbols_per_frame


def test_synthetic_batches_are_padded_deterministic_and_consistent():
    task = demo.SyntheticTask(**SMALL_TASK)
    a, b = (task.sample(np.random.default_rng(7), 8) for _ in range(2))
    for x, y in zip(vars(a).values(), vars(b).values()):
        np.testing.assert_array_equal(x, y)
    assert a.frames.shape == (8, task.max_frames, task.feature_dim) and a.frames.dtype == np.float32
    assert a.labels.shape == (8, task.max_labels) and a.labels.dtype == np.int32
    assert a.frame_lengths.dtype == np.int32 and a.label_lengths.dtype == np.int32
    for frames, labels, T, U in zip(a.frames, a.labels, a.frame_lengths, a.label_lengths):
        assert task.min_labels <= U <= task.max_labels and U * task.frames_per_label[0] <= T <= task.max_frames
        assert np.all(frames[T:] == 0) and np.all(labels[U:] == demo.BLANK)
        assert np.all((labels[:U] >= 1) & (labels[:U] < task.vocab_size))


def test_edit_distance_and_label_error_rate():
    assert demo.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert demo.edit_distance([1, 2, 3], [1, 3]) == 1
    assert demo.edit_distance([1, 2, 3], [4, 1, 2, 5]) == 2
    assert demo.edit_distance([], [1, 2]) == 2
    assert demo.label_error_rate([[1, 2], [3, 4]], [[1, 2], [3]]) == pytest.approx(0.25)


def test_greedy_decode_follows_the_joiner():
    """A scripted joiner: emit label 5 then 7 at frame 1, nothing elsewhere; the state counts emissions."""
    V = 8

    def predict(label: int, state):
        count = 0 if state is None else state + 1
        return np.array([count], dtype=np.float32), count

    def join(encoded, predicted):
        logits = np.zeros(V)
        emit = {0: 5, 1: 7}.get(int(predicted[0])) if encoded[0] == 1 else None
        logits[demo.BLANK if emit is None else emit] = 1.0
        return logits

    encoded = np.array([[0.0], [1.0], [0.0], [1.0]])
    assert demo.greedy_decode(encoded, 3, predict, join) == [5, 7]
    # Frame 3 lies past the length; an always-emitting joiner is cut at max_symbols_per_frame.
    assert demo.greedy_decode(encoded, 2, predict, lambda e, p: np.eye(V)[3], max_symbols_per_frame=2) == [3] * 4


def test_torch_training_reduces_the_loss_and_decodes():
    pytest.importorskip("torch")
    task = demo.SyntheticTask(**SMALL_TASK)
    seen = []
    model, losses = demo.train_torch(task, STEPS, batch_size=BATCH, hidden=32,
                                     on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(STEPS)) and len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
    batch = task.sample(np.random.default_rng(99), 4)
    _check_hypotheses(demo.decode_torch(model, batch), batch, task.vocab_size)


def test_jax_training_reduces_the_loss_and_decodes():
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    task = demo.SyntheticTask(**SMALL_TASK)
    model, params, losses = demo.train_jax(task, STEPS, batch_size=BATCH, hidden=32)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
    batch = task.sample(np.random.default_rng(99), 4)
    _check_hypotheses(demo.decode_jax(model, params, batch), batch, task.vocab_size)


def test_main_runs_a_short_torch_demo(capsys):
    pytest.importorskip("torch")
    assert demo.main(steps=5, framework="torch") == 0
    out = capsys.readouterr().out
    assert "torch: loss" in out and "label error rate" in out and "jax" not in out
