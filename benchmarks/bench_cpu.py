"""CPU benchmark suite of the RNN-T loss: rnnt_xla (torch and JAX adapters) against its peers.

    python benchmarks/bench_cpu.py                        # everything (about 10-15 min on 2 cores)
    python benchmarks/bench_cpu.py --skip-seed            # leave out the very slow seed (warprnnt_numba)
    python benchmarks/bench_cpu.py --shapes 2,20,5,16 --repeats 3 --no-memory --no-first-call --out /tmp/s.json
    ~/.venvs/rnnt-peers/bin/python benchmarks/bench_cpu.py   # with torchaudio (benchmarks/setup_peers.sh)

Per shape, every implementation is timed forward + backward (``reduction='mean'``, then the gradient w.r.t.
the logits) and forward only, on identical inputs (blank=0, full lengths), round-robin over
implementations. Then, per shape: rnnt_xla_torch with 1 vs N Numba threads, a roofline kernel
(``roofline.py``), and each of rnnt_xla's four kernel passes on its own (``passes.py``). After all shapes:
the peak RSS growth of one fwd+bwd per implementation and shape, each in a fresh process (``memory.py``),
and the time to a first result in a fresh process (``first_call.py``). Output: Markdown tables on the
terminal, ``benchmarks/results/cpu_<hostname>.json`` (+ ``.md``, and ``_fwd_bwd.png`` / ``_fwd.png``
plots). See benchmarks/README.md for what each number means.
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
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# `python benchmarks/bench_cpu.py` puts benchmarks/ (not the repo root) on sys.path; add the root so a
# source checkout of rnnt_xla imports without `pip install -e .`.
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from implementations import ORDER, REFERENCE, SEED, BLANK, Impl, Prepared, Shape, load, make_inputs  # noqa: E402
from implementations import set_thread_environment  # noqa: E402

DEFAULT_SHAPES = ["4,100,30,128", "8,200,50,256", "16,150,40,1024", "2,1000,60,128"]
MODES = ("fwd_bwd", "fwd")
NOISY = 1.5  # a median more than this times the minimum is flagged
WARMUP_S = 0.5  # warm-up calls continue until this much time is spent (see --max-warmup)


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)
    loss: float | None = None
    median_s: float | None = None
    min_s: float | None = None
    ratio: float | None = None  # median / rnnt_xla_torch's median, same shape and mode
    gb_per_s: float | None = None  # logits bytes / median
    warmup_calls: int = 0
    error: str | None = None


@dataclass
class Result:
    shape: Shape
    impl: str
    logits_bytes: int
    fwd_bwd: Timing = field(default_factory=Timing)
    fwd: Timing = field(default_factory=Timing)
    xla_memory: dict = field(default_factory=dict)  # JAX: compiled programs' memory_analysis(), bytes
    rss: dict = field(default_factory=dict)  # memory.py: peak RSS growth of one fwd+bwd in a fresh process
    error: str | None = None


def parse_shape(text: str) -> Shape:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4 or min(parts) < 1 or parts[3] < 2:
        raise argparse.ArgumentTypeError(f"shape must be B,T,U,V with B,T,U >= 1 and V >= 2, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    loss = fn()
    return time.perf_counter() - start, loss


def _median_time(fn: Callable[[], object], repeats: int, max_warmup: int) -> float:
    """Median of ``repeats`` timed calls after the same adaptive warm-up as the main timings."""
    spent, n = 0.0, 0
    while n < 1 or (n < max_warmup and spent < WARMUP_S):
        spent += _timed(fn)[0]  # type: ignore[arg-type]
        n += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_shapes(shapes: list[Shape], impls: dict[str, Impl], args: argparse.Namespace, progress, console
               ) -> tuple[list[Result], dict[str, list[dict]]]:
    """Timings of every implementation, then the per-shape extras (threads, roofline, passes)."""
    import numba

    repeats = {name: args.seed_repeats if name == SEED else args.repeats for name in impls}
    # The seed is warmed up once on a tiny input instead of once per shape: its Numba JIT does not depend on
    # the shape, and a full-size warm-up call would double an already very slow run.
    warmups = {name: 0 if name == SEED else 1 for name in impls}
    extras_steps = 3 if (args.profile and REFERENCE in impls) else 0
    per_shape = sum(len(MODES) * (repeats[n] + warmups[n]) + 1 for n in impls) + extras_steps
    task = progress.add_task("timing", total=len(shapes) * per_shape + (SEED in impls))
    results: list[Result] = []
    extras: dict[str, list[dict]] = {"thread_scaling": [], "roofline": [], "passes": []}
    failed: set[tuple[str, str]] = set()

    if SEED in impls:
        progress.update(task, description=f"{SEED} warm-up (tiny shape)")
        warm = impls[SEED].prepare(make_inputs((2, 4, 2, 8)))
        warm.fwd_bwd()
        warm.fwd()
        progress.advance(task)

    for shape in shapes:
        inputs = make_inputs(shape)  # one set of inputs per shape, shared by all implementations
        by_name = {name: Result(shape, name, inputs.logits_bytes) for name in impls}
        results.extend(by_name.values())
        prepared: dict[str, Prepared] = {}
        for name, impl in impls.items():
            progress.update(task, description=f"{name} {shape} prepare" + (" (XLA compile)" if "jax" in name else ""))
            try:
                prepared[name] = impl.prepare(inputs)
                by_name[name].xla_memory = prepared[name].memory
            except Exception as exc:
                by_name[name].error = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{name} failed to prepare {shape}: {by_name[name].error}")
            progress.advance(task)

        def call(name: str, mode: str, label: str, timed: bool, advance: bool = True) -> float | None:
            timing: Timing = getattr(by_name[name], mode)
            progress.update(task, description=f"{name} {shape} {mode} {label}")
            if advance:
                progress.advance(task)
            if (name, mode) in failed or name not in prepared:
                timing.error = timing.error or by_name[name].error or "failed on an earlier shape"
                return None
            try:
                elapsed, loss = _timed(getattr(prepared[name], mode))
            except Exception as exc:  # keep benchmarking the others; report the failure in the table
                timing.error = f"{type(exc).__name__}: {exc}"
                timing.times_s.clear()  # a partial set of timings would be misleading
                failed.add((name, mode))
                console.print(f"[red]{name} {mode} failed on {shape}: {timing.error}")
                return None
            if timed:
                timing.times_s.append(elapsed)
                timing.loss = loss
            return elapsed

        def warm_up(name: str, mode: str) -> None:
            """At least one call, then more until WARMUP_S seconds are spent (at most --max-warmup calls): the
            first few calls after a pause re-fault their fresh buffers' memory (see README, first touch)."""
            spent, n = 0.0, 0
            while n < warmups[name] or (0 < n < args.max_warmup and spent < WARMUP_S):
                elapsed = call(name, mode, f"warm-up {n + 1}", timed=False, advance=n == 0)
                n += 1
                if elapsed is None:
                    break
                spent += elapsed
            getattr(by_name[name], mode).warmup_calls = n

        if args.interleave:
            for mode in MODES:
                for name in impls:
                    warm_up(name, mode)
                # Round-robin over implementations, so that a burst of load on a shared machine hits them all
                # alike instead of skewing whichever one happened to be running.
                for i in range(max(repeats.values(), default=0)):
                    for name in impls:
                        if i < repeats[name]:
                            call(name, mode, f"{i + 1}/{repeats[name]}", timed=True)
        else:
            # Each implementation's calls back to back, as in a training loop: on a VM that hands idle memory
            # back to the host, a call that follows seconds of someone else's work re-faults its buffers
            # from the host (see README, "first touch"), which round-robin order would charge to whoever
            # follows a slow peer.
            for name in impls:
                for mode in MODES:
                    warm_up(name, mode)
                    for i in range(repeats[name]):
                        call(name, mode, f"{i + 1}/{repeats[name]}", timed=True)

        if extras_steps and REFERENCE in prepared:
            ours = prepared[REFERENCE].fwd_bwd
            progress.update(task, description=f"{REFERENCE} {shape} thread scaling")
            scaling = {}
            for n in sorted({1, args.threads}):
                numba.set_num_threads(n)
                try:
                    scaling[str(n)] = _median_time(ours, args.repeats, args.max_warmup)
                finally:
                    numba.set_num_threads(args.threads)
            extras["thread_scaling"].append({"shape": shape, "median_s": scaling})
            progress.advance(task)

            progress.update(task, description=f"roofline {shape}")
            from roofline import bytes_moved, roofline

            roof = _median_time(lambda: roofline(inputs.logits), args.repeats, args.max_warmup)
            extras["roofline"].append({"shape": shape, "median_s": roof,
                                       "gb_per_s": bytes_moved(inputs.logits) / roof / 1e9})
            progress.advance(task)

            progress.update(task, description=f"rnnt_xla passes {shape}")
            try:
                from passes import profile_passes

                times = profile_passes(inputs.logits, inputs.targets, inputs.logit_lengths, inputs.target_lengths,
                                       BLANK, args.repeats, WARMUP_S, args.max_warmup)
                extras["passes"].append({"shape": shape, "median_s": times})
            except Exception as exc:  # the kernels' signatures may move under this script
                extras["passes"].append({"shape": shape, "error": f"{type(exc).__name__}: {exc}"})
            progress.advance(task)

        for p in prepared.values():
            p.release()
        del prepared, inputs
    summarise(results, extras)
    return results, extras


