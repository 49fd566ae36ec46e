"""Train a tiny RNN-Transducer on built-in synthetic data with the PyTorch and the JAX adapter.

``python -m rnnt_xla demo [--steps N] [--framework torch|jax|both]``

The task: every label ``1..K`` has a fixed random prototype vector, and an utterance is a sequence of labels,
each shown as a few noisy copies of its prototype, with noisy silence frames between some of them. The
model has to find out which label each segment shows and emit it once, without being told where segments
start or end: that alignment is what the transducer loss sums over.

The model is the smallest complete transducer: an encoder (1-D convolution + GRU) over the frames, a
prediction network (embedding + GRU) over the previous labels, started with the blank as a BOS token, and
a joiner ``Linear(tanh(enc[:, :, None] + pred[:, None]))`` that scores every (frame, label position) pair.
The same model is written once for PyTorch (:class:`TorchTransducer`) and once for Flax
(:func:`flax_transducer`); the data and the greedy decoder are shared numpy code.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from flax import linen

BLANK = 0  # label 0 is the blank; real labels are 1..num_labels
BATCH_SIZE = 64


# ----------------------------------------------------------------------------------------------- data


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
    """Label sequences rendered as noisy "acoustic" frames; deterministic given ``seed``."""

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


# ----------------------------------------------------------------------------------- greedy decoding

# The decoder only needs two functions from a model, so one implementation serves both frameworks (it
# passes the model's own arrays through untouched and reads only the joiner's numpy output):
#   predict(label, state) -> (pred (H,), state): one prediction-network step; state=None starts a sequence.
#   join(enc (H,), pred (H,)) -> logits (V,) as numpy
PredictFn = Callable[[int, Any], tuple[Any, Any]]
JoinFn = Callable[[Any, Any], np.ndarray]


def greedy_decode(encoded: Any, length: int, predict: PredictFn, join: JoinFn,
                  max_symbols_per_frame: int = 3) -> list[int]:
    """Greedy transducer decoding of one utterance.

    At each frame, emit the best non-blank label and feed it to the prediction network, until the joiner
    prefers the blank (then move to the next frame) or ``max_symbols_per_frame`` labels were emitted there
    (a guard against an untrained model emitting forever).

    Args:
        encoded: ``(T, H)`` encoder output (an array of the model's framework); only the first ``length``
            frames are read.
    """
    hypothesis: list[int] = []
    pred, state = predict(BLANK, None)  # the blank doubles as the start-of-sequence token
    for t in range(length):
        for _ in range(max_symbols_per_frame):
            label = int(np.argmax(join(encoded[t], pred)))
            if label == BLANK:
                break
            hypothesis.append(label)
            pred, state = predict(label, state)
    return hypothesis


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


# ------------------------------------------------------------------------------------------- PyTorch


def torch_transducer(vocab_size: int, feature_dim: int, hidden: int) -> torch.nn.Module:
    """A :class:`TorchTransducer` (defined here so that importing this module does not need torch)."""
    import torch
    from torch import nn

    class TorchTransducer(nn.Module):
        """Encoder, prediction network and joiner; ``forward`` gives the ``(B, T, U+1, V)`` loss input."""

        def __init__(self) -> None:
            super().__init__()
            # A width-3 convolution lets each frame see its neighbours (segment boundaries); the GRU
            # carries context along the utterance.
            self.conv = nn.Conv1d(feature_dim, hidden, kernel_size=3, padding=1)
            self.encoder = nn.GRU(hidden, hidden, batch_first=True)
            self.embed = nn.Embedding(vocab_size, hidden)
            self.predictor = nn.GRU(hidden, hidden, batch_first=True)
            self.output = nn.Linear(hidden, vocab_size)

        def encode(self, frames: torch.Tensor) -> torch.Tensor:
            """``(B, T, F)`` frames -> ``(B, T, H)``. Causal after the convolution, so padding at the end
            does not change the valid frames."""
            x = torch.relu(self.conv(frames.transpose(1, 2))).transpose(1, 2)
            return self.encoder(x)[0]

        def predict(self, previous: torch.Tensor, state: torch.Tensor | None = None):
            """``(B, U')`` previous labels -> ``(B, U', H)`` outputs and the GRU state ``(1, B, H)``."""
            return self.predictor(self.embed(previous), state)

        def join(self, encoded: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
            """Broadcasting joiner: ``(..., H)`` + ``(..., H)`` -> ``(..., V)`` unnormalised logits."""
            return self.output(torch.tanh(encoded + predicted))

        def forward(self, frames: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            """``(B, T, F)`` frames, ``(B, U)`` labels -> ``(B, T, U+1, V)`` logits."""
            # Position u of the prediction network has seen labels[:u]: prepend the blank as BOS.
            previous = torch.cat([torch.full_like(labels[:, :1], BLANK), labels], dim=1).long()
            predicted, _ = self.predict(previous)
            return self.join(self.encode(frames)[:, :, None, :], predicted[:, None, :, :])

    return TorchTransducer()


def train_torch(task: SyntheticTask, steps: int, *, batch_size: int = BATCH_SIZE, hidden: int = 64, lr: float = 1e-2,
                seed: int = 0, on_step: Callable[[int, float], None] | None = None
                ) -> tuple[torch.nn.Module, list[float]]:
    """Train the PyTorch model for ``steps`` Adam steps on fresh batches. Returns ``(model, losses)``."""
    import torch

    from rnnt_xla.torch import rnnt_loss

    torch.manual_seed(seed)
    model = torch_transducer(task.vocab_size, task.feature_dim, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    # The model's matrices are far too small for torch's intra-op threads to pay off, and on a small or
    # busy machine those threads contend with Numba's (which run the loss): one torch thread is faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            batch = task.sample(rng, batch_size)
            labels = torch.from_numpy(batch.labels)
            logits = model(torch.from_numpy(batch.frames), labels)
            loss = rnnt_loss(logits, labels, torch.from_numpy(batch.frame_lengths),
                             torch.from_numpy(batch.label_lengths), blank=BLANK, reduction="mean")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # early RNNT gradients can spike
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        torch.set_num_threads(threads)
    return model, losses


def decode_torch(model: torch.nn.Module, batch: Batch) -> list[list[int]]:
    """Greedy transducer decoding of every utterance in ``batch`` with the PyTorch model."""
    import torch

    def predict(label: int, state):
        out, state = model.predict(torch.tensor([[label]]), state)
        return out[0, 0], state

    def join(encoded, predicted):
        return model.join(encoded, predicted).numpy()

    with torch.no_grad():
        encoded = model.encode(torch.from_numpy(batch.frames))
        return [greedy_decode(encoded[b], int(n), predict, join) for b, n in enumerate(batch.frame_lengths)]


# ----------------------------------------------------------------------------------------------- JAX


def flax_transducer(vocab_size: int, hidden: int) -> linen.Module:
    """The same transducer as :class:`TorchTransducer` in Flax (linen)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    class FlaxTransducer(nn.Module):
        def setup(self) -> None:
            self.conv = nn.Conv(hidden, kernel_size=(3,), padding="SAME")
            self.encoder = nn.RNN(nn.GRUCell(hidden))
            self.embed = nn.Embed(vocab_size, hidden)
            self.predictor_cell = nn.GRUCell(hidden)
            self.predictor = nn.RNN(self.predictor_cell)  # shares the cell's weights with predict_step
            self.output = nn.Dense(vocab_size)

        def encode(self, frames: jax.Array) -> jax.Array:
            """``(B, T, F)`` frames -> ``(B, T, H)``."""
            return self.encoder(nn.relu(self.conv(frames)))

        def predict_step(self, previous: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
            """One prediction-network step (for decoding): ``(B,)`` labels and ``(B, H)`` state -> ``(B, H)``
            output and state."""
            state, out = self.predictor_cell(state, self.embed(previous))
            return out, state

        def join(self, encoded: jax.Array, predicted: jax.Array) -> jax.Array:
            """Broadcasting joiner: ``(..., H)`` + ``(..., H)`` -> ``(..., V)`` unnormalised logits."""
            return self.output(jnp.tanh(encoded + predicted))

        def __call__(self, frames: jax.Array, labels: jax.Array) -> jax.Array:
            """``(B, T, F)`` frames, ``(B, U)`` labels -> ``(B, T, U+1, V)`` logits."""
            # Position u of the prediction network has seen labels[:u]: prepend the blank as BOS.
            previous = jnp.concatenate([jnp.full_like(labels[:, :1], BLANK), labels], axis=1)
            predicted = self.predictor(self.embed(previous))
            return self.join(self.encode(frames)[:, :, None, :], predicted[:, None, :, :])

    return FlaxTransducer()


def train_jax(task: SyntheticTask, steps: int, *, batch_size: int = BATCH_SIZE, hidden: int = 64, lr: float = 1e-2,
              seed: int = 0, on_step: Callable[[int, float], None] | None = None
              ) -> tuple[linen.Module, Any, list[float]]:
    """Train the Flax model with optax for ``steps`` steps on fresh batches. Returns ``(model, params, losses)``."""
    import jax
    import optax

    from rnnt_xla.jax import rnnt_loss

    model = flax_transducer(task.vocab_size, hidden)
    shapes = np.zeros((1, task.max_frames, task.feature_dim), np.float32), np.zeros((1, task.max_labels), np.int32)
    params = model.init(jax.random.key(seed), *shapes)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, frames, labels, frame_lengths, label_lengths):
        def loss_fn(params):
            logits = model.apply(params, frames, labels)
            return rnnt_loss(logits, labels, frame_lengths, label_lengths, blank=BLANK, reduction="mean")

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)  # the same batches as train_torch
    losses = []
    for step in range(steps):
        batch = task.sample(rng, batch_size)
        params, opt_state, loss = train_step(params, opt_state, batch.frames, batch.labels,
                                             batch.frame_lengths, batch.label_lengths)
        losses.append(float(loss))
        if on_step is not None:
            on_step(step, losses[-1])
    return model, params, losses


