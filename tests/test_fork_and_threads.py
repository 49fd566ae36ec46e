"""Forked workers after the parent used the parallel kernels, and serial vs parallel kernels.

Each fork check runs in a subprocess with a timeout, so that a hang fails the test instead of hanging the
suite. The parent first runs the loss on the parallel kernels (the size thresholds of ``kernels.threads``
set to 0, so that Numba's thread pool starts whatever the problem size), then forks.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import random_problem
from rnnt_xla.kernels import cpu, threads

FORK_TIMEOUT_S = 120

# Shared by the scripts: a parent that has started Numba's pool, and a loss whose results are compared.
_PRELUDE = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np
    import torch
    from rnnt_xla.kernels import threads
    from rnnt_xla.torch import rnnt_loss
    threads.PARALLEL_MIN_ELEMENTS = threads.PARALLEL_MIN_CELLS = 0  # the children inherit this too

    def loss_and_grad(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 20, 6, 16, generator=g, requires_grad=True)
        y = torch.randint(1, 16, (4, 5), generator=g, dtype=torch.int32)
        lengths = torch.tensor([20, 17, 20, 9]), torch.tensor([5, 4, 5, 2])
        loss = rnnt_loss(x, y, *lengths, blank=0)
        loss.backward()
        return loss.detach().numpy(), x.grad.numpy(), threads.in_forked_child()
""")

DATALOADER = _PRELUDE + textwrap.dedent("""
    class Losses(torch.utils.data.Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            loss, grad, forked = loss_and_grad(i)
            return torch.from_numpy(loss), torch.from_numpy(grad), forked

    if __name__ == "__main__":
        expected = [loss_and_grad(i) for i in range(6)]
        import numba
        assert numba.threading_layer() in ("omp", "tbb", "workqueue")  # the parent's pool is running
        loader = torch.utils.data.DataLoader(Losses(), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        got = list(loader)
        assert len(got) == 6
        for (loss, grad, forked), (e_loss, e_grad, e_forked) in zip(got, expected):
            assert bool(forked) and not e_forked
            assert np.array_equal(loss.numpy(), e_loss) and np.array_equal(grad.numpy(), e_grad)
        print("dataloader ok")
""")

POOL = _PRELUDE + textwrap.dedent("""
    def child_with_a_pool(seed, queue):
        with multiprocessing.get_context("fork").Pool(1) as pool:
            queue.put(pool.map(loss_and_grad, [seed])[0])

    if __name__ == "__main__":
        expected = [loss_and_grad(i) for i in range(4)]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map(loss_and_grad, range(4))
        for (loss, grad, forked), (e_loss, e_grad, _) in zip(got, expected):
            assert forked and np.array_equal(loss, e_loss) and np.array_equal(grad, e_grad)
        # a forked process forks again (a pool inside a data-loader worker): still serial, still right
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=child_with_a_pool, args=(2, queue))
        child.start()
        loss, grad, forked = queue.get(timeout=100)
        child.join()
        assert forked and np.array_equal(loss, expected[2][0]) and np.array_equal(grad, expected[2][1])
        # the parent itself still runs in parallel and gets the same bits
        loss, grad, forked = loss_and_grad(3)
        assert not forked and np.array_equal(grad, expected[3][1])
        print("pool ok")
""")


def _run(script: str, marker: str) -> None:
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=FORK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"forked workers hung (no result after {FORK_TIMEOUT_S} s): {exc.stderr}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker in result.stdout


def test_forked_dataloader_workers_compute_the_loss_after_the_parent_did():
    """Forked DataLoader workers used to die ("fork() called from a process already using GNU OpenMP")."""
    _run(DATALOADER, "dataloader ok")


def test_fork_pool_computes_the_loss_after_the_parent_did():
    """A fork Pool used to hang forever once the parent had run the loss."""
    _run(POOL, "pool ok")


JAX_PARENT = textwrap.dedent("""
    import multiprocessing, warnings
    import numpy as np
    import jax
    from rnnt_xla.kernels import cpu, threads
    from rnnt_xla.jax import rnnt_loss
    threads.PARALLEL_MIN_ELEMENTS = threads.PARALLEL_MIN_CELLS = 0

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 12, 5, 10), dtype=np.float32)
    y = rng.integers(1, 10, (3, 4)).astype(np.int64)
    lengths = np.full(3, 12, np.int64), np.full(3, 4, np.int64)

    def kernels(_):
        costs, residuals = np.empty(3, np.float32), cpu.allocate_residuals(3, 12, 5, x.dtype)
        cpu.forward(x, y, *lengths, 0, True, 0.0, costs, residuals)
        grads = np.empty_like(x)
        cpu.backward(x, y, *lengths, 0, True, 0.0, -1.0, np.ones(3), residuals, grads)
        return costs, grads, threads.in_forked_child()

    if __name__ == "__main__":
        loss, grad = jax.value_and_grad(lambda x: rnnt_loss(x, y, *lengths, blank=0, reduction="sum"))(x)
        import numba
        assert numba.threading_layer() in ("omp", "tbb", "workqueue")
        warnings.simplefilter("ignore")  # JAX warns that fork() after it started threads may deadlock
        # (JAX itself cannot compile in a forked child; the children use the kernels directly)
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map(kernels, range(2))
        for costs, grads, forked in got:
            assert forked
            np.testing.assert_allclose(costs.sum(), float(loss), rtol=1e-6)
            assert np.array_equal(grads, np.asarray(grad))
        print("jax pool ok")
""")


