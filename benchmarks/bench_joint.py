"""Joint network + RNNT loss, fwd+bwd: the fused loss against computing the logits first.

    python benchmarks/bench_joint.py                       # all shapes, every implementation available
    python benchmarks/bench_joint.py --shapes 8,200,50,256,256 --repeats 5

Shapes are ``B,T,U,D,V`` (``E = P = joint_dim = D``); the joint is ``Linear(tanh(Linear(enc) + Linear(pred)))``
(``rnnt_xla.torch.Joint``, and the same function in JAX). Implementations, all on the same inputs:

- ``torch_fused``: ``rnnt_xla.torch.fused_rnnt_loss(enc, pred, joint, ...)``;
- ``torch_unfused``: ``rnnt_xla.torch.rnnt_loss(joint(enc, pred), ...)``;
- ``torchaudio``: ``torchaudio.functional.rnnt_loss(joint(enc, pred), ...)`` (peers environment only);
- ``plain_torch``: the plain vectorised torch loss of ``benchmarks/plain_torch.py`` on ``joint(enc, pred)``;
- ``jax_fused``, ``jax_unfused``, ``plain_jax``: the same in JAX, each a jitted ``value_and_grad``.

Each (implementation, shape) runs in a fresh process: one warm-up step, then ``--repeats`` timed steps
(median and minimum), and the growth of the process's peak RSS over the timed steps (the RSS high-water
mark is reset first; gradients of the joint's parameters and inputs are included, the inputs are not). For
JAX the compiled program's own temporaries (``memory_analysis``) are reported too. Implementations whose
estimated memory does not fit this machine are skipped and say so. Results go to
``benchmarks/results/joint_<host>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from memory import _current_rss_bytes, _maxrss_bytes, _quiesce  # noqa: E402

SHAPES = ["8,200,50,256,256", "16,300,80,512,1024", "32,400,100,512,4096"]
IMPLS = ["torch_fused", "torch_unfused", "torchaudio", "plain_torch", "jax_fused", "jax_unfused", "plain_jax"]
# Peak memory of one fwd+bwd as a multiple of the float32 logits, to skip what cannot fit (measured on the
# small shape, rounded up): the logits, their gradient and the joint's activations of the same size.
UNFUSED_FACTOR = {"torch_unfused": 4.0, "torchaudio": 5.0, "plain_torch": 6.0, "jax_unfused": 5.0, "plain_jax": 7.0}


def _shape(text: str) -> tuple[int, int, int, int, int]:
    B, T, U, D, V = (int(v) for v in text.split(","))
    return B, T, U, D, V


def _torch_step(name: str, shape):
    import torch

    from rnnt_xla.torch import Joint, fused_rnnt_loss, rnnt_loss

    B, T, U, D, V = shape
    torch.manual_seed(0)
    joint = Joint(D, D, D, V)
    enc = torch.randn(B, T, D, requires_grad=True)
    pred = torch.randn(B, U + 1, D, requires_grad=True)
    targets = torch.randint(1, V, (B, U), dtype=torch.int32)
    frames, labels = torch.full((B,), T, dtype=torch.int32), torch.full((B,), U, dtype=torch.int32)
    if name == "torch_fused":
        def loss():
            return fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0)
    elif name == "torch_unfused":
        def loss():
            return rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    elif name == "torchaudio":
        import torchaudio.functional as F

        def loss():
            return F.rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    else:
        from plain_torch import rnnt_loss_plain_torch

        def loss():
            return rnnt_loss_plain_torch(joint(enc, pred), targets, frames, labels, blank=0)

    def step() -> float:
        for p in (enc, pred, *joint.parameters()):
            p.grad = None
        value = loss()
        value.backward()
        return float(value)

    return step, {}


def _jax_step(name: str, shape):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rnnt_xla.jax import rnnt_loss
    from rnnt_xla.jax_fused import fused_rnnt_loss

    B, T, U, D, V = shape
    rng = np.random.default_rng(0)
    params = {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
              for k, s in (("we", (D, D)), ("wp", (D, D)), ("wo", (D, V)))}
    enc = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    pred = jnp.asarray(rng.standard_normal((B, U + 1, D)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, V, (B, U)), jnp.int32)
    frames, labels = jnp.full((B,), T, jnp.int32), jnp.full((B,), U, jnp.int32)

    def joint(p, e, d):
        return jnp.tanh((e @ p["we"])[:, :, None] + (d @ p["wp"])[:, None]) @ p["wo"]

    if name == "jax_fused":
        def loss(p, e, d):
            return fused_rnnt_loss(joint, p, e, d, targets, frames, labels, blank=0)
    elif name == "jax_unfused":
        def loss(p, e, d):
            return rnnt_loss(joint(p, e, d), targets, frames, labels, blank=0)
    else:
        from plain_jax import rnnt_loss_plain_jax

        def loss(p, e, d):
            return rnnt_loss_plain_jax(joint(p, e, d), targets, frames, labels, blank=0)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(params, enc, pred).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready((params, enc, pred))

    def step() -> float:
        value, grads = compiled(params, enc, pred)
        jax.block_until_ready(grads)
        return float(value)

    return step, {"xla_temp_bytes": int(analysis.temp_size_in_bytes)}


def child(name: str, shape, repeats: int) -> dict[str, object]:
    if name == "torchaudio":
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            return {"error": "torchaudio not installed (run from the peers environment: benchmarks/setup_peers.sh)"}
    step, extra = (_jax_step if name.startswith(("jax", "plain_jax")) else _torch_step)(name, shape)
    loss = step()  # warm-up: compiles, allocates, faults in
    reset = _quiesce()
    before = _maxrss_bytes()
    rss_before = _current_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "loss": loss,
            "rss_growth_bytes": _maxrss_bytes() - max(before, rss_before) if reset else None, **extra}


def measure(name: str, shape: str, repeats: int, timeout_s: float) -> dict[str, object]:
    """:func:`child` in a fresh process (through ``sh``: see ``benchmarks/memory.py`` on ``ru_maxrss``)."""
    cmd = [sys.executable, str(Path(__file__)), "--child", name, "--shapes", shape, "--repeats", str(repeats)]
    script = " ".join(shlex.quote(c) for c in cmd) + "; exit $?"
    try:
        proc = subprocess.run(["sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def markdown(report: dict) -> str:
    lines = [f"# Joint + RNNT loss, fwd+bwd ({report['environment']['cpu']}, {report['environment']['threads']} "
             f"threads, {report['environment']['date']})", "",
             "Median step time in seconds (ratio to rnnt_xla's unfused path of the same framework), peak RSS "
             "growth over the timed steps in GB; JAX: XLA's planned temporaries in GB.", "",
             "| B,T,U,D,V | implementation | time s | vs unfused | peak RSS growth GB | XLA temp GB | loss |",
             "|---|---|---|---|---|---|---|"]
    for shape, results in report["results"].items():
        for name, r in results.items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {shape} | {name} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            base = results.get("torch_unfused" if name.startswith(("torch", "plain_torch")) else "jax_unfused", {})
            ratio = f"{r['median_s'] / base['median_s']:.2f}x" if "median_s" in base else "-"
            lines.append(f"| {shape} | {name} | {r['median_s']:.3g} | {ratio} | {_gb(r.get('rss_growth_bytes'))} "
                         f"| {_gb(r.get('xla_temp_bytes'))} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    shapes = list(report["results"])
    width = 0.8 / len(IMPLS)
    for i, name in enumerate(IMPLS):
        times = [report["results"][s].get(name, {}).get("median_s") for s in shapes]
        mems = [report["results"][s].get(name, {}).get("rss_growth_bytes") for s in shapes]
        xs = [j + i * width for j in range(len(shapes))]
        axes[0].bar(xs, [t or 0 for t in times], width, label=name)
        axes[1].bar(xs, [(m or 0) / 1e9 for m in mems], width, label=name)
    for ax, title in zip(axes, ("fwd+bwd time (s, log)", "peak RSS growth (GB, log)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="B,T,U,D,V")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (implementation, shape)")
    parser.add_argument("--out", type=Path, default=None, help="results path without extension")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, _shape(args.shapes[0]), args.repeats)))
        return

    from rich.console import Console

    from bench_cpu import environment

    console = Console()
    report = {"environment": environment(len(os.sched_getaffinity(0))), "results": {}}
    for shape in args.shapes:
        B, T, U, D, V = _shape(shape)
        logits_bytes = B * T * (U + 1) * V * 4
        results = report["results"].setdefault(shape, {})
        for name in args.impls:
            need = UNFUSED_FACTOR.get(name, 0) * logits_bytes
            if need > 0.9 * available_bytes():
                results[name] = {"skipped": f"needs ~{need / 1e9:.0f} GB (logits {logits_bytes / 1e9:.1f} GB)"}
            else:
                big = logits_bytes > 4e9  # minutes per step: time one
                results[name] = measure(name, shape, 1 if big else args.repeats, args.timeout)
            console.print(shape, name, results[name])
    out = args.out or HERE / "results" / f"joint_{socket.gethostname()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
