"""PyTorch adapter: the transducer losses of ``rnnt_xla.family`` - ``rnnt_loss`` / ``RNNTLoss`` with
torchaudio's argument names (plus k2's ``rnnt_type`` and ``delay_penalty``), ``tdt_loss`` / ``TDTLoss``,
``multiblank_rnnt_loss`` / ``MultiblankRNNTLoss``, and drop-ins with NeMo's (and the seed warprnnt_numba's)
names and defaults: ``RNNTLossNumba``, ``TDTLossNumba``, ``MultiblankRNNTLossNumba``.

The adapter holds no math. Every loss is the same two real PyTorch operators (``torch.library.custom_op``),
so that ``torch.compile`` (also ``fullgraph=True`` and dynamic shapes), ``torch.export``, TorchScript
(through ``torch.ops``), ``torch.func`` and ``torch.library.opcheck`` see one opaque node each:

- ``torch.ops.rnnt_xla.loss_forward(logits, targets, logit_lengths, target_lengths, blank, clamp,
  reduction, fused_log_softmax, fastemit_lambda, groups, kind="rnnt", durations=[], sigma=0.0, omega=0.0,
  omega_draw=None, rnnt_type="regular", delay_penalty=0.0)`` returns the reduced loss, private int64
  (int32 on CUDA when no input is int64) copies of the labels and lengths, and the ``O(B*T*U)`` residuals
  (``rnnt_xla.family.residual_shapes``; for RNNT :class:`rnnt_xla.kernels.cpu.Residuals`) that the
  gradient is computed from, in :data:`RESIDUAL_SLOTS` tensor slots (unused ones empty);
- ``torch.ops.rnnt_xla.loss_backward(grad_loss, logits, <the copies>, <the slots>, <the options>)``
  returns the gradient w.r.t. the logits.

``kind`` picks the loss (``"rnnt"``, ``"tdt"``, ``"multiblank"``); ``durations`` are TDT's durations or the
big blanks' durations. TDT's ``omega`` (use the plain RNNT loss of the label head with probability omega,
as NeMo) is decided at run time from ``omega_draw``, a uniform draw in ``[0, 1)`` that :func:`tdt_loss`
takes from torch's default generator (``torch.rand(1)``; ``torch.manual_seed`` reproduces it) and passes
in, one for the batch or one per group.

Both operators run the whole validation themselves (the shape/dtype/option checks and the data-dependent
checks of the lengths and labels), so a compiled graph raises the same ``ValueError`` naming the argument as
eager code; the public functions also run the shape/dtype/option checks in Python first, where
``torch.compile`` and ``torch.export`` trace them (they only read metadata). ``groups`` splits the batch
into equal groups reduced separately; ``torch.vmap`` uses it to fold the vmapped axis into the batch, so
the kernels run once over the whole folded batch (as in the JAX adapter). The public functions pass
``groups=1``. Autograd is registered on the operators (``register_autograd``; the backward operator's own
derivative raises a clear error); while a torch.func transform runs, the same formulas go through
``autograd.Function`` subclasses instead, because torch.func does not take the ones ``register_autograd``
generates.

The operators hand the tensors' memory to the Numba kernels as numpy views (no copy for C-contiguous CPU
tensors) and reduce with the shared ``rnnt_xla.reductions``; no ``B*T*(U+1)*V`` buffer lives between the
two passes, and none is allocated when no gradient is requested. The CPU gradient is written into the
memory of the previous call's once nothing refers to that any more (:func:`empty_cache` frees it). CUDA
tensors go to the CUDA kernels (``rnnt_xla.kernels.cuda`` and the family's CUDA modules) on the same memory,
launched on the current stream; only the lengths and labels (for validation), the ``B`` costs and the
incoming gradient (for the shared reductions) go to the host.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from . import family
from .buffers import ReusableBuffer
from .kernels import cpu
from .reductions import gradient_scale, reduce_costs
from .validation import ArraySpec, LossShape, check_arguments, check_lengths_and_labels

__all__ = ["rnnt_loss", "RNNTLoss", "RNNTLossNumba", "tdt_loss", "TDTLoss", "TDTLossNumba",
           "multiblank_rnnt_loss", "MultiblankRNNTLoss", "MultiblankRNNTLossNumba",
           "fused_rnnt_loss", "FusedRNNTLoss", "Joint", "empty_cache"]

_SECOND_ORDER_MESSAGE = (
    "rnnt_xla: the RNNT loss has no second derivative. Its gradient was computed with create_graph=True "
    "(double backward, torch.autograd.functional.hessian, a gradient penalty through the loss) and cannot be "
    "differentiated again; compute the loss's gradient without create_graph, or keep the loss out of the "
    "part of the graph that is differentiated twice.")


# The CPU gradient's memory, kept for the next backward pass (see rnnt_xla.buffers).
_GRADIENT_BUFFER = ReusableBuffer()


def empty_cache() -> None:
    """Give back the memory the CPU backward pass keeps for its next gradient.

    The losses' CPU backward pass writes the gradient into the memory of the previous call's gradient once
    nothing refers to that any more (no first-touch page faults: the pass runs 1.3-2x faster). Between
    calls it keeps one buffer, the size of the largest recent gradient; call this to free it (for example
    after training, before evaluation on other shapes). Gradients still in use are not affected.
    """
    _GRADIENT_BUFFER.release()


def _spec(name: str, tensor: object) -> ArraySpec:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    return ArraySpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device))


def _check(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
           clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
           **family_options: object) -> LossShape:
    """The shape, dtype, device and option checks (``validation.check_arguments``; ``family_options``:
    ``kind``, ``durations``, ``sigma``, ``omega``, ``rnnt_type``, ``delay_penalty``), metadata only."""
    specs = [_spec(n, t) for n, t in zip(("logits", "targets", "logit_lengths", "target_lengths"),
                                         (logits, targets, logit_lengths, target_lengths))]
    options = dict(blank=blank, clamp=clamp, reduction=reduction, fused_log_softmax=fused_log_softmax,
                   fastemit_lambda=fastemit_lambda, **family_options)
    if torch.jit.is_tracing():
        # jit.trace records sizes as tensors and warns that branching on them is baked into the trace; these
        # checks are meant to be (the operator checks the traced graph's actual inputs again).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return check_arguments(*specs, **options)
    return check_arguments(*specs, **options)


def _group_size(batch: int, groups: int) -> int:
    if groups < 1 or batch % groups:
        raise ValueError(f"groups must be >= 1 and divide the batch size {batch}, got {groups}")
    return batch // groups


def _loss_shape(batch: int, groups: int, reduction: str) -> tuple[int]:
    """``(B,)`` costs for ``"none"``, else one reduced loss per group."""
    return (batch,) if reduction == "none" else (groups,)


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                 np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the costs and of the ``log_norm`` residual (``cpu.compute_dtype``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_dtype(device: torch.device, *indices: Tensor) -> torch.dtype:
    """dtype of the private index copies: the CPU kernels are compiled for int64; the CUDA kernels take
    int32 or int64, and one dtype for the three keeps their compiled variants few."""
    if device.type == "cpu" or torch.int64 in {t.dtype for t in indices}:
        return torch.int64
    return torch.int32


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




def _like(dtype: torch.dtype) -> type:
    """The numpy dtype whose compute dtype the kernels use for logits of ``dtype`` (16-bit: float32)."""
    return np.float64 if dtype == torch.float64 else np.float32


def _residual_shapes(spec: family.LossSpec, logits: Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of each residual of ``spec``'s loss for ``logits`` (as torch dtypes)."""
    B, T, U1, _ = logits.shape
    return [(shape, _TORCH_DTYPES[np.dtype(dtype)])
            for shape, dtype in family.residual_shapes(spec, B, T, U1, _like(logits.dtype))]


