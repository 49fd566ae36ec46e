"""Logits far from 0: a common offset, rows of one huge value, magnitudes up to float32's (and float64's)
limits. The kernels on these values against the float64 reference on the same values (cast to float64):
costs exact, gradients as accurate as at offset 0.

Each row's log-sum-exp is kept as a shift plus ``log(sum exp(x - shift))``, never as their rounded sum: at
an offset of 1e5 a float32 log-sum-exp is off by up to 4e-3 (gradient errors of 2e-3), and next to -1e20
even float64 drops the ``log(V)`` (wrong costs). :data:`EXTREMES` is shared with the CUDA simulator cases
(``test_kernels_cuda``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from conftest import Problem, random_problem
from rnnt_xla.reference import log_softmax
from test_kernels_cpu import reference, run_kernels

F32 = np.finfo(np.float32)
F64 = np.finfo(np.float64)


def _offset(k: float) -> Callable[[Problem], None]:
    def edit(p: Problem) -> None:
        p.logits[...] = (p.logits.astype(np.float64) + k).astype(p.logits.dtype)
    return edit


def _uniform_rows(value: float) -> Callable[[Problem], None]:
    """Three rows of every utterance set to ``value``: a frame's first row (whose maximum the CPU kernels
    shift the whole frame by), another row, and the last row of the lattice (its final blank)."""
    def edit(p: Problem) -> None:
        p.logits[:, 1, 0] = value
        p.logits[:, 0, 1] = value
        p.logits[np.arange(len(p.logits)), p.logit_lengths - 1, p.target_lengths] = value
    return edit


def _uniform(value: float) -> Callable[[Problem], None]:
    def edit(p: Problem) -> None:
        p.logits[...] = value
    return edit


def _unreliable_blanks(p: Problem) -> None:
    """Offset 1e4, and blanks the gradient cannot recover a row's normaliser from (masked, or 3e6 below
    the rest): those rows sum their exponentials again; a blank 1000 below the rest is still used."""
    _offset(1e4)(p)
    blank = p.blank % p.logits.shape[-1]
    p.logits[:, 1, 0, blank] = -np.inf
    p.logits[:, 0, 1, blank] = -np.inf
    p.logits[:, 2, 1, blank] -= 3e6
    p.logits[:, 2, 2, blank] -= 1000


EXTREMES: dict[str, Callable[[Problem], None]] = {
    **{f"offset{k:+g}": _offset(k) for k in (0.0, 1e3, 1e4, 1e5, -1e3, -1e4, -1e5)},
    **{f"rows{v:+.3g}": _uniform_rows(v) for v in (-1e8, 1e8, -1e20, 1e20, F32.min, F32.max)},
    **{f"all{v:+.3g}": _uniform(v) for v in (-1e8, -1e20, F32.min, F32.max)},
    "unreliable-blanks": _unreliable_blanks,
}


def extreme_problem(name: str, dtype=np.float32, seed: int = 0, **kwargs) -> Problem:
    """A random problem (B=3, T=6, U=4, V=24 unless given) edited by ``EXTREMES[name]``."""
    rng = np.random.default_rng(seed)
    sizes = {"B": 3, "T": 6, "U": 4, "V": 24} | kwargs
    p = random_problem(rng, sizes["B"], sizes["T"], sizes["U"], sizes["V"], dtype=dtype, blank=seed % 3)
    p.logit_lengths[:] = np.maximum(p.logit_lengths, 3)  # room for the edited rows in every utterance
    p.target_lengths[:] = np.maximum(p.target_lengths, 2)
    p.targets[:, :sizes["U"]] = rng.integers(0, sizes["V"], (sizes["B"], sizes["U"]))
    EXTREMES[name](p)
    return p


def assert_exact(p: Problem, *, cost_rtol: float, grad_atol: float, **options) -> None:
    costs, grads = run_kernels(p, **options)
    ref_costs, ref_grads = reference(p, **options)
    assert np.all(np.isfinite(ref_costs)), "the case must have a finite reference"
    np.testing.assert_allclose(costs, ref_costs, rtol=cost_rtol)
    np.testing.assert_allclose(grads, ref_grads, atol=grad_atol, rtol=0)


@pytest.mark.parametrize("options", [{}, {"fastemit_lambda": 0.1, "clamp": 0.2}], ids=["plain", "fastemit-clamp"])
@pytest.mark.parametrize("name", [n for n in EXTREMES if n.startswith("offset")])
def test_gradient_does_not_depend_on_a_common_offset(name, options):
    """Within 1e-6 of the float64 result at offsets up to 1e5, as at 0 (before: 1.4e-5 at 1e3, 2e-3 at 1e5)."""
    p = extreme_problem(name, T=8, U=5, V=40, seed=1)
    assert_exact(p, cost_rtol=1e-6, grad_atol=1e-6, **options)


@pytest.mark.parametrize("name", [n for n in EXTREMES if n.startswith(("rows", "all"))])
def test_rows_of_one_huge_value(name):
    """A uniform row's log-softmax is exactly -log(V) whatever the value: costs and gradients exact
    (before: every softmax entry of such a row came out as 1, and from 1e20 on the costs were wrong)."""
    p = extreme_problem(name, seed=2)
    V = p.logits.shape[-1]
    assert np.all(log_softmax(np.full(V, F32.min)) == -np.log(V))  # the reference is exact there
    assert_exact(p, cost_rtol=1e-6, grad_atol=1e-6)


@pytest.mark.parametrize("value", [-1e300, F64.min, F64.max], ids=["-1e300", "min", "max"])
def test_float64_rows_of_one_huge_value(value):
    p = extreme_problem("offset+1000", dtype=np.float64, seed=3)
    _uniform_rows(value)(p)
    assert_exact(p, cost_rtol=1e-12, grad_atol=1e-12)


def test_unreliable_blanks_recompute_their_rows():
    """Rows with a masked or hopeless blank take the gradient's recompute path; masked entries get
    exactly zero gradient."""
    p = extreme_problem("unreliable-blanks", seed=4)
    assert_exact(p, cost_rtol=1e-6, grad_atol=1e-6, fastemit_lambda=0.05)
    _, grads = run_kernels(p)
    assert np.all(grads[np.isneginf(p.logits)] == 0)


def test_rows_at_offsets_over_float32s_whole_range():
    """Every row at its own offset, of either sign, from 1 to 2e38: costs and gradients exact. The rows'
    values are a few levels apart (ties at the maximum), so the log-sum-exp is well above the maximum
    even where float32 rounds the row to one value."""
    rng = np.random.default_rng(5)
    p = random_problem(rng, 4, 10, 6, 16)
    shape = p.logits.shape[:3] + (1,)
    offset = rng.choice([-1, 1], shape) * 10.0 ** rng.uniform(0, 38.3, shape)
    levels = 10.0 ** rng.uniform(-2, 1, shape) * rng.integers(-3, 1, p.logits.shape)
    p.logits = (offset + levels).astype(np.float32)
    assert np.all(np.isfinite(p.logits))
    assert_exact(p, cost_rtol=1e-6, grad_atol=1e-6)


def test_torch_adapter_on_extreme_logits():
    """Through the torch adapter: float32 at offset 1e5, and bfloat16 rows of its most negative value."""
    torch = pytest.importorskip("torch")
    import ml_dtypes

    from rnnt_xla.torch import rnnt_loss

    bfloat16 = ml_dtypes.bfloat16
    for name, dtype, np_dtype in [("offset+100000", torch.float32, np.float32), ("offset+0", torch.bfloat16, bfloat16)]:
        p = extreme_problem(name, seed=6)
        p.logits = p.logits.astype(np_dtype)
        if np_dtype is bfloat16:
            _uniform_rows(float(ml_dtypes.finfo(bfloat16).min))(p)
        logits = torch.from_numpy(p.logits.astype(np.float32)).to(dtype).requires_grad_()
        index = [torch.from_numpy(np.asarray(a, np.int64)) for a in (p.targets, p.logit_lengths, p.target_lengths)]
        loss = rnnt_loss(logits, *index, blank=p.blank, reduction="none")
        loss.sum().backward()
        ref_costs, ref_grads = reference(Problem(p.logits.astype(np.float64), p.targets, p.logit_lengths,
                                                 p.target_lengths, p.blank))
        np.testing.assert_allclose(loss.detach().double().numpy(), ref_costs, rtol=1e-6)
        grads = logits.grad.double().numpy()
        half_eps = 2.0**-8 if np_dtype is bfloat16 else 0.0  # each bfloat16 entry is rounded once
        assert np.all(np.abs(grads - ref_grads) <= half_eps * np.abs(ref_grads) + 1e-6), name
