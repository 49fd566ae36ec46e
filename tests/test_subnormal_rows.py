"""Rows whose gradient lies below the normal float range: the row writer (cpu._write_row_gradient, shared by
every loss's gradient pass) writes 0 there instead of subnormal products, which cost a microcode assist each
on x86 (10-15% of the gradient pass at (16, 150, 40, 1024)) and which JAX's callbacks, run under
flush-to-zero, flushed anyway."""

from __future__ import annotations

import numpy as np
import pytest

from rnnt_xla.kernels import cpu
from rnnt_xla.reference import backward_variables, forward_variables, log_softmax, rnnt_loss_reference

TINY = float(np.finfo(np.float32).tiny)


def _problem(seed: int = 3):
    """Wide-ranging logits: node posteriors spread over hundreds of orders of magnitude."""
    rng = np.random.default_rng(seed)
    B, T, U, V = 2, 40, 12, 16
    logits = (rng.standard_normal((B, T, U + 1, V)) * 6).astype(np.float32)
    targets = rng.integers(1, V, (B, U)).astype(np.int64)
    return logits, targets, np.full(B, T, np.int64), np.full(B, U, np.int64)


def _node_posteriors(logits, targets, T_b, U_b):
    """``P(alignment passes (t, u))``, float64, from the reference's forward and backward variables."""
    log_probs = log_softmax(logits[:T_b, : U_b + 1].astype(np.float64))
    alphas, ll = forward_variables(log_probs, targets[:U_b], 0)
    betas, _ = backward_variables(log_probs, targets[:U_b], 0)
    return np.exp(alphas + betas - ll)


@pytest.mark.parametrize("rnnt_type", ["regular", "modified"])
@pytest.mark.parametrize("clamp", [-1.0, 0.5])
def test_rows_below_the_normal_range_are_zero(rnnt_type, clamp):
    logits, targets, frames, labels = _problem()
    B, T, U1, V = logits.shape
    scale = np.full(B, 0.5)
    residuals = cpu.allocate_residuals(B, T, U1, logits.dtype)
    costs = np.empty(B, np.float32)
    cpu.forward(logits, targets, frames, labels, 0, True, 0.0, costs, residuals, rnnt_type=rnnt_type)
    grads = np.full_like(logits, np.nan)
    cpu.backward(logits, targets, frames, labels, 0, True, 0.0, clamp, scale, residuals, grads, rnnt_type=rnnt_type)
    if rnnt_type == "regular":  # every entry as accurate as before (float32 tolerance against float64)
        _, ref = rnnt_loss_reference(logits, targets, frames, labels, blank=0, clamp=clamp, reduction="none")
        np.testing.assert_allclose(grads, ref * scale[:, None, None, None], atol=1e-6, rtol=0)
        occupancy = np.stack([_node_posteriors(logits[b], targets[b], T, U1 - 1) for b in range(B)])
        below = occupancy * scale[:, None, None] < TINY / 2
        # the case this is about: rows whose products would have been subnormal, not zero
        assert ((occupancy * scale[:, None, None] > 1e-44) & below).sum() > 10
    else:  # rows whose every non-arc entry is tiny in the kernel's own result: exactly the rows written as 0
        below = np.abs(grads[..., 1:]).max(axis=-1) < TINY / V
    for b, t, u in zip(*np.nonzero(below)):
        row = grads[b, t, u].copy()
        row[[0, targets[b, u] if u < U1 - 1 else 0]] = 0  # the arcs' own entries are computed apart
        assert not row.any(), (b, t, u, row)
