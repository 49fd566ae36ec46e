"""The implementations the CPU benchmark compares, behind one small interface.

Each implementation is an :class:`Impl`: ``prepare(inputs)`` takes one shape's inputs (numpy arrays, shared
by everyone) and returns a :class:`Prepared` whose ``fwd_bwd()`` runs forward + backward (``reduction='mean'``,
then the gradient w.r.t. the logits) and whose ``fwd()`` runs the forward pass alone, each returning the loss
as a float once every result is ready (JAX: ``block_until_ready``). Torch implementations get tensors that
share the numpy memory; JAX implementations get device arrays (copies made once per shape, outside the timing).

All implementations see blank=0, full lengths, labels in [1, V), float32 logits, int32 indices.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

BLANK = 0

Shape = tuple[int, int, int, int]  # (B, T, U, V); logits are (B, T, U+1, V)

# Display order; the first is the one every ratio refers to.
ORDER = ["rnnt_xla_torch", "rnnt_xla_jax", "torchaudio", "plain_torch", "plain_jax", "warprnnt_numba"]
REFERENCE = "rnnt_xla_torch"
SEED = "warprnnt_numba"


@dataclass
class Inputs:
    shape: Shape
    logits: np.ndarray  # (B, T, U+1, V) float32
    targets: np.ndarray  # (B, U) int32
    logit_lengths: np.ndarray  # (B,) int32
    target_lengths: np.ndarray  # (B,) int32

    @property
    def logits_bytes(self) -> int:
        return self.logits.nbytes


def make_inputs(shape: Shape, seed: int = 0) -> Inputs:
    """Random logits and labels in [1, V) (never blank=0), full lengths; int32 because the seed requires it."""
    B, T, U, V = shape
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, U + 1, V), dtype=np.float32)
    targets = rng.integers(1, V, (B, U), dtype=np.int32)
    return Inputs(shape, logits, targets, np.full((B,), T, np.int32), np.full((B,), U, np.int32))


@dataclass
class Prepared:
    fwd_bwd: Callable[[], float]
    fwd: Callable[[], float]
    # XLA's own accounting of the compiled programs (JAX only): {"fwd_bwd": {...}, "fwd": {...}} in bytes.
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None  # drop references to per-shape buffers


@dataclass
class Impl:
    name: str
    prepare: Callable[[Inputs], Prepared]
    description: str


def load(names: list[str], threads: int, note: Callable[[str], None]) -> dict[str, Impl]:
    """Import the requested implementations, in display order; one that fails to import is skipped with a note."""
    loaders = {
        "rnnt_xla_torch": _rnnt_xla_torch,
        "rnnt_xla_jax": _rnnt_xla_jax,
        "torchaudio": _torchaudio,
        "plain_torch": _plain_torch,
        "plain_jax": _plain_jax,
        "warprnnt_numba": lambda: _seed(threads),
    }
    impls: dict[str, Impl] = {}
    for name in ORDER:
        if name not in names:
            continue
        try:
            impls[name] = loaders[name]()
        except Exception as exc:  # ImportError, or anything a half-installed package raises on import
            note(f"skipping {name}: import failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return impls


# --- torch implementations ------------------------------------------------------------------------------


def _torch_prepare(loss_fn: Callable[..., "torch.Tensor"]) -> Callable[[Inputs], Prepared]:
    """fwd_bwd: ``loss = loss_fn(...)``, ``loss.backward()`` with ``logits.grad = None`` first (every call
    allocates its gradient, as a training step after ``zero_grad(set_to_none=True)``). fwd: the same call on
    logits that do not require a gradient, under ``torch.no_grad()``."""
    import torch

    def prepare(inputs: Inputs) -> Prepared:
        logits = torch.from_numpy(inputs.logits).requires_grad_()
        plain = logits.detach()  # same memory, no autograd
        rest = [torch.from_numpy(a) for a in (inputs.targets, inputs.logit_lengths, inputs.target_lengths)]

        def fwd_bwd() -> float:
            logits.grad = None
            loss = loss_fn(logits, *rest)
            loss.backward()
            return float(loss.detach())

        def fwd() -> float:
            with torch.no_grad():
                return float(loss_fn(plain, *rest))

        def release() -> None:
            logits.grad = None

        return Prepared(fwd_bwd, fwd, release=release)

    return prepare


def _rnnt_xla_torch() -> Impl:
    from rnnt_xla.torch import rnnt_loss

    return Impl("rnnt_xla_torch", _torch_prepare(
        lambda x, y, xl, yl: rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean")),
        "rnnt_xla.torch.rnnt_loss (Numba kernels, zero-copy)")


def _plain_torch() -> Impl:
    from plain_torch import rnnt_loss_plain_torch

    return Impl("plain_torch", _torch_prepare(
        lambda x, y, xl, yl: rnnt_loss_plain_torch(x, y, xl, yl, blank=BLANK, reduction="mean")),
        "benchmarks/plain_torch.py: log_softmax + logcumsumexp per frame, autograd")


def _torchaudio() -> Impl:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchaudio 2.9 warns about its own deprecations on import and call
        import torchaudio
        import torchaudio.functional as F

    def loss(x, y, xl, yl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return F.rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean", fused_log_softmax=True)

    return Impl("torchaudio", _torch_prepare(loss),
                f"torchaudio {torchaudio.__version__} functional.rnnt_loss (C++ CPU kernel, fused log-softmax)")


def _seed(threads: int) -> Impl:
    import numba
    import warprnnt_numba

    seed_loss = warprnnt_numba.RNNTLossNumba(blank=BLANK, reduction="mean")

    def loss(*args):
        # The seed's CPU path calls numba.set_num_threads(1) on every call, which would silently make every
        # later rnnt_xla call single-threaded; restore the requested count. (Its backward only scales
        # gradients computed in forward, so forward is the only place this happens.)
        try:
            return seed_loss(*args)
        finally:
            numba.set_num_threads(threads)

    return Impl("warprnnt_numba", _torch_prepare(loss),
                "warprnnt_numba 0.4.1 RNNTLossNumba, CPU (the seed)")


# --- JAX implementations --------------------------------------------------------------------------------


def _jax_prepare(loss_fn: Callable[..., "jax.Array"]) -> Callable[[Inputs], Prepared]:
    """fwd_bwd: ``jax.jit(jax.value_and_grad(loss))``; fwd: ``jax.jit(loss)``. Both are compiled ahead of
    time once per shape (outside the timing) so that XLA's ``memory_analysis()`` of the very programs that
    run can be reported."""
    import jax
    import jax.numpy as jnp

    def prepare(inputs: Inputs) -> Prepared:
        args = [jnp.asarray(a) for a in (inputs.logits, inputs.targets, inputs.logit_lengths, inputs.target_lengths)]
        compiled = {
            "fwd_bwd": jax.jit(jax.value_and_grad(loss_fn)).lower(*args).compile(),
            "fwd": jax.jit(loss_fn).lower(*args).compile(),
        }
        memory = {key: _memory_analysis(c) for key, c in compiled.items()}

        def fwd_bwd() -> float:
            loss, grad = compiled["fwd_bwd"](*args)
            grad.block_until_ready()
            return float(loss)

        def fwd() -> float:
            return float(compiled["fwd"](*args))

        def release() -> None:
            args.clear()
            compiled.clear()

        return Prepared(fwd_bwd, fwd, memory, release)

    return prepare


def _memory_analysis(compiled) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend or version provides it
        return {}
    if stats is None:
        return {}
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.removesuffix("_size_in_bytes"): int(getattr(stats, k)) for k in keys if hasattr(stats, k)}


def _rnnt_xla_jax() -> Impl:
    from rnnt_xla.jax import rnnt_loss

    return Impl("rnnt_xla_jax", _jax_prepare(
        lambda x, y, xl, yl: rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean")),
        "rnnt_xla.jax.rnnt_loss (custom_vjp over buffer callbacks), under jax.jit")


def _plain_jax() -> Impl:
    from plain_jax import rnnt_loss_plain_jax

    return Impl("plain_jax", _jax_prepare(
        lambda x, y, xl, yl: rnnt_loss_plain_jax(x, y, xl, yl, blank=BLANK, reduction="mean")),
        "benchmarks/plain_jax.py: log_softmax + lax.scan of cumlogsumexp, jax.grad, under jax.jit")


def set_thread_environment(threads: int) -> None:
    """Thread counts for every runtime, set before any of them is imported (Numba and XLA read them once)."""
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1 and "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
