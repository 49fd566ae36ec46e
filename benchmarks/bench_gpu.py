"""GPU benchmark of the RNN-T loss: rnnt_xla's CUDA kernels against torchaudio, plain torch/JAX and the seed.

rnnt_xla through its torch and JAX adapters, torchaudio's CUDA ``rnnt_loss``, plain PyTorch and JAX
(``plain_torch.py``, ``plain_jax.py``) and the seed (warprnnt_numba), on one GPU:

    python benchmarks/bench_gpu.py                                   # every implementation, the default shapes
    python benchmarks/bench_gpu.py --impls rnnt_xla_torch torchaudio --shapes 16,150,40,1024 --repeats 20
    python benchmarks/bench_gpu.py --dtype float16
    CUDA_VISIBLE_DEVICES=1 python benchmarks/bench_gpu.py            # another GPU (it always uses the first)

Per shape, the same inputs (``implementations.make_inputs``: the CPU benchmark's, uploaded once per framework)
go to each implementation in turn, torch ones first, then JAX ones (``XLA_PYTHON_CLIENT_PREALLOCATE=false``,
so that JAX takes GPU memory as it needs it instead of 75% up front). For each, fwd+bwd (``reduction='mean'``,
then the gradient w.r.t. the logits) and forward only are timed: a first call (it compiles: timed apart),
``--warmup - 1`` more calls, then ``--repeats`` timed calls, each between two device synchronisations, so a time
is the wall time of one call, host side included. Reported: the median, ratio to rnnt_xla_torch, the
achieved bandwidth against the floor of any fused loss (fwd+bwd reads the logits twice and writes a gradient
of the same size: 3x the logits bytes; forward only: 1x) and its fraction of the GPU's peak memory bandwidth,
and the extra memory one fwd+bwd takes from torch's allocator (gradient included, inputs excluded).
Before each implementation the free GPU memory is checked against an estimate of what it needs; one that
would not fit is skipped with a note. Correctness in the same run: every loss against rnnt_xla_torch's, and
rnnt_xla's gradient against torchaudio's.

The transducer family (``--family``, default all): TDT (``tdt_torch``: ``V + 5`` logits, durations
``[0, 1, 2, 3, 4]``, sigma 0.05), multi-blank (``multiblank_torch``: big blanks ``[2, 4, 8]`` before the
standard blank ``V - 1``), ``rnnt_type='modified'`` / ``'constrained'`` and ``delay_penalty=0.01``
(``modified_torch``, ``constrained_torch``, ``delay_torch``), all through ``rnnt_xla.torch`` on the same inputs
(TDT: with 5 duration columns appended), timed like the others; their ``x`` is the time over rnnt_xla_torch's
(plain RNNT) and their losses, which differ from RNNT's by definition, are not compared.

The JAX fused joint + loss (``rnnt_xla_jax_fused``; ``--no-jax-fused`` to leave it out):
``rnnt_xla.jax.fused_rnnt_loss`` on the same logits through a joint that only reshapes them (:func:`jax_fused_loss`),
so its loss is rnnt_loss's and its ``x`` is what the tiling costs. Skipped with a note when JAX has no GPU backend.

Output: a table on the terminal, ``benchmarks/results/gpu_<gpu-name>.json`` (results and environment) and
the same tables as ``.md``. Without a GPU it prints one line saying so (with ``python -m rnnt_xla doctor``'s
verdict) and exits with status 0 (1 when a GPU is there but the driver fails to initialise).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# `python benchmarks/bench_gpu.py` puts benchmarks/ (not the repo root) on sys.path; add the root so a source
# checkout of rnnt_xla imports without `pip install -e .`.
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from bench_cpu import Timing as CpuTiming  # noqa: E402
from bench_cpu import _git_commit, _git_dirty, _version, parse_shape, summarise_timings  # noqa: E402
from implementations import (BLANK, ITEMSIZE, ORDER, REFERENCE, Impl, Inputs, Prepared, Shape,  # noqa: E402
                             _jax_prepare, load, make_inputs)
from report import _mb, _ms, _ratio, _shape, _table, table_markdown  # noqa: E402
from rnnt_xla.doctor import Findings, _probe_driver, diagnose  # noqa: E402

DEFAULT_SHAPES = ["4,100,30,128", "8,200,50,256", "16,150,40,1024", "32,500,100,1024"]
MODES = ("fwd_bwd", "fwd")
# Least traffic of any loss, in logits sizes: fwd+bwd must read the logits (forward), read them again
# (backward: the softmax is not kept) and write a gradient of the same size; forward only reads them once.
LOGITS_PASSES = {"fwd_bwd": 3, "fwd": 1}
# The fused joint + loss through rnnt_xla.jax, on the logits (see jax_fused_loss), when JAX has a GPU backend.
JAX_FUSED = "rnnt_xla_jax_fused"
JAX_IMPLS = ("rnnt_xla_jax", JAX_FUSED, "plain_jax")
# The family losses through rnnt_xla.torch on CUDA: name -> (loss, keyword arguments); see the module docstring.
TDT_DURATIONS = [0, 1, 2, 3, 4]
BIG_BLANK_DURATIONS = [2, 4, 8]
FAMILY: dict[str, tuple[str, dict]] = {
    "tdt_torch": ("tdt", {"durations": TDT_DURATIONS, "sigma": 0.05}),
    "multiblank_torch": ("multiblank", {"big_blank_durations": BIG_BLANK_DURATIONS, "blank": -1}),
    "modified_torch": ("rnnt", {"rnnt_type": "modified"}),
    "constrained_torch": ("rnnt", {"rnnt_type": "constrained"}),
    "delay_torch": ("rnnt", {"delay_penalty": 0.01}),
}

# GPU memory one fwd+bwd needs beyond its inputs, as (multiple of the logits size, bytes per lattice cell
# (b, t, u)). From the CPU suite's peak-RSS measurements (benchmarks/README.md), rounded up: rnnt_xla keeps
# the gradient plus float64 residuals and betas (36 B per cell); torchaudio computes the gradient in the forward
# pass and keeps it until backward returns another; plain torch keeps log_softmax, its gradient and the logits'
# gradient (3.0-3.2x on the CPU); plain JAX 4.0-4.2x; the seed 4.0x on the CPU.
MEMORY_NEED: dict[str, tuple[float, int]] = {
    "rnnt_xla_torch": (1.0, 64),
    "rnnt_xla_jax": (1.0, 64),
    # the logits as encoder_out: their gradient, its tiles before they are assembled, the grid-padded input
    JAX_FUSED: (3.0, 96),
    "torchaudio": (2.0, 64),
    "plain_torch": (4.0, 64),
    "plain_jax": (4.5, 64),
    "warprnnt_numba": (4.0, 64),
    # the family: the gradient plus their residuals (TDT: 8 B per duration and cell more; multi-blank: per big
    # blank); the TDT logits are a copy with 5 more columns, counted as one more logits
    "tdt_torch": (2.1, 64 + 8 * len(TDT_DURATIONS)),
    "multiblank_torch": (1.0, 64 + 8 * len(BIG_BLANK_DURATIONS)),
    "modified_torch": (1.0, 64),
    "constrained_torch": (1.0, 64),
    "delay_torch": (1.0, 64),
}
MEMORY_MARGIN = 1.1  # allocator rounding and fragmentation
MEMORY_RESERVE = 512 * 2**20  # cuBLAS/cuDNN workspaces, JIT-loaded modules
# rnnt_xla's gradient is kept for the comparison with torchaudio's only while it is small next to the GPU's
# memory, so that holding it never makes torchaudio's timing be skipped for lack of memory.
GRADIENT_CHECK_MAX_FRACTION = 0.1
# Agreement thresholds. Losses: both sides sum float32 log-probabilities over T+U steps. Gradients (max abs
# difference / max abs gradient): torchaudio's float32 lattice carries an absolute error of about one ulp of
# the log-likelihood (~1e-4 at a cost of ~1,000), which becomes a relative error of the gradient.
LOSS_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
GRAD_RTOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


@dataclass
class Timing(CpuTiming):
    """The CPU suite's timing record (``gb_per_s`` here: LOGITS_PASSES[mode] x logits bytes / median), plus:"""
    first_call_s: float | None = None  # the first call, JIT compilation included
    fraction_of_peak: float | None = None  # gb_per_s / the GPU's peak memory bandwidth


