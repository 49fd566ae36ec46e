"""Peak resident-memory growth of one forward + backward, measured in a fresh process per implementation.

    python benchmarks/memory.py rnnt_xla_torch 8,200,50,256 [--threads 2]    # prints one JSON line

The child process creates the inputs, compiles everything first (Numba on a tiny shape, JAX's programs
ahead of time at the full shape), returns freed heap to the OS (``malloc_trim``), resets the kernel's
resident-memory high-water mark to the current RSS (``/proc/self/clear_refs``), then reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after ONE forward + backward. The difference,
with nothing subtracted, is how much the process's peak RSS grew during the call: the gradient (one
logits-sized buffer, which every implementation returns) plus every temporary, including memory an
allocator keeps cached. It does not count the inputs, nor memory the process had touched before the call
and reuses (so, if anything, it is a lower bound).

The parent launches the child through ``sh -c '...; exit $?'``: a process started directly by a large
Python process (the benchmark) inherits that parent's ``ru_maxrss`` on Linux (the kernel carries the peak
over at exec), which would hide any growth smaller than the benchmark's own footprint.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _quiesce() -> bool:
    """Free what can be freed and reset the RSS high-water mark to the current RSS; False if the reset
    is not available (then 'before' is the peak so far, e.g. of compilation)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, shape: tuple[int, int, int, int], threads: int) -> dict[str, object]:
    from implementations import load, make_inputs, set_thread_environment

    set_thread_environment(threads)
    notes: list[str] = []
    impls = load([name], threads, notes.append)
    if name not in impls:
        return {"error": "; ".join(notes) or "not available"}
    impl = impls[name]
    warm = impl.prepare(make_inputs((2, 4, 2, 8)))  # compiles Numba kernels / torch paths (shape-independent)
    warm.fwd_bwd()
    warm.release()
    del warm
    inputs = make_inputs(shape)
    prepared = impl.prepare(inputs)  # JAX: device copies of the inputs and ahead-of-time compilation
    reset = _quiesce()
    rss_before = _current_rss_bytes()
    before = _maxrss_bytes()
    prepared.fwd_bwd()
    after = _maxrss_bytes()
    return {"rss_growth_bytes": after - before, "maxrss_before_bytes": before, "maxrss_after_bytes": after,
            "rss_before_bytes": rss_before, "high_water_reset": reset, "logits_bytes": inputs.logits_bytes}


def run_in_fresh_process(cmd: list[str], timeout_s: float) -> dict[str, object]:
    """Run ``cmd`` (a child printing one JSON line last) in a fresh process through ``sh`` (see the module
    docstring); its JSON, or ``{"error": ...}``."""
    script = " ".join(shlex.quote(c) for c in cmd) + "; exit $?"  # '; exit' keeps sh from exec'ing python
    try:
        proc = subprocess.run(["sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def measure(name: str, shape: tuple[int, int, int, int], threads: int, timeout_s: float = 900) -> dict[str, object]:
    """Run :func:`child` in a fresh process."""
    cmd = [sys.executable, str(HERE / "memory.py"), name, ",".join(map(str, shape)), "--threads", str(threads)]
    return run_in_fresh_process(cmd, timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("impl")
    parser.add_argument("shape", help="B,T,U,V")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    sys.path[:0] = [str(REPO_ROOT), str(HERE)]
    shape = tuple(int(p) for p in args.shape.split(","))
    print(json.dumps(child(args.impl, shape, args.threads)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
