"""k2's variants of the RNNT loss, ``rnnt_type='modified'|'constrained'`` and ``delay_penalty``: the float64
reference against finite differences and against k2's formulas, and the CPU kernels against the reference.

k2's tests (k2/python/tests/rnnt_loss_test.py) publish no numbers: they compare k2's implementations with
each other. The known answers here are therefore a plain torch implementation written below from k2's own
formulas (``get_rnnt_logprobs_joint``, the delay penalty of ``rnnt_loss`` and the recursion of
``mutual_information_recursion``, k2/python/k2/rnnt_loss.py and mutual_information.py), differentiated by
autograd, on k2's ``test_rnnt_loss_basic`` input and on random variable-length batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Problem, random_problem
from rnnt_xla.kernels import cpu, threads
from rnnt_xla.reference import log_softmax, rnnt_loss_reference, rnnt_variant_loss_reference

TYPES = ("regular", "modified", "constrained")


def k2_formula_loss(logits, targets, logit_lengths, target_lengths, blank, rnnt_type, delay_penalty):
    """Costs ``(B,)`` and autograd gradient of their sum w.r.t. ``logits`` (float64 torch), written from k2.

    Per utterance (k2 with ``boundary = [0, 0, U_b, T_b]``): ``px[s, t]`` the label log-probability of
    ``y_s`` at frame ``t`` (``[S][T+1]`` with a last column of ``-inf`` for "regular", ``[S][T]`` otherwise),
    ``py[s, t]`` the blank's; "constrained": ``px += py[1:]``; delay penalty ``px += delay_penalty *
    ((T_b - 1) / 2 - t)``; ``p[0, 0] = 0``, ``p[s, t] = logaddexp(p[s-1, t(-1)] + px[s-1, t(-1)],
    p[s, t-1] + py[s, t-1])``; ``cost = -p[S, T]``.
    """
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    costs = []
    for b in range(x.shape[0]):
        T, S = int(logit_lengths[b]), int(target_lengths[b])
        lg = x[b, :T, : S + 1]  # (T, S+1, C)
        normalizers = torch.logsumexp(lg, dim=2).T  # (S+1, T)
        symbols = torch.as_tensor(np.asarray(targets[b, :S], np.int64))
        px = lg[:, :S].gather(2, symbols.reshape(1, S, 1).expand(T, S, 1)).squeeze(-1).T - normalizers[:S]
        py = lg[:, :, blank].T - normalizers
        if rnnt_type == "regular":
            px = torch.cat([px, torch.full((S, 1), -math.inf, dtype=px.dtype)], dim=1)
        elif rnnt_type == "constrained":
            px = px + py[1:]
        if delay_penalty != 0:
            px = px + delay_penalty * ((T - 1) / 2 - torch.arange(px.shape[1], dtype=px.dtype))
        p = [[None] * (T + 1) for _ in range(S + 1)]
        for s in range(S + 1):
            for t in range(T + 1):
                if s == 0 and t == 0:
                    p[s][t] = torch.zeros((), dtype=px.dtype)
                    continue
                terms = []  # unreachable states stay None (a logsumexp of -inf has a NaN gradient)
                if t > 0 and p[s][t - 1] is not None:
                    terms.append(p[s][t - 1] + py[s, t - 1])
                if s > 0 and rnnt_type == "regular" and p[s - 1][t] is not None:
                    terms.append(p[s - 1][t] + px[s - 1, t])
                if s > 0 and rnnt_type != "regular" and t > 0 and p[s - 1][t - 1] is not None:
                    terms.append(p[s - 1][t - 1] + px[s - 1, t - 1])
                p[s][t] = torch.logsumexp(torch.stack(terms), 0) if terms else None
        costs.append(-p[S][T])
    costs = torch.stack(costs)
    costs.sum().backward()
    return costs.detach().numpy(), x.grad.numpy()


# k2's test_rnnt_loss_basic (k2/python/tests/rnnt_loss_test.py): B=1, S=3, T=4, C=3, termination_symbol 2,
# symbols [0, 1, 0]; the joiner is lm[s] + am[t].
K2_LM = np.array([[[0, 0, 1], [0, 1, 1], [1, 0, 1], [2, 2, 0]]], np.float64)
K2_AM = np.array([[[0, 1, 2], [0, 0, 0], [0, 2, 4], [0, 3, 3]]], np.float64)
K2_LOGITS = K2_AM[:, :, None, :] + K2_LM[:, None, :, :]  # (1, 4, 4, 3)
K2_SYMBOLS = np.array([[0, 1, 0]])


@pytest.mark.parametrize("rnnt_type", TYPES)
@pytest.mark.parametrize("delay_penalty", [0.0, 0.25])
def test_reference_matches_k2_formulas_on_k2s_basic_case(rnnt_type, delay_penalty):
    lengths = np.array([4]), np.array([3])
    costs, grad = rnnt_variant_loss_reference(K2_LOGITS, K2_SYMBOLS, *lengths, blank=2, reduction="none",
                                              rnnt_type=rnnt_type, delay_penalty=delay_penalty)
    k2_costs, k2_grad = k2_formula_loss(K2_LOGITS, K2_SYMBOLS, *lengths, 2, rnnt_type, delay_penalty)
    np.testing.assert_allclose(costs, k2_costs, rtol=1e-12)
    np.testing.assert_allclose(grad, k2_grad, atol=1e-12)


def test_variants_differ_on_k2s_basic_case():
    """The three lattices and the penalty really change the loss (a test of the test above)."""
    lengths = np.array([4]), np.array([3])
    costs = {(r, d): float(rnnt_variant_loss_reference(K2_LOGITS, K2_SYMBOLS, *lengths, blank=2, reduction="sum",
                                                       rnnt_type=r, delay_penalty=d)[0])
             for r in TYPES for d in (0.0, 0.25)}
    assert len({round(c, 9) for c in costs.values()}) == len(costs)


def _variable_batch(seed, B, T, U, V, min_frames_per_label: bool, dtype=np.float64):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, B, T, U, V, dtype=dtype, blank=int(rng.integers(0, V)), extra_target_columns=1)
    if min_frames_per_label:  # modified/constrained need T_b >= U_b
        p.target_lengths = np.minimum(p.target_lengths, p.logit_lengths)
        for b in range(B):
            p.targets[b, p.target_lengths[b]:] = -1
    return p


@pytest.mark.parametrize("rnnt_type", TYPES)
@pytest.mark.parametrize("delay_penalty", [0.0, 0.5, -0.3])
def test_reference_matches_k2_formulas_on_random_batches(rnnt_type, delay_penalty):
    p = _variable_batch(3, 3, 6, 4, 5, rnnt_type != "regular")
    costs, grad = rnnt_variant_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=p.blank,
                                              reduction="none", rnnt_type=rnnt_type, delay_penalty=delay_penalty)
    k2_costs, k2_grad = k2_formula_loss(p.logits, p.targets, p.logit_lengths, p.target_lengths, p.blank, rnnt_type,
                                        delay_penalty)
    np.testing.assert_allclose(costs, k2_costs, rtol=1e-12)
    np.testing.assert_allclose(grad, k2_grad, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_regular_without_penalty_is_the_rnnt_reference(fused):
    p = _variable_batch(4, 4, 7, 5, 6, False)
    if not fused:
        p.logits = log_softmax(p.logits)
    options = dict(blank=p.blank, clamp=0.3, reduction="mean_by_target_length", fused_log_softmax=fused,
                   fastemit_lambda=0.1)
    args = (p.logits, p.targets, p.logit_lengths, p.target_lengths)
    for got, want in zip(rnnt_variant_loss_reference(*args, **options), rnnt_loss_reference(*args, **options)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("rnnt_type", TYPES)
@pytest.mark.parametrize("fused", [True, False])
def test_reference_gradient_matches_finite_differences(rnnt_type, fused):
    p = _variable_batch(5, 2, 5, 3, 4, rnnt_type != "regular")
    if not fused:
        p.logits = log_softmax(p.logits)
    args = (p.targets, p.logit_lengths, p.target_lengths)
    options = dict(blank=p.blank, reduction="sum", fused_log_softmax=fused, rnnt_type=rnnt_type, delay_penalty=0.4)
    _, grad = rnnt_variant_loss_reference(p.logits, *args, **options)
    h = 1e-6
    numeric = np.zeros_like(p.logits)
    for i in np.ndindex(p.logits.shape):
        x = p.logits.copy()
        x[i] += h
        up = rnnt_variant_loss_reference(x, *args, **options)[0]
        x[i] -= 2 * h
        numeric[i] = (up - rnnt_variant_loss_reference(x, *args, **options)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    assert np.abs(grad).max() > 0.01


def test_modified_one_label_per_frame():
    """With T_b = U_b every frame emits exactly one label (nothing else can consume it): log P is the sum of
    the labels' log-probabilities on the diagonal (plus, for "constrained", the next context's blanks)."""
    p = _variable_batch(6, 1, 4, 4, 5, True)
    p.logit_lengths[:], p.target_lengths[:] = 4, 4
    lp = log_softmax(p.logits[0])
    y = p.targets[0]
    diagonal = sum(lp[t, t, y[t]] for t in range(4))
    args = (p.logits, p.targets, p.logit_lengths, p.target_lengths)
    cost = rnnt_variant_loss_reference(*args, blank=p.blank, reduction="sum", rnnt_type="modified")[0]
    np.testing.assert_allclose(cost, -diagonal, rtol=1e-13)
    cost = rnnt_variant_loss_reference(*args, blank=p.blank, reduction="sum", rnnt_type="constrained")[0]
    np.testing.assert_allclose(cost, -diagonal - sum(lp[t, t + 1, p.blank] for t in range(4)), rtol=1e-13)


# ---- the CPU kernels -------------------------------------------------------------------------------------


def run_kernels(p, *, fused=True, fastemit_lambda=0.0, clamp=-1.0, grad_scale=None, rnnt_type="regular",
                delay_penalty=0.0):
    B, T, U1, V = p.logits.shape
    idx = [np.ascontiguousarray(a, dtype=np.int64) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    residuals = cpu.allocate_residuals(B, T, U1, p.logits.dtype)
    costs = np.empty(B, cpu.compute_dtype(p.logits.dtype))
    cpu.forward(cpu.as_kernel_array(p.logits), *idx, p.blank % V, fused, fastemit_lambda, costs, residuals,
                rnnt_type=rnnt_type, delay_penalty=delay_penalty)
    grads = np.full_like(p.logits, np.nan)  # every entry must be written, padding included
    scale = np.ones(B) if grad_scale is None else grad_scale
    cpu.backward(cpu.as_kernel_array(p.logits), *idx, p.blank % V, fused, fastemit_lambda, clamp, scale, residuals,
                 cpu.as_kernel_array(grads), rnnt_type=rnnt_type, delay_penalty=delay_penalty)
    return costs, grads


@st.composite
def variant_problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 10))
    U = draw(st.integers(0, 6))
    V = draw(st.integers(2, 10))
    rnnt_type = draw(st.sampled_from(TYPES))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = rng.standard_normal((B, T, U + 1, V)) * scale
    logit_lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), np.int64)
    target_lengths = np.array(draw(st.lists(st.integers(0, U), min_size=B, max_size=B)), np.int64)
    if rnnt_type != "regular":
        target_lengths = np.minimum(target_lengths, logit_lengths)
    targets = rng.integers(0, V, size=(B, U + draw(st.integers(0, 2))))
    for b in range(B):
        targets[b, target_lengths[b]:] = draw(st.sampled_from([-1, V, 999]))
    options = dict(
        fused=draw(st.booleans()),
        clamp=draw(st.sampled_from([-1.0, 0.0, 0.01, 0.3])),
        fastemit_lambda=draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
        rnnt_type=rnnt_type,
        delay_penalty=draw(st.sampled_from([0.0, 0.0, 0.1, -0.2, 2.0])),
    )
    if not options["fused"]:
        logits = log_softmax(logits)
    return Problem(logits.astype(dtype), targets, logit_lengths, target_lengths, draw(st.integers(-V, V - 1))), options


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(variant_problems())
def test_kernels_match_the_reference(case):
    p, options = case
    costs, grads = run_kernels(p, **options)
    ref_costs, ref_grads = rnnt_variant_loss_reference(
        p.logits, p.targets, p.logit_lengths, p.target_lengths, blank=p.blank, clamp=options["clamp"],
        reduction="none", fused_log_softmax=options["fused"], fastemit_lambda=options["fastemit_lambda"],
        rnnt_type=options["rnnt_type"], delay_penalty=options["delay_penalty"])
    single = p.logits.dtype == np.float32
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5 if single else 1e-11, atol=1e-5 if single else 1e-11)
    np.testing.assert_allclose(grads, ref_grads, atol=3e-5 if single else 1e-11, rtol=0)


@pytest.mark.parametrize("rnnt_type", TYPES)
def test_larger_batch_float32_and_float64(rnnt_type):
    """A batch big enough for the parallel kernels, with padding: float64 to 1e-11, float32 to float32."""
    for dtype, cost_rtol, grad_atol in ((np.float64, 1e-11, 1e-11), (np.float32, 1e-5, 1e-5)):
        q = _variable_batch(11, 6, 40, 12, 33, rnnt_type != "regular", dtype)
        scale = np.linspace(0.5, 2.0, 6)
        costs, grads = run_kernels(q, fastemit_lambda=0.01, clamp=0.2, grad_scale=scale, rnnt_type=rnnt_type,
                                   delay_penalty=0.05)
        ref_costs, ref_grads = rnnt_variant_loss_reference(q.logits, q.targets, q.logit_lengths,
                                                           q.target_lengths, blank=q.blank, clamp=0.2,
                                                           reduction="none", fastemit_lambda=0.01,
                                                           rnnt_type=rnnt_type, delay_penalty=0.05)
        np.testing.assert_allclose(costs, ref_costs, rtol=cost_rtol)
        np.testing.assert_allclose(grads, ref_grads * scale[:, None, None, None], atol=grad_atol, rtol=0)
        for b in range(6):  # padding: exactly zero
            T_b, U_b = q.logit_lengths[b], q.target_lengths[b]
            assert not grads[b, T_b:].any() and not grads[b, :, U_b + 1:].any()


@pytest.mark.parametrize("rnnt_type", TYPES)
@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_extreme_logits(rnnt_type, offset):
    """Large common offsets and wide ranges: the row normalisers are the regular ones, so as exact."""
    p = _variable_batch(12, 3, 9, 4, 7, rnnt_type != "regular", np.float32)
    p.logits = (p.logits * 30 + offset).astype(np.float32)
    costs, grads = run_kernels(p, rnnt_type=rnnt_type, delay_penalty=0.3)
    ref_costs, ref_grads = rnnt_variant_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                       blank=p.blank, reduction="none", rnnt_type=rnnt_type,
                                                       delay_penalty=0.3)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-4, rtol=0)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_sixteen_bit_logits(half):
    """16-bit logits: computed in float32, gradient rounded once to 16 bits."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype, eps = (np.float16, 2.0**-11) if half == "float16" else (ml_dtypes.bfloat16, 2.0**-8)
    p = _variable_batch(13, 3, 12, 5, 9, True, np.float32)
    p.logits = p.logits.astype(dtype)
    costs, grads = run_kernels(p, rnnt_type="constrained", delay_penalty=0.1, fastemit_lambda=0.01)
    assert costs.dtype == np.float32 and grads.dtype == dtype
    ref_costs, ref_grads = rnnt_variant_loss_reference(p.logits.astype(np.float64), p.targets, p.logit_lengths,
                                                       p.target_lengths, blank=p.blank, reduction="none",
                                                       fastemit_lambda=0.01, rnnt_type="constrained",
                                                       delay_penalty=0.1)
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    g = grads.astype(np.float64)
    assert np.all(np.abs(g - ref_grads) <= eps * np.abs(ref_grads) + 1e-6)


