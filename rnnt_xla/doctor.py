"""``python -m rnnt_xla doctor``: do Numba, numba-cuda, the CUDA toolkit, the driver and the GPU fit together?

It prints the versions it finds, compiles the loss's CUDA kernels to PTX, runs them on a tiny problem when
there is a GPU (checked against the float64 reference), and ends with a diagnosis and its fix. Each probe is
guarded: the doctor itself never fails on a broken installation, it reports it.

Exit status: 0 when the CUDA kernels work, or when there is no GPU at all (``no GPU: CPU only``: the CPU
kernels need none of this); 1 on a real incompatibility, i.e. a GPU is there but the CUDA path cannot use it.

The driver is probed through ``libcuda`` with ctypes, so a GPU is seen (and its driver version reported)
even when numba-cuda is missing or broken.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Findings", "Gpu", "diagnose", "collect", "max_ptx_isa", "main"]

# The newest PTX ISA each CUDA release's driver can JIT (PTX ISA release notes); CUDA 13.x: ISA 9.x.
_PTX_ISA_OF_CUDA = {
    (11, 8): (7, 8), (12, 0): (8, 0), (12, 1): (8, 1), (12, 2): (8, 2), (12, 3): (8, 3), (12, 4): (8, 4),
    (12, 5): (8, 5), (12, 6): (8, 5), (12, 8): (8, 7), (12, 9): (8, 8), (13, 0): (9, 0),
}
_CUDA_SUCCESS = 0
_CUDA_ERROR_NO_DEVICE = 100
_ATTRIBUTE_CC_MAJOR, _ATTRIBUTE_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_*


def max_ptx_isa(cuda_version: tuple[int, int]) -> tuple[int, int] | None:
    """Newest PTX ISA a driver of ``cuda_version`` JITs (None when outside the table: not checked)."""
    if cuda_version[0] == 13:
        return (9, cuda_version[1])
    if cuda_version[0] > 13:
        return None  # newer than this table: not checked
    known = [v for v in _PTX_ISA_OF_CUDA if v <= cuda_version]
    return _PTX_ISA_OF_CUDA[max(known)] if known else None


@dataclass
class Gpu:
    index: int
    name: str
    cc: tuple[int, int]


@dataclass
class Findings:
    """Everything the probes found; :func:`diagnose` turns it into a verdict (a pure function, tested)."""

    versions: dict[str, str] = field(default_factory=dict)
    driver_library: str | None = None  # the libcuda that was loaded, None when there is none
    driver_version: tuple[int, int] | None = None  # CUDA version the driver supports
    driver_error: str | None = None  # cuInit failure other than "no device"
    gpus: list[Gpu] = field(default_factory=list)
    numba_cuda: bool = False  # numba-cuda importable and active as numba.cuda
    numba_cuda_error: str | None = None
    toolkit_version: tuple[int, int] | None = None  # NVRTC's, the toolkit numba-cuda compiles with
    toolkit_source: str | None = None
    nvjitlink_version: tuple[int, int] | None = None
    supported_ccs: list[tuple[int, int]] = field(default_factory=list)
    ptx_cc: tuple[int, int] | None = None
    ptx_isa: tuple[int, int] | None = None
    ptx_error: str | None = None
    ptx_seconds: float | None = None
    run_error: str | None = None
    run_max_error: float | None = None


@dataclass
class Diagnosis:
    ok: bool  # exit status 0
    verdict: str  # one line
    details: list[str]  # causes and fixes


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _version(v: tuple[int, ...] | None) -> str:
    return "?" if v is None else ".".join(map(str, v))


_INSTALL = ("pip install 'numba-cuda[cu13]' for a driver of CUDA 13 (>= 580), or 'numba-cuda[cu12]' for a "
            "CUDA 12 driver")


def diagnose(f: Findings) -> Diagnosis:
    """The verdict for what :func:`collect` found, most fundamental problem first."""
    if f.driver_error:
        return Diagnosis(False, f"the CUDA driver failed to initialise: {f.driver_error}",
                         ["Check nvidia-smi; reinstall or update the NVIDIA driver."])
    if not f.gpus:
        why = "no CUDA driver library" if f.driver_library is None else "the driver reports no device"
        return Diagnosis(True, "no GPU: CPU only", [f"{why}; the CPU kernels need no GPU, driver or numba-cuda."])
    gpu = f.gpus[0]
    if not f.numba_cuda:
        return Diagnosis(False, f"numba-cuda is not usable, so the GPU ({gpu.name}) cannot run the CUDA kernels",
                         [f.numba_cuda_error or "numba-cuda is not installed.", _INSTALL])
    details = []
    if f.driver_version and f.toolkit_version and f.driver_version[0] < f.toolkit_version[0]:
        return Diagnosis(False, f"the driver supports CUDA {_version(f.driver_version)}, older than the CUDA "
                                f"{_version(f.toolkit_version)} toolkit numba-cuda uses",
                         [f"Install the toolkit matching the driver: pip install 'numba-cuda[cu{f.driver_version[0]}]' "
                          f"(and uninstall the cu{f.toolkit_version[0]} wheels), or update the driver."])
    if f.supported_ccs and gpu.cc not in f.supported_ccs and gpu.cc < min(f.supported_ccs):
        return Diagnosis(False, f"compute capability {_cc(gpu.cc)} is not supported by the CUDA "
                                f"{_version(f.toolkit_version)} toolkit (oldest: {_cc(min(f.supported_ccs))})",
                         ["CUDA 13 dropped GPUs before compute capability 7.5: pip install 'numba-cuda[cu12]'."])
    driver_isa = max_ptx_isa(f.driver_version) if f.driver_version else None
    if f.ptx_isa and driver_isa and f.ptx_isa > driver_isa:
        line = (f"PTX ISA {_version(f.ptx_isa)} is newer than the driver (CUDA {_version(f.driver_version)}) "
                f"can JIT (PTX ISA {_version(driver_isa)})")
        if f.nvjitlink_version is None:
            major = f.toolkit_version[0] if f.toolkit_version else 13
            return Diagnosis(False, line, [f"Without nvJitLink the driver must JIT the PTX. Install nvJitLink (pip "
                                           f"install 'numba-cuda[cu{major}]'), a toolkit no newer than the driver, "
                                           "or a newer driver."])
        details.append(line + f"; fine: nvJitLink {_version(f.nvjitlink_version)} compiles it to a cubin, which "
                              "the driver loads under CUDA minor version compatibility.")
    if f.ptx_error:
        return Diagnosis(False, "the CUDA kernels do not compile", [f.ptx_error, *details])
    if f.run_error:
        return Diagnosis(False, f"the CUDA kernels compile but do not run on {gpu.name}", [f.run_error, *details])
    if f.run_max_error is None or not f.run_max_error < 1e-4:
        return Diagnosis(False, f"the CUDA kernels run on {gpu.name} but disagree with the reference "
                                f"(max error {f.run_max_error})", details)
    return Diagnosis(True, f"OK: the CUDA kernels run on {gpu.name} (compute capability {_cc(gpu.cc)})", details)


# ---------------------------------------------------------------------------------------------------------
# Probes


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _system_nvcc() -> str:
    """``nvcc --version`` of the toolkit on PATH (informational: numba-cuda says above which it uses)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not on PATH"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{nvcc}: {error}"
    release = re.search(r"release (\d+\.\d+)", out)
    return f"CUDA {release.group(1) if release else '?'} ({nvcc})"


