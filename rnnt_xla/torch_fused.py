"""Fused joint network + RNNT loss for PyTorch: the exact loss and gradients without the full logits.

``fused_rnnt_loss(encoder_out, predictor_out, joint, ...)`` equals ``rnnt_loss(joint(encoder_out,
predictor_out), ...)`` - costs and the gradients w.r.t. ``encoder_out``, ``predictor_out`` and every
parameter of ``joint`` - but evaluates the joint one tile of utterances and frames at a time
(``rnnt_xla.tiling``): in the forward pass each tile's logits give their row normalisers and the
blank/label log-probabilities, then are dropped; the lattice needs only those ``O(B*T*U)`` values; the
backward pass evaluates each tile again, writes its gradient with the same kernel as ``rnnt_loss`` and
back-propagates it through the joint. The joint sees the same random state in both passes (dropout), as in
``torch.utils.checkpoint``.

Memory: one tile's logits (at most ``tile_bytes``), its gradient and the joint's activations for one tile,
plus ``O(B*T*U)`` residuals; never a ``(B, T, U+1, V)`` tensor.

Devices: CPU tensors run ``rnnt_xla.kernels.cpu``; CUDA tensors run the same tiles through
``rnnt_xla.kernels.cuda`` on the current stream, residuals in torch's allocator (:class:`_CudaPasses`).
Only the tile plan (from the lengths, copied to the host once) and the ``B`` costs cross to the host.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .kernels import cpu
from .kernels import cuda as cuda_kernels
from .torch import _TORCH_DTYPES, _as_index_array, _compute_dtype, _cuda_kernel_view, _logits_for_kernels
from .reductions import gradient_scale, reduce_costs
from .tiling import Tile, default_tile_bytes, plan_tiles
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["fused_rnnt_loss", "FusedRNNTLoss", "Joint", "COMPILE_NOTE"]

JointFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spec(name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> ArraySpec:
    return ArraySpec(name, tuple(shape), str(dtype).removeprefix("torch."), str(device))


def _tile_inputs(tile: Tile, encoder_out: torch.Tensor, predictor_out: torch.Tensor):
    """The joint's inputs for one tile: ``enc (b, t1 - t0, E)`` and ``pred (b, positions, P)``, detached."""
    index = torch.from_numpy(tile.utterances).to(encoder_out.device)
    enc = encoder_out.detach().index_select(0, index)[:, tile.t0:tile.t1]
    pred = predictor_out.detach().index_select(0, index)[:, :tile.positions]
    return enc, pred


def _call_joint(joint: JointFn, tile: Tile, enc: torch.Tensor, pred: torch.Tensor, vocab: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The joint's logits for one tile, checked: ``(b, t1 - t0, positions, V)`` of the probed dtype."""
    logits = joint(enc, pred)
    expected = tile.logits_shape(vocab)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected or logits.dtype != dtype:
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"joint must return logits (b, t, U+1, V) = {expected} {dtype} for encoder_out "
                         f"{tuple(enc.shape)} and predictor_out {tuple(pred.shape)}, got {got}")
    return logits


class _Options(NamedTuple):
    shape: LossShape
    reduction: str
    fastemit_lambda: float
    clamp: float
    tiles: list[Tile]
    vocab: int
    dtype: torch.dtype  # of the joint's logits


class _CpuPasses:
    """The kernel passes the fused loss runs, on tensors of one device: every kernel call of the fused loss
    (per tile: normalisers, gradient; per batch: the two lattice passes) goes through one of these objects.

    This one runs ``rnnt_xla.kernels.cpu`` on zero-copy numpy views of CPU tensors; :class:`_CudaPasses` runs
    ``rnnt_xla.kernels.cuda`` on CUDA tensors. Index tensors are int64, residuals are ``cpu.Residuals`` of
    tensors (layout of ``cpu.residual_shapes``); every output is written in place."""

    def __init__(self, device: torch.device):
        self.device = device

    def _logits(self, tensor: torch.Tensor):
        return _logits_for_kernels(tensor)

    def _array(self, tensor: torch.Tensor):
        return tensor.detach().numpy()

    def _residuals(self, residuals: cpu.Residuals) -> cpu.Residuals:
        return cpu.Residuals(*(None if r is None else self._array(r) for r in residuals))

    def normalise(self, logits, targets, frames, labels, blank: int, part: cpu.Residuals) -> None:
        cpu.normalise(self._logits(logits), *map(self._array, (targets, frames, labels)), blank, True,
                      self._residuals(part))

    def lattice_forward(self, frames, labels, fastemit_lambda: float, residuals: cpu.Residuals, costs) -> None:
        cpu.lattice_forward(self._array(frames), self._array(labels), fastemit_lambda, self._residuals(residuals),
                            self._array(costs))

    def lattice_backward(self, frames, labels, residuals: cpu.Residuals, betas) -> None:
        cpu.lattice_backward(self._array(frames), self._array(labels), self._residuals(residuals), self._array(betas))

    def gradient(self, logits, targets, frames, labels, blank: int, fastemit_lambda: float, clamp: float, scale,
                 part: cpu.Residuals, betas, grads) -> None:
        cpu.gradient(self._logits(logits), *map(self._array, (targets, frames, labels)), blank, True, fastemit_lambda,
                     clamp, self._array(scale), self._residuals(part), self._array(betas), self._logits(grads))


