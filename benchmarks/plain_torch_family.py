"""The rest of the transducer family in plain vectorised PyTorch: TDT, multi-blank RNN-T and k2's
"modified" / "constrained" RNN-T with a delay penalty. The baselines a user would write without a custom
kernel (as ``plain_torch.py`` is for RNN-T).

Each loss takes the few log-probabilities the lattice needs from one ``logsumexp`` over the vocabulary and
one ``gather`` (as k2 does: no full log-softmax tensor, and autograd's backward of the pair is one
softmax-sized gradient), puts them frame-major, and runs a Python loop over the frames in which every row of
the forward variables (all label positions u at once) comes from a handful of tensor operations; autograd
provides the backward pass. Where arcs stay on the same frame (RNN-T's and multi-blank's label arcs, TDT's
duration-0 label arcs), a row is ``emit_cum + logcumsumexp(incoming - emit_cum)`` with ``emit_cum`` the
exclusive cumulative sum of those arcs' log-probabilities along u, as in ``plain_torch.py``.

Semantics (read from the peers' sources, written here from scratch):

- TDT (Xu et al., 2023; NeMo ``TDTLossPytorch`` and its CUDA kernels, Hugging Face ``loss_tdt``): logits
  ``(B, T, U+1, V + D)``, the V label scores (blank included) then the D duration scores. A blank of
  duration d > 0 goes from (t, u) to (t + d, u), label y_{u+1} of duration d >= 0 from (t, u) to
  (t + d, u + 1) with t + d < T_b; log P sums the blank arcs of every d > 0 from (T_b - d, U_b) into T_b.
  Label log-probabilities are ``log_softmax(label part) - sigma``, durations ``log_softmax(duration part)``.
- Multi-blank RNN-T (Xu et al., 2022; NeMo ``MultiblankRNNTLossPytorch``): the standard blank at ``blank``,
  big blank i (duration ``big_blank_durations[i]``) at index ``blank - 1 - i``; a big blank of duration d
  goes from (t, u) to (t + d, u); log P adds, to the standard final blank at (T_b - 1, U_b), each big blank
  from (T_b - d, U_b). Every log-probability is ``log_softmax - sigma``.
- k2's ``rnnt_type='modified'`` (k2 ``rnnt_loss``): every arc consumes one frame, blank (t, u) -> (t + 1, u)
  and label (t, u) -> (t + 1, u + 1); log P = alpha(T_b, U_b) (no final blank), so T_b >= U_b.
  ``'constrained'`` adds to each label arc at (t, u) the blank log-probability at (t, u + 1).
  ``delay_penalty`` adds ``delay_penalty * ((T_b - 1) / 2 - t)`` to the label arcs' scores at frame t.

Run ``python benchmarks/plain_torch_family.py`` to check TDT against NeMo's published fixed case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# "log 0" as a finite number: a logsumexp over terms that are all -inf has a NaN gradient, a finite floor
# (exp underflows to exactly 0 against any real path) does not.
NEG = -1e30


def _reduce(costs: torch.Tensor, reduction: str) -> torch.Tensor:
    """'none' -> (B,) costs, 'sum' -> scalar, 'mean' -> scalar sum / B (as rnnt_xla and torchaudio)."""
    if reduction == "none":
        return costs
    if reduction == "sum":
        return costs.sum()
    if reduction == "mean":
        return costs.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _arc_log_probs(logits: torch.Tensor, targets: torch.Tensor, blanks: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the blank-like indices ``blanks`` (K of them) and of the next label at every
    (t, u): ``(B, T, U+1, K)`` and ``(B, T, U+1)``, the label NEG at u = U (no label left).

    ``logits: (B, T, U+1, V)`` unnormalised; ``targets: (B, >= U)`` int. Labels past U_b may hold anything:
    they are clamped into [0, V) and only feed cells past U_b, which no cost reads."""
    B, T, U1, V = logits.shape
    labels = torch.nn.functional.pad(targets[:, : U1 - 1].long().clamp(0, V - 1), (0, 1))  # (B, U+1)
    index = torch.cat([torch.tensor(blanks, device=logits.device).expand(B, T, U1, len(blanks)),
                       labels[:, None, :, None].expand(B, T, U1, 1)], dim=-1)
    picked = logits.gather(-1, index) - torch.logsumexp(logits, dim=-1, keepdim=True)
    label = torch.nn.functional.pad(picked[:, :, :-1, -1], (0, 1), value=NEG)
    return picked[..., :-1], label