def _prepare(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
             clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float, groups: int,
             kind: str, durations: List[int], sigma: float, omega: float, rnnt_type: str,
             delay_penalty: float) -> tuple[LossShape, family.LossSpec, int]:
    """An operator's checks of shapes, dtypes and options: the sizes, the loss's spec and the group size."""
    shape = _check(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
                   fastemit_lambda, kind=kind, durations=durations, sigma=sigma, omega=omega, rnnt_type=rnnt_type,
                   delay_penalty=delay_penalty)
    spec = family.make_spec(shape, kind, fused_log_softmax, fastemit_lambda, clamp, durations, sigma, omega,
                            rnnt_type, delay_penalty)
    return shape, spec, _group_size(shape.batch, groups)


def _modes(spec: family.LossSpec, omega_draw: Optional[Tensor], groups: int) -> np.ndarray | bool:
    """TDT's omega mode per group (``family.label_head_only``) from the operator's ``omega_draw``."""
    if not spec.uses_draw:
        return False
    if omega_draw is None:
        raise ValueError("omega_draw must be given (a uniform draw in [0, 1), e.g. torch.rand(1)) when omega > 0")
    if omega_draw.numel() not in (1, groups) or omega_draw.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"omega_draw must hold 1 or groups={groups} float32/float64 draws, got shape "
                         f"{tuple(omega_draw.shape)} {omega_draw.dtype}")
    return family.label_head_only(spec, omega_draw.detach().cpu().numpy())


# --- the forward operator ------------------------------------------------------------------------------

# The residuals travel in a fixed number of tensor slots rather than as a Tensor[]: a list in the schema
# makes torch.library wrap the autograd formula in pytree flattening on every call (~0.1 ms per forward and
# backward, a 50% slower step at small shapes). A loss with fewer residuals fills the rest with (B, 0) slots.
RESIDUAL_SLOTS = 8
_SLOT_NAMES = [f"residual{i}" for i in range(RESIDUAL_SLOTS)]
_FAMILY_ARGUMENTS = ('str kind="rnnt", int[] durations=[], float sigma=0.0, float omega=0.0, '
                     'Tensor? omega_draw=None, str rnnt_type="regular", float delay_penalty=0.0')
_OPTIONS = "int blank, float clamp, str reduction, bool fused_log_softmax, float fastemit_lambda, int groups"
_FORWARD_SCHEMA = (f"(Tensor logits, Tensor targets, Tensor logit_lengths, Tensor target_lengths, {_OPTIONS}, "
                   f"{_FAMILY_ARGUMENTS}) -> ({', '.join(['Tensor'] * (4 + RESIDUAL_SLOTS))})")
_BACKWARD_SCHEMA = ("(Tensor grad_loss, Tensor logits, Tensor targets, Tensor logit_lengths, Tensor target_lengths, "
                    f"{', '.join('Tensor ' + n for n in _SLOT_NAMES)}, {_OPTIONS}, {_FAMILY_ARGUMENTS}) -> Tensor")
_FAMILY_DEFAULTS = ("rnnt", [], 0.0, 0.0, None, "regular", 0.0)  # the schema's, in order


def _slots(residuals: list[Tensor], batch: int, like: Tensor) -> list[Tensor]:
    """The residuals padded to :data:`RESIDUAL_SLOTS` with empty ``(B, 0)`` float32 tensors."""
    if len(residuals) > RESIDUAL_SLOTS:
        raise NotImplementedError(f"rnnt_xla: {len(residuals)} residuals do not fit the operators' "
                                  f"{RESIDUAL_SLOTS} slots; raise RESIDUAL_SLOTS")
    return residuals + [like.new_empty((batch, 0), dtype=torch.float32) for _ in range(RESIDUAL_SLOTS - len(residuals))]


