"""Shared problem generators for the tests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import rnnt_xla


def _source_hash() -> str:
    package = Path(rnnt_xla.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(package.glob("*.py")) + sorted(package.glob("kernels/*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# torch.compile's on-disk caches (AOTAutograd, FX graphs) key a custom operator by its name, not its schema:
# a graph compiled against another version of rnnt_xla's operators (another checkout on this machine, an
# older commit) is loaded and then fails on the outputs' shapes. One cache directory per version of the
# package's source keeps them apart (subprocesses inherit it); a cache directory set by the user is kept.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"torchinductor_rnnt_xla_{_source_hash()}"))


@dataclass
class Problem:
    """One RNNT loss input: ``logits (B, T, U+1, V)``, ``targets (B, W)``, lengths ``(B,)``, blank."""

    logits: np.ndarray
    targets: np.ndarray
    logit_lengths: np.ndarray
    target_lengths: np.ndarray
    blank: int


def random_problem(
    rng: np.random.Generator,
    B: int,
    T: int,
    U: int,
    V: int,
    *,
    dtype=np.float32,
    blank: int = 0,
    variable_lengths: bool = True,
    extra_target_columns: int = 0,
    index_dtype=np.int32,
    scale: float = 2.0,
) -> Problem:
    """Random logits and labels; with ``variable_lengths`` utterances are shorter than the padded sizes
    (one of them keeps the full T and U) and padding holds junk labels (-1 and out-of-vocabulary ids)."""
    logits = (rng.standard_normal((B, T, U + 1, V)) * scale).astype(dtype)
    if variable_lengths:
        logit_lengths = rng.integers(1, T + 1, size=B)
        target_lengths = rng.integers(0, U + 1, size=B)
        logit_lengths[0], target_lengths[0] = T, U
    else:
        logit_lengths = np.full(B, T)
        target_lengths = np.full(B, U)
    W = U + extra_target_columns
    targets = rng.integers(0, V, size=(B, W))
    for b in range(B):  # junk past each target length must be ignored
        targets[b, target_lengths[b]:] = rng.choice([-1, V, 10 * V + 3], size=W - target_lengths[b])
    return Problem(
        logits,
        targets.astype(index_dtype),
        logit_lengths.astype(index_dtype),
        target_lengths.astype(index_dtype),
        blank,
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def run_simulation(module: str, out: Path) -> dict[str, np.ndarray]:
    """``<module>.simulate(out)`` (a test module's CUDA cases) in a subprocess under Numba's CUDA simulator,
    which must be switched on before Numba is imported; returns the arrays it saved to ``out`` (``.npz``)."""
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(
        [str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    script = f"import {module} as t; t.simulate({str(out)!r})"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return dict(np.load(out))


def jax_gpu_device():
    """The first JAX GPU device; skips the test when JAX has no GPU backend or Numba sees no GPU."""
    jax = pytest.importorskip("jax")
    from rnnt_xla.kernels import cuda as cuda_kernels

    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices or not cuda_kernels.available():
        pytest.skip("no JAX GPU backend or no GPU")
    return devices[0]
