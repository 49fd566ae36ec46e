"""The JAX fused loss's GPU callbacks (``rnnt_xla.jax_fused``: ``_TileNormalisers``, ``_Lattice``, ``_Betas``,
``_TileGradients``) without a GPU.

No GPU and no CUDA JAX here, so the callbacks are called as XLA calls them, tile by tile, with simulator device
arrays standing for XLA's buffers (``FakeCUDAArray`` with a CUDA dlpack device, in a subprocess started with
``NUMBA_ENABLE_CUDASIM=1``, where the CPU kernels are switched off) and a fake ``ctx`` with a stream; the same
calls on numpy buffers take the CPU branch. Every output (normalisers, log-probabilities, loss, alphas,
log-likelihoods, betas, tile gradients) must agree, and the CPU branch's loss and assembled gradient must equal
the float64 reference: several tiles (padding rows and frames in the last ones, utterances shorter than a tile's
first frame), ragged lengths, FastEmit, clamp, every reduction, a vmapped leading axis, bfloat16 logits. The
GPU branch hands the kernels views of XLA's buffers (only the tile's lengths, labels and gradient scale and the
``B`` costs are Numba's) and checks traced lengths and labels; its new kernel specialisations compile to PTX;
with a GPU, the fused loss runs for real against the unfused one.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from conftest import jax_gpu_device, run_simulation  # noqa: E402
from rnnt_xla import jax_fused as jf  # noqa: E402
from rnnt_xla.kernels import cpu  # noqa: E402
from rnnt_xla.kernels import cuda as cuda_kernels  # noqa: E402
from rnnt_xla.reference import rnnt_loss_reference  # noqa: E402
from rnnt_xla.validation import ArraySpec, check_arguments  # noqa: E402

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed")
TESTS = Path(__file__).parent
NAN_PAIRS = 0xFFFFFFFF  # uint32 pairs of this read as float64 NaN: what the callbacks must overwrite


@dataclass(frozen=True)
class Case:
    """A small fused problem, cut into tiles of ``tile_b`` utterances by ``tile_t`` frames; ``lead``: vmapped
    leading axes (every buffer gets them, as under ``vmap_method="broadcast_all"``)."""

    name: str
    dtype: str
    frames: tuple[int, ...]
    labels: tuple[int, ...]
    T: int
    U: int
    V: int
    tile_b: int
    tile_t: int
    reduction: str
    blank: int = 0
    fastemit_lambda: float = 0.0
    clamp: float = -1.0
    lead: tuple[int, ...] = ()

    @property
    def B(self) -> int:
        return len(self.frames)

    def arrays(self) -> dict[str, np.ndarray]:
        """Logits, int32 targets (junk past each target length), lengths and the incoming gradient."""
        rng = np.random.default_rng(sum(map(ord, self.name)))
        B, U1 = self.B, self.U + 1
        targets = rng.integers(0, self.V, self.lead + (B, self.U))
        for b, length in enumerate(self.labels):
            targets[..., b, length:] = -1
        loss_shape = self.lead + ((B,) if self.reduction == "none" else ())
        compute = cpu.compute_dtype(np.dtype(self.dtype))
        return {"logits": (2 * rng.standard_normal(self.lead + (B, self.T, U1, self.V))).astype(self.dtype),
                "targets": targets.astype(np.int32),
                "frames": np.broadcast_to(np.array(self.frames, np.int32), self.lead + (B,)).copy(),
                "labels": np.broadcast_to(np.array(self.labels, np.int32), self.lead + (B,)).copy(),
                "grad_loss": rng.uniform(0.5, 1.5, loss_shape).astype(compute)}

    def options(self) -> jf._Options:
        names = ("logits", "targets", "logit_lengths", "target_lengths")
        shapes = ((self.B, self.T, self.U + 1, self.V), (self.B, self.U), (self.B,), (self.B,))
        dtypes = (self.dtype, "int32", "int32", "int32")
        shape = check_arguments(*(ArraySpec(n, s, d, "jax") for n, s, d in zip(names, shapes, dtypes)),
                                blank=self.blank, clamp=self.clamp, reduction=self.reduction, fused_log_softmax=True,
                                fastemit_lambda=self.fastemit_lambda)
        return jf._Options(shape, self.reduction, self.fastemit_lambda, self.clamp, self.tile_b, self.tile_t,
                           self.dtype, check_values=True, mean_batch=self.B)


CASES = [
    # 2 x 3 tiles: the last batch tile has a padding row, the last frame tile one frame of seven; the second
    # utterance (2 frames, no labels) is empty in every later frame tile
    Case("f64-sum-fastemit-clamp", "float64", (7, 2, 5), (3, 0, 2), T=7, U=3, V=5, tile_b=2, tile_t=3,
         reduction="sum", blank=0, fastemit_lambda=0.1, clamp=0.3),
    Case("f32-mean-blank-last", "float32", (5, 3, 4), (2, 1, 0), T=5, U=2, V=6, tile_b=3, tile_t=2,
         reduction="mean", blank=-1),
    # whole frames per tile (the gradient reads contiguous views), two vmapped instances
    Case("f64-none-vmap", "float64", (4, 3), (2, 1), T=4, U=2, V=4, tile_b=1, tile_t=4, reduction="none",
         blank=1, fastemit_lambda=0.05, lead=(2,)),
    Case("f64-mean_volume-clamp", "float64", (6, 4), (3, 2), T=6, U=3, V=5, tile_b=2, tile_t=4,
         reduction="mean_volume", blank=2, clamp=0.2),
    Case("f32-mean_by_target_length", "float32", (3, 1, 2, 3), (2, 0, 1, 2), T=3, U=2, V=4, tile_b=3, tile_t=2,
         reduction="mean_by_target_length", blank=0, fastemit_lambda=0.2),
    # 16-bit logits: the kernels see bfloat16 as its int16 bits; the gradient is rounded to bfloat16
    Case("bf16-mean", "bfloat16", (4, 2), (1, 2), T=4, U=2, V=5, tile_b=1, tile_t=3, reduction="mean", blank=4),
]
# Relative rounding error of one bfloat16 gradient entry, and its one ulp (two computations may round apart).
BF16_EPS = 2.0**-8


def assert_close(got: np.ndarray, expected: np.ndarray, dtype: str, float32_tol: float, err_msg: str = "",
                 ulps: int = 0) -> None:
    """float64: to 1e-12; float32 (and the float64 lattice from float32 sums): to ``float32_tol``; a bfloat16
    gradient (``ulps`` > 0): to ``ulps`` roundings of bfloat16 more."""
    if dtype == "float64":
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=err_msg)
    elif dtype == "bfloat16" and ulps:
        got, expected = got.astype(np.float64), expected.astype(np.float64)
        bound = ulps * BF16_EPS * np.abs(expected) + float32_tol
        assert np.all(np.abs(got - expected) <= bound), (err_msg, np.abs(got - expected).max())
    else:
        np.testing.assert_allclose(got, expected, rtol=float32_tol, atol=float32_tol, err_msg=err_msg)


def _garbage(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An output buffer as XLA may hand it over: NaN everywhere (float64 pairs: NaN bits)."""
    if np.dtype(dtype) == np.uint32:
        return np.full(shape + (2,), NAN_PAIRS, np.uint32)
    return np.full(shape, np.nan, dtype)


