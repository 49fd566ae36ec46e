"""``python -m rnnt_xla demo``: synthesise, train in both frameworks, decode held-out voices, report, plot."""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rnnt_xla.demo import models
from rnnt_xla.demo.data import Batch, SyntheticTask
from rnnt_xla.demo.decoding import alignment_posterior, label_error_rate, sequence_error_rate
from rnnt_xla.demo.models import ModelConfig, Task

SYNTHETIC_MODEL = ModelConfig()
SYNTHETIC_STEPS = 400  # ~1% label error rate on held-out data in both frameworks
SPEECH_MODEL = ModelConfig(hidden=128, strides=(2, 2), bidirectional=True, batch_size=32, lr=5e-3, warmup=100,
                           final_lr=0.05)
SPEECH_STEPS = 1000
DEFAULT_OUT = Path("rnnt_xla_demo")
_LOSS_NAMES = {"rnnt": "rnnt_loss on the joiner's logits", "fused": "fused_rnnt_loss (joiner inside the loss, tiled)",
               "tdt": "tdt_loss (the joiner also scores durations 0-4)"}
_LOSS_TITLES = {"rnnt": "RNN-T", "fused": "fused RNN-T", "tdt": "TDT"}


@dataclass
class Experiment:
    """What one demo run trains on and how it is shown."""

    name: str
    train: Task
    test: Batch
    test_speakers: list[str]
    model: ModelConfig
    steps: int
    words: tuple[str, ...]  # printed form of label 1, 2, ...
    frame_seconds: float | None  # seconds per feature frame (None: not audio)
    description: str
    loss: str = models.DEFAULT_LOSS  # one of models.LOSSES

    def say(self, labels: list[int]) -> str:
        return " ".join(self.words[label - 1] for label in labels)


@dataclass
class Run:
    framework: str
    losses: list[float]
    train_seconds: float
    decode_seconds: float
    hypotheses: list[list[int]]
    alignments: list[list[tuple[int, int]]]
    pictured: int  # the test utterance drawn in the alignment figure
    logits: Any  # (T', U+1, V) float32 of that utterance, for its alignment posterior

    def trained(self) -> bool:
        return all(math.isfinite(x) for x in self.losses) and self.losses[-1] < self.losses[0]


def synthetic_experiment(steps: int | None) -> Experiment:
    task = SyntheticTask()
    held_out = task.sample(np.random.default_rng(12345), 64)  # a seed the training batches never use
    return Experiment(
        "synthetic", task, held_out, ["synthetic"] * 64, SYNTHETIC_MODEL, SYNTHETIC_STEPS if steps is None else steps,
        tuple(str(k) for k in range(1, task.vocab_size)), None,
        f"Synthetic task: {task.num_labels} labels + blank, {task.min_labels}-{task.max_labels} labels per "
        f"utterance, up to {task.max_frames} frames of {task.feature_dim} features; fresh batches of "
        f"{SYNTHETIC_MODEL.batch_size}")


