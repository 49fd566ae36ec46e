"""The PyTorch adapter: semantics against the reference, autograd, zero-copy, seed compatibility."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from conftest import Problem, random_problem
from rnnt_xla import torch as rnnt_torch
from rnnt_xla.kernels import cpu
from rnnt_xla.reference import log_softmax, rnnt_loss_reference
from rnnt_xla.torch import RNNTLoss, RNNTLossNumba, rnnt_loss

REDUCTIONS = ["none", "sum", "mean", "mean_by_target_length", "mean_volume"]


def as_tensors(p: Problem, requires_grad: bool = True):
    logits = torch.from_numpy(p.logits).requires_grad_(requires_grad)
    return logits, torch.from_numpy(p.targets), torch.from_numpy(p.logit_lengths), torch.from_numpy(p.target_lengths)


@pytest.mark.parametrize("dtype,rtol,atol", [(np.float32, 1e-5, 1e-5), (np.float64, 1e-12, 1e-13)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fastemit_lambda,clamp", [(0.0, -1.0), (0.05, -1.0), (0.0, 0.02), (0.3, 0.1)])
def test_loss_and_gradient_match_reference(dtype, rtol, atol, reduction, fastemit_lambda, clamp):
    rng = np.random.default_rng([REDUCTIONS.index(reduction), int(1000 * fastemit_lambda), int(1000 * clamp) + 1000])
    p = random_problem(rng, 5, 11, 6, 13, dtype=dtype, blank=4, extra_target_columns=2)
    p.target_lengths[1] = 0  # an empty target, also for mean_by_target_length
    logits, targets, logit_lengths, target_lengths = as_tensors(p)
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=4, clamp=clamp, reduction=reduction,
                     fastemit_lambda=fastemit_lambda)
    grad_output = torch.from_numpy(rng.uniform(-2, 2, size=loss.shape).astype(dtype))
    loss.backward(grad_output)

    ref_loss, _ = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=4, clamp=clamp,
                                      reduction=reduction, fastemit_lambda=fastemit_lambda)
    # The reference's gradient is for grad_output = 1; per utterance it is linear in the incoming gradient.
    _, per_utt = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=4, clamp=clamp,
                                     reduction="none", fastemit_lambda=fastemit_lambda)
    g = grad_output.numpy().astype(np.float64)
    weights = {"none": g, "sum": np.full(5, g), "mean": np.full(5, g / 5),
               "mean_by_target_length": g / 5 / np.maximum(p.target_lengths, 1),
               "mean_volume": np.full(5, g / max(p.target_lengths.sum(), 1))}[reduction]
    assert loss.dtype == logits.dtype and loss.shape == ((5,) if reduction == "none" else ())
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=rtol)
    np.testing.assert_allclose(logits.grad.numpy(), per_utt * weights[:, None, None, None], atol=atol, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck_float64(fused):
    rng = np.random.default_rng(3)
    p = random_problem(rng, 3, 5, 3, 6, dtype=np.float64, blank=2)
    if not fused:
        p.logits = log_softmax(p.logits)
    logits, targets, logit_lengths, target_lengths = as_tensors(p)
    for reduction in REDUCTIONS:
        def loss(x):
            return rnnt_loss(x, targets, logit_lengths, target_lengths, blank=2, reduction=reduction,
                             fused_log_softmax=fused)
        assert torch.autograd.gradcheck(loss, (logits,), eps=1e-6, atol=1e-7)


def test_no_grad_and_inputs_without_grad_compute_no_gradient(monkeypatch):
    p = random_problem(np.random.default_rng(0), 2, 6, 3, 5)
    logits, targets, logit_lengths, target_lengths = as_tensors(p, requires_grad=False)
    calls = []
    monkeypatch.setattr(cpu, "backward", lambda *a, **k: calls.append(1))
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths)
    assert not loss.requires_grad
    with torch.no_grad():
        loss2 = rnnt_loss(logits.requires_grad_(), targets, logit_lengths, target_lengths)
    assert loss2.grad_fn is None and torch.equal(loss, loss2)
    assert calls == []


def test_int32_and_int64_indices_agree():
    p = random_problem(np.random.default_rng(1), 3, 7, 4, 9)
    logits, targets, logit_lengths, target_lengths = as_tensors(p, requires_grad=False)
    a = rnnt_loss(logits, targets, logit_lengths, target_lengths, reduction="none")
    b = rnnt_loss(logits, targets.long(), logit_lengths.long(), target_lengths.long(), reduction="none")
    assert torch.equal(a, b)


def test_zero_copy_logits_and_gradient(monkeypatch):
    """The kernels read the tensor's own memory and write the gradient that lands in ``logits.grad``."""
    logits = torch.randn(4, 50, 21, 128, requires_grad=True)  # 4.3 MB
    targets = torch.randint(1, 128, (4, 20), dtype=torch.int32)
    lengths = torch.full((4,), 50, dtype=torch.int32), torch.full((4,), 20, dtype=torch.int32)
    seen = {}
    forward, backward = cpu.forward, cpu.backward

    def spy_forward(logits_np, *args):
        seen["forward_logits"] = logits_np.ctypes.data
        return forward(logits_np, *args)

    def spy_backward(logits_np, *args):
        seen["backward_logits"] = logits_np.ctypes.data
        seen["grads"] = args[-1].ctypes.data
        return backward(logits_np, *args)

    monkeypatch.setattr(cpu, "forward", spy_forward)
    monkeypatch.setattr(cpu, "backward", spy_backward)
    rnnt_loss(logits, targets, *lengths, blank=0).backward()
    assert seen["forward_logits"] == seen["backward_logits"] == logits.data_ptr()
    assert seen["grads"] == logits.grad.data_ptr()


