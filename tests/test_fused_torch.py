"""The fused joint + loss (torch): exact against the unfused path and the float64 reference, never a full
logits tensor, padding not evaluated, dropout replayed, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnt_xla.reference import rnnt_loss_reference
from rnnt_xla.tiling import plan_tiles
from rnnt_xla.torch import FusedRNNTLoss, Joint, fused_rnnt_loss, rnnt_loss

E, P, H = 6, 5, 8


def problem(seed: int, B: int = 5, T: int = 9, U: int = 4, V: int = 7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    enc = torch.randn(B, T, E, dtype=dtype, generator=gen).requires_grad_()
    pred = torch.randn(B, U + 1, P, dtype=dtype, generator=gen).requires_grad_()
    frames = torch.from_numpy(rng.integers(1, T + 1, B))
    labels = torch.from_numpy(rng.integers(0, U + 1, B))
    frames[0], labels[0] = T, U
    targets = torch.from_numpy(rng.integers(0, V, (B, U)))
    return enc, pred, targets, frames, labels


def joint_for(V: int, dtype=torch.float64, seed: int = 0, **kwargs) -> Joint:
    torch.manual_seed(seed)
    return Joint(E, P, H, V, **kwargs).to(dtype)


def unfused_and_fused(joint, enc, pred, targets, frames, labels, tile_bytes=None, **options):
    """Loss and gradients (enc, pred, joint parameters) of both paths for ``loss.sum()``."""
    wrt = [enc, pred, *joint.parameters()]
    results = []
    for fused in (False, True):
        if fused:
            loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, tile_bytes=tile_bytes, **options)
        else:
            loss = rnnt_loss(joint(enc, pred), targets, frames, labels, **options)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), wrt)))
    return results


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "mean_by_target_length", "mean_volume"])
@pytest.mark.parametrize("tile_bytes", [None, 600, 7 * 8 * 5 * 3])  # one tile; frames split; whole utterances
@pytest.mark.parametrize("fastemit_lambda,clamp,blank", [(0.0, -1.0, 0), (0.1, 0.05, -1), (0.0, 0.2, 3)])
def test_equals_the_unfused_loss_and_all_gradients(reduction, tile_bytes, fastemit_lambda, clamp, blank):
    enc, pred, targets, frames, labels = problem(hash((reduction, tile_bytes, blank)) % 1000)
    joint = joint_for(7)
    (loss, grads), (fused_loss, fused_grads) = unfused_and_fused(
        joint, enc, pred, targets, frames, labels, tile_bytes, blank=blank, reduction=reduction,
        fastemit_lambda=fastemit_lambda, clamp=clamp)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-13, atol=1e-13)
    for name, a, b in zip(["encoder_out", "predictor_out", "joint params"], fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13, msg=name)


def test_costs_equal_the_float64_reference():
    enc, pred, targets, frames, labels = problem(1)
    joint = joint_for(7)
    costs = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, reduction="none", tile_bytes=600,
                            fastemit_lambda=0.01)
    logits = joint(enc, pred).detach().numpy()
    ref, _ = rnnt_loss_reference(logits, targets.numpy(), frames.numpy(), labels.numpy(), blank=0, reduction="none",
                                 fastemit_lambda=0.01)
    np.testing.assert_allclose(costs.detach().numpy(), ref, rtol=1e-12)


class Recording(torch.nn.Module):
    """A joint that records the shape of every logits tensor it returns."""

    def __init__(self, joint):
        super().__init__()
        self.joint = joint
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, enc, pred):
        logits = self.joint(enc, pred)
        self.shapes.append(tuple(logits.shape))
        return logits


def test_no_tile_exceeds_tile_bytes_and_padding_is_not_evaluated():
    """One long utterance and short ones: tiles cut to each group's longest lengths, each at most
    ``tile_bytes``, and far fewer cells than the padded (B, T, U+1) grid."""
    B, T, U, V = 6, 40, 10, 16
    enc, pred, targets, _, _ = problem(2, B, T, U, V, dtype=torch.float32)
    frames = torch.tensor([40, 5, 6, 4, 5, 3])
    labels = torch.tensor([10, 2, 1, 2, 0, 1])
    joint = Recording(joint_for(V, torch.float32))
    tile_bytes = 4 * V * 11 * 8  # eight frames of the longest utterance
    loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, reduction="sum", tile_bytes=tile_bytes)
    loss.backward()
    calls = joint.shapes[1:]  # the first call is the (1, 1, 1, V) probe
    assert joint.shapes[0] == (1, 1, 1, V)
    assert max(np.prod(s) * 4 for s in calls) <= tile_bytes
    forward_cells = sum(b * t * u for b, t, u, _ in calls[:len(calls) // 2])
    used = int((frames * (labels + 1)).sum())
    assert used <= forward_cells < 0.3 * B * T * (U + 1)
    assert calls[:len(calls) // 2] == calls[len(calls) // 2:]  # backward evaluates the same tiles again
    reference = rnnt_loss(joint.joint(enc, pred), targets, frames, labels, blank=0, reduction="sum")
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-4)


def test_tiles_cover_every_used_cell_exactly_once():
    rng = np.random.default_rng(3)
    frames, labels = rng.integers(1, 50, 17), rng.integers(0, 12, 17)
    for tile_bytes in (13 * 8, 1000, 10_000, 10**9):
        covered = np.zeros((17, 50), int)
        for tile in plan_tiles(frames, labels, vocab=2, itemsize=4, tile_bytes=tile_bytes):
            assert np.prod(tile.logits_shape(2)) * 4 <= tile_bytes
            assert tile.positions == labels[tile.utterances].max() + 1
            assert tile.t1 <= frames[tile.utterances].max()
            covered[tile.utterances, tile.t0:tile.t1] += 1
        used = np.arange(50)[None] < frames[:, None]
        assert (covered[used] == 1).all() and (covered <= 1).all()  # padding of a shorter group member: once


class DropoutRecorder(torch.nn.Module):
    """A joint with dropout that records each mask it draws."""

    def __init__(self, joint: Joint, p: float):
        super().__init__()
        self.joint, self.p, self.masks = joint, p, []

    def forward(self, enc, pred):
        hidden = torch.tanh(self.joint.encoder(enc)[:, :, None] + self.joint.predictor(pred)[:, None])
        mask = (torch.rand(hidden.shape, dtype=hidden.dtype) >= self.p).to(hidden.dtype) / (1 - self.p)
        self.masks.append(mask)
        return self.joint.output(hidden * mask)


def test_dropout_single_tile_equals_the_unfused_path_with_the_same_seed():
    enc, pred, targets, frames, labels = problem(4)
    order = torch.argsort(frames * 100 + labels, descending=True, stable=True)  # the tile's own order
    enc, pred = enc.detach()[order].requires_grad_(), pred.detach()[order].requires_grad_()
    targets, frames, labels = targets[order], frames[order], labels[order]
    joint = joint_for(7, dropout=0.4)
    wrt = [enc, pred, *joint.parameters()]
    torch.manual_seed(11)
    loss = rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    grads = torch.autograd.grad(loss, wrt)
    torch.manual_seed(11)
    fused_loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0)
    fused_grads = torch.autograd.grad(fused_loss, wrt)
    assert joint.training and not torch.equal(joint(enc, pred), joint(enc, pred))  # dropout is on
    torch.testing.assert_close(fused_loss, loss, rtol=1e-13, atol=1e-13)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_dropout_masks_are_replayed_in_backward_and_the_random_stream_moves_as_in_forward():
    enc, pred, targets, frames, labels = problem(5)
    joint = DropoutRecorder(joint_for(7), 0.3)
    torch.manual_seed(3)
    loss = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, tile_bytes=600)
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)  # backward replays, it does not draw anew
    masks = joint.masks[1:]
    half = len(masks) // 2
    assert half > 1 and all(torch.equal(a, b) for a, b in zip(masks[:half], masks[half:]))
    assert not torch.equal(masks[0].flatten()[:10], masks[1].flatten()[:10])  # each tile its own draws


def test_plain_callables_tied_weights_and_the_module_form():
    enc, pred, targets, frames, labels = problem(6)
    W = torch.randn(E, 7, dtype=torch.float64, requires_grad=True)  # a leaf closed over by a plain function

    def joint(e, p):
        return torch.tanh(e[:, :, None, :2].sum(-1, keepdim=True) + p[:, None, :, :1]) * 0.5 + (e @ W)[:, :, None]

    loss = rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    expected = torch.autograd.grad(loss, [enc, pred, W])
    fused = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, tile_bytes=600)
    for a, b in zip(torch.autograd.grad(fused, [enc, pred, W]), expected):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    module = FusedRNNTLoss(joint_for(7), blank=0, tile_bytes=600)
    assert len(list(module.parameters())) == 6
    module(enc, pred, targets, frames, labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_refuses_a_trainable_tensor_computed_outside_the_joint():
    enc, pred, targets, frames, labels = problem(7)
    W = torch.randn(E, 7, dtype=torch.float64, requires_grad=True) * 2  # not a leaf

    def joint(e, p):
        return (e @ W)[:, :, None] + p[:, None, :, :1]

    with pytest.raises(TypeError, match="computed outside the joint"):
        fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0)


def test_errors_name_the_argument():
    enc, pred, targets, frames, labels = problem(8)
    joint = joint_for(7)
    with pytest.raises(ValueError, match="joint must return logits"):
        fused_rnnt_loss(enc, pred, lambda e, p: e, targets, frames, labels)
    with pytest.raises(ValueError, match="tile_bytes must hold at least one frame"):
        fused_rnnt_loss(enc, pred, joint, targets, frames, labels, tile_bytes=8)
    with pytest.raises(ValueError, match=r"logit_lengths must be in \[1, 9\]"):
        fused_rnnt_loss(enc, pred, joint, targets, frames + 1, labels)
    with pytest.raises(ValueError, match="targets must hold labels"):
        fused_rnnt_loss(enc, pred, joint, targets + 7, torch.full_like(frames, 9), torch.full_like(labels, 4))
    with pytest.raises(ValueError, match="predictor_out must have batch size 5"):
        fused_rnnt_loss(enc, pred[:2], joint, targets, frames, labels)
    with pytest.raises(ValueError, match="blank must be in"):
        fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=7)


def test_empty_batch_and_autocast():
    enc, pred, targets, frames, labels = problem(9, dtype=torch.float32)
    joint = joint_for(7, torch.float32)
    empty = fused_rnnt_loss(enc[:0], pred[:0], joint, targets[:0], frames[:0], labels[:0], reduction="sum")
    assert empty.item() == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
        expected = torch.autograd.grad(loss, [enc, *joint.parameters()])
        fused = fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, tile_bytes=300)
        got = torch.autograd.grad(fused, [enc, *joint.parameters()])
    torch.testing.assert_close(fused, loss, rtol=1e-2, atol=1e-2)  # bfloat16 matmuls of other shapes
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_default_tile_bytes_is_the_cpu_default():
    """Without ``tile_bytes`` a CPU batch is cut into tiles of at most ``DEFAULT_TILE_BYTES`` (16 MB) and no
    fewer than needed: here 3 of 5.6 MB each (whole utterances: 2 + 2 + 1), not one 28 MB tile."""
    from rnnt_xla.tiling import DEFAULT_CUDA_TILE_BYTES, DEFAULT_TILE_BYTES, default_tile_bytes

    assert (DEFAULT_TILE_BYTES, DEFAULT_CUDA_TILE_BYTES) == (16 << 20, 256 << 20)
    assert default_tile_bytes(False) == DEFAULT_TILE_BYTES and default_tile_bytes(True) == DEFAULT_CUDA_TILE_BYTES
    B, T, U, V = 5, 40, 34, 1024  # one utterance's logits: 40 * 35 * 1024 * 4 bytes = 5.6 MB
    enc, pred, targets, _, _ = problem(3, B, T, U, V, dtype=torch.float32)
    frames, labels = torch.full((B,), T), torch.full((B,), U)
    joint = Recording(joint_for(V, torch.float32))
    fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0).backward()
    calls = joint.shapes[1:]
    assert calls[:len(calls) // 2] == [(2, T, U + 1, V), (2, T, U + 1, V), (1, T, U + 1, V)]
