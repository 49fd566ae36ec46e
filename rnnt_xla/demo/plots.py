"""The demo's figures (matplotlib, written as PNG files): loss curves and an alignment picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the demo's figures need matplotlib: pip install -e '.[demo]'") from error
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Training loss per step of each framework (faint) and its running mean over 20 steps (bold)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for (name, losses), color in zip(curves.items(), ("tab:orange", "tab:blue", "tab:green")):
        losses = np.asarray(losses, np.float64)
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        window = min(20, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color=color, linewidth=2, label=f"{name} (final {smooth[-1]:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("transducer loss (nats per utterance)")
    ax.set_title(title or "rnnt_xla loss, the same batches in both frameworks")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_alignment(features: np.ndarray, occupancy: np.ndarray, reference: list[str],
                   emitted: list[tuple[str, int]], frame_seconds: float, subsampling: int, path: Path,
                   title: str = "") -> Path:
    """A spectrogram above the transducer lattice's posterior occupancy, on one time axis.

    Args:
        features: ``(T, F)`` log-mel frames of the utterance (valid frames only).
        occupancy: ``(T', U+1)`` posterior probability of each lattice node (frame t', u labels emitted)
            for the reference labels, from :func:`rnnt_xla.demo.decoding.alignment_posterior`.
        reference: the ``U`` reference words.
        emitted: the greedy decode, ``(word, encoder frame)`` per emitted label.
        frame_seconds: seconds per feature frame; ``subsampling`` feature frames make one encoder frame.
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, layout="constrained",
                                      gridspec_kw={"height_ratios": [1, 1.2]})
    seconds = len(features) * frame_seconds
    top.imshow(features.T, origin="lower", aspect="auto", cmap="magma", extent=(0, seconds, 0, features.shape[1]))
    top.set_ylabel("mel band")
    step = frame_seconds * subsampling
    for i, (word, t) in enumerate(emitted):
        x = (t + 0.5) * step
        top.axvline(x, color="white", linewidth=1, linestyle="--", alpha=0.8)
        # Alternate heights: words emitted on neighbouring frames stay legible.
        top.text(x, features.shape[1] * (0.95 if i % 2 == 0 else 0.78), word, color="white", ha="center", va="top",
                 fontsize=11, fontweight="bold", bbox={"facecolor": "black", "alpha": 0.5, "edgecolor": "none"})
    top.set_title(title or "log-mel spectrogram with the greedy decode (word at the frame that emitted it)")

    T_enc = occupancy.shape[0]
    image = bottom.imshow(occupancy.T, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=(0, T_enc * step, -0.5, occupancy.shape[1] - 0.5), interpolation="nearest")
    bottom.set_yticks(range(len(reference) + 1), ["(none)"] + [f"+{w}" for w in reference])
    bottom.set_ylabel("labels emitted so far (u)")
    bottom.set_xlabel("time (s)")
    bottom.set_title("RNNT alignment posterior: P(lattice node (t, u) | audio, reference) = exp(alpha + beta - log P)")
    fig.colorbar(image, ax=bottom, label="posterior occupancy", pad=0.01)
    bottom.set_xlim(0, max(seconds, T_enc * step))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