def test_forked_children_of_a_jax_parent_run_the_kernels():
    pytest.importorskip("jax")
    _run(JAX_PARENT, "jax pool ok")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_serial_and_parallel_kernels_give_identical_bits(monkeypatch, dtype, fused):
    """Each row is computed by one thread in a fixed order, so the serial variants (small problems,
    forked children) and the parallel kernels agree bit for bit, with FastEmit and clamping too."""
    rng = np.random.default_rng(7)
    p = random_problem(rng, 5, 23, 7, 37, blank=3)
    logits = p.logits.astype(dtype)
    B, T, U1, V = logits.shape
    idx = [np.ascontiguousarray(a, dtype=np.int64) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    scale = rng.uniform(0.5, 2.0, B)
    out = {}
    for name, minimum in (("serial", 10**15), ("parallel", 0)):
        monkeypatch.setattr(threads, "PARALLEL_MIN_ELEMENTS", minimum)
        monkeypatch.setattr(threads, "PARALLEL_MIN_CELLS", minimum)
        assert (cpu._choose(logits, np.empty((B, T, U1))) == (1, 1)) == (name == "serial")
        costs = np.empty(B, cpu.compute_dtype(dtype))
        # zeros, not np.empty: entries the kernels never write (padding) then agree too
        residuals = cpu.Residuals(*(np.zeros(shape, dt) for shape, dt in cpu.residual_shapes(B, T, U1, dtype)))
        cpu.forward(logits, *idx, 3, fused, 0.05, costs, residuals)
        for clamp in (-1.0, 0.2):
            grads = np.empty_like(logits)
            cpu.backward(logits, *idx, 3, fused, 0.05, clamp, scale, residuals, grads)
            out[name, clamp] = grads
        out[name] = (costs, *residuals)
    for a, b in zip(out["serial"], out["parallel"]):
        np.testing.assert_array_equal(a, b)
    for clamp in (-1.0, 0.2):
        np.testing.assert_array_equal(out["serial", clamp], out["parallel", clamp])


def test_small_problems_stay_serial_and_large_ones_go_parallel():
    small = np.empty((2, 10, 3, 8), np.float32)
    assert cpu._choose(small, np.empty((2, 10, 3))) == (1, 1)
    B, U1 = 8, 50
    T = threads.PARALLEL_MIN_CELLS // (B * U1) + 1
    V = threads.PARALLEL_MIN_ELEMENTS // (B * T * U1) + 2
    large_logits = np.lib.stride_tricks.as_strided(np.empty(1, np.float32), (B, T, U1, V), (0, 0, 0, 0))
    expected = threads._allowed_threads()
    assert cpu._choose(large_logits, np.empty((B, T, U1))) == (expected, expected)
    one_utterance = np.empty((1, T * B, U1))  # the lattice passes split the batch: nothing to split
    assert cpu._choose(large_logits, one_utterance)[1] == 1


def test_the_pool_environment_is_set_only_while_the_pool_starts(monkeypatch):
    import os

    monkeypatch.setattr(threads, "POOL_ENVIRONMENT", {"OMP_WAIT_POLICY": "PASSIVE"})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "pool_started", lambda: False)
    with threads.starting_pool():
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # the user's choice wins
    with threads.starting_pool():
        assert os.environ["OMP_WAIT_POLICY"] == "active"
    assert os.environ["OMP_WAIT_POLICY"] == "active"


TORCH_THREADS = textwrap.dedent("""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's own start-up (lazy) is done, as in a training step
    assert torch.get_num_threads() == 1
    from rnnt_xla.torch import rnnt_loss
    try:  # (this loss now runs serially with torch on one thread: start the pool as its first parallel pass does)
        from rnnt_xla.kernels import threads
        threads.start_pool()
    except ImportError:  # kernels without rnnt_xla.kernels.threads: the first call starts it
        pass
    x = torch.randn(4, 20, 6, 16, requires_grad=True)
    rnnt_loss(x, torch.randint(1, 16, (4, 5), dtype=torch.int32), torch.full((4,), 20),
              torch.full((4,), 5), blank=0).backward()
    import numba
    from numba.np.ufunc import parallel
    assert parallel._is_initialized
    print("torch threads", torch.get_num_threads())
""")


def test_starting_numba_pool_keeps_torch_thread_count():
    """Numba's omp layer binds to torch's libgomp and its start used to reset torch.set_num_threads(1)
    to the number of cores (torch's own ops then competed for every core)."""
    pytest.importorskip("torch")
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    result = subprocess.run([sys.executable, "-c", TORCH_THREADS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch threads 1" in result.stdout


def test_thread_count_follows_torch_and_affinity(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "FOLLOW_TORCH_THREADS", True)
    try:
        torch.set_num_threads(1)
        assert threads.thread_count(10**12, 0) == 1  # the process runs torch on one thread: so does the loss
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0})
    assert threads.thread_count(10**12, 0) == 1
    monkeypatch.undo()
    monkeypatch.setattr(threads, "_forked_child", True)
    assert threads.thread_count(10**12, 0) == 1


OWN_RUNTIME = textwrap.dedent("""
    import torch
    torch.ones(8, 8) @ torch.ones(8, 8)
    from rnnt_xla.kernels import threads
    threads.start_pool()
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's LD_DEBUG")
def test_numba_pool_gets_its_own_openmp_runtime_after_import_torch():
    """Numba's omp layer used to run its regions on torch's libgomp (torch's spin-wait policy, torch's pool);
    it now binds to the libgomp it was built against, whose wait policy rnnt_xla sets."""
    pytest.importorskip("torch")
    import os

    result = subprocess.run([sys.executable, "-c", OWN_RUNTIME], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LD_DEBUG": "bindings"})
    assert result.returncode == 0, result.stderr[-3000:]
    bindings = [line for line in result.stderr.splitlines() if "omppool" in line and "`GOMP_parallel'" in line]
    if not bindings:
        pytest.skip("the omp threading layer is not the one Numba picked here")
    assert "torch" not in bindings[0].split(" to ")[-1], bindings[0]
