"""The fused joint + loss (JAX): equal to the unfused path (float64 in a subprocess, float32 here), XLA never
plans a full logits buffer, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from rnnt_xla.jax import fused_rnnt_loss, rnnt_loss  # noqa: E402

E, P, H = 6, 5, 8


def joint(p, e, d):
    h = jnp.tanh((e @ p["we"])[:, :, None] + (d @ p["wp"])[:, None])
    return h @ p["wo"] + p["bo"]


def problem(seed=0, B=5, T=9, U=4, V=7, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = {"we": rng.standard_normal((E, H)), "wp": rng.standard_normal((P, H)), "wo": rng.standard_normal((H, V)),
              "bo": rng.standard_normal(V)}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    enc = jnp.asarray(rng.standard_normal((B, T, E)), dtype)
    pred = jnp.asarray(rng.standard_normal((B, U + 1, P)), dtype)
    frames, labels = rng.integers(1, T + 1, B), rng.integers(0, U + 1, B)
    frames[0], labels[0] = T, U
    return params, enc, pred, jnp.asarray(rng.integers(0, V, (B, U))), jnp.asarray(frames), jnp.asarray(labels)


def both(params, enc, pred, targets, frames, labels, tile_bytes=None, jit=True, **options):
    def unfused(p, e, d):
        return rnnt_loss(joint(p, e, d), targets, frames, labels, **options).sum()

    def fused(p, e, d):
        return fused_rnnt_loss(joint, p, e, d, targets, frames, labels, tile_bytes=tile_bytes, **options).sum()

    transform = jax.jit if jit else (lambda f: f)
    return [transform(jax.value_and_grad(f, argnums=(0, 1, 2)))(params, enc, pred) for f in (unfused, fused)]


CASES = [(r, t, True) for r in ("none", "sum", "mean", "mean_by_target_length", "mean_volume")
         for t in (None, 600, 7 * 5 * 4 * 3)]  # one tile; frames of some utterances; frames of all
CASES += [("mean", 600, False), ("none", None, False)]  # eager


@pytest.mark.parametrize("reduction,tile_bytes,jit", CASES)
def test_equals_the_unfused_loss_and_gradients_float32(reduction, tile_bytes, jit):
    args = problem(hash((reduction, tile_bytes)) % 1000)
    (loss, grads), (fused_loss, fused_grads) = both(*args, tile_bytes=tile_bytes, jit=jit, blank=0,
                                                    reduction=reduction, clamp=0.1, fastemit_lambda=0.1)
    np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_equals_the_unfused_path_in_float64():
    """With jax_enable_x64 (a subprocess: it is process-wide) the paths agree to float64 rounding."""
    script = textwrap.dedent("""
        import jax
        jax.config.update("jax_enable_x64", True)
        import numpy as np
        import test_fused_jax as t
        worst = 0.0
        for seed, tile_bytes, blank, reduction in [(1, 1200, 0, "sum"), (2, 8 * 5 * 9 * 7, -1, "mean_volume"),
                                                   (3, None, 2, "none"), (4, 8 * 5 * 7, 0, "mean")]:
            args = t.problem(seed, dtype=np.float64)
            (l1, g1), (l2, g2) = t.both(*args, tile_bytes=tile_bytes, blank=blank, reduction=reduction,
                                        clamp=0.05, fastemit_lambda=0.2)
            worst = max([worst, abs(float(l1) - float(l2))] +
                        [float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))])
        print(worst)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=__file__.rsplit("/", 1)[0])
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 1e-11


