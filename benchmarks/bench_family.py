"""CPU benchmark of the rest of the transducer family: TDT, multi-blank RNN-T and k2's "modified" RNN-T,
rnnt_xla against the strongest alternatives a user has.

    python benchmarks/bench_family.py                                # everything (~4 min on 2 quiet cores)
    python benchmarks/bench_family.py --losses tdt --repeats 3 --no-memory --out /tmp/f.json

Per loss and shape, every available implementation is timed forward + backward (``reduction='mean'``, then
the gradient w.r.t. the logits, as ``bench_cpu.py`` does: a warm-up of at least one call and 2 s, then
``--repeats`` calls back to back, median and minimum), on the same inputs; then the peak RSS growth of one
fwd+bwd per implementation and shape in a fresh process (as ``memory.py``: the gradient is included, the
inputs are not). Shapes ``B,T,U,V``: TDT logits are ``(B, T, U+1, V + 5)`` (durations 0..4), multi-blank
``(B, T, U+1, V + 3)`` (big blanks of 2, 4 and 8 frames before the standard blank, NeMo's layout), modified
``(B, T, U+1, V)``. Random normal logits, full lengths, labels never a blank.

Implementations (each skipped with a note when it does not import or its loss is not in this checkout):

- ``rnnt_xla_torch``, ``rnnt_xla_jax``: ``rnnt_xla.torch/jax.tdt_loss``, ``multiblank_rnnt_loss``,
  ``rnnt_loss(..., rnnt_type='modified')``; JAX under ``jax.jit(jax.value_and_grad(...))``;
- ``hf_transformers`` (TDT): Hugging Face transformers' pure-PyTorch ``loss_tdt.tdt_loss`` (anti-diagonal
  vectorised, the fallback its Parakeet-TDT models train with off CUDA), ``reduction='none'`` then the mean
  over the batch (its own 'mean' divides by the target lengths);
- ``plain_torch``, ``plain_jax``: ``benchmarks/plain_torch_family.py`` / ``plain_jax_family.py`` (TDT in
  both; multi-blank and modified in torch).

NeMo's ``TDTLossPytorch`` / ``MultiblankRNNTLossPytorch`` are not run: they call ``.cuda()`` on CPU inputs
(TDT) and loop over B, T and U in Python with scalar tensor operations (seconds per thousand lattice cells),
and ``nemo_toolkit`` is not installable here without its training stack. k2 (the modified loss's origin)
ships wheels for its own torch builds only, none for torch 2.13.

Output: Markdown tables on the terminal, ``benchmarks/results/family_vm.json`` (+ ``.md`` and ``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from implementations import Inputs, Prepared, _jax_prepare, _torch_prepare, set_thread_environment  # noqa: E402

DURATIONS = (0, 1, 2, 3, 4)
BIG_BLANKS = (2, 4, 8)
LOSSES = ("tdt", "multiblank", "modified")
SHAPES = ["8,200,50,256", "16,150,40,1024"]
IMPLS = {
    "tdt": ["rnnt_xla_torch", "rnnt_xla_jax", "hf_transformers", "plain_torch", "plain_jax"],
    "multiblank": ["rnnt_xla_torch", "rnnt_xla_jax", "plain_torch"],
    "modified": ["rnnt_xla_torch", "rnnt_xla_jax", "plain_torch"],
}
REFERENCE = "rnnt_xla_torch"
WARMUP_S = 2.0  # the first second of a process's calls ran up to 4x slower on the 2-core VM (page and pool warm-up)
SPEED_GOAL = 10.0  # rnnt_xla at least this many times faster than the best alternative
# What a user of each framework has (issue 14 names HF's loss and a plain vectorised torch loss), and the
# stricter comparison with the fastest implementation in any framework (plain JAX for TDT).
TORCH_ALTERNATIVES = ("hf_transformers", "plain_torch")
JAX_ALTERNATIVES = ("plain_jax",)
MEMORY_GOAL = 1.25  # peak RSS growth of one fwd+bwd, in logits sizes ("about 1x": the gradient itself)

Shape = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------- inputs


def make_inputs(loss: str, shape: Shape, seed: int = 0) -> Inputs:
    """Logits ``(B, T, U+1, V + extra)`` float32 and labels that are never a blank, full lengths, int32.

    TDT and modified: blank 0, labels in [1, V). Multi-blank: the standard blank last (index V + K - 1), the
    big blanks just before it, labels in [0, V - 1)."""
    B, T, U, V = shape
    extra = {"tdt": len(DURATIONS), "multiblank": len(BIG_BLANKS), "modified": 0}[loss]
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, T, U + 1, V + extra), dtype=np.float32)
    low, high = (0, V - 1) if loss == "multiblank" else (1, V)
    targets = rng.integers(low, high, (B, U), dtype=np.int32)
    return Inputs(shape, logits, targets, np.full((B,), T, np.int32), np.full((B,), U, np.int32))


def blank_of(loss: str, shape: Shape) -> int:
    return shape[3] + len(BIG_BLANKS) - 1 if loss == "multiblank" else 0


# --------------------------------------------------------------------------------------------- implementations


def loss_function(loss: str, impl: str, shape: Shape) -> tuple[Callable, str, str]:
    """``(loss_fn(logits, targets, logit_lengths, target_lengths) -> scalar, framework, description)``;
    raises ImportError / LookupError when the implementation is not available."""
    import inspect

    blank, V = blank_of(loss, shape), shape[3]
    if impl in ("rnnt_xla_torch", "rnnt_xla_jax"):
        framework = impl.removeprefix("rnnt_xla_")
        module = __import__(f"rnnt_xla.{framework}", fromlist=["rnnt_loss"])
        if loss == "tdt":
            if not hasattr(module, "tdt_loss"):
                raise LookupError(f"rnnt_xla.{framework}.tdt_loss is not in this checkout")
            fn = module.tdt_loss
            return (lambda x, y, xl, yl: fn(x, y, xl, yl, list(DURATIONS), blank=blank, reduction="mean"),
                    framework, f"rnnt_xla.{framework}.tdt_loss")
        if loss == "multiblank":
            if not hasattr(module, "multiblank_rnnt_loss"):
                raise LookupError(f"rnnt_xla.{framework}.multiblank_rnnt_loss is not in this checkout")
            fn = module.multiblank_rnnt_loss
            return (lambda x, y, xl, yl: fn(x, y, xl, yl, list(BIG_BLANKS), blank=blank, reduction="mean"),
                    framework, f"rnnt_xla.{framework}.multiblank_rnnt_loss")
        if "rnnt_type" not in inspect.signature(module.rnnt_loss).parameters:
            raise LookupError(f"rnnt_xla.{framework}.rnnt_loss has no rnnt_type in this checkout")
        fn = module.rnnt_loss
        return (lambda x, y, xl, yl: fn(x, y, xl, yl, blank=blank, reduction="mean", rnnt_type="modified"),
                framework, f"rnnt_xla.{framework}.rnnt_loss(rnnt_type='modified')")
    if impl == "hf_transformers":
        import transformers
        from transformers.loss.loss_tdt import tdt_loss as hf_tdt_loss

        def hf(x, y, xl, yl):
            return hf_tdt_loss(x[..., :V], x[..., V:], y.long(), xl, yl, blank, list(DURATIONS),
                               reduction="none").mean()

        return hf, "torch", f"transformers {transformers.__version__} loss.loss_tdt.tdt_loss (pure PyTorch)"
    if impl == "plain_torch":
        import plain_torch_family as plain

        if loss == "tdt":
            return (lambda x, y, xl, yl: plain.tdt_loss_plain_torch(x, y, xl, yl, DURATIONS, blank=blank),
                    "torch", "benchmarks/plain_torch_family.py: per-frame log-sums + logcumsumexp, autograd")
        if loss == "multiblank":
            return (lambda x, y, xl, yl: plain.multiblank_rnnt_loss_plain_torch(x, y, xl, yl, BIG_BLANKS,
                                                                                 blank=blank),
                    "torch", "benchmarks/plain_torch_family.py: per-frame log-sums + logcumsumexp, autograd")
        return (lambda x, y, xl, yl: plain.modified_rnnt_loss_plain_torch(x, y, xl, yl, blank=blank),
                "torch", "benchmarks/plain_torch_family.py: per-frame logaddexp, autograd")
    if impl == "plain_jax" and loss == "tdt":
        from plain_jax_family import tdt_loss_plain_jax

        return (lambda x, y, xl, yl: tdt_loss_plain_jax(x, y, xl, yl, durations=DURATIONS, blank=blank),
                "jax", "benchmarks/plain_jax_family.py: lax.scan over frames with pending arcs, jax.grad, jit")
    raise LookupError(f"no {impl} implementation of {loss}")


def prepare(loss: str, impl: str, inputs: Inputs) -> tuple[Prepared, str]:
    fn, framework, description = loss_function(loss, impl, inputs.shape)
    maker = _torch_prepare(fn) if framework == "torch" else _jax_prepare(fn)
    return maker(inputs), description


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Result:
    loss: str
    shape: Shape
    impl: str
    logits_bytes: int
    description: str = ""
    times_s: list[float] = field(default_factory=list)
    warmup_calls: int = 0
    median_s: float | None = None
    min_s: float | None = None
    value: float | None = None  # the loss
    ratio: float | None = None  # median / rnnt_xla_torch's median
    rss: dict = field(default_factory=dict)
    error: str | None = None


def time_one(prepared: Prepared, repeats: int, max_warmup: int, result: Result) -> None:
    spent, n = 0.0, 0
    while n < 1 or (n < max_warmup and spent < WARMUP_S):
        start = time.perf_counter()
        prepared.fwd_bwd()
        spent += time.perf_counter() - start
        n += 1
    result.warmup_calls = n
    for _ in range(repeats):
        start = time.perf_counter()
        result.value = prepared.fwd_bwd()
        result.times_s.append(time.perf_counter() - start)
    result.median_s = statistics.median(result.times_s)
    result.min_s = min(result.times_s)


def _failure(exc: Exception) -> str:
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # Not importable, not in this checkout, or an adapter whose kernels are not part of this build (JAX
    # wraps the kernel's NotImplementedError in its own error).
    if isinstance(exc, (ImportError, LookupError, NotImplementedError)) or "not part of this build" in str(exc):
        return f"not available: {why}"
    return f"{type(exc).__name__}: {why}"


def run(losses: list[str], shapes: list[Shape], impls: list[str] | None, repeats: int, max_warmup: int,
        console) -> list[Result]:
    results = []
    for loss in losses:
        for shape in shapes:
            inputs = make_inputs(loss, shape)
            for impl in IMPLS[loss]:
                if impls and impl not in impls:
                    continue
                result = Result(loss, shape, impl, inputs.logits_bytes)
                results.append(result)
                console.print(f"{loss} {shape} {impl} ...", end=" ")
                prepared = None
                try:
                    prepared, result.description = prepare(loss, impl, inputs)
                    time_one(prepared, repeats, max_warmup, result)
                    console.print(f"median {result.median_s * 1e3:,.1f} ms, loss {result.value:.4f}")
                except Exception as exc:  # keep going; the table shows the failure
                    result.error = _failure(exc)
                    result.times_s.clear()
                    console.print(f"[{'yellow' if result.error.startswith('not available') else 'red'}]{result.error}")
                if prepared is not None:
                    prepared.release()
                del prepared
    ref = {(r.loss, r.shape): r.median_s for r in results if r.impl == REFERENCE and r.median_s}
    for r in results:
        if r.median_s and (r.loss, r.shape) in ref:
            r.ratio = r.median_s / ref[(r.loss, r.shape)]
    return results


# --------------------------------------------------------------------------------------------- memory


def child(loss: str, impl: str, shape: Shape, threads: int) -> dict[str, object]:
    """One fwd+bwd in this (fresh) process: peak RSS growth, as ``memory.child``."""
    from memory import _current_rss_bytes, _maxrss_bytes, _quiesce

    set_thread_environment(threads)
    warm, _ = prepare(loss, impl, make_inputs(loss, (2, 9, 2, 16)))  # compiles Numba / torch paths
    warm.fwd_bwd()
    warm.release()
    del warm
    inputs = make_inputs(loss, shape)
    prepared, _ = prepare(loss, impl, inputs)  # JAX: compiles ahead of time at the full shape
    reset = _quiesce()
    rss_before = _current_rss_bytes()
    before = _maxrss_bytes()
    prepared.fwd_bwd()
    after = _maxrss_bytes()
    return {"rss_growth_bytes": after - before, "rss_before_bytes": rss_before, "high_water_reset": reset,
            "logits_bytes": inputs.logits_bytes}


def run_memory(results: list[Result], threads: int, console) -> None:
    from memory import run_in_fresh_process

    for r in results:
        if r.error or not r.times_s:
            continue
        console.print(f"peak RSS {r.loss} {r.shape} {r.impl} (fresh process) ...", end=" ")
        cmd = [sys.executable, str(Path(__file__)), "--child", r.loss, r.impl, ",".join(map(str, r.shape)),
               "--threads", str(threads)]
        r.rss = run_in_fresh_process(cmd, timeout_s=900)
        growth = r.rss.get("rss_growth_bytes")
        console.print(f"{growth / r.logits_bytes:.2f}x logits" if growth is not None else r.rss.get("error"))


# --------------------------------------------------------------------------------------------- report


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 1000 else f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def _shape_text(loss: str, shape) -> str:
    B, T, U, V = shape
    extra = {"tdt": f"{V}+{len(DURATIONS)}", "multiblank": f"{V}+{len(BIG_BLANKS)}", "modified": str(V)}[loss]
    return f"{B},{T},{U},{extra}"


def targets(results: list[Result]) -> list[dict]:
    out = []
    for loss in dict.fromkeys(r.loss for r in results):
        for shape in dict.fromkeys(tuple(r.shape) for r in results if r.loss == loss):
            rows = [r for r in results if r.loss == loss and tuple(r.shape) == shape]
            others = [r for r in rows if not r.impl.startswith("rnnt_xla") and r.median_s]
            for impl, among, what in (("rnnt_xla_torch", TORCH_ALTERNATIVES, "the best torch alternative"),
                                      ("rnnt_xla_jax", JAX_ALTERNATIVES, "the best JAX alternative"),
                                      ("rnnt_xla_torch", None, "the best alternative in any framework"),
                                      ("rnnt_xla_jax", None, "the best alternative in any framework")):
                pool = [r for r in others if among is None or r.impl in among]
                best = min(pool, key=lambda r: r.median_s, default=None)
                ours = next((r for r in rows if r.impl == impl and r.median_s), None)
                if best is None:
                    continue
                speedup = best.median_s / ours.median_s if ours else None
                out.append({"loss": loss, "shape": list(shape), "target": f"{impl}: speed-up over {what}",
                            "best_alternative": best.impl, "value": speedup,
                            "goal": f">= {SPEED_GOAL:g}", "met": None if speedup is None else speedup >= SPEED_GOAL})
            for r in rows:
                if r.impl.startswith("rnnt_xla") and r.rss.get("rss_growth_bytes") is not None:
                    x = r.rss["rss_growth_bytes"] / r.logits_bytes
                    out.append({"loss": loss, "shape": list(shape), "target": f"{r.impl} peak RSS growth / logits",
                                "value": x, "goal": f"about 1 (<= {MEMORY_GOAL:g})", "met": x <= MEMORY_GOAL})
    return out


def loss_disagreements(results: list[Result]) -> dict[str, list[float]]:
    """A speed table means something only if everyone computes the same loss."""
    out = {}
    for key in dict.fromkeys((r.loss, tuple(r.shape)) for r in results):
        values = [r.value for r in results if (r.loss, tuple(r.shape)) == key and r.value is not None]
        if len(values) > 1 and max(values) - min(values) > 1e-4 * max(1.0, abs(max(values))):
            out[f"{key[0]} {','.join(map(str, key[1]))}"] = values
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    noise = report["noise"]
    lines = [f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads), commit {env['git_commit']}"
             f"{' (dirty)' if env.get('git_dirty') else ''}, torch {env.get('torch')}, jax {env.get('jax')}, "
             f"numba {env.get('numba')}, transformers {env.get('transformers')}. Load average (1 min) before / after "
             f"the timings: {noise['loadavg_before']:.2f} / {noise['loadavg_after']:.2f}; CPU used by other "
             f"processes during the timings: "
             + ("?" if noise["other_cores"] is None else f"{noise['other_cores']:.2f} cores") + "."
             + f" Allocator: {report['settings'].get('allocator', 'glibc defaults')}."
             + (f" {report['note']}" if report.get("note") else ""), "",
             "### fwd+bwd on CPU: median time per call (ms), x = time / rnnt_xla_torch's; peak RSS growth of one "
             "fwd+bwd in a fresh process (x logits size, the gradient included)", "",
             "| loss | B,T,U,V | implementation | fwd+bwd ms | min ms | x | runs | RSS growth MB | loss value |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        head = f"| {r['loss']} | {_shape_text(r['loss'], r['shape'])} | {r['impl']} |"
        if r["median_s"] is None:
            lines.append(f"{head} {r['error'] or 'no result'} | | | | | |")
            continue
        growth = (r.get("rss") or {}).get("rss_growth_bytes")
        digits = 0 if growth is None or growth >= 1e7 else 1
        memory = "—" if growth is None else f"{growth / 1e6:,.{digits}f} ({growth / r['logits_bytes']:.2f}x)"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}" if r["ratio"] < 10 else f"{r['ratio']:,.0f}"
        lines.append(f"{head} {_ms(r['median_s'])} | {_ms(r['min_s'])} | {ratio} | {len(r['times_s'])} | {memory} "
                     f"| {r['value']:.4f} |")
    lines += ["", "### Targets", "", "| loss | B,T,U,V | target | value | goal | met |",
              "| --- | --- | --- | ---: | --- | --- |"]
    for t in report["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        met = "—" if t["met"] is None else "yes" if t["met"] else "NO"
        what = t["target"] + (f" ({t['best_alternative']})" if t.get("best_alternative") else "")
        lines.append(f"| {t['loss']} | {_shape_text(t['loss'], t['shape'])} | {what} | {value} | {t['goal']} | {met} |")
    lines += ["", "Implementations:", ""]
    for name, description in report["implementations"].items():
        lines.append(f"- `{name}`: {description}")
    lines += [f"- not run: {why}" for why in report["not_run"]]
    lines += [f"- warning: the implementations disagree on the {key} loss: {values}"
              for key, values in report["loss_disagreements"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plots import COLORS

    colors = {**COLORS, "hf_transformers": "#d62728"}
    groups = list(dict.fromkeys((r["loss"], tuple(r["shape"])) for r in report["results"]))
    impls = list(dict.fromkeys(r["impl"] for r in report["results"] if r["median_s"] is not None))
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=110)
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, (loss, shape) in enumerate(groups):
            r = next((r for r in report["results"] if r["impl"] == impl and r["loss"] == loss
                      and tuple(r["shape"]) == shape and r["median_s"] is not None), None)
            if r:
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(r["median_s"] * 1e3)
        bars = ax.bar(xs, ys, width, label=impl, color=colors.get(impl), edgecolor="white", linewidth=0.5)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:,.0f}" if y >= 100 else f"{y:.1f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=6.5, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{loss}\n{_shape_text(loss, shape)}" for loss, shape in groups], fontsize=8)
    ax.set_ylabel("median fwd+bwd time per call (ms, log scale)")
    env = report["environment"]
    ax.set_title(f"TDT, multi-blank and modified RNN-T losses on CPU ({env.get('cpu')}, {env.get('threads')} "
                 f"threads, load {report['noise']['loadavg_before']:.1f})", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    top = max((r["median_s"] for r in report["results"] if r["median_s"]), default=1) * 1e3
    ax.set_ylim(top=top * 8)
    ax.legend(fontsize=8, ncol=min(5, len(impls)), loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- main


def parse_shape(text: str) -> Shape:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be B,T,U,V, got {text!r}")
    return parts  # type: ignore[return-value]


def _allocator(keep_freed_memory: bool) -> str:
    """What the process's allocator does with freed memory (applying ``--keep-freed-memory``), for the report."""
    if keep_freed_memory:
        from rnnt_xla import keep_freed_memory as keep

        return "rnnt_xla.keep_freed_memory()" if keep() else "glibc defaults (keep_freed_memory() had no effect)"
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    variables = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    return " ".join(variables) if variables else "glibc defaults"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in SHAPES],
                        metavar="B,T,U,V")
    parser.add_argument("--impls", nargs="+", default=None, metavar="NAME", help="a subset of the implementations")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per loss, shape and implementation")
    parser.add_argument("--max-warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak RSS measurements")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "family_vm.json")
    parser.add_argument("--note", default=None, help="a line for the report (e.g. what the checkout holds)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call rnnt_xla.keep_freed_memory() first (glibc keeps freed memory; every "
                             "implementation in the process gets it)")
    parser.add_argument("--child", nargs=3, metavar=("LOSS", "IMPL", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    set_thread_environment(args.threads)
    allocator = _allocator(args.keep_freed_memory)
    if args.child:
        loss, impl, shape = args.child
        print(json.dumps(child(loss, impl, parse_shape(shape), args.threads)))
        return

    from rich.console import Console

    from bench_cpu import CpuByOthers, _loadavg, environment

    console = Console() if sys.stdout.isatty() else Console(width=160)
    import torch

    torch.set_num_threads(args.threads)
    load_before = _loadavg()
    if load_before >= 0.5:
        console.print(f"[yellow]1-min load average is {load_before:.2f}: other work is running, timings will be noisy")
    others = CpuByOthers()
    results = run(args.losses, args.shapes, args.impls, args.repeats, args.max_warmup, console)
    noise = {"loadavg_before": load_before, "loadavg_after": _loadavg(), "other_cores": others.cores()}
    if not args.no_memory:
        run_memory(results, args.threads, console)
    env = environment(args.threads)
    try:
        from importlib.metadata import version

        env["transformers"] = version("transformers")
    except Exception:
        env["transformers"] = None
    report = {
        "environment": env,
        "settings": {"repeats": args.repeats, "durations": DURATIONS, "big_blank_durations": BIG_BLANKS,
                     "reduction": "mean", "order": "back-to-back per implementation", "allocator": allocator},
        "noise": noise,
        "note": args.note,
        "implementations": {r.impl + f" ({r.loss})": r.description for r in results if r.description},
        "not_run": ["NeMo TDTLossPytorch / MultiblankRNNTLossPytorch: .cuda() on CPU inputs (TDT) and Python "
                    "loops over B, T, U of scalar tensor ops; nemo_toolkit not installable without its training stack",
                    "k2 rnnt_loss(rnnt_type='modified'): no k2 wheel for torch 2.13"],
        "results": [asdict(r) for r in results],
    }
    report["targets"] = targets(results)
    report["loss_disagreements"] = loss_disagreements(results)
    text = markdown(report)
    console.print(text, markup=False, highlight=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    args.out.with_suffix(".md").write_text(text)
    console.print(f"results written to {args.out} and {args.out.with_suffix('.md').name}")
    if not args.no_plots:
        try:
            console.print(f"plot: {plot(report, args.out.with_suffix('.png'))}")
        except ImportError as exc:
            console.print(f"[yellow]no plot: {exc}")


if __name__ == "__main__":
    main()
