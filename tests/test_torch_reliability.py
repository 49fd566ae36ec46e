"""The torch adapter inside real training code: buffers reused between forward and backward, second-order
autograd, the seed's result shapes, NeMo's ``mean_volume`` reduction and empty batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import random_problem
from rnnt_xla.reference import rnnt_loss_reference
from rnnt_xla.torch import RNNTLoss, RNNTLossNumba, rnnt_loss


def tensors(seed: int = 0, dtype=np.float64, index_dtype=np.int64):
    p = random_problem(np.random.default_rng(seed), 3, 6, 3, 5, dtype=dtype, blank=0, index_dtype=index_dtype)
    logits = torch.from_numpy(p.logits).requires_grad_()
    return p, logits, torch.from_numpy(p.targets), torch.from_numpy(p.logit_lengths), torch.from_numpy(p.target_lengths)


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_index_buffers_refilled_between_forward_and_backward_change_nothing(index_dtype):
    """A data loader that refills its batch buffers in place after forward (prefetching into one buffer)
    must neither change the gradient nor crash: on int64 inputs this read the new values (max gradient
    error 8e8) or segfaulted on padding-like values. Run in a subprocess, so a crash fails the test."""
    script = textwrap.dedent(f"""
        import torch
        from rnnt_xla.torch import rnnt_loss
        torch.manual_seed(0)
        dtype = torch.{index_dtype}
        huge = 10**12 if dtype == torch.int64 else 2**31 - 1
        logits = torch.randn(3, 7, 4, 6, requires_grad=True)
        targets = torch.randint(1, 6, (3, 3), dtype=dtype)
        logit_lengths = torch.tensor([7, 5, 3], dtype=dtype)
        target_lengths = torch.tensor([3, 2, 1], dtype=dtype)
        expected = torch.autograd.grad(rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0,
                                                 reduction="mean_by_target_length"), logits)[0]
        for fill in (0, huge, -huge):
            loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0,
                             reduction="mean_by_target_length")
            saved = [t.clone() for t in (targets, logit_lengths, target_lengths)]
            for t in (targets, logit_lengths, target_lengths):
                t.fill_(fill)
            grad = torch.autograd.grad(loss, logits)[0]
            print(fill, torch.equal(grad, expected))
            for t, s in zip((targets, logit_lengths, target_lengths), saved):
                t.copy_(s)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()] == ["True"] * 3


def test_logits_modified_in_place_after_forward_raise_autograds_error():
    _, logits, targets, logit_lengths, target_lengths = tensors()
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


SECOND_ORDER = "rnnt_xla: the RNNT loss has no second derivative"


def test_hessian_raises_instead_of_returning_zeros():
    _, logits, targets, logit_lengths, target_lengths = tensors()

    def loss(x):
        return rnnt_loss(x, targets, logit_lengths, target_lengths, blank=0)

    for vectorize in (False, True):
        with pytest.raises(RuntimeError, match=SECOND_ORDER):
            torch.autograd.functional.hessian(loss, logits.detach(), vectorize=vectorize)


def test_gradient_penalty_through_the_loss_raises():
    _, logits, targets, logit_lengths, target_lengths = tensors()
    x = logits.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, not a leaf
    loss = rnnt_loss(x, targets, logit_lengths, target_lengths, blank=0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits, create_graph=True)
    assert grad.requires_grad  # not a constant that a penalty would silently ignore
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        (loss + grad.pow(2).sum()).backward()


def test_create_graph_still_gives_the_right_first_derivative_and_other_second_derivatives():
    """``create_graph=True`` for another part of the graph keeps working; only differentiating the RNNT
    gradient again raises."""
    p, logits, targets, logit_lengths, target_lengths = tensors()
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    total = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="sum") + w ** 3
    g_logits, g_w = torch.autograd.grad(total, (logits, w), create_graph=True)
    _, ref = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=0, reduction="sum")
    np.testing.assert_allclose(g_logits.detach().numpy(), ref, atol=1e-12)
    (h_w,) = torch.autograd.grad(g_w, w)
    assert h_w.item() == pytest.approx(6 * 0.5)