@dataclass
class Result:
    shape: Shape
    impl: str
    logits_bytes: int
    fwd_bwd: Timing = field(default_factory=Timing)
    fwd: Timing = field(default_factory=Timing)
    peak_extra_bytes: int | None = None  # torch: max_memory_allocated growth during one fwd+bwd
    xla_memory: dict = field(default_factory=dict)  # JAX: the compiled programs' memory_analysis(), bytes
    loss_rel_diff: float | None = None  # max over modes of |loss - rnnt_xla_torch's| / |rnnt_xla_torch's|
    skipped: str | None = None  # why it did not run (not enough free memory)
    error: str | None = None


# --- pure helpers (tested without a GPU) -----------------------------------------------------------------


def achieved_gb_per_s(logits_bytes: int, mode: str, seconds: float) -> float:
    """Bandwidth against the floor: ``LOGITS_PASSES[mode]`` x the logits bytes per call, in GB/s (1e9)."""
    return LOGITS_PASSES[mode] * logits_bytes / seconds / 1e9


def peak_bandwidth_bytes_per_s(memory_clock_khz: int | None, bus_width_bits: int | None) -> float | None:
    """Theoretical peak memory bandwidth: memory clock x 2 transfers per clock (DDR) x bus width in bytes;
    None when the driver did not report both."""
    if not memory_clock_khz or not bus_width_bits:
        return None
    return memory_clock_khz * 1e3 * 2 * bus_width_bits / 8


