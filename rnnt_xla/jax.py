"""JAX adapter: ``rnnt_loss``, ``tdt_loss`` and ``multiblank_rnnt_loss`` with the same names, defaults,
semantics and errors as ``rnnt_xla.torch``.

Every loss of ``rnnt_xla.family`` runs through the same ``custom_vjp``, with the loss's
:class:`~rnnt_xla.family.LossSpec` among its static options. TDT's ``omega`` takes an explicit
``key=`` (required when ``omega > 0``): ``jax.random.uniform(key)`` is an input of the callbacks, which
use the plain RNNT loss of the label scores when it is below omega (per vmapped example under ``vmap``).

The loss is a ``jax.custom_vjp`` whose forward and backward are ``jax.experimental.buffer_callback``s:
XLA hands the callbacks its own input and output buffers, the Numba kernels read the logits and write the
costs, residuals and gradient straight into them (no copies; a test compares the pointers). It works
eagerly and under ``jit``, ``grad``/``value_and_grad``, ``vmap`` (leading vmapped axes are folded into the
batch, so the kernels run once over the whole folded batch), ``lax.scan`` and ``checkpoint``. The
callbacks are hashable value objects (not closures), and the loss is one jitted program: an eager call
reuses the program compiled for its shape and options, and keeps no array alive.

Like the torch adapter it keeps only ``O(B*T*U)`` residuals from the forward pass and computes the gradient
in the backward pass, clamped and scaled by the incoming cotangent in one write. The float64 residuals
travel between the two passes as uint32 pairs, so they keep full precision without ``jax_enable_x64``
(and results are bit-identical to the torch adapter's). It is differentiable once, in reverse mode: a
second derivative or forward mode over the gradient raises ``NotImplementedError`` naming rnnt_xla, forward
mode over the loss raises JAX's ``TypeError`` for a ``custom_vjp``, and ``jax.export`` refuses host
callbacks (JAX's ``NotImplementedError``).

Multiple devices: when the batch axis of the logits is sharded over mesh axes (seen from an Explicit
sharding, from a concrete array's ``NamedSharding`` eagerly, or given as ``batch_axis=``), the loss maps
itself over those axes with ``shard_map``: each device runs the kernels on its own shard, nothing is
gathered, and the gradient keeps the batch sharding.

On a GPU the same callbacks receive device buffers (``__cuda_array_interface__``) and run the CUDA kernels
(``rnnt_xla.kernels.cuda``) on them, on XLA's stream (``ctx.stream``). The lengths and labels and the ``B``
costs come to the host (a copy and a wait on that stream) for validation and the shared reductions; the
backward pass allocates its betas through Numba and waits for its kernels before returning.

Errors: shapes, dtypes and options are checked while tracing (``TypeError``/``ValueError``, as in torch).
Lengths and labels are checked before the kernels run: eagerly with the same ``ValueError`` when the
values are concrete, otherwise inside the callback, where JAX reports the ``ValueError``'s message in a
``jax.errors.JaxRuntimeError`` on every call (see ``_keep_off_the_fast_path``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from . import family
from .kernels import cpu
from .kernels import cuda as cuda_kernels
from .reductions import gradient_scale, reduce_costs
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["rnnt_loss", "tdt_loss", "multiblank_rnnt_loss", "fused_rnnt_loss"]


class _Options(NamedTuple):
    """Static (hashable) arguments of the custom_vjp."""

    shape: LossShape
    reduction: str
    spec: family.LossSpec  # the loss and its options (kind, blank, fused_log_softmax, fastemit_lambda, clamp, ...)
    mean_batch: int  # the B of "mean" reductions: the whole batch, also when this call sees one shard
    check_values: bool  # check lengths and labels in the program (they were traced, not checked eagerly)


def _spec(name: str, x: object) -> ArraySpec:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name} must be a JAX or numpy array, got {type(x).__name__}")
    return ArraySpec(name, tuple(x.shape), np.dtype(x.dtype).name, "jax")


def _fold(buffer, trailing: int) -> np.ndarray:
    """numpy view of a callback buffer with every axis before the last ``trailing`` folded into one batch
    axis (vmapped axes come first, then the batch)."""
    a = np.asarray(buffer)
    split = a.ndim - trailing
    # An explicit leading size, not -1: with an empty trailing axis (targets of width 0) -1 is ambiguous.
    return a.reshape((int(np.prod(a.shape[:split])),) + a.shape[split:])


def _fold_pairs(buffer, trailing: int, dtype: np.dtype) -> np.ndarray:
    """Like :func:`_fold` for a 64-bit residual stored as ``(..., 2)`` uint32 (see module docstring)."""
    return _fold(np.asarray(buffer).view(dtype)[..., 0], trailing)


def _indices(targets, logit_lengths, target_lengths) -> list[np.ndarray]:
    return [np.ascontiguousarray(_fold(a, k), dtype=np.int64)
            for a, k in ((targets, 1), (logit_lengths, 0), (target_lengths, 0))]


@functools.lru_cache(maxsize=None)
def _residual_layout(spec: family.LossSpec, dtype: np.dtype) -> tuple[tuple[int, np.dtype, bool], ...]:
    """Per residual of ``spec``'s loss for logits of ``dtype``: the number of axes after the batch, its
    dtype, and whether it travels as uint32 pairs (64 bits without ``jax_enable_x64``: logits not float64)."""
    return tuple((len(shape) - 1, np.dtype(dt), np.dtype(dt).itemsize == 8 and np.dtype(dtype) != np.float64)
                 for shape, dt in family.residual_shapes(spec, 1, 1, 1, dtype))


def _residual_types(spec: family.LossSpec, logits) -> tuple:
    *lead, T, U1, _ = logits.shape
    types = []
    for shape, dtype in family.residual_shapes(spec, 1, T, U1, logits.dtype):
        full = tuple(lead) + shape[1:]
        if np.dtype(dtype).itemsize == 8 and np.dtype(dtype) != logits.dtype:
            types.append(jax.ShapeDtypeStruct(full + (2,), jnp.uint32))
        else:
            types.append(jax.ShapeDtypeStruct(full, dtype))
    return tuple(types)


def _host_residuals(options: _Options, dtype, buffers) -> list[np.ndarray]:
    return [_fold_pairs(buffer, trailing, dt) if pairs else _fold(buffer, trailing)
            for buffer, (trailing, dt, pairs) in zip(buffers, _residual_layout(options.spec, np.dtype(dtype)))]


def _modes(options: _Options, draw_buf: tuple) -> np.ndarray | bool:
    """TDT's omega mode per folded group (``family.label_head_only``) from the draw buffer, if any."""
    return family.label_head_only(options.spec, np.asarray(draw_buf[0]) if draw_buf else None)


