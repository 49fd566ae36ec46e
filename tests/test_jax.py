"""The JAX adapter: reference values, transformations, zero copy, agreement with torch, errors, sharding."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from conftest import Problem, random_problem  # noqa: E402
from rnnt_xla.jax import rnnt_loss  # noqa: E402
from rnnt_xla.kernels import cpu  # noqa: E402
from rnnt_xla.reference import log_softmax, rnnt_loss_reference  # noqa: E402
from rnnt_xla.torch import rnnt_loss as torch_rnnt_loss  # noqa: E402

REDUCTIONS = ["none", "sum", "mean", "mean_by_target_length"]


def jax_inputs(p: Problem):
    return jnp.asarray(p.logits), jnp.asarray(p.targets), jnp.asarray(p.logit_lengths), jnp.asarray(p.target_lengths)


def problem(seed=0, B=4, T=9, U=5, V=11, blank=3):
    p = random_problem(np.random.default_rng(seed), B, T, U, V, blank=blank, extra_target_columns=1)
    p.target_lengths[-1] = 0
    return p


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("jit", [False, True])
def test_value_and_grad_match_reference(reduction, jit):
    p = problem()
    options = dict(blank=3, reduction=reduction, clamp=0.05, fastemit_lambda=0.1)
    logits, targets, logit_lengths, target_lengths = jax_inputs(p)

    def loss(x):
        return rnnt_loss(x, targets, logit_lengths, target_lengths, **options).sum()

    value_and_grad = jax.value_and_grad(loss)
    value, grad = (jax.jit(value_and_grad) if jit else value_and_grad)(logits)
    ref_loss, ref_grad = rnnt_loss_reference(p.logits, p.targets, p.logit_lengths, p.target_lengths, **options)
    np.testing.assert_allclose(value, ref_loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=0)


CROSS_GRID = list(itertools.product(REDUCTIONS, [0.0, 0.01], [-1.0, 0.1], [True, False]))


@pytest.mark.parametrize("reduction,fastemit_lambda,clamp,fused", CROSS_GRID)
def test_bit_identical_to_torch(reduction, fastemit_lambda, clamp, fused):
    p = problem(seed=1)
    if not fused:
        p.logits = log_softmax(p.logits).astype(np.float32)
    options = dict(blank=3, reduction=reduction, clamp=clamp, fastemit_lambda=fastemit_lambda,
                   fused_log_softmax=fused)
    logits = torch.from_numpy(p.logits.copy()).requires_grad_()
    index = [torch.from_numpy(a) for a in (p.targets, p.logit_lengths, p.target_lengths)]
    torch_loss = torch_rnnt_loss(logits, *index, **options)
    cotangent = np.linspace(0.5, 1.5, torch_loss.numel(), dtype=np.float32).reshape(torch_loss.shape)
    torch_loss.backward(torch.from_numpy(cotangent))

    jax_loss, vjp = jax.vjp(lambda x: rnnt_loss(x, *jax_inputs(p)[1:], **options), jnp.asarray(p.logits))
    (jax_grad,) = vjp(jnp.asarray(cotangent))
    assert np.array_equal(np.asarray(jax_loss), torch_loss.detach().numpy())
    assert np.array_equal(np.asarray(jax_grad), logits.grad.numpy())

    # torch tensors handed to JAX over DLPack give the same result.
    from_torch = [jax.dlpack.from_dlpack(t) for t in (logits.detach(), *index)]
    assert np.array_equal(np.asarray(rnnt_loss(*from_torch, **options)), torch_loss.detach().numpy())


def test_vmap_folds_into_one_kernel_call(monkeypatch):
    p = problem(seed=2)
    logits, targets, logit_lengths, target_lengths = jax_inputs(p)
    stacked = jnp.stack([logits, 0.5 * logits, -logits])
    batches = []
    forward = cpu.forward

    def spy(x, *args):
        batches.append(x.shape[0])
        return forward(x, *args)

    monkeypatch.setattr(cpu, "forward", spy)

    def loss(x):
        return rnnt_loss(x, targets, logit_lengths, target_lengths, blank=3, reduction="mean")

    values, grads = jax.vmap(jax.value_and_grad(loss))(stacked)
    assert batches == [3 * 4]
    for i in range(3):
        value, grad = jax.value_and_grad(loss)(stacked[i])
        assert np.array_equal(values[i], value) and np.array_equal(grads[i], grad)
    assert jax.jit(jax.vmap(loss))(stacked).shape == (3,)


def test_inside_scan_and_checkpoint():
    p = problem(seed=3)
    logits, targets, logit_lengths, target_lengths = jax_inputs(p)

    def loss(x):
        return rnnt_loss(x, targets, logit_lengths, target_lengths, blank=3)

    def scanned(x):
        def body(carry, scale):
            return carry + jax.checkpoint(loss)(x * scale), None
        total, _ = jax.lax.scan(body, jnp.float32(0), jnp.array([1.0, 0.5], jnp.float32))
        return total

    value, grad = jax.jit(jax.value_and_grad(scanned))(logits)
    v1, g1 = jax.value_and_grad(loss)(logits)
    v2, g2 = jax.value_and_grad(loss)(0.5 * logits)
    np.testing.assert_allclose(value, v1 + v2, rtol=1e-6)
    np.testing.assert_allclose(grad, g1 + 0.5 * g2, atol=1e-7)


def test_backward_reuses_the_forward_residuals(monkeypatch):
    p = problem(seed=4)
    logits, targets, logit_lengths, target_lengths = jax_inputs(p)
    calls = []
    for name in ("log_normalizers", "alphas_and_costs", "betas", "gradients"):
        for variant in (name, f"{name}_serial"):  # small problems run the serial kernels (kernels.threads)
            kernel = getattr(cpu, variant)
            monkeypatch.setattr(cpu, variant, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    jax.grad(lambda x: rnnt_loss(x, targets, logit_lengths, target_lengths, blank=3))(logits)
    assert calls == ["log_normalizers", "alphas_and_costs", "betas", "gradients"]


@pytest.mark.parametrize("jit", [False, True])
def test_zero_copy_buffers(monkeypatch, jit):
    """The kernels read XLA's logits buffer and write the gradient into the buffer that is returned."""
    B, T, U, V = 4, 50, 20, 128  # 4.3 MB of logits
    logits = jax.random.normal(jax.random.key(0), (B, T, U + 1, V))
    targets = jax.random.randint(jax.random.key(1), (B, U), 1, V)
    lengths = jnp.full((B,), T), jnp.full((B,), U)
    seen = {}
    forward, backward = cpu.forward, cpu.backward

    def spy_forward(x, *args):
        seen["forward_logits"] = x.ctypes.data
        return forward(x, *args)

    def spy_backward(x, *args):
        seen["backward_logits"], seen["grads"] = x.ctypes.data, args[-1].ctypes.data
        return backward(x, *args)

    monkeypatch.setattr(cpu, "forward", spy_forward)
    monkeypatch.setattr(cpu, "backward", spy_backward)
    grad_fn = jax.grad(lambda x: rnnt_loss(x, targets, *lengths, blank=0))
    grad = (jax.jit(grad_fn) if jit else grad_fn)(logits)
    assert seen["forward_logits"] == seen["backward_logits"] == logits.unsafe_buffer_pointer()
    assert seen["grads"] == grad.unsafe_buffer_pointer()