@torch.library.custom_op("rnnt_xla::loss_forward", mutates_args=(), device_types="cpu", schema=_FORWARD_SCHEMA)
def loss_forward(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
                 clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float, groups: int,
                 kind: str = "rnnt", durations: List[int] = (), sigma: float = 0.0, omega: float = 0.0,
                 omega_draw: Optional[Tensor] = None, rnnt_type: str = "regular",
                 delay_penalty: float = 0.0) -> tuple[Tensor, ...]:
    """The reduced loss and what the backward operator needs (see the module docstring).

    Args: as the public functions (:func:`rnnt_loss`, :func:`tdt_loss`, :func:`multiblank_rnnt_loss`),
    plus ``groups``: the batch ``B`` is ``groups`` equal groups, each reduced on its own; ``kind`` the loss;
    ``omega_draw``: TDT's uniform draw(s), 1 or ``groups`` values (needed when ``omega > 0``). Returns
    ``loss`` (``(B,)`` for ``"none"``, else ``(groups,)``; float64 for float64 logits, else float32),
    ``targets (B, W)``, ``logit_lengths (B,)``, ``target_lengths (B,)`` int64 copies, and the
    :data:`RESIDUAL_SLOTS` residual slots (``family.residual_shapes``, then empty ``(B, 0)`` ones; RNNT:
    ``log_norm``, ``log_blank``, ``log_emit``, ``alphas (B, T, U+1)``, ``log_likelihood (B,)``).
    Raises: TypeError, ValueError naming the argument, before any kernel runs.
    """
    shape, spec, size = _prepare(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction,
                                 fused_log_softmax, fastemit_lambda, groups, kind, durations, sigma, omega,
                                 rnnt_type, delay_penalty)
    indices = [_as_index_array(t) for t in (targets, logit_lengths, target_lengths)]
    check_lengths_and_labels(*indices, shape)
    modes = _modes(spec, omega_draw, groups)
    logits_np = _logits_for_kernels(logits.contiguous())
    # Zeroed (calloc: no extra pass over the memory): the kernels leave the padding cells unwritten, and
    # an operator's outputs must be deterministic (compiled graphs and opcheck compare them).
    B, T, U1, _ = logits_np.shape
    residuals = [np.zeros(s, d) for s, d in family.residual_shapes(spec, B, T, U1, _like(logits.dtype))]
    costs = np.empty(shape.batch, dtype=cpu.compute_dtype(logits_np.dtype))
    family.forward(spec, logits_np, *indices, costs, residuals, modes)
    loss = np.empty(_loss_shape(shape.batch, groups, reduction), dtype=costs.dtype)
    reduce_costs(costs.reshape(groups, size), indices[2].reshape(groups, size), reduction,
                 loss.reshape(groups, size) if reduction == "none" else loss)
    return (torch.from_numpy(loss), *map(torch.from_numpy, indices),
            *_slots([torch.from_numpy(r) for r in residuals], B, logits))


@loss_forward.register_kernel("cuda")
def _loss_forward_cuda(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor,
                       blank: int, clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
                       groups: int, kind: str = "rnnt", durations: List[int] = (), sigma: float = 0.0,
                       omega: float = 0.0, omega_draw: Optional[Tensor] = None, rnnt_type: str = "regular",
                       delay_penalty: float = 0.0) -> tuple[Tensor, ...]:
    """:func:`loss_forward` on CUDA tensors: the ``rnnt_xla.kernels.cuda`` kernels on the tensors' memory
    (``__cuda_array_interface__``, no copies), launched on the current stream. The lengths and labels
    (``B*(W + 2)`` values) are copied to the host for validation and the ``B`` costs for the reduction;
    residuals stay on the GPU, in tensors from torch's allocator."""
    shape, spec, size = _prepare(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction,
                                 fused_log_softmax, fastemit_lambda, groups, kind, durations, sigma, omega,
                                 rnnt_type, delay_penalty)
    host = [_as_index_array(t) for t in (targets, logit_lengths, target_lengths)]
    check_lengths_and_labels(*host, shape)
    modes = _modes(spec, omega_draw, groups)
    device = logits.device
    index_dtype = _index_dtype(device, targets, logit_lengths, target_lengths)
    # Private copies, also when no conversion is needed: backward reads them again (see _as_index_array).
    indices = [t.detach().to(index_dtype, memory_format=torch.contiguous_format, copy=True)
               for t in (targets, logit_lengths, target_lengths)]
    residuals = [torch.zeros(s, dtype=d, device=device) for s, d in _residual_shapes(spec, logits)]
    costs = torch.empty(shape.batch, dtype=_compute_dtype(logits.dtype), device=device)
    with torch.cuda.device(device):  # Numba works in the current device's context
        family.cuda_forward(spec, _cuda_kernel_view(logits.contiguous()), *indices, costs, residuals,
                            stream=torch.cuda.current_stream(device).cuda_stream, label_head_only=modes)
    loss = torch.empty(_loss_shape(shape.batch, groups, reduction), dtype=costs.dtype)
    reduce_costs(costs.cpu().numpy().reshape(groups, size), host[2].reshape(groups, size), reduction,
                 loss.numpy().reshape(groups, size) if reduction == "none" else loss.numpy())
    return (loss.to(device), *indices, *_slots(residuals, shape.batch, logits))


