"""The JAX adapter: reference values, transformations, zero copy, agreement with torch, errors, sharding."""

from __future__ import annotations

import itertools
import subprocess
import sys

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

REDUCTIONS = ["none", "sum", "mean", "mean_by_target_length", "mean_volume"]


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


# Every way of sharding the batch over a mesh, on four CPU devices (the flag must precede importing jax).
SHARDING_SCRIPT = '''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from rnnt_xla.jax import rnnt_loss
from rnnt_xla.kernels import cpu

batches = []
forward = cpu.forward
cpu.forward = lambda x, *a: (batches.append(x.shape[0]), forward(x, *a))[1]
rng = np.random.default_rng(0)
B, T, U, V = 4, 6, 3, 6
inputs = (rng.standard_normal((B, T, U + 1, V)).astype(np.float32), rng.integers(1, V, (B, U)).astype(np.int32),
          np.array([6, 5, 4, 6], np.int32), np.array([3, 2, 1, 0], np.int32))
OPTS = dict(blank=0, clamp=0.2, fastemit_lambda=0.1)
REFS = {}


def reference(reduction):
    if reduction not in REFS:
        f = lambda x, *r: rnnt_loss(x, *r, reduction=reduction, **OPTS).sum()
        REFS[reduction] = jax.value_and_grad(f)(*map(jnp.asarray, inputs))
    return REFS[reduction]


def check(case, run, reduction, per_device, batch_spec, hlo=None):
    """run() -> (value, grad or None); per_device: the batch each kernel call sees (a set: only which
    batch sizes, XLA may repeat the call on several devices); batch_spec: the mesh
    axes the gradient's batch axis must keep; hlo: a jitted function and its args, for the all-gather check."""
    ref_value, ref_grad = reference(reduction)
    batches.clear()
    value, grad = jax.block_until_ready(run())
    np.testing.assert_allclose(value, ref_value, rtol=1e-6, err_msg=case)
    assert (set(batches) if isinstance(per_device, set) else sorted(batches)) == per_device, (case, batches)
    if grad is not None and reduction == "mean_volume":  # sharded: the shards' sums over the whole volume
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-9, err_msg=case)
    elif grad is not None:
        np.testing.assert_array_equal(grad, ref_grad, err_msg=case)
        assert (tuple(grad.sharding.spec) + (None,))[0] == batch_spec, (case, grad.sharding)
    if hlo is not None:
        text = hlo[0].lower(*hlo[1]).compile().as_text()
        assert "all-gather" not in text, case


def value_and_grad(reduction, **kw):
    return jax.value_and_grad(lambda x, *r: rnnt_loss(x, *r, reduction=reduction, **OPTS, **kw).sum())


def put(mesh, spec):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in inputs]


for reduction in ["mean", "none", "sum", "mean_by_target_length", "mean_volume"]:
    loss = lambda x, *r, **kw: rnnt_loss(x, *r, reduction=reduction, **OPTS, **kw).sum()

    # JAX's default mesh: Explicit axes, no jax.set_mesh. Eager forward and jitted gradient.
    mesh = jax.make_mesh((2,), ("data",))
    args = put(mesh, P("data"))
    step = jax.jit(value_and_grad(reduction))
    check(f"explicit eager {reduction}", lambda: (loss(*args), None), reduction, [2, 2], None)
    check(f"explicit jit {reduction}", lambda: step(*args), reduction, [2, 2], "data", (step, args))
    # ... and under jax.set_mesh, eager gradient too (JAX's own eager grad needs the mesh context here).
    with jax.set_mesh(mesh):
        check(f"explicit set_mesh eager {reduction}", lambda: value_and_grad(reduction)(*args), reduction, [2, 2],
              "data")
        check(f"explicit set_mesh jit {reduction}", lambda: step(*args), reduction, [2, 2], "data", (step, args))

    # Auto axes, classic jit with NamedSharding inputs: batch_axis says where the batch is split.
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    args = put(mesh, P("data"))
    step = jax.jit(value_and_grad(reduction, batch_axis="data"))
    check(f"auto jit batch_axis {reduction}", lambda: step(*args), reduction, [2, 2], "data", (step, args))
    check(f"auto eager forward {reduction}", lambda: (loss(*args), None), reduction, [2, 2], None)
    check(f"auto eager grad batch_axis {reduction}", lambda: value_and_grad(reduction, batch_axis="data")(*args),
          reduction, [2, 2], "data")
    with jax.set_mesh(mesh):  # the mesh comes from the context: here the inputs are plain numpy arrays
        step = jax.jit(value_and_grad(reduction, batch_axis="data"))
        check(f"auto set_mesh numpy batch_axis {reduction}", lambda: step(*inputs), reduction, [2, 2], "data")
    # Without batch_axis: correct, but XLA gathers the batch onto one device for the callback.
    step = jax.jit(value_and_grad(reduction))
    check(f"auto jit no batch_axis {reduction}", lambda: step(*args), reduction, {4}, None)

    # 2-D meshes: batch over "data" (replicated over "model"), and batch over both axes.
    for types in [(AxisType.Explicit,) * 2, (AxisType.Auto,) * 2]:
        mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=types)
        kind = "explicit" if types[0] == AxisType.Explicit else "auto"
        for axes, per_device in [("data", [2] * 4), (("data", "model"), [1] * 4)]:
            args = put(mesh, P(axes))
            step = jax.jit(value_and_grad(reduction, **({} if kind == "explicit" else {"batch_axis": axes})))
            check(f"2-D {kind} {axes} {reduction}", lambda: step(*args), reduction, per_device, axes, (step, args))

    # Logits also sharded along the vocabulary (Explicit axes): the kernels need whole rows, so those axes
    # are gathered, and the batch stays split where it was.
    mesh = jax.make_mesh((2,), ("data",))
    args = [jax.device_put(inputs[0], NamedSharding(mesh, P(None, None, None, "data"))), *inputs[1:]]
    step = jax.jit(value_and_grad(reduction))
    check(f"explicit vocabulary-sharded jit {reduction}", lambda: step(*args), reduction, {4}, None)
    with jax.set_mesh(mesh):
        check(f"explicit vocabulary-sharded eager {reduction}", lambda: value_and_grad(reduction)(*args), reduction,
              {4}, None)
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    args = [jax.device_put(inputs[0], NamedSharding(mesh, P("data", None, None, "model"))), *put(mesh, P("data"))[1:]]
    check(f"explicit batch- and vocabulary-sharded jit {reduction}", lambda: step(*args), reduction, [2] * 4, "data")

    # Inside the user's own shard_map: per shard ("none" per shard, summed by the user).
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    args = put(mesh, P("data"))
    for batch_axis in [None, "data"]:
        per_shard = lambda *s: rnnt_loss(*s, reduction="none", **OPTS, batch_axis=batch_axis)
        mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P("data"))
        total = jax.value_and_grad(lambda x, *r: mapped(x, *r).sum())
        check(f"user shard_map eager batch_axis={batch_axis}", lambda: total(*args), "none", [2, 2], "data")
        step = jax.jit(total)
        check(f"user shard_map jit batch_axis={batch_axis}", lambda: step(*args), "none", [2, 2], "data", (step, args))

# Wrong batch_axis values are reported before anything runs.
mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
for batch_axis, args, message in [("model", put(mesh, P("data")), "batch_axis must name axes of the mesh"),
                                  ("data", inputs, "batch_axis='data' needs a mesh"),
                                  ("data", [jax.device_put(a[:3], NamedSharding(mesh, P())) for a in inputs],
                                   "must divide the batch size 3")]:
    try:
        rnnt_loss(*args, batch_axis=batch_axis)
    except ValueError as error:
        assert message in str(error), error
    else:
        raise AssertionError(f"no error for batch_axis={batch_axis!r}")
print("sharding ok")
'''


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_gives_zero_loss_and_zero_gradient(reduction):
    """An empty shard (B = 0) is not an error, as in torch: the loss is 0 (or empty), the gradient zero."""
    logits = jnp.zeros((0, 5, 3, 4))
    index = jnp.zeros((0,), jnp.int32)
    loss = rnnt_loss(logits, jnp.zeros((0, 2), jnp.int32), index, index, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and float(loss.sum()) == 0.0
    grad = jax.jit(jax.grad(lambda x: rnnt_loss(x, jnp.zeros((0, 2), jnp.int32), index, index,
                                                reduction=reduction).sum()))(logits)
    assert grad.shape == logits.shape


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
