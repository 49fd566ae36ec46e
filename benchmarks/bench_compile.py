"""torch.compile vs eager: a whole RNN-T training step (encoder, predictor, joiner, rnnt_xla loss, backward,
optimizer step), per shape and compile mode, each in a fresh process.

    python benchmarks/bench_compile.py                                   # both default shapes, all modes
    python benchmarks/bench_compile.py --shapes 4,40,8,32 --repeats 5 --out /tmp/c.json
    python benchmarks/bench_compile.py --package /path/to/other/checkout --eager-first   # e.g. an old version

Modes (the step is the README's "torch.compile and export" example):

- ``eager``: no compilation (the baseline of the ratios);
- ``fullgraph``: ``torch.compile(step, fullgraph=True, dynamic=True)`` with
  ``torch._dynamo.config.trace_autograd_ops = True`` (torch 2.13 needs it to trace ``loss.backward()``) and
  the SGD update written in the step (``torch.optim`` optimizers graph-break on purpose inside ``step()``);
- ``default``: the step as PyTorch's "where to apply torch.compile" recipe writes it, with
  ``torch.optim.SGD`` (``zero_grad``, ``backward``, ``step`` inside), ``torch.compile(step)``.

Per mode: the first call's time (tracing and compiling included, the loss's first call in the process),
graphs and graph breaks after it (``torch._dynamo.utils.counters``; their reasons), the graphs added by ten
more (T, U) shapes (recompiles), and the step time at the shape after a warm-up: median and minimum of
``--repeats`` calls, alternating with as many calls of the uncompiled step in the same process (the ratio's
denominator), so that both see the same machine. On a shared machine, busy OpenMP pools make single calls
up to ~100x slower: compare the minima there.
Output: a Markdown table and ``benchmarks/results/compile_<hostname>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from bench_cpu import CpuByOthers, _loadavg, environment, parse_shape  # noqa: E402

DEFAULT_SHAPES = ["4,40,8,32", "8,150,40,256"]
MODES = ("eager", "fullgraph", "default")
FEATURES = 80  # encoder input size
HIDDEN = 64  # encoder, predictor and joiner width (the README example's)
# The ten (T, U) shapes of the recompile count, relative to the measured shape's.
SHAPE_STEPS = [(0, 0), (1, 1), (8, -2), (-5, 2), (18, 5), (-3, -3), (3, 0), (13, 4), (-1, -1), (6, 3)]

# Runs in a fresh process; argv[1] is the JSON configuration. Prints one JSON line.
CHILD = textwrap.dedent('''
    import json, statistics, sys, time
    import torch
    config = json.loads(sys.argv[1])
    mode, (B, T, U, V), F, H = config["mode"], config["shape"], config["features"], config["hidden"]
    torch._dynamo.config.trace_autograd_ops = mode == "fullgraph"
    from torch._dynamo.utils import counters
    from rnnt_xla.torch import RNNTLoss

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(F, H), torch.nn.Tanh())
    predictor = torch.nn.Embedding(V, H)
    joiner = torch.nn.Linear(H, V)
    params = [*encoder.parameters(), *predictor.parameters(), *joiner.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    criterion = RNNTLoss(blank=0)

    def logits_of(features, targets):
        prediction_in = torch.nn.functional.pad(targets, (1, 0))
        return joiner(torch.tanh(encoder(features)[:, :, None] + predictor(prediction_in)[:, None]))

    def sgd_step(features, targets, logit_lengths, target_lengths):
        for p in params:
            p.grad = None
        loss = criterion(logits_of(features, targets), targets, logit_lengths, target_lengths)
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.sub_(1e-3 * p.grad)
        return loss.detach()

    def optim_step(features, targets, logit_lengths, target_lengths):
        optimizer.zero_grad()
        loss = criterion(logits_of(features, targets), targets, logit_lengths, target_lengths)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def batch(T, U):
        g = torch.Generator().manual_seed(T * 1000 + U)
        return (torch.randn(B, T, F, generator=g), torch.randint(1, V, (B, U), generator=g),
                torch.full((B,), T), torch.full((B,), U))

    step = eager_step = optim_step if mode == "default" else sgd_step
    if config["eager_first"]:  # versions whose first call must not be a compiled one
        criterion(torch.randn(1, 2, 2, V), torch.ones(1, 1, dtype=torch.long), torch.tensor([2]), torch.tensor([1]))
    if mode != "eager":
        step = torch.compile(step, fullgraph=mode == "fullgraph", dynamic=True if mode == "fullgraph" else None)
    import rnnt_xla
    out = {"rnnt_xla": rnnt_xla.__file__}
    try:
        data = batch(T, U)
        start = time.perf_counter()
        step(*data)
        out["first_call_s"] = time.perf_counter() - start
        out["graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["break_reasons"] = sorted({r.splitlines()[0] for r in counters["graph_break"]})
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        for dt, du in config["shape_steps"]:
            step(*batch(max(T + dt, 2), max(U + du, 1)))
        out["ten_shapes_s"] = time.perf_counter() - start
        out["recompiled_graphs"] = counters["stats"]["unique_graphs"] - before
        # The eager step is timed in the same process, alternating with the compiled one, so that both see
        # the same machine (other processes' load changes by the second on a shared machine).
        spent = 0.0
        while spent < 1.0:
            start = time.perf_counter(); step(*data); eager_step(*data); spent += time.perf_counter() - start
        times, eager_times = [], []
        for _ in range(config["repeats"]):
            start = time.perf_counter(); step(*data); times.append(time.perf_counter() - start)
            start = time.perf_counter(); eager_step(*data); eager_times.append(time.perf_counter() - start)
        out["median_s"], out["min_s"] = statistics.median(times), min(times)
        out["eager_median_s"], out["eager_min_s"] = statistics.median(eager_times), min(eager_times)
    except Exception as e:  # an old version that cannot compile: report why
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(json.dumps(out))
''')


def run_mode(mode: str, shape: tuple[int, int, int, int], args: argparse.Namespace) -> dict:
    config = dict(mode=mode, shape=shape, features=FEATURES, hidden=HIDDEN, repeats=args.repeats,
                  eager_first=args.eager_first, shape_steps=SHAPE_STEPS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.package), os.environ.get("PYTHONPATH", "")]))
    # cwd: ``python -c`` puts the working directory first on sys.path, before PYTHONPATH.
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                          env=env, cwd=args.package, timeout=args.timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        last_line = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
        return dict(error=f"exit {proc.returncode}: {last_line}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| shape B,T,U,V | mode | first call s | graphs | graph breaks | recompiles (10 shapes) | "
             "step ms median (min) | eager step ms, same process | vs eager: medians (minima) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r = row["result"]
        if "error" in r and "median_s" not in r:
            lines.append(f"| {row['shape']} | {row['mode']} | error: {r['error']} | | | | | | |")
            continue
        graphs = "-" if row["mode"] == "eager" else r.get("graphs")
        breaks = "-" if row["mode"] == "eager" else r.get("graph_breaks")
        recompiles = "-" if row["mode"] == "eager" else r.get("recompiled_graphs")
        ratio = f"{row['ratio']:.2f} ({row['ratio_of_minima']:.2f})" if row.get("ratio") else ""
        eager = "" if row["mode"] == "eager" else f"{r['eager_median_s'] * 1e3:.2f} ({r['eager_min_s'] * 1e3:.2f})"
        lines.append(f"| {row['shape']} | {row['mode']} | {r['first_call_s']:.2f} | {graphs} | {breaks} | "
                     f"{recompiles} | {r['median_s'] * 1e3:.2f} ({r['min_s'] * 1e3:.2f}) | {eager} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--package", type=Path, default=REPO_ROOT, help="checkout whose rnnt_xla is measured")
    parser.add_argument("--eager-first", action="store_true",
                        help="call the loss eagerly once before compiling (versions that crash otherwise)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    load_before, others = _loadavg(), CpuByOthers()
    rows = []
    for shape in args.shapes:
        for mode in args.modes:
            result = run_mode(mode, shape, args)
            row = dict(shape=",".join(map(str, shape)), mode=mode, result=result)
            if mode != "eager" and result.get("median_s"):
                row["ratio"] = result["median_s"] / result["eager_median_s"]
                row["ratio_of_minima"] = result["min_s"] / result["eager_min_s"]
            rows.append(row)
            print(f"{row['shape']} {mode}: {json.dumps(result)}", file=sys.stderr)
    print(table(rows))
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "local"
    out = args.out or HERE / "results" / f"compile_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(environment=environment(threads=os.cpu_count() or 1), package=str(args.package),
                eager_first=args.eager_first, load_before=load_before, load_after=_loadavg(),
                cpu_by_others_cores=others.cores(), features=FEATURES, hidden=HIDDEN, rows=rows)
    out.write_text(json.dumps(info, indent=2))
    out.with_suffix(".md").write_text(table(rows) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