@loss_forward.register_fake
def _loss_forward_fake(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor,
                       blank: int, clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float,
                       groups: int, kind: str = "rnnt", durations: List[int] = (), sigma: float = 0.0,
                       omega: float = 0.0, omega_draw: Optional[Tensor] = None, rnnt_type: str = "regular",
                       delay_penalty: float = 0.0) -> tuple[Tensor, ...]:
    """Shapes and dtypes of :func:`loss_forward`'s outputs, from the inputs' metadata only."""
    index_dtype = _index_dtype(logits.device, targets, logit_lengths, target_lengths)
    loss = logits.new_empty(_loss_shape(logits.shape[0], groups, reduction), dtype=_compute_dtype(logits.dtype))
    indices = [t.new_empty(t.shape, dtype=index_dtype) for t in (targets, logit_lengths, target_lengths)]
    spec = family.LossSpec(kind=kind, durations=tuple(durations))  # all that the residuals' shapes depend on
    residuals = [logits.new_empty(s, dtype=d) for s, d in _residual_shapes(spec, logits)]
    return (loss, *indices, *_slots(residuals, logits.shape[0], logits))


# --- the backward operator -----------------------------------------------------------------------------

def _backward_parts(args: tuple) -> tuple[list[Tensor], tuple, Optional[Tensor]]:
    """:func:`loss_backward`'s arguments after ``target_lengths`` (the dispatcher may leave out trailing
    ones equal to their defaults): the residual slots, the options without ``omega_draw``, ``omega_draw``."""
    options = tuple(args[RESIDUAL_SLOTS:])
    options += _FAMILY_DEFAULTS[len(options) - 6:]
    return list(args[:RESIDUAL_SLOTS]), options[:10] + options[11:], options[10]


