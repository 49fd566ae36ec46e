"""Token-and-Duration Transducer: the float64 reference (known answers, path enumeration, finite differences)
and the CPU kernels (``rnnt_xla.kernels.cpu_tdt``) against it."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnt_xla.kernels import cpu, cpu_tdt
from rnnt_xla.reference import log_softmax, rnnt_loss_reference, tdt_loss_reference

DURATION_SETS = [(0, 1, 2, 3, 4), (0, 2), (1, 2), (0, 1), (1,), (2,), (0, 1, 2, 5), (1, 3), (0, 1, 9)]


def tdt_problem(rng, B, T, U, V, durations, *, dtype=np.float32, scale=2.0, variable_lengths=True):
    """Random logits ``(B, T, U+1, V + D)``, targets with junk past each length, int64 lengths."""
    D = len(durations)
    logits = (rng.standard_normal((B, T, U + 1, V + D)) * scale).astype(dtype)
    logit_lengths = rng.integers(1, T + 1, B) if variable_lengths else np.full(B, T)
    target_lengths = rng.integers(0, U + 1, B) if variable_lengths else np.full(B, U)
    logit_lengths[0], target_lengths[0] = T, U
    targets = rng.integers(0, V, (B, U))
    for b in range(B):
        targets[b, target_lengths[b]:] = -1
    return logits, targets.astype(np.int64), logit_lengths.astype(np.int64), target_lengths.astype(np.int64)


def run_kernels(logits, targets, logit_lengths, target_lengths, durations, blank, sigma=0.0, fastemit_lambda=0.0,
                clamp=-1.0, label_head_only=False, grad_scale=None):
    """Costs and gradients (times ``grad_scale``, default 1) of the TDT kernels; 16-bit logits as bits."""
    B, T, U1, _ = logits.shape
    durations = np.asarray(durations, np.int64)
    kernel_logits = cpu.as_kernel_array(logits)
    costs = np.empty(B, cpu.compute_dtype(logits.dtype))
    residuals = cpu_tdt.allocate_residuals(B, T, U1, len(durations), logits.dtype)
    cpu_tdt.forward(kernel_logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda,
                    label_head_only, costs, residuals)
    grads = np.full_like(kernel_logits, 7)  # junk: every entry must be written
    scale = np.ones(B) if grad_scale is None else grad_scale
    cpu_tdt.backward(kernel_logits, targets, logit_lengths, target_lengths, blank, durations, sigma,
                     fastemit_lambda, clamp, label_head_only, scale, residuals, grads)
    return costs, grads.view(logits.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------


def test_reference_matches_nemos_fixed_case():
    """NeMo's known answer: tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py,
    TestTDTLoss.test_case_fixed_case_act_label (B=1, T=3, U+1=2, 3 labels + blank (last), durations [0, 1, 2],
    sigma 0.05, all logits 0, reduction 'sum')."""
    logits = np.zeros((1, 3, 2, 4 + 3))
    cost, grad = tdt_loss_reference(logits, np.array([[0]]), np.array([3]), np.array([1]), [0, 1, 2], blank=3,
                                    sigma=0.05, reduction="sum")
    expected_grad = [[
        [[-0.64962804, 0.25, 0.25, 0.14962798, 0.2672583, -0.16792619, -0.09933221],
         [0.01651875, 0.01651875, 0.01651875, -0.04955626, 0.022025, -0.01227201, -0.009753]],
        [[-0.04892651, 0.01714851, 0.01714851, 0.01462949, -0.01143234, -0.01143234, 0.02286467],
         [0.12531489, 0.12531489, 0.12531489, -0.37594467, 0.16708651, 0.13027048, -0.29735702]],
        [[-0.02572276, 0.00857425, 0.00857425, 0.00857425, -0.02286468, 0.01143234, 0.01143234],
         [0.13388914, 0.13388914, 0.13388914, -0.40166742, 0.17851885, -0.35703772, 0.17851885]],
    ]]
    np.testing.assert_allclose(cost, 4.155739, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def enumerated_log_likelihood(log_probs, duration_log_probs, labels, blank, durations, sigma):
    """``log P(y|x)`` by listing every alignment: sequences of arcs (token, duration) from (0, 0) to (T, U)."""
    T, U1, _ = log_probs.shape
    U = U1 - 1
    paths = []

    def walk(t, u, score):
        if t == T:
            if u == U:
                paths.append(score)
            return
        for i, d in enumerate(durations):
            if d > 0 and t + d <= T:
                walk(t + d, u, score + log_probs[t, u, blank] - sigma + duration_log_probs[t, u, i])
            if u < U and t + d < T:
                walk(t + d, u + 1, score + log_probs[t, u, labels[u]] - sigma + duration_log_probs[t, u, i])

    walk(0, 0, 0.0)
    if not paths:
        return -math.inf
    m = max(paths)
    return m + math.log(sum(math.exp(p - m) for p in paths))


@pytest.mark.parametrize("durations", DURATION_SETS)
def test_reference_cost_is_the_sum_over_every_alignment(durations):
    rng = np.random.default_rng(len(durations))
    for T, U, V in [(1, 0, 2), (3, 1, 3), (4, 2, 3), (5, 3, 4)]:
        logits, targets, _, _ = tdt_problem(rng, 1, T, U, V, durations, dtype=np.float64, variable_lengths=False)
        blank = int(rng.integers(0, V))
        cost, _ = tdt_loss_reference(logits, targets, np.array([T]), np.array([U]), durations, blank=blank,
                                     sigma=0.1, reduction="none")
        expected = enumerated_log_likelihood(log_softmax(logits[0, ..., :V]), log_softmax(logits[0, ..., V:]),
                                             targets[0], blank, durations, 0.1)
        np.testing.assert_allclose(cost[0], -expected, rtol=1e-12)


def test_reference_without_alignment_costs_inf_with_zero_gradient():
    logits = np.random.default_rng(0).standard_normal((2, 3, 2, 3 + 1))
    cost, grad = tdt_loss_reference(logits, np.array([[1], [1]]), np.array([3, 2]), np.array([0, 0]), [2],
                                    blank=0, reduction="none")
    assert cost[0] == np.inf and not grad[0].any()  # blanks of 2 frames cannot end at frame 3
    assert np.isfinite(cost[1]) and grad[1, 0, 0].any()  # but one ends at frame 2


@pytest.mark.parametrize("durations, sigma, blank", [((0, 1, 2, 3), 0.0, 0), ((0, 2), 0.05, 2), ((1, 3), 0.3, 1)])
def test_reference_gradient_matches_finite_differences(durations, sigma, blank):
    rng = np.random.default_rng(7)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 2, 6, 2, 3, durations, dtype=np.float64)
    logit_lengths[:] = [6, 4]  # even: durations (0, 2) fit

    def loss(x):
        return float(tdt_loss_reference(x, targets, logit_lengths, target_lengths, durations, blank=blank,
                                        sigma=sigma, reduction="sum")[0])

    _, grad = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, durations, blank=blank,
                                 sigma=sigma, reduction="sum")
    h = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        x = logits.copy()
        x[index] += h
        up = loss(x)
        x[index] -= 2 * h
        numeric[index] = (up - loss(x)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=2e-7)
    assert np.abs(grad).max() > 0.05


def test_reference_fastemit_and_clamp_follow_nemo():
    """FastEmit scales the cost and the label part's label arcs, not the duration part; clamp clips the label
    part only (NeMo's compute_tdt_grad_kernel)."""
    rng = np.random.default_rng(3)
    durations = (0, 1, 2)
    args = tdt_problem(rng, 2, 6, 3, 5, durations, dtype=np.float64, scale=3.0)
    V = 5
    cost0, grad0 = tdt_loss_reference(*args, durations, blank=0, sigma=0.05, reduction="none")
    cost1, grad1 = tdt_loss_reference(*args, durations, blank=0, sigma=0.05, reduction="none", fastemit_lambda=0.5)
    np.testing.assert_allclose(cost1, 1.5 * cost0, rtol=1e-12)
    np.testing.assert_allclose(grad1[..., V:], grad0[..., V:], atol=1e-15)
    assert np.abs(grad1[..., :V] - grad0[..., :V]).max() > 1e-3
    _, clamped = tdt_loss_reference(*args, durations, blank=0, sigma=0.05, reduction="none", clamp=0.05)
    np.testing.assert_allclose(clamped[..., :V], np.clip(grad0[..., :V], -0.05, 0.05), atol=1e-15)
    np.testing.assert_allclose(clamped[..., V:], grad0[..., V:], atol=1e-15)
    assert np.abs(grad0[..., V:]).max() > 0.05


def test_reference_label_head_only_is_the_rnnt_loss_of_the_label_part():
    rng = np.random.default_rng(4)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 5, 3, 4, (0, 1, 2), dtype=np.float64)
    cost, grad = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, (0, 1, 2), blank=1, sigma=0.5,
                                    reduction="mean", label_head_only=True)
    ref_cost, ref_grad = rnnt_loss_reference(logits[..., :4], targets, logit_lengths, target_lengths, blank=1)
    np.testing.assert_allclose(cost, ref_cost, rtol=1e-15)
    np.testing.assert_allclose(grad[..., :4], ref_grad, atol=1e-15)
    assert not grad[..., 4:].any()