class _CudaPasses(_CpuPasses):
    """:class:`_CpuPasses` for CUDA tensors: ``rnnt_xla.kernels.cuda`` on the tensors' own memory
    (``__cuda_array_interface__``, no copies), launched on the current stream of their device, which is
    also where the joint's own kernels run."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        cuda_kernels._numba_cuda()  # ImportError with the fix when numba-cuda is missing

    def _logits(self, tensor: torch.Tensor):
        return _cuda_kernel_view(tensor)

    def _array(self, tensor: torch.Tensor):
        return tensor.detach()

    def _stream(self):
        return torch.cuda.current_stream(self.device).cuda_stream

    def _context(self):
        return torch.cuda.device(self.device)  # Numba works in the current device's context

    def normalise(self, logits, targets, frames, labels, blank: int, part: cpu.Residuals) -> None:
        with self._context():
            cuda_kernels.normalise(self._logits(logits), *map(self._array, (targets, frames, labels)), blank, True,
                                   self._residuals(part), self._stream())

    def lattice_forward(self, frames, labels, fastemit_lambda: float, residuals: cpu.Residuals, costs) -> None:
        with self._context():
            cuda_kernels.lattice_forward(self._array(frames), self._array(labels), fastemit_lambda,
                                         self._residuals(residuals), self._array(costs), self._stream())

    def lattice_backward(self, frames, labels, residuals: cpu.Residuals, betas) -> None:
        with self._context():
            cuda_kernels.lattice_backward(self._array(frames), self._array(labels), self._residuals(residuals),
                                          self._array(betas), self._stream())

    def gradient(self, logits, targets, frames, labels, blank: int, fastemit_lambda: float, clamp: float, scale,
                 part: cpu.Residuals, betas, grads) -> None:
        with self._context():
            cuda_kernels.gradient(self._logits(logits), *map(self._array, (targets, frames, labels)), blank, True,
                                  fastemit_lambda, clamp, self._array(scale), self._residuals(part),
                                  self._array(betas), self._logits(grads), self._stream())


# The passes of each device type (the CUDA simulator tests put a simulated CUDA class under "cpu").
_PASSES: dict[str, type[_CpuPasses]] = {"cpu": _CpuPasses, "cuda": _CudaPasses}


def _index(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host int64 index array as a contiguous int64 tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)


class _Residuals:
    """Full-batch ``(B, T, U1)`` residual tensors (``cpu.Residuals`` layout) on the loss's device, and their
    per-tile gathers and scatters."""

    def __init__(self, B: int, T: int, U1: int, dtype: np.dtype, device: torch.device):
        # Zeros, not empty: cells outside every tile are never written and must not hold NaN garbage
        # that a tile gather would copy around (they are never read by the lattice either).
        self.device = device
        self.arrays = cpu.Residuals(*(torch.zeros(shape, dtype=_TORCH_DTYPES[np.dtype(dt)], device=device)
                                      for shape, dt in cpu.residual_shapes(B, T, U1, dtype)))

    def tile_buffers(self, tile: Tile) -> cpu.Residuals:
        b, t = len(tile.utterances), tile.t1 - tile.t0
        return cpu.Residuals(*(torch.empty((b, t, tile.positions), dtype=a.dtype, device=self.device)
                               for a in self.arrays[:3]), None, None)

    def scatter_pass1(self, tile: Tile, rows: torch.Tensor, tile_res: cpu.Residuals) -> None:
        for full, part in zip(self.arrays[:3], tile_res[:3]):
            full[rows, tile.t0:tile.t1, :tile.positions] = part

    def gather(self, tile: Tile, rows: torch.Tensor, betas: torch.Tensor) -> tuple[cpu.Residuals, torch.Tensor]:
        """The tile's residuals, and its betas with one frame more (``betas[t + 1]`` of the tile's last
        frame belongs to the next tile; past the end of the batch it is never read)."""
        part = [a[rows, tile.t0:tile.t1, :tile.positions].contiguous() for a in self.arrays[:4]]
        end = min(tile.t1 + 1, betas.shape[1])
        tile_betas = torch.zeros((len(tile.utterances), tile.t1 - tile.t0 + 1, tile.positions), dtype=betas.dtype,
                                 device=self.device)
        tile_betas[:, :end - tile.t0] = betas[rows, tile.t0:end, :tile.positions]
        return cpu.Residuals(*part, self.arrays.log_likelihood[rows].contiguous()), tile_betas


class _RandomState:
    """The random streams a joint on ``device`` may draw from (CPU, and the CUDA device's), to replay."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def fork(self):
        """``fork_rng`` over the streams, so that a replay leaves the caller's streams where they were."""
        return torch.random.fork_rng(devices=[self.device] if self.cuda is not None else [],
                                     device_type=self.device.type)


class _FusedRNNTLossFunction(torch.autograd.Function):
    """The reduced fused loss; ``options`` is :class:`_Options`, ``params`` the joint's trainable tensors."""

    @staticmethod
    def forward(ctx, encoder_out, predictor_out, targets, logit_lengths, target_lengths, joint, options, *params):
        options: _Options
        shape = options.shape
        device = encoder_out.device
        passes = _PASSES[device.type](device)
        B, T, U1 = shape.batch, shape.max_frames, shape.max_labels + 1
        targets_np, frames, labels = (_as_index_array(t) for t in (targets, logit_lengths, target_lengths))
        residuals = _Residuals(B, T, U1, _kernel_dtype(options.dtype), device)
        # The joint's random streams as the forward pass found them: backward replays them tile by tile.
        rng_state = _RandomState(device)
        for tile in options.tiles:
            enc, pred = _tile_inputs(tile, encoder_out, predictor_out)
            logits = _call_joint(joint, tile, enc, pred, options.vocab, options.dtype).contiguous()
            part = residuals.tile_buffers(tile)
            rows = tile.utterances
            passes.normalise(logits, _index(targets_np[rows], device), _index(frames[rows] - tile.t0, device),
                             _index(labels[rows], device), shape.blank, part)
            residuals.scatter_pass1(tile, _index(rows, device), part)
            del logits
        costs = torch.empty(B, dtype=_compute_dtype(options.dtype), device=device)
        passes.lattice_forward(_index(frames, device), _index(labels, device), options.fastemit_lambda,
                               residuals.arrays, costs)
        host_costs = costs.cpu().numpy()
        loss = np.empty((B,) if options.reduction == "none" else (), dtype=host_costs.dtype)
        reduce_costs(host_costs[None], labels[None], options.reduction, loss[None])
        ctx.save_for_backward(encoder_out, predictor_out, *params)
        ctx.state = (joint, options, targets_np, frames, labels, residuals, rng_state,
                     torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        return torch.from_numpy(loss).to(device)

    @staticmethod
    def backward(ctx, grad_loss):
        return _without_dynamo(_backward)(ctx, grad_loss)


def _backward(ctx, grad_loss):
    """The fused loss's backward pass (:class:`_FusedRNNTLossFunction`): lattice backward, then every tile
    again: the joint, its logits' gradient, and back through the joint."""
    encoder_out, predictor_out, *params = ctx.saved_tensors
    joint, options, targets_np, frames, labels, residuals, rng_state, autocast, autocast_dtype = ctx.state
    options: _Options
    device = encoder_out.device
    passes = _PASSES[device.type](device)
    res = residuals.arrays
    betas = torch.zeros_like(res.alphas)
    passes.lattice_backward(_index(frames, device), _index(labels, device), res, betas)
    scale = gradient_scale(grad_loss.detach().cpu().numpy()[None], labels[None], options.reduction)[0]
    wants_enc, wants_pred = ctx.needs_input_grad[:2]
    grad_enc = torch.zeros_like(encoder_out) if wants_enc else None
    grad_pred = torch.zeros_like(predictor_out) if wants_pred else None
    trained = [p for p in params if p.requires_grad]
    grad_params = [torch.zeros_like(p) for p in trained]
    with rng_state.fork(), torch.enable_grad(), \
            torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast):
        rng_state.restore()
        for tile in options.tiles:
            enc, pred = _tile_inputs(tile, encoder_out, predictor_out)
            enc.requires_grad_(wants_enc)
            pred.requires_grad_(wants_pred)
            logits = _call_joint(joint, tile, enc, pred, options.vocab, options.dtype)
            inputs = [x for x, wanted in ((enc, wants_enc), (pred, wants_pred)) if wanted] + trained
            if not inputs or not logits.requires_grad:
                continue
            logits = logits.contiguous()
            rows = tile.utterances
            index = _index(rows, device)
            part, tile_betas = residuals.gather(tile, index, betas)
            grads = torch.empty_like(logits, memory_format=torch.contiguous_format)
            passes.gradient(logits, _index(targets_np[rows], device), _index(frames[rows] - tile.t0, device),
                            _index(labels[rows], device), options.shape.blank, options.fastemit_lambda,
                            options.clamp, torch.from_numpy(scale[rows]).to(device), part, tile_betas, grads)
            found = list(torch.autograd.grad(logits, inputs, grads, allow_unused=True))
            if wants_enc:
                _scatter_add(grad_enc, index, slice(tile.t0, tile.t1), found.pop(0))
            if wants_pred:
                _scatter_add(grad_pred, index, slice(0, tile.positions), found.pop(0))
            for total, part_grad in zip(grad_params, found):
                if part_grad is not None:
                    total.add_(part_grad)
    grads_by_param = iter(grad_params)
    param_grads = [next(grads_by_param) if p.requires_grad else None for p in params]
    return (grad_enc, grad_pred, None, None, None, None, None, *param_grads)


def _scatter_add(total: torch.Tensor, rows: torch.Tensor, span: slice, part: torch.Tensor | None) -> None:
    """``total[rows, span] += part`` (each row appears once per tile, so no index collides)."""
    if part is not None:
        total[rows, span] += part.to(total.dtype)


def _kernel_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype the kernels see for logits of ``dtype`` (bits for 16-bit floats)."""
    return {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
            torch.float16: np.dtype(np.uint16), torch.bfloat16: np.dtype(np.int16)}[dtype]


def _probe_joint(joint: JointFn, enc: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Call the joint on one (frame, position) to learn the logits' V and dtype, and find the trainable
    tensors it uses: the leaves of its autograd graph (its parameters, also tied or closed-over ones).

    A tensor that requires grad but is not a leaf (computed outside the joint) cannot be recomputed per
    tile without its own graph, which autograd may have freed by then: that is refused with a TypeError.
    The probe does not move the random stream (dropout)."""
    device = enc.device
    rng = _RandomState(device)
    start = (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()  # nodes made from here on
    # Autocast's cache of casted weights would hand the joint casts made before the probe: switch it off.
    with torch.enable_grad(), torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type),
                                             enabled=torch.is_autocast_enabled(device.type), cache_enabled=False):
        logits = joint(enc.detach(), pred.detach())
    rng.restore()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or tuple(logits.shape[:3]) != (1, 1, 1):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"joint must return logits (b, t, U+1, V) for encoder_out (b, t, E) and predictor_out "
                         f"(b, U+1, P); for (1, 1, E) and (1, 1, P) it returned {got}")
    leaves: dict[int, torch.Tensor] = {}
    seen, stack = set(), [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            leaves.setdefault(id(variable), variable)
            continue
        if node._sequence_nr() < start:
            raise TypeError("joint uses a tensor that requires grad but was computed outside the joint; "
                            "the fused loss calls the joint again in backward, so it can only train leaf tensors "
                            "(parameters). Compute that tensor inside the joint, or use rnnt_loss(joint(...)).")
        stack.extend(fn for fn, _ in node.next_functions)
    return logits.detach(), list(leaves.values())


def fused_rnnt_loss(
    encoder_out: torch.Tensor,
    predictor_out: torch.Tensor,
    joint: JointFn,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
    tile_bytes: int | None = None,
) -> torch.Tensor:
    """``rnnt_loss(joint(encoder_out, predictor_out), ...)`` without the full logits tensor.

    Args:
        encoder_out: ``(B, T, E)`` float, the encoder's frames.
        predictor_out: ``(B, U+1, P)`` float, the prediction network's outputs (BOS first).
        joint: an ``nn.Module`` or any callable, ``joint(enc: (b, t, E), pred: (b, U+1, P)) -> logits
            (b, t, U+1, V)``; every trainable leaf tensor it uses (its parameters, also tied or closed-over
            ones) gets its gradient. It is called on tiles (slices of the batch, frame and label-position
            axes), twice per tile when a gradient is wanted, with the same random state both times.
        targets, logit_lengths, target_lengths, blank, clamp, reduction, fastemit_lambda: as ``rnnt_loss``.
        tile_bytes: the most bytes one tile's logits take (default ``rnnt_xla.tiling.default_tile_bytes``: 16 MB on
            the CPU, 256 MB on CUDA).

    Returns:
        As ``rnnt_loss``; differentiable w.r.t. ``encoder_out``, ``predictor_out`` and the joint's parameters.

    Under ``torch.compile`` the call is a graph break (the code around it is compiled; the tile loop, the
    joint's calls included, runs eagerly); with ``fullgraph=True`` Dynamo raises
    ``torch._dynamo.exc.Unsupported`` quoting :data:`COMPILE_NOTE`.
    """
    return _without_dynamo(_fused_rnnt_loss)(encoder_out, predictor_out, joint, targets, logit_lengths, target_lengths,
                                             blank, clamp, reduction, fastemit_lambda, tile_bytes)


COMPILE_NOTE = ("rnnt_xla.torch.fused_rnnt_loss runs its tile loop eagerly: it plans tiles from the lengths on the "
                "host and calls the joint once per tile, forward and again in backward. torch.compile graph-breaks "
                "at this call and compiles the code around it; fullgraph=True cannot include it (for a single "
                "graph use rnnt_loss(joint(...)), a custom operator)")

# What torch.compiler.disable(fused_rnnt_loss, reason=COMPILE_NOTE) would set, without importing torch._dynamo
# (seconds) here: Dynamo graph-breaks on the call with this reason instead of tracing into it.
fused_rnnt_loss._torchdynamo_disable = True  # type: ignore[attr-defined]
fused_rnnt_loss._torchdynamo_disable_msg = COMPILE_NOTE  # type: ignore[attr-defined]
_DISABLED: dict[Callable, Callable] = {}


def _without_dynamo(fn: Callable) -> Callable:
    """``fn`` run with Dynamo off once Dynamo is loaded (``torch._dynamo.disable``): called from compiled
    code (the loss after its graph break, its backward from a compiled ``loss.backward()``), Dynamo would
    otherwise trace the tile loop and the joint, recompiling for every tile shape."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return fn
    if fn not in _DISABLED:
        _DISABLED[fn] = dynamo.disable(fn, reason=COMPILE_NOTE)
    return _DISABLED[fn]


def _fused_rnnt_loss(encoder_out: torch.Tensor, predictor_out: torch.Tensor, joint: JointFn, targets: torch.Tensor,
                     logit_lengths: torch.Tensor, target_lengths: torch.Tensor, blank: int, clamp: float,
                     reduction: str, fastemit_lambda: float, tile_bytes: int | None) -> torch.Tensor:
    """:func:`fused_rnnt_loss` (checks, tile plan, the autograd function)."""
    for name, x in (("encoder_out", encoder_out), ("predictor_out", predictor_out), ("targets", targets),
                    ("logit_lengths", logit_lengths), ("target_lengths", target_lengths)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if encoder_out.dim() != 3:
        raise ValueError(f"encoder_out must have 3 dimensions (batch, frames T, E), got shape "
                         f"{tuple(encoder_out.shape)}")
    if predictor_out.dim() != 3:
        raise ValueError(f"predictor_out must have 3 dimensions (batch, U + 1, P), got shape "
                         f"{tuple(predictor_out.shape)}")
    if predictor_out.shape[0] != encoder_out.shape[0]:
        raise ValueError(f"predictor_out must have batch size {encoder_out.shape[0]} (as encoder_out), got shape "
                         f"{tuple(predictor_out.shape)}")
    if encoder_out.device.type not in _PASSES or predictor_out.device != encoder_out.device:
        raise ValueError("fused_rnnt_loss runs on CPU or CUDA tensors, encoder_out and predictor_out on one device; "
                         f"got encoder_out on {encoder_out.device}, predictor_out on {predictor_out.device}")
    if not callable(joint):
        raise TypeError(f"joint must be callable (an nn.Module or a function), got {type(joint).__name__}")
    if tile_bytes is None:
        tile_bytes = default_tile_bytes(encoder_out.device.type == "cuda")
    if isinstance(tile_bytes, bool) or not isinstance(tile_bytes, int) or tile_bytes < 1:
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")
    B, T, _ = encoder_out.shape
    U1 = predictor_out.shape[1]
    if B > 0 and (T < 1 or U1 < 1):
        raise ValueError(f"encoder_out and predictor_out must have non-empty frame and label axes, got shapes "
                         f"{tuple(encoder_out.shape)} and {tuple(predictor_out.shape)}")
    if B > 0:
        probe, params = _probe_joint(joint, encoder_out[:1, :1], predictor_out[:1, :1])
        vocab, dtype, itemsize = probe.shape[3], probe.dtype, probe.element_size()
    else:  # an empty batch: the joint is never called
        params, vocab, dtype, itemsize = [], 1, encoder_out.dtype, encoder_out.element_size()
    shape = check_arguments(
        _spec("logits", (B, T, U1, vocab), dtype, encoder_out.device), *(
            _spec(n, t.shape, t.dtype, t.device) for n, t in
            (("targets", targets), ("logit_lengths", logit_lengths), ("target_lengths", target_lengths))),
        blank=blank, clamp=clamp, reduction=reduction, fused_log_softmax=True, fastemit_lambda=fastemit_lambda)
    frames, labels = _as_index_array(logit_lengths), _as_index_array(target_lengths)
    check_lengths_and_labels(_as_index_array(targets), frames, labels, shape)
    tiles = plan_tiles(frames, labels, vocab, itemsize, tile_bytes)
    options = _Options(shape, reduction, float(fastemit_lambda), float(clamp), tiles, vocab, dtype)
    return _FusedRNNTLossFunction.apply(encoder_out, predictor_out, targets, logit_lengths, target_lengths, joint,
                                        options, *params)


class FusedRNNTLoss(torch.nn.Module):
    """Module form of :func:`fused_rnnt_loss`; ``joint`` becomes a submodule (its parameters are this
    module's), so an optimizer over ``FusedRNNTLoss(...).parameters()`` trains it."""

    def __init__(self, joint: JointFn, blank: int = -1, clamp: float = -1.0, reduction: str = "mean",
                 fastemit_lambda: float = 0.0, tile_bytes: int | None = None):
        super().__init__()
        self.joint = joint
        self.blank, self.clamp, self.reduction = blank, clamp, reduction
        self.fastemit_lambda, self.tile_bytes = fastemit_lambda, tile_bytes

    def forward(self, encoder_out: torch.Tensor, predictor_out: torch.Tensor, targets: torch.Tensor,
                logit_lengths: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
        return fused_rnnt_loss(encoder_out, predictor_out, self.joint, targets, logit_lengths, target_lengths,
                               blank=self.blank, clamp=self.clamp, reduction=self.reduction,
                               fastemit_lambda=self.fastemit_lambda, tile_bytes=self.tile_bytes)


_ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


class Joint(torch.nn.Module):
    """The standard transducer joint ``Linear(act(Linear(enc) + Linear(pred)))``, broadcasting
    ``enc: (b, t, E)`` and ``pred: (b, U+1, P)`` to logits ``(b, t, U+1, V)``."""

    def __init__(self, encoder_dim: int, predictor_dim: int, joint_dim: int, vocab_size: int,
                 activation: str = "tanh", dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, _ACTIVATIONS))}; got {activation!r}")
        self.encoder = torch.nn.Linear(encoder_dim, joint_dim)
        self.predictor = torch.nn.Linear(predictor_dim, joint_dim)
        self.activation = _ACTIVATIONS[activation]()
        self.dropout = torch.nn.Dropout(dropout)
        self.output = torch.nn.Linear(joint_dim, vocab_size)

    def forward(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(enc)[:, :, None] + self.predictor(pred)[:, None]
        return self.output(self.dropout(self.activation(hidden)))
