"""Multi-blank RNNT (Xu et al., 2022): the float64 reference against finite differences and NeMo's pure
torch loss, and the CPU kernels (rnnt_xla.kernels.cpu_multiblank) against the reference.

NeMo's multi-blank known-answer test, ``TestMultiblankRNNTLoss.test_case_randomized_act_label``
(tests/collections/asr/numba/rnnt_loss/test_rnnt_pytorch.py), checks its CUDA kernels against its plain
torch ``MultiblankRNNTLossPytorch`` (nemo/collections/asr/losses/rnnt_pytorch.py) on random activations
(B=4, T=8, U=4, V=8 labels, big blanks [2, 4, 8], sigma 0.1, blank = V + 3, reduction 'sum'); it has no
fixed numbers. :func:`nemo_pytorch_loss` below is that torch loss's recursion (written out per utterance,
differentiated by autograd), and the test runs NeMo's case against it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Problem, random_problem
from rnnt_xla.kernels import cpu, cpu_multiblank, threads
from rnnt_xla.reference import multiblank_rnnt_loss_reference


def nemo_pytorch_loss(acts, labels, act_lens, label_lens, blank, big_blank_durations, sigma):
    """Costs ``(B,)`` and the autograd gradient of their sum, with ``MultiblankRNNTLossPytorch``'s
    recursion: ``log_alpha[t, u] = logsumexp(log_alpha[t-1, u] + lp[t-1, u, blank], log_alpha[t, u-1] +
    lp[t, u-1, y_u], log_alpha[t-d_i, u] + lp[t-d_i, u, blank-1-i] for t >= d_i)``, ``lp =
    log_softmax(acts) - sigma``; the final log-probability adds the blank at ``(T-1, U)`` and each big blank
    at ``(T-d_i, U)`` with ``T >= d_i``."""
    x = torch.tensor(np.asarray(acts, np.float64), requires_grad=True)
    lp = torch.log_softmax(x, -1) - sigma
    costs = []
    for b in range(x.shape[0]):
        T, U = int(act_lens[b]), int(label_lens[b]) + 1
        y = [int(k) for k in labels[b, : U - 1]]
        alpha = {}
        for t in range(T):
            for u in range(U):
                terms = []
                if t == 0 and u == 0:
                    terms.append(torch.zeros((), dtype=lp.dtype))
                if t > 0:
                    terms.append(alpha[t - 1, u] + lp[b, t - 1, u, blank])
                if u > 0:
                    terms.append(alpha[t, u - 1] + lp[b, t, u - 1, y[u - 1]])
                for i, d in enumerate(big_blank_durations):
                    if t >= d:
                        terms.append(alpha[t - d, u] + lp[b, t - d, u, blank - 1 - i])
                alpha[t, u] = torch.logsumexp(torch.stack(terms), 0)
        final = [alpha[T - 1, U - 1] + lp[b, T - 1, U - 1, blank]]
        for i, d in enumerate(big_blank_durations):
            if T >= d:
                final.append(alpha[T - d, U - 1] + lp[b, T - d, U - 1, blank - 1 - i])
        costs.append(-torch.logsumexp(torch.stack(final), 0))
    costs = torch.stack(costs)
    costs.sum().backward()
    return costs.detach().numpy(), x.grad.numpy()


def test_nemo_randomized_act_label_case():
    """NeMo's TestMultiblankRNNTLoss.test_case_randomized_act_label (see the module docstring), with its
    shapes, durations, sigma and blank, full lengths, torch.rand activations."""
    torch.manual_seed(0)
    B, T, U, V = 4, 8, 4, 8
    durations = [2, 4, 8]
    acts = torch.rand([B, T, U, V + 1 + len(durations)]).numpy().astype(np.float64)
    labels = np.random.default_rng(0).integers(0, V, size=(B, U - 1))
    lengths = np.full(B, T), np.full(B, U - 1)
    blank = V + len(durations)
    nemo_costs, nemo_grads = nemo_pytorch_loss(acts, labels, *lengths, blank, durations, 0.1)
    loss, grad = multiblank_rnnt_loss_reference(acts, labels, *lengths, durations, blank=blank, sigma=0.1,
                                                reduction="sum")
    np.testing.assert_allclose(loss, nemo_costs.sum(), rtol=1e-12)
    np.testing.assert_allclose(grad, nemo_grads, atol=1e-12)
    costs, grads = run_kernels(Problem(acts.astype(np.float32), labels, *lengths, blank), durations, sigma=0.1)
    np.testing.assert_allclose(costs, nemo_costs, rtol=1e-6)  # NeMo's own tolerance for the costs
    np.testing.assert_allclose(grads, nemo_grads, atol=1e-5)


@pytest.mark.parametrize("durations", [[2, 4, 8], [1, 3], [5], [2, 3, 4, 6, 9]])
def test_reference_matches_nemo_pytorch_with_variable_lengths(durations):
    """Lengths shorter than the padding, big blanks longer than some utterances, duration 1 at the end."""
    K = len(durations)
    p = random_problem(np.random.default_rng(K), 4, 9, 4, 6 + K, dtype=np.float64, blank=5 + K)
    p.logit_lengths[1] = 1
    costs, grad = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, durations,
                                                 blank=p.blank, sigma=0.05, reduction="none")
    nemo_costs, nemo_grads = nemo_pytorch_loss(p.logits, p.targets, p.logit_lengths, p.target_lengths, p.blank,
                                               durations, 0.05)
    np.testing.assert_allclose(costs, nemo_costs, rtol=1e-12)
    np.testing.assert_allclose(grad, nemo_grads, atol=1e-12)


def test_without_big_blanks_it_is_the_rnnt_loss():
    from rnnt_xla.reference import rnnt_loss_reference

    p = random_problem(np.random.default_rng(2), 3, 7, 4, 6, dtype=np.float64, blank=5)
    args = (p.logits, p.targets, p.logit_lengths, p.target_lengths)
    options = dict(blank=5, clamp=0.2, reduction="mean", fastemit_lambda=0.1)
    for got, want in zip(multiblank_rnnt_loss_reference(*args, [], **options), rnnt_loss_reference(*args, **options)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_reference_gradient_matches_finite_differences(sigma):
    p = random_problem(np.random.default_rng(3), 2, 6, 3, 7, dtype=np.float64, blank=6)
    args = (p.targets, p.logit_lengths, p.target_lengths, [2, 3])
    options = dict(blank=6, sigma=sigma, reduction="sum")
    _, grad = multiblank_rnnt_loss_reference(p.logits, *args, **options)
    h = 1e-6
    numeric = np.zeros_like(p.logits)
    for i in np.ndindex(p.logits.shape):
        x = p.logits.copy()
        x[i] += h
        up = multiblank_rnnt_loss_reference(x, *args, **options)[0]
        x[i] -= 2 * h
        numeric[i] = (up - multiblank_rnnt_loss_reference(x, *args, **options)[0]) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)
    assert np.abs(grad[..., 4:6]).max() > 0.01  # the big blanks get a gradient


def test_sigma_scales_the_probability_of_each_path():
    """T = 3 frames, one label, one big blank of duration 3 (entry 3, blank 4): the paths are the regular
    ones (3 blanks and the label: P_small, which is the loss without big blanks) and one more, the label at
    (0, 0) then the big blank from (0, 1) to the end (P_big). Sigma multiplies each path by
    exp(-sigma * arcs): P_sigma = exp(-2 sigma) P_big + exp(-4 sigma) P_small."""
    from rnnt_xla.reference import log_softmax

    p = random_problem(np.random.default_rng(4), 1, 3, 1, 5, dtype=np.float64, blank=4, variable_lengths=False)
    p.targets[0, 0] = 1
    args = (p.logits, p.targets, p.logit_lengths, p.target_lengths)
    lp = log_softmax(p.logits[0])
    p_big = np.exp(lp[0, 0, 1] + lp[0, 1, 3])
    p_small = np.exp(-float(multiblank_rnnt_loss_reference(*args, [], blank=4, reduction="sum")[0]))
    both = float(multiblank_rnnt_loss_reference(*args, [3], blank=4, reduction="sum")[0])
    np.testing.assert_allclose(both, -np.log(p_small + p_big), rtol=1e-13)
    cost = float(multiblank_rnnt_loss_reference(*args, [3], blank=4, sigma=0.2, reduction="sum")[0])
    np.testing.assert_allclose(cost, -np.log(np.exp(-0.4) * p_big + np.exp(-0.8) * p_small), rtol=1e-13)
    costs, _ = run_kernels(p, [3], sigma=0.2)
    np.testing.assert_allclose(costs, [cost], rtol=1e-13)


# ---- the CPU kernels -------------------------------------------------------------------------------------


def run_kernels(p, durations, *, sigma=0.0, fastemit_lambda=0.0, clamp=-1.0, grad_scale=None):
    B, T, U1, V = p.logits.shape
    K = len(durations)
    idx = [np.ascontiguousarray(a, dtype=np.int64) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    d = np.asarray(durations, np.int64)
    residuals = cpu_multiblank.allocate_residuals(B, T, U1, K, p.logits.dtype)
    costs = np.empty(B, cpu.compute_dtype(p.logits.dtype))
    logits = cpu.as_kernel_array(p.logits)
    cpu_multiblank.forward(logits, *idx, p.blank % V, d, sigma, fastemit_lambda, costs, residuals)
    grads = np.full_like(p.logits, np.nan)  # every entry must be written, padding included
    scale = np.ones(B) if grad_scale is None else grad_scale
    cpu_multiblank.backward(logits, *idx, p.blank % V, d, sigma, fastemit_lambda, clamp, scale, residuals,
                            cpu.as_kernel_array(grads))
    return costs, grads


@st.composite
def multiblank_problems(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 10))
    U = draw(st.integers(0, 5))
    # the order is the vocabulary's (not necessarily sorted) and a duration may repeat, as in NeMo; the kernels
    # sort the arcs by duration
    durations = draw(st.lists(st.integers(1, 11), min_size=0, max_size=4))
    K = len(durations)
    V = K + draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = (rng.standard_normal((B, T, U + 1, V)) * scale).astype(dtype)
    logit_lengths = np.array(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), np.int64)
    target_lengths = np.array(draw(st.lists(st.integers(0, U), min_size=B, max_size=B)), np.int64)
    targets = rng.integers(0, V, size=(B, U + draw(st.integers(0, 2))))  # labels may hit the blanks too
    for b in range(B):
        targets[b, target_lengths[b]:] = draw(st.sampled_from([-1, V, 999]))
    blank = draw(st.integers(K, V - 1))
    options = dict(
        sigma=draw(st.sampled_from([0.0, 0.05, 0.5])),
        clamp=draw(st.sampled_from([-1.0, 0.0, 0.01, 0.3])),
        fastemit_lambda=draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
    )
    return Problem(logits, targets, logit_lengths, target_lengths, blank), durations, options


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multiblank_problems())
def test_kernels_match_the_reference(case):
    p, durations, options = case
    costs, grads = run_kernels(p, durations, **options)
    ref_costs, ref_grads = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                          durations, blank=p.blank, reduction="none", **options)
    single = p.logits.dtype == np.float32
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5 if single else 1e-11, atol=1e-5 if single else 1e-11)
    np.testing.assert_allclose(grads, ref_grads, atol=3e-5 if single else 1e-11, rtol=0)


@pytest.mark.parametrize("dtype,cost_rtol,grad_atol", [(np.float64, 1e-11, 1e-11), (np.float32, 1e-5, 1e-5)])
def test_larger_batch(dtype, cost_rtol, grad_atol):
    """Big enough for the parallel kernels, with padding (exactly zero gradient there)."""
    p = random_problem(np.random.default_rng(5), 6, 40, 12, 36, dtype=dtype, blank=35)
    scale = np.linspace(0.5, 2.0, 6)
    options = dict(sigma=0.05, fastemit_lambda=0.01, clamp=0.2)
    costs, grads = run_kernels(p, [2, 4, 8], grad_scale=scale, **options)
    ref_costs, ref_grads = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                          [2, 4, 8], blank=35, reduction="none", **options)
    np.testing.assert_allclose(costs, ref_costs, rtol=cost_rtol)
    np.testing.assert_allclose(grads, ref_grads * scale[:, None, None, None], atol=grad_atol, rtol=0)
    for b in range(6):
        T_b, U_b = p.logit_lengths[b], p.target_lengths[b]
        assert not grads[b, T_b:].any() and not grads[b, :, U_b + 1:].any()


@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_extreme_logits(offset):
    p = random_problem(np.random.default_rng(6), 3, 9, 4, 10, dtype=np.float32, blank=9)
    p.logits = (p.logits * 15 + offset).astype(np.float32)
    p.logits[0, 2, 1, 9] = -np.inf  # a masked blank: its row's normaliser is summed again
    costs, grads = run_kernels(p, [2, 3], sigma=0.05)
    ref_costs, ref_grads = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                          [2, 3], blank=9, sigma=0.05, reduction="none")
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    np.testing.assert_allclose(grads, ref_grads, atol=1e-4, rtol=0)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_sixteen_bit_logits(half):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype, eps = (np.float16, 2.0**-11) if half == "float16" else (ml_dtypes.bfloat16, 2.0**-8)
    p = random_problem(np.random.default_rng(7), 3, 12, 5, 12, dtype=np.float32, blank=11)
    p.logits = p.logits.astype(dtype)
    costs, grads = run_kernels(p, [2, 4, 8], sigma=0.05, fastemit_lambda=0.01)
    assert costs.dtype == np.float32 and grads.dtype == dtype
    ref_costs, ref_grads = multiblank_rnnt_loss_reference(p.logits.astype(np.float64), p.targets, p.logit_lengths,
                                                          p.target_lengths, [2, 4, 8], blank=11, sigma=0.05,
                                                          fastemit_lambda=0.01, reduction="none")
    np.testing.assert_allclose(costs, ref_costs, rtol=1e-5)
    assert np.all(np.abs(grads.astype(np.float64) - ref_grads) <= eps * np.abs(ref_grads) + 1e-6)


def test_serial_and_parallel_kernels_give_identical_bits(monkeypatch):
    p = random_problem(np.random.default_rng(8), 5, 23, 7, 40, blank=39)
    scale = np.linspace(0.5, 2.0, 5)
    out = {}
    for name, minimum in (("serial", 10**15), ("parallel", 0)):
        monkeypatch.setattr(threads, "PARALLEL_MIN_ELEMENTS", minimum)
        monkeypatch.setattr(threads, "PARALLEL_MIN_CELLS", minimum)
        out[name] = run_kernels(p, [2, 4, 8], sigma=0.05, fastemit_lambda=0.05, clamp=0.2, grad_scale=scale)
    for a, b in zip(out["serial"], out["parallel"]):
        np.testing.assert_array_equal(a, b)


def test_residual_shapes():
    shapes = cpu_multiblank.residual_shapes(2, 5, 4, 3, np.dtype(np.float16))
    assert shapes.log_norm == ((2, 5, 4), np.dtype(np.float32))
    assert shapes.log_big_blanks == ((2, 5, 4, 3), np.dtype(np.float64))
    assert shapes[:5] == tuple(cpu.residual_shapes(2, 5, 4, np.float16))


def test_nan_and_masked_entries():
    """A NaN logit makes only its utterance's cost NaN; a masked (-inf) label entry gets zero gradient."""
    p = random_problem(np.random.default_rng(9), 3, 8, 3, 10, dtype=np.float32, blank=9)
    p.logits[1, 0, 0, 8] = np.nan  # the 2-frame big blank of the first row of utterance 1
    p.logits[2, :, :, 0] = -np.inf
    p.targets[2] = 1
    costs, grads = run_kernels(p, [2, 4], sigma=0.05)
    assert np.isnan(costs[1]) and np.isfinite(costs[[0, 2]]).all()
    assert (grads[2, ..., 0] == 0).all()
    ref_costs, ref_grads = multiblank_rnnt_loss_reference(p.logits[[0, 2]], p.targets[[0, 2]],
                                                          p.logit_lengths[[0, 2]], p.target_lengths[[0, 2]],
                                                          [2, 4], blank=9, sigma=0.05, reduction="none")
    np.testing.assert_allclose(costs[[0, 2]], ref_costs, rtol=1e-5)
    np.testing.assert_allclose(grads[[0, 2]], ref_grads, atol=2e-5, rtol=0)


