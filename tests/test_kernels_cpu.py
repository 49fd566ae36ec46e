"""The Numba CPU kernels against the float64 reference, on raw numpy arrays."""

from __future__ import annotations

import gc
import math
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from conftest import Problem, random_problem
from rnnt_xla.kernels import cpu
from rnnt_xla.kernels.fast_math import fast_exp, fast_exp64
from rnnt_xla.reference import log_softmax, rnnt_loss_reference


def run_kernels(p: Problem, *, fused=True, fastemit_lambda=0.0, clamp=-1.0, grad_scale=None):
    """Costs ``(B,)`` and gradient of ``sum_b grad_scale[b] * cost_b`` from the kernels."""
    B, T, U1, V = p.logits.shape
    idx = [np.ascontiguousarray(a, dtype=np.int64) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    residuals = cpu.allocate_residuals(B, T, U1, p.logits.dtype)
    costs = np.empty(B, p.logits.dtype)
    cpu.forward(p.logits, *idx, p.blank % V, fused, fastemit_lambda, costs, residuals)
    grads = np.full_like(p.logits, np.nan)  # every entry must be written, padding included
    scale = np.ones(B) if grad_scale is None else grad_scale
    cpu.backward(p.logits, *idx, p.blank % V, fused, fastemit_lambda, clamp, scale, residuals, grads)
    return costs, grads


def reference(p: Problem, **kwargs):
    return rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=p.blank,
                               reduction="none", **kwargs)


