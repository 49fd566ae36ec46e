"""The implementations the CPU and GPU benchmarks compare, behind one small interface.

Each implementation is an :class:`Impl`: ``prepare(inputs)`` takes one shape's inputs (numpy arrays, shared
by everyone) and returns a :class:`Prepared` whose ``fwd_bwd()`` runs forward + backward (``reduction='mean'``,
then the gradient w.r.t. the logits) and whose ``fwd()`` runs the forward pass alone, each returning the loss
as a float once every result is ready (JAX: ``block_until_ready``; torch on CUDA: ``float(loss)`` waits for
the stream). On the CPU, torch implementations get tensors that share the numpy memory; on a GPU
(``load(..., device="cuda")``) the inputs are uploaded once per shape and framework and shared by that
framework's implementations (:func:`torch_arrays`, :func:`jax_arrays`); JAX implementations always get device
arrays (copies made once per shape, outside the timing).

All implementations see blank=0, full lengths, labels in [1, V), int32 indices, float32 logits (or the
``dtype`` of :func:`make_inputs`, converted on upload).
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


# Bytes per logit of each dtype the implementations may be given.
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


@dataclass
class Inputs:
    shape: Shape
    logits: np.ndarray  # (B, T, U+1, V) float32 on the host
    targets: np.ndarray  # (B, U) int32
    logit_lengths: np.ndarray  # (B,) int32
    target_lengths: np.ndarray  # (B,) int32
    dtype: str = "float32"  # the logits' dtype as the implementations get them (converted on upload)
    # Framework arrays made from the numpy ones, keyed by (framework, device): made once, shared by every
    # implementation of that framework (see torch_arrays, jax_arrays).
    device_arrays: dict[tuple[str, str], list] = field(default_factory=dict, repr=False, compare=False)

    @property
    def logits_bytes(self) -> int:
        """Size of the logits the implementations read, in their dtype."""
        return self.logits.size * ITEMSIZE[self.dtype]

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.logits, self.targets, self.logit_lengths, self.target_lengths


def make_inputs(shape: Shape, seed: int = 0, dtype: str = "float32") -> Inputs:
    """Random logits and labels in [1, V) (never blank=0), full lengths; int32 because the seed requires it.
    The host logits are float32 whatever ``dtype`` (NumPy has no bfloat16); frameworks convert on upload."""
    B, T, U, V = shape
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, U + 1, V), dtype=np.float32)
    targets = rng.integers(1, V, (B, U), dtype=np.int32)
    return Inputs(shape, logits, targets, np.full((B,), T, np.int32), np.full((B,), U, np.int32), dtype)


def torch_arrays(inputs: Inputs, device: str = "cpu") -> list["torch.Tensor"]:
    """``[logits, targets, logit_lengths, target_lengths]`` as torch tensors on ``device``, logits in
    ``inputs.dtype``. On the CPU with float32 they share the numpy memory (no copy); otherwise they are
    converted and uploaded once per ``inputs`` and reused by every torch implementation."""
    import torch

    key = ("torch", device)
    if key not in inputs.device_arrays:
        logits, *rest = [torch.from_numpy(a).to(device) for a in inputs.arrays]
        inputs.device_arrays[key] = [logits.to(getattr(torch, inputs.dtype)), *rest]
    return inputs.device_arrays[key]


def jax_arrays(inputs: Inputs, device: str = "cpu") -> list["jax.Array"]:
    """The inputs as JAX arrays, logits in ``inputs.dtype``: on the default device for ``"cpu"`` (as
    ``jnp.asarray``), on the first GPU for ``"cuda"``; copied once per ``inputs`` and framework device."""
    import jax
    import jax.numpy as jnp

    key = ("jax", device)
    if key not in inputs.device_arrays:
        if device == "cpu":
            arrays = [jnp.asarray(a) for a in inputs.arrays]
        else:
            gpu = jax.devices("gpu")[0]
            arrays = [jax.device_put(a, gpu) for a in inputs.arrays]
        # device_put/asarray copy asynchronously: wait, so that the copy is neither timed nor counted as the
        # first call's memory
        inputs.device_arrays[key] = jax.block_until_ready([arrays[0].astype(inputs.dtype), *arrays[1:]])
    return inputs.device_arrays[key]


@dataclass
class Prepared:
    fwd_bwd: Callable[[], float]
    fwd: Callable[[], float]
    # XLA's own accounting of the compiled programs (JAX only): {"fwd_bwd": {...}, "fwd": {...}} in bytes.
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    release: Callable[[], None] = lambda: None  # drop references to per-shape buffers
    # The gradient w.r.t. the logits left by the last fwd_bwd() (torch implementations), else None.
    gradient: Callable[[], object] = lambda: None


@dataclass
class Impl:
    name: str
    prepare: Callable[[Inputs], Prepared]
    description: str


def load(names: list[str], threads: int, note: Callable[[str], None], device: str = "cpu") -> dict[str, Impl]:
    """Import the requested implementations, in display order; one that fails to import, or whose framework
    cannot reach ``device`` ("cpu" or "cuda": torch without CUDA, JAX without a GPU backend), is skipped with
    a note."""
    loaders = {
        "rnnt_xla_torch": lambda: _rnnt_xla_torch(device),
        "rnnt_xla_jax": lambda: _rnnt_xla_jax(device),
        "torchaudio": lambda: _torchaudio(device),
        "plain_torch": lambda: _plain_torch(device),
        "plain_jax": lambda: _plain_jax(device),
        "warprnnt_numba": lambda: _seed(threads, device),
    }
    impls: dict[str, Impl] = {}
    for name in ORDER:
        if name not in names:
            continue
        try:
            impls[name] = loaders[name]()
        except Exception as exc:  # ImportError, anything a half-installed package raises, or no such device
            why = "import failed" if isinstance(exc, ImportError) else "not available"
            note(f"skipping {name}: {why} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return impls


# --- torch implementations ------------------------------------------------------------------------------


def _check_torch_device(device: str) -> None:
    """Raise (so that ``load`` skips the implementation with a note) when torch cannot use ``device``."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")


