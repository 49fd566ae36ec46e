"""The transducer loss family behind one interface (numpy only, no framework imports).

The adapters (``rnnt_xla.torch``, ``rnnt_xla.jax``) run every loss through the same operator / custom_vjp;
what differs between the losses is a :class:`LossSpec` (static, hashable options) and the kernel module it
dispatches to:

- ``kind="rnnt"``: ``rnnt_xla.kernels.cpu`` (``rnnt_type`` "regular" | "modified" | "constrained" and
  ``delay_penalty``, after k2), on CUDA ``rnnt_xla.kernels.cuda`` (regular lattice) and
  ``rnnt_xla.kernels.cuda_variants`` (the variants);
- ``kind="tdt"``: ``rnnt_xla.kernels.cpu_tdt`` (Token-and-Duration Transducer: ``durations``, ``sigma``,
  ``omega``), on CUDA ``cuda_tdt``; logits ``(B, T, U+1, V + len(durations))``;
- ``kind="multiblank"``: ``rnnt_xla.kernels.cpu_multiblank`` (``durations`` are the big blanks'
  durations, ``sigma``), on CUDA ``cuda_multiblank``.

Every kernel module has the same entry points, numpy in, numpy out, caller-allocated
(``residual_shapes``, ``forward``, ``backward``; see each module). Residuals are a tuple of arrays whose
first axis is the batch, so that a batch made of equal groups (``vmap`` folded into the batch) can be run
group by group when the groups need different modes (TDT's ``omega`` draws, see :func:`forward`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from .kernels import cpu
from .validation import KINDS, LossShape

__all__ = ["KINDS", "LossSpec", "make_spec", "residual_shapes", "forward", "backward", "cuda_forward",
           "cuda_backward", "label_head_only"]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The static options of one loss, validated and normalised (``validation.check_arguments``).

    ``blank`` is in ``[0, V)`` (TDT: the label part of the last axis); ``durations`` are TDT's durations or
    the multi-blank loss's big-blank durations (empty for RNNT); ``omega`` (TDT) is the probability of
    using the plain RNNT loss of the label head instead, decided per call from a random draw that the
    adapter passes in (:func:`label_head_only`); ``rnnt_type`` and ``delay_penalty`` are RNNT's.
    Frozen and hashable: it is JAX's static argument and part of the compiled programs' cache keys.
    """

    kind: str = "rnnt"
    blank: int = 0
    fused_log_softmax: bool = True
    fastemit_lambda: float = 0.0
    clamp: float = -1.0
    durations: tuple[int, ...] = ()
    sigma: float = 0.0
    omega: float = 0.0
    rnnt_type: str = "regular"
    delay_penalty: float = 0.0

    @property
    def plain_rnnt(self) -> bool:
        """Today's RNNT lattice (the kernels' default path): regular, without delay penalty."""
        return self.kind == "rnnt" and self.rnnt_type == "regular" and self.delay_penalty == 0.0

    @property
    def uses_draw(self) -> bool:
        """Whether a call needs a uniform random draw in ``[0, 1)`` (TDT with ``omega > 0``)."""
        return self.kind == "tdt" and self.omega > 0.0


def make_spec(shape: LossShape, kind: str = "rnnt", fused_log_softmax: bool = True, fastemit_lambda: float = 0.0,
              clamp: float = -1.0, durations: Sequence[int] = (), sigma: float = 0.0, omega: float = 0.0,
              rnnt_type: str = "regular", delay_penalty: float = 0.0) -> LossSpec:
    """The :class:`LossSpec` of options that ``validation.check_arguments`` accepted (it returned ``shape``,
    whose ``blank`` is normalised)."""
    values = durations.tolist() if hasattr(durations, "tolist") else durations
    return LossSpec(kind=kind, blank=shape.blank, fused_log_softmax=bool(fused_log_softmax),
                    fastemit_lambda=float(fastemit_lambda), clamp=float(clamp), durations=tuple(int(d) for d in values),
                    sigma=float(sigma), omega=float(omega), rnnt_type=rnnt_type, delay_penalty=float(delay_penalty))