def _probe_driver(f: Findings) -> None:
    """Load libcuda with ctypes: driver version, cuInit, and each device's name and compute capability."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            f.driver_library = name
            break
        except OSError:
            continue
    if lib is None:
        return
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) == _CUDA_SUCCESS:
        f.driver_version = (version.value // 1000, version.value % 1000 // 10)
    rc = lib.cuInit(0)
    if rc == _CUDA_ERROR_NO_DEVICE:
        return
    if rc != _CUDA_SUCCESS:
        text = ctypes.c_char_p()
        lib.cuGetErrorName(rc, ctypes.byref(text))
        f.driver_error = f"cuInit returned {rc} ({(text.value or b'?').decode()})"
        return
    count = ctypes.c_int(0)
    lib.cuDeviceGetCount(ctypes.byref(count))
    for index in range(count.value):
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(device), index)
        lib.cuDeviceGetName(name, 256, device)
        lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTRIBUTE_CC_MAJOR, device)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTRIBUTE_CC_MINOR, device)
        f.gpus.append(Gpu(index, name.value.decode(errors="replace"), (major.value, minor.value)))


def _probe_numba_cuda(f: Findings) -> None:
    """Is numba.cuda the NVIDIA numba-cuda package? Its toolkit (NVRTC, nvJitLink) and supported GPUs."""
    try:
        from numba import cuda
    except Exception as error:  # numba-cuda raises ImportError without its CUDA bindings
        f.numba_cuda_error = f"import numba.cuda failed: {error}"
        return
    if getattr(cuda, "implementation", None) != "NVIDIA":
        f.numba_cuda_error = "numba.cuda is Numba's deprecated built-in target, not the numba-cuda package."
        return
    f.numba_cuda = True
    try:
        from numba.cuda.cudadrv import nvrtc, runtime

        f.toolkit_version = tuple(runtime.get_version())
        f.supported_ccs = [tuple(cc) for cc in nvrtc.get_supported_ccs()]
    except Exception as error:
        f.numba_cuda_error = f"numba-cuda cannot load NVRTC from a CUDA toolkit: {error}"
        f.numba_cuda = False
        return
    try:
        from numba.cuda import cuda_paths

        found = cuda_paths.get_cuda_paths()["nvrtc"]
        f.toolkit_source = f"{found.info} ({found.by})"
    except Exception:
        pass
    try:
        from cuda.bindings import nvjitlink

        f.nvjitlink_version = tuple(nvjitlink.version())
    except Exception:
        f.nvjitlink_version = None


def _probe_ptx(f: Findings) -> None:
    """Compile the loss's kernels to PTX for the GPU's compute capability (9.0 without a GPU)."""
    from .kernels import cuda as cuda_kernels

    f.ptx_cc = f.gpus[0].cc if f.gpus else (9, 0)
    start = time.perf_counter()
    try:
        ptx = cuda_kernels.compile_ptx(np.dtype(np.float32), np.dtype(np.int32), f.ptx_cc)
    except Exception as error:
        f.ptx_error = f"{type(error).__name__}: {error}"
        return
    f.ptx_seconds = time.perf_counter() - start
    isa = re.search(r"^\.version (\d+)\.(\d+)", next(iter(ptx.values())), re.MULTILINE)
    f.ptx_isa = (int(isa.group(1)), int(isa.group(2))) if isa else None


def _probe_run(f: Findings) -> None:
    """Loss and gradient of a tiny problem on GPU 0, against the float64 reference."""
    from numba import cuda

    from .kernels import cpu
    from .kernels import cuda as cuda_kernels
    from .reference import rnnt_loss_reference

    rng = np.random.default_rng(0)
    B, T, U, V = 2, 5, 3, 6
    logits = rng.standard_normal((B, T, U + 1, V)).astype(np.float32)
    targets = rng.integers(1, V, (B, U)).astype(np.int32)
    logit_lengths, target_lengths = np.array([5, 3], np.int32), np.array([3, 1], np.int32)
    try:
        with cuda.gpus[0]:
            args = [cuda.to_device(a) for a in (logits, targets, logit_lengths, target_lengths)]
            residuals = cpu.Residuals(*(cuda.device_array(shape, dtype)
                                        for shape, dtype in cpu.residual_shapes(B, T, U + 1, logits.dtype)))
            costs, grads = cuda.device_array(B, np.float32), cuda.device_array(logits.shape, np.float32)
            cuda_kernels.forward(*args, 0, True, 0.0, costs, residuals)
            cuda_kernels.backward(*args, 0, True, 0.0, -1.0, np.ones(B), residuals, grads)
            costs, grads = costs.copy_to_host(), grads.copy_to_host()
    except Exception as error:
        f.run_error = f"{type(error).__name__}: {error}"
        return
    ref_costs, ref_grads = rnnt_loss_reference(logits, targets, logit_lengths, target_lengths, blank=0,
                                               reduction="none")
    f.run_max_error = float(max(np.max(np.abs(costs - ref_costs) / np.abs(ref_costs)),
                                np.max(np.abs(grads - ref_grads))))


def collect() -> Findings:
    """Run every probe that the previous ones allow."""
    import numba

    f = Findings()
    f.versions = {
        "Python": platform.python_version(),
        "rnnt_xla": _package_version("rnnt_xla"),
        "NumPy": np.__version__,
        "Numba": numba.__version__,
        "llvmlite": _package_version("llvmlite"),
        "numba-cuda": _package_version("numba-cuda"),
        "cuda-bindings": _package_version("cuda-bindings"),
        "nvcc on PATH": _system_nvcc(),
    }
    _probe_driver(f)
    _probe_numba_cuda(f)
    if f.numba_cuda:
        _probe_ptx(f)
        if f.gpus and not f.ptx_error:
            _probe_run(f)
    return f


def report(f: Findings, d: Diagnosis) -> str:
    """The printed report: versions, driver and GPUs, toolkit, PTX, run, then the diagnosis."""
    rows = list(f.versions.items())
    if os.environ.get("NUMBA_ENABLE_CUDASIM"):
        rows.append(("NUMBA_ENABLE_CUDASIM", os.environ["NUMBA_ENABLE_CUDASIM"] + " (simulator: not a real GPU)"))
    if f.driver_library is None:
        rows.append(("CUDA driver", "not found (no libcuda)"))
    else:
        rows.append(("CUDA driver", f"CUDA {_version(f.driver_version)} ({f.driver_library})"))
    rows.append(("GPU", "none" if not f.gpus else
                 "; ".join(f"{g.index}: {g.name}, compute capability {_cc(g.cc)}" for g in f.gpus)))
    if f.numba_cuda:
        rows.append(("CUDA toolkit", f"CUDA {_version(f.toolkit_version)} (NVRTC: {f.toolkit_source or '?'})"))
        rows.append(("nvJitLink", _version(f.nvjitlink_version) if f.nvjitlink_version else "not found"))
        ccs = ", ".join(_cc(cc) for cc in f.supported_ccs)
        rows.append(("toolkit GPUs", f"compute capability {ccs}"))
    else:
        rows.append(("numba.cuda", f.numba_cuda_error or "not usable"))
    if f.ptx_cc is not None:
        rows.append(("PTX compile", f"failed for sm_{f.ptx_cc[0]}{f.ptx_cc[1]}" if f.ptx_error else
                     f"OK: 4 kernels for sm_{f.ptx_cc[0]}{f.ptx_cc[1]}, PTX ISA {_version(f.ptx_isa)}, "
                     f"{f.ptx_seconds:.1f} s"))
    if f.run_error or f.run_max_error is not None:
        rows.append(("kernel run", "failed" if f.run_error else f"OK: max error vs reference {f.run_max_error:.1e}"))
    elif f.ptx_cc is not None:
        rows.append(("kernel run", "skipped (no GPU)" if not f.gpus else "skipped"))
    width = max(len(label) for label, _ in rows)
    lines = ["rnnt_xla doctor", *(f"  {label:<{width}}  {value}" for label, value in rows), "",
             f"Diagnosis: {d.verdict}", *(f"  - {line}" for line in d.details)]
    return "\n".join(lines)


def main() -> int:
    findings = collect()
    diagnosis = diagnose(findings)
    print(report(findings, diagnosis))
    return 0 if diagnosis.ok else 1
