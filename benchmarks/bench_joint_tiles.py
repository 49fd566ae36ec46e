"""Fused joint + loss step time by tile size, round-robin against the unfused path in one process.

    python benchmarks/bench_joint_tiles.py --shape 4,300,80,512,1024 --tile-mb 16 32 64 --rounds 5
    ~/.venvs/rnnt-peers/bin/python benchmarks/bench_joint_tiles.py --tile-mb 16 --also torchaudio torch_joint_only

On a shared machine the load moves between separate runs by more than the tile size does; here every round
times each variant once, back to back, so all of them see the same load, and the medians over rounds are
compared (ratio to unfused). Memory is ``bench_joint.py``'s job (fresh processes); this is time only.
Results go to ``benchmarks/results/joint_tiles_<host>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="4,300,80,512,1024", help="B,T,U,D,V")
    parser.add_argument("--tile-mb", nargs="+", type=float, default=[16, 32, 64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--also", nargs="*", default=[], choices=["torchaudio", "plain_torch", "torch_joint_only"],
                        help="more of bench_joint's torch implementations in the same rounds (torchaudio: peers venv)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from bench_cpu import environment
    from bench_joint import _torch_step

    shape = tuple(int(v) for v in args.shape.split(","))
    variants = {"torch_unfused": _torch_step("torch_unfused", shape, None)[0]}
    for mb in args.tile_mb:
        variants[f"torch_fused[{mb:g}MB]"] = _torch_step("torch_fused", shape, int(mb * 2**20))[0]
    for name in args.also:
        variants[name] = _torch_step(name, shape, None)[0]
    for step in variants.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch_unfused"])
    env = environment(torch.get_num_threads())
    env["torch"] = torch.__version__
    lines = [f"# Fused joint + loss by tile size, round-robin ({env['cpu']}, {env['threads']} threads, torch "
             f"{torch.__version__}, {env['date']})",
             "", f"Shape B,T,U,D,V = {args.shape}; {args.rounds} rounds, each variant timed once per round; median "
             "and min step time (fwd+bwd, joint included) in seconds.", "",
             "| variant | median s | vs unfused | min s |", "|---|---|---|---|"]
    for name, ts in times.items():
        lines.append(f"| {name} | {statistics.median(ts):.3g} | {statistics.median(ts) / base:.2f}x | {min(ts):.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or HERE / "results" / f"joint_tiles_{socket.gethostname()}"
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "shape": args.shape, "times": times}, indent=1))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
