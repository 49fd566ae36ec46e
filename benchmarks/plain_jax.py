"""RNN-T loss in plain JAX: the baseline a JAX user would write without a custom kernel.

``jax.nn.log_softmax`` over the vocabulary, the blank and next-label log-probabilities gathered, then one
``lax.scan`` over the frames in which each row of alphas (all u at once) comes from one
``jax.lax.cumlogsumexp`` (the exclusive-cumsum-of-emissions trick, as in ``plain_torch.py``). Variable
lengths are handled by masking: the scan keeps, per utterance, the log-likelihood read at its last frame
``T_b - 1`` and label position ``U_b`` (``jnp.where(t == T_b - 1, ...)``), so padded frames and labels never
reach the cost and get exactly zero gradient. ``jax.grad`` provides the backward pass; the benchmark runs
it all under ``jax.jit``.

Run ``python benchmarks/plain_jax.py`` to check it against the float64 reference
(``rnnt_xla.reference.rnnt_loss_reference``) on random inputs with variable lengths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("blank", "reduction"))
def rnnt_loss_plain_jax(
    logits: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    blank: int = -1,
    reduction: str = "mean",
) -> jax.Array:
    """RNN-T negative log-likelihood, same semantics as ``torchaudio.functional.rnnt_loss``.

    Args:
        logits: (B, T, U+1, V) float, unnormalised joint-network outputs.
        targets: (B, W) int, W >= U, padded label sequences (labels must not equal ``blank``).
        logit_lengths: (B,) int, valid frames 1 <= T_b <= T per sequence.
        target_lengths: (B,) int, valid labels 0 <= U_b <= U per sequence.
        blank: blank index; negative values count from the end of V (-1 means V-1).
        reduction: 'none' -> (B,) costs, 'sum' -> scalar, 'mean' -> scalar sum / B.

    Returns:
        The costs, reduced as requested.
    """
    B, T, U1, V = logits.shape
    if blank < 0:
        blank += V
    batch = jnp.arange(B)

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    lp_blank = log_probs[..., blank]  # (B, T, U+1)
    # Labels past U_b may hold anything; clip them into [0, V) so the gather stays in bounds. They only
    # feed alphas at u > U_b, which the masked read below never uses.
    labels = jnp.clip(targets[:, : U1 - 1].astype(jnp.int32), 0, V - 1)
    lp_emit = jnp.take_along_axis(log_probs[:, :, :-1, :], labels[:, None, :, None], axis=-1)[..., 0]  # (B, T, U)
    # Exclusive cumsum along u: emit_cum[b, t, u] = sum_{k<u} lp_emit[b, t, k], shape (B, T, U+1).
    emit_cum = jnp.pad(jnp.cumsum(lp_emit, axis=-1), ((0, 0), (0, 0), (1, 0)))

    t_last = logit_lengths.astype(jnp.int32) - 1
    u_last = target_lengths.astype(jnp.int32)

    # alpha[t, u] = emit_cum[t, u] + logcumsumexp_u'(prev[u'] - emit_cum[t, u']) where
    # prev[u'] = alpha[t-1, u'] + lp_blank[t-1, u'] (the blank arc into row t). At t = 0 only u' = 0 is
    # reachable, with log-probability 0; prev[0] stays finite, so the cumulative sums never see all -inf.
    def step(carry, xs):
        prev, log_likelihood = carry
        t, cum_t, blank_t = xs  # (), (B, U+1), (B, U+1)
        alpha_t = cum_t + jax.lax.cumlogsumexp(prev - cum_t, axis=1)
        prev = alpha_t + blank_t
        # Mask: each utterance takes its log-likelihood at its own last frame and label position.
        log_likelihood = jnp.where(t == t_last, prev[batch, u_last], log_likelihood)
        return (prev, log_likelihood), None

    prev0 = jnp.full((B, U1), -jnp.inf, dtype=log_probs.dtype).at[:, 0].set(0.0)
    init = (prev0, jnp.zeros((B,), dtype=log_probs.dtype))
    xs = (jnp.arange(T), jnp.moveaxis(emit_cum, 1, 0), jnp.moveaxis(lp_blank, 1, 0))
    (_, log_likelihood), _ = jax.lax.scan(step, init, xs)
    costs = -log_likelihood

    if reduction == "none":
        return costs
    if reduction == "sum":
        return costs.sum()
    if reduction == "mean":
        return costs.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def _self_check(trials: int = 20, seed: int = 0) -> None:
    """Compare costs and gradients with the float64 reference on small random inputs with variable lengths."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a source checkout without pip install
    from rnnt_xla.reference import rnnt_loss_reference

    rng = np.random.default_rng(seed)
    worst_cost, worst_grad = 0.0, 0.0
    for trial in range(trials):
        B, T, U, V = (int(rng.integers(lo, hi)) for lo, hi in ((1, 5), (1, 30), (0, 12), (2, 40)))
        blank = [0, V - 1][trial % 2]
        logits = (rng.standard_normal((B, T, U + 1, V)) * 3).astype(np.float32)
        targets = rng.integers(0, V - 1, (B, U)).astype(np.int32)
        targets += (targets >= blank).astype(np.int32)  # skip the blank index
        logit_lengths = rng.integers(1, T + 1, (B,)).astype(np.int32)
        target_lengths = rng.integers(0, U + 1, (B,)).astype(np.int32)
        logit_lengths[0], target_lengths[0] = T, U  # keep one full-length sequence

        def total(x):
            return rnnt_loss_plain_jax(x, targets, logit_lengths, target_lengths, blank=blank, reduction="none").sum()

        cost = np.asarray(rnnt_loss_plain_jax(logits, targets, logit_lengths, target_lengths, blank=blank,
                                              reduction="none"))
        grad = np.asarray(jax.grad(total)(logits))
        ref_cost, ref_grad = rnnt_loss_reference(logits, targets, logit_lengths, target_lengths, blank=blank,
                                                 reduction="none")
        worst_cost = max(worst_cost, float((np.abs(cost - ref_cost) / np.maximum(np.abs(ref_cost), 1.0)).max()))
        worst_grad = max(worst_grad, float(np.abs(grad - ref_grad).max()))
    print(f"{trials} random cases vs rnnt_xla.reference (float64): "
          f"max rel cost err {worst_cost:.2e}, max abs grad err {worst_grad:.2e}")
    assert worst_cost < 1e-4 and worst_grad < 1e-4, "plain JAX RNN-T loss disagrees with the reference"


if __name__ == "__main__":
    _self_check()