_MODULES = {"rnnt": "rnnt_xla.kernels.cpu", "tdt": "rnnt_xla.kernels.cpu_tdt",
            "multiblank": "rnnt_xla.kernels.cpu_multiblank"}


def _cpu_module(kind: str) -> ModuleType:
    """The CPU kernel module of ``kind``, imported on first use (TDT and multi-blank load only when used)."""
    if kind == "rnnt":
        return cpu
    try:
        return importlib.import_module(_MODULES[kind])
    except ModuleNotFoundError as error:
        if error.name != _MODULES[kind]:
            raise
        raise NotImplementedError(f"rnnt_xla: the {kind} loss's CPU kernels ({_MODULES[kind]}) are not part of "
                                  "this build") from error


def residual_shapes(spec: LossSpec, batch: int, frames: int, positions: int,
                    dtype: np.dtype) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
    """``(shape, dtype)`` of each residual of ``spec``'s loss for logits ``(batch, frames, positions, .)`` of
    ``dtype`` (16-bit logits give float32 residuals, as ``cpu.compute_dtype``). Every shape starts with
    ``batch``; the list is the same whatever mode a TDT call picks (``omega``)."""
    if spec.kind == "rnnt":
        return tuple(cpu.residual_shapes(batch, frames, positions, dtype))
    return tuple(_cpu_module(spec.kind).residual_shapes(batch, frames, positions, len(spec.durations), dtype))


def label_head_only(spec: LossSpec, draws: np.ndarray | None) -> np.ndarray | bool:
    """TDT's ``omega`` mode from the adapter's uniform draws in ``[0, 1)``: per group of the batch (one draw
    for all, or one per group), whether to use the plain RNNT loss of the label head (``draw < omega``, as
    NeMo's ``random.uniform(0, 1) < omega``). ``False`` when ``spec`` draws nothing."""
    if not spec.uses_draw or draws is None:
        return False
    decisions = np.asarray(draws, dtype=np.float64).reshape(-1) < spec.omega
    return bool(decisions[0]) if decisions.size == 1 else decisions


def _runs(modes: np.ndarray | bool, batch: int) -> list[tuple[slice, bool]]:
    """Maximal runs of utterances that share one mode: ``modes`` is one bool, or one per equal group."""
    if isinstance(modes, (bool, np.bool_)):
        return [(slice(0, batch), bool(modes))]
    modes = np.asarray(modes, dtype=bool).reshape(-1)
    if batch % modes.size:
        raise ValueError(f"rnnt_xla: {modes.size} omega draws do not split a batch of {batch} into equal groups")
    size = batch // modes.size
    runs, start = [], 0
    for g in range(1, modes.size + 1):
        if g == modes.size or modes[g] != modes[start]:
            runs.append((slice(start * size, g * size), bool(modes[start])))
            start = g
    return runs


def _residuals(module: ModuleType, arrays: Sequence[np.ndarray]) -> Any:
    """``arrays`` as the module's ``Residuals`` named tuple (if it has one)."""
    kind = getattr(module, "Residuals", None)
    return kind(*arrays) if kind is not None else tuple(arrays)


def _rnnt_variant_options(spec: LossSpec, entry) -> dict[str, Any]:
    """Keyword arguments selecting RNNT's variant: none for the plain lattice (the kernels' defaults, so the
    regular path calls the kernels exactly as before)."""
    if spec.plain_rnnt:
        return {}
    if "rnnt_type" not in inspect.signature(entry).parameters:
        raise NotImplementedError(f"rnnt_xla: rnnt_type={spec.rnnt_type!r} / delay_penalty={spec.delay_penalty} "
                                  "need the RNNT variant kernels, which are not part of this build")
    return dict(rnnt_type=spec.rnnt_type, delay_penalty=spec.delay_penalty)