def _mark_varying(outputs, inputs):
    """Inside ``shard_map`` a callback's outputs are typed as identical on every device; they really vary
    like the inputs (each device computes its own shard), so say so. A no-op at run time; outside
    ``shard_map`` nothing varies and the outputs are returned as they are."""
    axes = set()
    for leaf in jax.tree.leaves(inputs):
        manual = getattr(jax.typeof(leaf), "manual_axis_type", None)
        if manual is not None:
            axes |= manual.varying
    if not axes:
        return outputs
    return jax.tree.map(lambda out: jax.lax.pcast(out, tuple(sorted(axes)), to="varying"), outputs)


_DLPACK_CUDA = 2  # DLPack device type of CUDA memory (the host is 1)


def _on_gpu(buffer) -> bool:
    """Whether a callback buffer is in CUDA memory: the callbacks then run the CUDA kernels on XLA's stream."""
    return buffer.__dlpack_device__()[0] == _DLPACK_CUDA


def _fold_gpu(buffer, trailing: int, pairs_of=None):
    """Like :func:`_fold` (or :func:`_fold_pairs` with ``pairs_of``, the 64-bit dtype) for a GPU buffer: a
    Numba device view, bfloat16 as its int16 bits (``cuda_kernels.kernel_dtype``)."""
    shape = tuple(buffer.shape[:-1] if pairs_of is not None else buffer.shape)
    split = len(shape) - trailing
    folded = (int(np.prod(shape[:split])),) + shape[split:]
    bfloat16 = np.dtype(buffer.dtype).name == "bfloat16"
    view = pairs_of if pairs_of is not None else np.int16 if bfloat16 else None
    return cuda_kernels.device_view(buffer, folded, view)


