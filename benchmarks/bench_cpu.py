"""CPU benchmark: forward + backward of the RNN-T loss for rnnt_xla, warprnnt_numba (the seed) and plain PyTorch.

    python benchmarks/bench_cpu.py                      # all three shapes, all implementations
    python benchmarks/bench_cpu.py --skip-seed --first-call
    python benchmarks/bench_cpu.py --shapes 2,20,5,16 --repeats 3

Each measurement is ``loss = impl(logits, ...)`` with reduction='mean' followed by ``loss.backward()``,
on identical inputs for every implementation (blank=0, full lengths). Results go to a rich table and to
``benchmarks/results/cpu_<hostname>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/bench_cpu.py` puts benchmarks/ (not the repo root) on sys.path; add the root so a
# source checkout of rnnt_xla imports without `pip install -e .`.
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_SHAPES = ["4,100,30,128", "8,200,50,256", "16,150,40,1024"]
BLANK = 0

Shape = tuple[int, int, int, int]  # (B, T, U, V); logits are (B, T, U+1, V)
LossFn = Callable[..., "torch.Tensor"]  # (logits, targets, logit_lengths, target_lengths) -> scalar loss


@dataclass
class Result:
    shape: Shape
    impl: str
    times_s: list[float] = field(default_factory=list)
    loss: float | None = None
    median_s: float | None = None
    ratio_vs_rnnt_xla: float | None = None
    gb_per_s: float | None = None
    error: str | None = None


def parse_shape(text: str) -> Shape:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4 or min(parts) < 1 or parts[3] < 2:
        raise argparse.ArgumentTypeError(f"shape must be B,T,U,V with B,T,U >= 1 and V >= 2, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def load_implementations(skip_seed: bool, threads: int, console: "Console") -> dict[str, LossFn]:
    """Import each implementation; one that fails to import is skipped with a printed note."""
    impls: dict[str, LossFn] = {}
    try:
        from rnnt_xla.torch import rnnt_loss

        impls["rnnt_xla"] = lambda x, y, xl, yl: rnnt_loss(x, y, xl, yl, blank=BLANK, reduction="mean")
    except Exception as exc:  # ImportError, or anything a half-finished package raises on import
        console.print(f"[yellow]skipping rnnt_xla: import failed ({type(exc).__name__}: {exc})")
    if skip_seed:
        console.print("[yellow]skipping warprnnt_numba (--skip-seed)")
    else:
        try:
            import numba
            import warprnnt_numba

            seed_loss = warprnnt_numba.RNNTLossNumba(blank=BLANK, reduction="mean")

            def seed_fn(*args: "torch.Tensor") -> "torch.Tensor":
                # The seed's CPU path calls numba.set_num_threads(1) on every call, which would silently make
                # every later rnnt_xla call single-threaded; restore the requested count. (Its backward only
                # scales gradients computed in forward, so forward is the only place this happens.)
                try:
                    return seed_loss(*args)
                finally:
                    numba.set_num_threads(threads)

            impls["warprnnt_numba"] = seed_fn
        except Exception as exc:
            console.print(f"[yellow]skipping warprnnt_numba: import failed ({type(exc).__name__}: {exc})")
    from plain_torch import rnnt_loss_plain_torch

    impls["plain_torch"] = lambda x, y, xl, yl: rnnt_loss_plain_torch(x, y, xl, yl, blank=BLANK, reduction="mean")
    return impls


def make_inputs(shape: Shape, seed: int = 0) -> tuple["torch.Tensor", ...]:
    """Random logits and labels in [1, V) (never blank=0), full lengths; int32 because the seed requires it."""
    import torch

    B, T, U, V = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=gen, dtype=torch.float32)
    targets = torch.randint(1, V, (B, U), generator=gen, dtype=torch.int32)
    logit_lengths = torch.full((B,), T, dtype=torch.int32)
    target_lengths = torch.full((B,), U, dtype=torch.int32)
    return logits.requires_grad_(), targets, logit_lengths, target_lengths


def fwd_bwd(fn: LossFn, inputs: tuple["torch.Tensor", ...]) -> tuple[float, float]:
    """One timed forward + backward; returns (seconds, loss value)."""
    logits = inputs[0]
    logits.grad = None  # every call allocates its gradient, as in a training step after zero_grad(set_to_none)
    start = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    elapsed = time.perf_counter() - start
    return elapsed, float(loss.detach().sum())


def run_benchmarks(shapes: list[Shape], impls: dict[str, LossFn], repeats: int, seed_repeats: int,
                   console: "Console") -> list[Result]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    n_repeats = {name: seed_repeats if name == "warprnnt_numba" else repeats for name in impls}
    # The seed is warmed up once on a tiny input instead of once per shape: its Numba JIT does not depend on
    # the shape, and a full-size warm-up call would double an already very slow run (~17 s per call).
    n_warmup = {name: 0 if name == "warprnnt_numba" else 1 for name in impls}
    total = len(shapes) * sum(n_repeats[name] + n_warmup[name] for name in impls) + ("warprnnt_numba" in impls)
    results: list[Result] = []
    failed: set[str] = set()
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("warm-up", total=total)
        if "warprnnt_numba" in impls:
            progress.update(task, description="warprnnt_numba warm-up (tiny shape)")
            fwd_bwd(impls["warprnnt_numba"], make_inputs((2, 4, 2, 8)))
            progress.advance(task)
        for shape in shapes:
            inputs = make_inputs(shape)  # one set of inputs per shape, shared by all implementations
            by_name = {name: Result(shape=shape, impl=name) for name in impls}
            results.extend(by_name.values())
            left = {name: n_repeats[name] + n_warmup[name] for name in impls}

            def call(name: str, label: str, timed: bool) -> None:
                result = by_name[name]
                if name in failed:
                    result.error = result.error or "failed on an earlier shape"
                    return
                progress.update(task, description=f"{name} {shape} {label}")
                try:
                    elapsed, loss = fwd_bwd(impls[name], inputs)
                except Exception as exc:  # keep benchmarking the others; report the failure in the table
                    result.error = f"{type(exc).__name__}: {exc}"
                    result.times_s.clear()  # a partial set of timings would be misleading
                    failed.add(name)
                    console.print(f"[red]{name} failed on {shape}: {result.error}")
                    return
                finally:
                    left[name] -= 1
                    progress.advance(task)
                if timed:
                    result.times_s.append(elapsed)
                    result.loss = loss

            for name in impls:
                for _ in range(n_warmup[name]):
                    call(name, "warm-up", timed=False)
            # Round-robin over implementations, so that a burst of load on a shared machine hits them all
            # alike instead of skewing whichever one happened to be running.
            for i in range(max(n_repeats.values(), default=0)):
                for name in impls:
                    if i < n_repeats[name]:
                        call(name, f"{i + 1}/{n_repeats[name]}", timed=True)
            for name in impls:  # steps skipped after a failure still count towards the bar
                progress.advance(task, left[name])
            inputs[0].grad = None
            del inputs
    summarise(results)
    return results


def summarise(results: list[Result]) -> None:
    """Fill in median, GB/s of logits processed, and each implementation's time relative to rnnt_xla."""
    for r in results:
        if r.times_s:
            B, T, U, V = r.shape
            r.median_s = statistics.median(r.times_s)
            r.gb_per_s = B * T * (U + 1) * V * 4 / r.median_s / 1e9
    for r in results:
        ref = next((o for o in results if o.shape == r.shape and o.impl == "rnnt_xla" and o.median_s), None)
        if ref is not None and r.median_s is not None:
            r.ratio_vs_rnnt_xla = r.median_s / ref.median_s