def forward(spec: LossSpec, logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray,
            target_lengths: np.ndarray, costs: np.ndarray, residuals: Sequence[np.ndarray],
            label_head_only: np.ndarray | bool = False) -> None:
    """Costs ``(B,)`` (compute dtype) and the residuals (:func:`residual_shapes`) of ``spec``'s loss, on the
    CPU, into the caller's arrays.

    ``logits: (B, T, U+1, V)`` (TDT: ``V + len(durations)``) as the kernels take them
    (``cpu.as_kernel_array``), C-contiguous; ``targets (B, W)``, ``logit_lengths``, ``target_lengths (B,)``
    int64, validated. ``label_head_only`` (TDT's omega mode, :func:`label_head_only`): one bool, or one per
    equal group of the batch.
    """
    if spec.kind == "rnnt":
        cpu.forward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.fused_log_softmax,
                    spec.fastemit_lambda, costs, cpu.Residuals(*residuals),
                    **_rnnt_variant_options(spec, cpu.forward))
        return
    module = _cpu_module(spec.kind)
    durations = np.asarray(spec.durations, dtype=np.int64)
    for rows, head_only in _runs(label_head_only, logits.shape[0]):
        part = _residuals(module, [r[rows] for r in residuals])
        if spec.kind == "tdt":
            module.forward(logits[rows], targets[rows], logit_lengths[rows], target_lengths[rows], spec.blank,
                           durations, spec.sigma, spec.fastemit_lambda, head_only, costs[rows], part)
        else:
            module.forward(logits[rows], targets[rows], logit_lengths[rows], target_lengths[rows], spec.blank,
                           durations, spec.sigma, spec.fastemit_lambda, costs[rows], part)


def backward(spec: LossSpec, logits: np.ndarray, targets: np.ndarray, logit_lengths: np.ndarray,
             target_lengths: np.ndarray, grad_scale: np.ndarray, residuals: Sequence[np.ndarray],
             grads: np.ndarray, label_head_only: np.ndarray | bool = False) -> None:
    """The gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype, C-contiguous), each utterance's
    gradient clamped (``spec.clamp > 0``) and multiplied by ``grad_scale: (B,) float64``; padding gets
    exactly zero. Arguments as :func:`forward`, ``residuals`` the forward pass's, ``label_head_only`` the
    same as in the forward call."""
    if spec.kind == "rnnt":
        cpu.backward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.fused_log_softmax,
                     spec.fastemit_lambda, spec.clamp, grad_scale, cpu.Residuals(*residuals), grads,
                     **_rnnt_variant_options(spec, cpu.backward))
        return
    module = _cpu_module(spec.kind)
    durations = np.asarray(spec.durations, dtype=np.int64)
    for rows, head_only in _runs(label_head_only, logits.shape[0]):
        part = _residuals(module, [r[rows] for r in residuals])
        if spec.kind == "tdt":
            module.backward(logits[rows], targets[rows], logit_lengths[rows], target_lengths[rows], spec.blank,
                            durations, spec.sigma, spec.fastemit_lambda, spec.clamp, head_only, grad_scale[rows],
                            part, grads[rows])
        else:
            module.backward(logits[rows], targets[rows], logit_lengths[rows], target_lengths[rows], spec.blank,
                            durations, spec.sigma, spec.fastemit_lambda, spec.clamp, grad_scale[rows], part,
                            grads[rows])


_CUDA_MODULES = {"rnnt": "rnnt_xla.kernels.cuda", "tdt": "rnnt_xla.kernels.cuda_tdt",
                 "multiblank": "rnnt_xla.kernels.cuda_multiblank", "variant": "rnnt_xla.kernels.cuda_variants"}


def _cuda_module(spec: LossSpec) -> ModuleType:
    """The CUDA kernel module of ``spec``'s loss (RNNT variants: ``cuda_variants``, the regular lattice keeps
    ``cuda``'s kernels); NotImplementedError naming the module when this build lacks it."""
    key = "variant" if spec.kind == "rnnt" and not spec.plain_rnnt else spec.kind
    try:
        return importlib.import_module(_CUDA_MODULES[key])
    except ModuleNotFoundError as error:
        if error.name != _CUDA_MODULES[key]:
            raise
        raise NotImplementedError(f"rnnt_xla: the {spec.kind} loss's CUDA kernels ({_CUDA_MODULES[key]}) are not "
                                  "part of this build; compute it on the CPU") from error


