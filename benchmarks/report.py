"""Markdown tables (rich, ``box.MARKDOWN``) of a benchmark report, and the check against the project's targets.

Every function takes the JSON-ready ``report`` dict that ``bench_cpu.py`` writes, so the tables can be
re-printed from a results file: ``python benchmarks/report.py benchmarks/results/cpu_vm.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

REFERENCE = "rnnt_xla_torch"
PLAIN = ("plain_torch", "plain_jax")
PEERS = ("torchaudio", "plain_torch", "plain_jax", "warprnnt_numba")
MB = 1e6


def _table(title: str, columns: list[str], left: int = 2) -> Table:
    table = Table(title=title, box=box.MARKDOWN, title_justify="left", pad_edge=True)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left else "right", no_wrap=True)
    return table


def _shape(shape) -> str:
    return ",".join(map(str, shape))


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 1000 else f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mb(n: int | None, logits: int) -> str:
    if n is None:
        return "—"
    return f"{n / MB:,.0f} ({n / logits:.2f}x)" if n >= 10 * MB else f"{n / MB:.1f} ({n / logits:.2f}x)"


def time_table(report: dict) -> Table:
    table = _table("RNN-T loss on CPU: median time per call (ms); x = time / rnnt_xla_torch's time",
                   ["B,T,U,V", "implementation", "fwd+bwd", "min", "x", "GB/s", "fwd only", "min", "x", "runs"])
    previous = None
    for r in report["results"]:
        shape = "" if r["shape"] == previous else _shape(r["shape"])
        previous = r["shape"]
        fb, f = r["fwd_bwd"], r["fwd"]
        if fb["median_s"] is None and f["median_s"] is None:
            table.add_row(shape, r["impl"], r.get("error") or fb.get("error") or "no result")
            continue
        gbs = "—" if fb["gb_per_s"] is None else f"{fb['gb_per_s']:.2f}"
        table.add_row(shape, r["impl"], _ms(fb["median_s"]), _ms(fb["min_s"]), _ratio(fb["ratio"]), gbs,
                      _ms(f["median_s"]), _ms(f["min_s"]), _ratio(f["ratio"]),
                      f"{len(fb['times_s'])}+{len(f['times_s'])}")
    return table


def memory_table(report: dict) -> Table:
    table = _table("Extra memory of one fwd+bwd, MB (x logits size); RSS growth includes the gradient",
                   ["B,T,U,V", "implementation", "logits MB", "RSS growth", "XLA temp fwd+bwd", "XLA temp fwd"])
    previous = None
    for r in report["results"]:
        shape = "" if r["shape"] == previous else _shape(r["shape"])
        previous = r["shape"]
        logits = r["logits_bytes"]
        rss = r.get("rss") or {}
        xla = r.get("xla_memory") or {}
        table.add_row(shape, r["impl"], f"{logits / MB:,.1f}" if logits >= MB else f"{logits / MB:.2f}",
                      _mb(rss.get("rss_growth_bytes"), logits) if "error" not in rss else f"({rss['error']})",
                      _mb(xla.get("fwd_bwd", {}).get("temp"), logits), _mb(xla.get("fwd", {}).get("temp"), logits))
    return table


def roofline_table(report: dict) -> Table:
    n = report["environment"]["threads"]
    table = _table("Roofline (2 reads of the logits, 1 exp per element, 1 gradient-sized write) and thread scaling"
                   " of rnnt_xla_torch fwd+bwd",
                   ["B,T,U,V", "roofline ms", "roofline GB/s", "rnnt_xla ms", "/ roofline", "1 thread ms",
                    f"{n} threads ms", "speed-up"], left=1)
    scaling = {tuple(s["shape"]): s for s in report.get("thread_scaling", [])}
    for roof in report.get("roofline", []):
        s = scaling.get(tuple(roof["shape"]), {})
        times = s.get("median_s", {})
        one, many = times.get("1"), times.get(str(n))
        table.add_row(_shape(roof["shape"]), _ms(roof.get("median_s")),
                      "—" if roof.get("gb_per_s") is None else f"{roof['gb_per_s']:.1f}",
                      _ms(roof.get("rnnt_xla_s")), _ratio(roof.get("ratio")), _ms(one),
                      _ms(many) if n != 1 else "—", _ratio(one / many) if one and many and n != 1 else "—")
    return table


def passes_table(report: dict) -> Table:
    names = ["log_normalizers", "alphas_and_costs", "betas", "gradients", "gradients (reused buffer)"]
    table = _table("rnnt_xla per-pass profile (ms, median; % of the passes' sum)",
                   ["B,T,U,V", *names, "sum", "torch fwd+bwd"], left=1)
    for p in report.get("passes", []):
        if "error" in p:
            table.add_row(_shape(p["shape"]), f"({p['error']})")
            continue
        total = p["median_s"]["sum"]
        cells = [f"{_ms(p['median_s'][k])} ({100 * p['median_s'][k] / total:.0f}%)" for k in names[:4]]
        table.add_row(_shape(p["shape"]), *cells, _ms(p["median_s"]["gradients (reused buffer)"]), _ms(total),
                      _ms(p.get("adapter_fwd_bwd_s")))
    return table


def first_call_table(report: dict) -> Table:
    info = report.get("first_call") or {}
    table = _table("First call in a fresh process: imports + one small fwd+bwd (s); 'to result' is from launch to "
                   "the result, 'process' until the process has exited",
                   ["adapter", "Numba cache", "to result", "process", "imports", "first call"])

    def s(x) -> str:
        return "—" if x is None else f"{x:.2f}"

    for run in info.get("runs", []):
        if "error" in run:
            table.add_row(run["adapter"], run["cache"], f"({run['error']})")
            continue
        table.add_row(run["adapter"], run["cache"], s(run.get("to_result_s")), s(run["total_s"]),
                      s(run["import_s"]), s(run["call_s"]))
    for name, t in info.get("python_import", {}).items():
        table.add_row(f"python -c 'import {name}'", "", s(t["to_result_s"]), s(t["total_s"]), "", "")
    return table


def targets_table(report: dict) -> Table:
    table = _table("Targets", ["target", "B,T,U,V", "mode", "value", "goal", "met"], left=3)
    for t in report.get("targets", []):
        value = "—" if t["value"] is None else f"{t['value']:.2f}"
        met = "—" if t["met"] is None else "yes" if t["met"] else "NO"
        table.add_row(t["target"], t.get("shape", ""), t.get("mode", ""), value, t["goal"], met)
    return table


def noise_lines(report: dict) -> list[str]:
    noise = report.get("noise", {})
    others = noise.get("cpu_used_by_other_processes_cores")
    lines = [f"load average (1 min) before / after the timings: {noise.get('loadavg_before')} / "
             f"{noise.get('loadavg_after')}; CPU used by other processes during the timings: "
             + ("?" if others is None else f"{others:.2f} cores") + "; "
             f"median/min over all timings: median {noise.get('median_over_min_median', 0):.2f}, "
             f"worst {noise.get('median_over_min_max', 0):.2f}"]
    touch = report["environment"].get("first_touch")
    if touch:
        lines.append("first touch of a fresh buffer: " + ", ".join(f"{k.removesuffix('_ms_per_GB')} "
                                                                  f"{v:,.0f} ms/GB" for k, v in touch.items()))
    if noise.get("noisy"):
        lines.append("noisy timings (median > 1.5x min): " + ", ".join(noise["noisy"]))
    for shape, losses in report.get("loss_disagreements", {}).items():
        lines.append(f"warning: implementations disagree on the loss for {shape}: {losses}")
    return lines


TABLES = (time_table, memory_table, roofline_table, passes_table, first_call_table, targets_table)


def print_report(report: dict, console: Console) -> None:
    for make in TABLES:
        table = make(report)
        if table.row_count:
            console.print(table)
            console.print()
    for line in noise_lines(report):
        console.print(line, markup=False)


def table_markdown(table: Table) -> str:
    """A ``box.MARKDOWN`` table as Markdown: its title as a ``###`` heading, then the rows (the title is
    removed from ``table``)."""
    import io

    heading = f"### {table.title}\n\n" if table.title else ""
    table.title = None
    buffer = io.StringIO()
    Console(file=buffer, width=250, color_system=None).print(table)
    return heading + "\n".join(line.rstrip() for line in buffer.getvalue().strip().splitlines()) + "\n"


def markdown(report: dict) -> str:
    """The same tables as a Markdown document (titles as headings), for the README."""
    env = report["environment"]
    parts = [f"Measured {env['date']} on {env['cpu']} ({env['threads']} threads), commit {env['git_commit']}, "
             f"torch {env.get('torch')}, jax {env.get('jax')}, numba {env.get('numba')}, "
             f"torchaudio {env.get('torchaudio')}.\n"]
    for make in TABLES:
        table = make(report)
        if table.row_count:
            parts.append(table_markdown(table))
    parts.append("\n".join(f"- {line}" for line in noise_lines(report)) + "\n")
    return "\n".join(parts)


# --- targets --------------------------------------------------------------------------------------------


def _median(report: dict, impl: str, shape: tuple, mode: str = "fwd_bwd") -> float | None:
    for r in report["results"]:
        if r["impl"] == impl and tuple(r["shape"]) == tuple(shape):
            return r[mode]["median_s"]
    return None


def check_targets(report: dict) -> list[dict]:
    """The project's performance targets, each evaluated on this report (``met`` None: not measured)."""
    out: list[dict] = []
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in report["results"]))

    def add(target: str, shape, mode: str, value: float | None, goal: str, ok) -> None:
        out.append({"target": target, "shape": _shape(shape) if shape else "", "mode": mode, "value": value,
                    "goal": goal, "met": None if value is None else bool(ok(value))})

    def speedup(slow: float | None, fast: float | None) -> float | None:
        return None if slow is None or fast is None else slow / fast

    big = [s for s in shapes if s in ((16, 150, 40, 1024), (8, 200, 50, 256))]
    for shape in big:
        ours = _median(report, REFERENCE, shape)
        plain = [m for m in (_median(report, p, shape) for p in PLAIN) if m is not None]
        add("speed-up over the best plain framework implementation", shape, "fwd+bwd",
            speedup(min(plain) if plain else None, ours), ">= 2.5", lambda v: v >= 2.5)
        add("speed-up over torchaudio", shape, "fwd+bwd", speedup(_median(report, "torchaudio", shape), ours),
            ">= 20", lambda v: v >= 20)
    for shape in [s for s in shapes if s == (4, 100, 30, 128)]:
        for mode, label in (("fwd_bwd", "fwd+bwd"), ("fwd", "fwd")):
            ours = _median(report, REFERENCE, shape, mode)
            peers = [m for m in (_median(report, p, shape, mode) for p in PEERS) if m is not None]
            add("not slower than any peer (fastest peer / rnnt_xla)", shape, label,
                speedup(min(peers) if peers else None, ours), ">= 1", lambda v: v >= 1)
    roof = {tuple(r["shape"]): r for r in report.get("roofline", [])}
    for shape in shapes:
        add("rnnt_xla / roofline time", shape, "fwd+bwd", roof.get(shape, {}).get("ratio"), "<= 2",
            lambda v: v <= 2)
    for shape in shapes:
        add("speed-up over the seed", shape, "fwd+bwd",
            speedup(_median(report, "warprnnt_numba", shape), _median(report, REFERENCE, shape)), ">= 100",
            lambda v: v >= 100)
    runs = (report.get("first_call") or {}).get("runs", [])
    for adapter in dict.fromkeys(r["adapter"] for r in runs):
        warm = [r.get("to_result_s") or r["total_s"] for r in runs
                if r["adapter"] == adapter and r["cache"] == "warm" and "total_s" in r]
        add(f"first result, warm Numba cache, incl. imports ({adapter}), s", None, "", min(warm) if warm else None,
            "< 1.5", lambda v: v < 1.5)
    for shape in shapes:
        for mode, label in (("fwd_bwd", "fwd+bwd"), ("fwd", "fwd")):
            jax_t, torch_t = _median(report, "rnnt_xla_jax", shape, mode), _median(report, REFERENCE, shape, mode)
            add("rnnt_xla_jax / rnnt_xla_torch time", shape, label, speedup(jax_t, torch_t), "<= 1.10",
                lambda v: v <= 1.10)
            add("speed-up of rnnt_xla_jax over plain_jax", shape, label,
                speedup(_median(report, "plain_jax", shape, mode), jax_t), ">= 2", lambda v: v >= 2)
    return out


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    report["targets"] = check_targets(report)
    print_report(report, Console(width=200))


if __name__ == "__main__":
    main()
