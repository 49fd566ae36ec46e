"""The CUDA kernels of the transducer family without a GPU: TDT (``rnnt_xla.kernels.cuda_tdt``), multi-blank
(``cuda_multiblank``) and k2's RNNT variants (``cuda_variants``: rnnt_type modified/constrained, delay_penalty).

Every kernel compiles to PTX for compute capabilities 8.0 and 9.0 in every logits dtype; the kernels run under
the Numba CUDA simulator on tiny problems (in a subprocess started with ``NUMBA_ENABLE_CUDASIM=1``, as in
``test_kernels_cuda.py``) and match the float64 references: costs and gradients, float32/float64/16-bit,
padding exactly zero, sigma, FastEmit, clamp, label_head_only (omega), gradient scales, all through
``family.cuda_forward`` / ``cuda_backward`` (the adapters' CUDA dispatch), also with one TDT omega mode per
group of the batch; and the adapters' CUDA paths on the simulated kernels: the torch operators' CUDA
registrations (torch.cuda stubbed, tensors' memory wrapped) and the JAX GPU callbacks (fake XLA buffers)
against the CPU paths. With a GPU the kernel cases run on the device.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import run_simulation
from rnnt_xla import family
from rnnt_xla.kernels import cuda as cuda_kernels
from rnnt_xla.kernels import cuda_multiblank, cuda_tdt, cuda_variants
from rnnt_xla.reference import (log_softmax, multiblank_rnnt_loss_reference, rnnt_variant_loss_reference,
                                tdt_loss_reference)

HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed")
needs_gpu = pytest.mark.skipif(not cuda_kernels.available(), reason="no CUDA GPU")
TESTS = Path(__file__).parent
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
HALF_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # relative rounding error of a 16-bit gradient entry


@dataclass(frozen=True)
class Case:
    """A tiny problem of one loss of the family and its options; ``threads`` is the minimum block size (the
    simulator runs a Python thread per CUDA thread; below ``V`` or ``U+1`` the threads loop).

    ``kind``: "tdt" (``durations`` its durations), "multiblank" (``durations`` the big blanks') or "rnnt"
    (``rnnt_type``, ``delay_penalty``: the variant kernels)."""

    name: str
    kind: str
    B: int
    T: int
    U: int
    V: int
    durations: tuple[int, ...] = ()
    blank: int = -1
    dtype: str = "float32"
    index_dtype: str = "int32"
    sigma: float = 0.0
    fastemit_lambda: float = 0.0
    clamp: float = -1.0
    label_head_only: bool = False
    rnnt_type: str = "regular"
    delay_penalty: float = 0.0
    fused: bool = True
    logit_lengths: tuple[int, ...] | None = None
    target_lengths: tuple[int, ...] | None = None
    labels_anywhere: bool = False  # multi-blank labels may be blanks too (else below the big blanks)
    grad_scale: tuple[float, ...] | None = None
    device_workspace: bool = False  # grad_scale and betas as device arrays (the no-sync path)
    zeros: bool = False  # all logits 0 (NeMo's fixed case)
    threads: int = 4
    seed: int = 0

    @property
    def width(self) -> int:
        return self.V + len(self.durations) if self.kind == "tdt" else self.V

    def spec(self) -> family.LossSpec:
        return family.LossSpec(kind=self.kind, blank=self.blank % self.V, fused_log_softmax=self.fused,
                               fastemit_lambda=self.fastemit_lambda, clamp=self.clamp, durations=self.durations,
                               sigma=self.sigma, rnnt_type=self.rnnt_type, delay_penalty=self.delay_penalty)

    def problem(self) -> tuple[np.ndarray, ...]:
        """``logits (B, T, U+1, width)`` in ``dtype``, targets (junk past each length), lengths."""
        rng = np.random.default_rng(self.seed)
        logits = (rng.standard_normal((self.B, self.T, self.U + 1, self.width)) * 2).astype(np.float64)
        if self.zeros:
            logits[:] = 0
        if not self.fused:
            logits = log_softmax(logits)
        logits = logits.astype(NUMPY_DTYPES[self.dtype])
        logit_lengths = np.array(self.logit_lengths or (self.T,) * self.B)
        target_lengths = np.array(self.target_lengths or (self.U,) * self.B)
        labels = self.V
        if self.kind == "multiblank" and not self.labels_anywhere:
            labels = self.blank % self.V - len(self.durations)
        targets = rng.integers(0, labels, (self.B, self.U))
        for b in range(self.B):
            targets[b, target_lengths[b]:] = -1
        index = np.dtype(self.index_dtype)
        return logits, targets.astype(index), logit_lengths.astype(index), target_lengths.astype(index)

    def scale(self) -> np.ndarray:
        return np.ones(self.B) if self.grad_scale is None else np.array(self.grad_scale)

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        logits, targets, logit_lengths, target_lengths = self.problem()
        args = (logits.astype(np.float64), targets, logit_lengths, target_lengths)
        common = dict(clamp=self.clamp, reduction="none", fastemit_lambda=self.fastemit_lambda)
        if self.kind == "tdt":
            costs, grads = tdt_loss_reference(*args, self.durations, blank=self.blank, sigma=self.sigma,
                                              label_head_only=self.label_head_only, **common)
        elif self.kind == "multiblank":
            costs, grads = multiblank_rnnt_loss_reference(*args, self.durations, blank=self.blank, sigma=self.sigma,
                                                          **common)
        else:
            costs, grads = rnnt_variant_loss_reference(*args, blank=self.blank, fused_log_softmax=self.fused,
                                                       rnnt_type=self.rnnt_type, delay_penalty=self.delay_penalty,
                                                       **common)
        return costs, grads * self.scale()[:, None, None, None]


CASES = [
    # TDT
    Case("tdt-float32-sigma-fastemit-clamp-padding", "tdt", 3, 5, 3, 5, (0, 1, 2, 3, 4), sigma=0.05,
         fastemit_lambda=0.1, clamp=0.3, logit_lengths=(5, 3, 2), target_lengths=(3, 1, 0)),
    Case("tdt-float64-int64-device-workspace-grad-scale", "tdt", 2, 4, 2, 4, (1, 2), blank=0, dtype="float64",
         index_dtype="int64", grad_scale=(0.5, -2.0), device_workspace=True, threads=2, seed=1),
    Case("tdt-float16-sigma", "tdt", 2, 4, 2, 5, (0, 1, 2), blank=2, dtype="float16", sigma=0.02, seed=2),
    Case("tdt-bfloat16-unreachable-cells", "tdt", 2, 5, 2, 4, (0, 2), dtype="bfloat16", logit_lengths=(4, 5),
         seed=3),
    Case("tdt-label-head-only-fastemit-clamp", "tdt", 2, 4, 2, 5, (0, 1, 2), blank=1, sigma=0.05,
         fastemit_lambda=0.2, clamp=0.2, label_head_only=True, target_lengths=(2, 1), seed=4),
    Case("tdt-no-alignment-costs-inf", "tdt", 2, 3, 1, 3, (2,), logit_lengths=(3, 2), target_lengths=(1, 0), seed=5),
    Case("tdt-wider-than-block", "tdt", 1, 3, 5, 7, (0, 1), blank=3, threads=2, seed=6),
    # NeMo's known answer: tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py,
    # TestTDTLoss.test_case_fixed_case_act_label (zero logits, durations [0, 1, 2], sigma 0.05): cost 4.155739
    Case("tdt-nemo-fixed-case", "tdt", 1, 3, 1, 4, (0, 1, 2), blank=3, sigma=0.05, zeros=True, seed=7),
    # multi-blank (NeMo's layout: big blanks just before the standard blank)
    Case("multiblank-float32-sigma-fastemit-clamp-padding", "multiblank", 3, 6, 3, 7, (2, 4), sigma=0.05,
         fastemit_lambda=0.1, clamp=0.3, logit_lengths=(6, 4, 1), target_lengths=(3, 2, 0), seed=10),
    Case("multiblank-float64-int64-labels-are-blanks-grad-scale", "multiblank", 2, 5, 3, 6, (1, 3), blank=4,
         dtype="float64", index_dtype="int64", labels_anywhere=True, grad_scale=(0.5, -2.0), device_workspace=True,
         seed=11),
    Case("multiblank-float16", "multiblank", 2, 4, 2, 6, (2,), dtype="float16", sigma=0.02, seed=12),
    Case("multiblank-bfloat16-wider-than-block", "multiblank", 1, 4, 5, 9, (2, 3, 8), dtype="bfloat16", threads=2,
         seed=13),
    # k2's variants of the RNNT lattice
    Case("modified-float32-fastemit-clamp-padding", "rnnt", 3, 5, 3, 6, rnnt_type="modified", fastemit_lambda=0.1,
         clamp=0.3, logit_lengths=(5, 3, 2), target_lengths=(3, 3, 0), seed=20),
    Case("constrained-float64-int64-delay-grad-scale", "rnnt", 2, 5, 3, 5, blank=0, dtype="float64",
         index_dtype="int64", rnnt_type="constrained", delay_penalty=0.3, grad_scale=(0.5, -2.0),
         device_workspace=True, seed=21),
    Case("regular-delay-penalty-logprobs", "rnnt", 2, 4, 3, 5, blank=2, fused=False, delay_penalty=0.5,
         fastemit_lambda=0.05, logit_lengths=(4, 2), target_lengths=(3, 2), seed=22),
    Case("regular-delay-penalty-float16", "rnnt", 2, 4, 2, 5, dtype="float16", delay_penalty=-0.2, seed=23),
    Case("constrained-bfloat16-wider-than-block", "rnnt", 1, 6, 5, 7, blank=3, dtype="bfloat16",
         rnnt_type="constrained", delay_penalty=0.1, threads=2, seed=24),
    Case("modified-fewer-frames-than-labels-costs-inf", "rnnt", 2, 3, 3, 4, rnnt_type="modified",
         logit_lengths=(3, 2), target_lengths=(2, 3), seed=25),
]
NEMO_FIXED_COST = 4.155739


def run_case(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Costs and gradient through ``family.cuda_forward`` / ``cuda_backward`` on Numba device arrays (simulator
    or GPU); outputs start as NaN so that every entry the kernels must write is checked to be written."""
    from numba import cuda

    logits, targets, logit_lengths, target_lengths = case.problem()
    B, T, U1, W = logits.shape
    dtype = cuda_kernels.kernel_dtype(case.dtype)
    spec = case.spec()
    d_logits = cuda.to_device(logits.view(dtype))
    indices = [cuda.to_device(a) for a in (targets, logit_lengths, target_lengths)]
    residuals = [cuda.to_device(np.full(shape, np.nan, dt))
                 for shape, dt in family.residual_shapes(spec, B, T, U1, dtype)]
    costs = cuda.to_device(np.full(B, np.nan, cuda_kernels.compute_dtype(dtype)))
    family.cuda_forward(spec, d_logits, *indices, costs, residuals, label_head_only=case.label_head_only)
    grads = cuda.to_device(np.full_like(logits, np.nan).view(dtype))
    if case.device_workspace:
        family.cuda_backward(spec, d_logits, *indices, cuda.to_device(case.scale()), residuals, grads,
                             betas=cuda.to_device(np.full((B, T, U1), np.nan)), label_head_only=case.label_head_only)
        cuda.synchronize()
    else:
        family.cuda_backward(spec, d_logits, *indices, case.scale(), residuals, grads,
                             label_head_only=case.label_head_only)
    wide = np.float64 if dtype == np.float64 else np.float32
    return costs.copy_to_host(), grads.copy_to_host().view(logits.dtype).astype(wide)


# The family adapters' dispatch: a batch of two groups (an omega draw each), one in each mode.
FAMILY_CASE = Case("family-two-groups", "tdt", 4, 4, 2, 4, (0, 1, 2), blank=-1, sigma=0.05, fastemit_lambda=0.1,
                      clamp=0.5, logit_lengths=(4, 3, 4, 2), target_lengths=(2, 1, 2, 0), seed=8)
FAMILY_DRAWS = np.array([0.7, 0.1])  # omega 0.5: group 0 the TDT loss, group 1 the label head's RNNT loss


def run_family(case: Case, draws: np.ndarray, omega: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``family.cuda_forward`` / ``cuda_backward`` on device arrays with one omega draw per group."""
    from numba import cuda

    logits, targets, logit_lengths, target_lengths = case.problem()
    B, T, U1, W = logits.shape
    spec = family.LossSpec(kind="tdt", blank=case.blank % case.V, fastemit_lambda=case.fastemit_lambda,
                           clamp=case.clamp, durations=case.durations, sigma=case.sigma, omega=omega)
    modes = family.label_head_only(spec, draws)
    d_logits = cuda.to_device(logits)
    indices = [cuda.to_device(a) for a in (targets, logit_lengths, target_lengths)]
    residuals = [cuda.to_device(np.zeros(shape, dt)) for shape, dt in family.residual_shapes(spec, B, T, U1,
                                                                                               logits.dtype)]
    costs = cuda.to_device(np.zeros(B, np.float32))
    family.cuda_forward(spec, d_logits, *indices, costs, residuals, label_head_only=modes)
    grads = cuda.to_device(np.zeros_like(logits))
    family.cuda_backward(spec, d_logits, *indices, case.scale(), residuals, grads,
                         betas=cuda.to_device(np.zeros((B, T, U1))), label_head_only=modes)
    cuda.synchronize()
    return costs.copy_to_host(), grads.copy_to_host()


# The torch operators' CUDA registrations (rnnt_xla.torch._loss_forward_cuda / _loss_backward_cuda) on CPU
# tensors, with torch.cuda's device and stream stubbed and the kernel modules' device-array conversion wrapping
# the tensors' memory (the simulator's arrays are numpy arrays): the same options for each kind, float64,
# B = 4 in 2 groups. (blank, clamp, reduction, fused, fastemit, groups, kind, durations, sigma, omega, draws,
# rnnt_type, delay_penalty)
TORCH_OPTIONS = {
    "tdt-omega": (-1, 0.5, "mean_by_target_length", True, 0.1, 2, "tdt", [0, 1, 2], 0.05, 0.5, (0.7, 0.1),
                  "regular", 0.0),
    "multiblank": (-1, 0.3, "sum", True, 0.0, 2, "multiblank", [2, 3], 0.05, 0.0, None, "regular", 0.0),
    "constrained-delay": (1, -1.0, "mean", True, 0.05, 2, "rnnt", [], 0.0, 0.0, None, "constrained", 0.2),
}


def torch_inputs(kind_options: tuple) -> list:
    """Float64 logits ``(4, 5, 3, width)``, int32 labels below the big blanks, lengths with padding."""
    import torch

    durations = kind_options[7]
    width = 6 + len(durations) if kind_options[6] == "tdt" else 6
    rng = np.random.default_rng(30)
    return [torch.from_numpy(rng.standard_normal((4, 5, 3, width))),
            torch.from_numpy(rng.integers(0, 3, (4, 2)).astype(np.int32)),
            torch.tensor([5, 3, 4, 2], dtype=torch.int32), torch.tensor([2, 1, 2, 0], dtype=torch.int32)]


def torch_options(name: str) -> tuple:
    import torch

    options = list(TORCH_OPTIONS[name])
    options[10] = None if options[10] is None else torch.tensor(options[10], dtype=torch.float64)
    return tuple(options)


def run_torch_registrations() -> dict[str, np.ndarray]:
    """Loss and gradient of each :data:`TORCH_OPTIONS` through the CUDA registrations (see above)."""
    import contextlib
    from types import SimpleNamespace

    import torch
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from rnnt_xla import torch as rt
    from rnnt_xla.kernels import cuda_multiblank, cuda_tdt, cuda_variants

    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: SimpleNamespace(cuda_stream=0)
    original = cuda_kernels._device

    def device(array):
        return FakeCUDAArray(array.numpy()) if isinstance(array, torch.Tensor) else original(array)

    for module in (cuda_kernels, cuda_tdt, cuda_multiblank, cuda_variants):
        module._device = device
    results = {}
    for name in TORCH_OPTIONS:
        tensors, options = torch_inputs(TORCH_OPTIONS[name]), torch_options(name)
        outputs = rt._loss_forward_cuda(*tensors, *options)
        grad_loss = torch.ones_like(outputs[0]) * 0.5
        results[f"torch/{name}/loss"] = outputs[0].numpy()
        results[f"torch/{name}/grads"] = rt._loss_backward_cuda(grad_loss, tensors[0], *outputs[1:], *options).numpy()
    return results


# The JAX adapter's GPU callbacks (rnnt_xla.jax._forward_gpu / _backward_gpu) on fake XLA buffers (simulator
# arrays with a CUDA dlpack device): float32 logits, so the float64 residuals travel as uint32 pairs.
# name -> (reduction, keyword arguments of the public loss)
JAX_OPTIONS = {
    "tdt": ("mean", dict(kind="tdt", durations=(0, 1, 2), sigma=0.05, fastemit_lambda=0.1, clamp=0.5)),
    "multiblank": ("sum", dict(kind="multiblank", durations=(2, 3), sigma=0.05)),
    "modified-delay": ("none", dict(kind="rnnt", rnnt_type="modified", delay_penalty=0.2, blank=1)),
}


def jax_inputs(name: str) -> list[np.ndarray]:
    """Float32 logits ``(3, 5, 3, width)``, int32 labels below the big blanks, lengths with padding."""
    kind, durations = JAX_OPTIONS[name][1]["kind"], JAX_OPTIONS[name][1].get("durations", ())
    width = 6 + len(durations) if kind == "tdt" else 6
    rng = np.random.default_rng(31)
    return [rng.standard_normal((3, 5, 3, width)).astype(np.float32), rng.integers(0, 3, (3, 2)).astype(np.int32),
            np.array([5, 3, 2], np.int32), np.array([2, 1, 2], np.int32)]


def run_jax_callbacks() -> dict[str, np.ndarray]:
    """Loss and gradient of each :data:`JAX_OPTIONS` through the GPU callbacks (see above)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from rnnt_xla import jax as rj
    from rnnt_xla.validation import ArraySpec, check_arguments

    class Buffer(FakeCUDAArray):
        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA, GPU 0

    results = {}
    for name, (reduction, options) in JAX_OPTIONS.items():
        arrays = jax_inputs(name)
        options = dict(dict(blank=-1, clamp=-1.0, fused_log_softmax=True, fastemit_lambda=0.0), **options)
        names = ("logits", "targets", "logit_lengths", "target_lengths")
        shape = check_arguments(*(ArraySpec(n, a.shape, a.dtype.name, "jax") for n, a in zip(names, arrays)),
                                reduction=reduction, **options)
        options.pop("blank")
        spec = family.make_spec(shape, **options)
        opts = rj._Options(shape, reduction, spec, mean_batch=shape.batch, check_values=False)
        buffers = [Buffer(a) for a in arrays]
        loss = Buffer(np.zeros(() if reduction != "none" else (3,), np.float32))
        residuals = [Buffer(np.zeros(t.shape, t.dtype)) for t in rj._residual_types(spec, arrays[0])]
        rj._forward_gpu(opts, 0, (loss, residuals), *buffers, [])
        grads = Buffer(np.zeros_like(arrays[0]))
        rj._backward_gpu(opts, 0, grads, *buffers, residuals, Buffer(np.full(loss.shape, 0.5, np.float32)), [])
        results[f"jax/{name}/loss"], results[f"jax/{name}/grads"] = loss.copy_to_host(), grads.copy_to_host()
    return results


def simulate(out: str) -> None:
    """Run the cases under the simulator and save the results in ``out`` (npz); called in a subprocess started
    with ``NUMBA_ENABLE_CUDASIM=1``."""
    assert cuda_kernels._simulating(), "simulate() needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported"
    sys.setswitchinterval(1e-4)  # the simulator's threads hand the GIL over sooner (see test_kernels_cuda)
    results = {}
    for case in CASES:
        cuda_kernels._MIN_THREADS = case.threads
        results[f"{case.name}/costs"], results[f"{case.name}/grads"] = run_case(case)
    cuda_kernels._MIN_THREADS = 4
    results["family/costs"], results["family/grads"] = run_family(FAMILY_CASE, FAMILY_DRAWS)
    results.update(run_torch_registrations())
    results.update(run_jax_callbacks())
    np.savez(out, **results)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    results = run_simulation("test_kernels_cuda_family", tmp_path_factory.mktemp("cudasim_family") / "results.npz")
    print(f"simulator: family cases in {time.perf_counter() - start:.1f} s")
    return results


def check_against_reference(case: Case, costs: np.ndarray, grads: np.ndarray, grad_atol: float | None = None):
    ref_costs, ref_grads = case.reference()
    f64 = case.dtype == "float64"
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-12 if f64 else 1e-5)
    # A modified lattice with T_b < U_b has no path (the adapters refuse it): its cost only. TDT utterances
    # without alignment get a zero gradient, checked with the rest.
    rows = np.isfinite(ref_costs) | (case.kind == "tdt")
    grads, ref_grads = grads[rows], ref_grads[rows]
    if case.dtype in HALF_EPS:  # computed in float32 (the lattice in float64), each entry rounded once
        assert np.all(np.abs(grads - ref_grads) <= HALF_EPS[case.dtype] * np.abs(ref_grads) + 1e-6)
    else:
        np.testing.assert_allclose(grads, ref_grads, atol=grad_atol or (1e-12 if f64 else 1e-5), rtol=0)
    _, _, logit_lengths, target_lengths = (a[rows] for a in case.problem())
    for b in range(len(grads)):  # padding: exactly zero, and no entry left unwritten
        assert np.all(grads[b, logit_lengths[b]:] == 0) and np.all(grads[b, :, target_lengths[b] + 1:] == 0)
    assert not np.isnan(grads).any()


@needs_numba_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_simulated_kernels_match_the_reference(simulated, case):
    check_against_reference(case, simulated[f"{case.name}/costs"], simulated[f"{case.name}/grads"])


@needs_numba_cuda
def test_simulated_known_answer_and_special_cases(simulated):
    assert float(simulated["tdt-nemo-fixed-case/costs"][0]) == pytest.approx(NEMO_FIXED_COST, rel=1e-6)
    costs = simulated["tdt-no-alignment-costs-inf/costs"]  # T_b = 3 with durations [2] only: no alignment
    assert costs[0] == np.inf and np.isfinite(costs[1])
    assert np.all(simulated["tdt-no-alignment-costs-inf/grads"][0] == 0)
    costs = simulated["modified-fewer-frames-than-labels-costs-inf/costs"]  # T_b = 2 < U_b = 3
    assert np.isfinite(costs[0]) and costs[1] == np.inf
    head = simulated["tdt-label-head-only-fastemit-clamp/grads"]
    assert np.all(head[..., 5:] == 0) and np.abs(head).max() <= 0.2  # no duration gradient; clamped


@needs_numba_cuda
def test_simulated_family_dispatch_runs_each_group_in_its_mode(simulated):
    case = FAMILY_CASE
    logits, targets, logit_lengths, target_lengths = case.problem()
    expected_costs, expected_grads = [], []
    for rows, head_only in ((slice(0, 2), False), (slice(2, 4), True)):
        costs, grads = tdt_loss_reference(logits[rows].astype(np.float64), targets[rows], logit_lengths[rows],
                                          target_lengths[rows], case.durations, blank=case.blank, sigma=case.sigma,
                                          clamp=case.clamp, reduction="none", fastemit_lambda=case.fastemit_lambda,
                                          label_head_only=head_only)
        expected_costs.append(costs)
        expected_grads.append(grads)
    np.testing.assert_allclose(simulated["family/costs"], np.concatenate(expected_costs), rtol=1e-5)
    np.testing.assert_allclose(simulated["family/grads"], np.concatenate(expected_grads), atol=1e-5, rtol=0)


@needs_numba_cuda
@pytest.mark.parametrize("name", TORCH_OPTIONS)
def test_simulated_torch_cuda_registrations_match_the_cpu_operators(simulated, name):
    """The torch operators' CUDA registrations on the simulated kernels give the CPU operators' loss and
    gradient (different kernels: equal to float64 rounding)."""
    import torch

    from rnnt_xla.torch import loss_backward, loss_forward

    tensors, options = torch_inputs(TORCH_OPTIONS[name]), torch_options(name)
    outputs = loss_forward(*tensors, *options)
    grads = loss_backward(torch.ones_like(outputs[0]) * 0.5, tensors[0], *outputs[1:], *options)
    np.testing.assert_allclose(simulated[f"torch/{name}/loss"], outputs[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(simulated[f"torch/{name}/grads"], grads.numpy(), atol=1e-12, rtol=0)
    assert np.abs(grads.numpy()).max() > 0


@needs_numba_cuda
@pytest.mark.parametrize("name", JAX_OPTIONS)
def test_simulated_jax_gpu_callbacks_match_the_cpu_adapter(simulated, name):
    """The JAX adapter's GPU callbacks on the simulated kernels give its CPU path's loss and gradient (float32,
    different kernels: to float32 rounding)."""
    jax = pytest.importorskip("jax")
    from rnnt_xla import jax as rj

    reduction, options = JAX_OPTIONS[name]
    options = dict(options)
    kind = options.pop("kind")
    durations = options.pop("durations", None)
    arrays = [jax.numpy.asarray(a) for a in jax_inputs(name)]

    def loss(x):
        if kind == "tdt":
            value = rj.tdt_loss(x, *arrays[1:], durations, reduction=reduction, **options)
        elif kind == "multiblank":
            value = rj.multiblank_rnnt_loss(x, *arrays[1:], durations, reduction=reduction, **options)
        else:
            value = rj.rnnt_loss(x, *arrays[1:], reduction=reduction, **options)
        return 0.5 * value.sum()

    value, grad = jax.value_and_grad(loss)(arrays[0])
    np.testing.assert_allclose(0.5 * simulated[f"jax/{name}/loss"].sum(), float(value), rtol=1e-5)
    np.testing.assert_allclose(simulated[f"jax/{name}/grads"], np.asarray(grad), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(grad)).max() > 0


# ---------------------------------------------------------------------------------------------------------
# PTX, without a GPU


PTX_MODULES = {"tdt": cuda_tdt, "multiblank": cuda_multiblank, "variants": cuda_variants}
PTX_KERNELS = {"tdt": ["normalizers", "alphas_and_costs", "betas", "gradients"],
               "multiblank": ["log_normalizers", "alphas_and_costs", "betas", "gradients"],
               "variants": ["alphas_and_costs", "betas", "gradients"]}  # pass 1 is cuda's (test_kernels_cuda)


@needs_numba_cuda
@pytest.mark.parametrize("module", PTX_MODULES)
@pytest.mark.parametrize("dtype,index_dtype,cc", [
    ("float32", "int32", (9, 0)), ("float64", "int64", (8, 0)), ("float16", "int32", (8, 0)),
    ("bfloat16", "int64", (9, 0)),
], ids=lambda v: f"sm_{v[0]}{v[1]}" if isinstance(v, tuple) else v)
def test_every_kernel_compiles_to_ptx(module, dtype, index_dtype, cc):
    """Every dtype of every module, each compute capability for two of them (about 3 s a set)."""
    ptx = PTX_MODULES[module].compile_ptx(cuda_kernels.kernel_dtype(dtype), np.dtype(index_dtype), cc)
    assert sorted(ptx) == sorted(PTX_KERNELS[module])
    for name, code in ptx.items():
        assert f".target sm_{cc[0]}{cc[1]}" in code and ".entry" in code, name
        assert "bar.sync" in code, name  # row reductions / the wavefront's steps / the shared row terms


def test_cuda_dispatch_picks_each_losss_module():
    modules = {spec: family._cuda_module(spec).__name__ for spec in (
        family.LossSpec(), family.LossSpec(kind="tdt", durations=(0, 1)),
        family.LossSpec(kind="multiblank", durations=(2,)), family.LossSpec(rnnt_type="modified"),
        family.LossSpec(delay_penalty=0.5))}
    assert list(modules.values()) == ["rnnt_xla.kernels.cuda", "rnnt_xla.kernels.cuda_tdt",
                                      "rnnt_xla.kernels.cuda_multiblank", "rnnt_xla.kernels.cuda_variants",
                                      "rnnt_xla.kernels.cuda_variants"]


def test_cuda_dispatch_without_a_losss_module_raises_not_implemented(monkeypatch):
    monkeypatch.setitem(family._CUDA_MODULES, "multiblank", "rnnt_xla.kernels.no_such_module")
    with pytest.raises(NotImplementedError, match="multiblank loss's CUDA kernels .* not part of this build"):
        family.cuda_forward(family.LossSpec(kind="multiblank", durations=(2,)), *[None] * 6)


# ---------------------------------------------------------------------------------------------------------
# On a GPU


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_kernels_match_the_reference(monkeypatch, case):
    monkeypatch.setattr(cuda_kernels, "_MIN_THREADS", case.threads)
    costs, grads = run_case(case)
    check_against_reference(case, costs, grads, grad_atol=1e-4 if case.dtype == "float32" else None)


@needs_gpu
def test_gpu_family_dispatch():
    costs, grads = run_family(FAMILY_CASE, FAMILY_DRAWS)
    assert np.isfinite(costs).all() and not np.isnan(grads).any()