def test_incoming_gradient_that_requires_grad_is_guarded_too():
    _, logits, targets, logit_lengths, target_lengths = tensors()
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
    v = torch.ones(3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, logits, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match=SECOND_ORDER):
        torch.autograd.grad(grad.sum(), v)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_seed_drop_in_returns_the_seeds_shape(reduction):
    """warprnnt_numba 0.4.1's RNNTLossNumba returns shape (1,) for 'sum' and 'mean' (checked), so users
    write ``loss[0]``; torchaudio's API (``rnnt_loss``, ``RNNTLoss``) keeps a 0-d result."""
    p, logits, targets, logit_lengths, target_lengths = tensors(1, np.float32, np.int32)
    loss = RNNTLossNumba(blank=0, reduction=reduction)(logits, targets, logit_lengths, target_lengths)
    assert loss.shape == (1,)
    ref, _ = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=0, reduction=reduction)
    np.testing.assert_allclose(loss[0].item(), ref, rtol=1e-6)
    loss[0].backward()
    assert RNNTLoss(blank=0, reduction=reduction)(logits, targets, logit_lengths, target_lengths).shape == ()
    assert RNNTLossNumba(blank=0, reduction="none")(logits, targets, logit_lengths, target_lengths).shape == (3,)


def test_seed_drop_in_shape_matches_the_seed_package():
    warprnnt_numba = pytest.importorskip("warprnnt_numba")
    import numba

    threads = numba.get_num_threads()  # the seed sets Numba's process-wide thread count to 1 on every call
    _, logits, targets, logit_lengths, target_lengths = tensors(2, np.float32, np.int32)
    for reduction in ("none", "sum", "mean"):
        seed = warprnnt_numba.RNNTLossNumba(blank=0, reduction=reduction)(logits, targets, logit_lengths,
                                                                         target_lengths)
        ours = RNNTLossNumba(blank=0, reduction=reduction)(logits, targets, logit_lengths, target_lengths)
        assert ours.shape == seed.shape
    numba.set_num_threads(threads)


def test_mean_volume_is_nemos_sum_over_total_target_length():
    """NeMo's ``RNNTLoss.reduce``: ``losses.sum() / target_lengths.sum()``; the default of Hugging Face
    transformers' RNNT loss. An all-empty batch divides by 1 (as ``mean_by_target_length`` does)."""
    p, logits, targets, logit_lengths, target_lengths = tensors(3)
    costs = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="none")
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="mean_volume")
    np.testing.assert_allclose(loss.item(), costs.sum().item() / p.target_lengths.sum(), rtol=1e-14)
    loss.backward()
    _, ref = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=0,
                                 reduction="mean_volume")
    np.testing.assert_allclose(logits.grad.numpy(), ref, atol=1e-12)
    empty = torch.zeros_like(target_lengths)
    loss = rnnt_loss(logits, targets, logit_lengths, empty, blank=0, reduction="mean_volume")
    np.testing.assert_allclose(loss.item(), rnnt_loss(logits, targets, logit_lengths, empty, blank=0,
                                                      reduction="sum").item(), rtol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_by_target_length", "mean_volume"])
def test_empty_batch_gives_zero_loss_and_zero_gradient(reduction):
    """An empty shard (B = 0) is not an error, as for torch's own losses: the loss is 0 (or empty)."""
    logits = torch.randn(0, 5, 3, 4, requires_grad=True)
    index = torch.zeros(0, dtype=torch.int64)
    loss = rnnt_loss(logits, torch.zeros(0, 2, dtype=torch.int64), index, index, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert logits.grad.shape == logits.shape
    seed_style = RNNTLossNumba(reduction="sum")(logits, torch.zeros(0, 2, dtype=torch.int64), index, index)
    assert seed_style.shape == (1,) and seed_style.item() == 0.0
