"""``python -m rnnt_xla doctor``: the report on this machine (a subprocess, as users run it) and the
diagnosis rules on made-up findings (driver too old, PTX ISA too new, GPU too old, numba-cuda missing)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from rnnt_xla.doctor import Findings, Gpu, diagnose, max_ptx_isa
from rnnt_xla.kernels import cuda as cuda_kernels

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
CCS_13 = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


def run_doctor(prelude: str = "") -> subprocess.CompletedProcess:
    script = f"import sys\n{prelude}\nfrom rnnt_xla.__main__ import main\nsys.exit(main(['doctor']))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_doctor_reports_versions_and_a_diagnosis():
    run = run_doctor()
    out = run.stdout
    for label in ("Python", "NumPy", "Numba", "llvmlite", "numba-cuda", "cuda-bindings", "nvcc on PATH",
                  "CUDA driver", "GPU", "Diagnosis: "):
        assert f"\n  {label}" in out or f"\n{label}" in out, (label, out, run.stderr)
    if importlib.util.find_spec("numba_cuda") is not None:
        assert "CUDA toolkit" in out and "nvJitLink" in out
        assert re.search(r"PTX compile +OK: 4 kernels for sm_\d+, PTX ISA \d+\.\d+", out), out
    if cuda_kernels.available():
        assert run.returncode == 0 and "Diagnosis: OK: the CUDA kernels run on" in out, out
        assert re.search(r"kernel run +OK", out), out
    else:
        assert run.returncode == 0, out + run.stderr
        assert "Diagnosis: no GPU: CPU only" in out
        assert re.search(r"kernel run +skipped \(no GPU\)", out) or "numba.cuda" in out, out


def test_doctor_without_numba_cuda():
    """Hide numba-cuda (its import redirector and package): numba.cuda is then Numba's built-in target."""
    hide = ("sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != 'NumbaCudaFinder']\n"
            "sys.modules['numba_cuda'] = None")
    run = run_doctor(hide)
    assert "numba.cuda" in run.stdout and "PTX compile" not in run.stdout, run.stdout + run.stderr
    if not cuda_kernels.available():
        assert run.returncode == 0 and "Diagnosis: no GPU: CPU only" in run.stdout
    else:
        assert run.returncode == 1 and "numba-cuda is not usable" in run.stdout


def working(**changes) -> Findings:
    """Findings of a working H100 set-up with CUDA 13.0 driver and the CUDA 13.5 wheels, then ``changes``."""
    f = Findings(driver_library="libcuda.so.1", driver_version=(13, 0), gpus=[H100], numba_cuda=True,
                 toolkit_version=(13, 5), nvjitlink_version=(13, 5), supported_ccs=CCS_13, ptx_cc=(9, 0),
                 ptx_isa=(9, 5), run_max_error=1e-7)
    for key, value in changes.items():
        setattr(f, key, value)
    return f


def test_no_gpu_is_not_an_error():
    for f in (Findings(), Findings(driver_library="libcuda.so.1", driver_version=(12, 4)),
              Findings(numba_cuda=False, numba_cuda_error="not installed")):
        d = diagnose(f)
        assert d.ok and d.verdict == "no GPU: CPU only"


def test_working_gpu_notes_minor_version_compatibility():
    d = diagnose(working())
    assert d.ok and d.verdict.startswith("OK: the CUDA kernels run on NVIDIA H100")
    assert any("PTX ISA 9.5 is newer than the driver" in line and "nvJitLink 13.5" in line for line in d.details)


@pytest.mark.parametrize("changes,verdict,fix", [
    (dict(numba_cuda=False, numba_cuda_error="import numba.cuda failed"), "numba-cuda is not usable",
     "numba-cuda[cu13]"),
    (dict(driver_version=(12, 8)), "the driver supports CUDA 12.8, older than the CUDA 13.5 toolkit",
     "numba-cuda[cu12]"),
    (dict(nvjitlink_version=None), "PTX ISA 9.5 is newer than the driver (CUDA 13.0) can JIT (PTX ISA 9.0)",
     "nvJitLink"),
    (dict(gpus=[Gpu(0, "Tesla V100", (7, 0))]), "compute capability 7.0 is not supported", "numba-cuda[cu12]"),
    (dict(driver_error="cuInit returned 999 (CUDA_ERROR_UNKNOWN)"), "the CUDA driver failed to initialise",
     "nvidia-smi"),
    (dict(ptx_error="NvvmError: ..."), "the CUDA kernels do not compile", "NvvmError"),
    (dict(run_error="CudaAPIError: [209] CUDA_ERROR_NO_BINARY_FOR_GPU", run_max_error=None),
     "compile but do not run", "CUDA_ERROR_NO_BINARY_FOR_GPU"),
    (dict(run_max_error=0.3), "disagree with the reference", ""),
], ids=["no-numba-cuda", "old-driver", "ptx-too-new", "old-gpu", "driver-broken", "no-compile", "no-run",
        "wrong-result"])
def test_incompatibilities_fail_with_a_fix(changes, verdict, fix):
    d = diagnose(working(**changes))
    assert not d.ok
    assert verdict in d.verdict, d.verdict
    assert fix in " ".join(d.details), d.details


def test_max_ptx_isa():
    assert max_ptx_isa((12, 4)) == (8, 4)
    assert max_ptx_isa((12, 6)) == (8, 5)
    assert max_ptx_isa((12, 7)) == (8, 5)  # no 12.7 release: the newest known at or below it
    assert max_ptx_isa((13, 0)) == (9, 0)
    assert max_ptx_isa((13, 2)) == (9, 2)
    assert max_ptx_isa((11, 0)) is None and max_ptx_isa((14, 0)) is None