def decode_jax(model: linen.Module, params: Any, batch: Batch) -> list[list[int]]:
    """Greedy transducer decoding of every utterance in ``batch`` with the Flax model."""
    import jax
    import jax.numpy as jnp

    # Jitted once each; the decoder then calls them per frame / label with fixed shapes.
    step = jax.jit(lambda p, label, state: model.apply(p, label, state, method="predict_step"))
    joiner = jax.jit(lambda p, enc, pred: model.apply(p, enc, pred, method="join"))

    encoded = np.asarray(model.apply(params, batch.frames, method="encode"))

    def predict(label: int, state):
        state = jnp.zeros((1, encoded.shape[-1])) if state is None else state
        out, state = step(params, jnp.array([label]), state)
        return out[0], state

    def join(encoded, predicted):
        return np.asarray(joiner(params, encoded, predicted))

    return [greedy_decode(encoded[b], int(n), predict, join) for b, n in enumerate(batch.frame_lengths)]


# --------------------------------------------------------------------------------------------- main

DEFAULT_STEPS = 400  # ~1% label error rate on held-out data in both frameworks


def _report(console, name: str, losses: list[float], seconds: float, batch: Batch,
            hypotheses: list[list[int]], shown: int = 5) -> bool:
    """Print the loss and the held-out decode; True if the loss stayed finite and fell."""
    references = batch.references()
    console.print(f"[bold]{name}[/]: loss {losses[0]:.2f} -> {losses[-1]:.2f} in {len(losses)} steps "
                  f"({seconds:.1f} s); greedy decode of {len(references)} held-out utterances, first {shown}:")
    for r, h in list(zip(references, hypotheses))[:shown]:
        mark = "[green]ok[/]" if r == h else "[red]x[/]"
        console.print(f"  ref {' '.join(map(str, r)):<16} hyp {' '.join(map(str, h)):<16} {mark}", highlight=False)
    exact = sum(r == h for r, h in zip(references, hypotheses))
    console.print(f"[bold]{name}[/]: label error rate {label_error_rate(references, hypotheses):.1%}, "
                  f"{exact}/{len(references)} utterances exact")
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def main(steps: int | None = None, framework: str = "both") -> int:
    """Train and decode with the requested framework(s); 0 if every run trained (finite, falling loss)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if framework not in ("torch", "jax", "both"):
        raise ValueError(f"framework must be 'torch', 'jax' or 'both', got {framework!r}")
    console = Console(soft_wrap=True)  # long lines stay whole when the output goes to a file or a test
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        console.print(f"[red]--steps must be at least 1, got {steps}[/]")
        return 2
    task = SyntheticTask()
    held_out = task.sample(np.random.default_rng(12345), 64)  # a seed the training batches never use
    console.print(f"Synthetic task: {task.num_labels} labels + blank, {task.min_labels}-{task.max_labels} labels "
                  f"per utterance, up to {task.max_frames} frames of {task.feature_dim} features; "
                  f"{steps} steps of {BATCH_SIZE} fresh utterances")

    runs = []
    for name, modules, extras in (("torch", ["torch"], "torch"), ("jax", ["jax", "flax", "optax"], "jax,flax")):
        if framework not in (name, "both"):
            continue
        try:
            for module in modules:
                importlib.import_module(module)
            runs.append(name)
        except ImportError as error:
            console.print(f"[yellow]{name} part skipped[/]: {error} (pip install -e '.[{extras}]')")

    ok = True
    for name in runs:
        columns = TextColumn(f"{name:>5}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}")
        # The bar is for terminals; the printed lines below also show progress in logs and pipes.
        with Progress(*columns, TimeElapsedColumn(), console=console, transient=True,
                      disable=not console.is_terminal) as progress:
            bar = progress.add_task(name, total=steps, loss="")
            every = max(1, steps // 6)

            def on_step(step: int, loss: float) -> None:
                progress.update(bar, advance=1, loss=f"loss {loss:.3f}")
                if step % every == 0 or step == steps - 1:
                    progress.console.print(f"{name:>5} step {step + 1:4d}/{steps}  loss {loss:8.3f}")

            start = time.perf_counter()
            if name == "torch":
                model, losses = train_torch(task, steps, on_step=on_step)
                seconds = time.perf_counter() - start
                hypotheses = decode_torch(model, held_out)
            else:
                model, params, losses = train_jax(task, steps, on_step=on_step)
                seconds = time.perf_counter() - start
                hypotheses = decode_jax(model, params, held_out)
        ok &= _report(console, name, losses, seconds, held_out, hypotheses)
    return 0 if ok else 1
