"""Where the TDT loss's CPU time goes: each kernel of ``rnnt_xla.kernels.cpu_tdt`` timed on its own.

    python benchmarks/tdt_passes.py [--shapes 8,200,50,256 16,150,40,1024] [--durations 0,1,2,3,4]
                                    [--repeats 7] [--stat median|min] [--out X.json]

Shapes are ``B,T,U,V`` (label part ``V``, logits ``(B, T, U+1, V + D)``), float32, full lengths, sigma 0.05,
no FastEmit, no clamp, ``reduction='mean'`` scale. The passes run in their real order with the kernels'
own thread choice (``cpu._rows``/``cpu._cells``); the betas and the gradient go into fresh ``np.empty``
buffers each time, as in an adapter. Prints the median (or, on a shared machine, the minimum) of the repeats
(ms) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from rnnt_xla.kernels import cpu, cpu_tdt

PASSES = ("normalizers", "alphas_and_costs", "betas", "gradients")


def profile(B: int, T: int, U: int, V: int, durations: np.ndarray, repeats: int, stat=statistics.median
            ) -> dict[str, float]:
    """Seconds (``stat`` of the repeats) of each pass, of ``forward`` and of ``forward + backward``."""
    rng = np.random.default_rng(0)
    D = len(durations)
    logits = rng.standard_normal((B, T, U + 1, V + D), dtype=np.float32)
    targets = rng.integers(1, V, (B, U)).astype(np.int64)
    logit_lengths, target_lengths = np.full(B, T, np.int64), np.full(B, U, np.int64)
    costs = np.empty(B, np.float32)
    scale = np.full(B, 1.0 / B)
    res = cpu_tdt.allocate_residuals(B, T, U + 1, D, logits.dtype)
    sigma = 0.05

    def passes() -> list[float]:
        laps = [time.perf_counter()]
        cpu.threads.start_pool()
        cpu._launch(cpu_tdt.normalizers, cpu_tdt.normalizers_serial, cpu._rows(logits), logits, targets,
                    logit_lengths, target_lengths, 0, res.log_norm, res.log_blank, res.log_emit, res.log_durations)
        laps.append(time.perf_counter())
        cpu._launch(cpu_tdt.alphas_and_costs, cpu_tdt.alphas_and_costs_serial, cpu._cells(res.alphas),
                    res.log_blank, res.log_emit, res.log_durations, durations, logit_lengths, target_lengths, sigma,
                    0.0, res.alphas, res.log_likelihood, costs)
        laps.append(time.perf_counter())
        beta = np.empty_like(res.alphas)
        cpu._launch(cpu_tdt.betas, cpu_tdt.betas_serial, cpu._cells(beta), res.log_blank, res.log_emit,
                    res.log_durations, durations, logit_lengths, target_lengths, sigma, beta)
        laps.append(time.perf_counter())
        grads = np.empty_like(logits)
        cpu._launch(cpu_tdt.gradients, cpu_tdt.gradients_serial, cpu._rows(logits), logits, targets, logit_lengths,
                    target_lengths, 0, durations, sigma, 0.0, -1.0, False, scale, res.log_norm, res.log_blank,
                    res.log_emit, res.log_durations, res.alphas, beta, res.log_likelihood, grads)
        laps.append(time.perf_counter())
        return [b - a for a, b in zip(laps, laps[1:])]

    def forward() -> None:
        cpu_tdt.forward(logits, targets, logit_lengths, target_lengths, 0, durations, sigma, 0.0, False, costs, res)

    def forward_backward() -> None:
        forward()
        cpu_tdt.backward(logits, targets, logit_lengths, target_lengths, 0, durations, sigma, 0.0, -1.0, False,
                         scale, res, np.empty_like(logits))

    passes(), forward(), forward_backward()  # compile or load the kernels, start the pool
    laps = [passes() for _ in range(repeats)]
    out = {name: stat(lap[i] for lap in laps) for i, name in enumerate(PASSES)}
    for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = stat(ts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8,200,50,256", "16,150,40,1024"])
    parser.add_argument("--durations", default="0,1,2,3,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: none)")
    args = parser.parse_args()
    durations = np.array([int(d) for d in args.durations.split(",")], np.int64)
    results = {}
    print(f"{'shape (B,T,U,V+D)':>22} " + " ".join(f"{n:>17}" for n in (*PASSES, "forward", "forward+backward")))
    for text in args.shapes:
        B, T, U, V = (int(x) for x in text.split(","))
        times = profile(B, T, U, V, durations, args.repeats, statistics.median if args.stat == "median" else min)
        key = f"{B},{T},{U},{V}+{len(durations)}"
        results[key] = times
        print(f"{key:>22} " + " ".join(f"{1e3 * s:>14.1f} ms" for s in times.values()), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"durations": durations.tolist(), f"{args.stat}_s": results}, indent=1))


if __name__ == "__main__":
    main()