def _check_backward(grad_loss: Tensor, logits: Tensor, indices: tuple[Tensor, Tensor, Tensor],
                    slots: list[Tensor], options: tuple
                    ) -> tuple[LossShape, family.LossSpec, int, list[np.ndarray], list[Tensor]]:
    """The forward operator's checks again (the backward operator can be called on its own), plus the
    shapes of the incoming gradient and the residuals. ``options``: the operator's arguments from ``blank``
    on, without ``omega_draw``. Returns the sizes, the spec, the group size, host int64 copies of the
    indices and the residuals (the used slots)."""
    shape, spec, size = _prepare(logits, *indices, *options)
    host = [_as_index_array(t) for t in indices]
    check_lengths_and_labels(*host, shape)
    reduction, groups = options[2], options[5]
    expected = _loss_shape(shape.batch, groups, reduction)
    if tuple(grad_loss.shape) != expected:
        raise ValueError(f"grad_loss must have shape {expected} (the forward operator's loss), "
                         f"got {tuple(grad_loss.shape)}")
    shapes = _residual_shapes(spec, logits)
    shapes += [((shape.batch, 0), torch.float32)] * (RESIDUAL_SLOTS - len(shapes))
    for name, tensor, (s, d) in zip(_SLOT_NAMES, slots, shapes):
        if tuple(tensor.shape) != s or tensor.dtype != d or tensor.device != logits.device:
            raise ValueError(f"{name} must be a {s} {d} tensor on {logits.device} (the forward operator's "
                             f"residual), got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
    return shape, spec, size, host, slots[:len(_residual_shapes(spec, logits))]


def _gradient_scale(grad_loss: np.ndarray, target_lengths: np.ndarray, reduction: str, groups: int,
                    size: int) -> np.ndarray:
    """``(B,) float64`` per-utterance scale of the gradient (``reductions.gradient_scale`` per group)."""
    grad_loss = grad_loss.reshape(groups, size) if reduction == "none" else grad_loss.reshape(groups)
    return gradient_scale(grad_loss, target_lengths.reshape(groups, size), reduction).reshape(-1)


@torch.library.custom_op("rnnt_xla::loss_backward", mutates_args=(), device_types="cpu", schema=_BACKWARD_SCHEMA)
def loss_backward(grad_loss: Tensor, logits: Tensor, targets: Tensor, logit_lengths: Tensor,
                  target_lengths: Tensor, *slots_and_options: object) -> Tensor:
    """Gradient ``(B, T, U+1, V)`` w.r.t. ``logits`` (their dtype) for the incoming gradient ``grad_loss`` of
    :func:`loss_forward`'s loss; ``targets`` to the residual slots are its other outputs, then the same
    options (schema: ``rnnt_xla::loss_backward``)."""
    slots, options, omega_draw = _backward_parts(slots_and_options)
    shape, spec, size, indices, residuals = _check_backward(
        grad_loss, logits, (targets, logit_lengths, target_lengths), slots, options)
    reduction, groups = options[2], options[5]
    modes = _modes(spec, omega_draw, groups)
    logits_np = _logits_for_kernels(logits.contiguous())
    scale = _gradient_scale(grad_loss.detach().numpy(), indices[2], reduction, groups, size)
    # numpy memory (the tensor shares it): numpy asks the kernel for transparent huge pages on large
    # buffers (torch does not), and the last step's gradient, once dropped, is written again without
    # first-touch page faults (rnnt_xla.buffers)
    grads = _GRADIENT_BUFFER.empty(logits_np.shape, logits_np.dtype)
    family.backward(spec, logits_np, *indices, scale, [r.detach().contiguous().numpy() for r in residuals], grads,
                    modes)
    return _tensor_from_kernel_array(grads, logits.dtype)


@loss_backward.register_kernel("cuda")
def _loss_backward_cuda(grad_loss: Tensor, logits: Tensor, targets: Tensor, logit_lengths: Tensor,
                        target_lengths: Tensor, *slots_and_options: object) -> Tensor:
    """:func:`loss_backward` on CUDA tensors; betas and gradient in tensors from torch's allocator."""
    slots, options, omega_draw = _backward_parts(slots_and_options)
    slots = [r.contiguous() for r in slots]
    indices = [t.contiguous() for t in (targets, logit_lengths, target_lengths)]
    shape, spec, size, host, residuals = _check_backward(grad_loss, logits, indices, slots, options)
    reduction, groups = options[2], options[5]
    modes = _modes(spec, omega_draw, groups)
    if len({t.dtype for t in indices}) > 1:
        indices = [t.long() for t in indices]
    device = logits.device
    logits = logits.contiguous()
    scale = _gradient_scale(grad_loss.detach().cpu().numpy(), host[2], reduction, groups, size)
    B, T, U1, _ = logits.shape
    betas = torch.empty((B, T, U1), dtype=torch.float64, device=device)
    grads = torch.empty_like(logits, memory_format=torch.contiguous_format)
    with torch.cuda.device(device):
        family.cuda_backward(spec, _cuda_kernel_view(logits), *indices, torch.from_numpy(scale).to(device),
                             residuals, _cuda_kernel_view(grads),
                             stream=torch.cuda.current_stream(device).cuda_stream, betas=betas,
                             label_head_only=modes)
    return grads


@loss_backward.register_fake
def _loss_backward_fake(grad_loss: Tensor, logits: Tensor, *args: object, **kwargs: object) -> Tensor:
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# --- autograd, vmap and torch.func ---------------------------------------------------------------------
#
# The operators' arguments by position: loss_forward's 0-3 the tensors, 4-13 the options before
# ``omega_draw``, 14 ``omega_draw``, 15-16 the rest; loss_backward's have grad_loss first and the residual
# slots after the three indices.

_DRAW = 14  # position of omega_draw among loss_forward's arguments
_DURATIONS = 11  # position of durations among loss_forward's arguments
_BACKWARD_DURATIONS = 4 + RESIDUAL_SLOTS + 1 + 7  # and among loss_backward's
_FORWARD_TENSORS = 4  # loss_forward's leading tensor arguments
_BACKWARD_TENSORS = 5 + RESIDUAL_SLOTS  # loss_backward's


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """The ``durations`` list as the autograd.Function paths carry it: one pytree leaf. torch.func flattens
    list arguments, and an empty list then has no leaf to match its in_dims and tangents."""

    value: tuple


def _unleaf(args: tuple, position: int) -> tuple:
    """``args`` with the :class:`_Leaf` at ``position`` (if it is one) back as a list."""
    if len(args) <= position or not isinstance(args[position], _Leaf):
        return tuple(args)
    return (*args[:position], list(args[position].value), *args[position + 1:])


def _leaf(args: tuple, position: int) -> tuple:
    if len(args) <= position:
        return tuple(args)
    return (*args[:position], _Leaf(tuple(args[position])), *args[position + 1:])


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    inputs = _unleaf(inputs, _DURATIONS)
    ctx.mark_non_differentiable(*output[1:])
    # the other outputs' gradients stay None instead of zero tensors: materialised, they were 11 torch.zeros
    # of up to (B, T, U+1, D) per backward pass, whose parallel fill left torch's OpenMP threads spinning
    # on the cores the gradient pass then needed (its first kernel ran 2x slower)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], inputs[_DRAW], *output[1:])
    ctx.options = tuple(inputs[4:_DRAW])
    ctx.tail = tuple(inputs[_DRAW + 1:])


def _backward_arguments(ctx, grad_loss: Tensor, logits: Tensor, draw: Tensor | None, saved: list[Tensor]) -> tuple:
    """:func:`loss_backward`'s arguments for the saved forward call."""
    return (grad_loss, logits, *saved, *ctx.options, draw, *ctx.tail)


def _gradient(ctx, grad_loss: Tensor | None) -> Tensor | None:
    if grad_loss is None:  # the loss is not part of what is differentiated (grads are not materialised)
        return None
    logits, draw, *saved = ctx.saved_tensors
    return _call_backward(*_backward_arguments(ctx, grad_loss, logits, draw, saved))


def _backward(ctx, grad_loss: Tensor, *unused: object) -> tuple:
    """The forward operator's autograd formula: one entry per argument the operator was called with (the
    dispatcher leaves out trailing ones equal to their defaults; ``ctx.needs_input_grad`` has one each)."""
    return (_gradient(ctx, grad_loss),) + (None,) * (len(ctx.needs_input_grad) - 1)


def _no_second_derivative(ctx, *grads: object):
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


def _fold_draw(n: int, groups: int, draw: Tensor | None, dim: int | None) -> Tensor | None:
    """TDT's draws for the folded batch: an unbatched draw serves every group; a vmapped one (vmap with
    ``randomness="different"``) gives each vmapped example its own, for each of its groups."""
    if draw is None or dim is None:
        return draw
    return draw.movedim(dim, 0).reshape(n, -1).expand(n, groups).reshape(-1)


def _vmapped_call(op, info, in_dims: tuple, args: tuple, tensors: int) -> object:
    """``op`` on its vmapped arguments with the vmapped axis folded into the batch: one kernel launch, each
    example its own group (``groups`` times the vmapped size)."""
    n = info.batch_size
    args = tuple(args) + _FAMILY_DEFAULTS[len(args) - tensors - 6:]  # those the dispatcher left out
    in_dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    folded = [_fold(n, t, d) for t, d in zip(args[:tensors], in_dims)]
    options = list(args[tensors:])
    groups = options[5]
    options[5] = groups * n
    options[10] = _fold_draw(n, groups, options[10], in_dims[tensors + 10])
    return op(*folded, *options)


@loss_forward.register_vmap
def _loss_forward_vmap(info, in_dims: tuple, *args: object) -> tuple:
    outputs = _vmapped_call(loss_forward, info, in_dims, args, _FORWARD_TENSORS)
    return tuple(_unfold(info.batch_size, t) for t in outputs), (0,) * len(outputs)


@loss_backward.register_vmap
def _loss_backward_vmap(info, in_dims: tuple, *args: object) -> tuple:
    return _unfold(info.batch_size, _vmapped_call(loss_backward, info, in_dims, args, _BACKWARD_TENSORS)), 0


class _LossForward(torch.autograd.Function):
    """:func:`loss_forward` with its autograd formula, for torch.func transforms: the autograd.Function
    that ``register_autograd`` generates has no ``setup_context``, which torch.func requires (pytorch
    issues 168393, 170834). This one while ``torch.compile`` traces a torch.func transform (Dynamo does not
    take custom ``jvp`` methods), :class:`_LossForwardJvp` otherwise. ``durations`` as a :class:`_Leaf`."""

    generate_vmap_rule = True  # the operators' own vmap rules

    @staticmethod
    def forward(*args):
        return loss_forward(*_unleaf(args, _DURATIONS))

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return (_gradient(ctx, grad_loss),) + (None,) * 16


class _LossForwardJvp(_LossForward):
    """:class:`_LossForward` with forward mode (``torch.func.jvp``, ``jacfwd``): the loss's tangent is the
    gradient for a unit incoming gradient dotted with the logits' tangent."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0], *output)
        ctx.draw = inputs[_DRAW]

    @staticmethod
    def jvp(ctx, logits_tangent: Tensor | None, *unused):
        logits, loss, *saved = ctx.saved_tensors
        if logits_tangent is None:
            return (None,) * (1 + len(saved))
        grads = _call_backward(*_backward_arguments(ctx, torch.ones_like(loss), logits, ctx.draw, saved))
        products = grads.to(loss.dtype) * logits_tangent.to(loss.dtype)
        return (products.reshape(loss.shape[0], -1).sum(1),) + (None,) * len(saved)


class _LossBackward(torch.autograd.Function):
    """:func:`loss_backward` for torch.func transforms; its own derivatives raise (see above).
    ``durations`` as a :class:`_Leaf`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return loss_backward(*_unleaf(args, _BACKWARD_DURATIONS))

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_no_second_derivative)
    jvp = staticmethod(_no_second_derivative)