# ---------------------------------------------------------------------------------------------------------------
# The kernels against the reference
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def kernel_problems(draw):
    durations = draw(st.sampled_from(DURATION_SETS))
    B, T, U, V = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(0, 4)), draw(st.integers(2, 7))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    problem = tdt_problem(rng, B, T, U, V, durations, dtype=dtype, scale=draw(st.sampled_from([0.3, 2.0, 8.0])))
    options = dict(
        blank=draw(st.integers(0, V - 1)),
        sigma=draw(st.sampled_from([0.0, 0.05, 0.5])),
        fastemit_lambda=draw(st.sampled_from([0.0, 0.0, 0.1])),
        clamp=draw(st.sampled_from([-1.0, -1.0, 0.02, 0.3])),
        label_head_only=draw(st.sampled_from([False, False, True])),
    )
    return problem, durations, options, rng.uniform(0.5, 2.0, B)


@settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel_problems())
def test_kernels_match_the_reference(case):
    (logits, targets, logit_lengths, target_lengths), durations, options, grad_scale = case
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, grad_scale=grad_scale,
                               **options)
    ref_costs, ref_grads = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, durations,
                                              reduction="none", **options)
    f64 = logits.dtype == np.float64
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-12 if f64 else 1e-6, atol=1e-12 if f64 else 1e-6)
    expected = ref_grads * grad_scale[:, None, None, None]
    np.testing.assert_allclose(grads, expected, rtol=1e-10 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)


