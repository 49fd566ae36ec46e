"""Property tests: random problems through both adapters against the float64 reference.

Profiles (select with the environment variable ``RNNT_XLA_HYPOTHESIS_PROFILE``): ``ci`` (default, 300
examples, derandomised so every run checks the same cases) and ``slow`` (3000 random examples).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnt_xla.reference import log_softmax, rnnt_loss_reference
from rnnt_xla.torch import rnnt_loss as torch_rnnt_loss

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("RNNT_XLA_HYPOTHESIS_PROFILE", "ci"))

try:
    import jax
    import jax.numpy as jnp

    from rnnt_xla.jax import rnnt_loss as jax_rnnt_loss
except ImportError:  # pragma: no cover - jax is an optional extra
    jax = None


@st.composite
def problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 10))
    U = draw(st.integers(0, 6))
    V = draw(st.integers(2, 10))
    adapter = draw(st.sampled_from(["torch", "jax"] if jax is not None else ["torch"]))
    dtype = draw(st.sampled_from([np.float32, np.float64] if adapter == "torch" else [np.float32]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = (rng.standard_normal((B, T, U + 1, V)) * scale).astype(dtype)
    logit_lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), np.int32)
    target_lengths = np.array(draw(st.lists(st.integers(0, U), min_size=B, max_size=B)), np.int32)
    width = U + draw(st.integers(0, 2))
    targets = rng.integers(0, V, size=(B, width)).astype(np.int32)
    for b in range(B):  # padding past each target length holds junk that must be ignored
        targets[b, target_lengths[b]:] = draw(st.sampled_from([-1, V, 999]))
    options = dict(
        blank=draw(st.integers(-V, V - 1)),
        clamp=draw(st.sampled_from([-1.0, 0.0, 0.01, 0.3, 2.0])),
        reduction=draw(st.sampled_from(["none", "sum", "mean", "mean_by_target_length", "mean_volume"])),
        fused_log_softmax=draw(st.booleans()),
        fastemit_lambda=draw(st.sampled_from([0.0, 0.0, 0.001, 0.1, 1.0])),
    )
    if not options["fused_log_softmax"]:
        logits = log_softmax(logits).astype(dtype)
    return adapter, logits, targets, logit_lengths, target_lengths, options


def run_adapter(adapter, logits, targets, logit_lengths, target_lengths, options):
    """Loss and the gradient of ``loss.sum()`` w.r.t. the logits, as numpy arrays."""
    if adapter == "torch":
        x = torch.from_numpy(logits.copy()).requires_grad_()
        loss = torch_rnnt_loss(x, *(torch.from_numpy(a) for a in (targets, logit_lengths, target_lengths)),
                               **options)
        loss.sum().backward()
        return loss.detach().numpy(), x.grad.numpy()
    index = [jnp.asarray(a) for a in (targets, logit_lengths, target_lengths)]
    loss, grad = jax.value_and_grad(lambda x: jax_rnnt_loss(x, *index, **options).sum())(jnp.asarray(logits))
    if options["reduction"] == "none":
        loss = jax_rnnt_loss(jnp.asarray(logits), *index, **options)
    return np.asarray(loss), np.asarray(grad)


@given(problems())
def test_adapters_match_the_float64_reference(problem):
    adapter, logits, targets, logit_lengths, target_lengths, options = problem
    loss, grad = run_adapter(*problem)
    ref_loss, ref_grad = rnnt_loss_reference(logits, targets, logit_lengths, target_lengths, **options)
    single = logits.dtype == np.float32
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5 if single else 1e-10, atol=1e-5 if single else 1e-10)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-5 if single else 1e-10, rtol=0)


@pytest.mark.parametrize("adapter", ["torch", "jax"])
def test_shrunk_counterexample_empty_targets_array(adapter):
    """Found by the property test: targets of width 0 (every target empty) broke the JAX adapter."""
    if adapter == "jax" and jax is None:
        pytest.skip("jax not installed")
    logits = np.array([[[[-0.6803385, -0.70612204]]]], np.float32)
    problem = (adapter, logits, np.zeros((1, 0), np.int32), np.array([1], np.int32), np.array([0], np.int32),
               dict(blank=0, clamp=-1.0, reduction="none", fused_log_softmax=False, fastemit_lambda=0.0))
    loss, grad = run_adapter(*problem)
    ref_loss, ref_grad = rnnt_loss_reference(*problem[1:5], **problem[5])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6)