def test_non_contiguous_logits_give_the_same_result():
    p = random_problem(np.random.default_rng(2), 3, 8, 4, 10)
    logits, targets, logit_lengths, target_lengths = as_tensors(p)
    strided = torch.from_numpy(np.ascontiguousarray(p.logits.transpose(0, 2, 1, 3))).transpose(1, 2).requires_grad_()
    assert not strided.is_contiguous() and torch.equal(strided, logits)
    for x in (logits, strided):
        rnnt_loss(x, targets, logit_lengths, target_lengths, reduction="sum", clamp=0.1).backward()
    assert torch.equal(logits.grad, strided.grad)


def test_module_forms_match_the_function():
    p = random_problem(np.random.default_rng(4), 3, 7, 4, 9, blank=0)
    logits, targets, logit_lengths, target_lengths = as_tensors(p, requires_grad=False)
    expected = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, clamp=0.5, reduction="sum",
                         fastemit_lambda=0.01)
    module = RNNTLoss(blank=0, clamp=0.5, reduction="sum", fastemit_lambda=0.01)
    assert torch.equal(module(logits, targets, logit_lengths, target_lengths), expected)
    seed_style = RNNTLossNumba(blank=0, reduction="sum", fastemit_lambda=0.01, clamp=0.5)
    assert torch.equal(seed_style(logits, targets, logit_lengths, target_lengths), expected.reshape(1))
    # Defaults: torchaudio's for RNNTLoss, the seed's for RNNTLossNumba.
    assert (RNNTLoss().blank, RNNTLoss().clamp, RNNTLoss().reduction) == (-1, -1.0, "mean")
    seed_default = RNNTLossNumba()
    assert (seed_default.blank, seed_default.reduction, seed_default.fastemit_lambda, seed_default.clamp) == (
        0, "mean", 0.0, 0.0)