@pytest.mark.parametrize("durations", [(0, 1, 2, 3, 4, 5), (1, 2, 3, 4, 5)])
def test_kernels_on_nemos_randomized_cases(durations):
    """The settings of NeMo's TestTDTLoss.test_case_randomized_act_label and ..._no_0_duration
    (tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py): B=4, T=8, U+1=4, 8 labels + blank (last),
    uniform [0, 1) logits, sigma 0.05, reduction 'sum'; NeMo checks its CUDA kernel against TDTLossPytorch."""
    rng = np.random.default_rng(13)
    logits = rng.uniform(0, 1, (4, 8, 4, 9 + len(durations))).astype(np.float32)
    targets = rng.integers(0, 8, (4, 3))
    lengths = (np.full(4, 8), np.full(4, 3))
    costs, grads = run_kernels(logits, targets, *lengths, durations, 8, sigma=0.05)
    ref_cost, ref_grads = tdt_loss_reference(logits, targets, *lengths, durations, blank=8, sigma=0.05,
                                             reduction="sum")
    np.testing.assert_allclose(costs.sum(), ref_cost, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-6)


@pytest.mark.parametrize("durations", [(0, 1, 2, 3, 4), (0, 2), (1, 3), (0, 1, 9), (2,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_on_long_label_sequences(durations, dtype):
    """U+1 = 41 rows a frame: the kernels' loops over the rows of a frame or of an anti-diagonal run their
    vectorised bodies (the property test's U <= 4 stays in their remainders). Peaked logits give posteriors
    from about 1 to far below 1e-30; the lengths vary, one utterance is shorter than the longest duration,
    and without duration 0 (or with only 2) some utterances have no alignment (inf cost, zero gradient)."""
    rng = np.random.default_rng(len(durations) + 10 * max(durations))
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 5, 44, 40, 6, durations, dtype=dtype,
                                                                 scale=5.0)
    logit_lengths[:], target_lengths[:] = [44, 43, 3, 40, 30], [40, 40, 2, 10, 0]
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 1, sigma=0.05,
                               fastemit_lambda=0.01, grad_scale=np.linspace(0.5, 2, 5))
    ref_costs, ref_grads = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, durations, blank=1,
                                              sigma=0.05, fastemit_lambda=0.01, reduction="none")
    f64 = dtype == np.float64
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-12 if f64 else 1e-6)
    expected = ref_grads * np.linspace(0.5, 2, 5)[:, None, None, None]
    np.testing.assert_allclose(grads, expected, rtol=1e-10 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)
    assert np.isfinite(costs).sum() >= 2 and np.abs(grads).max() > 0.1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_with_cells_far_from_their_neighbours(dtype):
    """Logits of scale 400: neighbouring lattice cells differ by thousands, so the lattice passes' guessed shifts
    (a cell's neighbours) are far from the cells' terms (their sums of exps overflow or vanish) and those
    anti-diagonals are summed again with the exact maxima; posteriors from 1 down to 0."""
    rng = np.random.default_rng(21)
    durations = (0, 1, 2, 3, 4)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 30, 20, 5, durations, dtype=dtype,
                                                                 scale=400.0)
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 0, sigma=0.05)
    ref_costs, ref_grads = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, durations, blank=0,
                                              sigma=0.05, reduction="none")
    f64 = dtype == np.float64
    assert ref_costs.max() > 5000
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-12 if f64 else 1e-6)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-10 if f64 else 1e-5, atol=1e-12 if f64 else 1e-6)


