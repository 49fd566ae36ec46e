"""Batch reductions of the per-utterance costs, shared by every adapter (numpy, no framework).

Each reduction is a weighted sum ``loss = sum_b w_b * cost_b`` (weights 1 for ``"none"``, where nothing is
summed); an empty batch (``B = 0``) reduces to 0 whatever the reduction. Doing it here, in float64,
instead of with each framework's own ``mean`` makes the torch and JAX adapters give bit-identical results,
and gives the backward pass its per-utterance scale ``w_b * incoming_gradient`` directly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cost_weights", "reduce_costs", "gradient_scale"]


def cost_weights(target_lengths: np.ndarray, reduction: str, batch: int | None = None,
                 volume: np.ndarray | None = None) -> np.ndarray:
    """Weights ``(N, B) float64`` of the costs for ``target_lengths: (N, B)``.

    ``"none"``/``"sum"``: 1; ``"mean"``: 1/B; ``"mean_by_target_length"``: ``1 / (B * max(U_b, 1))``;
    ``"mean_volume"``: ``1 / max(sum_b U_b, 1)`` (NeMo's and Hugging Face's: longer targets weigh more).
    ``batch`` overrides B and ``volume: (N,)`` the sum of the target lengths when the costs are one shard of
    a larger batch.
    """
    lengths = np.asarray(target_lengths)
    batch = max(batch or lengths.shape[-1], 1)  # B = 0: the weights are empty anyway
    if reduction in ("none", "sum"):
        return np.ones(lengths.shape)
    if reduction == "mean":
        return np.full(lengths.shape, 1.0 / batch)
    if reduction == "mean_by_target_length":
        return 1.0 / (batch * np.maximum(lengths, 1).astype(np.float64))
    if reduction == "mean_volume":
        total = lengths.astype(np.float64).sum(axis=-1) if volume is None else np.asarray(volume, np.float64)
        return np.broadcast_to((1.0 / np.maximum(total, 1.0))[..., None], lengths.shape).copy()
    raise ValueError(f"unknown reduction {reduction!r}")


def reduce_costs(costs: np.ndarray, target_lengths: np.ndarray, reduction: str, out: np.ndarray,
                 batch: int | None = None) -> None:
    """Write the reduced loss of ``costs: (N, B)`` into ``out``: ``(N, B)`` for ``"none"``, else ``(N,)``."""
    if reduction == "none":
        out[...] = costs
    else:
        out[...] = (costs.astype(np.float64) * cost_weights(target_lengths, reduction, batch)).sum(axis=-1)


def gradient_scale(grad_loss: np.ndarray, target_lengths: np.ndarray, reduction: str,
                   batch: int | None = None) -> np.ndarray:
    """Per-utterance factor ``(N, B) float64`` applied to each utterance's gradient, from the incoming
    gradient of the reduced loss (``(N, B)`` for ``"none"``, else ``(N,)``)."""
    g = np.asarray(grad_loss, dtype=np.float64)
    if reduction != "none":
        g = g[..., None]
    return np.ascontiguousarray(cost_weights(target_lengths, reduction, batch) * g)