def test_dlpack_round_trips_share_memory():
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    t = torch.from_dlpack(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    y = torch.arange(12.0).reshape(3, 4)
    j = jax.dlpack.from_dlpack(y)
    assert j.unsafe_buffer_pointer() == y.data_ptr()
    np.testing.assert_array_equal(np.asarray(j), y.numpy())


def good_numpy_inputs():
    return dict(logits=np.random.default_rng(0).standard_normal((2, 5, 4, 6)).astype(np.float32),
                targets=np.array([[1, 2, 3], [4, 5, 9]], np.int32), logit_lengths=np.array([5, 3], np.int32),
                target_lengths=np.array([3, 2], np.int32))


def test_bad_values_under_jit_are_reported_by_the_callback():
    inputs = good_numpy_inputs()
    jitted = jax.jit(lambda x, t, a, b: rnnt_loss(x, t, a, b))
    bad_targets = np.array([[1, 60, 3], [4, 5, 0]], np.int32)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"targets must hold labels in \[0, 6\)"):
        jitted(inputs["logits"], bad_targets, inputs["logit_lengths"], inputs["target_lengths"]).block_until_ready()
    # and the process is still healthy afterwards
    assert np.isfinite(jitted(*inputs.values()))


SHARDING_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from rnnt_xla.jax import rnnt_loss
    from rnnt_xla.kernels import cpu

    batches = []
    forward = cpu.forward
    cpu.forward = lambda x, *a: (batches.append(x.shape[0]), forward(x, *a))[1]
    rng = np.random.default_rng(0)
    B, T, U, V = 4, 6, 3, 5
    x = rng.standard_normal((B, T, U + 1, V)).astype(np.float32)
    inputs = (x, rng.integers(1, V, (B, U)).astype(np.int32), np.array([6, 5, 4, 6], np.int32),
              np.array([3, 2, 1, 0], np.int32))
    for reduction in ["mean", "none", "mean_by_target_length"]:
        opts = dict(blank=0, reduction=reduction, clamp=0.2, fastemit_lambda=0.1)
        loss = lambda x, *r: rnnt_loss(x, *r, **opts).sum()
        ref_value, ref_grad = jax.value_and_grad(loss)(*map(jnp.asarray, inputs))

        # (a) explicit sharding: each device computes its own shard, no all-gather, sharded gradient
        mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,))
        with jax.set_mesh(mesh):
            args = [jax.device_put(a, P("x")) for a in inputs]
            step = jax.jit(jax.value_and_grad(loss))
            batches.clear()
            value, grad = jax.block_until_ready(step(*args))  # dispatch is asynchronous
            assert batches == [2, 2], batches
            assert "all-gather" not in step.lower(*args).compile().as_text()
            assert grad.sharding.spec == P("x", None, None, None), grad.sharding
            np.testing.assert_allclose(value, ref_value, rtol=1e-6)
            np.testing.assert_array_equal(grad, ref_grad)

        # (b) inside the user's shard_map
        mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
        args = [jax.device_put(a, NamedSharding(mesh, P("x"))) for a in inputs]
        per_shard = lambda *s: rnnt_loss(*s, **{**opts, "reduction": "none"})
        mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("x"),) * 4, out_specs=P("x"))
        total = lambda x, *r: mapped(x, *r).sum()
        value, grad = jax.jit(jax.value_and_grad(total))(*args)
        ref_value, ref_grad = jax.value_and_grad(
            lambda x, *r: rnnt_loss(x, *r, **{**opts, "reduction": "none"}).sum())(*map(jnp.asarray, inputs))
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        np.testing.assert_array_equal(grad, ref_grad)
        assert grad.sharding.spec[0] == "x"

        # (c) classic jit with NamedSharding on auto axes: correct (the callback sees the gathered batch)
        batches.clear()
        value, grad = jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(*args))
        np.testing.assert_allclose(value, jax.value_and_grad(loss)(*map(jnp.asarray, inputs))[0], rtol=1e-6)
        assert set(batches) == {4}, batches
    print("sharding ok")
""")


def test_multi_device_sharding_in_a_subprocess():
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding ok" in result.stdout


def test_flax_train_step_with_optax():
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")
    B, T, U, V, H = 4, 12, 5, 8, 16
    key = jax.random.key(0)
    encoder_out = jax.random.normal(key, (B, T, H))
    targets = jax.random.randint(jax.random.key(1), (B, U), 1, V)
    lengths = jnp.full((B,), T), jnp.full((B,), U)

    class Joiner(nn.Module):
        @nn.compact
        def __call__(self, enc, targets):
            prev = jnp.concatenate([jnp.zeros((B, 1), targets.dtype), targets], axis=1)
            pred = nn.Embed(V, H)(prev)
            return nn.Dense(V)(jnp.tanh(enc[:, :, None, :] + pred[:, None, :, :]))

    model = Joiner()
    params = model.init(key, encoder_out, targets)
    optimizer = optax.adam(0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            return rnnt_loss(model.apply(params, encoder_out, targets), targets, *lengths, blank=0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
