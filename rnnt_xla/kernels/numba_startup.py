"""Make Numba's first kernel load in a process cheaper: ~0.3 s less before the first loss.

Two costs of Numba's start-up that this package does not need to pay:

- The first time a process compiles or loads a cached CPU kernel, Numba initialises its CPU target, which
  imports ``numba.np.arraymath``; that module imports ``scipy.linalg`` (0.2-0.3 s: SciPy's array-API layer
  also imports ``numpy.f2py``) only to set a flag saying whether BLAS is available for ``np.dot``. The
  kernels of this package never use BLAS. :func:`import_arraymath_without_scipy` imports
  ``numba.np.arraymath`` while that check only asks whether SciPy is installed, without importing it; when
  jitted code does use BLAS, ``numba.np.linalg`` still imports and checks SciPy then, exactly as before.
- That start-up creates thousands of Python objects (typing templates, registries), which triggers the
  cyclic garbage collector's full passes; after ``import torch`` each of them walks torch's large heap,
  which doubled the start-up (0.2 s instead of 0.1 s here; Numba's own import: +0.08 s).
  :func:`paused_garbage_collector` pauses the collector while ``rnnt_xla.kernels.cpu`` imports Numba and
  during the first call of each entry point; it is switched back on (if it was on) right after.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys
from collections.abc import Iterator

__all__ = ["import_arraymath_without_scipy", "paused_garbage_collector"]


def _scipy_is_installed() -> None:
    """Stand-in for ``numba.np.linalg.ensure_blas`` with the same contract (ImportError when no SciPy)."""
    if importlib.util.find_spec("scipy") is None:
        raise ImportError("scipy 0.16+ is required for linear algebra")


def import_arraymath_without_scipy() -> None:
    """Import ``numba.np.arraymath`` without importing SciPy. Does nothing if it is already imported, and
    falls back to Numba's own behaviour if Numba's internals are not what this expects."""
    if "numba.np.arraymath" in sys.modules:
        return
    try:
        import numba.np.linalg as linalg
    except ImportError:
        return
    ensure_blas = getattr(linalg, "ensure_blas", None)
    if ensure_blas is None:
        return
    linalg.ensure_blas = _scipy_is_installed
    try:
        import numba.np.arraymath as arraymath
    finally:
        linalg.ensure_blas = ensure_blas
    if getattr(arraymath, "ensure_blas", None) is _scipy_is_installed:
        arraymath.ensure_blas = ensure_blas  # later calls from arraymath do the full check


@contextlib.contextmanager
def paused_garbage_collector() -> Iterator[None]:
    """Disable Python's cyclic garbage collector inside the block and restore its previous state after it.
    Nothing is lost: cycles created meanwhile are collected by the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
