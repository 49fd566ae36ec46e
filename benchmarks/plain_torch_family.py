"""Multi-blank RNNT and k2's RNNT variants in plain vectorised PyTorch: the baselines a user would write
without a custom kernel (as ``plain_torch.py`` for the RNNT loss). Only the time axis is a Python loop;
autograd gives the backward pass.

Run ``python benchmarks/plain_torch_family.py`` to check both against ``rnnt_xla.reference`` (float64).
"""

from __future__ import annotations

import torch


def _label_log_probs(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, T, U)``: the log-probability of label ``u + 1`` at ``(t, u)`` (padding clamped into range)."""
    B, T, U1, V = log_probs.shape
    labels = targets[:, : U1 - 1].long().clamp(0, V - 1)
    return log_probs[:, :, :-1].gather(-1, labels[:, None, :, None].expand(B, T, U1 - 1, 1)).squeeze(-1)


def multiblank_loss_plain_torch(logits, targets, logit_lengths, target_lengths, big_blank_durations, blank=-1,
                                sigma=0.0):
    """Costs ``(B,)`` of the multi-blank RNNT loss (NeMo's layout: big blank ``i`` at ``blank - 1 - i``).

    Row ``t`` of the alphas: the blank arcs into it (from ``t - 1`` and from ``t - d_i``), then the label arcs
    along ``u`` with one ``torch.logcumsumexp`` (as in ``plain_torch.py``).
    """
    B, T, U1, V = logits.shape
    blank %= V
    batch = torch.arange(B)
    log_probs = torch.log_softmax(logits, dim=-1) - sigma
    lp_blank = log_probs[..., blank]
    lp_big = [log_probs[..., blank - 1 - i] for i in range(len(big_blank_durations))]
    emit_cum = torch.nn.functional.pad(_label_log_probs(log_probs, targets).cumsum(-1), (1, 0))  # (B, T, U1)
    start = torch.full((B, U1), float("-inf"), dtype=log_probs.dtype)
    start[:, 0] = 0.0
    rows: list[torch.Tensor] = []
    for t in range(T):
        arcs = [start] if t == 0 else [rows[t - 1] + lp_blank[:, t - 1]]
        arcs += [rows[t - d] + lp_big[i][:, t - d] for i, d in enumerate(big_blank_durations) if t >= d]
        into = torch.logsumexp(torch.stack(arcs), 0) if len(arcs) > 1 else arcs[0]
        rows.append(emit_cum[:, t] + torch.logcumsumexp(into - emit_cum[:, t], dim=-1))
    alphas = torch.stack(rows, 1)  # (B, T, U1)
    frames, labels = logit_lengths.long(), target_lengths.long()
    ends = [alphas[batch, frames - 1, labels] + lp_blank[batch, frames - 1, labels]]
    for i, d in enumerate(big_blank_durations):
        s = frames - d
        ok = s >= 0
        s = s.clamp(min=0)
        ends.append(torch.where(ok, alphas[batch, s, labels] + lp_big[i][batch, s, labels], float("-inf")))
    return -torch.logsumexp(torch.stack(ends), 0)


def rnnt_variant_loss_plain_torch(logits, targets, logit_lengths, target_lengths, blank=-1, rnnt_type="modified",
                                  delay_penalty=0.0):
    """Costs ``(B,)`` of the ``"modified"``/``"constrained"`` RNNT loss with k2's delay penalty: a label
    also consumes the frame, so row ``t + 1`` of the alphas comes from row ``t`` alone (one ``logaddexp``)."""
    assert rnnt_type in ("modified", "constrained")
    B, T, U1, V = logits.shape
    blank %= V
    batch = torch.arange(B)
    log_probs = torch.log_softmax(logits, dim=-1)
    lp_blank = log_probs[..., blank]  # (B, T, U1)
    score = _label_log_probs(log_probs, targets)  # (B, T, U)
    if rnnt_type == "constrained":
        score = score + lp_blank[:, :, 1:]
    if delay_penalty != 0.0:
        frames = logit_lengths.to(log_probs.dtype)
        score = score + delay_penalty * ((frames[:, None] - 1) / 2 - torch.arange(T, dtype=log_probs.dtype))[..., None]
    # unreachable states hold a large finite score, not -inf: logaddexp(-inf, -inf) has a NaN gradient
    never = -1e30
    alpha = torch.full((B, U1), never, dtype=log_probs.dtype)
    alpha[:, 0] = 0.0
    rows = [alpha]
    for t in range(T):
        label = torch.nn.functional.pad(alpha[:, :-1] + score[:, t], (1, 0), value=never)
        alpha = torch.logaddexp(alpha + lp_blank[:, t], label)
        rows.append(alpha)
    alphas = torch.stack(rows, 1)  # (B, T + 1, U1): row T_b is the end of utterance b's lattice
    return -alphas[batch, logit_lengths.long(), target_lengths.long()]


def _self_check(trials: int = 10, seed: int = 0) -> None:
    import numpy as np

    from rnnt_xla.reference import multiblank_rnnt_loss_reference, rnnt_variant_loss_reference

    rng = np.random.default_rng(seed)
    for trial in range(trials):
        B, T, U, V = 3, int(rng.integers(3, 12)), int(rng.integers(1, 5)), 9
        logits = rng.standard_normal((B, T, U + 1, V))
        frames = rng.integers(max(U, 1), T + 1, size=B)
        labels = rng.integers(0, U + 1, size=B)
        targets = rng.integers(0, V - 3, size=(B, U))
        index = [torch.from_numpy(a) for a in (targets, frames, labels)]
        cases = [("multi-blank", lambda x: multiblank_loss_plain_torch(x, *index, [2, 3], sigma=0.05),
                  lambda: multiblank_rnnt_loss_reference(logits, targets, frames, labels, [2, 3], sigma=0.05,
                                                         reduction="none"))]
        for kind in ("modified", "constrained"):
            cases.append((kind, lambda x, k=kind: rnnt_variant_loss_plain_torch(x, *index, rnnt_type=k,
                                                                                 delay_penalty=0.1),
                          lambda k=kind: rnnt_variant_loss_reference(logits, targets, frames, labels, reduction="none",
                                                                     rnnt_type=k, delay_penalty=0.1)))
        for name, plain, reference in cases:
            x = torch.tensor(logits, requires_grad=True)
            costs = plain(x)
            costs.sum().backward()
            ref_costs, ref_grad = reference()
            np.testing.assert_allclose(costs.detach().numpy(), ref_costs, rtol=1e-10, err_msg=name)
            np.testing.assert_allclose(x.grad.numpy(), ref_grad, atol=1e-10, err_msg=name)
    print(f"plain torch multi-blank / modified / constrained match rnnt_xla.reference on {trials} random batches")


if __name__ == "__main__":
    _self_check()
