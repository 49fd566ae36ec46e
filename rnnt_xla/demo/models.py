"""The transducer, written once for PyTorch and once for Flax, with its training loop and greedy decoding.

The model is a small complete transducer: an encoder (width-3 convolutions, strided to subsample time,
then a GRU, bidirectional for speech) over the frames, a prediction network (embedding + GRU) over the
previous labels, started with the blank as a BOS token, and a joiner ``Linear(tanh(enc[:, :, None] +
pred[:, None]))`` that scores every (frame, label position) pair. Both frameworks get the same
initialisation scheme (Flax's defaults), the same batches, learning-rate schedule and gradient clipping;
the decoder is the shared numpy code of :mod:`rnnt_xla.demo.decoding`.
"""

from __future__ import annotations

import dataclasses

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rnnt_xla.demo.data import BLANK, Batch
from rnnt_xla.demo.decoding import greedy_alignments, greedy_tdt_alignments

if TYPE_CHECKING:
    import torch
    from flax import linen


class Task(Protocol):
    vocab_size: int
    feature_dim: int
    max_frames: int
    max_labels: int

    def sample(self, rng: np.random.Generator, batch_size: int) -> Batch: ...


@dataclass(frozen=True)
class ModelConfig:
    """Model size and training schedule (the defaults suit the synthetic task)."""

    hidden: int = 64
    strides: tuple[int, ...] = (1,)  # one width-3 convolution per entry; their product subsamples time
    bidirectional: bool = False
    batch_size: int = 64
    lr: float = 1e-2  # peak learning rate (Adam)
    warmup: int = 0  # steps of linear warm-up, then a cosine decay to final_lr * lr
    final_lr: float = 1.0  # 1.0: constant after the warm-up
    # TDT durations (frames): the joiner also scores these and training uses the TDT loss; () is RNN-T.
    durations: tuple[int, ...] = ()

    @property
    def loss(self) -> str:
        return "tdt" if self.durations else "rnnt"

    def learning_rates(self, steps: int) -> np.ndarray:
        """``(steps,)`` float32: the learning rate of every step, the same table for both frameworks."""
        step = np.arange(steps, dtype=np.float64)
        warm = np.minimum(1.0, (step + 1) / max(1, self.warmup))
        progress = np.clip((step - self.warmup) / max(1, steps - 1 - self.warmup), 0.0, 1.0)
        decay = self.final_lr + (1 - self.final_lr) * 0.5 * (1 + np.cos(math.pi * progress))
        return (self.lr * warm * decay).astype(np.float32)


# The losses the demo can train with (``--loss``): the plain loss on the joiner's full output, or the fused
# joint + loss, which never holds the (B, T', U+1, V) logits. Each framework maps these names to a function.
# "tdt" trains a Token-and-Duration Transducer: the joiner also scores TDT_DURATIONS (ModelConfig.durations).
LOSSES = ("rnnt", "fused", "tdt")
DEFAULT_LOSS = "rnnt"
TDT_DURATIONS = (0, 1, 2, 3, 4)  # frames (Parakeet-TDT's durations)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")


def config_for(loss: str, config: "ModelConfig") -> "ModelConfig":
    """``config`` for training with ``loss``: TDT needs the duration head (``TDT_DURATIONS`` unless
    ``config.durations`` is set), the other losses need a joiner without one."""
    _check_loss(loss)
    if loss == "tdt":
        return config if config.durations else dataclasses.replace(config, durations=TDT_DURATIONS)
    if config.durations:
        raise ValueError(f"loss={loss!r} trains an RNN-T joiner; config.durations={config.durations} is for 'tdt'")
    return config