def _random_cases(n: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        B, T, U, V = int(rng.integers(1, 9)), int(rng.integers(1, 41)), int(rng.integers(0, 16)), int(rng.integers(2, 65))
        blank = [0, V - 1, V // 2, -1][i % 4]
        fastemit = [0.0, 0.0, 0.01, 0.5][i % 4 - (i // 4) % 2]
        clamp = [-1.0, 0.0, 0.05, 0.5][(i // 2) % 4]
        fused = i % 5 != 4
        cases.append((i, B, T, U, V, blank, fastemit, clamp, fused))
    return cases


@pytest.mark.parametrize("dtype,cost_rtol,grad_atol", [(np.float32, 1e-5, 1e-4), (np.float64, 1e-12, 1e-12)])
@pytest.mark.parametrize("case", _random_cases(40), ids=lambda c: "case{}-B{}T{}U{}V{}-blank{}-fe{}-clamp{}-fused{}".format(*c))
def test_kernels_match_reference(case, dtype, cost_rtol, grad_atol):
    i, B, T, U, V, blank, fastemit, clamp, fused = case
    rng = np.random.default_rng(i)
    p = random_problem(rng, B, T, U, V, dtype=dtype, blank=blank, extra_target_columns=i % 3)
    if not fused:
        p.logits = log_softmax(p.logits).astype(dtype)
    costs, grads = run_kernels(p, fused=fused, fastemit_lambda=fastemit, clamp=clamp)
    ref_costs, ref_grads = reference(p, fused_log_softmax=fused, fastemit_lambda=fastemit, clamp=clamp)
    np.testing.assert_allclose(costs, ref_costs, rtol=cost_rtol)
    np.testing.assert_allclose(grads, ref_grads, atol=grad_atol, rtol=0)


@pytest.mark.parametrize("offsets", [(0, 120, -120, 60), (0, -90, 0, 90), (0, 200, 0, -200)])
def test_rows_of_a_frame_on_different_scales(offsets):
    """log_normalizers shifts every row of a frame by the maximum of its first row; rows whose range is far
    from it (float32 exps that would overflow or underflow) must take the exact per-row path."""
    rng = np.random.default_rng(5)
    p = random_problem(rng, 2, 5, 3, 12, variable_lengths=False)
    p.logits = p.logits + np.asarray(offsets, np.float32)[None, None, :, None]
    p.logits[:, :, :, 0] = rng.standard_normal((2, 5, 4))  # keep the blank finite: every path stays possible
    costs, grads = run_kernels(p)
    ref_costs, ref_grads = reference(p)
    assert np.all(np.isfinite(costs)) and np.all(np.isfinite(grads))
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-5, rtol=0)


def test_padding_gets_exactly_zero_gradient(rng):
    p = random_problem(rng, 4, 12, 6, 9, blank=3)
    p.logit_lengths[:] = [12, 5, 1, 7]
    p.target_lengths[:] = [6, 0, 2, 3]
    _, grads = run_kernels(p, fastemit_lambda=0.1, clamp=0.3)
    for b in range(4):
        T_b, U_b = p.logit_lengths[b], p.target_lengths[b]
        assert np.all(grads[b, T_b:] == 0)
        assert np.all(grads[b, :, U_b + 1:] == 0)
        assert np.all(np.abs(grads[b, :T_b, : U_b + 1]).sum(axis=-1) > 0)


def test_grad_scale_multiplies_each_utterance_after_clamping(rng):
    p = random_problem(rng, 3, 6, 4, 7)
    scale = np.array([0.5, -2.0, 0.0])
    _, grads = run_kernels(p, clamp=0.1, grad_scale=scale)
    _, ref_grads = reference(p, clamp=0.1)
    np.testing.assert_allclose(grads, ref_grads * scale[:, None, None, None], atol=1e-6)


@pytest.mark.parametrize("scale", [1e-22, -3e-30])
def test_tiny_row_gradients_keep_their_digits(rng, scale):
    """Rows whose gradient is below 2**-64 (here all of them, through grad_scale) are written as
    exp(x - shift + log(weight)), not as float32-subnormal-prone products: the same values to 2e-5, entries
    below float32's normal range 0, the sign of the scale kept."""
    p = random_problem(rng, 3, 7, 5, 40, scale=3.0)
    _, grads = run_kernels(p, grad_scale=np.full(3, scale))
    _, ref_grads = reference(p)
    expected = ref_grads * scale
    np.testing.assert_allclose(grads, expected, rtol=2e-5, atol=2e-38)
    assert np.abs(expected).max() > abs(scale) * 0.1 and (np.abs(expected) < 1e-38).any()


def test_inputs_are_not_modified(rng):
    p = random_problem(rng, 3, 9, 5, 11)
    before = [a.copy() for a in (p.logits, p.targets, p.logit_lengths, p.target_lengths)]
    run_kernels(p, fastemit_lambda=0.2, clamp=0.5)
    for a, b in zip(before, (p.logits, p.targets, p.logit_lengths, p.target_lengths)):
        np.testing.assert_array_equal(a, b)


def test_masked_vocabulary_entries_get_zero_gradient(rng):
    p = random_problem(rng, 2, 5, 3, 10, blank=0)
    p.targets[:, :3] = rng.integers(1, 6, size=(2, 3))
    p.logits[..., 6:] = -np.inf  # vocabulary entries a model masked out
    costs, grads = run_kernels(p)
    ref_costs, ref_grads = reference(p)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    assert np.all(grads[..., 6:] == 0)
    np.testing.assert_allclose(grads[..., :6], ref_grads[..., :6], atol=1e-5)


def test_degenerate_sizes():
    logits = np.array([[[[0.3, -1.2]]]], dtype=np.float32)  # T=1, U=0, V=2
    p = Problem(logits, np.zeros((1, 0), np.int64), np.array([1]), np.array([0]), blank=1)
    costs, grads = run_kernels(p)
    ref_costs, ref_grads = reference(p)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-6)


@numba.njit
def _exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_accuracy_and_special_values(dtype):
    x = np.concatenate([np.linspace(-87, 88, 200_001), [-np.inf, -1e4, -88.0, 0.0, np.nan]]).astype(dtype)
    out = np.empty_like(x)
    _exp_all(x, out)
    exact = np.exp(x[:-5].astype(np.float64))
    rel = np.abs(out[:-5] - exact) / exact
    assert rel.max() < 3 * np.finfo(dtype).eps
    assert out[-5] == 0 and out[-4] == 0 and out[-2] == 1
    assert np.isnan(out[-1])


@numba.njit
def _exp64_all(x, out):
    for i in range(x.shape[0]):  # a loop LLVM vectorises, and its scalar remainder
        out[i] = fast_exp64(x[i])


def test_fast_exp64_is_math_exp_within_one_ulp_on_its_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-745.2, 709.782712893384, 400_001), rng.uniform(-40, 5, 100_000),
                        rng.uniform(-1e-3, 1e-3, 1000), [0.0, -0.0, 709.782712893384, -708.4, -745.13]])
    out = np.empty_like(x)
    _exp64_all(x, out)
    exact = np.array([math.exp(v) for v in x])
    normal = exact >= np.finfo(np.float64).tiny
    assert np.all(np.abs(out - exact)[normal] <= np.spacing(exact[normal]))
    assert np.all(np.abs(out - exact)[~normal] <= 5e-324)  # subnormal results: rounded once
    assert out[-4] == 1 and out[-5] == 1 and np.isfinite(out[-3])
    special = np.array([-np.inf, -1e4, -745.3, 709.79, 1e4, np.inf, np.nan])
    out = np.empty_like(special)
    _exp64_all(special, out)
    assert np.array_equal(out, [0, 0, 0, np.inf, np.inf, np.inf, np.nan], equal_nan=True)
    out32 = np.empty(3)
    _exp64_all(np.array([-1.5, 0.0, 20.0], np.float32), out32)  # float32 arguments are widened first
    assert np.all(np.abs(out32 - np.exp([-1.5, 0.0, 20.0])) <= np.spacing(np.exp([-1.5, 0.0, 20.0])))


def test_first_kernel_load_does_not_import_scipy_and_blas_still_works():
    """numba_startup keeps Numba's CPU-target start-up from importing scipy.linalg (~0.2 s); jitted user
    code that needs BLAS must still get it."""
    code = textwrap.dedent("""
        import importlib.util, sys
        import numpy as np
        from rnnt_xla.kernels import cpu
        x = np.zeros((1, 2, 1, 3), np.float32)
        one = np.ones(1, np.int64)
        cpu.forward(x, np.zeros((1, 0), np.int64), 2 * one, 0 * one, 0, True, 0.0, np.empty(1, np.float32),
                    cpu.allocate_residuals(1, 2, 1, x.dtype))
        print("scipy.linalg" in sys.modules)
        import numba
        import numba.np.arraymath as arraymath
        have_scipy = importlib.util.find_spec("scipy") is not None
        assert arraymath._HAVE_BLAS == have_scipy
        if have_scipy:
            dot = numba.njit(lambda a, b: np.dot(a, b))
            assert np.allclose(dot(np.arange(6.0).reshape(2, 3), np.arange(3.0)), [5.0, 14.0])
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "ok"]


def test_paused_garbage_collector_restores_the_previous_state():
    from rnnt_xla.kernels.numba_startup import paused_garbage_collector

    assert gc.isenabled()
    with paused_garbage_collector():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_garbage_collector():
        raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()  # a user who runs without the collector keeps it off
    try:
        with paused_garbage_collector():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_only_the_first_call_of_each_entry_point_pauses_the_collector(monkeypatch, rng):
    """Numba's start-up runs with the collector paused (numba_startup); every later call leaves it alone."""
    seen = []

    def spy(name, kernel):
        def wrapper(*args):
            seen.append((name, gc.isenabled()))
            return kernel(*args)
        return wrapper

    monkeypatch.setattr(cpu, "_STARTED", set())
    for variant in ("", "_serial"):  # this small problem runs the serial kernels (kernels.threads)
        monkeypatch.setattr(cpu, f"log_normalizers{variant}", spy("forward", getattr(cpu, f"log_normalizers{variant}")))
        monkeypatch.setattr(cpu, f"betas{variant}", spy("backward", getattr(cpu, f"betas{variant}")))
    p = random_problem(rng, 2, 4, 2, 5)
    for _ in range(2):
        run_kernels(p)
        assert gc.isenabled()
    assert seen == [("forward", False), ("backward", False), ("forward", True), ("backward", True)]