def _torch_prepare(loss_fn: Callable[..., "torch.Tensor"], device: str = "cpu") -> Callable[[Inputs], Prepared]:
    """fwd_bwd: ``loss = loss_fn(...)``, ``loss.backward()`` with ``logits.grad = None`` first (every call
    allocates its gradient, as a training step after ``zero_grad(set_to_none=True)``). fwd: the same call on
    logits that do not require a gradient, under ``torch.no_grad()``."""
    import torch

    _check_torch_device(device)

    def prepare(inputs: Inputs) -> Prepared:
        shared, *rest = torch_arrays(inputs, device)
        logits = shared.detach().requires_grad_()  # this implementation's own leaf, on the shared memory
        plain = shared  # same memory, no autograd

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

        return Prepared(fwd_bwd, fwd, release=release, gradient=lambda: logits.grad)

    return prepare


def _rnnt_xla_torch(device: str = "cpu") -> Impl:
    from rnnt_xla.torch import rnnt_loss

    kernels = "numba.cuda kernels" if device == "cuda" else "Numba kernels"
    return Impl("rnnt_xla_torch", _torch_prepare(
        lambda x, y, xl, yl: rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean"), device),
        f"rnnt_xla.torch.rnnt_loss ({kernels}, zero-copy)")


def _plain_torch(device: str = "cpu") -> Impl:
    from plain_torch import rnnt_loss_plain_torch

    return Impl("plain_torch", _torch_prepare(
        lambda x, y, xl, yl: rnnt_loss_plain_torch(x, y, xl, yl, blank=BLANK, reduction="mean"), device),
        "benchmarks/plain_torch.py: log_softmax + logcumsumexp per frame, autograd")


def _torchaudio(device: str = "cpu") -> Impl:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchaudio 2.9 warns about its own deprecations on import and call
        import torchaudio
        import torchaudio.functional as F

    def loss(x, y, xl, yl):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return F.rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean", fused_log_softmax=True)

    kernel = "CUDA kernel" if device == "cuda" else "C++ CPU kernel"
    return Impl("torchaudio", _torch_prepare(loss, device),
                f"torchaudio {torchaudio.__version__} functional.rnnt_loss ({kernel}, fused log-softmax)")


def _seed(threads: int, device: str = "cpu") -> Impl:
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

    return Impl("warprnnt_numba", _torch_prepare(loss, device),
                f"warprnnt_numba {_distribution_version('warprnnt-numba')} RNNTLossNumba, "
                f"{'CUDA' if device == 'cuda' else 'CPU'} (the seed)")


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


# --- JAX implementations --------------------------------------------------------------------------------


def _jax_prepare(loss_fn: Callable[..., "jax.Array"], device: str = "cpu") -> Callable[[Inputs], Prepared]:
    """fwd_bwd: ``jax.jit(jax.value_and_grad(loss))``; fwd: ``jax.jit(loss)``. Both are compiled ahead of
    time once per shape (outside the timing) so that XLA's ``memory_analysis()`` of the very programs that
    run can be reported."""
    import jax

    if device == "cuda":
        jax.devices("gpu")  # raises RuntimeError without a GPU backend: load() skips with a note

    def prepare(inputs: Inputs) -> Prepared:
        args = list(jax_arrays(inputs, device))
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


def _rnnt_xla_jax(device: str = "cpu") -> Impl:
    from rnnt_xla.jax import rnnt_loss

    return Impl("rnnt_xla_jax", _jax_prepare(
        lambda x, y, xl, yl: rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean"), device),
        "rnnt_xla.jax.rnnt_loss (custom_vjp over buffer callbacks), under jax.jit")


def _plain_jax(device: str = "cpu") -> Impl:
    from plain_jax import rnnt_loss_plain_jax

    return Impl("plain_jax", _jax_prepare(
        lambda x, y, xl, yl: rnnt_loss_plain_jax(x, y, xl, yl, blank=BLANK, reduction="mean"), device),
        "benchmarks/plain_jax.py: log_softmax + lax.scan of cumlogsumexp, jax.grad, under jax.jit")


def set_thread_environment(threads: int) -> None:
    """Thread counts for every runtime, set before any of them is imported (Numba and XLA read them once)."""
    os.environ["NUMBA_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if threads == 1 and "--xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