# ---- through the adapters (rnnt_xla.torch / rnnt_xla.jax .multiblank_rnnt_loss) ----------------------------



def _torch_loss_and_grad(logits, p, durations, **options):
    from rnnt_xla.torch import multiblank_rnnt_loss

    x = torch.tensor(logits, requires_grad=True)
    loss = multiblank_rnnt_loss(x, *(torch.from_numpy(a) for a in (p.targets, p.logit_lengths, p.target_lengths)),
                                durations, **options)
    loss.sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


ADAPTER_OPTIONS = [dict(reduction="none"),
                   dict(reduction="mean", sigma=0.05, fastemit_lambda=0.01, clamp=0.05),
                   dict(reduction="mean_volume", sigma=0.1, blank=-1)]


@pytest.mark.parametrize("options", ADAPTER_OPTIONS)
def test_adapters_bit_identical_and_match_the_reference(options):
    """torch and JAX (under jit, value and grad) give the same bits, and the float64 reference's values."""
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import multiblank_rnnt_loss as jax_loss

    p = random_problem(np.random.default_rng(21), 4, 11, 4, 13, blank=12)
    durations = [2, 4, 8]
    loss, grad = _torch_loss_and_grad(p.logits, p, durations, **options)
    index = [jax.numpy.asarray(a) for a in (p.targets, p.logit_lengths, p.target_lengths)]

    def total(x):
        return jax_loss(x, *index, durations, **options).sum()

    jax_total, jax_grad = jax.jit(jax.value_and_grad(total))(jax.numpy.asarray(p.logits))
    jax_costs = jax.jit(lambda x: jax_loss(x, *index, durations, **options))(jax.numpy.asarray(p.logits))
    np.testing.assert_array_equal(np.asarray(jax_costs), loss)
    np.testing.assert_array_equal(np.asarray(jax_grad), grad)
    np.testing.assert_allclose(float(jax_total), loss.sum(), rtol=1e-6)
    ref_loss, ref_grad = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                        durations, **{"blank": 12, **options})
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=2e-5, rtol=0)


