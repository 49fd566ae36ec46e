"""PyTorch adapter: ``rnnt_loss`` / ``RNNTLoss`` with torchaudio's argument names, and ``RNNTLossNumba``
with the seed package's (warprnnt_numba) names and defaults.

The adapter holds no math: it validates the arguments (``rnnt_xla.validation``), hands the tensors'
memory to the Numba kernels as numpy views (no copy for C-contiguous CPU tensors; other layouts are made
contiguous once), and reduces with the shared ``rnnt_xla.reductions``. The gradient is computed in
``backward`` from the small ``O(B*T*U)`` residuals kept by ``forward``, so no ``B*T*(U+1)*V`` buffer lives
between the two passes, and none is allocated at all when no gradient is requested.

CUDA tensors go to the CUDA kernels (``rnnt_xla.kernels.cuda``) on the same memory, launched on the current
stream; only the lengths and labels (for validation), the ``B`` costs and the incoming gradient (for the
shared reductions) are copied to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from .kernels import cpu
from .kernels import cuda as cuda_kernels
from .reductions import gradient_scale, reduce_costs
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["rnnt_loss", "RNNTLoss", "RNNTLossNumba"]


def _spec(name: str, tensor: object) -> ArraySpec:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    return ArraySpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device))


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
    return np.array(tensor.detach().numpy(), dtype=np.int64, order="C", copy=True)


_SECOND_ORDER_MESSAGE = (
    "rnnt_xla: the RNNT loss has no second derivative. Its gradient was computed with create_graph=True "
    "(double backward, torch.autograd.functional.hessian, a gradient penalty through the loss) and cannot be "
    "differentiated again; compute the loss's gradient without create_graph, or keep the loss out of the "
    "part of the graph that is differentiated twice.")


class _FirstOrderOnly(torch.autograd.Function):
    """The loss's gradient as a function of the logits whose own derivative raises a clear error.

    Used when backward runs with ``create_graph=True``. ``once_differentiable`` is not enough: its error
    node hangs off a detached copy, so a Hessian w.r.t. the logits finds no path through it and comes out
    silently zero. Here the gradient depends on the logits in the graph, so any second derivative meets
    the error."""

    @staticmethod
    def forward(ctx, grads, logits, grad_loss):
        return grads.view_as(grads)

    @staticmethod
    def backward(ctx, grad_grads):
        raise RuntimeError(_SECOND_ORDER_MESSAGE)


def _first_order_only(grads: torch.Tensor, logits: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grads``, guarded by :class:`_FirstOrderOnly` when backward runs with ``create_graph=True``."""
    if torch.is_grad_enabled() and (logits.requires_grad or grad_loss.requires_grad):
        return _FirstOrderOnly.apply(grads, logits, grad_loss)
    return grads


