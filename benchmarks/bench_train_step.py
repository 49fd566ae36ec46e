"""Full CPU training steps with the RNN-T loss, on a quiet machine and with one core busy.

    python benchmarks/bench_train_step.py                     # every condition and size (about 10 min on 2 cores)
    python benchmarks/bench_train_step.py --conditions quiet/torch1 busy/torch1 --sizes small --repeats 3
    python benchmarks/bench_train_step.py --demo              # also time `python -m rnnt_xla demo`, quiet and busy
    ~/.venvs/rnnt-peers/bin/python benchmarks/bench_train_step.py   # with torchaudio (benchmarks/setup_peers.sh)

A step, written once for torch and once for JAX: an encoder (Linear, tanh, Linear over the frames), a
predictor (Embedding, Linear over the previous labels, the blank first), the joint
``Linear(tanh(enc[:, :, None] + pred[:, None]))`` giving logits ``(B, T, U+1, V)``, the loss
(``reduction='mean'``, blank 0, full lengths), backward and an Adam step; the step's time ends when the loss
is on the host (JAX: the whole step is one ``jax.jit``, its loss read back with ``float``).

In each step the loss is one of:

- ``rnnt_xla``: rnnt_xla with its default settings;
- ``rnnt_xla_1thread``: rnnt_xla with ``numba.set_num_threads(1)`` around each kernel call (in the thread
  that calls the kernels, which for JAX is one of XLA's);
- ``rnnt_xla_parallel``: rnnt_xla with every pass on all of Numba's threads, whatever its size and
  torch's thread count (``rnnt_xla.kernels.threads``: size thresholds 0, ``FOLLOW_TORCH_THREADS`` off;
  left out where the kernels have no such module: there every pass is parallel already);
- ``plain_torch`` / ``plain_jax`` (``plain_torch.py``, ``plain_jax.py``): the loss written with the
  framework's own ops, autograd for the backward;
- ``torchaudio``: ``torchaudio.functional.rnnt_loss``, when torchaudio imports (only in the peers
  environment; the report says when it is missing).

Conditions, each in a fresh worker process: ``quiet/torch1``, ``quiet/torch2``, ``busy/torch1``,
``busy/torch2`` (torch with 1 or 2 intra-op threads; ``2`` means the usable cores when there are more),
``quiet/jax``, ``busy/jax``. "busy": while the worker runs, this script runs one CPU-bound background process
(``while True: pass``, not pinned), which it stops when the condition ends, also on Ctrl-C or an error; the
process also ends by itself after ``--busy-limit`` seconds. Within a worker the implementations take turns
step by step (round-robin), after each one's warm-up.

Output: a Markdown table per framework (median ms per step and ratio to the best rnnt_xla setting of the
same condition and size), ``benchmarks/results/train_step_<name>.json`` (+ ``.md``, ``.png``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# --code DIR: measure the rnnt_xla of another checkout (e.g. before a change); workers and demos inherit it.
CODE = Path(os.environ.get("RNNT_XLA_BENCH_CODE", REPO_ROOT))
sys.path[:0] = [str(CODE), str(HERE)]

from bench_cpu import CpuByOthers, _loadavg, environment, wait_until_quiet  # noqa: E402

# name: (B, T, U, V, hidden); "small" is the shape of `python -m rnnt_xla demo`'s batches.
SIZES = {
    "small": (64, 50, 8, 11, 64),
    "medium": (16, 60, 15, 128, 64),
    "large": (8, 100, 30, 512, 128),
}
FEATURES = 32
CONDITIONS = ["quiet/torch1", "quiet/torch2", "busy/torch1", "busy/torch2", "quiet/jax", "busy/jax"]
RNNT_XLA = ("rnnt_xla", "rnnt_xla_1thread", "rnnt_xla_parallel")
TARGET = 1.15  # default within this factor of the best rnnt_xla setting
WARMUP_S = 0.5
BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@dataclass
class Timing:
    condition: str
    size: str
    shape: tuple[int, int, int, int, int]  # B, T, U, V, hidden
    impl: str
    times_s: list[float] = field(default_factory=list)
    loss: float | None = None
    median_s: float | None = None
    min_s: float | None = None
    ratio_to_best_rnnt_xla: float | None = None
    error: str | None = None


# --- the loss in each implementation ---------------------------------------------------------------------


def _one_thread(kernel: Callable) -> Callable:
    """``kernel`` (``cpu.forward``/``cpu.backward``) with Numba's thread count 1 in the calling thread."""
    import numba

    try:  # numba.get_num_threads() starts Numba's pool: start it the way rnnt_xla does
        from rnnt_xla.kernels.threads import start_pool
    except ImportError:
        start_pool = None

    def wrapper(*args):
        if start_pool is not None:
            start_pool()
        before = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            numba.set_num_threads(before)

    return wrapper