def test_label_head_only_kernels_are_the_rnnt_kernels_bit_for_bit():
    rng = np.random.default_rng(5)
    durations = (0, 1, 2, 3, 4)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 9, 4, 6, durations)
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 2, sigma=0.05,
                               fastemit_lambda=0.1, clamp=0.2, label_head_only=True)
    label_part = np.ascontiguousarray(logits[..., :6])
    rnnt_costs = np.empty(3, np.float32)
    residuals = cpu.allocate_residuals(3, 9, 5, np.float32)
    cpu.forward(label_part, targets, logit_lengths, target_lengths, 2, True, 0.1, rnnt_costs, residuals)
    rnnt_grads = np.empty_like(label_part)
    cpu.backward(label_part, targets, logit_lengths, target_lengths, 2, True, 0.1, 0.2, np.ones(3), residuals,
                 rnnt_grads)
    assert np.array_equal(costs, rnnt_costs) and np.array_equal(grads[..., :6], rnnt_grads)
    assert not grads[..., 6:].any()


def test_padding_gets_exactly_zero_gradient():
    rng = np.random.default_rng(6)
    durations = (0, 1, 2, 3, 4)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 4, 8, 5, 7, durations)
    logit_lengths[1:], target_lengths[1:] = [3, 8, 1], [2, 0, 5]
    _, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 0, sigma=0.05)
    for b in range(4):
        assert not grads[b, logit_lengths[b]:].any() and not grads[b, :, target_lengths[b] + 1:].any()
        assert np.abs(grads[b, :logit_lengths[b], :target_lengths[b] + 1]).min(axis=-1).max() > 0


def test_utterance_without_alignment_costs_inf_with_zero_gradient():
    rng = np.random.default_rng(8)
    logits, targets, _, _ = tdt_problem(rng, 2, 3, 1, 4, (2,))
    costs, grads = run_kernels(logits, targets, np.array([3, 2]), np.array([0, 0]), (2,), 0)
    assert costs[0] == np.inf and not grads[0].any()
    assert np.isfinite(costs[1]) and grads[1, :2, 0].any()


