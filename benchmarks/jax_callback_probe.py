"""Where the time of a jitted JAX fwd+bwd call goes, call by call: inside rnnt_xla's callbacks (each kernel
launch, its thread count and wall time) or outside them (XLA), on which thread the callbacks ran, and
whether that thread flushes subnormals to zero (XLA runs its computations under flush-to-zero).

    python benchmarks/jax_callback_probe.py [--shape 8,200,50,256] [--calls 8] [--losses tdt modified regular]

Runs, per loss, 8 torch calls and then ``--calls`` calls of ``jax.jit(jax.grad(loss))`` on the same inputs
(torch first, as ``bench_family.py`` does). Written to find the slow steady state of JAX
``rnnt_type='modified'`` at (8, 200, 50, 256) on a quiet machine (117 ms vs torch's 28.5 ms in
``results/family_vm_quiet.md``; calls 1-2 fast, then slow): a call whose extra time is outside the callbacks
is XLA's; inside, the kernel lines say which pass and whether it ran on a different thread or thread count.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8,200,50,256")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--losses", nargs="+", default=["tdt", "modified", "regular"],
                        choices=["tdt", "modified", "constrained", "regular"])
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    import rnnt_xla.jax as rj
    import rnnt_xla.torch as rt
    from rnnt_xla import jax as adapter
    from rnnt_xla.kernels import cpu

    record: dict[str, object] = {}
    launch = cpu._launch

    def timed_launch(parallel_kernel, serial_kernel, count, *kernel_args):
        t0 = time.perf_counter()
        launch(parallel_kernel, serial_kernel, count, *kernel_args)
        record.setdefault("kernels", []).append(
            f"{parallel_kernel.__name__}/{count} {1e3 * (time.perf_counter() - t0):.1f}")

    cpu._launch = timed_launch
    for cls, key in ((adapter._ForwardCallback, "forward"), (adapter._BackwardCallback, "backward")):
        def wrapped(self, *a, _call=cls.__call__, _key=key):
            t0 = time.perf_counter()
            try:
                return _call(self, *a)
            finally:
                flushes = bool((np.array([1e-30], np.float32) * np.float32(1e-10))[0] == 0)
                record[_key] = (time.perf_counter() - t0, threading.current_thread().name, flushes)
        cls.__call__ = wrapped

    B, T, U, V = (int(x) for x in args.shape.split(","))
    rng = np.random.default_rng(0)
    for loss in args.losses:
        width = V + 5 if loss == "tdt" else V
        x = rng.standard_normal((B, T, U + 1, width), dtype=np.float32)
        y, frames, labels = rng.integers(1, V, (B, U)), np.full(B, T), np.full(B, U)
        if loss == "tdt":
            options = dict(durations=[0, 1, 2, 3, 4], blank=0, sigma=0.05)
            torch_loss, jax_loss = rt.tdt_loss, rj.tdt_loss
        else:
            options = dict(blank=0, rnnt_type=loss)
            torch_loss, jax_loss = rt.rnnt_loss, rj.rnnt_loss
        xt = torch.tensor(x, requires_grad=True)
        index = [torch.tensor(a, dtype=torch.int32) for a in (y, frames, labels)]
        for _ in range(8):
            torch_loss(xt, *index, **options).backward()
            xt.grad = None
        jax_index = [jnp.asarray(a, jnp.int32) for a in (y, frames, labels)]
        jax_options = dict(options, durations=tuple(options["durations"])) if loss == "tdt" else options
        grad = jax.jit(jax.grad(lambda a: jax_loss(a, *jax_index, **jax_options)))
        xj = jnp.asarray(x)
        for i in range(args.calls):
            record.clear()
            t0 = time.perf_counter()
            grad(xj).block_until_ready()
            wall = time.perf_counter() - t0
            inside = sum(record[k][0] for k in ("forward", "backward") if k in record)
            threads = "/".join(f"{record[k][1]}{' ftz' if record[k][2] else ''}" for k in ("forward", "backward")
                               if k in record)
            print(f"{loss:11s} call {i}: {1e3 * wall:6.1f} ms, outside the callbacks {1e3 * (wall - inside):5.1f} "
                  f"ms, callback threads {threads}; kernels (ms): {', '.join(record.get('kernels', []))}",
                  flush=True)


if __name__ == "__main__":
    main()
