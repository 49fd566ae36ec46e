"""The gradients hold no subnormal numbers: entries below the smallest normal float are written as zero.

A subnormal operand makes a CPU's floating-point arithmetic many times slower, and the gradient of a
transducer loss is the input of the joint network's backward matmul: before the flush that matmul took 4x
longer in a torch training step (``rnnt_xla.kernels.fast_math.store``). Each test builds logits whose exact
gradient has entries in the subnormal range (checked, so the test fails without the flush), then checks that
rnnt_xla's gradient has none and equals the exact one elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import rnnt_xla.torch as rt  # noqa: E402
from rnnt_xla.reference import rnnt_loss_reference  # noqa: E402

TINY32 = np.finfo(np.float32).tiny
TINY64 = np.finfo(np.float64).tiny


def _problem(V: int, extra: int, offset: float, seed: int = 0):
    """Logits ``(3, 6, 4, V + extra)`` near zero, entry 3 of every row (neither blank nor a label) ``offset``
    below the rest: its softmax probability is about ``exp(offset) / V``."""
    rng = np.random.default_rng(seed)
    B, T, U = 3, 6, 3
    logits = rng.standard_normal((B, T, U + 1, V + extra)) * 0.1
    logits[..., 3] += offset
    targets = rng.integers(4, V, (B, U))
    frames = np.array([6, 5, 4])
    labels = np.array([3, 2, 3])
    return logits, targets, frames, labels


def _grad(loss, logits: np.ndarray, dtype, targets, frames, labels) -> np.ndarray:
    x = torch.tensor(logits, dtype=dtype, requires_grad=True)
    value = loss(x, torch.tensor(targets, dtype=torch.int32), torch.tensor(frames, dtype=torch.int32),
                 torch.tensor(labels, dtype=torch.int32))
    value.backward()
    return x.grad.float().numpy() if dtype == torch.bfloat16 else x.grad.numpy()


LOSSES = {
    "rnnt": (0, lambda x, y, t, u: rt.rnnt_loss(x, y, t, u, blank=0, reduction="sum")),
    "rnnt_clamp": (0, lambda x, y, t, u: rt.rnnt_loss(x, y, t, u, blank=0, reduction="sum", clamp=0.5)),
    "rnnt_modified": (0, lambda x, y, t, u: rt.rnnt_loss(x, y, t, u, blank=0, reduction="sum", rnnt_type="modified")),
    "tdt": (3, lambda x, y, t, u: rt.tdt_loss(x, y, t, u, durations=[0, 1, 2], blank=0, reduction="sum")),
    "multiblank": (0, lambda x, y, t, u: rt.multiblank_rnnt_loss(x, y, t, u, big_blank_durations=[2], blank=10,
                                                                 reduction="sum")),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_range_gradients_have_no_subnormals(name, dtype):
    extra, loss = LOSSES[name]
    # exp(-86) / 11 ~ 4e-39: the entry's gradient (softmax times the row's occupancy) is subnormal in float32
    logits, targets, frames, labels = _problem(11, extra, -86.0)
    exact = _grad(loss, logits, torch.float64, targets, frames, labels)
    in_range = (exact != 0) & (np.abs(exact) < TINY32)
    assert in_range.sum() > 10  # the exact gradient does reach the subnormal range (the test can fail)
    grad = _grad(loss, logits, dtype, targets, frames, labels)
    assert not np.any((grad != 0) & (np.abs(grad) < TINY32))
    assert np.all(grad[in_range] == 0)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(grad, exact, rtol=rtol, atol=2 * TINY32 if dtype == torch.float32 else 1e-2)


def test_float64_gradients_have_no_subnormals():
    # exp(-715) ~ 2e-311: below float64's smallest normal 2.2e-308 (the reference's exact value is subnormal)
    logits, targets, frames, labels = _problem(8, 0, -715.0)
    _, exact = rnnt_loss_reference(logits, targets, frames, labels, blank=0, reduction="sum")
    in_range = (exact != 0) & (np.abs(exact) < TINY64)
    assert in_range.sum() > 10
    grad = _grad(LOSSES["rnnt"][1], logits, torch.float64, targets, frames, labels)
    assert not np.any((grad != 0) & (np.abs(grad) < TINY64))
    assert np.all(grad[in_range] == 0)
    np.testing.assert_allclose(grad, exact, rtol=1e-9, atol=2 * TINY64)

