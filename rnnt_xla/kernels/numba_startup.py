"""Make Numba's first kernel load in a process cheaper: ~0.3 s less before the first loss.

Two costs of Numba's start-up that this package does not need to pay, and one trap of its cache:

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
- Numba's on-disk cache of a kernel is invalidated when the kernel's own source file changes, not when a
  function it calls from another file does: after an edit of ``fast_math.py`` (or a ``git pull`` that
  changes only it), ``cpu.py``'s cached kernels would keep running the old code. :func:`drop_stale_caches`
  keeps a digest of this package's sources next to the cache and empties the cache when it differs.
  (A ``pip install`` rewrites every file, which Numba's own check already catches.)
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["import_arraymath_without_scipy", "paused_garbage_collector", "drop_stale_caches"]

_KERNELS = Path(__file__).resolve().parent
_DIGEST_FILE = "rnnt_xla_kernels.sha1"


def drop_stale_caches(package: Path = _KERNELS) -> None:
    """Delete Numba's cache files (``*.nbi``, ``*.nbc``) in ``package/__pycache__`` if any ``*.py`` of
    ``package`` changed since the digest stored there was written; then store the new digest. Best effort:
    a read-only or missing cache directory is left alone (Numba then caches elsewhere or not at all)."""
    cache = package / "__pycache__"
    try:
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(package.glob("*.py")))).hexdigest()
        stamp = cache / _DIGEST_FILE
        if stamp.is_file() and stamp.read_text() == digest:
            return
        if cache.is_dir():
            for path in cache.iterdir():
                if path.suffix in (".nbi", ".nbc"):
                    path.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        partial = cache / f"{_DIGEST_FILE}.{os.getpid()}"
        partial.write_text(digest)
        os.replace(partial, stamp)
    except OSError:
        return


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
