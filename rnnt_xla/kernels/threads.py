"""When the CPU kernels run on Numba's thread pool, on how many threads, and how that pool is started.

Each pass of ``rnnt_xla.kernels.cpu`` exists twice, compiled from the same Python function: parallel
(``prange`` over Numba's threads) and serial (``prange`` is ``range``). Every row of the results is computed
by one thread in the same order either way, so both give identical bits; :func:`thread_count` picks the
threads per pass and call (1: the serial variant):

- **Small passes run serially.** A parallel region wakes the pool's threads and ends with a barrier; when
  another process (a data-loader worker, another job) holds a core, the barrier can wait until the OS
  schedules a descheduled thread again, up to a time slice (milliseconds). A pass below
  :data:`PARALLEL_MIN_ELEMENTS` logits (log-softmax and gradient passes, ~0.5-1 ns per entry serially)
  or :data:`PARALLEL_MIN_CELLS` lattice cells (alphas and betas, ~25 ns per cell, parallel over the batch)
  takes about a millisecond serially: the threads can save less than such a wait costs.
- **A forked child runs serially.** After a process has started Numba's thread pool, a ``fork()``ed child
  has the pool's state but none of its threads: GNU OpenMP (Numba's ``omp`` layer) terminates such a child
  at its first parallel region ("fork() called from a process already using GNU OpenMP"), grandchildren
  wait forever. :func:`os.register_at_fork` marks such children, and every pass runs serially there
  (forked ``DataLoader`` workers and ``multiprocessing`` pools are the default on Linux).
- **No more threads than the process may use**: Numba's count (``NUMBA_NUM_THREADS``,
  ``numba.set_num_threads``) and the cores in the process's current affinity mask; with
  :data:`FOLLOW_TORCH_THREADS` also torch's intra-op count (off by default, see there).

Starting the pool (:func:`start_pool`, before the first parallel pass). Numba's ``omp`` layer would bind
to the OpenMP runtime already in the process's global symbol scope, which after ``import torch`` is torch's
``libgomp``: torch and the loss then shared one pool with torch's busy-wait policy (a thread that finishes
its share of a region spins ~3 ms for the next one), and starting it set that runtime's thread count and
nesting, silently undoing an earlier ``torch.set_num_threads(1)`` (torch's own ops then ran on every core
again). Now:

- the layer is loaded with ``RTLD_DEEPBIND`` when another OpenMP runtime is in the process, so it binds to
  the system ``libgomp`` it was built against (its own pool); ``RNNT_XLA_OWN_OPENMP=0`` turns that off;
- that ``libgomp`` reads ``OMP_WAIT_POLICY`` once, when it loads: :data:`POOL_ENVIRONMENT` makes it passive
  (unless the user set the variable), so threads that finished their share sleep instead of spinning on
  cores other processes need; the variable is removed again right after the load, so torch's runtime
  (loaded before or after) keeps its own policy;
- the thread count and nesting of the runtime that was already loaded are put back after the start.

Measured (``benchmarks/bench_train_step.py --crossover``, loss alone, 2 cores): with torch's shared runtime
the parallel kernels were up to 2x slower than the serial ones with one core busy; with their own passive
runtime they are as fast as serial ones there and 1.7-1.9x faster on a quiet machine.
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
    "OWN_OPENMP",
    "FOLLOW_TORCH_THREADS",
    "thread_count",
    "in_forked_child",
    "pool_started",
    "start_pool",
    "starting_pool",
]

# Passes below these sizes run serially (see the module docstring): about a millisecond of serial work.
# Elements: entries of the logits a pass reads (B*T*(U+1)*V); cells: lattice cells (B*T*(U+1)).
PARALLEL_MIN_ELEMENTS = 1_000_000
PARALLEL_MIN_CELLS = 40_000

# OpenMP settings for a runtime that Numba's pool loads itself, unless the user set them (starting_pool).
POOL_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

# Cap the loss's threads at torch.get_num_threads() when torch is imported. Off by default: with its own
# passive pool the parallel loss was as fast or faster in a training step with torch on one intra-op thread,
# also with a busy core (bench_train_step: 30.6 vs 36.9 ms per step at "medium", busy/torch1).
FOLLOW_TORCH_THREADS = False

# With another OpenMP runtime already loaded (torch's), Numba's omp layer is loaded with RTLD_DEEPBIND so
# that it binds to the libgomp it was built against instead (see the module docstring). An escape hatch for
# setups that do not allow RTLD_DEEPBIND (AddressSanitizer): RNNT_XLA_OWN_OPENMP=0.
OWN_OPENMP = os.environ.get("RNNT_XLA_OWN_OPENMP", "1") != "0"

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
    if get_num_threads is not None and FOLLOW_TORCH_THREADS:
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
    variable only if the user has not set it), the layer is loaded with ``RTLD_DEEPBIND`` if an OpenMP
    runtime is already in the process (:data:`OWN_OPENMP`), and that runtime's thread count and nesting
    are put back afterwards. See the module docstring."""
    if pool_started():
        yield
        return
    added = [name for name in POOL_ENVIRONMENT if name not in os.environ]
    for name in added:
        os.environ[name] = POOL_ENVIRONMENT[name]
    openmp = _global_openmp()
    saved = [get() for get, _ in openmp] if openmp else []
    flags = sys.getdlopenflags()
    if openmp and OWN_OPENMP and hasattr(os, "RTLD_DEEPBIND"):
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        yield
    finally:
        sys.setdlopenflags(flags)
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
