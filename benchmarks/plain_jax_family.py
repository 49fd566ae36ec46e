"""TDT loss in plain JAX: the baseline a JAX user would write without a custom kernel (as ``plain_jax.py`` is
for RNN-T); same semantics as ``tdt_loss_plain_torch`` in ``plain_torch_family.py`` (NeMo's).

``jax.nn.log_softmax`` over the label part and over the duration part, the blank and next-label arc scores
gathered with their durations, then one ``lax.scan`` over the frames. Arcs of duration d > 0 leave frame t
for frame t + d, so the scan carries the arcs still on their way: ``pending[k]`` (B, U+1) is the log-sum
of the arcs arriving at frame t + k. Each step takes ``pending[0]``, adds the duration-0 label arcs along
the row with one ``jax.lax.cumlogsumexp`` (the exclusive-cumsum trick of ``plain_jax.py``), and sends its
own arcs on. The final blank arcs (frame T_b - d into T_b) are read by masking, so padded frames and labels
get exactly zero gradient. ``jax.grad`` provides the backward pass; the benchmark runs it under ``jax.jit``.

Run ``python benchmarks/plain_jax_family.py`` to check it against NeMo's published fixed case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # "log 0" as a finite number: no NaN gradient from a logsumexp of only impossible terms


@functools.partial(jax.jit, static_argnames=("durations", "blank", "sigma", "reduction"))
def tdt_loss_plain_jax(
    logits: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    durations: tuple[int, ...],
    blank: int = -1,
    sigma: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """Token-and-Duration Transducer negative log-likelihood (NeMo's semantics).

    Args:
        logits: (B, T, U+1, V + D) float, label scores (blank included) then D duration scores.
        targets: (B, >= U) int, padded label sequences (labels must not equal ``blank``).
        logit_lengths: (B,) int, valid frames 1 <= T_b <= T.
        target_lengths: (B,) int, valid labels 0 <= U_b <= U.
        durations: D sorted distinct ints >= 0 (a tuple: static), at least one > 0.
        blank: blank index in the label part [0, V); negative counts from V (-1 means V-1).
        sigma: logit under-normalisation, subtracted from the label log-probabilities.
        reduction: 'none' -> (B,) costs, 'sum', 'mean' (sum / B).
    """
    B, T, U1, VD = logits.shape
    D = len(durations)
    V = VD - D
    if blank < 0:
        blank += V
    batch = jnp.arange(B)
    log_probs = jax.nn.log_softmax(logits[..., :V], axis=-1) - sigma
    duration_lp = jax.nn.log_softmax(logits[..., V:], axis=-1)  # (B, T, U+1, D)
    labels = jnp.clip(targets[:, : U1 - 1].astype(jnp.int32), 0, V - 1)
    lp_label = jnp.take_along_axis(log_probs[:, :, :-1, :], labels[:, None, :, None], axis=-1)[..., 0]
    lp_label = jnp.pad(lp_label, ((0, 0), (0, 0), (0, 1)), constant_values=NEG)  # no label leaves u = U
    blank_arcs = log_probs[..., blank, None] + duration_lp  # (B, T, U+1, D), (t, u) -> (t + d, u)
    label_arcs = lp_label[..., None] + duration_lp  # (B, T, U+1, D), (t, u) -> (t + d, u + 1)
    if 0 in durations:  # exclusive cumsum along u of the duration-0 label arcs
        emit_cum = jnp.pad(jnp.cumsum(label_arcs[:, :, :-1, durations.index(0)], axis=-1),
                           ((0, 0), (0, 0), (1, 0)))
    else:
        emit_cum = jnp.zeros((B, T, U1), logits.dtype)
    positive = [(i, d) for i, d in enumerate(durations) if d > 0]
    horizon = max(d for _, d in positive)
    t_end = logit_lengths.astype(jnp.int32)
    u_last = target_lengths.astype(jnp.int32)

    def step(carry, xs):
        pending, log_likelihood = carry  # (horizon, B, U+1), (B,)
        t, cum, blank_t, label_t = xs  # (), (B, U+1), (B, U+1, D), (B, U+1, D)
        incoming = pending[0]
        alpha = cum + jax.lax.cumlogsumexp(incoming - cum, axis=1) if 0 in durations else incoming
        # This frame's arcs of duration d arrive d frames on: blank at u, label at u + 1.
        sent = jnp.full((horizon, B, U1), NEG, logits.dtype)
        for i, d in positive:
            label_in = jnp.pad((alpha + label_t[..., i])[:, :-1], ((0, 0), (1, 0)), constant_values=NEG)
            sent = sent.at[d - 1].set(jnp.logaddexp(alpha + blank_t[..., i], label_in))
        pending = jnp.logaddexp(jnp.concatenate([pending[1:], jnp.full((1, B, U1), NEG, logits.dtype)]), sent)
        # log P: the blank arcs of every d > 0 that end exactly at T_b, read at u = U_b.
        for i, d in positive:
            final = alpha[batch, u_last] + blank_t[batch, u_last, i]
            log_likelihood = jnp.where(t + d == t_end, jnp.logaddexp(log_likelihood, final), log_likelihood)
        return (pending, log_likelihood), None

    pending = jnp.full((horizon, B, U1), NEG, logits.dtype).at[0, :, 0].set(0.0)
    init = (pending, jnp.full((B,), NEG, logits.dtype))
    xs = (jnp.arange(T), jnp.moveaxis(emit_cum, 1, 0), jnp.moveaxis(blank_arcs, 1, 0),
          jnp.moveaxis(label_arcs, 1, 0))
    (_, log_likelihood), _ = jax.lax.scan(step, init, xs)
    costs = -log_likelihood

    if reduction == "none":
        return costs
    if reduction == "sum":
        return costs.sum()
    if reduction == "mean":
        return costs.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _self_check() -> None:
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plain_torch_family import nemo_tdt_fixed_case

    case = nemo_tdt_fixed_case()
    args = [np.asarray(case[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    options = dict(durations=tuple(case["durations"]), blank=case["blank"], sigma=case["sigma"], reduction="sum")
    cost, grad = jax.value_and_grad(lambda x: tdt_loss_plain_jax(x, *args[1:], **options))(args[0])
    grad_err = float(np.abs(np.asarray(grad) - case["grads"].numpy()).max())
    print(f"NeMo's fixed TDT case: cost {float(cost):.6f} (NeMo {case['cost']}), max abs grad err {grad_err:.1e}")
    assert abs(float(cost) - case["cost"]) < 1e-5 and grad_err < 1e-5, "plain JAX TDT disagrees with NeMo"


if __name__ == "__main__":
    _self_check()
