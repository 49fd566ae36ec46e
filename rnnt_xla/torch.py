"""PyTorch adapter: ``rnnt_loss`` / ``RNNTLoss`` with torchaudio's argument names, and ``RNNTLossNumba``
with the seed package's (warprnnt_numba) names and defaults.

The adapter holds no math. The loss is two real PyTorch operators (``torch.library.custom_op``), so that
``torch.compile`` (also ``fullgraph=True`` and dynamic shapes), ``torch.export``, TorchScript (through
``torch.ops``), ``torch.func`` and ``torch.library.opcheck`` see one opaque node each:

- ``torch.ops.rnnt_xla.loss_forward(logits, targets, logit_lengths, target_lengths, blank, clamp,
  reduction, fused_log_softmax, fastemit_lambda, groups)`` returns the reduced loss, private int64 (int32
  on CUDA when no input is int64) copies of the labels and lengths, and the ``O(B*T*U)`` residuals
  (:class:`rnnt_xla.kernels.cpu.Residuals`) that the gradient is computed from;
- ``torch.ops.rnnt_xla.loss_backward(grad_loss, logits, <the copies>, <the residuals>, <the options>)``
  returns the gradient w.r.t. the logits.

Both run the whole validation themselves (the shape/dtype/option checks and the data-dependent checks of
the lengths and labels), so a compiled graph raises the same ``ValueError`` naming the argument as eager
code; :func:`rnnt_loss` also runs the shape/dtype/option checks in Python first, where ``torch.compile``
and ``torch.export`` trace them (they only read metadata). ``groups`` splits the batch into equal groups
reduced separately; ``torch.vmap`` uses it to fold the vmapped axis into the batch, so the kernels run once
over the whole folded batch (as in the JAX adapter). The public functions pass ``groups=1``. Autograd is
registered on the operators (``register_autograd``; the backward operator's own derivative raises a clear
error); while a torch.func transform runs, the same formulas go through ``autograd.Function`` subclasses
instead, because torch.func does not take the ones ``register_autograd`` generates.

The operators hand the tensors' memory to the Numba kernels as numpy views (no copy for C-contiguous CPU
tensors) and reduce with the shared ``rnnt_xla.reductions``; no ``B*T*(U+1)*V`` buffer lives between the
two passes, and none is allocated when no gradient is requested. CUDA tensors go to the CUDA kernels
(``rnnt_xla.kernels.cuda``) on the same memory, launched on the current stream; only the lengths and labels
(for validation), the ``B`` costs and the incoming gradient (for the shared reductions) go to the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from .kernels import cpu
from .kernels import cuda as cuda_kernels
from .reductions import gradient_scale, reduce_costs
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["rnnt_loss", "RNNTLoss", "RNNTLossNumba", "fused_rnnt_loss", "FusedRNNTLoss", "Joint"]

_SECOND_ORDER_MESSAGE = (
    "rnnt_xla: the RNNT loss has no second derivative. Its gradient was computed with create_graph=True "
    "(double backward, torch.autograd.functional.hessian, a gradient penalty through the loss) and cannot be "
    "differentiated again; compute the loss's gradient without create_graph, or keep the loss out of the "
    "part of the graph that is differentiated twice.")


def _spec(name: str, tensor: object) -> ArraySpec:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    return ArraySpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device))


def _check(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
           clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float) -> LossShape:
    """The shape, dtype, device and option checks (``validation.check_arguments``), metadata only."""
    specs = [_spec(n, t) for n, t in zip(("logits", "targets", "logit_lengths", "target_lengths"),
                                         (logits, targets, logit_lengths, target_lengths))]
    if torch.jit.is_tracing():
        # jit.trace records sizes as tensors and warns that branching on them is baked into the trace; these
        # checks are meant to be (the operator checks the traced graph's actual inputs again).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check_arguments(*specs, blank=blank, clamp=clamp, reduction=reduction,
                                   fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda)
    return check_arguments(*specs, blank=blank, clamp=clamp, reduction=reduction,
                           fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda)


def _group_size(batch: int, groups: int) -> int:
    if groups < 1 or batch % groups:
        raise ValueError(f"groups must be >= 1 and divide the batch size {batch}, got {groups}")
    return batch // groups


def _loss_shape(batch: int, groups: int, reduction: str) -> tuple[int]:
    """``(B,)`` costs for ``"none"``, else one reduced loss per group."""
    return (batch,) if reduction == "none" else (groups,)


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the costs and of the ``log_norm`` residual (``cpu.compute_dtype``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_dtype(device: torch.device, *indices: Tensor) -> torch.dtype:
    """dtype of the private index copies: the CPU kernels are compiled for int64; the CUDA kernels take
    int32 or int64, and one dtype for the three keeps their compiled variants few."""
    if device.type == "cpu" or torch.int64 in {t.dtype for t in indices}:
        return torch.int64
    return torch.int32


def _residual_shapes(logits: Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of each residual for ``logits`` (``cpu.residual_shapes``, as torch dtypes)."""
    B, T, U1, _ = logits.shape
    like = np.float64 if logits.dtype == torch.float64 else np.float32  # 16-bit logits compute in float32
    return [(shape, _TORCH_DTYPES[dtype]) for shape, dtype in cpu.residual_shapes(B, T, U1, like)]