def print_table(results: list[Result], console: "Console") -> None:
    from rich.table import Table

    table = Table(title="RNN-T loss, forward + backward on CPU")
    for column in ("B,T,U,V", "implementation", "median ms", "min ms", "x rnnt_xla", "GB/s", "runs", "loss"):
        table.add_column(column, justify="left" if column in ("B,T,U,V", "implementation") else "right",
                         no_wrap=True)
    previous_shape = None
    for r in results:
        if previous_shape is not None and r.shape != previous_shape:
            table.add_section()
        shape = "" if r.shape == previous_shape else ",".join(map(str, r.shape))
        previous_shape = r.shape
        if r.median_s is None:
            table.add_row(shape, r.impl, f"[red]{r.error or 'no result'}")
            continue
        ratio = "—" if r.ratio_vs_rnnt_xla is None else f"{r.ratio_vs_rnnt_xla:.2f}"
        table.add_row(shape, r.impl, f"{r.median_s * 1e3:,.1f}", f"{min(r.times_s) * 1e3:,.1f}", ratio,
                      f"{r.gb_per_s:.3f}", str(len(r.times_s)), f"{r.loss:.3f}")
    console.print(table)
    # On small shared VMs some processes stall on thread wake-ups (every torch op waits ~16 ms); it shows as a
    # median far above the minimum. Flag it rather than let a skewed ratio pass silently.
    noisy = [f"{r.impl} {r.shape}" for r in results
             if r.median_s and len(r.times_s) > 1 and r.median_s > 2 * min(r.times_s)]
    if noisy:
        console.print(f"[yellow]noisy timings (median > 2x min), rerun before trusting them: {', '.join(noisy)}")
    # A speed table is only meaningful if everyone computes the same loss.
    for shape in dict.fromkeys(r.shape for r in results):
        losses = [r.loss for r in results if r.shape == shape and r.loss is not None]
        if len(losses) > 1 and (max(losses) - min(losses)) > 1e-4 * max(1.0, abs(max(losses))):
            console.print(f"[red]warning: implementations disagree on the loss for {shape}: {losses}")


