"""When the CPU kernels run on Numba's thread pool, on how many threads, and how that pool is started.

Each pass of ``rnnt_xla.kernels.cpu`` exists twice, compiled from the same Python function: parallel
(``prange`` over Numba's threads) and serial (``prange`` is ``range``). Every row of the results is computed
by one thread in the same order either way, so both give identical bits; :func:`thread_count` picks the
threads per pass and call (1: the serial variant):

- **Small passes run serially.** A parallel region wakes the pool's threads and ends with a barrier; when
  another process (a data-loader worker, another job) holds a core, the barrier waits until the OS
  schedules the descheduled thread again, up to a time slice (milliseconds) per region. A pass below
  :data:`PARALLEL_MIN_ELEMENTS` logits (log-softmax and gradient passes, ~0.5-1 ns per entry serially)
  or :data:`PARALLEL_MIN_CELLS` lattice cells (alphas and betas, ~25 ns per cell, parallel over the batch)
  takes a few milliseconds at most serially, and there the threads gain less than such a wait costs.
- **A forked child runs serially.** After a process has started Numba's thread pool, a ``fork()``ed child
  has the pool's state but none of its threads: GNU OpenMP (Numba's ``omp`` layer) terminates such a child
  at its first parallel region ("fork() called from a process already using GNU OpenMP"), grandchildren
  wait forever. :func:`os.register_at_fork` marks such children, and every pass runs serially there
  (forked ``DataLoader`` workers and ``multiprocessing`` pools are the default on Linux).
- **No more threads than the process may use**: Numba's count (``NUMBA_NUM_THREADS``,
  ``numba.set_num_threads``), the cores in the process's current affinity mask, and, when torch is
  imported, torch's intra-op count (``torch.get_num_threads()``; a process told to run torch on one thread
  runs the loss on one thread too).

Starting the pool (:func:`start_pool`, before the first parallel pass). When torch is imported first,
Numba's ``omp`` layer binds to torch's ``libgomp`` (the OpenMP runtime already in the process's global
symbol scope), so torch and the loss share one pool, and starting it sets that runtime's thread count
and nesting for the calling thread: a ``torch.set_num_threads(1)`` made earlier was silently undone
(torch's ops then ran on every core, which on a machine with a busy core made ``python -m rnnt_xla demo``
8x slower). Both settings are put back right after the start. Without torch, the layer loads the
system's ``libgomp``, which reads ``OMP_WAIT_POLICY`` once when it loads: :data:`POOL_ENVIRONMENT` gives it
a passive policy (unless the user set one), so that threads that finished their share sleep instead of
spinning ~3 ms per region on cores other processes need; the variable is removed again right after.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

__all__ = [
    "PARALLEL_MIN_ELEMENTS",
    "PARALLEL_MIN_CELLS",
    "POOL_ENVIRONMENT",
    "thread_count",
    "in_forked_child",
    "pool_started",
    "start_pool",
    "starting_pool",
]

# Passes below these sizes run serially (see the module docstring). Elements: entries of the logits a pass
# reads (B*T*(U+1)*V); cells: lattice cells (B*T*(U+1)).
PARALLEL_MIN_ELEMENTS = 4_000_000
PARALLEL_MIN_CELLS = 100_000

# OpenMP settings for a runtime that Numba's pool loads itself, unless the user set them (starting_pool).
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


def _allowed_threads() -> int:
    """Numba's thread count (its current one once the pool runs, else the one it will start with), capped
    by the cores this process may run on and by torch's intra-op thread count if torch is imported."""
    import numba

    count = numba.get_num_threads() if pool_started() else int(numba.config.NUMBA_NUM_THREADS)
    if hasattr(os, "sched_getaffinity"):
        count = min(count, len(os.sched_getaffinity(0)))
    torch = sys.modules.get("torch")
    get_num_threads = getattr(torch, "get_num_threads", None)
    if get_num_threads is not None:
        count = min(count, get_num_threads())
    return max(count, 1)


def thread_count(work: int, minimum: int, batch: int | None = None) -> int:
    """Threads for a pass over ``work`` units (elements or cells, compared with ``minimum``); 1 means the
    serial kernel. ``batch``: the number of independent items a pass that is parallel over the batch
    splits between its threads."""
    if _forked_child or work < minimum or (batch is not None and batch < 2):
        return 1
    count = _allowed_threads()
    return min(count, batch) if batch is not None else count


def _global_openmp():
    """``(get, set)`` pairs for the thread count and the nesting depth of the OpenMP runtime in the process's
    global symbol scope (torch's ``libgomp`` after ``import torch``), or None when there is none."""
    try:
        lib = ctypes.CDLL(None)
        pairs = ((lib.omp_get_max_threads, lib.omp_set_num_threads),
                 (lib.omp_get_max_active_levels, lib.omp_set_max_active_levels))
    except (AttributeError, OSError):
        return None
    for get, set_ in pairs:
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
    return pairs


@contextlib.contextmanager
def starting_pool() -> Iterator[None]:
    """Around the start of Numba's thread pool: :data:`POOL_ENVIRONMENT` is set while it starts (each
    variable only if the user has not set it), and the thread count and nesting of an OpenMP runtime that
    was already in the process (torch's) are put back afterwards. See the module docstring."""
    if pool_started():
        yield
        return
    added = [name for name in POOL_ENVIRONMENT if name not in os.environ]
    for name in added:
        os.environ[name] = POOL_ENVIRONMENT[name]
    openmp = _global_openmp()
    saved = [get() for get, _ in openmp] if openmp else []
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
        for (_, set_), value in zip(openmp or (), saved):
            set_(value)


def start_pool() -> None:
    """Start Numba's thread pool (its threading layer) the way :func:`starting_pool` describes; a no-op
    once it runs. Numba would otherwise start it inside the first parallel kernel call."""
    if pool_started():
        return
    with starting_pool():
        from numba.np.ufunc import parallel

        parallel._launch_threads()