def _frames(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(B, T, ...)`` -> T tensors ``(B, ...)``. One ``unbind`` instead of ``x[:, t]`` per frame: autograd
    then stacks the frames' gradients once instead of filling a zero tensor of x's size for each of them."""
    return x.unbind(1)


def _shift_u(x: torch.Tensor) -> torch.Tensor:
    """``(B, U+1)`` scores of arcs leaving u -> the same arcs arriving at u + 1 (NEG arrives at u = 0)."""
    return torch.nn.functional.pad(x[:, :-1], (1, 0), value=NEG)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``(..., U+1)`` arcs from u to u + 1 -> ``(..., U+1)`` sums over k < u (the path u' -> u stays on one
    frame); the last column of ``x`` (NEG) is never summed."""
    return torch.nn.functional.pad(x[..., :-1].cumsum(dim=-1), (1, 0))


def _start(B: int, U1: int, like: torch.Tensor) -> torch.Tensor:
    start = torch.full((B, U1), NEG, dtype=like.dtype, device=like.device)
    start[:, 0] = 0.0
    return start


def _logsumexp(terms: list[torch.Tensor]) -> torch.Tensor:
    return terms[0] if len(terms) == 1 else torch.logsumexp(torch.stack(terms), dim=0)


def tdt_loss_plain_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    durations: Sequence[int],
    blank: int = -1,
    sigma: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token-and-Duration Transducer negative log-likelihood (NeMo's semantics).

    Args:
        logits: (B, T, U+1, V + D) float, label scores (blank included) then D duration scores.
        targets: (B, >= U) int, padded label sequences (labels must not equal ``blank``).
        logit_lengths: (B,) int, valid frames 1 <= T_b <= T.
        target_lengths: (B,) int, valid labels 0 <= U_b <= U.
        durations: D sorted distinct ints >= 0, at least one > 0 (a blank must advance).
        blank: blank index in the label part [0, V); negative counts from V (-1 means V-1, NeMo's layout).
        sigma: logit under-normalisation, subtracted from the label log-probabilities.
        reduction: 'none' -> (B,) costs, 'sum', 'mean' (sum / B).
    """
    durations = [int(d) for d in durations]
    B, T, U1, VD = logits.shape
    D = len(durations)
    V = VD - D
    if blank < 0:
        blank += V
    lp_blank, lp_label = _arc_log_probs(logits[..., :V], targets, [blank])
    duration_lp = torch.log_softmax(logits[..., V:], dim=-1)  # (B, T, U+1, D)
    # Arc scores with their duration, (B, T, U+1, D): blank arcs stay at u, label arcs go to u + 1.
    blank_arcs = lp_blank - sigma + duration_lp
    label_arcs = (lp_label - sigma)[..., None] + duration_lp
    zero = durations.index(0) if 0 in durations else None
    emit_cum = _frames(_exclusive_cumsum(label_arcs[..., zero])) if zero is not None else None
    blank_rows, label_rows = _frames(blank_arcs.transpose(2, 3)), _frames(label_arcs.transpose(2, 3))  # (B, D, U+1)

    rows: list[torch.Tensor] = []
    for t in range(T):
        terms = [_start(B, U1, logits)] if t == 0 else []
        for i, d in enumerate(durations):
            if 0 < d <= t:  # arcs of duration d from frame t - d
                s = t - d
                terms.append(rows[s] + blank_rows[s][:, i])
                terms.append(_shift_u(rows[s] + label_rows[s][:, i]))
        incoming = _logsumexp(terms) if terms else torch.full((B, U1), NEG, dtype=logits.dtype, device=logits.device)
        if emit_cum is None:
            rows.append(incoming)
        else:  # then the duration-0 label arcs along the row
            cum = emit_cum[t]
            rows.append(cum + torch.logcumsumexp(incoming - cum, dim=-1))
    alphas = torch.stack(rows, dim=1)  # (B, T, U+1)

    batch = torch.arange(B, device=logits.device)
    u_last = target_lengths.long()
    finals = []
    for i, d in enumerate(durations):
        if d > 0:  # blank arcs of duration d that end exactly at T_b
            s = logit_lengths.long() - d
            valid = s >= 0
            s = s.clamp(min=0)
            term = alphas[batch, s, u_last] + blank_arcs[batch, s, u_last, i]
            finals.append(torch.where(valid, term, torch.full_like(term, NEG)))
    return _reduce(-_logsumexp(finals), reduction)


def multiblank_rnnt_loss_plain_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    big_blank_durations: Sequence[int],
    blank: int = -1,
    sigma: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-blank RNN-T negative log-likelihood (NeMo's semantics and vocabulary layout).

    Args:
        logits: (B, T, U+1, V) float; index ``blank`` is the standard blank, ``blank - 1 - i`` big blank i.
        targets: (B, >= U) int, padded label sequences (no blank, no big blank).
        logit_lengths, target_lengths: (B,) int, 1 <= T_b <= T, 0 <= U_b <= U.
        big_blank_durations: K ints >= 1 (NeMo uses e.g. [2, 4, 8]).
        blank: the standard blank; negative counts from V (-1 means V-1, NeMo's layout). Needs blank >= K.
        sigma: logit under-normalisation, subtracted from every log-probability.
        reduction: 'none' -> (B,) costs, 'sum', 'mean' (sum / B).
    """
    durations = [int(d) for d in big_blank_durations]
    B, T, U1, V = logits.shape
    if blank < 0:
        blank += V
    # (B, T, U+1, 1 + K): the standard blank (duration 1) and the big blanks, in NeMo's order.
    blank_lp, lp_label = _arc_log_probs(logits, targets, [blank] + [blank - 1 - i for i in range(len(durations))])
    blank_lp = blank_lp - sigma
    steps = [1] + durations
    emit_cum = _frames(_exclusive_cumsum(lp_label - sigma))
    blank_rows = _frames(blank_lp.transpose(2, 3))  # (B, 1 + K, U+1)

    rows: list[torch.Tensor] = []
    for t in range(T):
        terms = [_start(B, U1, logits)] if t == 0 else []
        terms += [rows[t - d] + blank_rows[t - d][:, j] for j, d in enumerate(steps) if d <= t]
        incoming = _logsumexp(terms) if terms else torch.full((B, U1), NEG, dtype=logits.dtype, device=logits.device)
        cum = emit_cum[t]
        rows.append(cum + torch.logcumsumexp(incoming - cum, dim=-1))
    alphas = torch.stack(rows, dim=1)

    batch = torch.arange(B, device=logits.device)
    u_last = target_lengths.long()
    finals = []
    for j, d in enumerate(steps):  # every blank that ends exactly at T_b
        s = logit_lengths.long() - d
        valid = s >= 0
        s = s.clamp(min=0)
        term = alphas[batch, s, u_last] + blank_lp[batch, s, u_last, j]
        finals.append(torch.where(valid, term, torch.full_like(term, NEG)))
    return _reduce(-_logsumexp(finals), reduction)


def modified_rnnt_loss_plain_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = -1,
    rnnt_type: str = "modified",
    delay_penalty: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """k2's one-symbol-per-frame RNN-T negative log-likelihood (``rnnt_type`` 'modified' or 'constrained').

    Args:
        logits: (B, T, U+1, V) float.
        targets: (B, >= U) int, padded label sequences (no blank).
        logit_lengths, target_lengths: (B,) int with U_b <= T_b <= T.
        blank: blank index; negative counts from V.
        rnnt_type: 'modified' or 'constrained' (label arcs also score the blank of the next context).
        delay_penalty: adds ``delay_penalty * ((T_b - 1) / 2 - t)`` to every label arc at frame t.
        reduction: 'none' -> (B,) costs, 'sum', 'mean' (sum / B).
    """
    if rnnt_type not in ("modified", "constrained"):
        raise ValueError(f"rnnt_type must be 'modified' or 'constrained', got {rnnt_type!r}")
    B, T, U1, V = logits.shape
    if blank < 0:
        blank += V
    lp_blank, lp_label = _arc_log_probs(logits, targets, [blank])
    lp_blank = lp_blank[..., 0]  # (B, T, U+1)
    if rnnt_type == "constrained":
        lp_label = lp_label + torch.nn.functional.pad(lp_blank[..., 1:], (0, 1), value=NEG)
    if delay_penalty != 0.0:
        frames = torch.arange(T, device=logits.device, dtype=logits.dtype)
        offset = (logit_lengths.to(logits.dtype) - 1) / 2
        lp_label = lp_label + (delay_penalty * (offset[:, None] - frames[None, :]))[..., None]

    # rows[t] = alpha after t frames, (B, U+1); every arc consumes one frame.
    rows = [_start(B, U1, logits)]
    for blank_t, label_t in zip(_frames(lp_blank), _frames(lp_label)):
        prev = rows[-1]
        rows.append(torch.logaddexp(prev + blank_t, _shift_u(prev + label_t)))
    alphas = torch.stack(rows, dim=1)  # (B, T+1, U+1)
    batch = torch.arange(B, device=logits.device)
    return _reduce(-alphas[batch, logit_lengths.long(), target_lengths.long()], reduction)


# The names benchmarks/family_kernels.py (the multi-blank branch) imports: per-utterance costs (B,).
def multiblank_loss_plain_torch(logits, targets, logit_lengths, target_lengths, big_blank_durations, blank=-1,
                                sigma=0.0) -> torch.Tensor:
    return multiblank_rnnt_loss_plain_torch(logits, targets, logit_lengths, target_lengths, big_blank_durations,
                                            blank=blank, sigma=sigma, reduction="none")


def rnnt_variant_loss_plain_torch(logits, targets, logit_lengths, target_lengths, blank=-1, rnnt_type="modified",
                                  delay_penalty=0.0) -> torch.Tensor:
    return modified_rnnt_loss_plain_torch(logits, targets, logit_lengths, target_lengths, blank=blank,
                                          rnnt_type=rnnt_type, delay_penalty=delay_penalty, reduction="none")


def nemo_tdt_fixed_case() -> dict:
    """NeMo's TDT known answer (tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py,
    TestTDTLoss.test_case_fixed_case_act_label): zero activations, B=1, T=3, U=1 label (label 0), V=3 labels
    + blank at index 3, durations [0, 1, 2], sigma 0.05, reduction 'sum'."""
    return {
        "logits": torch.zeros(1, 3, 2, 7), "targets": torch.tensor([[0]]), "logit_lengths": torch.tensor([3]),
        "target_lengths": torch.tensor([1]), "durations": [0, 1, 2], "blank": 3, "sigma": 0.05,
        "cost": 4.155739,
        "grads": torch.tensor([[
            [[-0.64962804, 0.25, 0.25, 0.14962798, 0.2672583, -0.16792619, -0.09933221],
             [0.01651875, 0.01651875, 0.01651875, -0.04955626, 0.022025, -0.01227201, -0.009753]],
            [[-0.04892651, 0.01714851, 0.01714851, 0.01462949, -0.01143234, -0.01143234, 0.02286467],
             [0.12531489, 0.12531489, 0.12531489, -0.37594467, 0.16708651, 0.13027048, -0.29735702]],
            [[-0.02572276, 0.00857425, 0.00857425, 0.00857425, -0.02286468, 0.01143234, 0.01143234],
             [0.13388914, 0.13388914, 0.13388914, -0.40166742, 0.17851885, -0.35703772, 0.17851885]],
        ]]),
    }


def _self_check() -> None:
    case = nemo_tdt_fixed_case()
    logits = case["logits"].clone().requires_grad_()
    cost = tdt_loss_plain_torch(logits, case["targets"], case["logit_lengths"], case["target_lengths"],
                                case["durations"], blank=case["blank"], sigma=case["sigma"], reduction="sum")
    cost.backward()
    cost = cost.detach()
    cost_err = abs(float(cost) - case["cost"])
    grad_err = float((logits.grad - case["grads"]).abs().max())
    print(f"NeMo's fixed TDT case: cost {float(cost):.6f} (NeMo {case['cost']}), max abs grad err {grad_err:.1e}")
    assert cost_err < 1e-5 and grad_err < 1e-5, "plain torch TDT disagrees with NeMo's known answer"


if __name__ == "__main__":
    _self_check()