def test_xla_never_plans_a_full_logits_buffer():
    """XLA's own accounting of the compiled fwd+bwd: the fused program's temporaries stay near a tile's
    worth, the unfused one's hold the logits (B*T*(U+1)*V floats) several times over."""
    B, T, U, V = 8, 64, 20, 512
    params, enc, pred, targets, frames, labels = problem(5, B, T, U, V)
    logits_bytes = B * T * (U + 1) * V * 4
    tile_bytes = logits_bytes // 16

    def compiled(fused):
        def loss(p, e, d):
            if fused:
                return fused_rnnt_loss(joint, p, e, d, targets, frames, labels, blank=0, tile_bytes=tile_bytes)
            return rnnt_loss(joint(p, e, d), targets, frames, labels, blank=0)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(params, enc, pred).compile()

    unfused, fused = (compiled(f).memory_analysis().temp_size_in_bytes for f in (False, True))
    assert unfused > 2 * logits_bytes
    assert fused < 5 * tile_bytes < logits_bytes / 3


def test_errors_name_the_argument():
    params, enc, pred, targets, frames, labels = problem(6)
    with pytest.raises(ValueError, match="joint_fn must return logits"):
        fused_rnnt_loss(lambda p, e, d: e, params, enc, pred, targets, frames, labels)
    with pytest.raises(ValueError, match="tile_bytes must hold at least one frame"):
        fused_rnnt_loss(joint, params, enc, pred, targets, frames, labels, tile_bytes=8)
    with pytest.raises(ValueError, match=r"logit_lengths must be in \[1, 9\]"):
        fused_rnnt_loss(joint, params, enc, pred, targets, frames + 1, labels)
    with pytest.raises(ValueError, match="predictor_out must have batch size 5"):
        fused_rnnt_loss(joint, params, enc, pred[:2], targets, frames, labels)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_rnnt_loss(joint, params, enc, pred, targets, frames, labels, reduction="avg")


@pytest.mark.parametrize("reduction", ["none", "mean_volume"])
def test_vmap_over_a_leading_axis_matches_each_instance(reduction):
    params, enc, pred, targets, frames, labels = problem(7)
    encs, preds = jnp.stack([enc, 2 * enc, -enc]), jnp.stack([pred, pred, 0.5 * pred])

    def loss(p, e, d):
        return fused_rnnt_loss(joint, p, e, d, targets, frames, labels, blank=0, tile_bytes=600,
                               reduction=reduction).sum()

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    values, grads = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(params, encs, preds)
    for i in range(3):
        value, expected = grad(params, encs[i], preds[i])
        np.testing.assert_allclose(values[i], value, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


def test_second_order_and_traced_errors_name_rnnt_xla():
    params, enc, pred, targets, frames, labels = problem(8)

    def loss(p):
        return fused_rnnt_loss(joint, p, enc, pred, targets, frames, labels, blank=0)

    with pytest.raises(NotImplementedError, match=r"rnnt_xla\.jax\.fused_rnnt_loss can be differentiated once"):
        jax.hessian(loss)(params)
    step = jax.jit(lambda f: fused_rnnt_loss(joint, params, enc, pred, targets, f, labels))
    for _ in range(2):  # the first call and a later one of the same jitted function: the same type
        with pytest.raises(jax.errors.JaxRuntimeError, match="logit_lengths must be in"):
            step(frames + 1).block_until_ready()
        step(frames).block_until_ready()


SHARDING_SCRIPT = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import test_fused_jax as t
from rnnt_xla.jax_fused import fused_rnnt_loss

params, enc, pred, targets, frames, labels = t.problem(0, B=4)
for reduction in ["sum", "mean", "none", "mean_volume"]:
    def loss(p, *arrays, **kw):
        return fused_rnnt_loss(t.joint, p, *arrays, blank=0, tile_bytes=600, reduction=reduction, **kw).sum()
    ref_value, ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(params, enc, pred, targets, frames, labels)
    for types, kw in [((AxisType.Explicit,), {}), ((AxisType.Auto,), {"batch_axis": "data"})]:
        mesh = jax.make_mesh((2,), ("data",), axis_types=types)
        arrays = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (enc, pred, targets, frames, labels)]
        replicated = jax.device_put(params, NamedSharding(mesh, P()))
        step = jax.jit(jax.value_and_grad(lambda p, *a: loss(p, *a, **kw), argnums=(0, 1, 2)))
        value, grads = step(replicated, *arrays)
        assert abs(float(value - ref_value)) < 1e-4, (reduction, types, value, ref_value)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert float(jnp.abs(a - b).max()) < 1e-5, (reduction, types)
        assert grads[1].sharding.spec[0] == "data", grads[1].sharding
        assert "all-gather" not in step.lower(replicated, *arrays).compile().as_text(), (reduction, types)