class Setting:
    """An rnnt_xla setting, switched on around each of its steps (the kernels are module attributes that
    both adapters look up at each call)."""

    def __init__(self, name: str) -> None:
        from rnnt_xla.kernels import cpu

        self.name, self.cpu = name, cpu
        self.kernels = (cpu.forward, cpu.backward)
        try:
            from rnnt_xla.kernels import threads
        except ImportError:  # kernels without size thresholds: every pass is already parallel
            threads = None
        self.threads = threads

    def __enter__(self):
        if self.name == "rnnt_xla_1thread":
            self.cpu.forward, self.cpu.backward = map(_one_thread, self.kernels)
        elif self.name == "rnnt_xla_parallel":
            self.saved = (self.threads.PARALLEL_MIN_ELEMENTS, self.threads.PARALLEL_MIN_CELLS,
                          self.threads.FOLLOW_TORCH_THREADS)
            self.threads.PARALLEL_MIN_ELEMENTS = self.threads.PARALLEL_MIN_CELLS = 0
            self.threads.FOLLOW_TORCH_THREADS = False
        return self

    def __exit__(self, *exc) -> None:
        self.cpu.forward, self.cpu.backward = self.kernels
        if self.name == "rnnt_xla_parallel":
            (self.threads.PARALLEL_MIN_ELEMENTS, self.threads.PARALLEL_MIN_CELLS,
             self.threads.FOLLOW_TORCH_THREADS) = self.saved


def _available(framework: str, note: Callable[[str], None]) -> list[str]:
    names = list(RNNT_XLA)
    try:
        import rnnt_xla.kernels.threads  # noqa: F401
    except ImportError:
        names.remove("rnnt_xla_parallel")
        note("rnnt_xla_parallel left out: these kernels have no size thresholds (every pass is parallel)")
    names.append(f"plain_{framework}")
    if framework == "torch":
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import torchaudio.functional  # noqa: F401
            names.append("torchaudio")
        except Exception as exc:  # ImportError, or a torchaudio built for another torch
            note(f"torchaudio left out: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(it lives in the peers environment, benchmarks/setup_peers.sh)")
    return names


# --- torch ---------------------------------------------------------------------------------------------


def torch_steps(shape: tuple[int, ...], names: list[str]) -> dict[str, Callable[[], float]]:
    """One training-step closure per implementation, each with its own copy of the same model."""
    import warnings

    import numpy as np
    import torch

    B, T, U, V, H = shape
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.standard_normal((B, T, FEATURES), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(1, V, (B, U), dtype=np.int32))
    frame_lengths = torch.full((B,), T, dtype=torch.int32)
    label_lengths = torch.full((B,), U, dtype=torch.int32)
    previous = torch.cat([torch.zeros((B, 1), dtype=torch.long), labels.long()], dim=1)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc1, self.enc2 = torch.nn.Linear(FEATURES, H), torch.nn.Linear(H, H)
            self.embed, self.pred = torch.nn.Embedding(V, H), torch.nn.Linear(H, H)
            self.out = torch.nn.Linear(H, V)

        def forward(self) -> torch.Tensor:
            enc = self.enc2(torch.tanh(self.enc1(frames)))  # (B, T, H)
            pred = self.pred(self.embed(previous))  # (B, U+1, H)
            return self.out(torch.tanh(enc[:, :, None] + pred[:, None]))  # (B, T, U+1, V)

    def loss_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if name.startswith("rnnt_xla"):
            from rnnt_xla.torch import rnnt_loss

            return lambda x: rnnt_loss(x, labels, frame_lengths, label_lengths, blank=0, reduction="mean")
        if name == "plain_torch":
            from plain_torch import rnnt_loss_plain_torch

            return lambda x: rnnt_loss_plain_torch(x, labels, frame_lengths, label_lengths, blank=0, reduction="mean")
        import torchaudio.functional as F

        def audio(x):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return F.rnnt_loss(x, labels, frame_lengths, label_lengths, blank=0, reduction="mean")

        return audio

    steps = {}
    for name in names:
        torch.manual_seed(0)
        model = Model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = loss_fn(name)

        def step(model=model, optimizer=optimizer, loss=loss) -> float:
            optimizer.zero_grad(set_to_none=True)
            value = loss(model())
            value.backward()
            optimizer.step()
            return float(value.detach())

        steps[name] = step
    return steps


