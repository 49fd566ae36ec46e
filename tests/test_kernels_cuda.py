"""The CUDA kernels (``rnnt_xla.kernels.cuda``) and the adapters' CUDA paths.

Everywhere (CI has no GPU): the module imports without touching ``numba.cuda``; every kernel compiles to PTX
for compute capabilities 9.0 and 8.0; the kernels run under the Numba CUDA simulator on tiny problems and
match the float64 reference. The simulator is enabled by ``NUMBA_ENABLE_CUDASIM=1``, which Numba reads when
it is imported, so it runs in a subprocess (:func:`simulate`, which imports this module there).

With a GPU (skipped otherwise): the same cases and larger random ones on the device, and the torch and JAX
adapters on device memory (zero-copy pointers, the caller's stream, agreement with the CPU path and with
each other).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import Problem, jax_gpu_device, random_problem, run_simulation
from rnnt_xla.kernels import cpu
from rnnt_xla.kernels import cuda as cuda_kernels
from rnnt_xla.reference import log_softmax, rnnt_loss_reference
from test_float32_extremes import EXTREMES

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed")
needs_gpu = pytest.mark.skipif(not cuda_kernels.available(), reason="no CUDA GPU")
TESTS = Path(__file__).parent


# ---------------------------------------------------------------------------------------------------------
# Cases shared by the simulator and the GPU


@dataclass(frozen=True)
class Case:
    """A small problem and the loss options; ``threads`` is the minimum block size (the simulator runs a
    Python thread per CUDA thread, so small blocks keep it fast; below V or U+1 they make threads loop)."""

    name: str
    B: int
    T: int
    U: int
    V: int
    blank: int = 0
    dtype: str = "float32"
    index_dtype: str = "int32"
    fused: bool = True
    fastemit_lambda: float = 0.0
    clamp: float = -1.0
    threads: int = 4
    extra_target_columns: int = 0
    logit_lengths: tuple[int, ...] | None = None
    target_lengths: tuple[int, ...] | None = None
    labels_equal_blank: bool = False
    masked_vocabulary: bool = False
    grad_scale: tuple[float, ...] | None = None
    device_workspace: bool = False  # pass grad_scale and betas as device arrays (the no-sync path)
    extreme: str = ""  # a key of test_float32_extremes.EXTREMES: an edit of the logits (needs T_b >= 3, U_b >= 2)
    seed: int = 0
    tags: tuple[str, ...] = field(default=())

    def problem(self) -> Problem:
        """The logits in ``dtype`` (float16 or ml_dtypes.bfloat16 for the 16-bit cases)."""
        rng = np.random.default_rng(self.seed)
        p = random_problem(rng, self.B, self.T, self.U, self.V, dtype=NUMPY_DTYPES[self.dtype], blank=self.blank,
                           extra_target_columns=self.extra_target_columns, index_dtype=np.dtype(self.index_dtype))
        if self.logit_lengths is not None:
            p.logit_lengths[:] = self.logit_lengths
        if self.target_lengths is not None:
            p.target_lengths[:] = self.target_lengths
            for b, U_b in enumerate(self.target_lengths):
                p.targets[b, :U_b] = rng.integers(0, self.V, U_b)
        if self.labels_equal_blank:
            p.targets[:, : self.U // 2] = self.blank % self.V  # blank as a label (e.g. a BOS token)
        if self.masked_vocabulary:
            p.targets[:, : self.U] = rng.integers(0, self.V // 2, (self.B, self.U))
            p.blank = 0
            p.logits[..., self.V // 2:] = -np.inf
        if self.extreme:
            EXTREMES[self.extreme](p)
        if not self.fused:
            p.logits = log_softmax(p.logits).astype(NUMPY_DTYPES[self.dtype])
        return p

    def scale(self) -> np.ndarray:
        return np.ones(self.B) if self.grad_scale is None else np.array(self.grad_scale)

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.problem()
        costs, grads = rnnt_loss_reference(p.logits.astype(np.float64), p.targets, p.logit_lengths,
                                           p.target_lengths, blank=p.blank, clamp=self.clamp, reduction="none",
                                           fused_log_softmax=self.fused, fastemit_lambda=self.fastemit_lambda)
        return costs, grads * self.scale()[:, None, None, None]


NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
HALF_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # relative rounding error of a 16-bit gradient entry

SIMULATOR_CASES = [
    Case("fused-blank-middle-fastemit-clamp", 3, 6, 4, 8, blank=3, fastemit_lambda=0.1, clamp=0.3),
    Case("logprobs-blank-first-float64-int64", 3, 5, 3, 7, blank=0, dtype="float64", index_dtype="int64",
         fused=False, threads=2, seed=1),
    Case("blank-last-as-label-wide-targets", 2, 5, 4, 6, blank=-1, index_dtype="int64", labels_equal_blank=True,
         extra_target_columns=2, threads=8, seed=2),
    Case("fused-float64-fastemit", 2, 4, 3, 5, blank=2, dtype="float64", fastemit_lambda=0.5, seed=3),
    Case("logprobs-fastemit-clamp", 2, 5, 3, 6, blank=5, fused=False, fastemit_lambda=0.01, clamp=0.05, seed=4),
    Case("padding", 3, 6, 4, 8, blank=1, logit_lengths=(6, 2, 1), target_lengths=(4, 0, 2), fastemit_lambda=0.2,
         clamp=0.4, seed=5),
    Case("masked-vocabulary", 2, 4, 2, 8, masked_vocabulary=True, seed=6),
    Case("single-frame-no-labels", 1, 1, 0, 2, blank=1, threads=2, seed=7),
    Case("grad-scale-device-workspace", 3, 4, 3, 5, blank=4, clamp=0.1, grad_scale=(0.5, -2.0, 0.0),
         device_workspace=True, seed=8),
    Case("labels-wider-than-block", 2, 3, 6, 5, blank=2, threads=2, seed=9),
    Case("float16-fastemit-clamp", 2, 4, 3, 6, blank=1, dtype="float16", fastemit_lambda=0.1, clamp=0.2, seed=10),
    Case("bfloat16-logprobs", 2, 4, 3, 6, blank=0, dtype="bfloat16", fused=False, seed=11),
    Case("bfloat16-fused", 2, 4, 2, 5, blank=4, dtype="bfloat16", index_dtype="int64", seed=12),
    # far from 0 (test_float32_extremes): offsets, rows of one huge value, blanks no normaliser is recovered from
    Case("offset+1e5-fastemit-clamp", 2, 4, 3, 8, blank=2, fastemit_lambda=0.1, clamp=0.3, logit_lengths=(4, 3),
         target_lengths=(3, 2), extreme="offset+100000", seed=13),
    Case("rows-float32-min", 2, 4, 3, 8, blank=-1, logit_lengths=(4, 3), target_lengths=(3, 2),
         extreme="rows-3.4e+38", seed=14),
    Case("float64-rows-float32-max", 2, 4, 3, 6, dtype="float64", index_dtype="int64", logit_lengths=(3, 4),
         target_lengths=(2, 3), extreme="rows+3.4e+38", seed=15),
    Case("bfloat16-rows-1e20", 2, 4, 3, 6, blank=1, dtype="bfloat16", logit_lengths=(4, 3), target_lengths=(3, 2),
         extreme="rows-1e+20", seed=16),
    Case("unreliable-blanks", 2, 4, 3, 8, blank=3, logit_lengths=(4, 3), target_lengths=(3, 2),
         extreme="unreliable-blanks", seed=17),
]


def run_cuda(case: Case, problem: Problem | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Costs and gradient from the CUDA kernels on Numba device arrays (a real GPU or the simulator).
    Device outputs start as NaN: every entry the kernels must write is checked to be written."""
    from numba import cuda

    p = case.problem() if problem is None else problem
    B, T, U1, V = p.logits.shape
    indices = [cuda.to_device(np.ascontiguousarray(a)) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    dtype = cuda_kernels.kernel_dtype(case.dtype)
    logits = cuda.to_device(p.logits.view(dtype))  # bfloat16 as its int16 bits
    residuals = cpu.Residuals(*(cuda.to_device(np.full(shape, np.nan, dt))
                                for shape, dt in cpu.residual_shapes(B, T, U1, dtype)))
    costs = cuda.to_device(np.full(B, np.nan, cuda_kernels.compute_dtype(dtype)))
    blank = p.blank % V
    cuda_kernels.forward(logits, *indices, blank, case.fused, case.fastemit_lambda, costs, residuals)
    grads = cuda.to_device(np.full_like(p.logits, np.nan).view(dtype))
    scale = case.scale()
    if case.device_workspace:
        betas = cuda.to_device(np.full((B, T, U1), np.nan))
        cuda_kernels.backward(logits, *indices, blank, case.fused, case.fastemit_lambda, case.clamp,
                              cuda.to_device(scale), residuals, grads, betas=betas)
        cuda.synchronize()
    else:
        cuda_kernels.backward(logits, *indices, blank, case.fused, case.fastemit_lambda, case.clamp, scale,
                              residuals, grads)
    return costs.copy_to_host(), grads.copy_to_host().view(p.logits.dtype).astype(np.float32 if dtype.itemsize < 8
                                                                                   else np.float64)


def simulate(out: str) -> None:
    """Run :data:`SIMULATOR_CASES` (and the device-view helpers) under the simulator; save the results in
    ``out`` (npz). Called in a subprocess started with ``NUMBA_ENABLE_CUDASIM=1``."""
    from numba import cuda

    assert cuda_kernels._simulating(), "simulate() needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported"
    # The simulator's block manager polls its threads while holding the GIL; a short switch interval
    # hands it over sooner (about 4x faster here).
    sys.setswitchinterval(1e-4)
    results = {}
    for case in SIMULATOR_CASES:
        cuda_kernels._MIN_THREADS = case.threads
        results[f"{case.name}/costs"], results[f"{case.name}/grads"] = run_cuda(case)
    # The adapters' device helpers: float64 stored as uint32 pairs (the JAX residuals) and a folded view.
    pairs = cuda.to_device(np.arange(6, dtype=np.float64).view(np.uint32).reshape(2, 3, 2))
    results["device_view/f64"] = cuda_kernels.device_view(pairs, (6,), np.float64).copy_to_host()
    target = cuda.to_device(np.zeros((2, 3), np.float32))
    cuda_kernels.copy_from_host(np.arange(6), cuda_kernels.device_view(target, (6,)))
    results["copy_from_host"] = cuda_kernels.to_host(target)
    empty = cuda_kernels.device_view(cuda.to_device(np.zeros((2, 3, 0), np.int32)), (6, 0))
    results["device_view/empty"] = np.array(empty.shape)
    np.savez(out, **results)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    results = run_simulation("test_kernels_cuda", tmp_path_factory.mktemp("cudasim") / "results.npz")
    print(f"simulator: {len(SIMULATOR_CASES)} cases in {time.perf_counter() - start:.1f} s")
    return results


def check_against_reference(case: Case, costs: np.ndarray, grads: np.ndarray, *, cost_rtol=None, grad_atol=None):
    ref_costs, ref_grads = case.reference()
    f64 = case.dtype == "float64"
    np.testing.assert_allclose(costs, ref_costs, rtol=cost_rtol or (1e-12 if f64 else 1e-5))
    if case.dtype in HALF_EPS:  # computed in float32 on the 16-bit inputs, then each entry rounded once
        assert np.all(np.abs(grads - ref_grads) <= HALF_EPS[case.dtype] * np.abs(ref_grads) + 1e-6)
    else:
        np.testing.assert_allclose(grads, ref_grads, atol=grad_atol or (1e-12 if f64 else 1e-5), rtol=0)
    p = case.problem()
    for b in range(case.B):  # padding: exactly zero (not merely small), and no entry left unwritten
        T_b, U_b = p.logit_lengths[b], p.target_lengths[b]
        assert np.all(grads[b, T_b:] == 0) and np.all(grads[b, :, U_b + 1:] == 0)
    assert not np.isnan(grads).any()


@needs_numba_cuda
@pytest.mark.parametrize("case", SIMULATOR_CASES, ids=lambda c: c.name)
def test_simulator_matches_reference(simulated, case):
    check_against_reference(case, simulated[f"{case.name}/costs"], simulated[f"{case.name}/grads"])


@needs_numba_cuda
def test_simulator_device_helpers(simulated):
    np.testing.assert_array_equal(simulated["device_view/f64"], np.arange(6.0))
    np.testing.assert_array_equal(simulated["copy_from_host"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(simulated["device_view/empty"], [6, 0])


# ---------------------------------------------------------------------------------------------------------
# Without a GPU: import and PTX


def test_import_needs_neither_numba_cuda_nor_a_gpu():
    script = ("import sys; import rnnt_xla.kernels.cuda as k, rnnt_xla.torch, rnnt_xla.jax; "
              "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported eagerly'; print(k.__name__)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


@needs_numba_cuda
@pytest.mark.parametrize("dtype,index_dtype,cc", [
    ("float32", "int32", (9, 0)), ("float32", "int32", (8, 0)), ("float64", "int64", (9, 0)),
    ("float64", "int64", (8, 0)), ("float16", "int32", (9, 0)), ("bfloat16", "int64", (8, 0)),
], ids=lambda v: f"sm_{v[0]}{v[1]}" if isinstance(v, tuple) else v)
def test_every_kernel_compiles_to_ptx(cc, dtype, index_dtype):
    ptx = cuda_kernels.compile_ptx(cuda_kernels.kernel_dtype(dtype), np.dtype(index_dtype), cc)
    assert sorted(ptx) == sorted(["log_normalizers", "alphas_and_costs", "betas", "gradients"])
    for name, code in ptx.items():
        assert f".target sm_{cc[0]}{cc[1]}" in code, name
        assert ".entry" in code, name
    # the row kernels reduce through shared memory and synchronise; the wavefront synchronises per diagonal
    assert ".shared" in ptx["log_normalizers"] and "bar.sync" in ptx["log_normalizers"]
    assert "bar.sync" in ptx["alphas_and_costs"] and "bar.sync" in ptx["betas"]


def test_unsupported_dtype_is_refused_before_compiling():
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        cuda_kernels.kernel_dtype("int8")
    with pytest.raises(TypeError, match="float32, float64, float16 or int16"):
        cuda_kernels._kernels(np.dtype(np.uint16))


# ---------------------------------------------------------------------------------------------------------
# On a GPU


def _random_cases(n: int) -> list[Case]:
    rng = np.random.default_rng(11)
    cases = []
    for i in range(n):
        B, T, U = int(rng.integers(1, 9)), int(rng.integers(1, 41)), int(rng.integers(0, 16))
        V = int(rng.integers(2, 700))
        cases.append(Case(f"random{i}", B, T, U, V, blank=[0, V - 1, V // 2, -1][i % 4],
                          dtype=["float32", "float64", "float16", "bfloat16"][(i // 4) % 4],
                          index_dtype=["int32", "int64"][(i // 2) % 2],
                          fused=i % 5 != 4, fastemit_lambda=[0.0, 0.01, 0.5][i % 3],
                          clamp=[-1.0, 0.05, 0.5][(i // 3) % 3], threads=32, extra_target_columns=i % 3, seed=i))
    return cases


@needs_gpu
@pytest.mark.parametrize("case", SIMULATOR_CASES + _random_cases(30), ids=lambda c: c.name)
def test_gpu_matches_reference(monkeypatch, case):
    monkeypatch.setattr(cuda_kernels, "_MIN_THREADS", case.threads)  # the simulator's block sizes, for real
    costs, grads = run_cuda(case)
    check_against_reference(case, costs, grads, grad_atol=1e-4 if case.dtype == "float32" else None)


@needs_gpu
def test_gpu_matches_cpu_kernels_on_a_large_batch():
    case = Case("large", 8, 120, 30, 1024, blank=0, fastemit_lambda=0.01, clamp=-1.0, threads=32)
    p = case.problem()
    costs, grads = run_cuda(case, p)
    B, T, U1, V = p.logits.shape
    idx = [np.ascontiguousarray(a, dtype=np.int64) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    residuals = cpu.allocate_residuals(B, T, U1, p.logits.dtype)
    cpu_costs = np.empty(B, p.logits.dtype)
    cpu.forward(p.logits, *idx, 0, True, 0.01, cpu_costs, residuals)
    cpu_grads = np.empty_like(p.logits)
    cpu.backward(p.logits, *idx, 0, True, 0.01, -1.0, np.ones(B), residuals, cpu_grads)
    np.testing.assert_allclose(costs, cpu_costs, rtol=1e-5)
    np.testing.assert_allclose(grads, cpu_grads, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The adapters on a GPU


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not cuda_kernels.available():
        pytest.skip("no CUDA build of torch or no GPU")
    return torch


def _jax_gpu():
    return pytest.importorskip("jax"), jax_gpu_device()


TORCH_CASE = Case("adapters", 3, 20, 6, 50, blank=7, fastemit_lambda=0.01, clamp=0.5, threads=32)


def test_torch_cuda_matches_reference_and_cpu():
    torch = _torch_cuda()
    from rnnt_xla.torch import rnnt_loss

    p = TORCH_CASE.problem()
    for reduction in ("none", "mean", "mean_by_target_length"):
        results = {}
        for device in ("cpu", "cuda"):
            x = torch.from_numpy(p.logits).to(device).requires_grad_()
            args = [torch.from_numpy(a).to(device) for a in (p.targets, p.logit_lengths, p.target_lengths)]
            loss = rnnt_loss(x, *args, blank=p.blank, reduction=reduction, clamp=0.5, fastemit_lambda=0.01)
            assert loss.device.type == device
            loss.sum().backward()
            assert x.grad.device.type == device
            results[device] = loss.detach().cpu().numpy(), x.grad.cpu().numpy()
        np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-5)
        np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], atol=1e-6)
    costs, grads = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=p.blank,
                                       clamp=0.5, reduction="mean_by_target_length", fastemit_lambda=0.01)
    np.testing.assert_allclose(results["cuda"][0], costs, rtol=1e-5)
    np.testing.assert_allclose(results["cuda"][1], grads, atol=1e-5)


@pytest.mark.parametrize("half", sorted(HALF_EPS))
def test_torch_cuda_half_precision_matches_reference(half):
    torch = _torch_cuda()
    from rnnt_xla.torch import rnnt_loss

    case = Case(f"torch-{half}", 3, 20, 6, 50, blank=7, dtype=half, fastemit_lambda=0.01, clamp=0.5)
    p = case.problem()
    x = torch.from_numpy(p.logits.astype(np.float32)).to(getattr(torch, half)).cuda().requires_grad_()
    args = [torch.from_numpy(a).cuda() for a in (p.targets, p.logit_lengths, p.target_lengths)]
    loss = rnnt_loss(x, *args, blank=p.blank, reduction="none", clamp=0.5, fastemit_lambda=0.01)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == getattr(torch, half)
    check_against_reference(case, loss.detach().cpu().numpy(), x.grad.float().cpu().numpy())


def test_torch_cuda_is_zero_copy_on_the_current_stream(monkeypatch):
    torch = _torch_cuda()
    from rnnt_xla.torch import rnnt_loss

    p = TORCH_CASE.problem()
    x = torch.from_numpy(p.logits).cuda().requires_grad_()
    args = [torch.from_numpy(a).cuda() for a in (p.targets, p.logit_lengths, p.target_lengths)]
    seen = {}
    forward, backward = cuda_kernels.forward, cuda_kernels.backward

    def spy_forward(logits, *rest, stream=None):
        seen["forward"] = logits.__cuda_array_interface__["data"][0], stream
        return forward(logits, *rest, stream=stream)

    def spy_backward(logits, *rest, stream=None, betas=None):
        seen["backward"] = logits.__cuda_array_interface__["data"][0], stream
        seen["grads"] = rest[-1].__cuda_array_interface__["data"][0]
        return backward(logits, *rest, stream=stream, betas=betas)

    monkeypatch.setattr(cuda_kernels, "forward", spy_forward)
    monkeypatch.setattr(cuda_kernels, "backward", spy_backward)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loss = rnnt_loss(x, *args, blank=p.blank)
        loss.backward()
    torch.cuda.synchronize()
    assert seen["forward"] == (x.data_ptr(), side.cuda_stream)
    assert seen["backward"] == (x.data_ptr(), side.cuda_stream)
    assert seen["grads"] == x.grad.data_ptr()


def test_jax_gpu_matches_reference_and_is_zero_copy(monkeypatch):
    jax, gpu = _jax_gpu()
    from rnnt_xla.jax import rnnt_loss

    p = TORCH_CASE.problem()
    inputs = [jax.device_put(a, gpu) for a in (p.logits, p.targets, p.logit_lengths, p.target_lengths)]
    seen = {}
    forward, backward = cuda_kernels.forward, cuda_kernels.backward

    def spy_forward(logits, *rest):
        seen["forward"] = logits.__cuda_array_interface__["data"][0]
        return forward(logits, *rest)

    def spy_backward(logits, *rest):
        seen["backward"] = logits.__cuda_array_interface__["data"][0]
        seen["grads"] = rest[-2].__cuda_array_interface__["data"][0]  # (..., grads, stream)
        return backward(logits, *rest)

    monkeypatch.setattr(cuda_kernels, "forward", spy_forward)
    monkeypatch.setattr(cuda_kernels, "backward", spy_backward)

    def loss_fn(x):
        return rnnt_loss(x, *inputs[1:], blank=p.blank, reduction="mean_by_target_length", clamp=0.5,
                         fastemit_lambda=0.01)

    for fn in (jax.value_and_grad(loss_fn), jax.jit(jax.value_and_grad(loss_fn))):
        loss, grad = fn(inputs[0])
        assert seen["forward"] == seen["backward"] == inputs[0].unsafe_buffer_pointer()
        assert seen["grads"] == grad.unsafe_buffer_pointer()
        costs, grads = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=p.blank,
                                           clamp=0.5, reduction="mean_by_target_length", fastemit_lambda=0.01)
        np.testing.assert_allclose(np.asarray(loss), costs, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), grads, atol=1e-5)


def test_jax_gpu_vmap_and_bad_labels():
    jax, gpu = _jax_gpu()
    from rnnt_xla.jax import rnnt_loss

    p = TORCH_CASE.problem()
    logits = jax.device_put(np.stack([p.logits, p.logits[:, :, :, ::-1].copy()]), gpu)
    rest = [jax.device_put(a, gpu) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    losses = jax.vmap(lambda x: rnnt_loss(x, *rest, blank=p.blank, reduction="none"))(logits)
    for i in range(2):
        costs, _ = rnnt_loss_reference(np.asarray(logits[i]), p.targets, p.logit_lengths, p.target_lengths,
                                       blank=p.blank, reduction="none")
        np.testing.assert_allclose(np.asarray(losses[i]), costs, rtol=1e-5)
    bad = np.array(p.targets)
    bad[0, 0] = p.logits.shape[-1] + 3
    jitted = jax.jit(lambda x, t: rnnt_loss(x, t, *rest[1:], blank=p.blank))
    with pytest.raises(jax.errors.JaxRuntimeError, match="targets must hold labels"):
        jitted(logits[0], jax.device_put(bad, gpu)).block_until_ready()


def test_torch_and_jax_agree_bit_for_bit_on_the_gpu():
    torch = _torch_cuda()
    jax, gpu = _jax_gpu()
    from rnnt_xla.jax import rnnt_loss as jax_loss
    from rnnt_xla.torch import rnnt_loss as torch_loss

    p = TORCH_CASE.problem()
    options = dict(blank=p.blank, reduction="mean", clamp=0.5, fastemit_lambda=0.01)
    x = torch.from_numpy(p.logits).cuda().requires_grad_()
    loss = torch_loss(x, *[torch.from_numpy(a).cuda() for a in (p.targets, p.logit_lengths, p.target_lengths)],
                      **options)
    loss.backward()
    inputs = [jax.device_put(a, gpu) for a in (p.logits, p.targets, p.logit_lengths, p.target_lengths)]
    value, grad = jax.value_and_grad(lambda z: jax_loss(z, *inputs[1:], **options))(inputs[0])
    np.testing.assert_array_equal(np.asarray(value), loss.detach().cpu().numpy())
    np.testing.assert_array_equal(np.asarray(grad), x.grad.cpu().numpy())
    # and the memory really is shared across the frameworks through DLPack
    shared = torch.from_dlpack(inputs[0])
    assert shared.data_ptr() == inputs[0].unsafe_buffer_pointer()
