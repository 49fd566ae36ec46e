"""Time to the first result in a fresh process, for each rnnt_xla adapter, with a cold and a warm Numba cache.

Each run is a fresh ``python -c`` that imports the framework and the adapter and runs one small forward +
backward ((2, 20, 5, 16); JAX: under ``jax.jit(jax.value_and_grad(...))``, which also pays XLA's compile).
All runs share a fresh, empty ``NUMBA_CACHE_DIR``: the first run of the first adapter compiles the Numba
kernels (cold), later runs load them from that on-disk cache (warm). The torch adapter is run cold, then
warm; the JAX adapter then runs warm (the kernels are the same) — and once more with a second empty cache
to show its cold cost. ``python -c "import torch"`` and ``"import jax"`` are timed for scale. Each run
reports ``to_result_s`` (launch to result ready, the number that matters) and ``total_s`` (launch to process
exit, which adds the interpreter's teardown of torch and Numba, ~0.5 s here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

_SETUP = (
    "import numpy as np\n"
    "x = np.random.default_rng(0).standard_normal((2, 20, 6, 16), dtype=np.float32)\n"
    "y = np.random.default_rng(1).integers(1, 16, (2, 5), dtype=np.int32)\n"
    "n = np.full((2,), 20, np.int32); m = np.full((2,), 5, np.int32)\n"
)
CHILDREN = {
    "torch": (
        "import json, time; t0 = time.perf_counter()\n"
        "import torch, rnnt_xla.torch as rt\n"
        "t1 = time.perf_counter()\n" + _SETUP +
        "xt = torch.from_numpy(x).requires_grad_()\n"
        "rt.rnnt_loss(xt, *map(torch.from_numpy, (y, n, m)), blank=0).backward()\n"
        "print(json.dumps({'import_s': t1 - t0, 'call_s': time.perf_counter() - t1, 'end_epoch': time.time()}))\n"
    ),
    "jax": (
        "import json, time; t0 = time.perf_counter()\n"
        "import jax, rnnt_xla.jax as rj\n"
        "t1 = time.perf_counter()\n" + _SETUP +
        "f = jax.jit(jax.value_and_grad(lambda x, y, n, m: rj.rnnt_loss(x, y, n, m, blank=0)))\n"
        "loss, grad = f(x, y, n, m); grad.block_until_ready()\n"
        "print(json.dumps({'import_s': t1 - t0, 'call_s': time.perf_counter() - t1, 'end_epoch': time.time()}))\n"
    ),
}


def _run(code: str, env: dict[str, str]) -> dict[str, object]:
    """``to_result_s``: from launching the process to the result being ready (what a user waits for);
    ``total_s``: until the process has exited (interpreter teardown of torch + Numba adds ~0.5 s here)."""
    launch_epoch = time.time()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    out = proc.stdout.strip().splitlines()
    info = json.loads(out[-1]) if out else {}
    end_epoch = info.pop("end_epoch", None)
    to_result = None if end_epoch is None else end_epoch - launch_epoch
    return {"to_result_s": to_result, "total_s": total, **info}


def first_call_times(threads: int, adapters: list[str]) -> dict[str, object]:
    """``{"runs": [{"adapter", "cache", "total_s", "import_s", "call_s"} ...], "python_import_s": {...}}``."""
    base = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="rnnt_xla_numba_cache_") as shared, \
            tempfile.TemporaryDirectory(prefix="rnnt_xla_numba_cache_") as fresh:
        env = {**base, "NUMBA_CACHE_DIR": shared}
        plan: list[tuple[str, str, dict[str, str]]] = []
        for i, adapter in enumerate(adapters):
            if i == 0:
                plan += [(adapter, "cold", env), (adapter, "warm", env)]
            else:
                plan += [(adapter, "warm", env), (adapter, "cold", {**base, "NUMBA_CACHE_DIR": fresh})]
        for adapter, cache, run_env in plan:
            runs.append({"adapter": adapter, "cache": cache, **_run(CHILDREN[adapter], run_env)})
        # One more warm run each, now that the machine's file cache holds everything (the figure a user
        # sees on the second start of the day).
        for adapter in adapters:
            runs.append({"adapter": adapter, "cache": "warm", **_run(CHILDREN[adapter], env)})
        python_import = {}
        for adapter in adapters:
            run = _run(f"import json, time, {adapter}; print(json.dumps({{'end_epoch': time.time()}}))", env)
            if "error" not in run:
                python_import[adapter] = {"to_result_s": run["to_result_s"], "total_s": run["total_s"]}
    return {"runs": runs, "python_import": python_import}