def _gpu_residuals(options: _Options, dtype, buffers) -> list:
    return [_fold_gpu(buffer, trailing, dt if pairs else None)
            for buffer, (trailing, dt, pairs) in zip(buffers, _residual_layout(options.spec, np.dtype(dtype)))]


def _gpu_indices(targets, logit_lengths, target_lengths) -> list:
    return [_fold_gpu(a, k) for a, k in ((targets, 1), (logit_lengths, 0), (target_lengths, 0))]


def _forward_gpu(options: _Options, stream: int, out, logits_buf, targets_buf, logit_lengths_buf,
                 target_lengths_buf, draw_buf) -> None:
    """The forward callback on a GPU: lengths and labels come to the host for validation and the ``B``
    costs for the shared reduction (each a copy on XLA's stream and a wait); the rest stays on the GPU."""
    loss, residuals = out
    B = options.shape.batch
    with cuda_kernels.on_device(logits_buf.__dlpack_device__()[1]):
        idx = _gpu_indices(targets_buf, logit_lengths_buf, target_lengths_buf)
        host_idx = [np.ascontiguousarray(cuda_kernels.to_host(a, stream), dtype=np.int64) for a in idx]
        check_lengths_and_labels(*host_idx, options.shape)
        costs = cuda_kernels.empty(host_idx[2].shape, loss.dtype, stream)
        draws = [cuda_kernels.to_host(_fold_gpu(d, 0), stream) for d in draw_buf]
        family.cuda_forward(options.spec, _fold_gpu(logits_buf, 3), *idx, costs,
                            _gpu_residuals(options, logits_buf.dtype, residuals), stream,
                            label_head_only=_modes(options, draws))
        per_call = (-1, B) if options.reduction == "none" else (-1,)
        reduced = np.empty(loss.shape, dtype=loss.dtype)
        reduce_costs(cuda_kernels.to_host(costs, stream).reshape(-1, B), host_idx[2].reshape(-1, B),
                     options.reduction, reduced.reshape(per_call), options.mean_batch)
        cuda_kernels.copy_from_host(reduced, _fold_gpu(loss, 0), stream)


def _backward_gpu(options: _Options, stream: int, grads, logits_buf, targets_buf, logit_lengths_buf,
                  target_lengths_buf, residual_bufs, grad_loss_buf, draw_buf) -> None:
    """The backward callback on a GPU: the per-utterance gradient scale is computed on the host from the
    incoming gradient and the target lengths; ``cuda_kernels.backward`` copies it over, allocates the
    betas itself and waits for its kernels before returning (see its docstring)."""
    B = options.shape.batch
    with cuda_kernels.on_device(logits_buf.__dlpack_device__()[1]):
        idx = _gpu_indices(targets_buf, logit_lengths_buf, target_lengths_buf)
        target_lengths = cuda_kernels.to_host(idx[2], stream)
        per_call = (-1, B) if options.reduction == "none" else (-1,)
        grad_loss = cuda_kernels.to_host(_fold_gpu(grad_loss_buf, 0), stream).reshape(per_call)
        grad_scale = gradient_scale(grad_loss, target_lengths.reshape(-1, B), options.reduction,
                                    options.mean_batch).reshape(-1)
        draws = [cuda_kernels.to_host(_fold_gpu(d, 0), stream) for d in draw_buf]
        family.cuda_backward(options.spec, _fold_gpu(logits_buf, 3), *idx, grad_scale,
                             _gpu_residuals(options, logits_buf.dtype, residual_bufs), _fold_gpu(grads, 3), stream,
                             label_head_only=_modes(options, draws))