@pytest.mark.parametrize("rnnt_type", TYPES)
def test_serial_and_parallel_kernels_give_identical_bits(monkeypatch, rnnt_type):
    p = _variable_batch(14, 5, 23, 7, 37, rnnt_type != "regular", np.float32)
    scale = np.linspace(0.5, 2.0, 5)
    out = {}
    for name, minimum in (("serial", 10**15), ("parallel", 0)):
        monkeypatch.setattr(threads, "PARALLEL_MIN_ELEMENTS", minimum)
        monkeypatch.setattr(threads, "PARALLEL_MIN_CELLS", minimum)
        out[name] = run_kernels(p, fastemit_lambda=0.05, clamp=0.2, grad_scale=scale, rnnt_type=rnnt_type,
                                delay_penalty=0.1)
    for a, b in zip(out["serial"], out["parallel"]):
        np.testing.assert_array_equal(a, b)


def test_modified_without_a_path_costs_infinity():
    """T_b < U_b has no modified path (the adapters reject it); the kernels give +inf, no crash."""
    p = _variable_batch(15, 2, 3, 5, 6, False)
    p.logit_lengths[:] = (3, 3)
    p.target_lengths[:] = (5, 2)
    costs, _ = run_kernels(p, rnnt_type="modified")
    assert costs[0] == np.inf and np.isfinite(costs[1])