@pytest.mark.parametrize("offset", [1e5, -1e5, 1e3])
def test_float32_logits_far_from_zero(offset):
    """A common offset of the label part and of the duration part changes neither costs nor gradients (the
    log-probabilities are taken as (x - shift) - log_sum in float64, as in cpu)."""
    rng = np.random.default_rng(9)
    durations = (0, 1, 2, 3, 4)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 10, 4, 20, durations)
    shifted = (logits.astype(np.float64) + offset).astype(np.float32)  # exactly representable differences
    ref_costs, ref_grads = tdt_loss_reference(shifted.astype(np.float64) - offset, targets, logit_lengths,
                                              target_lengths, durations, blank=0, sigma=0.05, reduction="none")
    costs, grads = run_kernels(shifted, targets, logit_lengths, target_lengths, durations, 0, sigma=0.05)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-6)


def test_masked_entries_and_nan():
    """-inf label entries and durations (masked) get zero probability and zero gradient; a NaN logit makes its
    utterance's cost NaN and leaves the others alone."""
    rng = np.random.default_rng(12)
    durations = (0, 1, 2, 3)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 6, 3, 8, durations)
    targets[:, :3] = np.where(targets[:, :3] == 7, 1, targets[:, :3])
    target_lengths[:] = 3
    logits[..., 7] = -np.inf  # a label never used
    logits[..., 8 + 2] = -np.inf  # duration 2 masked
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 0, sigma=0.05)
    ref_costs, ref_grads = tdt_loss_reference(logits, targets, logit_lengths, target_lengths, durations, blank=0,
                                              sigma=0.05, reduction="none")
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-6)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-6)
    assert not grads[..., 7].any() and not grads[..., 10].any() and np.isfinite(grads).all()
    logits[1, 0, 0, 3] = np.nan
    costs, grads = run_kernels(logits, targets, logit_lengths, target_lengths, durations, 0, sigma=0.05)
    assert np.isnan(costs[1]) and np.allclose(costs[[0, 2]], ref_costs[[0, 2]], rtol=1e-6)


@pytest.mark.parametrize("half, eps", [(np.float16, 2.0**-11), (ml_dtypes.bfloat16, 2.0**-8)])
def test_16_bit_logits(half, eps):
    """Read as 16 bits, computed in float32, gradients written in 16 bits: only that rounding differs."""
    rng = np.random.default_rng(10)
    durations = (0, 1, 2, 3)
    logits, targets, logit_lengths, target_lengths = tdt_problem(rng, 3, 7, 3, 9, durations)
    logits16 = logits.astype(half)
    costs, grads = run_kernels(logits16, targets, logit_lengths, target_lengths, durations, 1, sigma=0.05,
                               clamp=0.3)
    assert costs.dtype == np.float32 and grads.dtype == logits16.dtype
    ref_costs, ref_grads = tdt_loss_reference(logits16.astype(np.float64), targets, logit_lengths, target_lengths,
                                              durations, blank=1, sigma=0.05, clamp=0.3, reduction="none")
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    grads = grads.astype(np.float64)
    assert np.all(np.abs(grads - ref_grads) <= eps * np.abs(ref_grads) + 1e-6)


@pytest.mark.parametrize("label_head_only", [False, True])
def test_serial_and_parallel_kernels_give_the_same_bits(monkeypatch, label_head_only):
    rng = np.random.default_rng(11)
    durations = (0, 1, 2, 3, 4)
    problem = tdt_problem(rng, 4, 12, 5, 33, durations)
    results = []
    for count in (1, 2):
        monkeypatch.setattr(cpu, "_rows", lambda array, count=count: count)
        monkeypatch.setattr(cpu, "_cells", lambda array, count=count: count)
        results.append(run_kernels(*problem, durations, 3, sigma=0.05, fastemit_lambda=0.01,
                                   label_head_only=label_head_only))
    (costs1, grads1), (costs2, grads2) = results
    assert np.array_equal(costs1, costs2) and np.array_equal(grads1, grads2)


def test_residual_shapes_do_not_depend_on_the_mode():
    shapes = cpu_tdt.residual_shapes(2, 5, 4, 3, np.dtype(np.float16))
    assert [s for s, _ in shapes] == [(2, 5, 4), (2, 5, 4), (2, 5, 4), (2, 5, 4, 3), (2, 5, 4), (2,)]
    assert shapes.log_norm[1] == np.float32 and all(dt == np.float64 for _, dt in shapes[1:])