def _call_forward(*args: object) -> tuple[Tensor, ...]:
    """:func:`loss_forward` with autograd: the operator, or an autograd.Function with ``setup_context``
    while a torch.func transform runs (with forward mode unless torch.compile traces it)."""
    if torch._C._are_functorch_transforms_active():
        return (_LossForward if torch.compiler.is_compiling() else _LossForwardJvp).apply(*_leaf(args, _DURATIONS))
    return loss_forward(*args)


def _call_backward(*args: object) -> Tensor:
    """:func:`loss_backward`, through :class:`_LossBackward` while a torch.func transform runs eagerly (so
    that its second derivatives raise rnnt_xla's error; torch.compile's tracing takes the operator)."""
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        return _LossBackward.apply(*_leaf(args, _BACKWARD_DURATIONS))
    return loss_backward(*args)


# --- the public API ------------------------------------------------------------------------------------

def _int_list(durations: object) -> List[int]:
    """Validated durations as the operator's ``int[]``."""
    return [int(d) for d in (durations.tolist() if hasattr(durations, "tolist") else durations)]


def _family_loss(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
                 clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float, kind: str,
                 durations: object, sigma: float, omega: float, rnnt_type: str, delay_penalty: float) -> Tensor:
    """Every public loss: the checks in Python (traced by torch.compile/export), TDT's omega draw, and the
    forward operator with autograd."""
    _check(logits, targets, logit_lengths, target_lengths, blank, _while_tracing(clamp), reduction,
           fused_log_softmax, _while_tracing(fastemit_lambda), kind=kind, durations=durations,
           sigma=_while_tracing(sigma), omega=_while_tracing(omega), rnnt_type=rnnt_type,
           delay_penalty=_while_tracing(delay_penalty))
    if logits.device.type not in ("cpu", "cuda"):  # _check has put every input on the same device
        raise ValueError(f"logits must be on the CPU or a CUDA device, got device {logits.device}")
    # One draw per call from torch's default generator, only when omega can be > 0 (a draw under torch.vmap
    # needs its randomness= argument; omega=0 keeps vmap working without it).
    draw = torch.rand(1) if kind == "tdt" and not (isinstance(omega, (int, float)) and omega == 0) else None
    # contiguous() here, in the graph, rather than in the operators: the one copy of non-contiguous logits is
    # then also the one kept for the backward pass.
    outputs = _call_forward(logits.contiguous(), targets, logit_lengths, target_lengths, int(blank), float(clamp),
                            reduction, bool(fused_log_softmax), float(fastemit_lambda), 1, kind, _int_list(durations),
                            float(sigma), float(omega), draw, rnnt_type, float(delay_penalty))
    return outputs[0] if reduction == "none" else outputs[0].reshape(())


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
    rnnt_type: str = "regular",
    delay_penalty: float = 0.0,
) -> torch.Tensor:
    """RNN-Transducer loss (Graves, 2012), torchaudio-compatible, with FastEmit and k2's variants.

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
        rnnt_type: ``"regular"`` (Graves), ``"modified"`` (k2: emitting a label also consumes the frame,
            at most one label per frame; needs ``logit_lengths >= target_lengths``) or ``"constrained"``
            (k2: modified plus its context-blank term).
        delay_penalty: k2's delay penalty: ``delay_penalty * ((T_b - 1) / 2 - t)`` is added to the score of
            every label arc at frame ``t`` (a finite real; 0 disables it).

    Returns:
        ``(B,)`` costs for ``"none"``, else a scalar: float64 for float64 logits, else float32.

    Raises:
        TypeError, ValueError: on any invalid argument, naming it, before any computation.
        NotImplementedError: a variant (``rnnt_type != "regular"`` or ``delay_penalty != 0``) in a build
            without the variant kernels.
    """
    if torch.jit.is_scripting():  # TorchScript compiles only this branch: the operator runs all the checks
        no_durations: List[int] = []
        return _scripted_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction,
                              fused_log_softmax, fastemit_lambda, "rnnt", no_durations, 0.0, 0.0, rnnt_type,
                              delay_penalty)
    return _family_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
                        fastemit_lambda, "rnnt", (), 0.0, 0.0, rnnt_type, delay_penalty)