def speech_experiment(steps: int | None, config, cache_dir: Path | None, console) -> Experiment:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rnnt_xla.demo import speech

    start = time.perf_counter()
    with Progress(TextColumn("synthesising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        bar = progress.add_task("synthesis", total=config.train_utterances + config.test_utterances)
        data = speech.load_or_build(config, cache_dir, on_utterance=lambda done, total: progress.update(
            bar, completed=done))
    seconds = time.perf_counter() - start
    train_voices = {v.split("+")[1] for v in data.train.speakers}
    origin = "read from the cache" if data.cached else f"synthesised with eSpeak NG and cached in {seconds:.1f} s"
    description = (
        f"Spoken digits ({origin}): {len(data.train)} training utterances by {len(train_voices)} eSpeak NG "
        f"voice variants x {len(speech.ACCENTS)} accents, {len(data.test)} test utterances by "
        f"{len(speech.HELD_OUT_VOICES)} held-out variants ({', '.join(speech.HELD_OUT_VOICES)}); "
        f"{config.min_digits}-{config.max_digits} digits each, {data.seconds_of_audio / 60:.0f} min of audio, "
        f"{config.n_mels} log-mel bands every {1000 * config.hop / data.sample_rate:.0f} ms")
    return Experiment("speech", data.train, data.test.batch(), data.test.speakers, SPEECH_MODEL,
                      SPEECH_STEPS if steps is None else steps, speech.DIGITS[:], config.hop / data.sample_rate,
                      description)


def _pictured(experiment: Experiment, hypotheses: list[list[int]]) -> int:
    """The test utterance to draw: the first of at least 4 labels that was decoded right (else the first of
    at least 4, else the longest)."""
    references = experiment.test.references()
    for wanted in (lambda r, h: len(r) >= 4 and r == h, lambda r, h: len(r) >= 4):
        for k, (r, h) in enumerate(zip(references, hypotheses)):
            if wanted(r, h):
                return k
    return int(np.argmax(experiment.test.label_lengths))


def _train(name: str, experiment: Experiment, progress, console) -> Run:
    steps = experiment.steps
    bar = progress.add_task(name, total=steps, loss="")
    every = max(1, steps // 5)

    def on_step(step: int, loss: float) -> None:
        progress.update(bar, advance=1, loss=f"loss {loss:.3f}")
        if not console.is_terminal and (step % every == 0 or step == steps - 1):
            console.print(f"{name:>5} step {step + 1:4d}/{steps}  loss {loss:8.3f}")  # progress in logs

    start = time.perf_counter()
    if name == "torch":
        model, losses = models.train_torch(experiment.train, steps, experiment.model, on_step=on_step,
                                           loss=experiment.loss)
        train_seconds = time.perf_counter() - start
        alignments = models.align_torch(model, experiment.test)
    else:
        model, params, losses = models.train_jax(experiment.train, steps, experiment.model, on_step=on_step,
                                                 loss=experiment.loss)
        train_seconds = time.perf_counter() - start
        alignments = models.align_jax(model, params, experiment.test, experiment.model)
    decode_seconds = time.perf_counter() - start - train_seconds
    progress.remove_task(bar)
    hypotheses = [[label for label, _ in a] for a in alignments]
    k = _pictured(experiment, hypotheses)
    one = Batch(*(x[k:k + 1] for x in (experiment.test.frames, experiment.test.frame_lengths,
                                         experiment.test.labels, experiment.test.label_lengths)))
    if name == "torch":
        logits, lengths = models.logits_torch(model, one)
    else:
        logits, lengths = models.logits_jax(model, params, one, experiment.model)
    return Run(name, losses, train_seconds, decode_seconds, hypotheses, alignments, k,
               logits[0, :lengths[0], :one.label_lengths[0] + 1])


def _figures(experiment: Experiment, runs: list[Run], out: Path) -> dict[str, str]:
    from rnnt_xla.demo.plots import plot_alignment, plot_losses

    figures = {"loss_curves": str(plot_losses({r.framework: r.losses for r in runs}, out / "loss_curves.png",
                                              f"rnnt_xla {_LOSS_TITLES[experiment.loss]} loss, "
                                              f"{experiment.name} data"))}
    # The alignment picture is the RNN-T lattice posterior; a TDT model's lattice has skipping arcs.
    if experiment.frame_seconds is not None and not experiment.model.durations:
        run = runs[0]
        k = run.pictured
        reference = experiment.test.references()[k]
        occupancy = alignment_posterior(run.logits, np.array(reference))
        features = experiment.test.frames[k, :experiment.test.frame_lengths[k]]
        emitted = [(experiment.words[label - 1], t) for label, t in run.alignments[k]]
        title = (f"held-out voice {experiment.test_speakers[k]}: \"{experiment.say(reference)}\"\n"
                 f"greedy decode ({run.framework}): \"{experiment.say(run.hypotheses[k])}\", each word at the frame "
                 "that emitted it")
        subsampling = int(np.prod(experiment.model.strides))
        figures["alignment"] = str(plot_alignment(features, occupancy, [experiment.words[y - 1] for y in reference],
                                                  emitted, experiment.frame_seconds, subsampling,
                                                  out / "alignment.png", title))
    return figures


def _summary(console, experiment: Experiment, runs: list[Run], shown: int = 5) -> dict[str, dict]:
    from rich.table import Table

    references = experiment.test.references()
    unit = "digit" if experiment.name == "speech" else "label"
    results = {}
    for run in runs:
        console.print(f"[bold]{run.framework}[/] greedy decode of held-out utterances, first {shown}:")
        for r, h, who in list(zip(references, run.hypotheses, experiment.test_speakers))[:shown]:
            mark = "[green]ok[/]" if r == h else "[red]x[/]"
            console.print(f"  {who:<20} ref {experiment.say(r):<40} hyp {experiment.say(h):<40} {mark}",
                          highlight=False)
        error_rate = label_error_rate(references, run.hypotheses)
        utterance_error_rate = sequence_error_rate(references, run.hypotheses)
        console.print(f"[bold]{run.framework}[/]: {unit} error rate {error_rate:.1%}"
                      f"{' (= word error rate: each word is one digit)' if unit == 'digit' else ''}, "
                      f"utterance error rate {utterance_error_rate:.1%}")
        results[run.framework] = {"steps": len(run.losses), "train_seconds": run.train_seconds,
                                  "decode_seconds": run.decode_seconds, "final_loss": float(np.mean(run.losses[-20:])),
                                  "error_rate": error_rate, "utterance_error_rate": utterance_error_rate,
                                  "trained": run.trained(), "losses": run.losses}
    table = Table(title=f"{experiment.name} data: {len(references)} held-out utterances, "
                        f"{sum(map(len, references))} {unit}s")
    for column in ("", "steps", "train s", "loss", f"{unit} errors", "utt. errors", "decode s"):
        table.add_column(column, justify="right")
    for run in runs:
        result = results[run.framework]
        table.add_row(run.framework, str(result["steps"]), f"{run.train_seconds:.1f}",
                      f"{run.losses[0]:.1f} -> {result['final_loss']:.2f}", f"{result['error_rate']:.1%}",
                      f"{result['utterance_error_rate']:.1%}", f"{run.decode_seconds:.1f}")
    console.print(table)
    return results


def main(steps: int | None = None, framework: str = "both", data: str = "speech", out: Path | str | None = None,
         cache_dir: Path | str | None = None, speech_config=None, loss: str = models.DEFAULT_LOSS) -> int:
    """Train and decode with the requested framework(s) and loss (``models.LOSSES``); 0 if every run trained
    (finite, falling loss), 1 if one did not, 2 for a usage error or a missing extra."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if framework not in ("torch", "jax", "both"):
        raise ValueError(f"framework must be 'torch', 'jax' or 'both', got {framework!r}")
    if data not in ("speech", "synthetic"):
        raise ValueError(f"data must be 'speech' or 'synthetic', got {data!r}")
    models._check_loss(loss)
    started = time.perf_counter()
    console = Console(soft_wrap=True)  # long lines stay whole when the output goes to a file or a test
    if steps is not None and steps < 1:
        console.print(f"[red]--steps must be at least 1, got {steps}[/]")
        return 2
    out = DEFAULT_OUT if out is None else Path(out)

    frameworks = []
    for name, modules, extras in (("torch", ["torch"], "torch"), ("jax", ["jax", "flax", "optax"], "jax,flax")):
        if framework not in (name, "both"):
            continue
        try:
            for module in modules:
                importlib.import_module(module)
            frameworks.append(name)
        except ImportError as error:
            console.print(f"[yellow]{name} part skipped[/]: {escape(f'{error} (pip install -e .[{extras}])')}")
    if loss == "tdt":
        missing = [name for name in frameworks if not models.tdt_available(name)]
        for name in missing:
            console.print(f"[red]--loss tdt: rnnt_xla.{name}.tdt_loss is not in this version of rnnt_xla[/]")
        frameworks = [name for name in frameworks if name not in missing]
    if not frameworks:
        return 2

    if data == "speech":
        from rnnt_xla.demo import speech

        try:
            experiment = speech_experiment(steps, speech_config or speech.SpeechConfig(), cache_dir and Path(cache_dir),
                                           console)
        except speech.MissingExtra as error:
            console.print(f"[red]{escape(str(error))}[/]")
            return 2
    else:
        experiment = synthetic_experiment(steps)
    experiment.loss = loss
    if loss == "tdt":  # the joiner also predicts each token's duration; decoding skips frames by it
        experiment.model = models.config_for(loss, experiment.model)
    console.print(experiment.description, highlight=False)
    console.print(f"Model: {experiment.model}; {experiment.steps} steps per framework; loss: {_LOSS_NAMES[loss]}",
                  highlight=False)

    runs = []
    columns = TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}")
    # The bars are for terminals; in logs and pipes a few printed lines show the progress instead.
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as progress:
        for name in frameworks:
            runs.append(_train(name, experiment, progress, console))
            run = runs[-1]
            console.print(f"[bold]{name}[/]: loss {run.losses[0]:.2f} -> {run.losses[-1]:.3f} in {len(run.losses)} "
                          f"steps ({run.train_seconds:.1f} s), decoded in {run.decode_seconds:.1f} s")

    results = _summary(console, experiment, runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(experiment, runs, out)
    total = time.perf_counter() - started
    summary = {"data": experiment.name, "loss": loss, "description": experiment.description,
               "model": asdict(experiment.model),
               "seconds": total, "frameworks": results, "figures": figures}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    console.print(f"Figures: {', '.join(figures.values())}; results: {out / 'results.json'}", highlight=False)
    console.print(f"Demo finished in {total:.0f} s.")
    return 0 if all(run.trained() for run in runs) else 1