def memory_needed(impl: str, shape: Shape, itemsize: int, inputs_on_device: bool) -> int:
    """Estimated GPU bytes one fwd+bwd of ``impl`` needs for logits ``(B, T, U+1, V)`` of ``itemsize`` bytes,
    plus the inputs when they are not on the device yet (JAX gets its own copy), with margin and reserve."""
    B, T, U, V = shape
    cells = B * T * (U + 1)
    logits = cells * V * itemsize
    multiple, per_cell = MEMORY_NEED.get(impl, (4.0, 64))
    need = multiple * logits + per_cell * cells
    if not inputs_on_device:
        need += logits + 4 * B * (U + 2)  # logits, int32 targets and lengths
    return int(need * MEMORY_MARGIN) + MEMORY_RESERVE


def fits(need_bytes: int, free_bytes: int | None) -> bool:
    """Whether ``need_bytes`` fits in ``free_bytes`` (unknown free memory: try, and report a failure)."""
    return free_bytes is None or need_bytes <= free_bytes


def keep_gradient_for_check(logits_bytes: int, total_bytes: int | None) -> bool:
    return total_bytes is not None and logits_bytes <= GRADIENT_CHECK_MAX_FRACTION * total_bytes


def run_order(names: list[str]) -> list[str]:
    """Torch implementations first, then JAX ones: JAX's allocator keeps what it took (its pool never shrinks),
    torch's cached blocks are handed back between implementations."""
    return [n for n in names if n not in JAX_IMPLS] + [n for n in names if n in JAX_IMPLS]