def test_regular_arguments_run_the_regular_kernels(monkeypatch):
    """rnnt_type='regular' without penalty keeps the regular (faster) kernels; anything else the variants'."""
    p = _variable_batch(16, 4, 20, 6, 30, False, np.float32)
    calls = []
    for name in ("_variant_forward", "_variant_backward"):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    regular = run_kernels(p)
    assert calls == []
    variant = run_kernels(p, delay_penalty=1e-300)  # a penalty too small to change a bit, but a variant
    assert calls == ["_variant_forward", "_variant_backward"]
    # the variant kernels do the regular lattice's arithmetic in the same order: the same bits
    np.testing.assert_array_equal(variant[0], regular[0])
    np.testing.assert_array_equal(variant[1], regular[1])


@pytest.mark.parametrize("rnnt_type", TYPES)
def test_nan_and_masked_entries(rnnt_type):
    """A NaN logit makes only its utterance's cost NaN; a masked (-inf) entry gets zero gradient."""
    p = _variable_batch(17, 3, 8, 3, 10, rnnt_type != "regular", np.float32)
    p.logit_lengths[:] = 8
    p.logits[1, 0, 0, 4] = np.nan
    p.logits[2, :, :, (p.blank + 1) % 10] = -np.inf
    p.targets[2, : p.target_lengths[2]] = (p.blank + 2) % 10
    costs, grads = run_kernels(p, rnnt_type=rnnt_type, delay_penalty=0.1)
    assert np.isnan(costs[1]) and np.isfinite(costs[[0, 2]]).all()
    assert (grads[2, ..., (p.blank + 1) % 10] == 0).all()
    keep = [0, 2]
    ref_costs, ref_grads = rnnt_variant_loss_reference(p.logits[keep], p.targets[keep], p.logit_lengths[keep],
                                                       p.target_lengths[keep], blank=p.blank, reduction="none",
                                                       rnnt_type=rnnt_type, delay_penalty=0.1)
    np.testing.assert_allclose(costs[keep], ref_costs, rtol=1e-5)
    np.testing.assert_allclose(grads[keep], ref_grads, atol=2e-5, rtol=0)


