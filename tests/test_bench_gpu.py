"""``benchmarks/bench_gpu.py`` where there is no GPU: its no-GPU exit, its pure helpers (arguments, bandwidth and
memory arithmetic, file names, the summary and the Markdown table) and its run loop with fake implementations.
With a GPU, one small real run (skipped otherwise)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("rich")  # the benchmark's tables and progress bar

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"
MB = 1e6
LOGITS_16_150_40_1024 = 16 * 150 * 41 * 1024 * 4  # float32 bytes of (B, T, U+1, V) = 403,046,400
H100_SXM = (2_619_000, 5120)  # memory clock (kHz), bus width (bits): HBM3, 3.35 TB/s


@pytest.fixture(scope="module")
def bench():
    """The script as a module (benchmarks/ is not a package; it puts itself and the repo root on sys.path,
    which is restored afterwards)."""
    saved = list(sys.path)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_gpu
    finally:
        sys.path[:] = saved
    return bench_gpu


# --- without a GPU --------------------------------------------------------------------------------------


def test_without_a_gpu_it_says_so_in_one_line_and_exits_cleanly(tmp_path):
    out = tmp_path / "gpu.json"
    # An empty CUDA_VISIBLE_DEVICES hides every GPU from the driver, so this checks the same path on a GPU machine.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    assert lines[0].startswith("no CUDA GPU found, nothing to benchmark")
    assert "rnnt_xla doctor: no GPU: CPU only" in lines[0]
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_no_gpu_message_follows_the_doctors_diagnosis(bench):
    from rnnt_xla.doctor import Findings, Gpu

    assert bench.no_gpu_message(Findings(gpus=[Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))])) == (None, 0)
    message, status = bench.no_gpu_message(Findings(driver_library="libcuda.so.1"))
    assert status == 0 and "the driver reports no device" in message
    # A GPU whose driver does not initialise is a real problem: non-zero status, as the doctor's.
    message, status = bench.no_gpu_message(Findings(driver_library="libcuda.so.1",
                                                    driver_error="cuInit returned 999 (CUDA_ERROR_UNKNOWN)"))
    assert status == 1 and "failed to initialise: cuInit returned 999" in message


def test_arguments(bench):
    args = bench.parse_args([])
    assert args.shapes == [(4, 100, 30, 128), (8, 200, 50, 256), (16, 150, 40, 1024), (32, 500, 100, 1024)]
    assert (args.repeats, args.warmup, args.dtype, args.out) == (10, 3, "float32", None)
    assert "torchaudio" in args.impls and "rnnt_xla_jax" in args.impls
    assert args.family == ["tdt_torch", "multiblank_torch", "modified_torch", "constrained_torch", "delay_torch"]
    assert bench.parse_args(["--family"]).family == []
    assert bench.parse_args(["--family", "tdt_torch", "delay_torch"]).family == ["tdt_torch", "delay_torch"]
    args = bench.parse_args(["--shapes", "2,20,5,16", "16,150,40,1024", "--impls", "rnnt_xla_torch", "torchaudio",
                             "--dtype", "bfloat16", "--repeats", "3"])
    assert args.shapes == [(2, 20, 5, 16), (16, 150, 40, 1024)]
    assert (args.impls, args.dtype, args.repeats) == (["rnnt_xla_torch", "torchaudio"], "bfloat16", 3)
    for bad in (["--shapes", "2,20,5"], ["--shapes", "2,20,5,1"], ["--impls", "cudnn"], ["--repeats", "0"],
                ["--dtype", "int8"], ["--family", "ctc"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(bad)
        assert exit_info.value.code == 2, bad


def test_bandwidth_arithmetic(bench):
    # fwd+bwd moves 3x the logits at least, forward only 1x: 403 MB of logits in 1 ms.
    assert bench.achieved_gb_per_s(LOGITS_16_150_40_1024, "fwd_bwd", 1e-3) == pytest.approx(1209.1392)
    assert bench.achieved_gb_per_s(LOGITS_16_150_40_1024, "fwd", 1e-3) == pytest.approx(403.0464)
    assert bench.peak_bandwidth_bytes_per_s(*H100_SXM) == pytest.approx(3.35232e12)  # 2.619 GHz x 2 x 640 B
    assert bench.peak_bandwidth_bytes_per_s(1_215_000, 5120) == pytest.approx(1.5552e12)  # A100 40GB (HBM2)
    assert bench.peak_bandwidth_bytes_per_s(None, 5120) is None
    assert bench.peak_bandwidth_bytes_per_s(2_619_000, 0) is None


def test_memory_estimates_and_fit(bench):
    big = (32, 500, 100, 1024)  # 1,616,000 lattice cells, 6,619,136,000 bytes of float32 logits
    ours = bench.memory_needed("rnnt_xla_torch", big, 4, inputs_on_device=True)
    plain = bench.memory_needed("plain_torch", big, 4, inputs_on_device=True)
    # (multiple x logits + 64 B per cell) x 1.1 + 512 MiB
    assert ours == int((6_619_136_000 + 103_424_000) * 1.1) + 536_870_912 == 7_931_686_912
    assert plain == int((4 * 6_619_136_000 + 103_424_000) * 1.1) + 536_870_912 == 29_774_835_712
    # JAX gets its own copy of the inputs when none is on the device yet
    jax_first = bench.memory_needed("rnnt_xla_jax", big, 4, inputs_on_device=False)
    assert jax_first == int((2 * 6_619_136_000 + 103_424_000 + 4 * 32 * 102) * 1.1) + 536_870_912
    # half precision halves the logits part only
    assert bench.memory_needed("rnnt_xla_torch", big, 2, True) == int((3_309_568_000 + 103_424_000) * 1.1) + 536_870_912
    # an 80 GB H100 holds everyone; a 24 GB card rnnt_xla but not plain torch
    assert bench.fits(plain, 79 * 10**9) and bench.fits(ours, 24 * 10**9) and not bench.fits(plain, 24 * 10**9)
    assert bench.fits(plain, None)  # free memory unknown: try
    assert bench.keep_gradient_for_check(LOGITS_16_150_40_1024, 80 * 2**30)
    assert not bench.keep_gradient_for_check(6_619_136_000, 40 * 10**9)
    assert not bench.keep_gradient_for_check(LOGITS_16_150_40_1024, None)


def test_run_order_and_output_names(bench):
    assert bench.run_order(["rnnt_xla_torch", "rnnt_xla_jax", "torchaudio", "plain_torch", "plain_jax"]) == [
        "rnnt_xla_torch", "torchaudio", "plain_torch", "rnnt_xla_jax", "plain_jax"]
    assert bench.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert bench.gpu_slug("NVIDIA A100-SXM4-40GB") == "nvidia_a100_sxm4_40gb"
    assert bench.gpu_slug("  ") == "gpu"
    out = bench.default_output("NVIDIA H100 80GB HBM3")
    assert (out.name, out.parent.name, out.parent.parent.name) == ("gpu_nvidia_h100_80gb_hbm3.json", "results",
                                                                   "benchmarks")


def _fake_report(bench) -> dict:
    shape = (16, 150, 40, 1024)
    T = bench.Timing
    ours = bench.Result(shape, "rnnt_xla_torch", LOGITS_16_150_40_1024,
                        fwd_bwd=T(times_s=[3e-3, 2e-3, 1e-3], first_call_s=1.5, loss=100.0),
                        fwd=T(times_s=[1e-3, 1e-3, 2e-3], loss=100.0), peak_extra_bytes=LOGITS_16_150_40_1024 + 10**7)
    jax = bench.Result(shape, "rnnt_xla_jax", LOGITS_16_150_40_1024,
                       fwd_bwd=T(times_s=[2.2e-3, 2.2e-3, 2.2e-3], first_call_s=0.2, loss=100.000001),
                       fwd=T(times_s=[1.1e-3], loss=100.000001),
                       xla_memory={"fwd_bwd": {"temp": 10**7, "output": LOGITS_16_150_40_1024}})
    plain = bench.Result(shape, "plain_torch", LOGITS_16_150_40_1024,
                         fwd_bwd=T(times_s=[4e-3, 6e-3, 5e-3], first_call_s=0.5, loss=100.02),
                         fwd=T(error="RuntimeError: CUDA out of memory"), peak_extra_bytes=4 * LOGITS_16_150_40_1024)
    skipped = bench.Result(shape, "plain_jax", LOGITS_16_150_40_1024,
                           skipped="needs ~30.0 GB of GPU memory, 20.0 GB free")
    results = [ours, jax, plain, skipped]
    bench.summarise(results, bench.peak_bandwidth_bytes_per_s(*H100_SXM))
    env = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "gpu_memory_bytes": 80 * 2**30,
           "peak_bandwidth_GB_per_s": 3352.32, "driver_version": "570.86", "driver_cuda_version": "12.8",
           "torch": "2.9.1", "torch_cuda": "12.8", "git_commit": "abc1234", "date": "2026-11-25"}
    settings = {"dtype": "float32", "blank": 0, "reduction": "mean", "repeats": 3, "warmup": 3}
    check = {"shape": shape, "max_abs_diff": 1e-9, "max_abs_grad": 0.05, "relative": 2e-8, "tolerance": 1e-3,
             "ok": True}
    return {"environment": env, "settings": settings, "results": [bench.asdict(r) for r in results],
            "gradient_checks": [check], "notes": ["skipping warprnnt_numba: import failed (ModuleNotFoundError)"]}


def test_summary_ratios_bandwidth_and_loss_agreement(bench):
    report = _fake_report(bench)
    ours, jax, plain, skipped = report["results"]
    assert ours["fwd_bwd"]["median_s"] == 2e-3 and ours["fwd_bwd"]["min_s"] == 1e-3
    assert ours["fwd_bwd"]["gb_per_s"] == pytest.approx(604.5696)  # 3 x 403 MB / 2 ms
    assert ours["fwd_bwd"]["fraction_of_peak"] == pytest.approx(604.5696 / 3352.32)
    assert ours["fwd"]["gb_per_s"] == pytest.approx(403.0464)  # 1 x 403 MB / 1 ms
    assert plain["fwd_bwd"]["ratio"] == pytest.approx(2.5) and jax["fwd_bwd"]["ratio"] == pytest.approx(1.1)
    assert plain["fwd"]["ratio"] is None and skipped["fwd_bwd"]["ratio"] is None
    assert plain["loss_rel_diff"] == pytest.approx(2e-4) and jax["loss_rel_diff"] == pytest.approx(1e-8)
    assert ours["loss_rel_diff"] == 0.0


def test_family_losses_are_timed_against_rnnt_but_their_losses_not_compared(bench):
    shape = (16, 150, 40, 1024)
    T = bench.Timing
    ours = bench.Result(shape, "rnnt_xla_torch", LOGITS_16_150_40_1024, fwd_bwd=T(times_s=[2e-3], loss=100.0),
                        fwd=T(times_s=[1e-3], loss=100.0))
    tdt = bench.Result(shape, "tdt_torch", LOGITS_16_150_40_1024, fwd_bwd=T(times_s=[3e-3], loss=80.0),
                       fwd=T(times_s=[1.5e-3], loss=80.0))
    bench.summarise([ours, tdt], None)
    assert tdt.fwd_bwd.ratio == pytest.approx(1.5) and tdt.fwd.ratio == pytest.approx(1.5)
    assert tdt.loss_rel_diff is None  # another loss: not "LOSS DISAGREES"
    # TDT's inputs are a copy of the logits with 5 more columns and its residuals 40 B more per cell
    cells = 16 * 150 * 41
    assert bench.memory_needed("tdt_torch", shape, 4, True) == int(
        (2.1 * LOGITS_16_150_40_1024 + 104 * cells) * 1.1) + 536_870_912


def test_family_implementations_need_torch_cuda(bench):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        bench.family_impl("tdt_torch")


@pytest.mark.parametrize("name", ["tdt_torch", "multiblank_torch", "modified_torch", "constrained_torch",
                                  "delay_torch"])
def test_family_implementations_run_their_loss(bench, monkeypatch, name):
    """Without a GPU: the prepared calls on CPU tensors (torch_arrays' device and the CUDA check stubbed)."""
    torch = pytest.importorskip("torch")
    import implementations

    monkeypatch.setattr(implementations, "_check_torch_device", lambda device: None)
    cpu_arrays = implementations.torch_arrays
    monkeypatch.setattr(implementations, "torch_arrays", lambda inputs, device: cpu_arrays(inputs, "cpu"))
    inputs = implementations.make_inputs((2, 8, 3, 12))
    prepared = bench.family_impl(name).prepare(inputs)
    loss = prepared.fwd_bwd()
    assert math.isfinite(loss) and loss > 0 and prepared.fwd() == pytest.approx(loss, rel=1e-6)
    width = 12 + 5 if name == "tdt_torch" else 12
    assert prepared.gradient().shape == (2, 8, 4, width) and torch.count_nonzero(prepared.gradient()) > 0
    if name != "tdt_torch":  # the same inputs as the RNNT implementations, another loss
        from rnnt_xla.torch import rnnt_loss

        plain = rnnt_loss(*cpu_arrays(inputs, "cpu"), blank=implementations.BLANK, reduction="mean")
        assert abs(float(plain) - loss) > 1e-6


def test_jax_fused_loss_is_rnnt_loss_on_the_same_logits(bench, monkeypatch):
    """The fused implementation's reshaping joint gives rnnt_loss's value and logits gradient (JAX on the CPU,
    several tiles), and its Impl runs through the JAX timing harness."""
    jax = pytest.importorskip("jax")
    import implementations
    import numpy as np

    from rnnt_xla import jax_fused
    from rnnt_xla.jax import rnnt_loss

    inputs = implementations.make_inputs((3, 7, 4, 6))
    arrays = implementations.jax_arrays(inputs, "cpu")
    monkeypatch.setattr(jax_fused, "default_tile_bytes", lambda on_gpu: 2 * 5 * 6 * 4)  # one frame of two utterances a tile
    value, grad = jax.value_and_grad(bench.jax_fused_loss)(*arrays)
    prepared = bench.jax_fused_impl("cpu").prepare(inputs)
    expected, expected_grad = jax.value_and_grad(
        lambda x: rnnt_loss(x, *arrays[1:], blank=implementations.BLANK, reduction="mean"))(arrays[0])
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), atol=1e-6)
    assert (prepared.fwd_bwd(), prepared.fwd()) == pytest.approx((float(expected),) * 2, rel=1e-6)
    assert bench.JAX_FUSED in bench.JAX_IMPLS and bench.JAX_FUSED in bench.MEMORY_NEED
    assert bench.parse_args([]).jax_fused and not bench.parse_args(["--no-jax-fused"]).jax_fused