def tdt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    durations: List[int],
    blank: int = -1,
    sigma: float = 0.0,
    omega: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """Token-and-Duration Transducer loss (Xu et al., 2023), NeMo's semantics.

    Args:
        logits: ``(B, T, U+1, V + D)`` joiner output, ``D = len(durations)``: ``V`` label scores (the blank
            among them) followed by ``D`` duration scores; both parts are log-softmax-normalised inside the
            loss (the labels' minus ``sigma``). dtypes as :func:`rnnt_loss`.
        targets, logit_lengths, target_lengths: as :func:`rnnt_loss` (labels in ``[0, V)``).
        durations: the frames each duration index advances: sorted, distinct ints ``>= 0`` with a positive
            one (e.g. ``[0, 1, 2, 3, 4]``); a blank advances at least one frame.
        blank: blank index in the label part ``[0, V)``, or negative to count from its end (default ``-1``:
            ``V-1``, NeMo's layout, where the blank is the last label score, just before the durations).
        sigma: logit under-normalisation ``>= 0`` (NeMo recommends 0.05).
        omega: in ``[0, 1]``: with this probability a call computes the plain RNNT loss of the label part
            instead (no sigma, zero gradient for the duration scores), as NeMo. Drawn with ``torch.rand(1)``
            from torch's default generator, so ``torch.manual_seed`` reproduces it.
        clamp, reduction, fastemit_lambda: as :func:`rnnt_loss`.

    Returns / Raises: as :func:`rnnt_loss`.
    """
    if torch.jit.is_scripting():
        return _scripted_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, True,
                              fastemit_lambda, "tdt", durations, sigma, omega, "regular", 0.0)
    return _family_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, True,
                        fastemit_lambda, "tdt", durations, sigma, omega, "regular", 0.0)


def multiblank_rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    big_blank_durations: List[int],
    blank: int = -1,
    sigma: float = 0.0,
    clamp: float = -1.0,
    reduction: str = "mean",
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """Multi-blank RNN-Transducer loss (Xu et al., 2022), NeMo's semantics and vocabulary layout.

    Args:
        logits: ``(B, T, U+1, V)``: the labels, then the big blanks, then the standard blank; big blank ``i``
            (duration ``big_blank_durations[i]``) is entry ``blank - 1 - i``. dtypes as :func:`rnnt_loss`.
        targets, logit_lengths, target_lengths: as :func:`rnnt_loss`.
        big_blank_durations: the big blanks' durations in frames, ints ``>= 2`` (e.g. ``[2, 4, 8]``).
        blank: the standard blank (default ``-1``: ``V-1``, NeMo's layout); ``blank >= len(big_blank_durations)``.
        sigma: logit under-normalisation ``>= 0`` (NeMo recommends 0.05).
        clamp, reduction, fastemit_lambda: as :func:`rnnt_loss`.

    Returns / Raises: as :func:`rnnt_loss`.
    """
    if torch.jit.is_scripting():
        return _scripted_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, True,
                              fastemit_lambda, "multiblank", big_blank_durations, sigma, 0.0, "regular", 0.0)
    return _family_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, True,
                        fastemit_lambda, "multiblank", big_blank_durations, sigma, 0.0, "regular", 0.0)


def _while_tracing(option: object) -> object:
    """A float option as the trace-time checks see it. ``torch.compile(dynamic=True)`` traces Python floats
    as symbolic values, which the NaN and range checks cannot branch on without a graph break; while
    compiling, those two checks are left to the operators, which run them on the actual values (the same
    errors, raised when the compiled code runs)."""
    return 0.0 if isinstance(option, float) and torch.compiler.is_compiling() else option


def _scripted_loss(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor, blank: int,
                   clamp: float, reduction: str, fused_log_softmax: bool, fastemit_lambda: float, kind: str,
                   durations: List[int], sigma: float, omega: float, rnnt_type: str, delay_penalty: float) -> Tensor:
    """The public losses under TorchScript (``torch.jit.script`` of the modules): the operator itself,
    which runs all the checks."""
    draw: Optional[Tensor] = None
    if kind == "tdt" and omega != 0.0:
        draw = torch.rand(1)
    loss = torch.ops.rnnt_xla.loss_forward(logits.contiguous(), targets, logit_lengths, target_lengths, blank,
                                           clamp, reduction, fused_log_softmax, fastemit_lambda, 1, kind, durations,
                                           sigma, omega, draw, rnnt_type, delay_penalty)[0]
    return loss if reduction == "none" else loss.reshape(())


class RNNTLoss(torch.nn.Module):
    """Module form of :func:`rnnt_loss`, like ``torchaudio.transforms.RNNTLoss`` plus ``fastemit_lambda``,
    ``rnnt_type`` and ``delay_penalty``."""

    def __init__(self, blank: int = -1, clamp: float = -1.0, reduction: str = "mean",
                 fused_log_softmax: bool = True, fastemit_lambda: float = 0.0, rnnt_type: str = "regular",
                 delay_penalty: float = 0.0):
        super().__init__()
        self.blank = blank
        self.clamp = clamp
        self.reduction = reduction
        self.fused_log_softmax = fused_log_softmax
        self.fastemit_lambda = fastemit_lambda
        self.rnnt_type = rnnt_type
        self.delay_penalty = delay_penalty

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return rnnt_loss(logits, targets, logit_lengths, target_lengths, int(self.blank), float(self.clamp),
                             self.reduction, bool(self.fused_log_softmax), float(self.fastemit_lambda),
                             self.rnnt_type, float(self.delay_penalty))
        return rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=self.blank, clamp=self.clamp,
                         reduction=self.reduction, fused_log_softmax=self.fused_log_softmax,
                         fastemit_lambda=self.fastemit_lambda, rnnt_type=self.rnnt_type,
                         delay_penalty=self.delay_penalty)