def encoded_lengths(frame_lengths: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    """Frames left after the encoder's convolutions (width 3, padding 1): ``(L - 1) // s + 1`` each."""
    lengths = np.asarray(frame_lengths)
    for s in strides:
        lengths = (lengths - 1) // s + 1
    return lengths.astype(np.int32)


def tdt_available(framework: str) -> bool:
    """Whether ``rnnt_xla.<framework>`` has a working ``tdt_loss`` (``--loss tdt``): the function and its CPU
    kernels (``rnnt_xla.kernels.cpu_tdt``)."""
    import importlib
    import importlib.util

    return (hasattr(importlib.import_module(f"rnnt_xla.{framework}"), "tdt_loss")
            and importlib.util.find_spec("rnnt_xla.kernels.cpu_tdt") is not None)


# ------------------------------------------------------------------------------------------- PyTorch


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The model's matrices are far too small for torch's intra-op threads to pay off, and on a small or
    busy machine those threads contend with Numba's (which run the loss): one torch thread is faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torch_transducer(vocab_size: int, feature_dim: int, config: ModelConfig = ModelConfig()) -> torch.nn.Module:
    """A ``TorchTransducer`` (defined here so that importing this module does not need torch)."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    hidden = config.hidden

    class TorchTransducer(nn.Module):
        """Encoder, prediction network and joiner; ``forward`` gives the ``(B, T', U+1, V)`` loss input."""

        def __init__(self) -> None:
            super().__init__()
            # Width-3 convolutions let each frame see its neighbours (segment boundaries); strided ones
            # subsample time (fewer frames for the GRU and the loss). The GRU carries context along.
            self.convs = nn.ModuleList(
                nn.Conv1d(feature_dim if i == 0 else hidden, hidden, kernel_size=3, stride=s, padding=1)
                for i, s in enumerate(config.strides))
            directions = 2 if config.bidirectional else 1
            self.encoder = nn.GRU(hidden, hidden // directions, batch_first=True,
                                  bidirectional=config.bidirectional)
            self.embed = nn.Embedding(vocab_size, hidden)
            self.predictor = nn.GRU(hidden, hidden, batch_first=True)
            # TDT: the label scores, then one score per duration (the duration head).
            self.output = nn.Linear(hidden, vocab_size + len(config.durations))
            self.durations = config.durations
            self._init_like_flax()

        @torch.no_grad()
        def _init_like_flax(self) -> None:
            """Flax's default initialisation, so that both frameworks start alike: LeCun-normal input
            weights, orthogonal recurrent weights (per gate), zero biases, embeddings of deviation
            1/sqrt(H). (torch's defaults, with unit-deviation embeddings, leave training stuck on
            blanks several times longer.)"""
            for name, weight in self.named_parameters():
                if "bias" in name:
                    weight.zero_()
                elif name.startswith("embed"):
                    nn.init.normal_(weight, std=weight.shape[1] ** -0.5)
                elif "weight_hh" in name:
                    for gate in weight.chunk(3, dim=0):
                        nn.init.orthogonal_(gate)
                else:  # (out, in, ...) layouts: the fan-in is everything but the first axis
                    fan_in = weight[0].numel()
                    nn.init.trunc_normal_(weight, std=fan_in ** -0.5 / 0.8796, a=-2 * fan_in ** -0.5 / 0.8796,
                                          b=2 * fan_in ** -0.5 / 0.8796)

        def encode(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """``(B, T, F)`` frames, ``(B,)`` lengths -> ``(B, T', H)`` and ``(B,)`` int32 lengths ``T'_b``.
            The GRU reads only the valid frames (packed), so padding does not change them."""
            x = frames.transpose(1, 2)
            for conv in self.convs:
                x = torch.relu(conv(x))
            lengths = torch.from_numpy(encoded_lengths(frame_lengths.numpy(), config.strides))
            packed = pack_padded_sequence(x.transpose(1, 2), lengths.long(), batch_first=True, enforce_sorted=False)
            encoded, _ = pad_packed_sequence(self.encoder(packed)[0], batch_first=True, total_length=x.shape[2])
            return encoded, lengths

        def predict(self, previous: torch.Tensor, state: torch.Tensor | None = None):
            """``(B, U')`` previous labels -> ``(B, U', H)`` outputs and the GRU state ``(1, B, H)``."""
            return self.predictor(self.embed(previous), state)

        def join(self, encoded: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
            """Broadcasting joiner: ``(..., H)`` + ``(..., H)`` -> ``(..., V)`` unnormalised logits."""
            return self.output(torch.tanh(encoded + predicted))

        def features(self, frames: torch.Tensor, frame_lengths: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """``(B, T, F)`` frames, ``(B,)`` lengths, ``(B, U)`` labels -> the joiner's inputs: encoder output
            ``(B, T', H)``, prediction network output ``(B, U+1, H)``, and ``(B,)`` encoded lengths."""
            # Position u of the prediction network has seen labels[:u]: prepend the blank as BOS.
            previous = torch.cat([torch.full_like(labels[:, :1], BLANK), labels], dim=1).long()
            predicted, _ = self.predict(previous)
            encoded, lengths = self.encode(frames, frame_lengths)
            return encoded, predicted, lengths

        def joint(self, encoded: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
            """The joiner on ``(b, t, H)`` and ``(b, U+1, H)`` -> ``(b, t, U+1, V)`` (the fused loss's joint)."""
            return self.join(encoded[:, :, None, :], predicted[:, None, :, :])

        def forward(self, frames: torch.Tensor, frame_lengths: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
            """``(B, T, F)`` frames, ``(B,)`` lengths, ``(B, U)`` labels -> ``(B, T', U+1, V)`` logits and
            ``(B,)`` encoded lengths."""
            encoded, predicted, lengths = self.features(frames, frame_lengths, labels)
            return self.joint(encoded, predicted), lengths

    return TorchTransducer()


def _torch_loss(name: str, model: torch.nn.Module, frames: torch.Tensor, frame_lengths: torch.Tensor,
                labels: torch.Tensor, label_lengths: torch.Tensor) -> torch.Tensor:
    """The batch's mean loss by ``name`` (:data:`LOSSES`)."""
    from rnnt_xla.torch import fused_rnnt_loss, rnnt_loss, tdt_loss

    if name == "tdt":  # the joiner's last len(durations) outputs are the duration head
        logits, lengths = model(frames, frame_lengths, labels)
        return tdt_loss(logits, labels, lengths, label_lengths, list(model.durations), blank=BLANK,
                        reduction="mean")
    if name == "fused":  # the joiner runs inside the loss, one tile at a time
        encoded, predicted, lengths = model.features(frames, frame_lengths, labels)
        return fused_rnnt_loss(encoded, predicted, model.joint, labels, lengths, label_lengths, blank=BLANK,
                               reduction="mean")
    logits, lengths = model(frames, frame_lengths, labels)
    return rnnt_loss(logits, labels, lengths, label_lengths, blank=BLANK, reduction="mean")


def train_torch(task: Task, steps: int, config: ModelConfig = ModelConfig(), *, seed: int = 0,
                on_step: Callable[[int, float], None] | None = None, loss: str | None = None
                ) -> tuple[torch.nn.Module, list[float]]:
    """Train the PyTorch model for ``steps`` Adam steps on batches drawn from ``task`` with the loss named
    ``loss`` (:data:`LOSSES`). Returns ``(model, losses)``."""
    import torch

    loss = config.loss if loss is None else loss  # default: RNN-T, or TDT for a config with durations
    config = config_for(loss, config)
    torch.manual_seed(seed)
    model = torch_transducer(task.vocab_size, task.feature_dim, config)
    rates = config.learning_rates(steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(rates[0]))
    rng = np.random.default_rng(seed)
    losses = []
    with _one_torch_thread():
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = float(rates[step])
            batch = task.sample(rng, config.batch_size)
            value = _torch_loss(loss, model, torch.from_numpy(batch.frames), torch.from_numpy(batch.frame_lengths),
                                torch.from_numpy(batch.labels), torch.from_numpy(batch.label_lengths))
            optimizer.zero_grad()
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # early RNNT gradients can spike
            optimizer.step()
            losses.append(value.item())
            if on_step is not None:
                on_step(step, losses[-1])
    return model, losses


def align_torch(model: torch.nn.Module, batch: Batch) -> list[list[tuple[int, int]]]:
    """Greedy decoding of every utterance in ``batch``: ``(label, encoder frame)`` per emitted label."""
    import torch

    def predict(labels: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        out, state = model.predict(torch.from_numpy(labels[:, None]),
                                   None if state is None else torch.from_numpy(state[None]))
        return out[:, 0].numpy(), state[0].numpy()

    def join(encoded: torch.Tensor, predicted: np.ndarray) -> np.ndarray:
        return model.join(encoded, torch.from_numpy(predicted)[:, None]).numpy()

    with torch.no_grad(), _one_torch_thread():
        encoded, lengths = model.encode(torch.from_numpy(batch.frames), torch.from_numpy(batch.frame_lengths))
        if model.durations:
            return greedy_tdt_alignments(encoded, lengths.numpy(), predict, join, model.durations)
        return greedy_alignments(encoded, lengths.numpy(), predict, join)


def decode_torch(model: torch.nn.Module, batch: Batch) -> list[list[int]]:
    """Greedy transducer decoding of every utterance in ``batch`` with the PyTorch model."""
    return [[label for label, _ in emitted] for emitted in align_torch(model, batch)]


def logits_torch(model: torch.nn.Module, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T', U+1, V)`` float32 joiner output for the batch's own labels and ``(B,)`` encoded lengths."""
    import torch

    with torch.no_grad():
        logits, lengths = model(torch.from_numpy(batch.frames), torch.from_numpy(batch.frame_lengths),
                                torch.from_numpy(batch.labels))
    return logits.numpy(), lengths.numpy()


# ----------------------------------------------------------------------------------------------- JAX


def flax_transducer(vocab_size: int, config: ModelConfig = ModelConfig()) -> linen.Module:
    """The same transducer as ``TorchTransducer`` in Flax (linen)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    hidden = config.hidden

    class FlaxTransducer(nn.Module):
        def setup(self) -> None:
            self.convs = [nn.Conv(hidden, kernel_size=(3,), strides=(s,), padding=((1, 1),)) for s in config.strides]
            if config.bidirectional:
                self.encoder = nn.Bidirectional(nn.RNN(nn.GRUCell(hidden // 2)), nn.RNN(nn.GRUCell(hidden // 2)))
            else:
                self.encoder = nn.RNN(nn.GRUCell(hidden))
            self.embed = nn.Embed(vocab_size, hidden)
            self.predictor_cell = nn.GRUCell(hidden)
            self.predictor = nn.RNN(self.predictor_cell)  # shares the cell's weights with predict_step
            self.output = nn.Dense(vocab_size + len(config.durations))  # TDT: + the duration head

        def encode(self, frames: jax.Array, encoded_lengths: jax.Array) -> jax.Array:
            """``(B, T, F)`` frames, ``(B,)`` lengths after subsampling -> ``(B, T', H)``; the GRU reads only
            the valid frames."""
            x = frames
            for conv in self.convs:
                x = nn.relu(conv(x))
            return self.encoder(x, seq_lengths=encoded_lengths)

        def predict_step(self, previous: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
            """One prediction-network step (for decoding): ``(B,)`` labels and ``(B, H)`` state -> ``(B, H)``
            output and state."""
            state, out = self.predictor_cell(state, self.embed(previous))
            return out, state

        def join(self, encoded: jax.Array, predicted: jax.Array) -> jax.Array:
            """Broadcasting joiner: ``(..., H)`` + ``(..., H)`` -> ``(..., V)`` unnormalised logits."""
            return self.output(jnp.tanh(encoded + predicted))

        def features(self, frames: jax.Array, encoded_lengths: jax.Array, labels: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
            """The joiner's inputs: encoder output ``(B, T', H)`` and prediction network output ``(B, U+1, H)``."""
            # Position u of the prediction network has seen labels[:u]: prepend the blank as BOS.
            previous = jnp.concatenate([jnp.full_like(labels[:, :1], BLANK), labels], axis=1)
            return self.encode(frames, encoded_lengths), self.predictor(self.embed(previous))

        def joint(self, encoded: jax.Array, predicted: jax.Array) -> jax.Array:
            """The joiner on ``(b, t, H)`` and ``(b, U+1, H)`` -> ``(b, t, U+1, V)`` (the fused loss's joint)."""
            return self.join(encoded[:, :, None, :], predicted[:, None, :, :])

        def __call__(self, frames: jax.Array, encoded_lengths: jax.Array, labels: jax.Array) -> jax.Array:
            """``(B, T, F)`` frames, ``(B,)`` lengths after subsampling, ``(B, U)`` labels -> ``(B, T', U+1, V)``
            logits."""
            return self.joint(*self.features(frames, encoded_lengths, labels))

    return FlaxTransducer()


def train_jax(task: Task, steps: int, config: ModelConfig = ModelConfig(), *, seed: int = 0,
              on_step: Callable[[int, float], None] | None = None, loss: str | None = None
              ) -> tuple[linen.Module, Any, list[float]]:
    """Train the Flax model with optax for ``steps`` steps on the same batches as :func:`train_torch`, with
    the loss named ``loss`` (:data:`LOSSES`). Returns ``(model, params, losses)``."""
    import jax
    import jax.numpy as jnp
    import optax

    from rnnt_xla.jax import fused_rnnt_loss, rnnt_loss, tdt_loss

    loss = config.loss if loss is None else loss  # default: RNN-T, or TDT for a config with durations
    config = config_for(loss, config)

    def joint_fn(params, encoded, predicted):  # the joiner alone, for the fused loss
        return model.apply(params, encoded, predicted, method="joint")

    def batch_loss(params, frames, lengths, labels, label_lengths):
        if loss == "fused":  # the joiner runs inside the loss, one tile at a time
            encoded, predicted = model.apply(params, frames, lengths, labels, method="features")
            return fused_rnnt_loss(joint_fn, params, encoded, predicted, labels, lengths, label_lengths,
                                   blank=BLANK, reduction="mean")
        logits = model.apply(params, frames, lengths, labels)
        if loss == "tdt":  # the joiner's last len(durations) outputs are the duration head
            return tdt_loss(logits, labels, lengths, label_lengths, list(config.durations), blank=BLANK,
                            reduction="mean")
        return rnnt_loss(logits, labels, lengths, label_lengths, blank=BLANK, reduction="mean")

    model = flax_transducer(task.vocab_size, config)
    shapes = (np.zeros((1, task.max_frames, task.feature_dim), np.float32), np.ones(1, np.int32),
              np.zeros((1, task.max_labels), np.int32))
    params = model.init(jax.random.key(seed), *shapes)
    rates = jnp.asarray(config.learning_rates(steps))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adam(lambda count: rates[jnp.minimum(count, steps - 1)]))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, frames, lengths, labels, label_lengths):
        value, grads = jax.value_and_grad(batch_loss)(params, frames, lengths, labels, label_lengths)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)  # the same batches as train_torch
    losses = []
    for step in range(steps):
        batch = task.sample(rng, config.batch_size)
        lengths = encoded_lengths(batch.frame_lengths, config.strides)
        params, opt_state, value = train_step(params, opt_state, batch.frames, lengths, batch.labels,
                                              batch.label_lengths)
        losses.append(float(value))
        if on_step is not None:
            on_step(step, losses[-1])
    return model, params, losses


def align_jax(model: linen.Module, params: Any, batch: Batch, config: ModelConfig = ModelConfig()
              ) -> list[list[tuple[int, int]]]:
    """Greedy decoding of every utterance in ``batch``: ``(label, encoder frame)`` per emitted label."""
    import jax
    import jax.numpy as jnp

    # Jitted once each: the decoder calls them with the same shapes every time.
    step = jax.jit(lambda p, labels, state: model.apply(p, labels, state, method="predict_step"))
    joiner = jax.jit(lambda p, enc, pred: model.apply(p, enc, pred[:, None], method="join"))

    lengths = encoded_lengths(batch.frame_lengths, config.strides)
    encoded = model.apply(params, batch.frames, lengths, method="encode")

    def predict(labels: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        state = jnp.zeros((len(labels), config.hidden)) if state is None else state
        out, state = step(params, labels, state)
        return np.asarray(out), np.asarray(state)

    def join(encoded: jax.Array, predicted: np.ndarray) -> np.ndarray:
        return np.asarray(joiner(params, encoded, predicted))

    if config.durations:
        return greedy_tdt_alignments(encoded, lengths, predict, join, config.durations)
    return greedy_alignments(encoded, lengths, predict, join)


def decode_jax(model: linen.Module, params: Any, batch: Batch, config: ModelConfig = ModelConfig()
               ) -> list[list[int]]:
    """Greedy transducer decoding of every utterance in ``batch`` with the Flax model."""
    return [[label for label, _ in emitted] for emitted in align_jax(model, params, batch, config)]


def logits_jax(model: linen.Module, params: Any, batch: Batch, config: ModelConfig = ModelConfig()
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T', U+1, V)`` float32 joiner output for the batch's own labels and ``(B,)`` encoded lengths."""
    lengths = encoded_lengths(batch.frame_lengths, config.strides)
    return np.asarray(model.apply(params, batch.frames, lengths, batch.labels)), lengths