# --- JAX -----------------------------------------------------------------------------------------------


def jax_steps(shape: tuple[int, ...], names: list[str]) -> dict[str, Callable[[], float]]:
    """The torch step in JAX: one ``jax.jit`` of loss, gradient and Adam update per implementation."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    B, T, U, V, H = shape
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.standard_normal((B, T, FEATURES), dtype=np.float32))
    labels = jnp.asarray(rng.integers(1, V, (B, U), dtype=np.int32))
    frame_lengths = jnp.full((B,), T, jnp.int32)
    label_lengths = jnp.full((B,), U, jnp.int32)
    previous = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), labels], axis=1)

    def init(key) -> dict:
        keys = jax.random.split(key, 5)

        def dense(k, n_in, n_out):
            return {"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}

        return {"enc1": dense(keys[0], FEATURES, H), "enc2": dense(keys[1], H, H),
                "embed": jax.random.normal(keys[2], (V, H)), "pred": dense(keys[3], H, H),
                "out": dense(keys[4], H, V)}

    def logits_of(params) -> jax.Array:
        def apply(layer, x):
            return x @ params[layer]["w"] + params[layer]["b"]

        enc = apply("enc2", jnp.tanh(apply("enc1", frames)))
        pred = apply("pred", params["embed"][previous])
        return apply("out", jnp.tanh(enc[:, :, None] + pred[:, None]))

    def loss_fn(name: str):
        if name.startswith("rnnt_xla"):
            from rnnt_xla.jax import rnnt_loss
        else:
            from plain_jax import rnnt_loss_plain_jax as rnnt_loss
        return lambda x: rnnt_loss(x, labels, frame_lengths, label_lengths, blank=0, reduction="mean")

    def adam(params, grads, opt_state, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
        """torch.optim.Adam's update (written out: the peers environment has no optax)."""
        step, m, v = opt_state
        step = step + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        scale = lr * jnp.sqrt(1 - b2**step) / (1 - b1**step)
        params = jax.tree_util.tree_map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v)
        return params, (step, m, v)

    steps = {}
    for name in names:
        loss = loss_fn(name)

        @jax.jit
        def train(params, opt_state, loss=loss):
            value, grads = jax.value_and_grad(lambda p: loss(logits_of(p)))(params)
            params, opt_state = adam(params, grads, opt_state)
            return params, opt_state, value

        state = {"params": init(jax.random.PRNGKey(0))}
        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        state["opt"] = (jnp.zeros((), jnp.float32), zeros, zeros)

        def step(train=train, state=state) -> float:
            state["params"], state["opt"], value = train(state["params"], state["opt"])
            return float(value)

        steps[name] = step
    return steps


# --- a worker: one condition, every size and implementation --------------------------------------------