def _markdown_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]  # after header and rule


def test_markdown_table_and_notes(bench):
    text = bench.markdown(_fake_report(bench))
    assert text.startswith("### RNN-T loss on the GPU")
    rows = _markdown_rows(text)
    assert rows[0] == ["16,150,40,1024", "rnnt_xla_torch", "2.00", "1.00", "1.00", "605", "18%", "1.00", "1.00",
                       "403", "12%", "413 (1.02x)", "0.0e+00", "1.50"]
    assert rows[1] == ["", "rnnt_xla_jax", "2.20", "2.20", "1.10", "550", "16%", "1.10", "1.10", "366", "11%",
                       "413 (1.02x)", "1.0e-08", "0.20"]
    assert rows[2] == ["", "plain_torch", "5.00", "4.00", "2.50", "242", "7.2%", "—", "—", "—", "—",
                       "1,612 (4.00x)", "2.0e-04", "0.50"]
    assert rows[3][:3] == ["", "plain_jax", "skipped"] and set(rows[3][3:]) == {""}
    notes = [line for line in text.splitlines() if line.startswith("- ")]
    assert notes[0].startswith("- NVIDIA H100 80GB HBM3 (compute capability 9.0, 80 GiB, peak 3,352 GB/s), "
                               "driver 570.86 (CUDA 12.8)")
    assert "- LOSS DISAGREES: plain_torch 16,150,40,1024: relative difference 2.0e-04 to rnnt_xla_torch (> 0.0001)" \
        in notes
    assert not any("LOSS DISAGREES: rnnt_xla_jax" in line for line in notes)
    assert "- failed plain_torch 16,150,40,1024 fwd: RuntimeError: CUDA out of memory" in notes
    assert "- skipped plain_jax 16,150,40,1024: needs ~30.0 GB of GPU memory, 20.0 GB free" in notes
    assert any(line.startswith("- gradient check 16,150,40,1024: rnnt_xla_torch vs torchaudio") and
               line.endswith(": OK (tolerance 0.001)") for line in notes)
    assert "- skipping warprnnt_numba: import failed (ModuleNotFoundError)" in notes


