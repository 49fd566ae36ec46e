"""Accuracy of float16/bfloat16 logits against the float32 result on the same (unrounded) logits.

    python benchmarks/half_precision_accuracy.py

Prints a Markdown table (max abs / max relative error of the costs, max abs error of the gradient relative
to the largest gradient entry) for the torch adapter, reduction='none', blank=0, random normal logits.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from rnnt_xla.torch import rnnt_loss


def errors(shape: tuple[int, int, int, int], dtype: torch.dtype, scale: float) -> tuple[float, float, float]:
    B, T, U, V = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, U + 1, V, generator=g) * scale
    targets = torch.randint(1, V, (B, U), generator=g, dtype=torch.int32)
    lengths = torch.full((B,), T), torch.full((B,), U)
    results = []
    for dt in (torch.float32, dtype):
        x = logits.to(dt).detach().clone().requires_grad_()
        loss = rnnt_loss(x, targets, *lengths, blank=0, reduction="none")
        loss.sum().backward()
        results.append((loss.detach().double(), x.grad.double()))
    (c32, g32), (c16, g16) = results
    cost_abs = (c16 - c32).abs().max().item()
    cost_rel = ((c16 - c32).abs() / c32.abs()).max().item()
    grad_rel = ((g16 - g32).abs().max() / g32.abs().max()).item()
    return cost_abs, cost_rel, grad_rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4,100,30,128", help="B,T,U,V")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    print("| logits | logit scale | cost max abs err | cost max rel err | grad max abs err / max abs grad |")
    print("|---|---|---|---|---|")
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        for scale in (1.0, 4.0):
            a, r, g = errors(shape, dtype, scale)
            print(f"| {name} | {scale:g} | {a:.2e} | {r:.2e} | {g:.2e} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