def run_worker(condition: str, sizes: list[str], repeats: int, peer_repeats: int, out: Path) -> None:
    framework = "jax" if condition.endswith("jax") else "torch"
    notes: list[str] = []
    if framework == "torch":
        import torch

        torch.set_num_threads(1 if condition.endswith("torch1") else len(os.sched_getaffinity(0)))
    names = _available(framework, notes.append)
    make_steps = jax_steps if framework == "jax" else torch_steps
    results: list[Timing] = []
    for size in sizes:
        shape = SIZES[size]
        steps = make_steps(shape, names)
        timings = {name: Timing(condition, size, shape, name) for name in names}
        results.extend(timings.values())

        def call(name: str) -> float | None:
            timing = timings[name]
            if timing.error:
                return None
            try:
                with Setting(name) if name in RNNT_XLA else _nothing():
                    start = time.perf_counter()
                    timing.loss = steps[name]()
                    return time.perf_counter() - start
            except Exception as exc:  # keep timing the others; the table shows the failure
                timing.error = f"{type(exc).__name__}: {exc}"
                timing.times_s.clear()
                return None

        # rnnt_xla's default goes first: its first call starts Numba's thread pool (the settings' own calls
        # to numba.set_num_threads would otherwise start it).
        for name in names:
            spent, n = 0.0, 0
            while n < 1 or (n < 10 and spent < WARMUP_S):
                elapsed = call(name)
                if elapsed is None:
                    break
                spent, n = spent + elapsed, n + 1
        for i in range(repeats):
            for name in names:
                if name not in RNNT_XLA and i >= peer_repeats:
                    continue
                elapsed = call(name)
                if elapsed is not None:
                    timings[name].times_s.append(elapsed)
        del steps
    import numba

    out.write_text(json.dumps({
        "results": [asdict(r) for r in results], "notes": notes,
        "numba_threading_layer": numba.threading_layer() if numba.np.ufunc.parallel._is_initialized else None,
        "numba_threads": int(numba.config.NUMBA_NUM_THREADS),
        "torch_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None,
    }))


# --- the loss alone, serial vs parallel kernels by size (how the size thresholds were chosen) -------------

CROSSOVER_SHAPES = [(16, 50, 8, 11), (64, 50, 8, 11), (16, 60, 15, 64), (8, 100, 30, 128), (16, 60, 15, 256),
                    (8, 100, 30, 256), (8, 100, 30, 512), (16, 100, 30, 512)]
CROSSOVER_CONDITIONS = ["quiet/torch2", "busy/torch2", "quiet/numpy", "busy/numpy"]


def run_crossover_worker(condition: str, repeats: int, out: Path) -> None:
    """fwd+bwd of the kernels on numpy arrays, every pass serial vs every pass parallel (thresholds 0),
    alternating call by call; "torch2": torch imported first with 2 intra-op threads (Numba then shares
    torch's OpenMP runtime), "numpy": no torch (Numba loads its own, passive)."""
    import numpy as np

    if "torch" in condition:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        torch.ones(64, 64) @ torch.ones(64, 64)
    from rnnt_xla.kernels import cpu, threads

    rows = []
    for shape in CROSSOVER_SHAPES:
        B, T, U, V = shape
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, T, U + 1, V), dtype=np.float32)
        idx = (rng.integers(1, V, (B, U)).astype(np.int64), np.full(B, T, np.int64), np.full(B, U, np.int64))

        def run() -> None:
            costs, res = np.empty(B, np.float32), cpu.allocate_residuals(B, T, U + 1, x.dtype)
            cpu.forward(x, *idx, 0, True, 0.0, costs, res)
            cpu.backward(x, *idx, 0, True, 0.0, -1.0, np.full(B, 1.0 / B), res, np.empty_like(x))

        times: dict[str, list[float]] = {"serial": [], "parallel": []}
        n = max(repeats, int(3e7 / x.size))
        for i in range(n + 2):
            for mode in times:
                threads.PARALLEL_MIN_ELEMENTS = threads.PARALLEL_MIN_CELLS = 0 if mode == "parallel" else 1 << 62
                threads.FOLLOW_TORCH_THREADS = False
                start = time.perf_counter()
                run()
                if i >= 2:  # two warm-up rounds
                    times[mode].append(time.perf_counter() - start)
        rows.append({"condition": condition, "shape": shape, "elements": int(x.size), "cells": B * T * (U + 1),
                     **{f"{m}_median_s": statistics.median(t) for m, t in times.items()}})
    out.write_text(json.dumps({"rows": rows}))


def crossover_table(rows: list[dict]):
    from report import _ms, _table

    table = _table("Loss alone (fwd+bwd kernels, numpy): median ms, every pass serial vs every pass parallel",
                   ["condition", "B,T,U,V", "elements", "cells", "serial", "parallel", "serial / parallel"], left=2)
    for r in rows:
        table.add_row(r["condition"], ",".join(map(str, r["shape"])), f"{r['elements']:,}", f"{r['cells']:,}",
                      _ms(r["serial_median_s"]), _ms(r["parallel_median_s"]),
                      f"{r['serial_median_s'] / r['parallel_median_s']:.2f}")
    return table


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# --- the background load ------------------------------------------------------------------------------


