"""RNN-T loss in plain vectorised PyTorch: the baseline a user would write without a custom kernel.

Only the time axis is a Python loop; each row of alphas (all u at once) comes from one
``torch.logcumsumexp``, and autograd provides the backward pass.

Run ``python benchmarks/plain_torch.py`` to check it against warprnnt_numba (the seed package).
"""

from __future__ import annotations

import torch


def rnnt_loss_plain_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    """RNN-T negative log-likelihood, same semantics as ``torchaudio.functional.rnnt_loss``.

    Args:
        logits: (B, T, U+1, V) float, unnormalised joint-network outputs.
        targets: (B, U) int, zero-padded label sequences (must not contain ``blank``).
        logit_lengths: (B,) int, valid frames T_b <= T per sequence.
        target_lengths: (B,) int, valid labels U_b <= U per sequence.
        blank: blank index; negative values count from the end of V (-1 means V-1).
        reduction: 'none' -> (B,) costs, 'sum' -> scalar, 'mean' -> scalar sum / B.

    Returns:
        The costs, reduced as requested.
    """
    B, T, U1, V = logits.shape
    if blank < 0:
        blank += V
    device = logits.device
    batch = torch.arange(B, device=device)

    log_probs = torch.log_softmax(logits, dim=-1)
    lp_blank = log_probs[..., blank]  # (B, T, U+1)
    # Padding beyond U_b may hold anything; clamp it into [0, V) so gather stays in bounds.
    # Those entries never reach alpha[T_b-1, U_b], so their values do not matter.
    labels = targets.long().clamp(0, V - 1)
    lp_emit = log_probs[:, :, :-1, :].gather(-1, labels[:, None, :, None].expand(B, T, U1 - 1, 1))
    # Exclusive cumsum along u: emit_cum[b, t, u] = sum_{k<u} lp_emit[b, t, k], shape (B, T, U+1).
    emit_cum = torch.nn.functional.pad(lp_emit.squeeze(-1).cumsum(dim=-1), (1, 0))

    # alpha[t, u] = emit_cum[t, u] + logcumsumexp_u'(prev[u'] - emit_cum[t, u']) where
    # prev[u'] = alpha[t-1, u'] + lp_blank[t-1, u'] (the blank arc into row t).
    # At t = 0 only u' = 0 is reachable, with log-probability 0.
    prev = torch.full((B, U1), float("-inf"), device=device, dtype=log_probs.dtype)
    prev[:, 0] = 0.0
    rows: list[torch.Tensor] = []
    for t in range(T):
        alpha_t = emit_cum[:, t] + torch.logcumsumexp(prev - emit_cum[:, t], dim=-1)
        rows.append(alpha_t)
        prev = alpha_t + lp_blank[:, t]
    alphas = torch.stack(rows, dim=1)  # (B, T, U+1)

    # log P(y|x) = alpha[T_b-1, U_b] + final blank; padded frames/labels are simply never read.
    t_last = logit_lengths.long() - 1
    u_last = target_lengths.long()
    costs = -(alphas[batch, t_last, u_last] + lp_blank[batch, t_last, u_last])

    if reduction == "none":
        return costs
    if reduction == "sum":
        return costs.sum()
    if reduction == "mean":
        return costs.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _self_check(trials: int = 20, seed: int = 0) -> None:
    """Compare costs and gradients with warprnnt_numba on small random inputs with variable lengths."""
    import warprnnt_numba

    gen = torch.Generator().manual_seed(seed)
    worst_cost, worst_grad = 0.0, 0.0
    for trial in range(trials):
        B, T, U, V = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 5), (1, 30), (0, 12), (2, 40)))
        blank = [0, V - 1][trial % 2]
        logits = torch.randn(B, T, U + 1, V, generator=gen) * 3
        targets = torch.randint(0, V - 1, (B, U), generator=gen, dtype=torch.int32)
        targets += (targets >= blank).int()  # skip the blank index
        logit_lengths = torch.randint(1, T + 1, (B,), generator=gen, dtype=torch.int32)
        target_lengths = torch.randint(0, U + 1, (B,), generator=gen, dtype=torch.int32)
        logit_lengths[0], target_lengths[0] = T, U  # keep one full-length sequence

        ours = logits.clone().requires_grad_()
        cost = rnnt_loss_plain_torch(ours, targets, logit_lengths, target_lengths, blank=blank, reduction="none")
        cost.sum().backward()
        seed_in = logits.clone().requires_grad_()
        ref = warprnnt_numba.RNNTLossNumba(blank=blank, reduction="none")(
            seed_in, targets, logit_lengths, target_lengths
        )
        ref.sum().backward()

        worst_cost = max(worst_cost, float(((cost - ref).detach().abs() / ref.detach().abs().clamp_min(1.0)).max()))
        worst_grad = max(worst_grad, float((ours.grad - seed_in.grad).abs().max()))
    print(f"{trials} random cases vs warprnnt_numba: "
          f"max rel cost err {worst_cost:.2e}, max abs grad err {worst_grad:.2e}")
    assert worst_cost < 1e-4 and worst_grad < 1e-4, "plain torch RNN-T loss disagrees with warprnnt_numba"


if __name__ == "__main__":
    _self_check()
