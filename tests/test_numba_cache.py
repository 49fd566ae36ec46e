"""Numba's cache does not serve kernels compiled from older sources of the functions they call.

Numba invalidates a cached kernel when the kernel's own file changes, not when a helper in another file
does (``fast_math.store`` is called by every gradient kernel of ``cpu.py``); ``numba_startup.drop_stale_caches``
empties the package's cache when any of its sources changed. The test edits ``store`` in a copy of the
package and checks that the next process computes with the edited ``store``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import rnnt_xla

GRADIENT = """
import numpy as np
from rnnt_xla.kernels import cpu
rng = np.random.default_rng(0)
logits = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
targets, frames, labels = np.array([[1, 2]]), np.array([3]), np.array([2])
residuals = cpu.allocate_residuals(1, 3, 3, logits.dtype)
cpu.forward(logits, targets, frames, labels, 0, True, 0.0, np.empty(1, np.float32), residuals)
grads = np.empty_like(logits)
cpu.backward(logits, targets, frames, labels, 0, True, 0.0, -1.0, np.ones(1), residuals, grads)
print(repr(grads.ravel().tolist()))
"""


def _gradient(root: Path) -> np.ndarray:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", GRADIENT], env=env, capture_output=True, text=True, timeout=300,
                         cwd=root, check=True).stdout
    return np.array(eval(out.strip().splitlines()[-1]))


def test_an_edited_helper_in_another_file_is_recompiled(tmp_path):
    package = Path(rnnt_xla.__file__).parent
    shutil.copytree(package, tmp_path / "rnnt_xla", ignore=shutil.ignore_patterns("__pycache__"))
    before = _gradient(tmp_path)
    cached = list((tmp_path / "rnnt_xla" / "kernels" / "__pycache__").glob("cpu.gradients*.nbi"))
    assert cached  # the first process did cache the kernels
    fast_math = tmp_path / "rnnt_xla" / "kernels" / "fast_math.py"
    source = fast_math.read_text()
    edited = source.replace("            array[index] = _normal32(value)\n",
                            "            array[index] = _normal32(value) * np.float32(2)\n")
    assert edited != source
    fast_math.write_text(edited)
    after = _gradient(tmp_path)
    assert np.abs(before).max() > 0.01
    np.testing.assert_allclose(after, 2 * before, rtol=1e-6)
