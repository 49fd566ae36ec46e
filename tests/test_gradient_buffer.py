"""The CPU backward pass reuses the last gradient's memory (rnnt_xla.buffers) only when nothing refers to it.

A gradient the caller still holds (a tensor, a view of it, a leaf's ``.grad``, a numpy view) must keep its
values when the loss runs again; a dropped one is written again in place (no first-touch page faults).
"""

from __future__ import annotations

import numpy as np
import pytest

from rnnt_xla import reference
from rnnt_xla.buffers import ReusableBuffer

from conftest import random_problem

torch = pytest.importorskip("torch")
rnnt_torch = pytest.importorskip("rnnt_xla.torch")


def _gradient(problem, dtype=torch.float32) -> torch.Tensor:
    logits = torch.tensor(problem.logits, dtype=dtype, requires_grad=True)
    loss = rnnt_torch.rnnt_loss(logits, torch.tensor(problem.targets), torch.tensor(problem.logit_lengths),
                                torch.tensor(problem.target_lengths), blank=problem.blank, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def _expected(problem) -> np.ndarray:
    return reference.rnnt_loss_reference(problem.logits.astype(np.float64), problem.targets,
                                         problem.logit_lengths, problem.target_lengths, blank=problem.blank,
                                         reduction="sum")[1]


def test_reusable_buffer_hands_out_unreferenced_memory_only() -> None:
    buffers = ReusableBuffer()
    first = buffers.empty((4, 6), np.float32)
    address = first.ctypes.data
    view = first[1:]
    del first
    held = buffers.empty((4, 6), np.float32)  # a view of the first still exists
    assert held.ctypes.data != address
    assert view.base is not None
    address = held.ctypes.data
    del held
    smaller = buffers.empty((2, 3), np.float64)  # a prefix of the kept buffer, other shape and dtype
    assert smaller.ctypes.data == address and smaller.shape == (2, 3) and smaller.dtype == np.float64
    del smaller
    larger = buffers.empty((10, 10), np.float32)  # too small to reuse: new memory, kept from now on
    assert larger.ctypes.data != address and buffers.kept_bytes == 400
    del larger
    buffers.release()
    assert buffers.kept_bytes == 0
    assert buffers.empty((0, 5), np.float32).shape == (0, 5)


def test_a_held_gradient_keeps_its_values_when_the_loss_runs_again() -> None:
    rng = np.random.default_rng(0)
    one, two = (random_problem(rng, 3, 7, 4, 9, blank=b) for b in (0, 8))
    kept = _gradient(one)
    slice_of_kept = kept[1:]
    address = kept.data_ptr()
    for _ in range(3):  # each call must write elsewhere: `kept` and its view are alive
        other = _gradient(two)
        assert other.data_ptr() != address
        np.testing.assert_allclose(other.numpy(), _expected(two), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept.numpy(), _expected(one), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slice_of_kept.numpy(), _expected(one)[1:], rtol=1e-5, atol=1e-6)


def test_a_dropped_gradient_is_written_again_in_place() -> None:
    rng = np.random.default_rng(1)
    one, two = (random_problem(rng, 2, 6, 3, 8) for _ in range(2))
    address = _gradient(one).data_ptr()  # dropped at once
    again = _gradient(two)
    assert again.data_ptr() == address
    np.testing.assert_allclose(again.numpy(), _expected(two), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leaf_grad_accumulates_over_reused_memory(dtype) -> None:
    """``.grad`` of a leaf holds the first gradient (autograd keeps the tensor it is given): the second
    backward pass must not write into it before adding."""
    rng = np.random.default_rng(2)
    problem = random_problem(rng, 2, 5, 3, 7)
    logits = torch.tensor(problem.logits, dtype=dtype, requires_grad=True)
    args = [torch.tensor(a) for a in (problem.targets, problem.logit_lengths, problem.target_lengths)]
    for _ in range(2):
        rnnt_torch.rnnt_loss(logits, *args, blank=problem.blank, reduction="sum").backward()
    expected = 2 * _expected(problem)
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.grad.float().numpy(), expected, **tolerance)


def test_empty_cache_releases_the_kept_buffer() -> None:
    rng = np.random.default_rng(3)
    _gradient(random_problem(rng, 2, 4, 2, 5))
    assert rnnt_torch._GRADIENT_BUFFER.kept_bytes > 0
    rnnt_torch.empty_cache()
    assert rnnt_torch._GRADIENT_BUFFER.kept_bytes == 0


def test_wide_vectors_marks_the_calling_function() -> None:
    """fast_math.wide_vectors puts LLVM's prefer-vector-width=512 on the function that calls it only."""
    from numba import njit

    from rnnt_xla.kernels.fast_math import wide_vectors

    @njit
    def marked(x):
        wide_vectors()
        return x.sum()

    @njit
    def plain(x):
        return x.sum()

    x = np.arange(4.0)
    assert marked(x) == plain(x) == 6.0
    assert '"prefer-vector-width"="512"' in marked.inspect_llvm(marked.signatures[0])
    assert "prefer-vector-width" not in plain.inspect_llvm(plain.signatures[0])


@pytest.mark.parametrize("loss", ["rnnt", "tdt", "multiblank"])
def test_backward_materialises_no_zero_gradients_for_the_other_outputs(loss) -> None:
    """The forward operator's outputs other than the loss (labels, lengths, residual slots) get no gradient:
    autograd must not fill zero tensors for them (11 parallel fills per step kept torch's threads busy on the
    cores the gradient pass needs)."""
    from torch.profiler import profile

    rng = np.random.default_rng(4)
    problem = random_problem(rng, 2, 6, 3, 6 if loss == "tdt" else 9, blank=5 if loss == "tdt" else 0)
    scores = problem.logits
    if loss == "tdt":  # the duration scores after the labels'
        scores = np.concatenate([scores, rng.standard_normal(scores.shape[:3] + (3,), dtype=np.float32)], -1)
    logits = torch.tensor(scores, requires_grad=True)
    args = [torch.tensor(a) for a in (problem.targets, problem.logit_lengths, problem.target_lengths)]
    if loss == "tdt":
        out = rnnt_torch.tdt_loss(logits, *args, durations=[0, 1, 2], blank=5)
    elif loss == "multiblank":
        out = rnnt_torch.multiblank_rnnt_loss(logits, *args, big_blank_durations=[2], blank=8)
    else:
        out = rnnt_torch.rnnt_loss(logits, *args, blank=problem.blank)
    with profile() as prof:
        out.backward()
    names = [event.name for event in prof.events()]
    assert "rnnt_xla::loss_backward" in names
    assert not [n for n in names if n in ("aten::zeros", "aten::zero_", "aten::zeros_like")], names
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int16])
def test_prefetch_row_is_only_a_hint(dtype) -> None:
    """fast_math.prefetch_row compiles for every kernel dtype (16-bit logits as bits), on rows of any length
    and on a strided view, and changes nothing."""
    from numba import njit

    from rnnt_xla.kernels.fast_math import prefetch_row

    @njit
    def hinted_sum(rows):
        total = 0.0
        for u in range(rows.shape[0]):
            if u + 1 < rows.shape[0]:
                prefetch_row(rows[u + 1])
            prefetch_row(rows[u, ::3])
            for v in range(rows.shape[1]):
                total += rows[u, v]
        return total

    rows = np.arange(5 * 37, dtype=dtype).reshape(5, 37)
    before = rows.copy()
    assert hinted_sum(rows) == float(rows.astype(np.float64).sum())
    assert hinted_sum(rows[:, :0]) == 0.0
    np.testing.assert_array_equal(rows, before)