def summarise_timings(results: list, gb_per_s: Callable[[object, str, float], float]) -> dict:
    """Fill in each timing's median, minimum, GB/s (``gb_per_s(result, mode, median seconds)``) and ratio to
    rnnt_xla_torch's median at the same shape and mode; returns those reference medians by (shape, mode).
    Shared by the CPU and GPU suites (their ``Result``s have ``shape``, ``impl`` and a ``Timing`` per mode)."""
    for r in results:
        for mode in MODES:
            t = getattr(r, mode)
            if t.times_s:
                t.median_s = statistics.median(t.times_s)
                t.min_s = min(t.times_s)
                t.gb_per_s = gb_per_s(r, mode, t.median_s)
    ref = {(tuple(r.shape), mode): getattr(r, mode).median_s
           for r in results if r.impl == REFERENCE for mode in MODES}
    for r in results:
        for mode in MODES:
            t = getattr(r, mode)
            base = ref.get((tuple(r.shape), mode))
            if base and t.median_s is not None:
                t.ratio = t.median_s / base
    return ref


def summarise(results: list[Result], extras: dict[str, list[dict]]) -> None:
    """Fill in medians, minima, GB/s of logits, ratios to rnnt_xla_torch; link the extras to its times."""
    ref = summarise_timings(results, lambda r, mode, seconds: r.logits_bytes / seconds / 1e9)
    for roof in extras["roofline"]:
        ours = ref.get((roof["shape"], "fwd_bwd"))
        roof["rnnt_xla_s"] = ours
        roof["ratio"] = ours / roof["median_s"] if ours else None
    for p in extras["passes"]:
        p["adapter_fwd_bwd_s"] = ref.get((p["shape"], "fwd_bwd"))


