"""Command line: ``python -m rnnt_xla [check | demo | doctor]``.

``check`` (the default) computes the loss and its gradient on a built-in batch with the PyTorch adapter,
compares them with the float64 reference, and prints a small timing table. ``demo`` trains a small
spoken-digit recogniser (audio synthesised with eSpeak NG, from the optional ``demo`` extra) with the loss
in PyTorch and in JAX/Flax, or with ``--data synthetic`` a tiny transducer on synthetic frames.
``doctor`` reports whether Numba, the CUDA driver and toolkit and the GPU fit together.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

BUILT_IN_SHAPES = [(4, 100, 30, 128), (8, 200, 50, 256)]


def _built_in_batch(seed: int = 0):
    """A small batch with padding in T and U, a blank in the middle of the vocabulary and FastEmit."""
    rng = np.random.default_rng(seed)
    B, T, U, V = 4, 12, 5, 9
    logits = rng.standard_normal((B, T, U + 1, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, U)).astype(np.int32)
    logit_lengths = np.array([12, 9, 5, 1], dtype=np.int32)
    target_lengths = np.array([5, 3, 0, 1], dtype=np.int32)
    return logits, targets, logit_lengths, target_lengths, dict(blank=4, fastemit_lambda=0.01, clamp=0.5)


def _time_fwd_bwd(shape: tuple[int, int, int, int], repeats: int) -> float:
    import torch

    from rnnt_xla.torch import rnnt_loss

    B, T, U, V = shape
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, U + 1, V, generator=generator, requires_grad=True)
    targets = torch.randint(1, V, (B, U), generator=generator, dtype=torch.int32)
    lengths = torch.full((B,), T, dtype=torch.int32), torch.full((B,), U, dtype=torch.int32)
    times = []
    for _ in range(repeats + 1):  # the first call warms up (JIT or cache load)
        logits.grad = None
        start = time.perf_counter()
        rnnt_loss(logits, targets, *lengths, blank=0).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def check(repeats: int) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from rnnt_xla.reference import rnnt_loss_reference
    from rnnt_xla.torch import rnnt_loss

    console = Console()
    logits, targets, logit_lengths, target_lengths, options = _built_in_batch()
    x = torch.from_numpy(logits).requires_grad_()
    loss = rnnt_loss(x, torch.from_numpy(targets), torch.from_numpy(logit_lengths),
                     torch.from_numpy(target_lengths), reduction="none", **options)
    loss.sum().backward()
    ref_loss, ref_grad = rnnt_loss_reference(logits, targets, logit_lengths, target_lengths, reduction="none",
                                             **options)
    cost_err = float(np.max(np.abs(loss.detach().numpy() - ref_loss) / np.abs(ref_loss)))
    grad_err = float(np.max(np.abs(x.grad.numpy() - ref_grad)))
    ok = cost_err < 1e-5 and grad_err < 1e-4
    console.print(f"built-in batch {tuple(logits.shape)} (blank=4, FastEmit 0.01, clamp 0.5), costs: "
                  f"{np.array2string(loss.detach().numpy(), precision=4)}")
    console.print(f"vs float64 reference: max relative cost error {cost_err:.1e}, max gradient error "
                  f"{grad_err:.1e} -> [{'green' if ok else 'red'}]{'OK' if ok else 'MISMATCH'}[/]")

    table = Table(title=f"rnnt_xla torch, fwd+bwd, float32, median of {repeats} ({torch.get_num_threads()} threads)")
    for column in ("B", "T", "U", "V", "logits MB", "time ms", "GB/s of logits"):
        table.add_column(column, justify="right")
    for shape in BUILT_IN_SHAPES:
        seconds = _time_fwd_bwd(shape, repeats)
        megabytes = np.prod(shape[:2]) * (shape[2] + 1) * shape[3] * 4 / 1e6
        table.add_row(*map(str, shape), f"{megabytes:.0f}", f"{seconds * 1e3:.1f}", f"{megabytes / 1e3 / seconds:.1f}")
    console.print(table)
    console.print("Peers and more shapes: python benchmarks/bench_cpu.py")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from rnnt_xla.demo.models import DEFAULT_LOSS, LOSSES  # numpy only

    parser = argparse.ArgumentParser(prog="python -m rnnt_xla", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    check_parser = commands.add_parser("check", help="loss on a built-in batch vs the reference, plus timings")
    check_parser.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median reported)")
    demo_parser = commands.add_parser("demo", help="train a spoken-digit recogniser in both frameworks")
    demo_parser.add_argument("--data", choices=["speech", "synthetic"], default="speech",
                             help="digit strings synthesised with eSpeak NG (default), or synthetic frames (fast)")
    demo_parser.add_argument("--steps", type=int, default=None, help="training steps per framework")
    demo_parser.add_argument("--framework", choices=["torch", "jax", "both"], default="both")
    demo_parser.add_argument("--loss", choices=LOSSES, default=DEFAULT_LOSS,
                             help="rnnt: rnnt_loss on the joiner's full output (default); fused: fused_rnnt_loss, "
                             "the joiner evaluated inside the loss tile by tile; tdt: the Token-and-Duration Transducer (the joiner "
                             "also predicts durations 0-4, greedy decoding skips frames by them)")
    demo_parser.add_argument("--out", default=None, help="folder for results.json and the figures "
                             "(default ./rnnt_xla_demo)")
    demo_parser.add_argument("--cache-dir", default=None, help="folder of the synthesised corpus "
                             "(default $XDG_CACHE_HOME/rnnt_xla or ~/.cache/rnnt_xla)")
    commands.add_parser("doctor", help="check Numba, CUDA driver/toolkit and GPU compatibility")
    args = parser.parse_args(argv)
    if args.command in (None, "check"):
        return check(getattr(args, "repeats", 5))
    if args.command == "demo":
        from rnnt_xla.demo import main as demo_main

        return demo_main(steps=args.steps, framework=args.framework, data=args.data, out=args.out,
                         cache_dir=args.cache_dir, loss=args.loss)
    if args.command == "doctor":
        from rnnt_xla.doctor import main as doctor_main

        return doctor_main()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