@dataclasses.dataclass(frozen=True)
class _ForwardCallback:
    """The forward ``buffer_callback``. A value object, not a closure: JAX caches compiled programs on the
    callback, so equal options must give an equal (and hashable) callback, and it must not capture arrays
    (a closure over the logits kept every eager call's program and logits alive). ``draw_buf``: TDT's
    omega draw (one per folded group), only when the loss draws one."""

    options: _Options

    def __call__(self, ctx, out, logits_buf, targets_buf, logit_lengths_buf, target_lengths_buf, *draw_buf) -> None:
        options = self.options
        if _on_gpu(logits_buf):
            return _forward_gpu(options, ctx.stream, out, logits_buf, targets_buf, logit_lengths_buf,
                                target_lengths_buf, draw_buf)
        B = options.shape.batch
        loss, residuals = out
        idx = _indices(targets_buf, logit_lengths_buf, target_lengths_buf)
        check_lengths_and_labels(*idx, options.shape)
        logits = cpu.as_kernel_array(_fold(logits_buf, 3))
        costs = np.empty(idx[2].shape, dtype=cpu.compute_dtype(np.dtype(logits_buf.dtype)))
        family.forward(options.spec, logits, *idx, costs, _host_residuals(options, logits_buf.dtype, residuals),
                       _modes(options, draw_buf))
        per_call = (-1, B) if options.reduction == "none" else (-1,)
        reduce_costs(costs.reshape(-1, B), idx[2].reshape(-1, B), options.reduction,
                     np.asarray(loss).reshape(per_call), options.mean_batch)


@dataclasses.dataclass(frozen=True)
class _BackwardCallback:
    """The backward ``buffer_callback`` (a value object, see :class:`_ForwardCallback`)."""

    options: _Options

    def __call__(self, ctx, grads, logits_buf, targets_buf, logit_lengths_buf, target_lengths_buf,
                 residual_bufs, grad_loss_buf, *draw_buf) -> None:
        options = self.options
        if _on_gpu(logits_buf):
            return _backward_gpu(options, ctx.stream, grads, logits_buf, targets_buf, logit_lengths_buf,
                                 target_lengths_buf, residual_bufs, grad_loss_buf, draw_buf)
        B = options.shape.batch
        idx = _indices(targets_buf, logit_lengths_buf, target_lengths_buf)
        per_call = (-1, B) if options.reduction == "none" else (-1,)
        grad_scale = gradient_scale(np.asarray(grad_loss_buf).reshape(per_call), idx[2].reshape(-1, B),
                                    options.reduction, options.mean_batch).reshape(-1)
        grads_host = cpu.as_kernel_array(_fold(grads, 3))
        cpu.advise_huge_pages(grads_host)  # XLA's fresh output buffer: fewer first-touch page faults
        family.backward(options.spec, cpu.as_kernel_array(_fold(logits_buf, 3)), *idx, grad_scale,
                        _host_residuals(options, logits_buf.dtype, residual_bufs), grads_host,
                        _modes(options, draw_buf))


def _keep_off_the_fast_path() -> None:
    """A no-op ``jax.debug.callback``. Its (unordered) effect keeps the enclosing jitted program off jaxlib's
    C++ dispatch path, which is used once a jitted function has run before and reports every run-time
    error as a plain ``ValueError``; JAX's Python path reports them as ``jax.errors.JaxRuntimeError``. So
    traced bad lengths or labels raise ``JaxRuntimeError`` on the first call and on every later one. The
    price is JAX's slower Python dispatch: 0.1-0.3 ms more per call of the jitted program on the 2-core
    test machine (0.07 -> 0.2-0.4 ms at a tiny shape, 2.2 -> 2.4 ms fwd+bwd at (4, 100, 30, 128))."""