def run_memory(results: list[Result], threads: int, progress) -> None:
    from memory import measure

    task = progress.add_task("peak RSS", total=len(results))
    for r in results:
        progress.update(task, description=f"peak RSS {r.impl} {r.shape} (fresh process)")
        if r.error is None and r.fwd_bwd.error is None:
            r.rss = measure(r.impl, r.shape, threads)
        progress.advance(task)


def noise_summary(results: list[Result], load_before: float, load_after: float, others: float | None
                  ) -> dict[str, object]:
    spreads = [(f"{r.impl} {r.shape} {mode}", t.median_s / t.min_s) for r in results for mode in MODES
               for t in [getattr(r, mode)] if t.median_s and len(t.times_s) > 1]
    values = [s for _, s in spreads] or [1.0]
    return {
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_used_by_other_processes_cores": others,
        "median_over_min_median": statistics.median(values),
        "median_over_min_max": max(values),
        "noisy": [name for name, s in spreads if s > NOISY],
    }


def loss_disagreements(results: list[Result]) -> dict[str, list[float]]:
    """A speed table is only meaningful if everyone computes the same loss."""
    out = {}
    for shape in dict.fromkeys(r.shape for r in results):
        losses = [t.loss for r in results if r.shape == shape for t in (r.fwd_bwd, r.fwd) if t.loss is not None]
        if len(losses) > 1 and (max(losses) - min(losses)) > 1e-4 * max(1.0, abs(max(losses))):
            out[",".join(map(str, shape))] = losses
    return out


