"""float16 and bfloat16 logits: read in their dtype, computed in float32, gradients written in their dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import random_problem
from rnnt_xla.reference import rnnt_loss_reference
from rnnt_xla.torch import rnnt_loss as torch_rnnt_loss

HALF = {"float16": (torch.float16, np.float16, 2.0**-11), "bfloat16": (torch.bfloat16, ml_dtypes.bfloat16, 2.0**-8)}


def run(adapter: str, logits16: np.ndarray, p, **options):
    """Loss (float32) and gradient (in the 16-bit dtype, returned as float32 numpy) of ``loss.sum()``."""
    index = (p.targets, p.logit_lengths, p.target_lengths)
    if adapter == "torch":
        torch_dtype = HALF[np.dtype(logits16.dtype).name][0]
        x = torch.from_numpy(logits16.astype(np.float32)).to(torch_dtype).requires_grad_()
        loss = torch_rnnt_loss(x, *map(torch.from_numpy, index), **options)
        loss.sum().backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == torch_dtype
        return loss.detach().numpy(), x.grad.float().numpy()
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import rnnt_loss as jax_rnnt_loss

    x = jax.numpy.asarray(logits16)
    loss, grad = jax.value_and_grad(lambda x: jax_rnnt_loss(x, *index, **options).sum())(x)
    assert loss.dtype == np.float32 and grad.dtype == logits16.dtype
    return np.asarray(jax_rnnt_loss(x, *index, **options)), np.asarray(grad.astype(np.float32))


@pytest.mark.parametrize("adapter", ["torch", "jax"])
@pytest.mark.parametrize("half", sorted(HALF))
@pytest.mark.parametrize("options", [dict(reduction="none"), dict(reduction="mean", fastemit_lambda=0.01, clamp=0.02)])
def test_half_precision_matches_reference_on_the_rounded_inputs(adapter, half, options):
    """The only error beyond float32 arithmetic is the final rounding of each gradient entry."""
    _, numpy_dtype, eps = HALF[half]
    p = random_problem(np.random.default_rng(0), 4, 30, 8, 40, blank=0)
    logits16 = p.logits.astype(numpy_dtype)
    loss, grad = run(adapter, logits16, p, blank=0, **options)
    ref_loss, ref_grad = rnnt_loss_reference(logits16.astype(np.float64), p.targets, p.logit_lengths,
                                             p.target_lengths, blank=0, **options)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert np.all(np.abs(grad - ref_grad) <= eps * np.abs(ref_grad) + 1e-6)


def test_torch_and_jax_agree_bit_for_bit_in_half_precision():
    pytest.importorskip("jax")
    p = random_problem(np.random.default_rng(1), 3, 12, 5, 16, blank=2)
    for half in HALF:
        logits16 = p.logits.astype(HALF[half][1])
        torch_loss, torch_grad = run("torch", logits16, p, blank=2, reduction="none", clamp=0.1)
        jax_loss, jax_grad = run("jax", logits16, p, blank=2, reduction="none", clamp=0.1)
        assert np.array_equal(torch_loss, jax_loss) and np.array_equal(torch_grad, jax_grad)
