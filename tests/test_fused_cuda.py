"""The fused joint + loss with the CUDA kernels (``torch_fused._CudaPasses``), run in the Numba CUDA simulator.

No GPU here: the simulator (``NUMBA_ENABLE_CUDASIM=1``, read when Numba is imported, hence a subprocess)
runs ``rnnt_xla.kernels.cuda``'s per-pass entry points on tiles and the whole fused loss with its kernel
calls sent through the CUDA passes (a subclass that hands the simulator zero-copy views of CPU tensors
instead of CUDA tensors); both must equal the CPU passes. With a GPU, the last test runs the real thing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_simulation
from rnnt_xla.kernels import cpu
from rnnt_xla.kernels import cuda as cuda_kernels
from rnnt_xla.tiling import plan_tiles
from rnnt_xla.torch import Joint, fused_rnnt_loss, rnnt_loss

TESTS = Path(__file__).parent
E, P, H, V = 5, 4, 6, 7
CASES = [  # (name, dtype, tile_bytes, options): frames split across tiles, and whole utterances per tile
    ("f64_split", torch.float64, 3 * 5 * V * 8, dict(blank=0, reduction="sum", fastemit_lambda=0.1, clamp=0.3)),
    ("f32_groups", torch.float32, 2 * 7 * 5 * V * 4, dict(blank=2, reduction="none")),
]


def problem(dtype: torch.dtype, seed: int = 0):
    """``(joint, enc, pred, targets, frames, labels)``: 3 utterances of different lengths (padding in tiles)."""
    gen = torch.Generator().manual_seed(seed)
    B, T, U = 3, 7, 4
    torch.manual_seed(seed)
    joint = Joint(E, P, H, V).to(dtype)
    enc = torch.randn(B, T, E, dtype=dtype, generator=gen).requires_grad_()
    pred = torch.randn(B, U + 1, P, dtype=dtype, generator=gen).requires_grad_()
    targets = torch.randint(0, V, (B, U), generator=gen)
    return joint, enc, pred, targets, torch.tensor([7, 4, 6]), torch.tensor([4, 2, 3])


def fused_results(dtype, tile_bytes, options) -> dict[str, np.ndarray]:
    """Loss and gradients (encoder_out, predictor_out, every joint parameter) of the fused loss."""
    joint, enc, pred, targets, frames, labels = problem(dtype)
    loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, tile_bytes=tile_bytes, **options)
    grads = torch.autograd.grad(loss.sum(), [enc, pred, *joint.parameters()])
    return {"loss": loss.detach().numpy(), **{f"grad{i}": g.numpy() for i, g in enumerate(grads)}}


def tile_passes(passes: str) -> dict[str, np.ndarray]:
    """Pass 1 and pass 4 on every tile of a frames-split plan, by the CPU or (simulated) CUDA entry points,
    each tile's lengths counted from its first frame, its betas one frame longer than the tile."""
    rng = np.random.default_rng(4)
    B, T, U = 3, 9, 3
    logits = rng.standard_normal((B, T, U + 1, V))
    targets = rng.integers(1, V, (B, U))
    frames, labels = np.array([9, 5, 7]), np.array([3, 1, 2])
    full = cpu.allocate_residuals(B, T, U + 1, logits.dtype)
    for a in full[:4]:
        a[...] = 0
    costs = np.empty(B)
    cpu.forward(logits, targets, frames, labels, 0, True, 0.0, costs, full)
    betas = np.zeros_like(full.alphas)
    cpu.lattice_backward(frames, labels, full, betas)
    out = {}
    for k, tile in enumerate(plan_tiles(frames, labels, V, 8, 4 * (U + 1) * V * 8)):  # four frames a tile
        rows, t0, t1, p = tile.utterances, tile.t0, tile.t1, tile.positions
        x = np.ascontiguousarray(logits[rows, t0:t1, :p])
        idx = [np.ascontiguousarray(a) for a in (targets[rows], frames[rows] - t0, labels[rows])]
        part = cpu.Residuals(*(np.zeros((len(rows), t1 - t0, p)) for _ in range(3)), None, None)
        tile_res = cpu.Residuals(*(np.ascontiguousarray(a[rows, t0:t1, :p]) for a in full[:4]),
                                 full.log_likelihood[rows].copy())
        tile_betas = np.zeros((len(rows), t1 - t0 + 1, p))
        end = min(t1 + 1, T)
        tile_betas[:, :end - t0] = betas[rows, t0:end, :p]
        grads = np.zeros_like(x)
        scale = np.full(len(rows), 0.5)
        if passes == "cpu":
            cpu.normalise(x, *idx, 0, True, part)
            cpu.gradient(x, *idx, 0, True, 0.0, -1.0, scale, tile_res, tile_betas, grads)
        else:
            from numba import cuda

            dev = [cuda.to_device(a) for a in (x, *idx, scale, tile_betas, grads)]
            dev_part = cpu.Residuals(*(cuda.to_device(a) for a in part[:3]), None, None)
            cuda_kernels.normalise(dev[0], *dev[1:4], 0, True, dev_part)
            cuda_kernels.gradient(dev[0], *dev[1:4], 0, True, 0.0, -1.0, dev[4],
                                  cpu.Residuals(*(cuda.to_device(a) for a in tile_res)), dev[5], dev[6])
            part = [a.copy_to_host() for a in dev_part[:3]]
            grads = dev[6].copy_to_host()
        # Not log_norm: it holds each row's shift, the frame's first row maximum on the CPU and the row's own
        # maximum on CUDA; both are exact representations (log_blank keeps the rest of the normaliser).
        for name, a in zip(("log_blank", "log_emit"), part[1:3]):
            out[f"tile{k}/{name}"] = np.asarray(a)
        out[f"tile{k}/grads"] = grads
    return out


