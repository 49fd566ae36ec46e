"""The demo (``python -m rnnt_xla demo``): data, decoding, the alignment posterior, shortened training runs
per framework, and a tiny end-to-end run on synthesised speech."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from rnnt_xla import demo
from rnnt_xla.reference import log_softmax, sequence_gradient

SMALL_TASK = dict(max_labels=4, seed=1)
STEPS = 25
SMALL_MODEL = demo.ModelConfig(hidden=32, batch_size=16)


def _check_hypotheses(hypotheses: object, batch: demo.Batch, vocab_size: int, subsampling: int = 1) -> None:
    assert isinstance(hypotheses, list) and len(hypotheses) == len(batch.frame_lengths)
    for hypothesis, n_frames in zip(hypotheses, batch.frame_lengths):
        assert isinstance(hypothesis, list)
        assert all(type(label) is int and 1 <= label < vocab_size for label in hypothesis)
        assert len(hypothesis) <= 3 * -(-n_frames // subsampling)  # max_symbols_per_frame


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


def test_edit_distance_and_error_rates():
    assert demo.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert demo.edit_distance([1, 2, 3], [1, 3]) == 1
    assert demo.edit_distance([1, 2, 3], [4, 1, 2, 5]) == 2
    assert demo.edit_distance([], [1, 2]) == 2
    assert demo.label_error_rate([[1, 2], [3, 4]], [[1, 2], [3]]) == pytest.approx(0.25)
    assert demo.sequence_error_rate([[1, 2], [3, 4], [5]], [[1, 2], [3], [5]]) == pytest.approx(1 / 3)


def test_greedy_decode_follows_the_joiner():
    """A scripted joiner: emit label 5 then 7 at frame 1, nothing elsewhere; the state counts emissions."""
    V = 8

    def predict(labels, state):
        count = np.zeros((len(labels), 1)) if state is None else state + 1
        return count, count

    def join(encoded, predicted):
        emit = np.select([predicted == 0, predicted == 1], [5, 7], demo.BLANK)  # (B, 1)
        return np.eye(V)[np.where(encoded[..., 0] == 1, emit, demo.BLANK)]  # (B, T, V)

    encoded = np.array([[[0.0], [1.0], [0.0], [1.0]]])
    assert demo.greedy_alignments(encoded, [3], predict, join) == [[(5, 1), (7, 1)]]
    assert demo.greedy_decode(encoded, [3], predict, join) == [[5, 7]]
    # Frame 3 lies past the length; an always-emitting joiner is cut at max_symbols_per_frame; an
    # utterance of no frames emits nothing.
    always = lambda e, p: np.broadcast_to(np.eye(V)[3], e.shape[:2] + (V,))  # noqa: E731
    assert demo.greedy_alignments(np.concatenate([encoded, encoded]), [2, 0], predict, always,
                                  max_symbols_per_frame=2) == [[(3, 0), (3, 0), (3, 1), (3, 1)], []]


def test_greedy_decode_matches_a_frame_by_frame_decoder():
    """The batched decoder jumps to each utterance's next emitting frame; a plain loop over utterances and
    frames must give the same."""
    rng = np.random.default_rng(3)
    B, H, V, T = 6, 6, 5, 30
    embed, recur, out = rng.standard_normal((V, H)), rng.standard_normal((H, H)) * 0.5, rng.standard_normal((H, V))
    out[:, demo.BLANK] += 0.8  # blanks common enough for a mix of emitting and silent frames

    def predict(labels, state):
        state = np.tanh(embed[labels] + (0 if state is None else state @ recur))
        return state, state

    def join(encoded, predicted):
        return np.tanh(encoded + predicted[:, None]) @ out

    encoded = rng.standard_normal((B, T, H))
    lengths = np.array([T, T - 1, 17, 1, 0, 25])
    expected = []
    for b in range(B):
        emitted, (pred, state) = [], predict(np.array([demo.BLANK]), None)
        for t in range(lengths[b]):
            for _ in range(3):
                label = int(np.argmax(join(encoded[b:b + 1, t:t + 1], pred)))
                if label == demo.BLANK:
                    break
                emitted.append((label, t))
                pred, state = predict(np.array([label]), state)
        expected.append(emitted)
    assert sum(map(len, expected)) > 20 and expected[4] == []
    assert demo.greedy_alignments(encoded, lengths, predict, join) == expected


def test_alignment_posterior_is_the_sum_of_the_outgoing_transition_posteriors():
    """Occupancy of node (t, u) = posterior of leaving it by the blank + by label y_{u+1}, i.e. minus the
    reference gradient w.r.t. those two log-probabilities; the corners are visited by every path."""
    rng = np.random.default_rng(0)
    T, U, V = 7, 3, 5
    logits = rng.standard_normal((T, U + 1, V))
    labels = rng.integers(1, V, size=U)
    occupancy = demo.alignment_posterior(logits, labels)
    _, grad = sequence_gradient(log_softmax(logits), labels, demo.BLANK)
    leaving = -grad[:, :, demo.BLANK]
    for u in range(U):
        leaving[:, u] -= grad[:, u, labels[u]]
    np.testing.assert_allclose(occupancy, leaving, atol=1e-12)
    assert occupancy[0, 0] == pytest.approx(1) and occupancy[-1, -1] == pytest.approx(1)
    assert np.all(occupancy.sum(axis=1) >= 1 - 1e-12) and np.all(occupancy <= 1 + 1e-12)


def test_learning_rate_schedule():
    rates = demo.ModelConfig(lr=1e-2, warmup=4, final_lr=0.1).learning_rates(20)
    np.testing.assert_allclose(rates[:4], [2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-6)
    assert np.all(np.diff(rates[4:]) <= 0) and rates[-1] == pytest.approx(1e-3, rel=0.05)
    np.testing.assert_allclose(demo.ModelConfig(lr=0.5).learning_rates(5), 0.5)


def test_encoded_lengths_match_both_models():
    """The lengths the loss gets are the frames the strided convolutions really give, in both frameworks."""
    config = demo.ModelConfig(hidden=8, strides=(2, 2), bidirectional=True)
    np.testing.assert_array_equal(demo.encoded_lengths(np.array([1, 4, 5, 8, 9, 101]), config.strides),
                                  [1, 1, 2, 2, 3, 26])
    frames, lengths = np.zeros((2, 37, 3), np.float32), np.array([37, 20], np.int32)
    expected = demo.encoded_lengths(lengths, config.strides)
    torch = pytest.importorskip("torch")
    model = demo.torch_transducer(5, 3, config)
    encoded, got = model.encode(torch.from_numpy(frames), torch.from_numpy(lengths))
    assert encoded.shape == (2, expected[0], 8)
    np.testing.assert_array_equal(got.numpy(), expected)
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    flax_model = demo.flax_transducer(5, config)
    params = flax_model.init(jax.random.key(0), frames, expected, np.zeros((2, 2), np.int32))
    assert flax_model.apply(params, frames, expected, method="encode").shape == (2, expected[0], 8)


def test_torch_training_reduces_the_loss_and_decodes():
    pytest.importorskip("torch")
    task = demo.SyntheticTask(**SMALL_TASK)
    seen = []
    model, losses = demo.train_torch(task, STEPS, SMALL_MODEL, on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(STEPS)) and len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
    batch = task.sample(np.random.default_rng(99), 4)
    _check_hypotheses(demo.decode_torch(model, batch), batch, task.vocab_size)


def test_jax_training_reduces_the_loss_and_decodes():
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    task = demo.SyntheticTask(**SMALL_TASK)
    model, params, losses = demo.train_jax(task, STEPS, SMALL_MODEL)
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0]
    batch = task.sample(np.random.default_rng(99), 4)
    _check_hypotheses(demo.decode_jax(model, params, batch, SMALL_MODEL), batch, task.vocab_size)


def test_main_runs_a_short_synthetic_torch_demo(capsys, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    assert demo.main(steps=5, framework="torch", data="synthetic", out=tmp_path) == 0
    out = capsys.readouterr().out
    assert "torch: loss" in out and "label error rate" in out and "jax" not in out
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["frameworks"]["torch"]["steps"] == 5


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_fused_loss_trains_as_the_plain_loss(framework):
    """``loss="fused"`` (the joiner inside fused_rnnt_loss) is the same loss: the same losses step by step."""
    for module in ("torch",) if framework == "torch" else ("jax", "flax", "optax"):
        pytest.importorskip(module)
    task = demo.SyntheticTask(**SMALL_TASK)
    train = demo.train_torch if framework == "torch" else demo.train_jax
    plain, fused = (train(task, 4, SMALL_MODEL, loss=loss)[-1] for loss in ("rnnt", "fused"))
    np.testing.assert_allclose(fused, plain, rtol=2e-4)
    with pytest.raises(ValueError, match="loss must be one of 'rnnt', 'fused'"):
        train(task, 1, SMALL_MODEL, loss="ctc")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_command_line_demo_with_the_fused_loss(framework, tmp_path, capsys):
    """``python -m rnnt_xla demo --loss fused`` trains in each framework (short synthetic run)."""
    for module in ("torch", "matplotlib") if framework == "torch" else ("jax", "flax", "optax", "matplotlib"):
        pytest.importorskip(module)
    from rnnt_xla.__main__ import main

    code = main(["demo", "--data", "synthetic", "--steps", "5", "--framework", framework, "--loss", "fused",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "loss: fused_rnnt_loss" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["loss"] == "fused" and results["frameworks"][framework]["steps"] == 5
    with pytest.raises(SystemExit):
        main(["demo", "--loss", "ctc"])


def test_missing_synthesiser_gives_a_clear_message(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from rnnt_xla.demo import speech

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails as if not installed
    monkeypatch.setattr(speech, "_ESPEAK", None)
    assert demo.main(steps=1, framework="torch", cache_dir=tmp_path, out=tmp_path) == 2
    out = capsys.readouterr().out
    assert "espeakng-loader" in out and "pip install -e '.[demo]'" in out and "GPL-3.0" in out


# ------------------------------------------------------------------------------- synthesised speech

TINY_SPEECH = dict(train_utterances=12, test_utterances=4, seed=5)


@pytest.fixture(scope="module")
def speech():
    pytest.importorskip("espeakng_loader", reason="the speech demo needs the demo extra (espeakng-loader)")
    pytest.importorskip("librosa", reason="the speech features need the demo extra (librosa)")
    pytest.importorskip("torch", reason="the speech features use torch.stft")
    from rnnt_xla.demo import speech

    return speech


@pytest.fixture(scope="module")
def tiny_corpus(speech, tmp_path_factory):
    cache = tmp_path_factory.mktemp("speech_cache")
    config = speech.SpeechConfig(**TINY_SPEECH)
    return speech.load_or_build(config, cache), cache


def test_speech_corpus_features_lengths_and_labels_line_up(speech, tiny_corpus):
    data, cache = tiny_corpus
    config = data.config
    assert not data.cached and data.sample_rate == 22050
    train_utterances, test_utterances = speech.draw_utterances(config, speech.espeak().variants())
    assert test_utterances == data.test_utterances
    for corpus, utterances in ((data.train, train_utterances), (data.test, test_utterances)):
        assert corpus.frames.dtype == np.float32 and corpus.frames.shape[2] == config.n_mels
        assert corpus.max_frames == data.train.max_frames  # one shape for both: jax compiles once
        for i, u in enumerate(utterances):
            # Labels: the digits spoken, in order; padding after them.
            U = corpus.label_lengths[i]
            assert corpus.labels[i, :U].tolist() == [d + 1 for d in u.digits] == [
                speech.digit_label(w) for w in u.text.split()]
            assert np.all(corpus.labels[i, U:] == demo.BLANK) and config.min_digits <= U <= config.max_digits
            assert corpus.speakers[i] == u.voice
            assert (u.voice.split("+")[1] in speech.HELD_OUT_VOICES) == (corpus is data.test)
        # Features: the utterance's own audio, frame for frame. Re-synthesised, it is the same length; the
        # samples differ a little (eSpeak NG keeps state between syntheses), so the features must match
        # closely, and far better than another utterance's.
        for i in range(2):
            audio = speech.render(utterances[i], speech.espeak(), speech.noise_seed(config, corpus is data.test, i))
            T = corpus.frame_lengths[i]
            assert T == 1 + len(audio) // config.hop
            raw = speech.log_mel([audio], data.sample_rate, config)[0]
            expected = (raw - data.mean) / data.std
            assert np.all(corpus.frames[i, T:] == 0)
            assert np.median(np.abs(corpus.frames[i, :T] - expected)) < 0.05
            other = corpus.frames[1 - i, :T]
            assert np.corrcoef(corpus.frames[i, :T].ravel(), expected.ravel())[0, 1] > 0.95 > np.corrcoef(
                other.ravel(), expected.ravel())[0, 1]
            # The pause before the speech is quieter than the speech.
            lead = int(utterances[i].lead * data.sample_rate) // config.hop
            if lead >= 4:
                energy = raw.mean(axis=1)
                assert energy[:lead - 1].mean() < energy[lead + 1:T - 1].mean() - 1.0
    again = speech.load_or_build(config, cache)
    assert again.cached
    np.testing.assert_array_equal(again.train.frames, data.train.frames)


def test_tiny_speech_demo_end_to_end(speech, tiny_corpus, tmp_path, capsys):
    """Both frameworks train on a few synthesised utterances (the loss falls), decode the held-out voices,
    and write the summary, results.json and both figures."""
    pytest.importorskip("matplotlib")
    _, cache = tiny_corpus
    frameworks = "both" if all(_importable(m) for m in ("jax", "flax", "optax")) else "torch"
    code = demo.main(steps=12, framework=frameworks, data="speech", out=tmp_path, cache_dir=cache,
                     speech_config=speech.SpeechConfig(**TINY_SPEECH))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "read from the cache" in out and "digit error rate" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for name, run in results["frameworks"].items():
        assert run["steps"] == 12 and run["trained"] and run["losses"][-1] < run["losses"][0]
        assert 0 <= run["error_rate"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "alignment.png").stat().st_size > 0


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False