def gpu_slug(name: str) -> str:
    """A file-name fragment for a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def default_output(gpu_name: str) -> Path:
    return HERE / "results" / f"gpu_{gpu_slug(gpu_name)}.json"


def relative_difference(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return abs(value - reference) / max(abs(reference), 1e-30)


def summarise(results: list[Result], peak_bytes_per_s: float | None) -> None:
    """Fill in medians, minima, bandwidths, ratios to rnnt_xla_torch and loss differences."""
    summarise_timings(results, lambda r, mode, seconds: achieved_gb_per_s(r.logits_bytes, mode, seconds))
    for r in results:
        for mode in MODES:
            t: Timing = getattr(r, mode)
            if t.gb_per_s is not None and peak_bytes_per_s:
                t.fraction_of_peak = t.gb_per_s * 1e9 / peak_bytes_per_s
    ref = {tuple(r.shape): r for r in results if r.impl == REFERENCE}
    for r in results:
        base = ref.get(tuple(r.shape))
        if base is None or r.impl in FAMILY:  # another loss: nothing to compare with
            continue
        diffs = [d for d in (relative_difference(getattr(r, m).loss, base.fwd_bwd.loss) for m in MODES)
                 if d is not None]
        r.loss_rel_diff = max(diffs) if diffs else None


def _gbs(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def extra_bytes(result: dict) -> int | None:
    """Extra GPU memory of one fwd+bwd: torch's measured peak growth, or for JAX what XLA's compiled program
    declares (temporaries + outputs, the gradient among them; the lattice workspace Numba allocates for the
    backward pass is not in it)."""
    if result.get("peak_extra_bytes") is not None:
        return result["peak_extra_bytes"]
    xla = (result.get("xla_memory") or {}).get("fwd_bwd") or {}
    return xla["temp"] + xla["output"] if "temp" in xla and "output" in xla else None


def time_table(report: dict) -> Table:
    """The results as a rich ``box.MARKDOWN`` table, one row per shape and implementation."""
    table = _table("RNN-T loss on the GPU: median ms per call",
                   ["B,T,U,V", "implementation", "fwd+bwd", "min", "x", "GB/s", "% peak", "fwd only", "x", "GB/s",
                    "% peak", "extra MB", "loss rel diff", "1st call s"])
    previous = None
    for r in report["results"]:
        shape = "" if r["shape"] == previous else _shape(r["shape"])
        previous = r["shape"]
        fb, f = r["fwd_bwd"], r["fwd"]
        if r.get("skipped") or (fb["median_s"] is None and f["median_s"] is None):
            table.add_row(shape, r["impl"], "skipped" if r.get("skipped") else "failed")
            continue
        diff = r.get("loss_rel_diff")
        first = fb.get("first_call_s")
        table.add_row(shape, r["impl"], _ms(fb["median_s"]), _ms(fb["min_s"]), _ratio(fb["ratio"]),
                      _gbs(fb["gb_per_s"]), _percent(fb["fraction_of_peak"]), _ms(f["median_s"]), _ratio(f["ratio"]),
                      _gbs(f["gb_per_s"]), _percent(f["fraction_of_peak"]), _mb(extra_bytes(r), r["logits_bytes"]),
                      "—" if diff is None else f"{diff:.1e}", "—" if first is None else f"{first:.2f}")
    return table


def environment_line(env: dict) -> str:
    peak = env.get("peak_bandwidth_GB_per_s")
    memory = env.get("gpu_memory_bytes")
    return (f"{env.get('gpu')} (compute capability {env.get('compute_capability')}"
            + (f", {memory / 2**30:.0f} GiB" if memory else "")
            + (f", peak {peak:,.0f} GB/s" if peak else "") + f"), driver {env.get('driver_version')} "
            f"(CUDA {env.get('driver_cuda_version')}); torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
            f"torchaudio {env.get('torchaudio')}, jax {env.get('jax')}, numba {env.get('numba')}, "
            f"numba-cuda {env.get('numba-cuda')}; commit {env.get('git_commit')}"
            + (" (modified rnnt_xla/)" if env.get("git_dirty") else "") + f"; {env.get('date')}")


def report_lines(report: dict) -> list[str]:
    """What the table does not show: the settings, correctness checks, skipped and failed implementations."""
    s = report["settings"]
    lines = [environment_line(report["environment"]),
             f"{s['dtype']} logits, blank={s['blank']}, reduction='{s['reduction']}'; median and min of "
             f"{s['repeats']} calls after {s['warmup']} warm-up calls, each call between two device synchronisations",
             "x: time / rnnt_xla_torch's time; GB/s: bytes of the floor (fwd+bwd: 3x the logits, fwd: 1x) / time; "
             "% peak: of the GPU's peak memory bandwidth; extra MB (x logits size) of one fwd+bwd: torch's "
             "allocator peak growth (gradient included), JAX: XLA's temp + output bytes; loss rel diff: to "
             "rnnt_xla_torch's fwd+bwd loss; 1st call: the first fwd+bwd, compilation included (JAX: compiled "
             "ahead of time, not included)"]
    tolerance = LOSS_RTOL.get(s["dtype"], 1e-4)
    for r in report["results"]:
        label = f"{r['impl']} {_shape(r['shape'])}"
        if r.get("skipped"):
            lines.append(f"skipped {label}: {r['skipped']}")
        if r.get("error"):
            lines.append(f"failed {label}: {r['error']}")
        for mode in MODES:
            if r[mode].get("error"):
                lines.append(f"failed {label} {mode}: {r[mode]['error']}")
        diff = r.get("loss_rel_diff")
        if diff is not None and diff > tolerance:
            lines.append(f"LOSS DISAGREES: {label}: relative difference {diff:.1e} to {REFERENCE} (> {tolerance:g})")
    for check in report.get("gradient_checks", []):
        shape = _shape(check["shape"])
        if "skipped" in check:
            lines.append(f"gradient check {shape}: skipped ({check['skipped']})")
        else:
            verdict = "OK" if check["ok"] else "MISMATCH"
            lines.append(f"gradient check {shape}: rnnt_xla_torch vs torchaudio: max abs difference "
                         f"{check['max_abs_diff']:.2e} = {check['relative']:.1e} x max abs gradient "
                         f"({check['max_abs_grad']:.2e}): {verdict} (tolerance {check['tolerance']:g})")
    lines.extend(report.get("notes", []))
    return lines


def markdown(report: dict) -> str:
    return "\n".join([table_markdown(time_table(report)), *(f"- {line}" for line in report_lines(report))]) + "\n"


def probe_driver() -> Findings:
    """``rnnt_xla.doctor``'s driver probe alone (ctypes on libcuda: driver version, GPU names and compute
    capabilities; no framework import), not its PTX compile, which takes seconds."""
    findings = Findings()
    _probe_driver(findings)
    return findings


def no_gpu_message(findings: Findings) -> tuple[str | None, int]:
    """(None, 0) when the driver sees a GPU; otherwise one line saying so with the doctor's diagnosis, and the
    exit status: 0 when there is simply no GPU, 1 when the driver is broken (as ``python -m rnnt_xla doctor``)."""
    if findings.gpus:
        return None, 0
    diagnosis = diagnose(findings)
    return (f"no CUDA GPU found, nothing to benchmark (python -m rnnt_xla doctor: {diagnosis.verdict}; "
            f"{' '.join(diagnosis.details)})"), 0 if diagnosis.ok else 1


# --- the GPU --------------------------------------------------------------------------------------------


def _driver_attributes(ordinal: int, codes: tuple[int, ...]) -> list[int | None]:
    """``cuDeviceGetAttribute`` values through libcuda (framework-independent); None where unavailable."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        device = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return [None] * len(codes)
    except (OSError, AttributeError):
        return [None] * len(codes)
    values: list[int | None] = []
    for code in codes:
        value = ctypes.c_int(0)
        ok = lib.cuDeviceGetAttribute(ctypes.byref(value), code, device) == 0 and value.value > 0
        values.append(value.value if ok else None)
    return values