_SECOND_ORDER = ("rnnt_xla.jax.rnnt_loss can be differentiated once, in reverse mode (jax.grad, jax.vjp, "
                 "jax.value_and_grad, jax.jacrev), w.r.t. the logits: its Numba kernels have no derivatives of "
                 "their own, so grad-of-grad, jax.hessian and forward mode over its gradient (jax.jvp, "
                 "jax.jacfwd) are not supported")


def _differentiable_once(fun, message: str = _SECOND_ORDER):
    """``fun(options, *arrays)`` (a kernel callback) as a ``custom_jvp`` whose JVP raises
    ``NotImplementedError(message)``. Reverse mode never differentiates the callbacks themselves (the
    ``custom_vjp`` replaces them); only a second derivative or forward mode over the gradient does, and
    then this names rnnt_xla instead of JAX's "Buffer callbacks do not support JVP"."""
    fun = jax.custom_jvp(fun, nondiff_argnums=(0,))

    @fun.defjvp
    def no_derivative(options, primals, tangents):
        raise NotImplementedError(message)

    return fun


def _draws(draw) -> tuple:
    """The optional draw as extra callback inputs."""
    return () if draw is None else (draw,)


@_differentiable_once
def _forward(options: _Options, logits, targets, logit_lengths, target_lengths, draw):
    """``(loss, residuals)``: the reduced loss (``(..., B)`` for ``"none"``) and the residuals
    (``family.residual_shapes``). ``draw``: TDT's omega draw, or ``None``."""
    loss_shape = logits.shape[:-3] if options.reduction == "none" else logits.shape[:-4]
    out_types = (jax.ShapeDtypeStruct(loss_shape, cpu.compute_dtype(logits.dtype)),
                 _residual_types(options.spec, logits))
    run = buffer_callback(_ForwardCallback(options), out_types, vmap_method="broadcast_all")
    inputs = (logits, targets, logit_lengths, target_lengths, *_draws(draw))
    if options.check_values:  # traced lengths and labels: the callback checks them and may raise
        jax.debug.callback(_keep_off_the_fast_path)
    return _mark_varying(run(*inputs), inputs)