class TDTLoss(torch.nn.Module):
    """Module form of :func:`tdt_loss`."""

    def __init__(self, durations: List[int], blank: int = -1, sigma: float = 0.0, omega: float = 0.0,
                 clamp: float = -1.0, reduction: str = "mean", fastemit_lambda: float = 0.0):
        super().__init__()
        self.durations = list(durations)
        self.blank = blank
        self.sigma = sigma
        self.omega = omega
        self.clamp = clamp
        self.reduction = reduction
        self.fastemit_lambda = fastemit_lambda

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return tdt_loss(logits, targets, logit_lengths, target_lengths, self.durations, int(self.blank),
                            float(self.sigma), float(self.omega), float(self.clamp), self.reduction,
                            float(self.fastemit_lambda))
        return tdt_loss(logits, targets, logit_lengths, target_lengths, self.durations, self.blank, self.sigma,
                        self.omega, self.clamp, self.reduction, self.fastemit_lambda)


class MultiblankRNNTLoss(torch.nn.Module):
    """Module form of :func:`multiblank_rnnt_loss`."""

    def __init__(self, big_blank_durations: List[int], blank: int = -1, sigma: float = 0.0, clamp: float = -1.0,
                 reduction: str = "mean", fastemit_lambda: float = 0.0):
        super().__init__()
        self.big_blank_durations = list(big_blank_durations)
        self.blank = blank
        self.sigma = sigma
        self.clamp = clamp
        self.reduction = reduction
        self.fastemit_lambda = fastemit_lambda

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return multiblank_rnnt_loss(logits, targets, logit_lengths, target_lengths, self.big_blank_durations,
                                        int(self.blank), float(self.sigma), float(self.clamp), self.reduction,
                                        float(self.fastemit_lambda))
        return multiblank_rnnt_loss(logits, targets, logit_lengths, target_lengths, self.big_blank_durations,
                                    self.blank, self.sigma, self.clamp, self.reduction, self.fastemit_lambda)


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


class TDTLossNumba(torch.nn.Module):
    """Drop-in for NeMo's ``TDTLossNumba`` (``nemo.collections.asr.parts.numba.rnnt_loss``): same constructor
    arguments, defaults and forward order, on the CPU too.

    ``acts: (B, T, U+1, V + len(durations))`` unnormalised: the label scores (``blank`` among them, NeMo puts
    it last) then the duration scores; ``clamp <= 0`` disables clamping; ``omega`` as :func:`tdt_loss`
    (drawn from torch's generator instead of Python's ``random``). A reduced loss has shape ``(1,)`` as
    NeMo's; ``'none'`` gives ``(B,)``.
    """

    def __init__(self, blank: int, durations: Optional[List[int]] = None, reduction: str = "mean",
                 fastemit_lambda: float = 0.0, clamp: float = -1, sigma: float = 0.0, omega: float = 0.0):
        super().__init__()
        self.blank = blank
        self.durations = list(durations) if durations is not None else []
        self.fastemit_lambda = fastemit_lambda
        self.clamp = float(clamp) if clamp > 0 else 0.0
        self.reduction = reduction
        self.sigma = sigma
        self.omega = omega

    def forward(self, acts: torch.Tensor, labels: torch.Tensor, act_lens: torch.Tensor,
                label_lens: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            loss = tdt_loss(acts, labels, act_lens, label_lens, self.durations, int(self.blank), float(self.sigma),
                            float(self.omega), float(self.clamp), self.reduction, float(self.fastemit_lambda))
        else:
            loss = tdt_loss(acts, labels, act_lens, label_lens, self.durations, self.blank, self.sigma, self.omega,
                            self.clamp, self.reduction, self.fastemit_lambda)
        return loss if self.reduction == "none" else loss.reshape(1)


class MultiblankRNNTLossNumba(torch.nn.Module):
    """Drop-in for NeMo's ``MultiblankRNNTLossNumba``: same constructor arguments, defaults and forward
    order, on the CPU too. ``acts: (B, T, U+1, V)`` unnormalised, big blank ``i`` at ``blank - 1 - i``
    (:func:`multiblank_rnnt_loss`); a reduced loss has shape ``(1,)`` as NeMo's."""

    def __init__(self, blank: int, big_blank_durations: List[int], reduction: str = "mean",
                 fastemit_lambda: float = 0.0, clamp: float = -1, sigma: float = 0.0):
        super().__init__()
        self.blank = blank
        self.big_blank_durations = list(big_blank_durations) if big_blank_durations is not None else []
        self.fastemit_lambda = fastemit_lambda
        self.clamp = float(clamp) if clamp > 0 else 0.0
        self.reduction = reduction
        self.sigma = sigma

    def forward(self, acts: torch.Tensor, labels: torch.Tensor, act_lens: torch.Tensor,
                label_lens: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            loss = multiblank_rnnt_loss(acts, labels, act_lens, label_lens, self.big_blank_durations, int(self.blank),
                                        float(self.sigma), float(self.clamp), self.reduction,
                                        float(self.fastemit_lambda))
        else:
            loss = multiblank_rnnt_loss(acts, labels, act_lens, label_lens, self.big_blank_durations, self.blank,
                                        self.sigma, self.clamp, self.reduction, self.fastemit_lambda)
        return loss if self.reduction == "none" else loss.reshape(1)


_FUSED = ("fused_rnnt_loss", "FusedRNNTLoss", "Joint")


def __getattr__(name: str):
    """The fused joint + loss lives in ``rnnt_xla.torch_fused`` (it drives the kernels tile by tile and uses
    this module's helpers); it is loaded on first use, so either module can be imported first."""
    if name in _FUSED:
        from . import torch_fused

        return getattr(torch_fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
