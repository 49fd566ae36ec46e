"""A spoken-digit corpus synthesised with eSpeak NG, and its log-mel features.

The synthesiser is the eSpeak NG shared library from the optional PyPI wheel ``espeakng-loader`` (the
``demo`` extra). eSpeak NG is GPL-3.0: rnnt_xla (Apache-2.0) neither ships nor links it; this module loads
it with ctypes at run time only, from that separately installed wheel.

Each utterance is a string of 2-7 digit words ("three one four") spoken by one of eSpeak's English
accents with one of its voice variants (``voices/!v``: Alex, Annie, Mike, ...), at a random rate, pitch
and pitch range, with a random pause before and after and a little background noise. Some variants are
held out of training entirely; the test set is spoken only by them. Features are log-mel spectrograms
(torch's STFT, librosa's mel filterbank), normalised with the training set's mean and deviation.
Everything is cached on disk, keyed by the settings, after the first run.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rnnt_xla.demo.data import Corpus

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOCAB_SIZE = len(DIGITS) + 1  # label d + 1 is the digit d; 0 is the blank
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
# Variants the model never hears in training; the test set is spoken by them only. Ordinary voices of
# both kinds (eSpeak's "f*" and "m*" variants and named ones), so the error rate is that of new speakers.
HELD_OUT_VOICES = ("Annie", "Mike", "f2", "m3", "linda", "robert", "steph", "boris", "Andrea", "ian")
FEATURE_VERSION = 4  # bump when the synthesis or the features change, to invalidate caches

MISSING_EXTRA = ("the speech demo synthesises its audio with eSpeak NG, from the optional package "
                 "espeakng-loader: pip install -e '.[demo]' (eSpeak NG is GPL-3.0; rnnt_xla loads it at run "
                 "time only). Or run the synthetic task: python -m rnnt_xla demo --data synthetic")


class MissingExtra(RuntimeError):
    """A package of the ``demo`` extra is not installed; the message says what to install."""


def digit_label(word: str) -> int:
    return DIGITS.index(word) + 1


def label_word(label: int) -> str:
    return DIGITS[label - 1]


# ------------------------------------------------------------------------------------------ eSpeak NG

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE, _WORDGAP = 1, 3, 4, 7  # espeak_PARAMETER values
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeak:
    """The eSpeak NG library, loaded from ``espeakng-loader`` with ctypes; synchronous synthesis.

    eSpeak keeps global state, so use one instance per process (:func:`espeak`).
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as error:
            raise MissingExtra(MISSING_EXTRA) from error
        self.lib = lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.data_path = Path(espeakng_loader.get_data_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data at {self.data_path}")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0: continue synthesis

    def variants(self) -> list[str]:
        """The voice variants shipped in ``voices/!v``."""
        return sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if " " not in p.name)

    def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50,
                   word_gap: int = 0) -> np.ndarray:
        """Speak ``text`` with ``voice`` (``"en-us+Alex"``). ``rate`` in words per minute, ``pitch`` and
        ``pitch_range`` 0-100, ``word_gap`` in units of 10 ms. Returns ``(samples,)`` int16 at
        :attr:`sample_rate` (22,050 Hz)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_WORDGAP, word_gap)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self._chunks.clear()
        data = text.encode()
        error = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed with error {error}")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


_ESPEAK: ESpeak | None = None


def espeak() -> ESpeak:
    """The process's :class:`ESpeak` (loaded on first use); :class:`MissingExtra` if it is not installed."""
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = ESpeak()
    return _ESPEAK