_MEMORY_CLOCK_RATE, _GLOBAL_MEMORY_BUS_WIDTH = 36, 37  # CU_DEVICE_ATTRIBUTE_* (kHz, bits)


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _torch_cuda() -> Any:
    """torch, when it is imported (by a torch implementation) and has a CUDA device; else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() else None


def memory_info(impl: str) -> tuple[int | None, int | None]:
    """(free, total) GPU bytes available to ``impl``, after torch's cached blocks are handed back; for a JAX
    implementation also what JAX's pool holds unused (it is not returned to the driver), capped by the pool's
    limit. (None, None) when nothing can tell."""
    free = total = None
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
    else:
        try:
            from numba import cuda

            free, total = cuda.current_context().get_memory_info()
        except Exception:
            pass
    if impl in JAX_IMPLS and free is not None and "jax" in sys.modules:
        try:
            stats = sys.modules["jax"].devices("gpu")[0].memory_stats() or {}
        except Exception:
            stats = {}
        in_use = stats.get("bytes_in_use", 0)
        free += max(0, stats.get("pool_bytes", stats.get("bytes_reserved", in_use)) - in_use)
        if "bytes_limit" in stats:
            free = min(free, stats["bytes_limit"] - in_use)
    return free, total


def environment(gpu_name: str, cc: tuple[int, int], gpu_count: int, driver_cuda: tuple[int, int] | None,
                total_bytes: int | None) -> dict[str, object]:
    clock, bus = _driver_attributes(0, (_MEMORY_CLOCK_RATE, _GLOBAL_MEMORY_BUS_WIDTH))
    peak = peak_bandwidth_bytes_per_s(clock, bus)
    torch = sys.modules.get("torch")
    env: dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_name,
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "gpu_count": gpu_count,
        "gpu_memory_bytes": total_bytes,
        "memory_clock_khz": clock,
        "memory_bus_width_bits": bus,
        "peak_bandwidth_GB_per_s": None if peak is None else peak / 1e9,
        "driver_version": _nvidia_smi_driver(),
        "driver_cuda_version": None if driver_cuda is None else f"{driver_cuda[0]}.{driver_cuda[1]}",
        "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
    }
    for package in ("rnnt_xla", "torch", "torchaudio", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin",
                    "numpy", "numba", "numba-cuda", "cuda-bindings", "warprnnt_numba"):
        env[package] = _version(package)
    return env


# --- timing ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _timed(fn: Callable[[], float], sync: Callable[[], None]) -> tuple[float, float]:
    """Wall time of one call between two device synchronisations (nothing earlier is charged to it, and all of
    its GPU work is), and its loss."""
    sync()
    start = time.perf_counter()
    loss = fn()
    sync()
    return time.perf_counter() - start, loss


def time_calls(fn: Callable[[], float], sync: Callable[[], None], warmup: int, repeats: int,
               step: Callable[[str], None]) -> Timing:
    """The first call (compiles: timed apart), ``warmup - 1`` more untimed calls, ``repeats`` timed calls. An
    exception is recorded in the Timing, with no partial set of times."""
    t = Timing()
    try:
        step("first call (compiles)")
        t.first_call_s, t.loss = _timed(fn, sync)
        for i in range(1, warmup):
            step(f"warm-up {i + 1}/{warmup}")
            _timed(fn, sync)
        for i in range(repeats):
            step(f"{i + 1}/{repeats}")
            elapsed, t.loss = _timed(fn, sync)
            t.times_s.append(elapsed)
    except Exception as exc:  # e.g. torch.cuda.OutOfMemoryError; keep benchmarking the others
        t.error = _one_line(exc)
        t.times_s.clear()
    return t


def peak_extra_bytes(prepared: Prepared, torch: Any) -> int:
    """Growth of torch's allocated memory at its peak during one fwd+bwd, from the state a training step starts
    in (previous gradient freed): the gradient plus every temporary, not the inputs. Memory that Numba or
    XLA allocate themselves is not seen."""
    prepared.release()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    prepared.fwd_bwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def compare_gradients(ours: Any, theirs: Any, dtype: str) -> dict[str, object]:
    """Max abs difference of two ``(B, T, U+1, V)`` torch CUDA gradients, relative to the max abs gradient;
    one utterance at a time, so that no logits-sized temporary is needed."""
    diff = scale = 0.0
    for b in range(ours.shape[0]):
        g = ours[b].float()
        diff = max(diff, float((g - theirs[b].float()).abs().max()))
        scale = max(scale, float(g.abs().max()))
    relative = diff / scale if scale else float("inf")
    tolerance = GRAD_RTOL.get(dtype, 1e-3)
    return {"max_abs_diff": diff, "max_abs_grad": scale, "relative": relative, "tolerance": tolerance,
            "ok": relative <= tolerance}


def run_shapes(shapes: list[Shape], impls: dict[str, Impl], args: argparse.Namespace, progress: Progress,
               console: Console) -> tuple[list[Result], list[dict]]:
    """Every implementation on every shape, one at a time (see the module docstring)."""
    steps = args.warmup + args.repeats
    task = progress.add_task("GPU", total=len(shapes) * len(impls) * 2 * steps)
    done = 0
    results: list[Result] = []
    gradient_checks: list[dict] = []
    itemsize = ITEMSIZE[args.dtype]
    for shape in shapes:
        progress.update(task, description=f"{_shape(shape)} making inputs")
        inputs: Inputs = make_inputs(shape, dtype=args.dtype)
        by_name = {name: Result(shape, name, inputs.logits_bytes) for name in impls}  # display order
        results.extend(by_name.values())
        ours_gradient = None
        want_check = REFERENCE in impls and "torchaudio" in impls
        check: dict[str, object] = {"skipped": "rnnt_xla_torch or torchaudio gave no gradient"}
        for name in run_order(list(impls)):
            r = by_name[name]
            framework = "jax" if name in JAX_IMPLS else "torch"
            free, total = memory_info(name)
            need = memory_needed(name, shape, itemsize, (framework, "cuda") in inputs.device_arrays)
            if not fits(need, free):
                r.skipped = f"needs ~{need / 1e9:.1f} GB of GPU memory, {free / 1e9:.1f} GB free"
                console.print(f"[yellow]skipping {name} {_shape(shape)}: {r.skipped}")
                done += 2 * steps
                progress.update(task, completed=done)
                continue
            torch = _torch_cuda()
            sync = torch.cuda.synchronize if torch is not None else (lambda: None)
            prepared = None
            try:
                progress.update(task, description=f"{name} {_shape(shape)} prepare")
                prepared = impls[name].prepare(inputs)
                r.xla_memory = prepared.memory
                for mode in MODES:
                    def step(label: str, mode: str = mode) -> None:
                        progress.update(task, description=f"{name} {_shape(shape)} {mode} {label}", advance=1)

                    setattr(r, mode, time_calls(getattr(prepared, mode), sync, args.warmup, args.repeats, step))
                    if mode != "fwd_bwd" or r.fwd_bwd.error or framework != "torch" or torch is None:
                        continue
                    r.peak_extra_bytes = peak_extra_bytes(prepared, torch)
                    if name == REFERENCE and want_check:
                        if keep_gradient_for_check(inputs.logits_bytes, total):
                            ours_gradient = prepared.gradient()
                        else:
                            check = {"skipped": "logits too large to hold a second gradient for the check"}
                    elif name == "torchaudio" and ours_gradient is not None:
                        progress.update(task, description=f"gradient check {_shape(shape)}")
                        check = compare_gradients(ours_gradient, prepared.gradient(), args.dtype)
                        ours_gradient = None
                    prepared.release()  # the last gradient is not needed while the forward pass is timed
            except Exception as exc:
                r.error = _one_line(exc)
                console.print(f"[red]{name} failed on {_shape(shape)}: {r.error}")
            finally:
                if prepared is not None:
                    prepared.release()
                del prepared
                gc.collect()  # drop autograd graphs and JAX buffers before the next implementation's memory check
            for mode in MODES:
                if getattr(r, mode).error:
                    console.print(f"[red]{name} {mode} failed on {_shape(shape)}: {getattr(r, mode).error}")
            done += 2 * steps
            progress.update(task, completed=done)
        if want_check:
            gradient_checks.append({"shape": shape, **check})
        del ours_gradient
        inputs.device_arrays.clear()
        del inputs
        gc.collect()
    return results, gradient_checks


def family_impl(name: str) -> Impl:
    """A family loss of :data:`FAMILY` through ``rnnt_xla.torch`` on CUDA, timed as ``implementations``' torch
    ones (fwd_bwd: loss and ``backward()`` on a fresh gradient; fwd: under ``no_grad``)."""
    import torch

    from implementations import _check_torch_device, torch_arrays
    from rnnt_xla import torch as rt

    _check_torch_device("cuda")
    kind, options = FAMILY[name]
    fn = {"tdt": rt.tdt_loss, "multiblank": rt.multiblank_rnnt_loss, "rnnt": rt.rnnt_loss}[kind]
    options = {"blank": BLANK, **options, "reduction": "mean"}

    def prepare(inputs: Inputs) -> Prepared:
        shared, *rest = torch_arrays(inputs, "cuda")
        if kind == "tdt":  # the label scores, then one column per duration (made on the device, seeded)
            generator = torch.Generator(device=shared.device).manual_seed(1)
            extra = torch.randn((*shared.shape[:3], len(TDT_DURATIONS)), generator=generator, device=shared.device)
            shared = torch.cat([shared, extra.to(shared.dtype)], dim=-1)
        logits = shared.detach().requires_grad_()

        def fwd_bwd() -> float:
            logits.grad = None
            loss = fn(logits, *rest, **options)
            loss.backward()
            return float(loss.detach())

        def fwd() -> float:
            with torch.no_grad():
                return float(fn(shared, *rest, **options))

        def release() -> None:
            logits.grad = None

        return Prepared(fwd_bwd, fwd, release=release, gradient=lambda: logits.grad)

    return Impl(name, prepare, f"rnnt_xla.torch.{fn.__name__}({', '.join(f'{k}={v}' for k, v in options.items())}) "
                               "(numba.cuda kernels)")


def jax_fused_loss(logits, targets, logit_lengths, target_lengths):
    """``rnnt_xla.jax.fused_rnnt_loss`` with a joint that only reshapes: ``encoder_out`` is the logits as
    ``(B, T, (U+1)*V)`` (``predictor_out`` is ``(B, U+1, 1)`` zeros) and each tile's logits are its slice, so
    the loss and its gradient w.r.t. the logits are ``rnnt_loss``'s and the time over rnnt_xla_jax's is what
    the tiling costs (the tile loop, the padded grid, the per-tile callbacks), with no joint network to hide it."""
    import jax.numpy as jnp

    from rnnt_xla.jax import fused_rnnt_loss

    B, T, U1, V = logits.shape

    def joint(params, enc, pred):
        return enc.reshape(enc.shape[0], enc.shape[1], U1, V)

    return fused_rnnt_loss(joint, None, logits.reshape(B, T, U1 * V), jnp.zeros((B, U1, 1), logits.dtype), targets,
                           logit_lengths, target_lengths, blank=BLANK, reduction="mean")


def jax_fused_impl(device: str = "cuda") -> Impl:
    """:func:`jax_fused_loss`, timed as the other JAX implementations (``implementations._jax_prepare``);
    RuntimeError when JAX has no GPU backend."""
    return Impl(JAX_FUSED, _jax_prepare(jax_fused_loss, device),
                "rnnt_xla.jax.fused_rnnt_loss on the logits (a reshaping joint, default tile_bytes), under jax.jit")


# --- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="B,T,U,V", help="logits are (B, T, U+1, V); default: " + " ".join(DEFAULT_SHAPES))
    parser.add_argument("--impls", nargs="+", choices=ORDER, default=ORDER, metavar="NAME",
                        help=f"implementations to run (default: all of {', '.join(ORDER)})")
    parser.add_argument("--family", nargs="*", choices=list(FAMILY), default=list(FAMILY), metavar="NAME",
                        help=f"family losses to time too (default: all of {', '.join(FAMILY)}; none: --family)")
    parser.add_argument("--jax-fused", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also time {JAX_FUSED} (rnnt_xla.jax.fused_rnnt_loss on the logits; default: yes)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per shape and mode (default: 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls before them, the first of which compiles (default: 3)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="logits dtype (default: float32)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/gpu_<gpu-name>.json); the .md goes next to it")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    findings = probe_driver()
    message, status = no_gpu_message(findings)
    if message is not None:
        print(message)
        return status

    # Before JAX is imported: allocate GPU memory on demand, not 75% of it at start-up, so that torch's
    # implementations and the memory checks see the GPU's real free memory.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    console = Console() if sys.stdout.isatty() else Console(width=200)
    gpu = findings.gpus[0]
    console.print(f"GPU 0 of {len(findings.gpus)}: {gpu.name}, compute capability {gpu.cc[0]}.{gpu.cc[1]}")
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        console.print(f"[yellow]{message}")

    with console.status("importing the implementations"):
        # (threads: the seed resets Numba's CPU thread count after each call; give it the usable cores back)
        impls = load(args.impls, len(os.sched_getaffinity(0)), note, device="cuda")
        for name in args.family:
            try:
                impls[name] = family_impl(name)
            except Exception as exc:  # torch without CUDA: already noted for rnnt_xla_torch
                note(f"skipping {name}: {_one_line(exc)}")
        if args.jax_fused:
            try:
                impls[JAX_FUSED] = jax_fused_impl()
            except Exception as exc:  # no JAX, or JAX without a GPU backend
                note(f"skipping {JAX_FUSED}: {_one_line(exc)}")
    if not impls:
        console.print("[red]no implementation can run on the GPU (see the notes above)")
        return 1

    with Progress(TextColumn("{task.description:<60}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        results, gradient_checks = run_shapes(args.shapes, impls, args, progress, console)

    env = environment(gpu.name, gpu.cc, len(findings.gpus), findings.driver_version, memory_info("")[1])
    peak = env["peak_bandwidth_GB_per_s"]
    summarise(results, None if peak is None else peak * 1e9)
    if peak is None:
        notes.append("the driver did not report the memory clock and bus width: no % of peak bandwidth")
    report = {
        "environment": env,
        "settings": {"shapes": args.shapes, "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
                     "blank": BLANK, "reduction": "mean",
                     "timing": "wall time of one call between two device synchronisations",
                     "implementations": {n: i.description for n, i in impls.items()}},
        "results": [asdict(r) for r in results],
        "gradient_checks": gradient_checks,
        "notes": notes,
    }
    console.print(time_table(report))
    for line in report_lines(report):
        console.print(line, markup=False)

    out = args.out or default_output(gpu.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")  # write then rename, so an interrupted run never leaves half a file
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report))
    console.print(f"results written to {out} and {out.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