class BusyCore:
    """One CPU-bound background process while the block runs; it is stopped when the block ends (also on
    an exception or Ctrl-C), at interpreter exit, on SIGTERM, and ends by itself after ``limit_s``."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "BusyCore":
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=self.limit_s)])
        atexit.register(self.stop)
        time.sleep(0.5)  # let the scheduler see it
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()
        atexit.unregister(self.stop)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_condition(condition: str, sizes: list[str], repeats: int, peer_repeats: int, busy_limit: float,
                  timeout: float, crossover: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--crossover-worker" if crossover else "--worker", condition,
                   "--worker-out", str(out), "--repeats", str(repeats), "--peer-repeats", str(peer_repeats)]
        if sizes:
            command += ["--sizes", *sizes]
        busy = BusyCore(busy_limit) if condition.startswith("busy") else _nothing()
        with busy:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"}
        return json.loads(out.read_text())


# --- the demo --------------------------------------------------------------------------------------------


DEMOS = {"demo --steps 100 --framework torch": ["demo", "--steps", "100", "--framework", "torch"],
         "demo (full)": ["demo"]}


def time_demos(busy_limit: float, names: list[str], repeats: int = 1) -> list[dict]:
    rows = []
    for name in names:
        for condition in ("quiet", "busy"):
            for _ in range(repeats):
                busy = BusyCore(busy_limit) if condition == "busy" else _nothing()
                with busy:
                    start = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "rnnt_xla", *DEMOS[name]], capture_output=True,
                                          text=True, cwd=CODE, env={**os.environ, "PYTHONPATH": str(CODE)})
                    seconds = time.perf_counter() - start
                rows.append({"demo": name, "condition": condition, "seconds": seconds,
                             "returncode": proc.returncode, "code": str(CODE), "load_after": _loadavg()})
    return rows


# --- summary, tables, plot -----------------------------------------------------------------------------


def summarise(timings: list[dict]) -> None:
    for t in timings:
        if t["times_s"]:
            t["median_s"] = statistics.median(t["times_s"])
            t["min_s"] = min(t["times_s"])
    for t in timings:
        best = [u["median_s"] for u in timings if u["condition"] == t["condition"] and u["size"] == t["size"]
                and u["impl"] in RNNT_XLA and u["median_s"]]
        if best and t["median_s"]:
            t["ratio_to_best_rnnt_xla"] = t["median_s"] / min(best)


def check_targets(report: dict) -> list[dict]:
    rows = []
    for t in report["results"]:
        if t["impl"] == "rnnt_xla":
            value = t["ratio_to_best_rnnt_xla"]
            rows.append({"target": f"rnnt_xla default / best rnnt_xla setting, {t['condition']} {t['size']}",
                         "value": value, "goal": f"<= {TARGET}", "met": None if value is None else value <= TARGET})
    for name in DEMOS:
        quiet = [d["seconds"] for d in report.get("demos", []) if d["demo"] == name and d["condition"] == "quiet"]
        busy = [d["seconds"] for d in report.get("demos", []) if d["demo"] == name and d["condition"] == "busy"]
        if quiet and busy:
            value = statistics.median(busy) / statistics.median(quiet)
            rows.append({"target": f"{name}: busy / quiet wall time", "value": value, "goal": "<= 1.5",
                         "met": value <= 1.5})
    return rows


def tables(report: dict) -> list:
    from report import _ms, _ratio, _table

    out = []
    results = report["results"]
    for framework in ("torch", "jax"):
        conditions = [c for c in report["settings"]["conditions"] if c.endswith(framework) or framework in c]
        impls = list(dict.fromkeys(t["impl"] for t in results if t["condition"] in conditions))
        if not impls:
            continue
        table = _table(f"{framework}: median ms per training step (x = time / best rnnt_xla setting's time)",
                       ["condition", "size (B,T,U,V,H)", *impls])
        for condition in conditions:
            for size in report["settings"]["sizes"]:
                row = {t["impl"]: t for t in results if t["condition"] == condition and t["size"] == size}
                if not row:
                    continue
                cells = []
                for impl in impls:
                    t = row.get(impl)
                    if t is None or t["median_s"] is None:
                        cells.append("—" if t is None else f"error: {(t['error'] or '')[:40]}")
                    else:
                        cells.append(f"{_ms(t['median_s'])} ({_ratio(t['ratio_to_best_rnnt_xla'])}x)")
                table.add_row(condition, f"{size} {','.join(map(str, SIZES[size]))}", *cells)
        out.append(table)
    if report.get("crossover"):
        out.append(crossover_table(report["crossover"]))
    if report.get("demos"):
        table = _table("python -m rnnt_xla demo: wall time (s)", ["demo", "condition", "seconds", "exit code"])
        for d in report["demos"]:
            table.add_row(d["demo"], d["condition"], f"{d['seconds']:.1f}", str(d["returncode"]))
        out.append(table)
    table = _table("Targets", ["target", "value", "goal", "met"], left=1)
    for t in report["targets"]:
        table.add_row(t["target"], "—" if t["value"] is None else f"{t['value']:.2f}", t["goal"],
                      "—" if t["met"] is None else "yes" if t["met"] else "NO")
    out.append(table)
    return out


def markdown(report: dict) -> str:
    from report import table_markdown

    env, noise = report["environment"], report["noise"]
    parts = [f"Measured {env['date']} on {env['cpu']} ({env['cpu_count']} cores), commit {env['git_commit']}"
             f"{' (dirty)' if env.get('git_dirty') else ''}, torch {env.get('torch')}, jax {env.get('jax')}, "
             f"numba {env.get('numba')}, torchaudio {env.get('torchaudio')}.\n",
             f"Load average (1 min) before / after: {noise['loadavg_before']} / {noise['loadavg_after']}; CPU used "
             f"by processes other than this benchmark, its workers and its busy-core load: "
             f"{noise['cpu_used_by_other_processes_cores']} cores.\n"]
    parts += [f"- {note}\n" for note in report.get("notes", [])]
    parts += [table_markdown(t) for t in tables(report)]
    return "\n".join(parts)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plots import COLORS, _fmt_ms

    colors = {**COLORS, "rnnt_xla": COLORS["rnnt_xla_torch"], "rnnt_xla_1thread": "#aec7e8",
              "rnnt_xla_parallel": "#17becf"}
    results = [t for t in report["results"] if t["median_s"]]
    sizes = report["settings"]["sizes"]
    conditions = report["settings"]["conditions"]
    impls = list(dict.fromkeys(t["impl"] for t in results))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5), dpi=100, squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, size in zip(axes[0], sizes):
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, condition in enumerate(conditions):
                t = next((t for t in results if t["impl"] == impl and t["size"] == size
                          and t["condition"] == condition), None)
                if t:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    ys.append(t["median_s"] * 1e3)
            bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl))
            for bar, y in zip(bars, ys):
                ax.annotate(_fmt_ms(y), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xticks(range(len(conditions)))
        ax.set_xticklabels(conditions, fontsize=7, rotation=20)
        ax.set_title(f"{size}: B,T,U,V,H = {','.join(map(str, SIZES[size]))}", fontsize=9)
        ax.set_ylabel("median ms per training step (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_axisbelow(True)
        top = max((t["median_s"] * 1e3 for t in results if t["size"] == size), default=1)
        ax.set_ylim(top=top * 6)
    axes[0][0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(f"CPU training step with the RNN-T loss ({report['environment'].get('cpu')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=CONDITIONS)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per rnnt_xla setting (default: 7)")
    parser.add_argument("--peer-repeats", type=int, default=3,
                        help="timed steps of plain_torch, plain_jax and torchaudio (default: 3)")
    parser.add_argument("--demo", action="store_true",
                        help="also time `python -m rnnt_xla demo --steps 100 --framework torch` and the full demo, "
                             "quiet and busy")
    parser.add_argument("--demo-only", action="store_true", help="only the demo timings")
    parser.add_argument("--demos", nargs="+", choices=list(DEMOS), default=list(DEMOS), help="which demos to time")
    parser.add_argument("--demo-repeats", type=int, default=1, help="runs of each demo per condition")
    parser.add_argument("--code", type=Path, default=None,
                        help="rnnt_xla checkout to measure (default: this one), e.g. the commit before a change")
    parser.add_argument("--busy-limit", type=float, default=900,
                        help="the background load ends by itself after this many seconds (default: 900)")
    parser.add_argument("--timeout", type=float, default=1800, help="per worker process (default: 1800 s)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-min load average to fall below 0.5")
    parser.add_argument("--name", default=None, help="results name: train_step_<name>.* (default: hostname)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--crossover", action="store_true",
                        help="also time the loss alone, serial vs parallel kernels by size, quiet and busy")
    parser.add_argument("--crossover-only", action="store_true", help="only that")
    parser.add_argument("--worker", choices=CONDITIONS, help=argparse.SUPPRESS)
    parser.add_argument("--crossover-worker", choices=CROSSOVER_CONDITIONS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.code is not None:  # this process never imports rnnt_xla; its workers and demos do
        global CODE
        CODE = args.code.resolve()
        os.environ["RNNT_XLA_BENCH_CODE"] = str(CODE)
    if args.worker:
        run_worker(args.worker, args.sizes, args.repeats, args.peer_repeats, args.worker_out)
        return
    if args.crossover_worker:
        run_crossover_worker(args.crossover_worker, args.repeats, args.worker_out)
        return

    import socket

    from rich.console import Console

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # stop the background load on `kill` too
    console = Console() if sys.stdout.isatty() else Console(width=200)
    load_before = wait_until_quiet(args.wait_quiet, console)
    if load_before >= 0.5:
        console.print(f"[yellow]1-min load average is {load_before:.2f}: other work is running, timings will be noisy")
    others = CpuByOthers()
    results: list[dict] = []
    notes: list[str] = []
    conditions = [] if (args.demo_only or args.crossover_only) else args.conditions
    crossover: list[dict] = []
    for condition in CROSSOVER_CONDITIONS if (args.crossover or args.crossover_only) else []:
        with console.status(f"loss alone, serial vs parallel: {condition}"):
            data = run_condition(condition, [], args.repeats, 0, args.busy_limit, args.timeout, crossover=True)
        if "error" in data:
            console.print(f"[red]crossover {condition}: {data['error']}")
            continue
        crossover.extend(data["rows"])
    for condition in conditions:
        with console.status(f"{condition}: {', '.join(args.sizes)}"):
            data = run_condition(condition, args.sizes, args.repeats, args.peer_repeats, args.busy_limit, args.timeout)
        if "error" in data:
            console.print(f"[red]{condition}: {data['error']}")
            notes.append(f"{condition}: {data['error'][:300]}")
            continue
        results.extend(data["results"])
        notes.extend(n for n in data["notes"] if n not in notes)
        console.print(f"{condition}: done (numba layer {data['numba_threading_layer']}, "
                      f"torch threads {data['torch_threads']}, 1-min load {_loadavg():.2f})")
    demos = []
    if args.demo or args.demo_only:
        with console.status("python -m rnnt_xla demo, quiet and busy"):
            demos = time_demos(args.busy_limit, args.demos, args.demo_repeats)
    summarise(results)
    report = {
        "environment": environment(len(os.sched_getaffinity(0))),
        "settings": {"conditions": conditions, "sizes": args.sizes, "shapes": SIZES, "repeats": args.repeats, "peer_repeats": args.peer_repeats,
                     "features": FEATURES, "code": str(CODE), "order": "round-robin per step after each implementation's warm-up"},
        "noise": {"loadavg_before": load_before, "loadavg_after": _loadavg(),
                  "cpu_used_by_other_processes_cores": others.cores()},
        "notes": notes,
        "results": results,
        "demos": demos,
        "crossover": crossover,
    }
    report["targets"] = check_targets(report)
    for table in tables(report):
        console.print(table)
    name = args.name or socket.gethostname()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"train_step_{name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if results:
        try:
            write_plot(report, stem.with_suffix(".png"))
            paths.append(stem.with_suffix(".png"))
        except ImportError as exc:
            console.print(f"[yellow]no plot: {exc} (pip install matplotlib)")
    console.print("written: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
