"""When the CPU kernels run on Numba's thread pool, and how that pool is started (no framework imports).

Each pass of ``rnnt_xla.kernels.cpu`` exists twice, compiled from the same Python function: parallel
(``prange`` over Numba's threads) and serial (``prange`` is ``range``). Every row of the results is computed
by one thread in the same order either way, so both give identical bits; :func:`use_parallel` picks one per
pass and call:

- **Small work runs serially.** A parallel region costs a wake-up of the pool's threads and a barrier at the
  end; when another process (a data-loader worker, another job) or torch's own OpenMP pool holds a core, the
  barrier waits until the OS schedules the descheduled thread again, milliseconds per region. Below
  :data:`PARALLEL_MIN_ELEMENTS` logits (log-softmax and gradient passes) or :data:`PARALLEL_MIN_CELLS`
  lattice cells (alphas and betas) that costs more than the threads gain, so those passes run serially
  (``benchmarks/bench_train_step.py`` measured the thresholds).
- **A forked child runs serially.** After a process has started Numba's thread pool, a ``fork()``ed child
  has the pool's state but none of its threads: GNU OpenMP (Numba's ``omp`` layer) terminates such a child
  at its first parallel region ("fork() called from a process already using GNU OpenMP"), grandchildren
  wait forever. :func:`os.register_at_fork` marks such children, and every pass runs serially there
  (forked ``DataLoader`` workers and ``multiprocessing`` pools are the default on Linux).
- **A process with one usable core** (``os.sched_getaffinity``, ``NUMBA_NUM_THREADS``,
  ``numba.set_num_threads``) runs serially: a pool of one thread gains nothing.

:func:`starting_pool` wraps the first load of a parallel kernel, which is when Numba starts its thread pool
(its threading layer): it gives that pool's OpenMP runtime a passive wait policy unless the user chose one.
An OpenMP thread that finishes its share of a region normally spins for a while, waiting for the next one;
with a core taken by another process that spinning thread takes the CPU from the threads that have work
(the loss 8x slower with one of two cores busy). Numba's ``omp`` layer loads the system's ``libgomp``, which
reads the variable once when it is loaded, and torch bundles its own ``libgomp`` (loaded at ``import
torch``), so torch's pool keeps its own policy; the variable is removed again right after the load.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = [
    "PARALLEL_MIN_ELEMENTS",
    "PARALLEL_MIN_CELLS",
    "use_parallel",
    "in_forked_child",
    "pool_started",
    "starting_pool",
]

# Parallel passes below these sizes lose to serial ones (see the module docstring). Elements: entries of the
# logits a pass reads (B*T*(U+1)*V); cells: lattice cells (B*T*(U+1)), each an exp and a log1p.
PARALLEL_MIN_ELEMENTS = 2_000_000
PARALLEL_MIN_CELLS = 200_000

# OpenMP settings Numba's pool gets at its start unless the user set them (see starting_pool).
POOL_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

_forked_child = False  # this process was forked after its parent (or an ancestor) started Numba's pool


def pool_started() -> bool:
    """Whether this process (or the parent it was forked from) has started Numba's thread pool."""
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", True))  # unknown Numba internals: assume started


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = _forked_child or pool_started()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def in_forked_child() -> bool:
    """Whether this process was forked from one whose Numba thread pool had started (then: serial only)."""
    return _forked_child


def _usable_threads() -> int:
    """Threads a parallel pass would run on: Numba's current count once its pool runs, else the count it
    will start with (``NUMBA_NUM_THREADS``, by default the cores in this process's affinity mask)."""
    import numba

    if pool_started():
        return numba.get_num_threads()
    return int(numba.config.NUMBA_NUM_THREADS)


def use_parallel(work: int, minimum: int, batch: int | None = None) -> bool:
    """Whether a pass over ``work`` units (elements or cells, compared with ``minimum``) should run on
    Numba's threads; ``batch``: the number of independent items a pass parallel over the batch splits."""
    if _forked_child or work < minimum or (batch is not None and batch < 2):
        return False
    return _usable_threads() > 1


@contextlib.contextmanager
def starting_pool() -> Iterator[None]:
    """Around the first load of a parallel kernel: Numba's pool starts with :data:`POOL_ENVIRONMENT` set
    (each variable only if the user has not set it), which is removed again afterwards. Only the runtime
    loaded inside the block reads it, so frameworks imported before or after keep their own settings."""
    if pool_started():
        yield
        return
    added = [name for name in POOL_ENVIRONMENT if name not in os.environ]
    for name in added:
        os.environ[name] = POOL_ENVIRONMENT[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