# ---- through the adapters (rnnt_xla.torch / rnnt_xla.jax .rnnt_loss(rnnt_type=, delay_penalty=)) ----------



def _torch_loss_and_grad(logits, p, **options):
    from rnnt_xla.torch import rnnt_loss

    x = torch.tensor(logits, requires_grad=True)
    loss = rnnt_loss(x, *(torch.from_numpy(a) for a in (p.targets, p.logit_lengths, p.target_lengths)), **options)
    loss.sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("rnnt_type", TYPES)
@pytest.mark.parametrize("options", [dict(reduction="none", delay_penalty=0.1),
                                     dict(reduction="mean", fastemit_lambda=0.01, clamp=0.05),
                                     dict(reduction="mean_by_target_length", delay_penalty=-0.05,
                                          fused_log_softmax=False)])
def test_adapters_bit_identical_and_match_the_reference(rnnt_type, options):
    """torch and JAX (under jit, value and grad) give the same bits, and the float64 reference's values."""
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import rnnt_loss as jax_loss

    p = _variable_batch(23, 4, 11, 4, 13, True, np.float32)
    if not options.get("fused_log_softmax", True):
        p.logits = log_softmax(p.logits).astype(np.float32)
    options = dict(options, rnnt_type=rnnt_type, blank=p.blank)
    loss, grad = _torch_loss_and_grad(p.logits, p, **options)
    index = [jax.numpy.asarray(a) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    jax_grad = jax.jit(jax.grad(lambda x: jax_loss(x, *index, **options).sum()))(jax.numpy.asarray(p.logits))
    jax_costs = jax.jit(lambda x: jax_loss(x, *index, **options))(jax.numpy.asarray(p.logits))
    np.testing.assert_array_equal(np.asarray(jax_costs), loss)
    np.testing.assert_array_equal(np.asarray(jax_grad), grad)
    ref_loss, ref_grad = rnnt_variant_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                     **options)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-5, rtol=0)