def simulate(out: str) -> None:
    """Run the CUDA passes in the simulator (called in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``)."""
    import contextlib

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from rnnt_xla import torch_fused

    assert cuda_kernels._simulating(), "simulate() needs NUMBA_ENABLE_CUDASIM=1 set before numba is imported"
    sys.setswitchinterval(1e-4)  # the simulator's threads hand the GIL over sooner (see test_kernels_cuda)

    class SimulatedCudaPasses(torch_fused._CudaPasses):
        """The CUDA passes on CPU tensors: the simulator's device arrays wrap their numpy views (no copy)."""

        def _logits(self, tensor):
            return FakeCUDAArray(torch_fused._cuda_kernel_view(tensor).numpy())

        def _array(self, tensor):
            return FakeCUDAArray(tensor.detach().numpy())

        def _stream(self):
            return None

        def _context(self):
            return contextlib.nullcontext()

    results = {f"tiles/{k}": v for k, v in tile_passes("cuda").items()}
    torch_fused._PASSES["cpu"] = SimulatedCudaPasses
    calls = []
    original = cuda_kernels.gradient
    cuda_kernels.gradient = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    for name, dtype, tile_bytes, options in CASES:
        for key, value in fused_results(dtype, tile_bytes, options).items():
            results[f"{name}/{key}"] = value
    results["cuda_gradient_calls"] = np.array(len(calls))
    np.savez(out, **results)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, np.ndarray]:
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    return run_simulation("test_fused_cuda", tmp_path_factory.mktemp("fused_cudasim") / "results.npz")


def test_cuda_tile_passes_equal_the_cpu_tile_passes(simulated):
    expected = tile_passes("cpu")
    assert len(expected) >= 4 * 3  # several tiles, frames split
    for key, value in expected.items():
        np.testing.assert_allclose(simulated[f"tiles/{key}"], value, rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("name,dtype,tile_bytes,options", CASES, ids=[c[0] for c in CASES])
def test_fused_loss_through_the_cuda_passes_equals_the_cpu_passes(simulated, name, dtype, tile_bytes, options):
    assert simulated["cuda_gradient_calls"] > len(CASES)  # several tiles per case went through the CUDA passes
    expected = fused_results(dtype, tile_bytes, options)
    f64 = dtype == torch.float64
    for key, value in expected.items():
        np.testing.assert_allclose(simulated[f"{name}/{key}"], value, rtol=1e-12 if f64 else 1e-5,
                                   atol=1e-13 if f64 else 1e-6, err_msg=f"{name}/{key}")


@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_kernels.available(), reason="no CUDA GPU")
def test_fused_loss_on_the_gpu_equals_the_unfused_path():
    for dtype in (torch.float64, torch.float32):
        joint, enc, pred, targets, frames, labels = problem(dtype)
        joint.cuda()
        enc, pred = (x.detach().cuda().requires_grad_() for x in (enc, pred))
        targets, frames, labels = targets.cuda(), frames.cuda(), labels.cuda()
        wrt = [enc, pred, *joint.parameters()]
        loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, tile_bytes=3 * 5 * V * 8, blank=0)
        assert loss.device == enc.device
        got = torch.autograd.grad(loss, wrt)
        reference = rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
        expected = torch.autograd.grad(reference, wrt)
        tol = dict(rtol=1e-11, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, reference, **tol)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **tol)