class CpuByOthers:
    """CPU time the rest of the machine used while the benchmark ran, in cores: (busy time of all CPUs from
    /proc/stat - this process's and its children's CPU time) / wall time. Unlike the load average, it does
    not count the benchmark itself; ~0 means the timings had the machine to themselves."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / wall) if wall > 0 else None


def first_touch_probe(megabytes: int = 256, idle_s: float = 3.0) -> dict[str, float]:
    """ms per GB to allocate and first-touch a fresh numpy buffer (huge pages, as rnnt_xla's gradient),
    right after the same memory was used ("hot") and after ``idle_s`` seconds of idling. On a VM that
    returns idle memory to its host the second is many times the first; every implementation's fresh
    buffers pay it after a pause, which is why timings run each implementation back to back."""
    import numpy as np

    n = megabytes * 2**20 // 4

    def touch() -> float:
        start = time.perf_counter()
        np.empty(n, np.float32).fill(0)
        return (time.perf_counter() - start) * 1e3 / (megabytes / 1024)

    touch()
    hot = statistics.median(touch() for _ in range(3))
    idle = []
    for _ in range(2):
        time.sleep(idle_s)
        idle.append(touch())
    return {"hot_ms_per_GB": hot, f"after_{idle_s:g}s_idle_ms_per_GB": statistics.median(idle)}


def wait_until_quiet(limit_s: float, console, threshold: float = 0.5) -> float:
    """Wait (up to ``limit_s``) for the 1-min load average to drop below ``threshold``; returns it."""
    deadline = time.monotonic() + limit_s
    load = _loadavg()
    if load >= threshold and limit_s > 0:
        with console.status(f"waiting up to {limit_s:.0f} s for a quiet machine (1-min load {load:.2f})") as status:
            while load >= threshold and time.monotonic() < deadline:
                time.sleep(10)
                load = _loadavg()
                status.update(f"waiting for a quiet machine (1-min load {load:.2f} >= {threshold})")
    return load


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def environment(threads: int) -> dict[str, object]:
    import numba
    import numpy

    cpu_model, flags = platform.processor(), []
    try:  # platform.processor() is often empty on Linux
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        cpu_flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
        flags = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in cpu_flags]
    except (OSError, StopIteration):
        pass
    try:
        threading_layer = numba.threading_layer()
    except ValueError:  # raised until some parallel Numba function has run
        threading_layer = None
    env: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cpu_simd_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer,
        # Both torch and Numba's "omp" layer start a libgomp thread pool; its wait policy changes timings.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "first_touch": first_touch_probe(),
    }
    for package in ("torch", "jax", "jaxlib", "torchaudio", "rnnt_xla", "warprnnt_numba", "matplotlib"):
        env[package] = _version(package)
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    module = sys.modules.get(package)
    if getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit, so a results file can be traced to the code it measured."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


def _git_dirty() -> bool | None:
    """Whether rnnt_xla/ differs from the commit (the benchmark measures the working tree)."""
    proc = subprocess.run(["git", "status", "--porcelain", "--", "rnnt_xla"], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    return bool(proc.stdout.strip()) if proc.returncode == 0 else None


def default_output() -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "local"
    return HERE / "results" / f"cpu_{host}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="B,T,U,V", help="logits are (B, T, U+1, V); default: %(default)s")
    parser.add_argument("--impls", nargs="+", choices=ORDER, default=ORDER, metavar="NAME",
                        help=f"implementations to run (default: all of {', '.join(ORDER)})")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per shape and mode (default: 5)")
    parser.add_argument("--seed-repeats", type=int, default=1,
                        help="timed calls per shape and mode for warprnnt_numba, very slow on CPU (default: 1)")
    parser.add_argument("--max-warmup", type=int, default=10,
                        help=f"warm-up calls per shape and mode: at least 1, more until {WARMUP_S} s are spent, "
                             "at most this many (default: 10)")
    parser.add_argument("--skip-seed", action="store_true", help="do not run warprnnt_numba")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch, Numba and XLA threads (default: usable cores)")
    parser.add_argument("--first-call", action="store_true", help="(default now; kept for old command lines)")
    parser.add_argument("--no-first-call", action="store_true", help="skip the fresh-process first-call times")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak RSS measurements")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip thread scaling, the roofline and the per-pass profile")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--interleave", action="store_true",
                        help="time round-robin over implementations instead of each one's calls back to back")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-min load average to fall below 0.5")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/cpu_<hostname>.json); the .md table and the "
                             "PNG plots go next to it")
    args = parser.parse_args(argv)
    args.profile = not args.no_profile

    # Numba and XLA read their thread counts when first imported, so set them before any implementation loads.
    set_thread_environment(args.threads)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Rich falls back to 80 columns when stdout is not a terminal (CI logs, `| tee`), too narrow for the tables.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    load_before = wait_until_quiet(args.wait_quiet, console)
    if load_before >= 0.5:
        console.print(f"[yellow]1-min load average is {load_before:.2f}: other work is running, timings will be noisy")
    names = [n for n in args.impls if not (args.skip_seed and n == SEED)]
    if args.skip_seed:
        console.print(f"[yellow]skipping {SEED} (--skip-seed)")
    impls = load(names, args.threads, lambda msg: console.print(f"[yellow]{msg}"))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)

    report: dict[str, object] = {}
    with Progress(TextColumn("{task.description:<56}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        others = CpuByOthers()
        results, extras = run_shapes(args.shapes, impls, args, progress, console)
        load_after = _loadavg()  # the timing phase only; what follows runs in child processes
        others_cores = others.cores()
        if not args.no_memory:
            run_memory(results, args.threads, progress)
        if not args.no_first_call:
            from first_call import first_call_times

            adapters = [a for a, impl in (("torch", "rnnt_xla_torch"), ("jax", "rnnt_xla_jax")) if impl in impls]
            if adapters:
                task = progress.add_task("first call in fresh processes", total=None)
                report["first_call"] = first_call_times(args.threads, adapters)
                progress.update(task, total=1, completed=1)

    report = {
        "environment": environment(args.threads),
        "settings": {"repeats": args.repeats, "seed_repeats": args.seed_repeats, "blank": BLANK,
                     "order": "round-robin" if args.interleave else "back-to-back per implementation",
                     "reduction": "mean", "implementations": {n: i.description for n, i in impls.items()}},
        "noise": noise_summary(results, load_before, load_after, others_cores),
        "loss_disagreements": loss_disagreements(results),
        "results": [asdict(r) for r in results],
        **extras,
        **report,
    }
    from report import check_targets, markdown, print_report

    report["targets"] = check_targets(report)
    print_report(report, console)

    out = args.out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")  # write then rename, so an interrupted run never leaves half a file
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report))  # the same tables as Markdown, for the README
    console.print(f"results written to {out} and {out.with_suffix('.md').name}")
    if not args.no_plots:
        try:
            from plots import write_plots

            paths = write_plots(report, out.with_suffix(""))
            console.print("plots: " + ", ".join(str(p) for p in paths))
        except ImportError as exc:
            console.print(f"[yellow]no plots: {exc} (pip install matplotlib)")


if __name__ == "__main__":
    main()
