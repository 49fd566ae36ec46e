"""TDT, multi-blank and the RNNT variants over a 2-device CPU mesh (in a subprocess: the device count is
fixed when JAX starts): sharded losses and gradients equal the single-device ones, the gradient keeps the
batch sharding, and no logits are gathered (the compiled HLO has no all-gather). Only the logits are
sharded: targets and lengths on no mesh are resharded with them (they used to fail in shard_map)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from rnnt_xla.jax import multiblank_rnnt_loss, rnnt_loss, tdt_loss

assert jax.device_count() == 2
rng = np.random.default_rng(0)
B, T, U, V = 4, 9, 4, 6
targets = jnp.asarray(rng.integers(0, V - 4, (B, U)), jnp.int32)
logit_lengths = jnp.asarray([9, 7, 8, 6], jnp.int32)
target_lengths = jnp.asarray([4, 2, 3, 4], jnp.int32)
durations = (0, 1, 2, 3)

losses = {
    "regular": (lambda x, **k: rnnt_loss(x, targets, logit_lengths, target_lengths, **k), V),
    "tdt": (lambda x, **k: tdt_loss(x, targets, logit_lengths, target_lengths, durations, sigma=0.05, **k),
            V + len(durations)),
    "multiblank": (lambda x, **k: multiblank_rnnt_loss(x, targets, logit_lengths, target_lengths, (2, 3),
                                                        sigma=0.05, **k), V),
    "modified": (lambda x, **k: rnnt_loss(x, targets, logit_lengths, target_lengths, rnnt_type="modified",
                                          **k), V),
    "constrained+delay": (lambda x, **k: rnnt_loss(x, targets, logit_lengths, target_lengths,
                                                   rnnt_type="constrained", delay_penalty=0.1, **k), V),
}
for name, (loss, width) in losses.items():
    logits = jnp.asarray(rng.normal(size=(B, T, U + 1, width)), jnp.float32)
    for reduction in ("none", "mean", "mean_volume"):
        def total(x, reduction=reduction, **k):
            return loss(x, reduction=reduction, **k).sum()
        want_loss = np.asarray(loss(logits, reduction=reduction))
        want_grad = np.asarray(jax.grad(total)(logits))
        # Explicit axes: the sharding is seen while tracing, eagerly and under jit
        mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
        x = jax.device_put(logits, NamedSharding(mesh, P("data")))
        for how, fn in (("eager", lambda x: loss(x, reduction=reduction)),
                        ("jit", jax.jit(lambda x: loss(x, reduction=reduction)))):
            np.testing.assert_allclose(np.asarray(fn(x)), want_loss, rtol=1e-6, err_msg=f"{name} {how}")
        grad = jax.jit(jax.grad(total))(x)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7, err_msg=name)
        assert grad.sharding.spec[0] == "data", (name, grad.sharding)
        # Auto axes under jit: batch_axis says how the batch is split; nothing is gathered
        auto = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
        y = jax.device_put(logits, NamedSharding(auto, P("data")))
        step = jax.jit(jax.value_and_grad(lambda x: total(x, batch_axis="data")))
        value, grad = step(y)
        np.testing.assert_allclose(float(value), want_loss.sum(), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7, err_msg=name)
        hlo = step.lower(y).compile().as_text()
        assert "all-gather" not in hlo, f"{name} {reduction}: the logits are gathered"
print("family sharding ok")
'''


def test_family_losses_sharded_over_two_devices():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "family sharding ok" in result.stdout