def first_call_times(threads: int, runs: int = 2) -> dict[str, object]:
    """End-to-end time of a fresh `python -c` that imports rnnt_xla.torch and runs one small fwd+bwd.

    Both runs share a fresh, empty NUMBA_CACHE_DIR, so run 1 pays the full JIT compile and run 2 shows the
    warm on-disk cache, whatever state the package's own __pycache__ is in. A `python -c "import torch"`
    run is timed too, since most of the remaining time is interpreter and torch start-up.
    """
    child = (
        "import json, time; t0 = time.perf_counter()\n"
        "import torch, rnnt_xla.torch as rt\n"
        "t1 = time.perf_counter()\n"
        "x = torch.randn(2, 20, 6, 16, requires_grad=True)\n"
        "y = torch.randint(1, 16, (2, 5), dtype=torch.int32)\n"
        "n = torch.full((2,), 20, dtype=torch.int32); m = torch.full((2,), 5, dtype=torch.int32)\n"
        "rt.rnnt_loss(x, y, n, m, blank=0).backward()\n"
        "print(json.dumps({'import_s': t1 - t0, 'call_s': time.perf_counter() - t1}))\n"
    )
    out: dict[str, object] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="rnnt_xla_numba_cache_") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "NUMBA_NUM_THREADS": str(threads),
               "OMP_NUM_THREADS": str(threads)}
        for _ in range(runs):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", child], env=env, cwd=REPO_ROOT, capture_output=True,
                                  text=True)
            total = time.perf_counter() - start
            if proc.returncode != 0:
                out["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                break
            out["runs"].append({"total_s": total, **json.loads(proc.stdout.strip().splitlines()[-1])})
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, cwd=REPO_ROOT, check=True)
        out["python_import_torch_s"] = time.perf_counter() - start
    return out


def print_first_call(info: dict[str, object], console: "Console") -> None:
    from rich.table import Table

    if "error" in info and not info["runs"]:
        console.print(f"[yellow]first-call measurement skipped: {info['error']}")
        return
    table = Table(title="rnnt_xla first call in a fresh process (small fwd+bwd)")
    for column in ("run", "Numba cache", "total s", "imports s", "first call s"):
        table.add_column(column, justify="right")
    for i, run in enumerate(info["runs"]):  # type: ignore[arg-type]
        table.add_row(str(i + 1), "cold" if i == 0 else "warm", f"{run['total_s']:.2f}", f"{run['import_s']:.2f}",
                      f"{run['call_s']:.2f}")
    console.print(table)
    if "python_import_torch_s" in info:
        console.print(f"for scale: `python -c 'import torch'` takes {info['python_import_torch_s']:.2f} s")


def environment(threads: int) -> dict[str, object]:
    import numba
    import numpy
    import torch

    cpu_model = platform.processor()
    try:  # platform.processor() is often empty on Linux
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        threading_layer = numba.threading_layer()
    except ValueError:  # raised until some parallel Numba function has run
        threading_layer = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer,
        # Both torch and Numba's "omp" layer start a libgomp thread pool; its wait policy changes timings.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "rnnt_xla": _version("rnnt_xla"),
        "warprnnt_numba": _version("warprnnt_numba"),
        "git_commit": _git_commit(),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit, so a results file can be traced to the code it measured."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


def default_output() -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "local"
    return Path(__file__).resolve().parent / "results" / f"cpu_{host}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="B,T,U,V", help="logits are (B, T, U+1, V); default: %(default)s")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape (default: 5)")
    parser.add_argument("--seed-repeats", type=int, default=1,
                        help="timed calls per shape for warprnnt_numba, which is very slow on CPU (default: 1)")
    parser.add_argument("--skip-seed", action="store_true", help="do not run warprnnt_numba")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch and Numba threads (default: usable cores)")
    parser.add_argument("--first-call", action="store_true",
                        help="also time rnnt_xla's first call in a fresh process, cold then warm Numba cache")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/cpu_<hostname>.json)")
    args = parser.parse_args(argv)

    # Numba reads NUMBA_NUM_THREADS when it is first imported, so set it before any implementation loads.
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from rich.console import Console

    torch.set_num_threads(args.threads)
    # Rich falls back to 80 columns when stdout is not a terminal (CI logs, `| tee`), too narrow for the table.
    console = Console() if sys.stdout.isatty() else Console(width=110)
    impls = load_implementations(args.skip_seed, args.threads, console)
    results = run_benchmarks(args.shapes, impls, args.repeats, args.seed_repeats, console)
    print_table(results, console)

    report: dict[str, object] = {"environment": environment(args.threads),
                                 "results": [asdict(r) for r in results]}
    if args.first_call:
        if "rnnt_xla" in impls:
            report["first_call"] = first_call_times(args.threads)
            print_first_call(report["first_call"], console)  # type: ignore[arg-type]
        else:
            console.print("[yellow]--first-call skipped: rnnt_xla does not import")

    out = args.out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")  # write then rename, so an interrupted run never leaves half a file
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    console.print(f"results written to {out}")


if __name__ == "__main__":
    main()