class _RNNTLossFunction(torch.autograd.Function):
    """The reduced loss; the gradient w.r.t. ``logits`` is computed in ``backward`` from the residuals."""

    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, shape, reduction, fused_log_softmax,
                fastemit_lambda, clamp):
        shape: LossShape
        targets_np, logit_lengths_np, target_lengths_np = map(_as_index_array, (targets, logit_lengths, target_lengths))
        check_lengths_and_labels(targets_np, logit_lengths_np, target_lengths_np, shape)
        logits_c = logits.contiguous()
        logits_np = _logits_for_kernels(logits_c)
        B, T, U1, _ = logits_np.shape
        costs = np.empty(B, dtype=cpu.compute_dtype(logits_np.dtype))
        residuals = cpu.allocate_residuals(B, T, U1, logits_np.dtype)
        cpu.forward(logits_np, targets_np, logit_lengths_np, target_lengths_np, shape.blank, fused_log_softmax,
                    fastemit_lambda, costs, residuals)
        loss = np.empty((B,) if reduction == "none" else (), dtype=costs.dtype)
        reduce_costs(costs[None], target_lengths_np[None], reduction, loss[None])
        loss = torch.from_numpy(loss)
        if ctx.needs_input_grad[0]:
            # The input itself too: a second derivative must find the logits in the graph (_FirstOrderOnly).
            ctx.save_for_backward(logits_c, logits)
            ctx.kernel_args = (targets_np, logit_lengths_np, target_lengths_np, shape.blank, fused_log_softmax,
                               fastemit_lambda, clamp)
            ctx.reduction = reduction
            ctx.residuals = residuals
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.no_grad():
            grads = _RNNTLossFunction._gradient(ctx, grad_loss)
        return (_first_order_only(grads, ctx.saved_tensors[1], grad_loss),) + (None,) * 8

    @staticmethod
    def _gradient(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
        logits = ctx.saved_tensors[0]
        targets, logit_lengths, target_lengths, blank, fused, fastemit_lambda, clamp = ctx.kernel_args
        logits_np = _logits_for_kernels(logits)
        grad_scale = gradient_scale(grad_loss.detach().numpy()[None], target_lengths[None], ctx.reduction)[0]
        # numpy asks the kernel for transparent huge pages on large buffers (torch does not): first-touch
        # page faults on a fresh gradient then cost ~4x less. The tensor shares the numpy memory.
        grads = np.empty_like(logits_np)
        cpu.backward(logits_np, targets, logit_lengths, target_lengths, blank, fused, fastemit_lambda, clamp,
                     grad_scale, ctx.residuals, grads)
        return _tensor_from_kernel_array(grads, logits.dtype)


class _RNNTLossCUDAFunction(torch.autograd.Function):
    """:class:`_RNNTLossFunction` for CUDA tensors: the ``rnnt_xla.kernels.cuda`` kernels on the tensors'
    memory (``__cuda_array_interface__``, no copies), launched on the current stream. The lengths and labels
    (``B*(W + 2)`` values) are copied to the host for validation, the ``B`` costs for the shared reduction
    and the incoming gradient for the per-utterance scale; residuals, betas and gradient stay on the GPU, in
    tensors from torch's allocator."""

    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, shape, reduction, fused_log_softmax,
                fastemit_lambda, clamp):
        shape: LossShape
        host = [_as_index_array(t.cpu()) for t in (targets, logit_lengths, target_lengths)]
        check_lengths_and_labels(*host, shape)
        device = logits.device
        # The kernels take int32 or int64 indices; one dtype for the three keeps the compiled variants few.
        index_dtype = torch.int64 if torch.int64 in (targets.dtype, logit_lengths.dtype, target_lengths.dtype) \
            else torch.int32
        # Private copies, also when no conversion is needed: backward reads them again (see _as_index_array).
        indices = [t.detach().to(index_dtype, memory_format=torch.contiguous_format, copy=True)
                   for t in (targets, logit_lengths, target_lengths)]
        logits_c = logits.contiguous()
        B, T, U1, _ = logits_c.shape
        dtype = cuda_kernels.kernel_dtype(str(logits.dtype).removeprefix("torch."))
        residuals = cpu.Residuals(*(torch.empty(size, dtype=getattr(torch, dt.name), device=device)
                                    for size, dt in cpu.residual_shapes(B, T, U1, dtype)))
        costs = torch.empty(B, dtype=getattr(torch, cuda_kernels.compute_dtype(dtype).name), device=device)
        with torch.cuda.device(device):  # Numba works in the current device's context
            cuda_kernels.forward(_cuda_kernel_view(logits_c), *indices, shape.blank, fused_log_softmax,
                                 fastemit_lambda, costs, residuals,
                                 stream=torch.cuda.current_stream(device).cuda_stream)
        loss = torch.empty((B,) if reduction == "none" else (), dtype=costs.dtype)
        reduce_costs(costs.cpu().numpy()[None], host[2][None], reduction, loss.numpy()[None])
        if ctx.needs_input_grad[0]:
            # The input itself too: a second derivative must find the logits in the graph (_FirstOrderOnly).
            ctx.save_for_backward(logits_c, logits)
            ctx.kernel_args = (*indices, shape.blank, fused_log_softmax, fastemit_lambda, clamp)
            ctx.host_target_lengths = host[2]
            ctx.reduction = reduction
            ctx.residuals = residuals
        return loss.to(device)

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.no_grad():
            grads = _RNNTLossCUDAFunction._gradient(ctx, grad_loss)
        return (_first_order_only(grads, ctx.saved_tensors[1], grad_loss),) + (None,) * 8

    @staticmethod
    def _gradient(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
        logits = ctx.saved_tensors[0]
        targets, logit_lengths, target_lengths, blank, fused, fastemit_lambda, clamp = ctx.kernel_args
        device = logits.device
        scale = gradient_scale(grad_loss.detach().cpu().numpy()[None], ctx.host_target_lengths[None],
                               ctx.reduction)[0]
        B, T, U1, _ = logits.shape
        grad_scale = torch.from_numpy(scale).to(device)
        betas = torch.empty((B, T, U1), dtype=torch.float64, device=device)
        grads = torch.empty_like(logits, memory_format=torch.contiguous_format)
        with torch.cuda.device(device):
            cuda_kernels.backward(_cuda_kernel_view(logits), targets, logit_lengths, target_lengths, blank, fused,
                                  fastemit_lambda, clamp, grad_scale, ctx.residuals, _cuda_kernel_view(grads),
                                  stream=torch.cuda.current_stream(device).cuda_stream, betas=betas)
        return grads


def _cuda_kernel_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the CUDA kernels take it (``cuda_kernels.kernel_dtype``): bfloat16 as its int16 bits
    (same memory; neither Numba nor ``__cuda_array_interface__`` knows bfloat16), detached."""
    tensor = tensor.detach()
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


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
    specs = [_spec(n, t) for n, t in zip(("logits", "targets", "logit_lengths", "target_lengths"),
                                         (logits, targets, logit_lengths, target_lengths))]
    shape = check_arguments(*specs, blank=blank, clamp=clamp, reduction=reduction,
                            fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda)
    if logits.device.type == "cuda":  # check_arguments has put every input on the same device
        return _RNNTLossCUDAFunction.apply(logits, targets, logit_lengths, target_lengths, shape, reduction,
                                           bool(fused_log_softmax), float(fastemit_lambda), float(clamp))
    if logits.device.type != "cpu":
        raise ValueError(f"logits must be on the CPU or a CUDA device, got device {logits.device}")
    return _RNNTLossFunction.apply(logits, targets, logit_lengths, target_lengths, shape, reduction,
                                   bool(fused_log_softmax), float(fastemit_lambda), float(clamp))


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
        loss = rnnt_loss(acts, labels, act_lens, label_lens, blank=self.blank, clamp=self.clamp,
                         reduction=self.reduction, fused_log_softmax=True, fastemit_lambda=self.fastemit_lambda)
        return loss if self.reduction == "none" else loss.reshape(1)
