"""Where the multi-blank loss's and the RNNT variants' CPU time goes: each kernel launch timed on its own.

    python benchmarks/family_passes.py [--shapes 8,200,50,256 16,150,40,1024] [--repeats 15] [--out X.json]

Runs the entry points (``cpu.forward``/``backward`` with ``rnnt_type``/``delay_penalty``,
``cpu_multiblank.forward``/``backward``) as an adapter does (fresh ``np.empty`` betas and gradient each
call; ``--reuse``: one touched gradient buffer, no first-touch page faults) and times every kernel they
launch through ``cpu._launch``, with the thread count it chose. Works on any checkout whose kernels go
through ``_launch`` (``PYTHONPATH=/old/tree`` for a before/after). Prints the minimum over ``--repeats``
rounds (ms; the machine is shared: the minimum is the least disturbed run) and writes them as JSON. On a
busy machine compare ``NUMBA_NUM_THREADS=1 ... --clock thread`` (CPU time of the one computing thread).
A process that compiles the kernels (the first after a source change) may time other code than one that
loads them from Numba's cache: time the second run. Logits float32, full lengths, blank last, ``reduction='mean'`` scale, no FastEmit,
no clamp; multi-blank: big blanks ``[2, 4, 8]`` added to the vocabulary, sigma 0.05.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from rnnt_xla.kernels import cpu, cpu_multiblank

# Wall-clock time, or with --clock thread the CPU time of the calling thread: with NUMBA_NUM_THREADS=1 every
# kernel runs on it, and time spent waiting for a core that other processes hold is not counted.
CLOCK = [time.perf_counter]

CASES = ("regular", "modified", "constrained", "regular+delay", "multiblank")


def _problem(B: int, T: int, U: int, V: int):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, T, U + 1, V), dtype=np.float32)
    targets = rng.integers(0, V - 4, (B, U)).astype(np.int64)  # never a blank or a big blank
    return logits, targets, np.full(B, T, np.int64), np.full(B, U, np.int64)


def _case(name: str, B: int, T: int, U: int, V: int, reuse: bool = False):
    """``(forward, backward)`` closures of one case; ``reuse``: one gradient buffer for every call (no
    first-touch page faults: the kernels' own time)."""
    scale = np.full(B, 1.0 / B)
    costs = np.empty(B, np.float32)
    if name == "multiblank":
        durations = np.array([2, 4, 8], np.int64)
        logits, targets, frames, labels = _problem(B, T, U, V + len(durations))
        res = cpu_multiblank.allocate_residuals(B, T, U + 1, len(durations), logits.dtype)
        blank = logits.shape[-1] - 1
        out = _gradient_buffer(logits, reuse)
        return (lambda: cpu_multiblank.forward(logits, targets, frames, labels, blank, durations, 0.05, 0.0, costs,
                                               res),
                lambda: cpu_multiblank.backward(logits, targets, frames, labels, blank, durations, 0.05, 0.0, -1.0,
                                                scale, res, out()))
    logits, targets, frames, labels = _problem(B, T, U, V)
    out = _gradient_buffer(logits, reuse)
    res = cpu.allocate_residuals(B, T, U + 1, logits.dtype)
    variant = {"regular": {}, "modified": dict(rnnt_type="modified"), "constrained": dict(rnnt_type="constrained"),
               "regular+delay": dict(delay_penalty=0.1)}[name]
    return (lambda: cpu.forward(logits, targets, frames, labels, V - 1, True, 0.0, costs, res, **variant),
            lambda: cpu.backward(logits, targets, frames, labels, V - 1, True, 0.0, -1.0, scale, res,
                                 out(), **variant))


def _gradient_buffer(logits: np.ndarray, reuse: bool):
    """A callable giving the gradient buffer of a call: a fresh ``np.empty_like`` (as the adapters), or the
    same touched buffer every time."""
    if not reuse:
        return lambda: np.empty_like(logits)
    buffer = np.zeros_like(logits)
    return lambda: buffer


class _Timer:
    """Replaces ``_launch`` in the kernel modules: each launch's seconds under ``kernel/threads``."""

    def __init__(self) -> None:
        self.original = cpu._launch
        self.laps: dict[str, float] = defaultdict(float)

    def __call__(self, parallel_kernel, serial_kernel, count, *args) -> None:
        t0 = CLOCK[0]()
        self.original(parallel_kernel, serial_kernel, count, *args)
        self.laps[f"{parallel_kernel.__name__}/{count}"] += CLOCK[0]() - t0

    def install(self) -> None:
        cpu._launch = cpu_multiblank._launch = self


def profile(name: str, shape: tuple[int, int, int, int], repeats: int, timer: _Timer,
            reuse: bool = False) -> dict[str, float]:
    """Minimum seconds of each launched kernel, of ``forward``, ``backward`` and both."""
    fwd, bwd = _case(name, *shape, reuse=reuse)
    fwd(), bwd()  # compile or load, start the pool
    best: dict[str, float] = {}
    for _ in range(repeats):
        timer.laps.clear()
        t0 = CLOCK[0]()
        fwd()
        t1 = CLOCK[0]()
        bwd()
        t2 = CLOCK[0]()
        lap = dict(timer.laps, forward=t1 - t0, backward=t2 - t1, **{"forward+backward": t2 - t0})
        for key, value in lap.items():
            best[key] = min(best.get(key, np.inf), value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8,200,50,256", "16,150,40,1024"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--reuse", action="store_true", help="one gradient buffer for all calls (no page faults)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: the calling thread's CPU time (with NUMBA_NUM_THREADS=1, robust to load)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: none)")
    args = parser.parse_args()
    if args.clock == "thread":
        CLOCK[0] = time.thread_time
    timer = _Timer()
    timer.install()
    results = {}
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split(","))
        for name in args.cases:
            times = profile(name, shape, args.repeats, timer, args.reuse)
            results[f"{text} {name}"] = times
            print(f"{text:>16} {name:14} " + "  ".join(f"{k} {1e3 * v:.2f}" for k, v in times.items()), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"min_s": results}, indent=1))


if __name__ == "__main__":
    main()