# --- the run loop with fake implementations (no GPU) ---------------------------------------------------


def test_run_loop_with_fake_implementations(bench, monkeypatch):
    """Times, errors, the memory skip, the extra-memory probe and the gradient check, with stand-ins for the
    implementations, the GPU's memory and torch.cuda."""
    import io

    torch = pytest.importorskip("torch")
    from rich.console import Console
    from rich.progress import Progress

    from implementations import Impl, Prepared

    calls: dict[str, int] = {}
    shape = (2, 3, 2, 5)
    grad = torch.linspace(-1.0, 1.0, 2 * 3 * 3 * 5).reshape(2, 3, 3, 5)

    def fake(name: str, loss: float, gradient=None, fwd_bwd_error: Exception | None = None) -> Impl:
        def count(what: str) -> None:
            calls[f"{name}.{what}"] = calls.get(f"{name}.{what}", 0) + 1

        def fwd_bwd() -> float:
            count("fwd_bwd")
            if fwd_bwd_error is not None:
                raise fwd_bwd_error
            return loss

        def prepare(inputs) -> Prepared:
            assert inputs.shape == shape and inputs.logits_bytes == 2 * 3 * 3 * 5 * 4
            return Prepared(fwd_bwd, lambda: count("fwd") or loss, release=lambda: count("release"),
                            gradient=lambda: gradient)

        return Impl(name, prepare, f"fake {name}")

    impls = {"rnnt_xla_torch": fake("rnnt_xla_torch", 7.0, grad),
             "torchaudio": fake("torchaudio", 7.0000001, grad + 1e-5),
             "plain_torch": fake("plain_torch", 7.0, fwd_bwd_error=RuntimeError("CUDA out of memory.\nmore")),
             "plain_jax": fake("plain_jax", 7.0)}
    allocated = iter([1000, 5000] * 10)  # memory_allocated() before, then max_memory_allocated() after, per probe
    fake_cuda = SimpleNamespace(synchronize=lambda: None, empty_cache=lambda: None,
                                reset_peak_memory_stats=lambda: None, memory_allocated=lambda: next(allocated),
                                max_memory_allocated=lambda: next(allocated))
    monkeypatch.setattr(bench, "_torch_cuda", lambda: SimpleNamespace(cuda=fake_cuda))
    monkeypatch.setattr(bench, "memory_info", lambda impl: (10**3 if impl == "plain_jax" else 10**12, 80 * 10**9))
    args = SimpleNamespace(warmup=2, repeats=3, dtype="float32")
    console = Console(file=io.StringIO(), width=200)
    with Progress(console=console) as progress:
        results, checks = bench.run_shapes([shape], impls, args, progress, console)

    by_name = {r.impl: r for r in results}
    assert [r.impl for r in results] == list(impls)  # display order, whatever the run order
    ours = by_name["rnnt_xla_torch"]
    assert len(ours.fwd_bwd.times_s) == 3 and len(ours.fwd.times_s) == 3 and ours.fwd_bwd.first_call_s is not None
    assert calls["rnnt_xla_torch.fwd_bwd"] == 2 + 3 + 1  # warm-up (first call included), timed, memory probe
    assert calls["rnnt_xla_torch.fwd"] == 2 + 3
    assert ours.peak_extra_bytes == 4000 and ours.fwd_bwd.loss == 7.0
    failed = by_name["plain_torch"]
    assert failed.fwd_bwd.error == "RuntimeError: CUDA out of memory." and failed.fwd_bwd.times_s == []
    assert failed.peak_extra_bytes is None and len(failed.fwd.times_s) == 3  # forward only still timed
    skipped = by_name["plain_jax"]
    assert skipped.skipped.startswith("needs ~0.5 GB of GPU memory") and "plain_jax.fwd_bwd" not in calls
    assert calls["rnnt_xla_torch.release"] >= 1 and calls["torchaudio.release"] >= 1
    [check] = checks
    assert check["shape"] == shape and check["ok"]
    assert check["max_abs_diff"] == pytest.approx(1e-5, rel=1e-2) and check["max_abs_grad"] == pytest.approx(1.0)


# --- with a GPU ------------------------------------------------------------------------------------------


def test_small_run_on_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA build of torch or no GPU")
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "2,20,5,16", "--repeats", "2", "--warmup", "1",
                          "--impls", "rnnt_xla_torch", "plain_torch", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    ours, plain = report["results"]
    assert ours["fwd_bwd"]["median_s"] > 0 and ours["peak_extra_bytes"] >= ours["logits_bytes"]
    assert plain["loss_rel_diff"] < 1e-4
    assert report["environment"]["gpu"] and out.with_suffix(".md").exists()