print("sharding ok")
"""


def test_batch_sharded_inputs_run_per_device_without_gathering():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, timeout=600,
                            cwd=__file__.rsplit("/", 1)[0], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding ok" in result.stdout


def test_flax_model_with_the_fused_loss_trains_under_jit():
    """The README's Flax example: the model's joint method as ``joint_fn``, an optax step under jit."""
    nn = pytest.importorskip("flax.linen")
    optax = pytest.importorskip("optax")

    class Transducer(nn.Module):
        vocab: int = 8
        hidden: int = 16

        def setup(self):
            self.encoder = nn.Dense(self.hidden)
            self.predictor = nn.Embed(self.vocab, self.hidden)
            self.joint_hidden = nn.Dense(self.hidden)
            self.joint_out = nn.Dense(self.vocab)

        def __call__(self, frames, labels):  # encoder and predictor outputs
            bos = jnp.zeros_like(labels[:, :1])  # blank = 0 as BOS
            return self.encoder(frames), self.predictor(jnp.concatenate([bos, labels], axis=1))

        def joint(self, enc, pred):  # (b, t, H), (b, U+1, H) -> (b, t, U+1, V)
            return self.joint_out(jnp.tanh(self.joint_hidden(enc)[:, :, None] + pred[:, None]))

        def logits(self, frames, labels):  # the unfused path; also initialises every parameter
            return self.joint(*self(frames, labels))

    model = Transducer()
    B, T, U = 4, 12, 3
    frames = jax.random.normal(jax.random.key(0), (B, T, 5))
    labels = jax.random.randint(jax.random.key(1), (B, U), 1, 8)
    frame_lengths, label_lengths = jnp.full((B,), T), jnp.full((B,), U)
    params = model.init(jax.random.key(2), frames, labels, method=Transducer.logits)
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state):
        def loss_fn(params):
            enc, pred = model.apply(params, frames, labels)
            joint_fn = lambda p, e, d: model.apply(p, e, d, method=Transducer.joint)  # noqa: E731
            return fused_rnnt_loss(joint_fn, params, enc, pred, labels, frame_lengths, label_lengths, blank=0,
                                   tile_bytes=B * 3 * (U + 1) * 8 * 4)  # four tiles of three frames
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = train_step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_default_tile_bytes_is_the_cpu_default():
    """Without ``tile_bytes`` the CPU default (16 MB) cuts the grid: (5, 40, 35, 1024) float32 logits are 28 MB,
    whole frames of the batch are 717 KB, so tiles of 23 frames, 2 of them (one with 32 MB tiles)."""
    from rnnt_xla.jax_fused import _runs_on_gpu

    params, enc, pred, targets, frames, labels = problem(1, B=5, T=40, U=34, V=1024)
    assert not _runs_on_gpu(enc)

    from jax.extend.core import jaxprs_in_params

    def scans(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                yield eqn.params["length"]
            for sub in jaxprs_in_params(eqn.params):
                yield from scans(sub)

    def lengths_of_scans(tile_bytes):
        def loss(e):
            return fused_rnnt_loss(joint, params, e, pred, targets, frames, labels, blank=0, tile_bytes=tile_bytes)
        return list(scans(jax.make_jaxpr(loss)(enc).jaxpr))

    assert lengths_of_scans(None) == lengths_of_scans(16 << 20) == [2]
    assert lengths_of_scans(32 << 20) == [1]