def _f64(pairs: np.ndarray) -> np.ndarray:
    return pairs.view(np.float64)[..., 0]


def _assemble(options: jf._Options, tiles: list[np.ndarray], lead: tuple[int, ...]) -> np.ndarray:
    """Per-tile buffers ``lead + (tile_b, tile_t, ...)`` to ``lead + (B, T, ...)`` (``jax_fused._assemble``,
    which the fused loss runs on XLA's arrays, per vmapped instance)."""
    stacked = np.stack(tiles)  # (K,) + lead + (tile_b, tile_t, ...)
    each = [np.ascontiguousarray(jf._assemble(options, stacked[(slice(None),) + i])) for i in np.ndindex(lead)]
    return np.stack(each).reshape(lead + each[0].shape)


def pipeline(case: Case, wrap) -> dict[str, np.ndarray]:
    """The fused loss's callbacks in the order its program calls them, on buffers made by ``wrap`` (numpy:
    the CPU branch; simulator device arrays: the GPU branch); their outputs, float64 pairs as float64."""
    options, a, lead = case.options(), case.arrays(), case.lead
    ctx = SimpleNamespace(stream=0)
    B, T, U1, V = a["logits"].shape[-4:]
    nb, nt = jf._tile_grid(options)
    tb, tt = options.tile_b, options.tile_t
    padded = np.zeros(lead + (nb * tb, nt * tt, U1, V), case.dtype)  # jax_fused._pad_to_grid
    padded[..., :B, :T, :, :] = a["logits"]
    compute = cpu.compute_dtype(np.dtype(case.dtype))
    indices = [a[k] for k in ("targets", "frames", "labels")]
    tiles, offsets = [], []
    pass1 = {"log_norm": [], "log_blank": [], "log_emit": []}
    for b0, t0 in np.asarray(jf._tile_offsets(options)):
        tiles.append(np.ascontiguousarray(padded[..., b0:b0 + tb, t0:t0 + tt, :, :]))
        offsets.append(np.broadcast_to(np.array([b0, t0], np.int32), lead + (2,)).copy())
        out = (_garbage(lead + (tb, tt, U1), compute), _garbage(lead + (tb, tt, U1), np.uint32),
               _garbage(lead + (tb, tt, U1), np.uint32))
        jf._TileNormalisers(options)(ctx, tuple(map(wrap, out)), *map(wrap, (tiles[-1], *indices, offsets[-1])))
        for key, value in zip(pass1, out):
            pass1[key].append(value)
    log_norm, log_blank, log_emit = (_assemble(options, v, lead) for v in pass1.values())
    loss = _garbage(lead + ((B,) if case.reduction == "none" else ()), compute)
    alphas, log_likelihood = _garbage(lead + (B, T, U1), np.uint32), _garbage(lead + (B,), np.uint32)
    jf._Lattice(options)(ctx, tuple(map(wrap, (loss, alphas, log_likelihood))),
                         *map(wrap, (log_blank, log_emit, a["frames"], a["labels"])))
    betas = _garbage(lead + (B, T, U1), np.uint32)
    jf._Betas(options)(ctx, wrap(betas), *map(wrap, (log_blank, log_emit, a["frames"], a["labels"])))
    grads = []
    for logits, offset in zip(tiles, offsets):
        grads.append(_garbage(logits.shape, case.dtype))
        jf._TileGradients(options)(ctx, wrap(grads[-1]), *map(wrap, (
            logits, *indices, offset, log_norm, log_blank, log_emit, alphas, betas, log_likelihood, a["grad_loss"])))
    return {"log_norm": log_norm, "log_blank": _f64(log_blank), "log_emit": _f64(log_emit), "loss": loss,
            "alphas": _f64(alphas), "log_likelihood": _f64(log_likelihood), "betas": _f64(betas),
            # 16-bit gradients as float32 (exact; np.savez cannot store bfloat16)
            "tile_grads": np.stack(grads).astype(compute), "grads": _assemble(options, grads, lead).astype(compute)}


