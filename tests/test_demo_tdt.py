"""``python -m rnnt_xla demo --loss tdt``: the greedy TDT decoder, and short TDT training runs (synthetic data)
in both frameworks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rnnt_xla import demo
from rnnt_xla.demo.decoding import greedy_tdt_alignments
from rnnt_xla.demo.models import tdt_available

DURATIONS = (0, 1, 2, 3, 4)
SMALL_TASK = dict(max_labels=4, seed=1)
STEPS = 25
SMALL_MODEL = demo.ModelConfig(hidden=32, batch_size=16, durations=DURATIONS)


def _reference_tdt_decode(encoded, length, predict, join, durations, max_symbols=3):
    """Frame by frame, one utterance: the decoding rule written out plainly."""
    V = join(encoded[:, :1], predict(np.array([demo.BLANK]), None)[0]).shape[-1] - len(durations)
    emitted, (pred, state) = [], predict(np.array([demo.BLANK]), None)
    t, at_t = 0, 0
    while t < length:
        scores = join(encoded[:, t:t + 1], pred)[0, 0]
        label, d = int(np.argmax(scores[:V])), durations[int(np.argmax(scores[V:]))]
        if label == demo.BLANK:
            t, at_t = t + max(d, 1), 0
            continue
        emitted.append((label, t))
        pred, state = predict(np.array([label]), state)
        if d > 0:
            t, at_t = t + d, 0
        else:
            at_t += 1
            if at_t == max_symbols:
                t, at_t = t + 1, 0
    return emitted


def test_greedy_tdt_decode_matches_a_frame_by_frame_decoder():
    rng = np.random.default_rng(5)
    B, H, V, T = 6, 6, 5, 30
    D = len(DURATIONS)
    embed, recur = rng.standard_normal((V, H)), rng.standard_normal((H, H)) * 0.5
    out = rng.standard_normal((H, V + D))
    out[:, demo.BLANK] += 0.5

    def predict(labels, state):
        state = np.tanh(embed[labels] + (0 if state is None else state @ recur))
        return state, state

    def join(encoded, predicted):
        return np.tanh(encoded + predicted[:, None]) @ out

    encoded = rng.standard_normal((B, T, H))
    lengths = np.array([T, T - 1, 17, 1, 0, 25])
    expected = [_reference_tdt_decode(encoded[b:b + 1], lengths[b], predict, join, DURATIONS) for b in range(B)]
    assert sum(map(len, expected)) > 10 and expected[4] == []
    # Frames were skipped: some emitted labels are more than one frame apart with no label between.
    assert any(b - a > 1 for e in expected for (_, a), (_, b) in zip(e, e[1:]))
    assert greedy_tdt_alignments(encoded, lengths, predict, join, DURATIONS) == expected


def test_greedy_tdt_decode_skips_by_the_predicted_duration():
    """A scripted joiner: label 3 with duration 2 at even frames, blank with duration 3 elsewhere."""
    V, D = 4, len(DURATIONS)

    def predict(labels, state):
        return np.zeros((len(labels), 1)), np.zeros((len(labels), 1))

    def join(encoded, predicted):
        t = np.arange(encoded.shape[1])
        scores = np.zeros(encoded.shape[:2] + (V + D,))
        scores[:, t % 2 == 0, 3] = scores[:, t % 2 == 0, V + 2] = 1  # label 3, duration 2
        scores[:, t % 2 == 1, demo.BLANK] = scores[:, t % 2 == 1, V + 3] = 1  # blank, duration 3
        return scores

    # Frames 0, 2, 4, ... each emit label 3 and move on 2: never a blank frame.
    assert greedy_tdt_alignments(np.zeros((1, 7, 1)), [7], predict, join, DURATIONS) == [
        [(3, 0), (3, 2), (3, 4), (3, 6)]]


needs_tdt_torch = pytest.mark.skipif(not tdt_available("torch"), reason="rnnt_xla.torch.tdt_loss not in this checkout")


@needs_tdt_torch
def test_torch_tdt_training_reduces_the_loss_and_decodes():
    pytest.importorskip("torch")
    task = demo.SyntheticTask(**SMALL_TASK)
    model, losses = demo.train_torch(task, STEPS, SMALL_MODEL)
    assert len(losses) == STEPS and np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    assert model.output.out_features == task.vocab_size + len(DURATIONS)
    batch = task.sample(np.random.default_rng(99), 4)
    hypotheses = demo.decode_torch(model, batch)
    assert len(hypotheses) == 4 and all(1 <= label < task.vocab_size for h in hypotheses for label in h)


@pytest.mark.skipif(not tdt_available("jax"), reason="rnnt_xla.jax.tdt_loss not in this checkout")
def test_jax_tdt_training_reduces_the_loss_and_decodes():
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    task = demo.SyntheticTask(**SMALL_TASK)
    model, params, losses = demo.train_jax(task, STEPS, SMALL_MODEL)
    assert len(losses) == STEPS and np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    batch = task.sample(np.random.default_rng(99), 4)
    hypotheses = demo.decode_jax(model, params, batch, SMALL_MODEL)
    assert len(hypotheses) == 4 and all(1 <= label < task.vocab_size for h in hypotheses for label in h)


@needs_tdt_torch
def test_main_runs_a_short_synthetic_tdt_demo(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(steps=5, framework="torch", data="synthetic", out=tmp_path, loss="tdt") == 0
    out = capsys.readouterr().out
    assert "durations=(0, 1, 2, 3, 4)" in out and "label error rate" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["loss"] == "tdt" and results["frameworks"]["torch"]["steps"] == 5


def test_main_rejects_an_unknown_loss(tmp_path):
    with pytest.raises(ValueError, match="loss must be one of"):
        demo.main(steps=1, framework="torch", data="synthetic", out=tmp_path, loss="ctc")
