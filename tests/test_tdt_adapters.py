"""``tdt_loss`` end to end through both adapters on the CPU kernels: values against the float64 reference,
torch and JAX bit-identical, JAX grad under jit and vmap, omega reproducible, 16-bit logits."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from rnnt_xla.reference import tdt_loss_reference
from rnnt_xla.torch import tdt_loss as torch_tdt_loss
from test_tdt import tdt_problem

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from rnnt_xla.jax import tdt_loss as jax_tdt_loss  # noqa: E402

DURATIONS = [0, 1, 2, 3, 4]


def problem(seed=0, B=3, T=9, U=4, V=7, durations=DURATIONS, dtype=np.float32):
    return tdt_problem(np.random.default_rng(seed), B, T, U, V, durations, dtype=dtype)


def run_torch(logits, targets, logit_lengths, target_lengths, torch_dtype=None, **options):
    """Loss and the gradient of ``loss.sum()`` (numpy; 16-bit gradients as float32)."""
    x = torch.from_numpy(np.asarray(logits, np.float32) if torch_dtype else logits.copy())
    x = (x.to(torch_dtype) if torch_dtype else x).requires_grad_()
    loss = torch_tdt_loss(x, *(torch.from_numpy(a) for a in (targets, logit_lengths, target_lengths)), **options)
    loss.sum().backward()
    return loss.detach().numpy(), x.grad.float().numpy()


def run_jax(logits, targets, logit_lengths, target_lengths, **options):
    index = [jnp.asarray(a) for a in (targets, logit_lengths, target_lengths)]
    x = jnp.asarray(logits)
    loss, grad = jax.value_and_grad(lambda x: jax_tdt_loss(x, *index, **options).sum())(x)
    return np.asarray(jax_tdt_loss(x, *index, **options)), np.asarray(grad.astype(jnp.float32))


OPTIONS = [
    dict(durations=DURATIONS, reduction="none"),
    dict(durations=DURATIONS, blank=0, sigma=0.05, reduction="mean", fastemit_lambda=0.01, clamp=0.1),
    dict(durations=[1, 2], blank=2, sigma=0.5, reduction="sum"),
    dict(durations=[0, 2, 3], reduction="mean_by_target_length", omega=1.0),  # always the label head's RNNT
]


@pytest.mark.parametrize("options", OPTIONS)
def test_torch_and_jax_match_the_reference_and_each_other_bit_for_bit(options):
    p = problem()
    options = dict(options)
    torch_loss, torch_grad = run_torch(*p, **options)
    key = jax.random.key(0) if options.get("omega", 0.0) > 0 else None
    jax_loss, jax_grad = run_jax(*p, key=key, **options)
    assert np.array_equal(torch_loss, jax_loss) and np.array_equal(torch_grad, jax_grad)
    omega = options.pop("omega", 0.0)
    durations = options.pop("durations")
    ref_loss, ref_grad = tdt_loss_reference(*p, durations, label_head_only=omega >= 1.0, **options)
    np.testing.assert_allclose(torch_loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(torch_grad, ref_grad, atol=1e-6)


def test_float64_through_torch():
    p = problem(dtype=np.float64)
    loss, grad = run_torch(*p, durations=DURATIONS, sigma=0.05, reduction="none")
    ref_loss, ref_grad = tdt_loss_reference(*p, DURATIONS, sigma=0.05, reduction="none")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-12)


def test_jax_grad_under_jit_and_vmap():
    problems = [problem(seed) for seed in range(3)]
    stacked = [np.stack(parts) for parts in zip(*problems)]  # (3, B, ...) each

    def loss(x, targets, logit_lengths, target_lengths):
        return jax_tdt_loss(x, targets, logit_lengths, target_lengths, DURATIONS, sigma=0.05, reduction="mean")

    grad = jax.jit(jax.grad(loss))
    batched = jax.jit(jax.vmap(jax.value_and_grad(loss)))(*map(jnp.asarray, stacked))
    for k, p in enumerate(problems):
        ref_loss, ref_grad = tdt_loss_reference(*p, DURATIONS, sigma=0.05, reduction="mean")
        eager_loss, eager_grad = run_jax(*p, durations=DURATIONS, sigma=0.05, reduction="mean")
        jit_grad = np.asarray(grad(*map(jnp.asarray, p)))
        assert np.array_equal(jit_grad, eager_grad)
        np.testing.assert_allclose(np.asarray(batched[0][k]), ref_loss, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(batched[1][k]), ref_grad, atol=1e-6)


def test_omega_is_reproducible_and_picks_one_of_the_two_losses():
    p = problem(seed=4)
    options = dict(sigma=0.05, reduction="sum")
    tdt = tdt_loss_reference(*p, DURATIONS, **options)[0]
    rnnt = tdt_loss_reference(*p, DURATIONS, label_head_only=True, **options)[0]
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        first = run_torch(*p, durations=DURATIONS, omega=0.5, **options)
        torch.manual_seed(seed)
        again = run_torch(*p, durations=DURATIONS, omega=0.5, **options)
        assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
        is_rnnt = abs(float(first[0]) - float(rnnt)) < 1e-4 * abs(float(rnnt))
        assert is_rnnt or abs(float(first[0]) - float(tdt)) < 1e-4 * abs(float(tdt))
        seen.add(is_rnnt)
        if is_rnnt:
            assert not first[1][..., 7:].any()  # no gradient for the duration scores
        key = jax.random.key(seed)
        jax_loss, _ = run_jax(*p, durations=DURATIONS, omega=0.5, key=key, **options)
        expect_rnnt = float(jax.random.uniform(key)) < 0.5
        np.testing.assert_allclose(jax_loss, rnnt if expect_rnnt else tdt, rtol=1e-5)
    assert seen == {True, False}


@pytest.mark.parametrize("half, torch_dtype, eps", [(np.float16, torch.float16, 2.0**-11),
                                                     (ml_dtypes.bfloat16, torch.bfloat16, 2.0**-8)])
def test_16_bit_logits_in_both_adapters(half, torch_dtype, eps):
    p = problem(seed=5)
    logits16 = p[0].astype(half)
    options = dict(durations=DURATIONS, blank=0, sigma=0.05, reduction="none", clamp=0.3)
    torch_loss, torch_grad = run_torch(logits16, *p[1:], torch_dtype=torch_dtype, **options)
    jax_loss, jax_grad = run_jax(logits16, *p[1:], **options)
    assert np.array_equal(torch_loss, jax_loss) and np.array_equal(torch_grad, jax_grad)
    ref_loss, ref_grad = tdt_loss_reference(logits16.astype(np.float64), *p[1:], DURATIONS, blank=0, sigma=0.05,
                                            reduction="none", clamp=0.3)
    np.testing.assert_allclose(torch_loss, ref_loss, rtol=1e-5)
    assert np.all(np.abs(torch_grad - ref_grad) <= eps * np.abs(ref_grad) + 1e-6)


def test_nemo_drop_in_on_nemos_fixed_case():
    """NeMo's TDT known answer through the TDTLossNumba drop-in: tests/collections/asr/numba/rnnt_loss/
    test_rnnt_pytorch.py, TestTDTLoss.test_case_fixed_case_act_label (also tests/test_tdt.py, on the reference)."""
    from rnnt_xla.torch import TDTLossNumba

    acts = torch.zeros((1, 3, 2, 4 + 3), requires_grad=True)
    loss_fn = TDTLossNumba(blank=3, reduction="sum", durations=[0, 1, 2], sigma=0.05)
    cost = loss_fn(acts, torch.tensor([[0]]), torch.tensor([3]), torch.tensor([1]))
    cost.sum().backward()
    expected_grad = [[
        [[-0.64962804, 0.25, 0.25, 0.14962798, 0.2672583, -0.16792619, -0.09933221],
         [0.01651875, 0.01651875, 0.01651875, -0.04955626, 0.022025, -0.01227201, -0.009753]],
        [[-0.04892651, 0.01714851, 0.01714851, 0.01462949, -0.01143234, -0.01143234, 0.02286467],
         [0.12531489, 0.12531489, 0.12531489, -0.37594467, 0.16708651, 0.13027048, -0.29735702]],
        [[-0.02572276, 0.00857425, 0.00857425, 0.00857425, -0.02286468, 0.01143234, 0.01143234],
         [0.13388914, 0.13388914, 0.13388914, -0.40166742, 0.17851885, -0.35703772, 0.17851885]],
    ]]
    np.testing.assert_allclose(cost.detach().numpy(), [4.155739], rtol=1e-6)
    np.testing.assert_allclose(acts.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-6)


def test_compiled_tdt_loss_matches_eager_bit_for_bit():
    p = problem(seed=6)
    index = [torch.from_numpy(a) for a in p[1:]]
    loss_fn = lambda x: torch_tdt_loss(x, *index, DURATIONS, sigma=0.05, reduction="mean")  # noqa: E731
    step = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, step):
        x = torch.from_numpy(p[0].copy()).requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref_loss, _ = tdt_loss_reference(*p, DURATIONS, sigma=0.05, reduction="mean")
    assert float(results[0][0]) == pytest.approx(float(ref_loss), rel=1e-5)
