"""Batch reductions of the per-utterance costs, shared by every adapter (numpy, no framework).

Each reduction is a weighted sum ``loss = sum_b w_b * cost_b`` (weights 1 for ``"none"``, where nothing is
summed). Doing it here, in float64, instead of with each framework's own ``mean`` makes the torch and JAX
adapters give bit-identical results, and gives the backward pass its per-utterance scale
``w_b * incoming_gradient`` directly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cost_weights", "reduce_costs", "gradient_scale"]


def cost_weights(target_lengths: np.ndarray, reduction: str, batch: int | None = None) -> np.ndarray:
    """Weights ``(N, B) float64`` of the costs for ``target_lengths: (N, B)``.

    ``"none"``/``"sum"``: 1; ``"mean"``: 1/B; ``"mean_by_target_length"``: ``1 / (B * max(U_b, 1))``.
    ``batch`` overrides B when the costs are one shard of a larger batch.
    """
    lengths = np.asarray(target_lengths)
    batch = batch or lengths.shape[-1]
    if reduction in ("none", "sum"):
        return np.ones(lengths.shape)
    if reduction == "mean":
        return np.full(lengths.shape, 1.0 / batch)
    if reduction == "mean_by_target_length":
        return 1.0 / (batch * np.maximum(lengths, 1).astype(np.float64))
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