def test_training_step_reduces_the_loss():
    torch.manual_seed(0)
    B, T, U, V, H = 4, 12, 5, 8, 16
    encoder_out = torch.randn(B, T, H)
    targets = torch.randint(1, V, (B, U), dtype=torch.int32)
    embed = torch.nn.Embedding(V, H)
    joiner = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(H, V))
    optimizer = torch.optim.Adam([*embed.parameters(), *joiner.parameters()], lr=0.05)
    criterion = RNNTLoss(blank=0)
    lengths = torch.full((B,), T, dtype=torch.int32), torch.full((B,), U, dtype=torch.int32)
    prediction_in = torch.cat([torch.zeros(B, 1, dtype=torch.long), targets.long()], dim=1)
    losses = []
    for _ in range(30):
        logits = joiner(encoder_out[:, :, None, :] + embed(prediction_in)[:, None, :, :])
        loss = criterion(logits, targets, *lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_seed_readme_example_runs_unchanged():
    """The usage example of warprnnt_numba's README, with the import swapped and device set to CPU."""
    import rnnt_xla.torch as warprnnt_numba

    fastemit_lambda = 0.001  # any float >= 0.0
    loss_pt = warprnnt_numba.RNNTLossNumba(blank=4, reduction='sum', fastemit_lambda=fastemit_lambda)
    device = "cpu"
    torch.random.manual_seed(0)
    acts = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    sequence_length = torch.tensor([5, 8], dtype=torch.int32, device=device)
    labels = torch.tensor([[4, 1, 1, 3, 0], [4, 2, 2, 3, 1]], dtype=torch.int32, device=device)
    label_lengths = torch.tensor([3, 4], dtype=torch.int32, device=device)
    loss_func = warprnnt_numba.RNNTLossNumba(blank=4, reduction='none', fastemit_lambda=0.0, clamp=0.0)
    loss = loss_func(acts, labels, sequence_length, label_lengths)
    loss.sum().backward()
    grads = acts.grad

    # Costs quoted in the issue: 7.259 / 12.900 (the seed's own CPU path gives 14.465 for the second).
    np.testing.assert_allclose(loss.detach().numpy(), [7.259, 12.900], atol=1e-3)
    ref_costs, ref_grads = rnnt_loss_reference(acts.detach().numpy(), labels.numpy(), sequence_length.numpy(),
                                               label_lengths.numpy(), blank=4, reduction="none")
    np.testing.assert_allclose(loss.detach().numpy(), ref_costs, rtol=1e-6)
    np.testing.assert_allclose(grads.numpy(), ref_grads, atol=1e-6)
    assert torch.all(grads[0, 5:] == 0) and torch.all(grads[0, :, 4:] == 0)
    assert loss_pt(acts, labels, sequence_length, label_lengths).item() == pytest.approx(
        1.001 * float(ref_costs.sum()), rel=1e-6)


@pytest.mark.parametrize("fastemit_lambda,clamp", [(0.0, -1), (0.001, -1), (0.5, -1), (0.0, 0.05), (0.2, 0.1)])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_agrees_with_the_seed_package(fastemit_lambda, clamp, reduction):
    """warprnnt-numba 0.4.1 on the CPU, on inputs its CPU path reads correctly (labels exactly U wide).

    The seed's CPU path clamps after the reduction scale and incoming gradient, its CUDA path (like
    torchaudio and rnnt_xla) before; with reduction 'none'/'sum' and unit incoming gradients both agree.
    """
    warprnnt_numba = pytest.importorskip("warprnnt_numba")
    threads = numba.get_num_threads()  # the seed sets Numba's process-wide thread count to 1 on every call
    p = random_problem(np.random.default_rng(5), 4, 10, 5, 12, blank=0, variable_lengths=True)
    p.targets = np.where(p.targets < 1, 1, np.where(p.targets >= 12, 1, p.targets)).astype(np.int32)
    ours_in = as_tensors(p)
    seed_in = as_tensors(p)
    ours = RNNTLossNumba(blank=0, reduction=reduction, fastemit_lambda=fastemit_lambda, clamp=clamp)(*ours_in)
    seed = warprnnt_numba.RNNTLossNumba(blank=0, reduction=reduction, fastemit_lambda=fastemit_lambda,
                                        clamp=clamp)(*seed_in)
    ours.sum().backward()
    seed.sum().backward()
    numba.set_num_threads(threads)
    np.testing.assert_allclose(ours.detach().numpy(), seed.detach().numpy().reshape(ours.shape), rtol=1e-5)
    np.testing.assert_allclose(ours_in[0].grad.numpy(), seed_in[0].grad.numpy(), atol=1e-5)


def test_cuda_tensors_are_refused_for_now():
    meta = dict(logits=torch.randn(1, 2, 2, 3, device="meta"), targets=torch.ones(1, 1, dtype=torch.int32, device="meta"),
                logit_lengths=torch.ones(1, dtype=torch.int32, device="meta"),
                target_lengths=torch.ones(1, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="logits must be on the CPU"):
        rnnt_torch.rnnt_loss(**meta)


def test_backward_twice_with_retained_graph():
    p = random_problem(np.random.default_rng(6), 2, 6, 3, 7)
    logits, targets, logit_lengths, target_lengths = as_tensors(p)
    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, reduction="sum")
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    loss.backward()
    torch.testing.assert_close(logits.grad, 2 * first)
