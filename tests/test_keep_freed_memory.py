"""``rnnt_xla.keep_freed_memory()``: glibc keeps freed memory, so a step's new buffers reuse the last step's
pages instead of paying first-touch page faults (JAX on the CPU allocates every output anew each call).

Each case runs in a fresh process: the setting is process-wide and permanent. The page faults a process takes
(``ru_minflt``) show whether memory was reused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import rnnt_xla

_GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

_PROBE = textwrap.dedent("""
    import ctypes, resource, sys

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    import rnnt_xla
    if sys.argv[1] == "keep":
        assert rnnt_xla.keep_freed_memory()
    if sys.argv[2] == "malloc":
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MB)

        def touch():
            pointer = libc.malloc(size)
            before = faults()
            ctypes.memset(pointer, 1, size)
            count = faults() - before
            libc.free(pointer)
            return count

        touch()
        print(touch())
    else:
        import numpy as np
        import jax
        import jax.numpy as jnp
        import rnnt_xla.jax as rnnt_jax

        B, T, U, V = 4, 100, 30, 1024  # a 51 MB gradient
        rng = np.random.default_rng(0)
        logits = jnp.asarray(rng.standard_normal((B, T, U + 1, V), dtype=np.float32))
        targets = jnp.asarray(rng.integers(0, V - 1, (B, U)), dtype=jnp.int32)
        frames, labels = jnp.full((B,), T, jnp.int32), jnp.full((B,), U, jnp.int32)
        step = jax.jit(jax.value_and_grad(lambda x: rnnt_jax.rnnt_loss(x, targets, frames, labels, blank=V - 1)))
        for _ in range(4):  # compile, then let the heap grow to the step's size
            step(logits)[1].block_until_ready()
        counts = []
        for _ in range(5):  # the fewest of several steps: a step may still grow the heap once
            before = faults()
            step(logits)[1].block_until_ready()
            counts.append(faults() - before)
        print(min(counts))
""")


def _faults(mode: str, what: str) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode, what], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt only")
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    # 64 MB of 4 KB pages is 16384 faults (about 32 where transparent huge pages are always on)
    assert _faults("default", "malloc") >= 16
    assert _faults("keep", "malloc") == 0


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt only")
def test_a_jitted_jax_step_stops_faulting_its_outputs_in() -> None:
    pytest.importorskip("jax")
    # by default every step's gradient and residuals are new pages (hundreds of faults per step here; at
    # least 25 for the gradient alone with 2 MB pages); with kept memory a step reuses them (0 faults here)
    assert _faults("default", "jax") >= 10
    assert _faults("keep", "jax") <= 5


def test_it_is_exported_and_says_whether_it_took_effect() -> None:
    assert "keep_freed_memory" in rnnt_xla.__all__
    result = subprocess.run([sys.executable, "-c", "import rnnt_xla; print(rnnt_xla.keep_freed_memory())"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(_GLIBC)