def _logits_for_kernels(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of contiguous CPU logits, in the form the kernels take (``cpu.as_kernel_array``)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: hand over its bits directly
        return tensor.view(torch.int16).numpy()
    return cpu.as_kernel_array(tensor.numpy())


def _tensor_from_kernel_array(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``dtype`` sharing ``array``'s memory (16-bit gradients come back as bits)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(array.view(np.int16)).view(dtype)
    return torch.from_numpy(array)


def _as_index_array(tensor: torch.Tensor) -> np.ndarray:
    """A private int64 copy of lengths or labels (B or B*W values; the kernels are compiled for int64).

    Always a copy, also of int64 tensors: the backward pass reads these arrays again, and a data loader
    that refills its batch buffers in place between forward and backward must not change the gradient (or
    send the kernels out of bounds). autograd's version counter does not watch numpy views."""
    return np.array(tensor.detach().cpu().numpy(), dtype=np.int64, order="C", copy=True)


def _cuda_kernel_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the CUDA kernels take it (``cuda_kernels.kernel_dtype``): bfloat16 as its int16 bits
    (same memory; neither Numba nor ``__cuda_array_interface__`` knows bfloat16), detached."""
    tensor = tensor.detach()
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


# --- the forward operator ------------------------------------------------------------------------------

_FORWARD_OUTPUTS = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("rnnt_xla::loss_forward", mutates_args=(), device_types="cpu")
def loss_forward(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
                 clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
                 groups: int) -> _FORWARD_OUTPUTS:
    """The reduced loss and what the backward operator needs (see the module docstring).

    Args: as :func:`rnnt_loss`, plus ``groups``: the batch ``B`` is ``groups`` equal groups, each reduced on
    its own. Returns ``loss`` (``(B,)`` for ``"none"``, else ``(groups,)``; float64 for float64 logits, else
    float32), ``targets (B, W)``, ``logit_lengths (B,)``, ``target_lengths (B,)`` int64 copies, and
    ``log_norm``, ``log_blank``, ``log_emit``, ``alphas (B, T, U+1)``, ``log_likelihood (B,)``.
    Raises: TypeError, ValueError naming the argument, before any kernel runs.
    """
    shape = _check(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
                   fastemit_lambda)
    size = _group_size(shape.batch, groups)
    indices = [_as_index_array(t) for t in (targets, logit_lengths, target_lengths)]
    check_lengths_and_labels(*indices, shape)
    logits_np = _logits_for_kernels(logits.contiguous())
    # Zeroed (calloc: no extra pass over the memory): the kernels leave the padding cells unwritten, and
    # an operator's outputs must be deterministic (compiled graphs and opcheck compare them).
    B, T, U1, _ = logits_np.shape
    residuals = cpu.Residuals(*(np.zeros(s, d) for s, d in cpu.residual_shapes(B, T, U1, logits_np.dtype)))
    costs = np.empty(shape.batch, dtype=cpu.compute_dtype(logits_np.dtype))
    cpu.forward(logits_np, *indices, shape.blank, fused_log_softmax, fastemit_lambda, costs, residuals)
    loss = np.empty(_loss_shape(shape.batch, groups, reduction), dtype=costs.dtype)
    reduce_costs(costs.reshape(groups, size), indices[2].reshape(groups, size), reduction,
                 loss.reshape(groups, size) if reduction == "none" else loss)
    return (torch.from_numpy(loss), *map(torch.from_numpy, indices), *map(torch.from_numpy, residuals))


@loss_forward.register_kernel("cuda")
def _loss_forward_cuda(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor,
                       blank: int, clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
                       groups: int) -> _FORWARD_OUTPUTS:
    """:func:`loss_forward` on CUDA tensors: the ``rnnt_xla.kernels.cuda`` kernels on the tensors' memory
    (``__cuda_array_interface__``, no copies), launched on the current stream. The lengths and labels
    (``B*(W + 2)`` values) are copied to the host for validation and the ``B`` costs for the reduction;
    residuals stay on the GPU, in tensors from torch's allocator."""
    shape = _check(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
                   fastemit_lambda)
    size = _group_size(shape.batch, groups)
    host = [_as_index_array(t) for t in (targets, logit_lengths, target_lengths)]
    check_lengths_and_labels(*host, shape)
    device = logits.device
    index_dtype = _index_dtype(device, targets, logit_lengths, target_lengths)
    # Private copies, also when no conversion is needed: backward reads them again (see _as_index_array).
    indices = [t.detach().to(index_dtype, memory_format=torch.contiguous_format, copy=True)
               for t in (targets, logit_lengths, target_lengths)]
    residuals = cpu.Residuals(*(torch.zeros(s, dtype=d, device=device) for s, d in _residual_shapes(logits)))
    costs = torch.empty(shape.batch, dtype=_compute_dtype(logits.dtype), device=device)
    with torch.cuda.device(device):  # Numba works in the current device's context
        cuda_kernels.forward(_cuda_kernel_view(logits.contiguous()), *indices, shape.blank, fused_log_softmax,
                             fastemit_lambda, costs, residuals,
                             stream=torch.cuda.current_stream(device).cuda_stream)
    loss = torch.empty(_loss_shape(shape.batch, groups, reduction), dtype=costs.dtype)
    reduce_costs(costs.cpu().numpy().reshape(groups, size), host[2].reshape(groups, size), reduction,
                 loss.numpy().reshape(groups, size) if reduction == "none" else loss.numpy())
    return (loss.to(device), *indices, *residuals)


@loss_forward.register_fake
def _loss_forward_fake(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor,
                       blank: int, clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
                       groups: int) -> _FORWARD_OUTPUTS:
    """Shapes and dtypes of :func:`loss_forward`'s outputs, from the inputs' metadata only."""
    index_dtype = _index_dtype(logits.device, targets, logit_lengths, target_lengths)
    loss = logits.new_empty(_loss_shape(logits.shape[0], groups, reduction), dtype=_compute_dtype(logits.dtype))
    indices = [t.new_empty(t.shape, dtype=index_dtype) for t in (targets, logit_lengths, target_lengths)]
    residuals = [logits.new_empty(s, dtype=d) for s, d in _residual_shapes(logits)]
    return (loss, *indices, *residuals)


# --- the backward operator -----------------------------------------------------------------------------

def _check_backward(grad_loss: Tensor, logits: Tensor, indices: tuple[Tensor, Tensor, Tensor],
                    residuals: tuple[Tensor, ...], blank: int, clamp: float, reduction: str,
                    fused_log_softmax: bool, fastemit_lambda: float, groups: int
                    ) -> tuple[LossShape, int, list[np.ndarray]]:
    """The forward operator's checks again (the backward operator can be called on its own), plus the
    shapes of the incoming gradient and the residuals. Returns the sizes, the group size and host int64
    copies of the indices."""
    shape = _check(logits, *indices, blank, clamp, reduction, fused_log_softmax, fastemit_lambda)
    size = _group_size(shape.batch, groups)
    host = [_as_index_array(t) for t in indices]
    check_lengths_and_labels(*host, shape)
    expected = _loss_shape(shape.batch, groups, reduction)
    if tuple(grad_loss.shape) != expected:
        raise ValueError(f"grad_loss must have shape {expected} (the forward operator's loss), "
                         f"got {tuple(grad_loss.shape)}")
    for name, tensor, (s, d) in zip(cpu.Residuals._fields, residuals, _residual_shapes(logits)):
        if tuple(tensor.shape) != s or tensor.dtype != d or tensor.device != logits.device:
            raise ValueError(f"{name} must be a {s} {d} tensor on {logits.device} (the forward operator's "
                             f"residual), got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    return shape, size, host


def _gradient_scale(grad_loss: np.ndarray, target_lengths: np.ndarray, reduction: str, groups: int,
                    size: int) -> np.ndarray:
    """``(B,) float64`` per-utterance scale of the gradient (``reductions.gradient_scale`` per group)."""
    grad_loss = grad_loss.reshape(groups, size) if reduction == "none" else grad_loss.reshape(groups)
    return gradient_scale(grad_loss, target_lengths.reshape(groups, size), reduction).reshape(-1)


@torch.library.custom_op("rnnt_xla::loss_backward", mutates_args=(), device_types="cpu")
def loss_backward(grad_loss: Tensor, logits: Tensor, targets: Tensor, logit_lengths: Tensor,
                  target_lengths: Tensor, log_norm: Tensor, log_blank: Tensor, log_emit: Tensor, alphas: Tensor,
                  log_likelihood: Tensor, blank: int, clamp: float, reduction: str, fused_log_softmax: bool,
                  fastemit_lambda: float, groups: int) -> Tensor:
    """Gradient ``(B, T, U+1, V)`` w.r.t. ``logits`` (their dtype) for the incoming gradient ``grad_loss`` of
    :func:`loss_forward`'s loss; ``targets`` to ``log_likelihood`` are its other outputs."""
    residuals = (log_norm, log_blank, log_emit, alphas, log_likelihood)
    shape, size, indices = _check_backward(grad_loss, logits, (targets, logit_lengths, target_lengths), residuals,
                                           blank, clamp, reduction, fused_log_softmax, fastemit_lambda, groups)
    logits_np = _logits_for_kernels(logits.contiguous())
    scale = _gradient_scale(grad_loss.detach().numpy(), indices[2], reduction, groups, size)
    # numpy asks the kernel for transparent huge pages on large buffers (torch does not): first-touch
    # page faults on a fresh gradient then cost ~4x less. The tensor shares the numpy memory.
    grads = np.empty_like(logits_np)
    cpu.backward(logits_np, *indices, shape.blank, fused_log_softmax, fastemit_lambda, clamp, scale,
                 cpu.Residuals(*(r.detach().contiguous().numpy() for r in residuals)), grads)
    return _tensor_from_kernel_array(grads, logits.dtype)


@loss_backward.register_kernel("cuda")
def _loss_backward_cuda(grad_loss: Tensor, logits: Tensor, targets: Tensor, logit_lengths: Tensor,
                        target_lengths: Tensor, log_norm: Tensor, log_blank: Tensor, log_emit: Tensor,
                        alphas: Tensor, log_likelihood: Tensor, blank: int, clamp: float, reduction: str,
                        fused_log_softmax: bool, fastemit_lambda: float, groups: int) -> Tensor:
    """:func:`loss_backward` on CUDA tensors; betas and gradient in tensors from torch's allocator."""
    residuals = cpu.Residuals(*(r.contiguous() for r in (log_norm, log_blank, log_emit, alphas, log_likelihood)))
    indices = [t.contiguous() for t in (targets, logit_lengths, target_lengths)]
    shape, size, host = _check_backward(grad_loss, logits, indices, residuals, blank, clamp, reduction,
                                        fused_log_softmax, fastemit_lambda, groups)
    if len({t.dtype for t in indices}) > 1:
        indices = [t.long() for t in indices]
    device = logits.device
    logits = logits.contiguous()
    scale = _gradient_scale(grad_loss.detach().cpu().numpy(), host[2], reduction, groups, size)
    B, T, U1, _ = logits.shape
    betas = torch.empty((B, T, U1), dtype=torch.float64, device=device)
    grads = torch.empty_like(logits, memory_format=torch.contiguous_format)
    with torch.cuda.device(device):
        cuda_kernels.backward(_cuda_kernel_view(logits), *indices, shape.blank, fused_log_softmax,
                              fastemit_lambda, clamp, torch.from_numpy(scale).to(device), residuals,
                              _cuda_kernel_view(grads), stream=torch.cuda.current_stream(device).cuda_stream,
                              betas=betas)
    return grads


@loss_backward.register_fake
def _loss_backward_fake(grad_loss: Tensor, logits: Tensor, *args: object) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# --- autograd, vmap and torch.func ---------------------------------------------------------------------

def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(inputs[0], *output[1:])
    ctx.options = tuple(inputs[4:])


def _backward(ctx, grad_loss: Tensor, *unused: Tensor) -> tuple:
    logits, *saved = ctx.saved_tensors
    grads = _call_backward(grad_loss, logits, *saved, *ctx.options)
    return (grads,) + (None,) * 9


def _no_second_derivative(ctx, *grads: Tensor):
    raise RuntimeError(_SECOND_ORDER_MESSAGE)


# With create_graph=True the backward operator is recorded in the graph (it depends on the logits and the
# incoming gradient), so any second derivative meets this error; a detached gradient would instead give a
# silently zero Hessian.
loss_forward.register_autograd(_backward, setup_context=_setup_context)
loss_backward.register_autograd(_no_second_derivative)


def _fold(n: int, tensor: Tensor, dim: int | None) -> Tensor:
    """``tensor`` with its vmapped axis ``dim`` (of size ``n``; broadcast if ``None``) folded into axis 0."""
    tensor = tensor.expand(n, *tensor.shape) if dim is None else tensor.movedim(dim, 0)
    return tensor.reshape(tensor.shape[0] * tensor.shape[1], *tensor.shape[2:])


def _unfold(n: int, tensor: Tensor) -> Tensor:
    return tensor.reshape(n, tensor.shape[0] // n, *tensor.shape[1:])


@loss_forward.register_vmap
def _loss_forward_vmap(info, in_dims: tuple, logits: Tensor, targets: Tensor, logit_lengths: Tensor,
                       target_lengths: Tensor, blank: int, clamp: float, reduction: str, fused_log_softmax: bool,
                       fastemit_lambda: float, groups: int) -> tuple:
    """``vmap`` folds the vmapped axis into the batch: one kernel launch, each example its own group."""
    n = info.batch_size
    tensors = [_fold(n, t, d) for t, d in zip((logits, targets, logit_lengths, target_lengths), in_dims)]
    outputs = loss_forward(*tensors, blank, clamp, reduction, fused_log_softmax, fastemit_lambda, groups * n)
    return tuple(_unfold(n, t) for t in outputs), (0,) * len(outputs)


@loss_backward.register_vmap
def _loss_backward_vmap(info, in_dims: tuple, *args: object) -> tuple:
    n = info.batch_size
    tensors = [_fold(n, t, d) for t, d in zip(args[:10], in_dims)]
    *options, groups = args[10:]
    return _unfold(n, loss_backward(*tensors, *options, groups * n)), 0


class _LossForward(torch.autograd.Function):
    """:func:`loss_forward` with its autograd formula, for torch.func transforms: the autograd.Function
    that ``register_autograd`` generates has no ``setup_context``, which torch.func requires (pytorch
    issues 168393, 170834). This one while ``torch.compile`` traces a torch.func transform (Dynamo does not
    take custom ``jvp`` methods), :class:`_LossForwardJvp` otherwise."""

    generate_vmap_rule = True  # the operators' own vmap rules

    @staticmethod
    def forward(*args):
        return loss_forward(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class _LossForwardJvp(_LossForward):
    """:class:`_LossForward` with forward mode (``torch.func.jvp``, ``jacfwd``): the loss's tangent is the
    gradient for a unit incoming gradient dotted with the logits' tangent."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], *output)

    @staticmethod
    def jvp(ctx, logits_tangent: Tensor | None, *unused):
        logits, loss, *saved = ctx.saved_tensors
        if logits_tangent is None:
            return (None,) * 9
        grads = _call_backward(torch.ones_like(loss), logits, *saved, *ctx.options)
        products = grads.to(loss.dtype) * logits_tangent.to(loss.dtype)
        return (products.reshape(loss.shape[0], -1).sum(1),) + (None,) * 8


class _LossBackward(torch.autograd.Function):
    """:func:`loss_backward` for torch.func transforms; its own derivatives raise (see above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return loss_backward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_no_second_derivative)
    jvp = staticmethod(_no_second_derivative)


def _call_forward(*args: object) -> tuple[Tensor, ...]:
    """:func:`loss_forward` with autograd: the operator, or an autograd.Function with ``setup_context``
    while a torch.func transform runs (with forward mode unless torch.compile traces it)."""
    if torch._C._are_functorch_transforms_active():
        return (_LossForward if torch.compiler.is_compiling() else _LossForwardJvp).apply(*args)
    return loss_forward(*args)


def _call_backward(*args: object) -> Tensor:
    """:func:`loss_backward`, through :class:`_LossBackward` while a torch.func transform runs eagerly (so
    that its second derivatives raise rnnt_xla's error; torch.compile's tracing takes the operator)."""
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        return _LossBackward.apply(*args)
    return loss_backward(*args)


# --- the public API ------------------------------------------------------------------------------------

def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = -1,
    clamp: float = -1.0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """RNN-Transducer loss (Graves, 2012), torchaudio-compatible, with FastEmit.

    Args:
        logits: ``(B, T, U+1, V)`` float32/float64/float16/bfloat16 joiner output (unnormalised scores;
            log-probabilities if ``fused_log_softmax=False``). 16-bit logits are read in their dtype and
            computed in float32; their gradient is written in their dtype.
        targets: ``(B, W)`` int32/int64 labels, ``W >= max(target_lengths)``; columns past each target
            length are ignored whatever they hold.
        logit_lengths: ``(B,)`` int32/int64 frames per utterance, in ``[1, T]``.
        target_lengths: ``(B,)`` int32/int64 labels per utterance, in ``[0, min(U, W)]``.
        blank: blank index in ``[0, V)``, or negative to count from the end (default ``-1``: ``V-1``).
        clamp: if ``> 0``, each utterance's gradient w.r.t. ``logits`` is clipped to ``[-clamp, clamp]``
            before the reduction and the incoming gradient scale it.
        reduction: ``"none"`` | ``"sum"`` | ``"mean"`` (sum / B) | ``"mean_by_target_length"`` (mean over
            the batch of ``cost_b / max(U_b, 1)``).
        fused_log_softmax: compute log-softmax inside the loss (True) or use ``logits`` as log-probs.
        fastemit_lambda: FastEmit weight ``>= 0``: costs are ``-(1 + lambda) log P(y|x)`` and the label
            transitions' gradient is scaled by ``1 + lambda``.

    Returns:
        ``(B,)`` costs for ``"none"``, else a scalar: float64 for float64 logits, else float32.

    Raises:
        TypeError, ValueError: on any invalid argument, naming it, before any computation.
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch: the operator runs all the checks
        return _scripted_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction,
                              fused_log_softmax, fastemit_lambda)
    _check(logits, targets, logit_lengths, target_lengths, blank, _while_tracing(clamp), reduction,
           fused_log_softmax, _while_tracing(fastemit_lambda))
    if logits.device.type not in ("cpu", "cuda"):  # _check has put every input on the same device
        raise ValueError(f"logits must be on the CPU or a CUDA device, got device {logits.device}")
    # contiguous() here, in the graph, rather than in the operators: the one copy of non-contiguous logits is
    # then also the one kept for the backward pass.
    outputs = _call_forward(logits.contiguous(), targets, logit_lengths, target_lengths, int(blank), float(clamp),
                            reduction, bool(fused_log_softmax), float(fastemit_lambda), 1)
    return outputs[0] if reduction == "none" else outputs[0].reshape(())


def _while_tracing(option: object) -> object:
    """A float option as the trace-time checks see it. ``torch.compile(dynamic=True)`` traces Python floats
    as symbolic values, which the NaN and range checks cannot branch on without a graph break; while
    compiling, those two checks are left to the operators, which run them on the actual values (the same
    errors, raised when the compiled code runs)."""
    return 0.0 if isinstance(option, float) and torch.compiler.is_compiling() else option


def _scripted_loss(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
                   clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float) -> Tensor:
    """:func:`rnnt_loss` under TorchScript (``torch.jit.script`` of the modules): the operator itself,
    which runs all the checks."""
    loss = torch.ops.rnnt_xla.loss_forward(logits.contiguous(), targets, logit_lengths, target_lengths, blank,
                                           clamp, reduction, fused_log_softmax, fastemit_lambda, 1)[0]
    return loss if reduction == "none" else loss.reshape(())


class RNNTLoss(torch.nn.Module):
    """Module form of :func:`rnnt_loss`, like ``torchaudio.transforms.RNNTLoss`` plus ``fastemit_lambda``."""

    def __init__(self, blank: int = -1, clamp: float = -1.0, reduction: str = "mean",
                 fused_log_softmax: bool = True, fastemit_lambda: float = 0.0):
        super().__init__()
        self.blank = blank
        self.clamp = clamp
        self.reduction = reduction
        self.fused_log_softmax = fused_log_softmax
        self.fastemit_lambda = fastemit_lambda

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return rnnt_loss(logits, targets, logit_lengths, target_lengths, int(self.blank), float(self.clamp),
                             self.reduction, bool(self.fused_log_softmax), float(self.fastemit_lambda))
        return rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=self.blank, clamp=self.clamp,
                         reduction=self.reduction, fused_log_softmax=self.fused_log_softmax,
                         fastemit_lambda=self.fastemit_lambda)


class RNNTLossNumba(torch.nn.Module):
    """Drop-in for ``warprnnt_numba.RNNTLossNumba``: same constructor keywords, defaults and forward order.

    ``blank=0``; ``reduction`` ``'none'``/``'sum'``/``'mean'`` (also ``'mean_by_target_length'`` and
    ``'mean_volume'``); ``clamp <= 0`` disables clamping. ``acts`` are unnormalised logits ``(B, T, U+1, V)``;
    ``labels`` may be wider than ``U`` (extra columns are ignored) and may contain the blank (e.g. as a BOS
    token). As the seed's, a reduced loss has shape ``(1,)`` (so ``loss[0]`` works); ``'none'`` gives ``(B,)``.
    """

    def __init__(self, blank: int = 0, reduction: str = "mean", fastemit_lambda: float = 0.0, clamp: float = -1):
        super().__init__()
        self.blank = blank
        self.reduction = reduction
        self.fastemit_lambda = fastemit_lambda
        self.clamp = float(clamp) if clamp > 0 else 0.0

    def forward(self, acts: torch.Tensor, labels: torch.Tensor, act_lens: torch.Tensor,
                label_lens: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            loss = rnnt_loss(acts, labels, act_lens, label_lens, int(self.blank), float(self.clamp),
                             self.reduction, True, float(self.fastemit_lambda))
        else:
            loss = rnnt_loss(acts, labels, act_lens, label_lens, blank=self.blank, clamp=self.clamp,
                             reduction=self.reduction, fused_log_softmax=True,
                             fastemit_lambda=self.fastemit_lambda)
        return loss if self.reduction == "none" else loss.reshape(1)


_FUSED = ("fused_rnnt_loss", "FusedRNNTLoss", "Joint")


def __getattr__(name: str):
    """The fused joint + loss lives in ``rnnt_xla.torch_fused`` (it drives the kernels tile by tile and uses
    this module's helpers); it is loaded on first use, so either module can be imported first."""
    if name in _FUSED:
        from . import torch_fused

        return getattr(torch_fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