@_differentiable_once
def _backward(options: _Options, logits, targets, logit_lengths, target_lengths, residuals, grad_loss, draw):
    """The gradient w.r.t. the logits, ``(..., B, T, U+1, V)`` in the logits' dtype."""
    run = buffer_callback(_BackwardCallback(options), jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                          vmap_method="broadcast_all")
    inputs = (logits, targets, logit_lengths, target_lengths, residuals, grad_loss, *_draws(draw))
    return _mark_varying(run(*inputs), inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rnnt_loss(options: _Options, logits, targets, logit_lengths, target_lengths, draw=None):
    loss, _ = _forward(options, logits, targets, logit_lengths, target_lengths, draw)
    return loss


def _rnnt_loss_fwd(options: _Options, logits, targets, logit_lengths, target_lengths, draw=None):
    loss, residuals = _forward(options, logits, targets, logit_lengths, target_lengths, draw)
    return loss, (logits, targets, logit_lengths, target_lengths, residuals, draw)


def _rnnt_loss_bwd(options: _Options, saved, grad_loss):
    logits, targets, logit_lengths, target_lengths, residuals, draw = saved
    grads = _backward(options, logits, targets, logit_lengths, target_lengths, residuals, grad_loss, draw)
    return grads, None, None, None, None


_rnnt_loss.defvjp(_rnnt_loss_fwd, _rnnt_loss_bwd)


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


class _BatchSplit(NamedTuple):
    """Static: the batch axis of every input is split evenly over these mesh axes."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    axes: tuple[str, ...]


_BATCH_AXIS_DOC = """
        batch_axis: mesh axis name (or tuple of names) over which the batch is sharded, for ``jit`` with
            ``NamedSharding`` inputs on *Auto* mesh axes, where the sharding is not visible while tracing.
            The mesh is that of the inputs, else the current one (``jax.set_mesh``). Each device then runs
            the kernels on its own shard (``shard_map``), and no logits are gathered. Not needed with
            Explicit axes or eagerly, where the batch sharding of the logits is seen and used by itself."""


def _family_loss(arrays: tuple, batch_axis, reduction: str, key=None, **options) -> jax.Array:
    """Every public loss: the checks (``validation.check_arguments`` with ``options``), the values' checks
    when concrete, TDT's omega draw from ``key``, and the jitted program."""
    names = ("logits", "targets", "logit_lengths", "target_lengths")
    shape = check_arguments(*(_spec(n, a) for n, a in zip(names, arrays)), reduction=reduction, **options)
    logits, targets, logit_lengths, target_lengths = arrays
    concrete = _is_concrete(targets, logit_lengths, target_lengths)
    if concrete:
        check_lengths_and_labels(*_indices(targets, logit_lengths, target_lengths), shape)
    options.pop("blank")
    spec = family.make_spec(shape, **options)
    draw = None
    if spec.uses_draw:
        if key is None:
            raise ValueError(f"key must be given (a jax.random key) when omega > 0 (omega={spec.omega}): with "
                             "probability omega a call uses the plain RNNT loss of the label scores")
        draw = jax.random.uniform(key, (), jnp.float32)
    if shape.batch == 0:  # an empty shard: a zero (or empty) loss, whose gradient is zero
        return jnp.zeros((0,) if reduction == "none" else (), cpu.compute_dtype(np.dtype(logits.dtype)))
    options = _Options(shape, reduction, spec, mean_batch=shape.batch, check_values=not concrete)
    # jnp.asarray on a traced JAX array inserts a copy of the logits in eager jax.grad: convert others only.
    arrays = tuple(a if isinstance(a, jax.Array) else jnp.asarray(a) for a in arrays)
    return _loss(options, _batch_split(arrays[0], batch_axis), *arrays, draw)


def rnnt_loss(
    logits: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
    rnnt_type: str = "regular",
    delay_penalty: float = 0.0,
    *,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """RNN-Transducer loss (Graves, 2012) with FastEmit and k2's variants; see ``rnnt_xla.torch.rnnt_loss``
    for the semantics.

    Args:
        logits: ``(B, T, U+1, V)`` float32/float16/bfloat16 (float64 with ``jax_enable_x64``) joiner output
            (log-probs if ``fused_log_softmax=False``); 16-bit logits are computed in float32 and get a
            gradient in their own dtype.
        targets: ``(B, W)`` int32/int64 labels, ``W >= max(target_lengths)``.
        logit_lengths: ``(B,)`` int32/int64, in ``[1, T]``.
        target_lengths: ``(B,)`` int32/int64, in ``[0, min(U, W)]``.
        blank, clamp, reduction, fused_log_softmax, fastemit_lambda, rnnt_type, delay_penalty: static Python
            values, as in torch.{batch_axis}

    Returns:
        ``(B,)`` costs for ``reduction="none"``, else a scalar: float64 for float64 logits, else float32.
        Differentiable once, in reverse mode, w.r.t. ``logits`` only.

    Raises:
        TypeError, ValueError: invalid shapes, dtypes, options or ``batch_axis``; invalid lengths or labels
            when their values are concrete.
        jax.errors.JaxRuntimeError: invalid lengths or labels that are traced (under ``jit``): raised when
            the program runs, with the ``ValueError``'s message.
    """
    return _family_loss((logits, targets, logit_lengths, target_lengths), batch_axis, reduction, blank=blank,
                        clamp=clamp, fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda,
                        rnnt_type=rnnt_type, delay_penalty=delay_penalty)


def tdt_loss(
    logits: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    durations,
    blank: int = -1,
    sigma: float = 0.0,
    omega: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
    *,
    key: jax.Array | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Token-and-Duration Transducer loss; see ``rnnt_xla.torch.tdt_loss`` for the semantics.

    Args:
        logits: ``(B, T, U+1, V + len(durations))``: the label scores (blank among them, default the last)
            then the duration scores; dtypes as :func:`rnnt_loss`.
        targets, logit_lengths, target_lengths: as :func:`rnnt_loss`.
        durations, blank, sigma, omega, clamp, reduction, fastemit_lambda: static Python values, as in torch.
        key: a ``jax.random`` key, required when ``omega > 0``: the call uses the plain RNNT loss of the label
            scores when ``jax.random.uniform(key) < omega`` (traced; under ``vmap`` with a batched key,
            per example).{batch_axis}

    Returns / Raises: as :func:`rnnt_loss`.
    """
    return _family_loss((logits, targets, logit_lengths, target_lengths), batch_axis, reduction, key=key,
                        kind="tdt", blank=blank, clamp=clamp, fused_log_softmax=True, fastemit_lambda=fastemit_lambda,
                        durations=durations, sigma=sigma, omega=omega)


def multiblank_rnnt_loss(
    logits: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    big_blank_durations,
    blank: int = -1,
    sigma: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
    *,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Multi-blank RNN-Transducer loss; see ``rnnt_xla.torch.multiblank_rnnt_loss`` for the semantics.

    Args:
        logits: ``(B, T, U+1, V)``: labels, big blanks (big blank ``i`` at ``blank - 1 - i``), then the
            standard blank; dtypes as :func:`rnnt_loss`.
        targets, logit_lengths, target_lengths: as :func:`rnnt_loss`.
        big_blank_durations, blank, sigma, clamp, reduction, fastemit_lambda: static Python values, as in
            torch.{batch_axis}

    Returns / Raises: as :func:`rnnt_loss`.
    """
    return _family_loss((logits, targets, logit_lengths, target_lengths), batch_axis, reduction,
                        kind="multiblank", blank=blank, clamp=clamp, fused_log_softmax=True,
                        fastemit_lambda=fastemit_lambda, durations=big_blank_durations, sigma=sigma)


for _function in (rnnt_loss, tdt_loss, multiblank_rnnt_loss):
    if _function.__doc__:  # None under python -OO
        _function.__doc__ = _function.__doc__.replace("{batch_axis}", _BATCH_AXIS_DOC)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _loss(options: _Options, split: _BatchSplit | None, logits, targets, logit_lengths, target_lengths, draw):
    """The loss as one jitted program, so that an eager call runs one cached program for its shape and
    options instead of dispatching each operation on its own; under an outer ``jit`` it is inlined.
    ``draw``: TDT's omega draw, or ``None``."""
    if split is not None:
        return _sharded_over_batch(options, split, logits, targets, logit_lengths, target_lengths, draw)
    # Arrays explicitly sharded other than over the batch: the kernels need whole rows, so gather them.
    arrays = [_replicated(a) for a in (logits, targets, logit_lengths, target_lengths)]
    return _rnnt_loss(options, *arrays, draw)


def _replicated(a: jax.Array) -> jax.Array:
    """``a`` gathered onto every device of its mesh if it is explicitly sharded, else ``a`` itself."""
    sharding = jax.typeof(a).sharding
    if getattr(sharding, "spec", None) and any(s is not None for s in sharding.spec):
        return jax.reshard(a, NamedSharding(sharding.mesh, P()))
    return a


def _batch_split(logits: jax.Array, batch_axis: str | tuple[str, ...] | None) -> _BatchSplit | None:
    """How the batch of the logits is split over a mesh: the given ``batch_axis``, else what the logits'
    sharding says (their type's with Explicit axes; the concrete array's when eager)."""
    typed = jax.typeof(logits).sharding
    if batch_axis is not None:
        axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
        mesh = typed.mesh if not typed.mesh.empty else jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError(f"batch_axis={batch_axis!r} needs a mesh: shard the inputs with a NamedSharding "
                             "or set one with jax.set_mesh")
        if not axes or any(not isinstance(a, str) or a not in mesh.axis_names for a in axes):
            raise ValueError(f"batch_axis must name axes of the mesh {tuple(mesh.axis_names)}, "
                             f"got {batch_axis!r}")
        if all(a in mesh.manual_axes for a in axes):
            return None  # inside the user's shard_map over these axes: the logits are already one shard
        if logits.shape[0] % _mesh_size(mesh, axes):
            raise ValueError(f"batch_axis={batch_axis!r} splits the batch over {_mesh_size(mesh, axes)} "
                             f"devices, which must divide the batch size {logits.shape[0]}")
        return _BatchSplit(mesh, axes)
    mesh, spec = typed.mesh, typed.spec
    if (not spec or spec[0] is None) and _is_concrete(logits) and isinstance(logits.sharding, NamedSharding):
        mesh, spec = logits.sharding.mesh, logits.sharding.spec  # eager, Auto axes
    if not spec or spec[0] is None:
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return _BatchSplit(mesh, axes) if logits.shape[0] % _mesh_size(mesh, axes) == 0 else None


def _sharded_over_batch(options: _Options, split: _BatchSplit, logits, targets, logit_lengths, target_lengths,
                        draw=None):
    """Each device runs the kernels on its own shard of the batch (``shard_map``); the reduced loss is
    summed across devices and the gradient keeps the batch sharding of the logits. No logits are gathered
    (only the other axes of logits that are also sharded elsewhere than over the batch). TDT's omega
    ``draw`` is the same on every device."""
    mesh, axes = split
    spec = P(axes)
    local = options._replace(shape=dataclasses.replace(options.shape, batch=logits.shape[0] // _mesh_size(mesh, axes)))
    arrays = [_resharded(a, mesh, spec) for a in (logits, targets, logit_lengths, target_lengths)]
    draws = () if draw is None else (draw,)

    def per_shard(*shard):
        shard = (*shard[:4], shard[4] if draws else None)
        if options.reduction == "mean_volume":  # the volume is the whole batch's: sum, then divide by it
            loss = jax.lax.psum(_rnnt_loss(local._replace(reduction="sum"), *shard), axes)
            volume = jax.lax.psum(jnp.sum(shard[3]), axes)
            return loss / jnp.maximum(volume, 1).astype(loss.dtype)
        loss = _rnnt_loss(local, *shard)
        return loss if options.reduction == "none" else jax.lax.psum(loss, axes)

    out_spec = spec if options.reduction == "none" else P()
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,) * 4 + (P(),) * len(draws),
                         out_specs=out_spec)(*arrays, *draws)


def _resharded(a: jax.Array, mesh, spec: P) -> jax.Array:
    """``a`` resharded to ``spec`` on an Explicit ``mesh`` unless it already is (``shard_map`` requires
    explicitly sharded inputs to match its ``in_specs``); on Auto axes ``shard_map`` reshards by itself."""
    if AxisType.Explicit not in mesh.axis_types:
        return a
    sharding = jax.typeof(a).sharding
    current = tuple(sharding.spec) + (None,) * (a.ndim - len(sharding.spec))
    wanted = tuple(spec) + (None,) * (a.ndim - len(spec))
    if not sharding.mesh.empty and current == wanted:
        return a
    # Also arrays on no mesh at all (targets and lengths the user did not shard with the logits)
    return jax.reshard(a, NamedSharding(mesh, spec))


def _mesh_size(mesh, axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def __getattr__(name: str):
    """``fused_rnnt_loss`` lives in ``rnnt_xla.jax_fused`` (it uses this module's helpers); loaded on first
    use, so either module can be imported first."""
    if name == "fused_rnnt_loss":
        from .jax_fused import fused_rnnt_loss

        return fused_rnnt_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
