"""Joint network + RNNT loss, fwd+bwd: the fused loss against computing the logits first.

    python benchmarks/bench_joint.py                       # all shapes, every implementation available
    python benchmarks/bench_joint.py --shapes 8,200,50,256,256 --repeats 5

Shapes are ``B,T,U,D,V`` (``E = P = joint_dim = D``); the joint is ``Linear(tanh(Linear(enc) + Linear(pred)))``
(``rnnt_xla.torch.Joint``, and the same function in JAX). Implementations, all on the same inputs:

- ``torch_fused``: ``rnnt_xla.torch.fused_rnnt_loss(enc, pred, joint, ...)``;
- ``torch_unfused``: ``rnnt_xla.torch.rnnt_loss(joint(enc, pred), ...)``;
- ``torchaudio``: ``torchaudio.functional.rnnt_loss(joint(enc, pred), ...)`` (peers environment only);
- ``plain_torch``: the plain vectorised torch loss of ``benchmarks/plain_torch.py`` on ``joint(enc, pred)``;
- ``torch_joint_only``: ``joint(enc, pred).sum()``, fwd+bwd: the joint's own cost, a floor for any loss that
  takes the logits (torchaudio's time over this is the most any loss could gain on it);
- ``jax_fused``, ``jax_unfused``, ``plain_jax``: the same in JAX, each a jitted ``value_and_grad``.

``--tile-mb 32 64 256`` measures the fused implementations once per tile size (labels ``torch_fused[64MB]``);
without it they use the default ``tile_bytes``.

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
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from memory import _current_rss_bytes, _maxrss_bytes, _quiesce, run_in_fresh_process  # noqa: E402

SHAPES = ["8,200,50,256,256", "16,300,80,512,1024", "32,400,100,512,4096"]
IMPLS = ["torch_fused", "torch_unfused", "torchaudio", "plain_torch", "torch_joint_only", "jax_fused", "jax_unfused",
         "plain_jax"]
# Peak memory of one fwd+bwd as a multiple of the float32 logits, to skip what cannot fit (measured on the
# small shape, rounded up): the logits, their gradient and the joint's activations of the same size.
UNFUSED_FACTOR = {"torch_unfused": 4.0, "torchaudio": 5.0, "plain_torch": 6.0, "torch_joint_only": 4.0,
                  "jax_unfused": 5.0, "plain_jax": 7.0}


def _shape(text: str) -> tuple[int, int, int, int, int]:
    B, T, U, D, V = (int(v) for v in text.split(","))
    return B, T, U, D, V


def _torch_step(name: str, shape, tile_bytes: int | None):
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
            return fused_rnnt_loss(enc, pred, joint, targets, frames, labels, blank=0, tile_bytes=tile_bytes)
    elif name == "torch_unfused":
        def loss():
            return rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    elif name == "torchaudio":
        import torchaudio.functional as F

        def loss():
            return F.rnnt_loss(joint(enc, pred), targets, frames, labels, blank=0)
    elif name == "torch_joint_only":
        def loss():
            return joint(enc, pred).sum()
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


def _jax_step(name: str, shape, tile_bytes: int | None):
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
            return fused_rnnt_loss(joint, p, e, d, targets, frames, labels, blank=0, tile_bytes=tile_bytes)
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


def child(name: str, shape, repeats: int, tile_bytes: int | None = None, cold: bool = False) -> dict[str, object]:
    """``repeats`` timed steps after one warm-up step of the same shape, or (``cold``: shapes that take
    minutes a step) after a warm-up on a tiny problem with the same joint sizes, so that the one timed step
    is also the first at this shape (its RSS growth includes every first-time allocation)."""
    if name == "torchaudio":
        try:
            import torchaudio  # noqa: F401
        except ImportError:
            return {"error": "torchaudio not installed (run from the peers environment: benchmarks/setup_peers.sh)"}
    make = _jax_step if name.startswith(("jax", "plain_jax")) else _torch_step
    if cold:
        B, T, U, D, V = shape
        make(name, (1, 2, 2, D, V), tile_bytes)[0]()  # compiles kernels and torch/XLA paths
    step, extra = make(name, shape, tile_bytes)
    loss = None if cold else step()  # warm-up: compiles, allocates, faults in
    reset = _quiesce()
    before = _maxrss_bytes()
    rss_before = _current_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "loss": value if loss is None else loss,
            "rss_growth_bytes": _maxrss_bytes() - max(before, rss_before) if reset else None, "cold": cold, **extra}


def measure(name: str, shape: str, repeats: int, timeout_s: float, tile_mb: float | None = None,
            cold: bool = False) -> dict[str, object]:
    """:func:`child` in a fresh process (through ``sh``: see ``benchmarks/memory.py`` on ``ru_maxrss``)."""
    cmd = [sys.executable, str(Path(__file__)), "--child", name, "--shapes", shape, "--repeats", str(repeats)]
    if cold:
        cmd.append("--cold")
    if tile_mb is not None:
        cmd += ["--tile-mb", str(tile_mb)]
    result = run_in_fresh_process(cmd, timeout_s)
    if tile_mb is not None:
        result["tile_mb"] = tile_mb
    return result


def _tile_bytes(tile_mb: float | None) -> int | None:
    return None if tile_mb is None else int(tile_mb * 2**20)


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
             "Median step time in seconds (ratio to rnnt_xla's unfused path of the same framework), minimum, "
             "peak RSS growth over the timed steps in GB (ratio to unfused); JAX: XLA's planned temporaries in GB; "
             "tile: the fused loss's tile_bytes in MB (-: its default). Logits over 4 GB: one cold step (warmed "
             "up on a tiny problem), its time and the RSS growth it causes.", "",
             "| B,T,U,D,V | implementation | tile MB | time s | vs unfused | min s | peak RSS growth GB | vs unfused "
             "| XLA temp GB | loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, results in report["results"].items():
        for name, r in results.items():
            if "error" in r or "skipped" in r:
                lines.append(f"| {shape} | {name} | | {r.get('error') or r.get('skipped')} | | | | | | |")
                continue
            base = results.get("jax_unfused" if name.startswith(("jax", "plain_jax")) else "torch_unfused", {})
            ratio = f"{r['median_s'] / base['median_s']:.2f}x" if "median_s" in base else "-"
            memory, base_memory = r.get("rss_growth_bytes"), base.get("rss_growth_bytes")
            mem_ratio = f"1/{base_memory / memory:.1f}" if memory and base_memory else "-"
            tile = f"{r['tile_mb']:g}" if r.get("tile_mb") is not None else "-"
            lines.append(f"| {shape} | {name} | {tile} | {r['median_s']:.3g} | {ratio} | {r['min_s']:.3g} "
                         f"| {_gb(memory)} | {mem_ratio} | {_gb(r.get('xla_temp_bytes'))} | {r['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    shapes = list(report["results"])
    names = list(dict.fromkeys(name for results in report["results"].values() for name in results))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
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
    parser.add_argument("--tile-mb", nargs="+", type=float, default=None,
                        help="tile sizes (MB) for the fused implementations (default: the loss's own default)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (implementation, shape)")
    parser.add_argument("--out", type=Path, default=None, help="results path without extension")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tile_mb = args.tile_mb[0] if args.tile_mb else None
        print(json.dumps(child(args.child, _shape(args.shapes[0]), args.repeats, _tile_bytes(tile_mb), args.cold)))
        return

    from rich.console import Console

    from bench_cpu import environment

    console = Console()
    report = {"environment": environment(len(os.sched_getaffinity(0))), "results": {}}
    for shape in args.shapes:
        B, T, U, D, V = _shape(shape)
        logits_bytes = B * T * (U + 1) * V * 4
        results = report["results"].setdefault(shape, {})
        runs = [(name, tile_mb) for name in args.impls
                for tile_mb in (args.tile_mb or [None] if name.endswith("_fused") else [None])]
        for name, tile_mb in runs:
            label = name if tile_mb is None or not args.tile_mb or len(args.tile_mb) == 1 else f"{name}[{tile_mb:g}MB]"
            need = UNFUSED_FACTOR.get(name, 0) * logits_bytes
            if need > 0.9 * available_bytes():
                results[label] = {"skipped": f"needs ~{need / 1e9:.0f} GB (logits {logits_bytes / 1e9:.1f} GB)"}
            else:
                big = logits_bytes > 4e9  # minutes per step: time one, warmed up on a tiny problem
                results[label] = measure(name, shape, 1 if big else args.repeats, args.timeout, tile_mb, cold=big)
            console.print(shape, label, results[label])
    out = args.out or HERE / "results" / f"joint_{socket.gethostname()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