def _batch(array: Any) -> int:
    """The batch size of a device array."""
    from .kernels import cuda

    return cuda._device(array).shape[0]


def _device_rows(arrays: Sequence[Any], rows: slice) -> list[Any]:
    """Zero-copy views of the ``rows`` of device arrays (C-contiguous along the batch axis)."""
    from .kernels import cuda

    return [cuda._device(a)[rows] for a in arrays]


def cuda_forward(spec: LossSpec, logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, costs: Any,
                 residuals: Sequence[Any], stream: Any = None, label_head_only: Any = False) -> None:
    """:func:`forward` on one GPU (``rnnt_xla.kernels.cuda``, ``cuda_variants``, ``cuda_tdt``,
    ``cuda_multiblank``; device arrays, asynchronous on ``stream``)."""
    module = _cuda_module(spec)
    if spec.kind == "rnnt":
        module.forward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.fused_log_softmax,
                       spec.fastemit_lambda, costs, cpu.Residuals(*residuals), stream=stream,
                       **_rnnt_variant_options(spec, module.forward))
        return
    if spec.kind == "multiblank":
        module.forward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.durations, spec.sigma,
                       spec.fastemit_lambda, costs, module.Residuals(*residuals), stream=stream)
        return
    runs = _runs(label_head_only, _batch(logits))
    for rows, head_only in runs:
        whole = len(runs) == 1
        x, y, xl, yl, c, *res = (logits, targets, logit_lengths, target_lengths, costs, *residuals) if whole else \
            _device_rows([logits, targets, logit_lengths, target_lengths, costs, *residuals], rows)
        module.forward(x, y, xl, yl, spec.blank, spec.durations, spec.sigma, spec.fastemit_lambda, head_only, c,
                       module.Residuals(*res), stream=stream)


def cuda_backward(spec: LossSpec, logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any,
                  grad_scale: Any, residuals: Sequence[Any], grads: Any, stream: Any = None, betas: Any = None,
                  label_head_only: Any = False) -> None:
    """:func:`backward` on one GPU (the modules of :func:`cuda_forward`; ``grad_scale``
    may be a host array; ``betas`` an optional caller-allocated ``(B, T, U+1)`` float64 device array)."""
    module = _cuda_module(spec)
    if spec.kind == "rnnt":
        module.backward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.fused_log_softmax,
                        spec.fastemit_lambda, spec.clamp, grad_scale, cpu.Residuals(*residuals), grads,
                        stream=stream, betas=betas, **_rnnt_variant_options(spec, module.backward))
        return
    if spec.kind == "multiblank":
        module.backward(logits, targets, logit_lengths, target_lengths, spec.blank, spec.durations, spec.sigma,
                        spec.fastemit_lambda, spec.clamp, grad_scale, module.Residuals(*residuals), grads,
                        stream=stream, betas=betas)
        return
    runs = _runs(label_head_only, _batch(logits))
    copied_scale = len(runs) > 1 and isinstance(grad_scale, np.ndarray)
    if copied_scale:  # once for all runs; waited for below (the runs see a device array)
        from .kernels import cuda

        grad_scale = cuda.cuda.to_device(np.ascontiguousarray(grad_scale, dtype=np.float64),
                                         stream=cuda._stream(stream))
    for rows, head_only in runs:
        whole = len(runs) == 1
        arrays = (logits, targets, logit_lengths, target_lengths, grad_scale, grads, *residuals)
        if betas is not None:
            arrays += (betas,)
        if not whole:
            arrays = _device_rows(arrays, rows)
        x, y, xl, yl, scale, g, *res = arrays
        workspace = res.pop() if betas is not None else None
        module.backward(x, y, xl, yl, spec.blank, spec.durations, spec.sigma, spec.fastemit_lambda, spec.clamp,
                        head_only, scale, module.Residuals(*res), g, stream=stream, betas=workspace)
    if copied_scale and betas is not None:  # without betas every run synchronised itself
        cuda._synchronize(cuda._stream(stream))
