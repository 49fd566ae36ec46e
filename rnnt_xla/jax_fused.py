"""Fused joint network + RNNT loss for JAX: the exact loss and gradients without the full logits.

``fused_rnnt_loss(joint_fn, params, encoder_out, predictor_out, ...)`` equals
``rnnt_loss(joint_fn(params, encoder_out, predictor_out), ...)`` - costs and the gradients w.r.t. ``params``
(any pytree), ``encoder_out`` and ``predictor_out`` - but the joint runs on one tile of utterances and
frames at a time, inside a ``lax.scan``: in the forward pass each tile's logits give their row normalisers
and blank/label log-probabilities (a Numba kernel in a ``buffer_callback``) and are dropped; the lattice
needs only those ``O(B*T*U)`` values; the backward pass evaluates each tile again, writes its gradient with
the kernel ``rnnt_loss`` uses and pulls it back through the joint with ``jax.vjp``.

Under ``jit`` the lengths are traced, so tiles are cut from the padded ``(B, T, U+1)`` grid: a tile is
``tile_b`` utterances by ``tile_t`` frames by all ``U+1`` label positions (the torch version, which sees the
lengths, also trims padding). ``joint_fn`` must be pure (a dropout key in ``params`` or a closure gives the
same mask in both passes).

On a GPU the same callbacks get device buffers and run ``rnnt_xla.kernels.cuda``'s passes on XLA's stream
(``ctx.stream``), on zero-copy views of XLA's buffers, as ``rnnt_loss`` does. A tile's kernels run on the
whole tile, its padding rows as empty utterances (so the gradient kernel writes every entry); the gradient
reads the tile's lattice values through strided views of the whole-batch arrays, so nothing is gathered.
Per tile, the lengths and labels (``B*(W + 2)`` values, for the checks), the tile's offsets and in backward
the incoming gradient come to the host, and the tile's lengths and gradient scale go back (``tile_b*(W + 3)``
values, in Numba's memory: the callback waits for its kernels before returning). The forward lattice brings
the ``B`` costs to the host for the shared reduction; the backward one runs on the device alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from .jax import (_BatchSplit, _batch_split, _differentiable_once, _fold_gpu, _is_concrete, _keep_off_the_fast_path,
                  _mark_varying, _mesh_size, _on_gpu, _resharded)
from .kernels import cpu
from .kernels import cuda as cuda_kernels
from .reductions import gradient_scale, reduce_costs
from .tiling import default_tile_bytes
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["fused_rnnt_loss"]

JointFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class _Options(NamedTuple):
    """Static arguments: problem sizes, loss options and the tile grid."""

    shape: LossShape
    reduction: str
    fastemit_lambda: float
    clamp: float
    tile_b: int  # utterances per tile
    tile_t: int  # frames per tile
    logits_dtype: str  # of the joint's output
    check_values: bool  # lengths and labels were traced: the callbacks check them
    mean_batch: int  # the B of "mean" reductions: the whole batch, also when this call sees one shard


def _f64(buffer) -> np.ndarray:
    """A float64 array stored as ``(..., 2)`` uint32 (float64 without ``jax_enable_x64``), as float64."""
    return np.asarray(buffer).view(np.float64)[..., 0]


def _f64_gpu(view):
    """:func:`_f64` for a Numba device view of a GPU buffer: a zero-copy float64 view."""
    return cuda_kernels.device_view(view, tuple(view.shape[:-1]), np.float64)


def _f64_type(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape) + (2,), jnp.uint32)


def _loss_shape(options: _Options) -> tuple[int, ...]:
    return (options.shape.batch,) if options.reduction == "none" else ()


def _indices(*buffers) -> list[np.ndarray]:
    """int64 copies of index buffers (the kernels are compiled for int64)."""
    return [np.asarray(a).astype(np.int64) for a in buffers]


def _host_indices(stream: int, *views) -> list[np.ndarray]:
    """:func:`_indices` of GPU views: host copies (each a copy on XLA's stream and a wait)."""
    return [cuda_kernels.to_host(v, stream).astype(np.int64) for v in views]


def _instances(buffers, ranks):
    """Under ``vmap`` (``vmap_method="broadcast_all"``) every buffer gets the same leading axes: yield, for
    each leading index, the buffers' numpy views at that index (``ranks``: each buffer's own rank)."""
    arrays = [np.asarray(b) for b in buffers]
    lead = arrays[0].shape[:arrays[0].ndim - ranks[0]]
    for index in np.ndindex(lead):
        yield [a[index + (Ellipsis,)] for a in arrays]  # with the Ellipsis a 0-d result is a view too


def _gpu_instances(buffers, ranks):
    """:func:`_instances` for GPU buffers: Numba device views (bfloat16 as its int16 bits), a 0-d one as a
    ``(1,)`` view (device arrays index to views with slices only)."""
    views = [_fold_gpu(b, rank) for b, rank in zip(buffers, ranks)]  # leading axes folded into one
    for i in range(views[0].shape[0]):
        yield [v[i] if v.ndim > 1 else v[i:i + 1] for v in views]


def _each_instance(ctx, buffers, ranks, on_host, on_gpu) -> None:
    """``on_host(*arrays)`` for each instance (:func:`_instances`), or when the buffers are in GPU memory
    ``on_gpu(ctx.stream, *views)`` (:func:`_gpu_instances`), in their GPU's context. The last buffer (an input,
    as in ``rnnt_xla.jax``) says where they are."""
    if not _on_gpu(buffers[-1]):
        for arrays in _instances(buffers, ranks):
            on_host(*arrays)
        return
    with cuda_kernels.on_device(buffers[-1].__dlpack_device__()[1]):
        for views in _gpu_instances(buffers, ranks):
            on_gpu(ctx.stream, *views)


def _tile_rows(options: _Options, offsets) -> tuple[slice, int, int]:
    """The tile's utterances (a slice of the batch; the last tile may reach into padding), its first frame
    and how many of its rows are real utterances."""
    b0, t0 = (int(v) for v in np.asarray(offsets))
    rows = slice(b0, min(b0 + options.tile_b, options.shape.batch))
    return rows, t0, rows.stop - rows.start


def _tile_indices(rows: slice, t0: int, targets, frames, labels) -> list[np.ndarray]:
    """The tile's utterances' labels, frame counts from the tile's first frame and target lengths."""
    return [targets[rows], frames[rows] - t0, labels[rows]]


def _gpu_tile_indices(options: _Options, stream: int, rows: slice, t0: int, host, like) -> list:
    """:func:`_tile_indices` on the GPU, padded with empty utterances to ``tile_b`` rows (the kernels then
    skip the padding rows, or write them with exact zeros), in the dtypes of the views ``like``. Numba's
    memory: the caller synchronises the stream before it returns."""
    padded = []
    for part, view in zip(_tile_indices(rows, t0, *host), like):
        a = np.zeros((options.tile_b,) + part.shape[1:], dtype=view.dtype)
        a[:len(part)] = part
        padded.append(cuda_kernels.to_device(a, stream))
    return padded


@dataclasses.dataclass(frozen=True)
class _TileNormalisers:
    """Pass 1 on one tile: row normalisers and blank/label log-probabilities of ``(tile_b, tile_t, U+1)``.

    The lengths and labels of the whole batch come in (``B*(W + 2)`` values) and are checked here, before
    any kernel reads with them, when they were traced (a value object: see ``rnnt_xla.jax``)."""

    options: _Options

    def __call__(self, ctx, out, *inputs) -> None:
        _each_instance(ctx, [*out, *inputs], (3, 4, 4, 4, 2, 1, 1, 1), self.one, self.one_gpu)

    def one(self, log_norm, log_blank, log_emit, logits_buf, targets_buf, frames_buf, labels_buf, offsets_buf):
        options = self.options
        targets, frames, labels = _indices(targets_buf, frames_buf, labels_buf)
        check_lengths_and_labels(targets, frames, labels, options.shape)
        rows, t0, n = _tile_rows(options, offsets_buf)
        for a in (log_norm, log_blank, log_emit):  # padding rows and cells are never read; keep them defined
            a[...] = 0
        blank_f64, emit_f64 = _f64(log_blank), _f64(log_emit)
        part = cpu.Residuals(log_norm[:n], blank_f64[:n], emit_f64[:n], None, None)  # pass 1 writes these
        cpu.normalise(cpu.as_kernel_array(np.asarray(logits_buf))[:n], *_tile_indices(rows, t0, targets, frames,
                      labels), options.shape.blank, True, part)

    def one_gpu(self, stream, log_norm, log_blank, log_emit, logits, targets_buf, frames_buf, labels_buf,
                offsets_buf):
        """:meth:`one` on the GPU: the kernel runs on the whole tile, its padding rows empty utterances."""
        options = self.options
        host = _host_indices(stream, targets_buf, frames_buf, labels_buf)
        check_lengths_and_labels(*host, options.shape)
        rows, t0, _ = _tile_rows(options, cuda_kernels.to_host(offsets_buf, stream))
        part = cpu.Residuals(log_norm, _f64_gpu(log_blank), _f64_gpu(log_emit), None, None)
        for a in part[:3]:  # the kernel skips the padding rows and cells
            cuda_kernels.fill(a, 0.0, stream)
        indices = _gpu_tile_indices(options, stream, rows, t0, host, (targets_buf, frames_buf, labels_buf))
        cuda_kernels.normalise(logits, *indices, options.shape.blank, True, part, stream)
        cuda_kernels.synchronize(stream)  # before Numba frees the tile's indices


@dataclasses.dataclass(frozen=True)
class _Lattice:
    """Pass 2 over the whole batch: alphas, log-likelihoods and the reduced loss."""

    options: _Options

    def __call__(self, ctx, out, *inputs) -> None:
        loss_rank = len(_loss_shape(self.options))
        _each_instance(ctx, [*out, *inputs], (loss_rank, 4, 2, 4, 4, 1, 1), self.one, self.one_gpu)

    def one(self, loss, alphas, log_likelihood, log_blank_buf, log_emit_buf, frames_buf, labels_buf) -> None:
        options = self.options
        frames, labels = _indices(frames_buf, labels_buf)
        costs = np.empty(options.shape.batch, dtype=np.asarray(loss).dtype)
        residuals = cpu.Residuals(None, _f64(log_blank_buf), _f64(log_emit_buf), _f64(alphas), _f64(log_likelihood))
        cpu.lattice_forward(frames, labels, options.fastemit_lambda, residuals, costs)
        reduce_costs(costs[None], labels[None], options.reduction, np.asarray(loss)[None], options.mean_batch)

    def one_gpu(self, stream, loss, alphas, log_likelihood, log_blank, log_emit, frames_buf, labels_buf) -> None:
        """:meth:`one` on the GPU: the ``B`` costs and the target lengths come to the host for the reduction."""
        options = self.options
        costs = cuda_kernels.empty((options.shape.batch,), loss.dtype, stream)
        residuals = cpu.Residuals(None, _f64_gpu(log_blank), _f64_gpu(log_emit), _f64_gpu(alphas),
                                  _f64_gpu(log_likelihood))
        cuda_kernels.lattice_forward(frames_buf, labels_buf, options.fastemit_lambda, residuals, costs, stream)
        labels, = _host_indices(stream, labels_buf)
        reduced = np.empty(_loss_shape(options), dtype=loss.dtype)
        reduce_costs(cuda_kernels.to_host(costs, stream)[None], labels[None], options.reduction, reduced[None],
                     options.mean_batch)
        cuda_kernels.copy_from_host(reduced, loss, stream)


@dataclasses.dataclass(frozen=True)
class _Betas:
    """Pass 3 over the whole batch: the backward variables."""

    options: _Options

    def __call__(self, ctx, out, *inputs) -> None:
        _each_instance(ctx, [out, *inputs], (4, 4, 4, 1, 1), self.one, self.one_gpu)

    def one(self, betas, log_blank_buf, log_emit_buf, frames_buf, labels_buf) -> None:
        frames, labels = _indices(frames_buf, labels_buf)
        residuals = cpu.Residuals(None, _f64(log_blank_buf), _f64(log_emit_buf), None, None)
        cpu.lattice_backward(frames, labels, residuals, _f64(betas))

    def one_gpu(self, stream, betas, log_blank, log_emit, frames_buf, labels_buf) -> None:
        """:meth:`one` on the GPU (nothing crosses to the host)."""
        residuals = cpu.Residuals(None, _f64_gpu(log_blank), _f64_gpu(log_emit), None, None)
        cuda_kernels.lattice_backward(frames_buf, labels_buf, residuals, _f64_gpu(betas), stream)


@dataclasses.dataclass(frozen=True)
class _TileGradients:
    """Pass 4 on one tile: the gradient w.r.t. the tile's logits, clamped and scaled by the reduction and
    the incoming cotangent. The lattice values of the tile are gathered from the whole-batch arrays."""

    options: _Options

    def __call__(self, ctx, out, *inputs) -> None:
        loss_rank = len(_loss_shape(self.options))
        _each_instance(ctx, [out, *inputs], (4, 4, 2, 1, 1, 1, 3, 4, 4, 4, 4, 2, loss_rank), self.one,
                       self.one_gpu)

    def one(self, grads_buf, logits_buf, targets_buf, frames_buf, labels_buf, offsets_buf, log_norm_buf,
            log_blank_buf, log_emit_buf, alphas_buf, betas_buf, log_likelihood_buf, grad_loss_buf) -> None:
        options = self.options
        T = options.shape.max_frames
        targets, frames, labels = _indices(targets_buf, frames_buf, labels_buf)
        rows, t0, n = _tile_rows(options, offsets_buf)
        t1 = min(t0 + options.tile_t, T)
        grads = cpu.as_kernel_array(np.asarray(grads_buf))
        grads[n:] = 0
        grads[:n, t1 - t0:] = 0  # frames of the last tile past T (padding of the tile grid)
        if t1 <= t0 or n == 0:
            return
        scale = gradient_scale(np.asarray(grad_loss_buf)[None], labels[None], options.reduction,
                               options.mean_batch)[0]
        residuals = [np.ascontiguousarray(a[rows, t0:t1]) for a in
                     (np.asarray(log_norm_buf), _f64(log_blank_buf), _f64(log_emit_buf), _f64(alphas_buf))]
        betas = _f64(betas_buf)
        tile_betas = np.zeros((n, t1 - t0 + 1, betas.shape[2]))  # one frame more: betas[t + 1] of the last
        tile_betas[:, :min(t1 + 1, T) - t0] = betas[rows, t0:t1 + 1]
        logits = np.ascontiguousarray(cpu.as_kernel_array(np.asarray(logits_buf))[:n, :t1 - t0])
        out = np.empty_like(logits)
        cpu.gradient(logits, *_tile_indices(rows, t0, targets, frames, labels), options.shape.blank, True,
                     options.fastemit_lambda, options.clamp, scale[rows],
                     cpu.Residuals(*residuals, _f64(log_likelihood_buf)[rows]), tile_betas, out)
        grads[:n, :t1 - t0] = out

    def one_gpu(self, stream, grads, logits, targets_buf, frames_buf, labels_buf, offsets_buf, log_norm, log_blank,
                log_emit, alphas, betas, log_likelihood, grad_loss) -> None:
        """:meth:`one` on the GPU: the kernel runs on the whole tile (its padding rows empty utterances, so
        every entry of the gradient is written) and reads the tile's lattice values through strided views of
        the whole-batch arrays (no gather). The lengths, labels and incoming gradient come to the host for
        the gradient scale; the tile's lengths and scale go back (``tile_b`` values each)."""
        options = self.options
        host = _host_indices(stream, targets_buf, frames_buf, labels_buf)
        rows, t0, n = _tile_rows(options, cuda_kernels.to_host(offsets_buf, stream))
        frames = slice(t0, t0 + options.tile_t)  # cut at T by the views
        grad_loss_host = cuda_kernels.to_host(grad_loss, stream).reshape(_loss_shape(options))
        batch_scale = gradient_scale(grad_loss_host[None], host[2][None], options.reduction, options.mean_batch)[0]
        scale = np.zeros(options.tile_b)
        scale[:n] = batch_scale[rows]
        residuals = cpu.Residuals(*(a[rows, frames] for a in (log_norm, _f64_gpu(log_blank), _f64_gpu(log_emit),
                                                               _f64_gpu(alphas))), _f64_gpu(log_likelihood)[rows])
        tile_betas = _f64_gpu(betas)[rows, t0:frames.stop + 1]  # one frame more: betas[t + 1] of the last
        indices = _gpu_tile_indices(options, stream, rows, t0, host, (targets_buf, frames_buf, labels_buf))
        cuda_kernels.gradient(logits, *indices, options.shape.blank, True, options.fastemit_lambda, options.clamp,
                              cuda_kernels.to_device(scale, stream), residuals, tile_betas, grads, stream)
        cuda_kernels.synchronize(stream)  # before Numba frees the tile's indices and scale


_SECOND_ORDER = ("rnnt_xla.jax.fused_rnnt_loss can be differentiated once, in reverse mode (jax.grad, jax.vjp, "
                 "jax.value_and_grad, jax.jacrev), w.r.t. params, encoder_out and predictor_out: its Numba kernels "
                 "have no derivatives of their own, so grad-of-grad, jax.hessian and forward mode over its "
                 "gradient (jax.jvp, jax.jacfwd) are not supported")
_once = functools.partial(_differentiable_once, message=_SECOND_ORDER)


@_once
def _normalise(options: _Options, logits, targets, frames, labels, offsets):
    """Pass 1 on one tile (:class:`_TileNormalisers`)."""
    tb, tt, U1 = options.tile_b, options.tile_t, options.shape.max_labels + 1
    compute = cpu.compute_dtype(np.dtype(options.logits_dtype))
    run = buffer_callback(_TileNormalisers(options), (
        jax.ShapeDtypeStruct((tb, tt, U1), compute), _f64_type((tb, tt, U1)), _f64_type((tb, tt, U1))),
        vmap_method="broadcast_all")
    inputs = (logits, targets, frames, labels, offsets)
    return _mark_varying(run(*inputs), inputs)


@_once
def _lattice(options: _Options, log_blank, log_emit, frames, labels):
    """Pass 2 over the batch (:class:`_Lattice`): ``(loss, alphas, log_likelihood)``."""
    B, T, U1 = options.shape.batch, options.shape.max_frames, options.shape.max_labels + 1
    compute = cpu.compute_dtype(np.dtype(options.logits_dtype))
    run = buffer_callback(_Lattice(options), (
        jax.ShapeDtypeStruct(_loss_shape(options), compute), _f64_type((B, T, U1)), _f64_type((B,))),
        vmap_method="broadcast_all")
    inputs = (log_blank, log_emit, frames, labels)
    return _mark_varying(run(*inputs), inputs)


@_once
def _betas(options: _Options, log_blank, log_emit, frames, labels):
    """Pass 3 over the batch (:class:`_Betas`)."""
    B, T, U1 = options.shape.batch, options.shape.max_frames, options.shape.max_labels + 1
    run = buffer_callback(_Betas(options), _f64_type((B, T, U1)), vmap_method="broadcast_all")
    inputs = (log_blank, log_emit, frames, labels)
    return _mark_varying(run(*inputs), inputs)


@_once
def _tile_gradients(options: _Options, logits, *arrays):
    """Pass 4 on one tile (:class:`_TileGradients`): the gradient w.r.t. the tile's logits."""
    run = buffer_callback(_TileGradients(options), jax.ShapeDtypeStruct(logits.shape, logits.dtype),
                          vmap_method="broadcast_all")
    return _mark_varying(run(logits, *arrays), (logits, *arrays))


def _tile_grid(options: _Options) -> tuple[int, int]:
    B, T = options.shape.batch, options.shape.max_frames
    return -(-B // options.tile_b), -(-T // options.tile_t)


def _pad_to_grid(options: _Options, encoder_out, predictor_out):
    """Zero-pad the batch and frame axes to whole tiles (dynamic_slice would otherwise clamp the start)."""
    nb, nt = _tile_grid(options)
    B, T = options.shape.batch, options.shape.max_frames
    enc = jnp.pad(encoder_out, ((0, nb * options.tile_b - B), (0, nt * options.tile_t - T), (0, 0)))
    pred = jnp.pad(predictor_out, ((0, nb * options.tile_b - B), (0, 0), (0, 0)))
    return enc, pred


def _tile_offsets(options: _Options) -> jax.Array:
    """``(K, 2)`` int32: the first utterance and frame of every tile, batch-major."""
    nb, nt = _tile_grid(options)
    grid = np.stack(np.meshgrid(np.arange(nb) * options.tile_b, np.arange(nt) * options.tile_t, indexing="ij"), -1)
    return jnp.asarray(grid.reshape(-1, 2), dtype=jnp.int32)


def _tile_inputs(options: _Options, enc, pred, offsets):
    b0, t0 = offsets[0], offsets[1]
    enc_t = jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_slice_in_dim(enc, b0, options.tile_b, 0), t0,
                                         options.tile_t, 1)
    pred_t = jax.lax.dynamic_slice_in_dim(pred, b0, options.tile_b, 0)
    return enc_t, pred_t


def _assemble(options: _Options, tiles: jax.Array) -> jax.Array:
    """``(K, tile_b, tile_t, ...)`` per-tile values back to ``(B, T, ...)``."""
    nb, nt = _tile_grid(options)
    tb, tt = options.tile_b, options.tile_t
    rest = tiles.shape[3:]
    full = tiles.reshape((nb, nt, tb, tt) + rest).swapaxes(1, 2).reshape((nb * tb, nt * tt) + rest)
    return full[:options.shape.batch, :options.shape.max_frames]


def _forward(options: _Options, joint_fn: JointFn, params, encoder_out, predictor_out, targets, frames, labels):
    enc, pred = _pad_to_grid(options, encoder_out, predictor_out)
    if options.check_values:  # traced lengths and labels, checked in the callbacks (see rnnt_xla.jax)
        jax.debug.callback(_keep_off_the_fast_path)

    def tile(_, offsets):
        enc_t, pred_t = _tile_inputs(options, enc, pred, offsets)
        logits = joint_fn(params, enc_t, pred_t)
        return None, _normalise(options, logits, targets, frames, labels, offsets)

    _, per_tile = jax.lax.scan(tile, None, _tile_offsets(options))
    log_norm, log_blank, log_emit = (_assemble(options, a) for a in per_tile)
    loss, alphas, log_likelihood = _lattice(options, log_blank, log_emit, frames, labels)
    return loss, (log_norm, log_blank, log_emit, alphas, log_likelihood)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(options, joint_fn, params, encoder_out, predictor_out, targets, frames, labels):
    return _forward(options, joint_fn, params, encoder_out, predictor_out, targets, frames, labels)[0]


def _fused_fwd(options, joint_fn, params, encoder_out, predictor_out, targets, frames, labels):
    loss, residuals = _forward(options, joint_fn, params, encoder_out, predictor_out, targets, frames, labels)
    return loss, (params, encoder_out, predictor_out, targets, frames, labels, residuals)


def _fused_bwd(options, joint_fn, saved, grad_loss):
    params, encoder_out, predictor_out, targets, frames, labels, residuals = saved
    log_norm, log_blank, log_emit, alphas, log_likelihood = residuals
    B = options.shape.batch
    betas = _betas(options, log_blank, log_emit, frames, labels)
    enc, pred = _pad_to_grid(options, encoder_out, predictor_out)
    tb = options.tile_b

    def tile(carry, offsets):
        grad_params, grad_pred = carry
        enc_t, pred_t = _tile_inputs(options, enc, pred, offsets)
        logits, pull_back = jax.vjp(lambda p, e, d: joint_fn(p, e, d), params, enc_t, pred_t)
        grads = _tile_gradients(options, logits, targets, frames, labels, offsets, log_norm, log_blank, log_emit,
                                alphas, betas, log_likelihood, grad_loss)
        d_params, d_enc, d_pred = pull_back(grads)
        grad_params = jax.tree.map(jnp.add, grad_params, d_params)
        grad_pred = jax.lax.dynamic_update_slice_in_dim(
            grad_pred, jax.lax.dynamic_slice_in_dim(grad_pred, offsets[0], tb, 0) + d_pred, offsets[0], 0)
        return (grad_params, grad_pred), d_enc

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(pred))
    (grad_params, grad_pred), grad_enc_tiles = jax.lax.scan(tile, zeros, _tile_offsets(options))
    grad_enc = _assemble(options, grad_enc_tiles)
    return grad_params, grad_enc.astype(encoder_out.dtype), grad_pred[:B].astype(predictor_out.dtype), None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _tile_sizes(B: int, T: int, U1: int, V: int, itemsize: int, tile_bytes: int) -> tuple[int, int]:
    """``(tile_b, tile_t)``: whole frames of the whole batch when they fit, else frames of fewer utterances."""
    frame = U1 * V * itemsize  # one frame of one utterance
    if frame > tile_bytes:
        raise ValueError(f"tile_bytes must hold at least one frame of one utterance: (U + 1) * V * itemsize = "
                         f"{frame} bytes, got tile_bytes={tile_bytes}")
    if B * frame <= tile_bytes:
        return B, min(T, tile_bytes // (B * frame))
    return tile_bytes // frame, 1


def _runs_on_gpu(x) -> bool:
    """Whether ``x`` is on a GPU; for a tracer (no device yet), whether JAX's default backend is a GPU."""
    try:
        return any(d.platform in ("gpu", "cuda", "rocm") for d in x.devices())
    except Exception:  # a tracer (ConcretizationTypeError) or a numpy array
        return jax.default_backend() in ("gpu", "cuda", "rocm")


def fused_rnnt_loss(
    joint_fn: JointFn,
    params: Any,
    encoder_out: jax.Array,
    predictor_out: jax.Array,
    targets: jax.Array,
    logit_lengths: jax.Array,
    target_lengths: jax.Array,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
    tile_bytes: int | None = None,
    *,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """``rnnt_loss(joint_fn(params, encoder_out, predictor_out), ...)`` without the full logits.

    Args:
        joint_fn: ``joint_fn(params, enc: (b, t, E), pred: (b, U+1, P)) -> logits (b, t, U+1, V)``, pure,
            e.g. ``lambda p, e, d: model.apply(p, e, d, method=Model.joint)`` for a Flax model.
        params: any pytree of arrays; differentiable.
        encoder_out: ``(B, T, E)``, predictor_out: ``(B, U+1, P)``; differentiable.
        targets, logit_lengths, target_lengths, blank, clamp, reduction, fastemit_lambda: as ``rnnt_loss``.
        tile_bytes: the most bytes one tile's logits take (default ``rnnt_xla.tiling.default_tile_bytes``: 16 MB on
            the CPU, 256 MB when ``encoder_out`` is on a GPU or, traced, JAX's default backend is one).
        batch_axis: as ``rnnt_loss``: the mesh axes that shard the batch, when the sharding of
            ``encoder_out`` does not say so (Auto axes under ``jit``); each device then runs its own shard.

    Returns:
        As ``rnnt_loss``; differentiable w.r.t. ``params``, ``encoder_out`` and ``predictor_out``.
    """
    for name, x in (("encoder_out", encoder_out), ("predictor_out", predictor_out)):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")) or len(x.shape) != 3:
            raise ValueError(f"{name} must be an array with 3 dimensions, got {getattr(x, 'shape', type(x).__name__)}")
    if predictor_out.shape[0] != encoder_out.shape[0]:
        raise ValueError(f"predictor_out must have batch size {encoder_out.shape[0]} (as encoder_out), got shape "
                         f"{tuple(predictor_out.shape)}")
    if not callable(joint_fn):
        raise TypeError(f"joint_fn must be callable, got {type(joint_fn).__name__}")
    tile_bytes = default_tile_bytes(_runs_on_gpu(encoder_out)) if tile_bytes is None else tile_bytes
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, int) or tile_bytes < 1:
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")
    B, T, E = encoder_out.shape
    U1, P = predictor_out.shape[1:]
    probe = jax.eval_shape(joint_fn, params, jax.ShapeDtypeStruct((1, 1, E), encoder_out.dtype),
                           jax.ShapeDtypeStruct((1, U1, P), predictor_out.dtype))
    if len(probe.shape) != 4 or tuple(probe.shape[:3]) != (1, 1, U1):
        raise ValueError(f"joint_fn must return logits (b, t, U+1, V) for encoder_out (b, t, E) and predictor_out "
                         f"(b, U+1, P); for (1, 1, {E}) and (1, {U1}, {P}) it returns {tuple(probe.shape)}")
    V = probe.shape[3]
    specs = [ArraySpec("logits", (B, T, U1, V), np.dtype(probe.dtype).name, "jax")] + [
        ArraySpec(n, tuple(a.shape), np.dtype(a.dtype).name, "jax") for n, a in
        (("targets", targets), ("logit_lengths", logit_lengths), ("target_lengths", target_lengths))]
    shape = check_arguments(*specs, blank=blank, clamp=clamp, reduction=reduction, fused_log_softmax=True,
                            fastemit_lambda=fastemit_lambda)
    indices = [a if isinstance(a, jax.Array) else jnp.asarray(a) for a in (targets, logit_lengths, target_lengths)]
    concrete = _is_concrete(*indices)
    if concrete:
        check_lengths_and_labels(*_indices(*indices), shape)
    tile_b, tile_t = _tile_sizes(B, T, U1, V, np.dtype(probe.dtype).itemsize, tile_bytes) if B else (1, 1)
    options = _Options(shape, reduction, float(fastemit_lambda), float(clamp), tile_b, tile_t,
                       np.dtype(probe.dtype).name, check_values=not concrete, mean_batch=B)
    split = _batch_split(encoder_out, batch_axis) if B else None
    if split is not None:
        return _sharded_over_batch(options, split, joint_fn, params, encoder_out, predictor_out, *indices)
    return _fused(options, joint_fn, params, encoder_out, predictor_out, *indices)


def _sharded_over_batch(options: _Options, split: _BatchSplit, joint_fn: JointFn, params, encoder_out,
                        predictor_out, targets, frames, labels):
    """Each device runs the fused loss on its own shard of the batch (``shard_map``), the joint's
    parameters replicated; the reduced loss is summed across devices (``mean_volume``: the shards' sums over
    the whole batch's volume), and the parameters' gradient is summed by ``shard_map``'s transpose."""
    mesh, axes = split
    spec = jax.sharding.PartitionSpec(axes)
    n = _mesh_size(mesh, axes)
    B = options.shape.batch // n
    tile_b = min(options.tile_b, B)
    local = options._replace(shape=dataclasses.replace(options.shape, batch=B), tile_b=tile_b)
    arrays = [_resharded(a, mesh, spec) for a in (encoder_out, predictor_out, targets, frames, labels)]

    def per_shard(params, *shard):
        if options.reduction == "mean_volume":
            loss = jax.lax.psum(_fused(local._replace(reduction="sum"), joint_fn, params, *shard), axes)
            return loss / jnp.maximum(jax.lax.psum(jnp.sum(shard[4]), axes), 1).astype(loss.dtype)
        loss = _fused(local, joint_fn, params, *shard)
        return loss if options.reduction == "none" else jax.lax.psum(loss, axes)

    replicated = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), params)
    out_spec = spec if options.reduction == "none" else jax.sharding.PartitionSpec()
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(replicated,) + (spec,) * 5, out_specs=out_spec)(
        params, *arrays)
