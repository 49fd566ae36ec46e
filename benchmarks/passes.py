"""Where rnnt_xla's time goes: each of the four CPU kernels timed on its own, on numpy arrays.

The passes run in their real order (each needs the previous one's output) with the arguments the torch
adapter passes; ``reduction='mean'`` scale, ``fused_log_softmax=True``, no FastEmit, no clamp. The betas and
the gradient are written into fresh ``np.empty`` buffers each time, as in the adapter, so their first-touch
page faults are part of their pass; ``gradients (reused buffer)`` shows the gradient pass without them.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

PASSES = ("log_normalizers", "alphas_and_costs", "betas", "gradients")


def profile_passes(logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray,
                   blank: int, repeats: int, warmup_s: float = 0.5, max_warmup: int = 10) -> dict[str, float]:
    """Median seconds of each pass over ``repeats`` runs after warm-up runs (at least one, more until
    ``warmup_s`` seconds are spent, at most ``max_warmup``); keys: :data:`PASSES`,
    ``"gradients (reused buffer)"`` and ``"sum"``."""
    from rnnt_xla.kernels import cpu

    B, T, U1, _ = logits.shape
    targets, logit_lengths, target_lengths = (np.ascontiguousarray(a, dtype=np.int64)
                                              for a in (targets, logit_lengths, target_lengths))
    costs = np.empty(B, dtype=logits.dtype)
    grad_scale = np.full(B, 1.0 / B)
    res = cpu.allocate_residuals(B, T, U1, logits.dtype)
    reused = np.empty_like(logits)
    reused.fill(0)  # touch every page once

    def run_gradients(out: np.ndarray, beta: np.ndarray) -> None:
        cpu.gradients(logits, targets, logit_lengths, target_lengths, blank, True, 0.0, -1.0, grad_scale,
                      res.log_norm, res.log_blank, res.log_emit, res.alphas, beta, res.log_likelihood, out)

    times: dict[str, list[float]] = {name: [] for name in (*PASSES, "gradients (reused buffer)")}
    warm, spent = 0, 0.0
    while True:
        laps = []
        t0 = time.perf_counter()
        cpu.log_normalizers(logits, targets, logit_lengths, target_lengths, blank, True,
                            res.log_norm, res.log_blank, res.log_emit)
        laps.append(time.perf_counter())
        cpu.alphas_and_costs(res.log_blank, res.log_emit, logit_lengths, target_lengths, 0.0,
                             res.alphas, res.log_likelihood, costs)
        laps.append(time.perf_counter())
        beta = np.empty_like(res.alphas)
        cpu.betas(res.log_blank, res.log_emit, logit_lengths, target_lengths, beta)
        laps.append(time.perf_counter())
        grads = np.empty_like(logits)
        run_gradients(grads, beta)
        laps.append(time.perf_counter())
        del grads
        t4 = time.perf_counter()
        run_gradients(reused, beta)
        t5 = time.perf_counter()
        if warm < 1 or (warm < max_warmup and spent < warmup_s):
            warm += 1  # warm-up (and, on a fresh process, the Numba compile or cache load)
            spent += t5 - t0
            continue
        starts = [t0, *laps[:-1]]
        for name, start, end in zip(PASSES, starts, laps):
            times[name].append(end - start)
        times["gradients (reused buffer)"].append(t5 - t4)
        if len(times["gradients"]) >= max(repeats, 1):
            break
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["sum"] = sum(out[name] for name in PASSES)
    return out