def test_adapters_float64_match_the_reference():
    p = random_problem(np.random.default_rng(22), 3, 9, 3, 10, dtype=np.float64, blank=9)
    loss, grad = _torch_loss_and_grad(p.logits, p, [3, 2], sigma=0.05, reduction="sum")
    ref_loss, ref_grad = multiblank_rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths,
                                                        [3, 2], blank=9, sigma=0.05, reduction="sum")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-12)


def test_adapters_vmap():
    """jax.vmap and torch.func.vmap over groups of batches: each group's loss and gradient, bit for bit."""
    jax = pytest.importorskip("jax")
    from rnnt_xla.jax import multiblank_rnnt_loss as jax_loss
    from rnnt_xla.torch import multiblank_rnnt_loss as torch_loss

    groups = [random_problem(np.random.default_rng(30 + g), 2, 8, 3, 9, blank=8, variable_lengths=True)
              for g in range(3)]
    width = max(p.targets.shape[1] for p in groups)
    stack = {name: np.stack([np.pad(getattr(p, name), ((0, 0), (0, width - p.targets.shape[1])))
                             if name == "targets" else getattr(p, name) for p in groups])
             for name in ("logits", "targets", "logit_lengths", "target_lengths")}
    options = dict(sigma=0.05, reduction="mean")

    def one(x, targets, frames, labels):
        return jax_loss(x, targets, frames, labels, [2, 3], **options)

    arrays = [jax.numpy.asarray(stack[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    losses, grads = jax.vmap(jax.value_and_grad(one))(*arrays)
    tensors = [torch.from_numpy(stack[k]) for k in ("logits", "targets", "logit_lengths", "target_lengths")]
    torch_losses, torch_grads = torch.func.vmap(torch.func.grad_and_value(
        lambda x, *index: torch_loss(x, *index, [2, 3], **options)), in_dims=0)(*tensors)[::-1]
    for g, p in enumerate(groups):
        loss, grad = _torch_loss_and_grad(stack["logits"][g], p, [2, 3], **options)
        np.testing.assert_array_equal(np.asarray(losses[g]), loss)
        np.testing.assert_array_equal(np.asarray(grads[g]), grad)
        np.testing.assert_array_equal(torch_losses[g].numpy(), loss)
        np.testing.assert_array_equal(torch_grads[g].numpy(), grad)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_adapters_sixteen_bit_bit_identical(half):
    """16-bit logits through both adapters: the same float32 costs and 16-bit gradients, bit for bit."""
    jax = pytest.importorskip("jax")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from rnnt_xla.jax import multiblank_rnnt_loss as jax_loss
    from rnnt_xla.torch import multiblank_rnnt_loss as torch_loss

    p = random_problem(np.random.default_rng(26), 3, 10, 4, 12, blank=11)
    numpy_dtype, torch_dtype = {"float16": (np.float16, torch.float16),
                                "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16)}[half]
    logits16 = p.logits.astype(numpy_dtype)
    options = dict(sigma=0.05, reduction="none")
    x = torch.from_numpy(logits16.astype(np.float32)).to(torch_dtype).requires_grad_()
    index = (p.targets, p.logit_lengths, p.target_lengths)
    loss = torch_loss(x, *map(torch.from_numpy, index), [2, 4], **options)
    loss.sum().backward()
    jax_index = [jax.numpy.asarray(a) for a in index]
    jax_costs, pullback = jax.vjp(lambda z: jax_loss(z, *jax_index, [2, 4], **options), jax.numpy.asarray(logits16))
    (jax_grad,) = pullback(jax.numpy.ones_like(jax_costs))
    assert x.grad.dtype == torch_dtype and jax_grad.dtype == numpy_dtype
    np.testing.assert_array_equal(np.asarray(jax_costs), loss.detach().numpy())
    np.testing.assert_array_equal(np.asarray(jax_grad).astype(np.float32), x.grad.float().numpy())


def test_nemo_drop_in_on_nemos_randomized_case():
    """rnnt_xla.torch.MultiblankRNNTLossNumba with the arguments of NeMo's
    TestMultiblankRNNTLoss.test_case_randomized_act_label against NeMo's torch loss (see the module docstring)."""
    from rnnt_xla.torch import MultiblankRNNTLossNumba

    torch.manual_seed(1)
    B, T, U, V = 4, 8, 4, 8
    durations = [2, 4, 8]
    acts = torch.rand([B, T, U, V + 1 + len(durations)])
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, V, size=(B, U - 1)))
    lengths = torch.full((B,), T), torch.full((B,), U - 1)
    loss_fn = MultiblankRNNTLossNumba(blank=V + len(durations), reduction="sum", big_blank_durations=durations,
                                      sigma=0.1)
    x = acts.clone().requires_grad_()
    loss = loss_fn(x, labels, *lengths)
    loss.backward()
    nemo_costs, nemo_grads = nemo_pytorch_loss(acts.numpy(), labels.numpy(), *(a.numpy() for a in lengths),
                                               V + len(durations), durations, 0.1)
    assert loss.shape == (1,)
    np.testing.assert_allclose(loss.item(), nemo_costs.sum(), rtol=1e-6)  # NeMo's tolerances: rtol 1e-6 / 1e-2
    np.testing.assert_allclose(x.grad.numpy(), nemo_grads, atol=1e-5)