@pytest.mark.parametrize("rnnt_type", ["modified", "constrained"])
def test_adapters_float64_match_the_reference(rnnt_type):
    p = _variable_batch(24, 3, 9, 4, 10, True)
    options = dict(blank=p.blank, reduction="sum", rnnt_type=rnnt_type, delay_penalty=0.2)
    loss, grad = _torch_loss_and_grad(p.logits, p, **options)
    ref_loss, ref_grad = rnnt_variant_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                     **options)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-12)


def test_adapters_vmap():
    """jax.vmap and torch.func.vmap over groups of batches: each group's loss and gradient, bit for bit."""
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import rnnt_loss as jax_loss
    from rnnt_xla.torch import rnnt_loss as torch_loss

    groups = [_variable_batch(40 + g, 2, 8, 3, 9, True, np.float32) for g in range(3)]
    for p in groups:
        p.blank = 0
    stack = {name: np.stack([getattr(p, name) for p in groups])
             for name in ("logits", "targets", "logit_lengths", "target_lengths")}
    options = dict(blank=0, reduction="mean", rnnt_type="constrained", delay_penalty=0.1)

    def one(x, targets, frames, labels):
        return jax_loss(x, targets, frames, labels, **options)

    arrays = [jax.numpy.asarray(stack[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    losses, grads = jax.vmap(jax.value_and_grad(one))(*arrays)
    tensors = [torch.from_numpy(stack[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    torch_grads, torch_losses = torch.func.vmap(torch.func.grad_and_value(
        lambda x, *index: torch_loss(x, *index, **options)))(*tensors)
    for g, p in enumerate(groups):
        loss, grad = _torch_loss_and_grad(stack["logits"][g], p, **options)
        np.testing.assert_array_equal(np.asarray(losses[g]), loss)
        np.testing.assert_array_equal(np.asarray(grads[g]), grad)
        np.testing.assert_array_equal(torch_losses[g].numpy(), loss)
        np.testing.assert_array_equal(torch_grads[g].numpy(), grad)


@pytest.mark.parametrize("adapter", ["torch", "jax"])
def test_adapters_reject_fewer_frames_than_labels(adapter):
    p = _variable_batch(25, 2, 3, 5, 6, False, np.float32)
    p.logit_lengths[:] = (3, 3)
    p.target_lengths[:] = (5, 2)
    if adapter == "torch":
        from rnnt_xla.torch import rnnt_loss

        args = [torch.from_numpy(a) for a in (p.logits, p.targets, p.logit_lengths, p.target_lengths)]
    else:
        jax = pytest.importorskip("jax")
        from rnnt_xla.jax import rnnt_loss

        args = [jax.numpy.asarray(a) for a in (p.logits, p.targets, p.logit_lengths, p.target_lengths)]
    with pytest.raises(ValueError, match="target_lengths|logit_lengths"):
        rnnt_loss(*args, rnnt_type="modified")
    rnnt_loss(*args, rnnt_type="regular")  # the regular lattice has paths
