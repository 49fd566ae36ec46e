"""CPU kernel speed of the multi-blank loss and the RNNT variants (rnnt_type, delay_penalty) against the
regular RNNT, on numpy arrays (no framework): median seconds of forward, backward and both.

    python benchmarks/family_kernels.py                       # every case at (8, 200, 50, 256)
    python benchmarks/family_kernels.py --regular-only --shape 16,150,40,1024 --repeats 7
    python benchmarks/family_kernels.py --plain --out results/family_kernels_vm.json   # with plain torch

``--regular-only`` imports nothing but ``cpu.forward``/``cpu.backward`` with their original arguments, so it
also times an older checkout (``PYTHONPATH=/path/to/old/tree``) for a before/after comparison of the regular
path. Multi-blank cases use ``V + K`` entries per row (the big blanks added to the vocabulary), blank last.
``--plain`` adds the plain vectorised torch losses of ``plain_torch_family.py`` (the benchmark branch's
module, ``multiblank_loss_plain_torch`` and ``rnnt_variant_loss_plain_torch``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def problem(B: int, T: int, U: int, V: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, U + 1, V)).astype(np.float32)
    targets = rng.integers(0, V - 4, size=(B, U)).astype(np.int64)  # never a blank or big blank
    return logits, targets, np.full(B, T, np.int64), np.full(B, U, np.int64)


def time_cases(cases: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of each case's ``(fwd, bwd)`` closures. The cases take turns, one run each per round,
    so that a change in the machine's load (it is shared) shifts every case alike, not the ratios."""
    for fwd, bwd in cases.values():
        fwd()
        bwd()  # compile / load, warm the pages
    laps = {name: ([], []) for name in cases}
    for _ in range(repeats):
        for name, (fwd, bwd) in cases.items():
            t0 = time.perf_counter()
            fwd()
            t1 = time.perf_counter()
            bwd()
            t2 = time.perf_counter()
            laps[name][0].append(t1 - t0)
            laps[name][1].append(t2 - t1)
    return {name: {"fwd": statistics.median(f), "bwd": statistics.median(b),
                   "fwd_bwd": statistics.median(x + y for x, y in zip(f, b))} for name, (f, b) in laps.items()}


def rnnt_case(shape, **variant):
    from rnnt_xla.kernels import cpu

    B, T, U, V = shape
    logits, targets, frames, labels = problem(B, T, U, V)
    res = cpu.allocate_residuals(B, T, U + 1, logits.dtype)
    costs = np.empty(B, np.float32)
    scale = np.full(B, 1.0 / B)

    def fwd():
        cpu.forward(logits, targets, frames, labels, V - 1, True, 0.0, costs, res, **variant)

    def bwd():
        cpu.backward(logits, targets, frames, labels, V - 1, True, 0.0, -1.0, scale, res, np.empty_like(logits),
                     **variant)

    return fwd, bwd


def multiblank_case(shape, durations=(2, 4, 8), sigma: float = 0.05):
    from rnnt_xla.kernels import cpu_multiblank

    B, T, U, V = shape
    K = len(durations)
    logits, targets, frames, labels = problem(B, T, U, V + K)
    d = np.asarray(durations, np.int64)
    res = cpu_multiblank.allocate_residuals(B, T, U + 1, K, logits.dtype)
    costs = np.empty(B, np.float32)
    scale = np.full(B, 1.0 / B)

    def fwd():
        cpu_multiblank.forward(logits, targets, frames, labels, V + K - 1, d, sigma, 0.0, costs, res)

    def bwd():
        cpu_multiblank.backward(logits, targets, frames, labels, V + K - 1, d, sigma, 0.0, -1.0, scale, res,
                                np.empty_like(logits))

    return fwd, bwd


def plain_torch_case(shape, kind: str):
    """The plain vectorised torch loss of ``plain_torch_family.py`` (forward, then autograd backward)."""
    import torch

    from plain_torch_family import multiblank_loss_plain_torch, rnnt_variant_loss_plain_torch

    B, T, U, V = shape
    K = 3 if kind == "multiblank" else 0
    logits, targets, frames, labels = problem(B, T, U, V + K)
    index = [torch.from_numpy(a) for a in (targets, frames, labels)]
    x = torch.from_numpy(logits).requires_grad_()
    state = {}

    def fwd():
        if kind == "multiblank":
            state["loss"] = multiblank_loss_plain_torch(x, *index, [2, 4, 8], sigma=0.05).mean()
        else:
            state["loss"] = rnnt_variant_loss_plain_torch(x, *index, rnnt_type=kind).mean()

    def bwd():
        x.grad = None
        state.pop("loss").backward()

    return fwd, bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,200,50,256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--regular-only", action="store_true")
    parser.add_argument("--plain", action="store_true", help="also the plain vectorised torch losses")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    cases = {"rnnt regular": rnnt_case(shape)}
    if not args.regular_only:
        cases.update({
            "multi-blank [2,4,8], sigma 0.05": multiblank_case(shape),
            "rnnt modified": rnnt_case(shape, rnnt_type="modified"),
            "rnnt constrained": rnnt_case(shape, rnnt_type="constrained"),
            "rnnt regular, delay_penalty 0.1": rnnt_case(shape, delay_penalty=0.1),
            "rnnt modified, delay_penalty 0.1": rnnt_case(shape, rnnt_type="modified", delay_penalty=0.1),
        })
    print(f"shape (B, T, U, V) = {shape}, median of {args.repeats} rounds, float32, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = time_cases(cases, args.repeats)
    if args.plain and not args.regular_only:  # on their own: taking turns with rnnt_xla slowed them (allocator)
        plain = {f"plain torch {kind}": plain_torch_case(shape, kind) for kind in ("multiblank", "modified",
                                                                                  "constrained")}
        results.update(time_cases(plain, args.repeats))
    print(f"{'case':36s} {'fwd ms':>9s} {'bwd ms':>9s} {'fwd+bwd ms':>11s} {'vs regular':>10s}")
    for name, r in results.items():
        ratio = r["fwd_bwd"] / results["rnnt regular"]["fwd_bwd"]
        print(f"{name:36s} {r['fwd'] * 1e3:9.1f} {r['bwd'] * 1e3:9.1f} {r['fwd_bwd'] * 1e3:11.1f} {ratio:9.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": shape, "repeats": args.repeats, "host": platform.node(), "cpus": os.cpu_count(),
                       "load_average_1_5_15": os.getloadavg(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