# --------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class SpeechConfig:
    """What to synthesise and how to turn it into features; the cache key."""

    train_utterances: int = 3200
    test_utterances: int = 300
    min_digits: int = 2
    max_digits: int = 7
    # Repeated digits ("eight eight") are what the model learns last; training strings repeat the previous
    # digit with this probability (else a uniform digit); test strings are uniform.
    train_repeats: float = 0.0
    rate: tuple[int, int] = (130, 220)  # words per minute, inclusive
    pitch: tuple[int, int] = (25, 75)
    pitch_range: tuple[int, int] = (20, 80)
    word_gap: tuple[int, int] = (0, 4)  # extra pause between words, 10 ms units
    pause: float = 0.3  # up to this many seconds of silence before and after
    snr_db: tuple[float, float] = (15.0, 40.0)  # white background noise
    n_fft: int = 512  # 23 ms at 22,050 Hz
    hop: int = 441  # 20 ms
    n_mels: int = 40
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({**asdict(self), "version": FEATURE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Utterance:
    digits: list[int]  # 0..9
    voice: str  # "en-us+Alex"
    rate: int
    pitch: int
    pitch_range: int
    word_gap: int
    lead: float  # seconds of silence before and after
    trail: float
    snr_db: float

    @property
    def text(self) -> str:
        return " ".join(DIGITS[d] for d in self.digits)


def draw_utterances(config: SpeechConfig, variants: list[str]) -> tuple[list[Utterance], list[Utterance]]:
    """The training and test scripts: random digit strings, voices and speaking styles. The two draw from
    separate generators, so the test set does not change with the training set's size or settings."""
    missing = set(HELD_OUT_VOICES) - set(variants)
    if missing:
        raise RuntimeError(f"eSpeak NG lacks the held-out voice variants {sorted(missing)}")
    train_variants = [v for v in variants if v not in HELD_OUT_VOICES]

    def digits(rng: np.random.Generator, repeats: float) -> list[int]:
        drawn = [int(rng.integers(10))]
        for _ in range(int(rng.integers(config.min_digits, config.max_digits + 1)) - 1):
            drawn.append(drawn[-1] if rng.random() < repeats else int(rng.integers(10)))
        return drawn

    def draw(rng: np.random.Generator, n: int, pool: list[str], repeats: float = 0.0) -> list[Utterance]:
        return [Utterance(
            digits=digits(rng, repeats),
            voice=f"{ACCENTS[rng.integers(len(ACCENTS))]}+{pool[rng.integers(len(pool))]}",
            rate=int(rng.integers(config.rate[0], config.rate[1] + 1)),
            pitch=int(rng.integers(config.pitch[0], config.pitch[1] + 1)),
            pitch_range=int(rng.integers(config.pitch_range[0], config.pitch_range[1] + 1)),
            word_gap=int(rng.integers(config.word_gap[0], config.word_gap[1] + 1)),
            lead=float(rng.uniform(0, config.pause)), trail=float(rng.uniform(0, config.pause)),
            snr_db=float(rng.uniform(*config.snr_db))) for _ in range(n)]

    return (draw(np.random.default_rng([config.seed, 0]), config.train_utterances, train_variants,
                 config.train_repeats),
            draw(np.random.default_rng([config.seed, 1]), config.test_utterances, list(HELD_OUT_VOICES)))


def render(utterance: Utterance, engine: ESpeak, seed: int | list[int]) -> np.ndarray:
    """Synthesise one utterance with its pauses and background noise (drawn from ``seed``): ``(samples,)``
    float32 in [-1, 1]. The length is a function of the arguments; the samples nearly so (eSpeak NG keeps
    some state from one synthesis to the next, which changes parts of the waveform by a few percent)."""
    rng = np.random.default_rng(seed)
    speech = engine.synthesize(utterance.text, utterance.voice, utterance.rate, utterance.pitch,
                               utterance.pitch_range, utterance.word_gap).astype(np.float32) / 32768.0
    sr = engine.sample_rate
    audio = np.concatenate([np.zeros(int(utterance.lead * sr), np.float32), speech,
                            np.zeros(int(utterance.trail * sr), np.float32)])
    voiced = speech[np.abs(speech) > 1e-3]  # the noise level is set against the speech, not its pauses
    power = float(np.mean(voiced ** 2)) if len(voiced) else 1e-4
    noise = rng.standard_normal(len(audio), dtype=np.float32) * np.sqrt(power / 10 ** (utterance.snr_db / 10))
    return audio + noise


def log_mel(audio: list[np.ndarray], sample_rate: int, config: SpeechConfig, batch_size: int = 64
            ) -> list[np.ndarray]:
    """Log-mel spectrograms: each ``(samples,)`` float32 -> ``(frames, n_mels)`` float32, with ``frames =
    1 + samples // hop`` (centred frames). torch's STFT in batches, librosa's (Slaney) mel filterbank."""
    try:
        import librosa
        import torch
    except ImportError as error:
        raise MissingExtra(f"the speech features need torch and librosa ({error}): pip install -e "
                           "'.[torch,demo]'") from error
    mel = torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=config.n_fft, n_mels=config.n_mels,
                                               fmin=30.0, fmax=8000.0))  # (n_mels, n_fft // 2 + 1)
    window = torch.hann_window(config.n_fft)
    features: list[np.ndarray] = [np.zeros(0)] * len(audio)
    order = np.argsort([len(a) for a in audio])  # similar lengths together: little padding per batch
    for start in range(0, len(audio), batch_size):
        chunk = order[start:start + batch_size]
        # Each signal is centred (reflected at its own ends) before the batch is padded, so that its frames
        # do not depend on which other signals share its batch.
        centred = [np.pad(audio[i], config.n_fft // 2, mode="reflect") for i in chunk]
        padded = torch.zeros(len(chunk), max(len(c) for c in centred))
        for row, c in enumerate(centred):
            padded[row, :len(c)] = torch.from_numpy(c)
        spectrum = torch.stft(padded, config.n_fft, config.hop, window=window, center=False, return_complex=True)
        energies = torch.log(mel @ spectrum.abs().square() + 1e-6).transpose(1, 2)  # (B, frames, n_mels)
        for row, i in enumerate(chunk):
            features[i] = energies[row, :1 + len(audio[i]) // config.hop].numpy()
    return features


@dataclass
class SpeechData:
    train: Corpus
    test: Corpus
    test_utterances: list[Utterance]
    sample_rate: int
    config: SpeechConfig
    seconds_of_audio: float
    cached: bool  # True when read from the cache
    mean: np.ndarray  # (n_mels,) float32: features are (log-mel - mean) / std
    std: np.ndarray


def _cache_path(cache_dir: Path, config: SpeechConfig) -> Path:
    return cache_dir / f"spoken-digits-{config.key()}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnt_xla"


def load_or_build(config: SpeechConfig, cache_dir: Path | None = None,
                  on_utterance: Callable[[int, int], None] | None = None) -> SpeechData:
    """The spoken-digit corpus: from the cache, or synthesised (``on_utterance(done, total)`` after each
    utterance) and cached. Training features are normalised per mel band; the test set uses the training
    statistics and is padded to the training set's frame count."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = _cache_path(cache_dir, config)
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            arrays = dict(stored)
        meta = json.loads(str(arrays.pop("meta")))
        cached = True
    else:
        arrays, meta = _build(config, on_utterance)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(partial, meta=np.array(json.dumps(meta)), **arrays)
        partial.replace(path)  # atomic: a killed run leaves no half-written cache
        cached = False
    return _to_data(arrays, meta, config, cached)


def noise_seed(config: SpeechConfig, test: bool, index: int) -> list[int]:
    """The seed of the background noise of utterance ``index`` of the training or the test set."""
    return [config.seed, int(test), index]


def _build(config: SpeechConfig, on_utterance: Callable[[int, int], None] | None
           ) -> tuple[dict[str, np.ndarray], dict]:
    engine = espeak()
    train, test = draw_utterances(config, engine.variants())
    audio = []
    for i, utterance in enumerate(train + test):
        is_test = i >= len(train)
        audio.append(render(utterance, engine, noise_seed(config, is_test, i - len(train) * is_test)))
        if on_utterance is not None:
            on_utterance(i + 1, len(train) + len(test))
    features = log_mel(audio, engine.sample_rate, config)
    arrays = {"features": np.concatenate(features).astype(np.float16),  # halves the cache; plenty for log-mel
              "frames": np.array([len(f) for f in features], np.int32),
              "digits": np.array([d for u in train + test for d in u.digits], np.int8),
              "num_digits": np.array([len(u.digits) for u in train + test], np.int32)}
    meta = {"sample_rate": engine.sample_rate, "train": len(train),
            "seconds_of_audio": sum(len(a) for a in audio) / engine.sample_rate,
            "utterances": [asdict(u) for u in train + test]}
    return arrays, meta


def _to_data(arrays: dict[str, np.ndarray], meta: dict, config: SpeechConfig, cached: bool) -> SpeechData:
    features = np.split(arrays["features"].astype(np.float32), np.cumsum(arrays["frames"])[:-1])
    digits = np.split(arrays["digits"].astype(np.int32), np.cumsum(arrays["num_digits"])[:-1])
    utterances = [Utterance(**u) for u in meta["utterances"]]
    n_train = meta["train"]
    stacked = np.concatenate(features[:n_train])
    mean, std = stacked.mean(axis=0), stacked.std(axis=0) + 1e-5
    features = [(f - mean) / std for f in features]
    labels = [(d + 1).tolist() for d in digits]
    speakers = [u.voice for u in utterances]
    train = Corpus.from_lists(features[:n_train], labels[:n_train], VOCAB_SIZE, speakers[:n_train])
    max_frames = max(train.max_frames, max(len(f) for f in features[n_train:]))
    if max_frames > train.max_frames:
        train = Corpus.from_lists(features[:n_train], labels[:n_train], VOCAB_SIZE, speakers[:n_train], max_frames)
    test = Corpus.from_lists(features[n_train:], labels[n_train:], VOCAB_SIZE, speakers[n_train:], max_frames)
    return SpeechData(train, test, utterances[n_train:], meta["sample_rate"], config, meta["seconds_of_audio"],
                      cached, mean, std)
