"""PNG plots of a benchmark report: median time per shape and implementation, log scale (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

MODES = {"fwd_bwd": "forward + backward", "fwd": "forward only"}
COLORS = {
    "rnnt_xla_torch": "#1f77b4",
    "rnnt_xla_jax": "#17becf",
    "torchaudio": "#d62728",
    "plain_torch": "#ff7f0e",
    "plain_jax": "#9467bd",
    "warprnnt_numba": "#7f7f7f",
    "roofline": "#2ca02c",
}


def write_plots(report: dict, stem: Path) -> list[Path]:
    """One PNG per mode, ``<stem>_fwd_bwd.png`` and ``<stem>_fwd.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    roof = {tuple(r["shape"]): r["median_s"] for r in report.get("roofline", []) if r.get("median_s")}
    env = report["environment"]
    paths = []
    for mode, title in MODES.items():
        series = {name: [_median(results, name, s, mode) for s in shapes] for name in impls}
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        if mode == "fwd_bwd" and roof:
            series["roofline"] = [roof.get(s) for s in shapes]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(shapes))]
            kept = [(x, v) for x, v in zip(xs, values) if v is not None]
            if not kept:
                continue
            bars = ax.bar([x for x, _ in kept], [v * 1e3 for _, v in kept], width, label=name,
                          color=COLORS.get(name), hatch="//" if name == "roofline" else None,
                          edgecolor="white" if name != "roofline" else "black", linewidth=0.5)
            for bar, (_, v) in zip(bars, kept):
                ax.annotate(_fmt_ms(v * 1e3), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=6.5, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"B,T,U,V = {','.join(map(str, s))}" for s in shapes], fontsize=8)
        ax.set_ylabel("median time per call (ms, log scale)")
        ax.set_title(f"RNN-T loss on CPU, {title} ({env.get('cpu')}, {env.get('threads')} threads)", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.set_axisbelow(True)
        top = max(v for vs in series.values() for v in vs if v is not None) * 1e3
        ax.set_ylim(top=top * 8)  # room for the labels above the tallest bar
        ax.legend(fontsize=8, ncol=min(4, len(series)), loc="upper left")
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{mode}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _median(results: list[dict], impl: str, shape: tuple, mode: str) -> float | None:
    for r in results:
        if r["impl"] == impl and tuple(r["shape"]) == shape:
            return r[mode].get("median_s")
    return None


def _fmt_ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"