def simulate(out: str) -> None:
    """The pipelines on simulated device buffers (called in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    assert cuda_kernels._simulating(), "simulate() needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported"
    sys.setswitchinterval(1e-4)  # the simulator's threads hand the GIL over sooner (see test_kernels_cuda)
    cuda_kernels._MIN_THREADS = 4

    xla_memory = []

    class Buffer(FakeCUDAArray):
        """An XLA GPU buffer: device memory (here the numpy array itself) on GPU 0."""

        def __init__(self, ary, stream=0):
            super().__init__(ary, stream)
            xla_memory.append(ary)

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA

    def in_xla_memory(array) -> bool:
        return any(np.shares_memory(array._ary, buffer) for buffer in xla_memory)

    def cpu_kernel(*args, **kwargs):
        raise AssertionError("a CPU kernel ran on GPU buffers")

    for name in ("normalise", "lattice_forward", "lattice_backward", "gradient"):
        setattr(cpu, name, cpu_kernel)
    calls, copies = [], []
    # the arrays each kernel reads and writes, but the tile's lengths, labels and gradient scale and the B costs
    xla_arguments = {"normalise": lambda a: [a[0], *a[6][:3]], "lattice_forward": lambda a: a[3][1:],
                     "lattice_backward": lambda a: [*a[2][1:3], a[3]], "gradient": lambda a: [a[0], *a[9], a[10], a[11]]}
    for name in ("normalise", "lattice_forward", "lattice_backward", "gradient"):
        def counted(*args, _kernel=getattr(cuda_kernels, name), _name=name, **kwargs):
            calls.append(_name)
            copies.extend(_name for array in xla_arguments[_name](args) if not in_xla_memory(array))
            return _kernel(*args, **kwargs)

        setattr(cuda_kernels, name, counted)
    results = {}
    for case in CASES:
        for key, value in pipeline(case, Buffer).items():
            results[f"{case.name}/{key}"] = value
    for name in ("normalise", "lattice_forward", "lattice_backward", "gradient"):
        results[f"calls/{name}"] = np.array(calls.count(name))
    results["copies"] = np.array(copies, dtype=str)
    # traced bad labels: the GPU branch checks them before a kernel reads with them
    case = CASES[0]
    a = case.arrays()
    a["targets"][0, 0] = case.V + 3
    try:
        jf._TileNormalisers(case.options())(
            SimpleNamespace(stream=0), tuple(map(Buffer, (np.zeros((2, 3, 4)), np.zeros((2, 3, 4, 2), np.uint32),
                                                          np.zeros((2, 3, 4, 2), np.uint32)))),
            *map(Buffer, (np.zeros((2, 3, 4, 5)), a["targets"], a["frames"], a["labels"], np.zeros(2, np.int32))))
        results["bad_labels"] = np.array("no error")
    except ValueError as error:
        results["bad_labels"] = np.array(str(error))
    np.savez(out, **results)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, np.ndarray]:
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    return run_simulation("test_fused_jax_cuda", tmp_path_factory.mktemp("fused_jax_cudasim") / "results.npz")


def _valid(case: Case) -> np.ndarray:
    """``lead + (B, T, U+1)``: the lattice cells of the utterances (elsewhere alphas and betas are not written)."""
    t = np.arange(case.T)[:, None]
    u = np.arange(case.U + 1)[None, :]
    cells = np.stack([(t < f) & (u <= n) for f, n in zip(case.frames, case.labels)])
    return np.broadcast_to(cells, case.lead + cells.shape)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cpu_branch_equals_the_reference(case):
    """The CPU callbacks, assembled as the fused loss assembles them, give the float64 reference's loss and
    gradient: the pipeline the GPU branch is compared against is the loss."""
    got, a = pipeline(case, lambda x: x), case.arrays()
    for i in np.ndindex(case.lead):
        costs, grads = rnnt_loss_reference(a["logits"][i], a["targets"][i], a["frames"][i], a["labels"][i],
                                           blank=case.blank, clamp=case.clamp, reduction=case.reduction,
                                           fastemit_lambda=case.fastemit_lambda)
        g = a["grad_loss"][i].astype(np.float64)
        expected = grads * (g[:, None, None, None] if case.reduction == "none" else g)
        assert_close(got["loss"][i], costs, case.dtype, 1e-6)
        assert_close(got["grads"][i], expected, case.dtype, 1e-6, ulps=1)
        assert np.abs(got["grads"][i]).max() > 0


@needs_numba_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_branch_equals_the_cpu_branch(simulated, case):
    """Every output of the GPU callbacks equals the CPU callbacks' (different kernels: float64 to 1e-12,
    float32 to its rounding), every buffer the CPU branch defines is defined, and the padding of the tiles'
    normalisers and gradients is exactly zero."""
    expected = pipeline(case, lambda x: x)
    got = {key: simulated[f"{case.name}/{key}"] for key in expected}
    valid = _valid(case)
    for key in ("loss", "log_likelihood", "log_blank", "log_emit", "tile_grads", "grads"):
        assert not np.isnan(got[key]).any(), key
        assert_close(got[key], expected[key], case.dtype, 2e-6, key, ulps=2 if "grads" in key else 0)
    for key in ("alphas", "betas"):
        assert_close(got[key][valid], expected[key][valid], case.dtype, 2e-6, key)
    # log_norm holds each row's shift: on CUDA the row's own maximum (the CPU's is its frame's first row's)
    logits = case.arrays()["logits"]
    np.testing.assert_array_equal(got["log_norm"][valid], logits.max(axis=-1)[valid])
    assert np.all(got["log_norm"][~valid] == 0) and np.all(got["log_blank"][~valid] == 0)
    for i in np.ndindex(case.lead):  # the gradient's padding: exactly zero
        for b, (frames, labels) in enumerate(zip(case.frames, case.labels)):
            assert np.all(got["grads"][i][b, frames:] == 0) and np.all(got["grads"][i][b, :, labels + 1:] == 0)


@needs_numba_cuda
def test_gpu_branch_runs_the_cuda_kernels_on_every_tile_on_xlas_buffers(simulated):
    tiles = sum(np.prod(jf._tile_grid(c.options())) * int(np.prod(c.lead)) for c in CASES)
    instances = sum(int(np.prod(c.lead)) for c in CASES)
    assert simulated["calls/normalise"] == simulated["calls/gradient"] == tiles > 2 * len(CASES)
    assert simulated["calls/lattice_forward"] == simulated["calls/lattice_backward"] == instances
    # zero-copy: every array a kernel gets (but the tile's lengths, labels and scale, the costs) views XLA's buffers
    assert simulated["copies"].tolist() == []


@needs_numba_cuda
def test_gpu_branch_checks_traced_labels(simulated):
    assert "targets must hold labels" in str(simulated["bad_labels"])


@needs_numba_cuda
def test_new_cuda_kernels_compile_to_ptx():
    """The fill kernel, and the gradient kernel on the strided views of the whole-batch lattice arrays that
    the GPU branch hands it (layout "A", not the contiguous arrays of ``kernel_signatures``)."""
    from numba import cuda, types

    cuda_kernels._numba_cuda()
    for dtype in (types.float32, types.float64):
        ptx, _ = cuda.compile_ptx(cuda_kernels._fill, (types.Array(dtype, 1, "C"), types.float64), cc=(9, 0))
        assert ".target sm_90" in ptx and ".entry" in ptx
    signature = list(cuda_kernels.kernel_signatures(np.dtype(np.float32), np.dtype(np.int32)).gradients)
    for k in range(9, 14):  # log_norm, log_blank, log_emit, alphas, betas
        assert signature[k].ndim == 3
        signature[k] = signature[k].copy(layout="A")
    kernel = cuda_kernels._python_kernels(np.dtype(np.float32)).gradients
    ptx, _ = cuda.compile_ptx(kernel, tuple(signature), cc=(9, 0))
    assert ".target sm_90" in ptx and ".entry" in ptx and "bar.sync" in ptx




def test_fused_loss_on_the_gpu_equals_the_unfused_path():
    """With a GPU: the fused loss on device arrays (several tiles) against ``rnnt_loss(joint(...))``."""
    gpu = jax_gpu_device()
    import jax.numpy as jnp

    from rnnt_xla.jax import fused_rnnt_loss, rnnt_loss

    rng = np.random.default_rng(0)
    B, T, U, E, V = 5, 9, 4, 6, 7
    params = jax.device_put({"we": rng.standard_normal((E, V)).astype(np.float32),
                             "bo": rng.standard_normal(V).astype(np.float32)}, gpu)
    enc = jax.device_put(rng.standard_normal((B, T, E)).astype(np.float32), gpu)
    pred = jax.device_put(rng.standard_normal((B, U + 1, E)).astype(np.float32), gpu)
    targets, frames, labels = (jax.device_put(x, gpu) for x in (
        rng.integers(0, V, (B, U)).astype(np.int32), np.array([9, 3, 7, 9, 1], np.int32),
        np.array([4, 0, 2, 3, 1], np.int32)))

    def joint(p, e, d):
        return jnp.tanh(e[:, :, None] + d[:, None]) @ p["we"] + p["bo"]

    options = dict(blank=0, reduction="mean", clamp=0.5, fastemit_lambda=0.1)
    fused = jax.jit(jax.value_and_grad(lambda p, e, d: fused_rnnt_loss(
        joint, p, e, d, targets, frames, labels, tile_bytes=2 * 4 * (U + 1) * V * 4, **options), argnums=(0, 1, 2)))
    unfused = jax.jit(jax.value_and_grad(lambda p, e, d: rnnt_loss(
        joint(p, e, d), targets, frames, labels, **options), argnums=(0, 1, 2)))
    (value, grads), (expected, expected_grads) = fused(params, enc, pred), unfused(params, enc, pred)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        assert a.devices() == {gpu}
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
