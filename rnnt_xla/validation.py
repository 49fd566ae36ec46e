"""Argument checks shared by every adapter, run before any kernel is launched.

Numba kernels do no bounds checking, so every shape, dtype, length and label is checked here first. The
checks are split in two so that adapters can run the first part where only metadata is known (e.g. while
JAX traces) and the second where values are available:

- :func:`check_arguments` looks at shapes, dtypes, devices and the scalar options;
- :func:`check_lengths_and_labels` looks at the values of the lengths and of the labels.

Every error is a ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) whose message starts
with the name of the offending argument and says what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

__all__ = [
    "REDUCTIONS",
    "LOGIT_DTYPES",
    "INDEX_DTYPES",
    "ArraySpec",
    "LossShape",
    "check_arguments",
    "check_lengths_and_labels",
]

REDUCTIONS = ("none", "sum", "mean", "mean_by_target_length", "mean_volume")
LOGIT_DTYPES = ("float32", "float64", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class ArraySpec:
    """What validation needs to know about one array argument, in framework-neutral terms."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name, e.g. "float32", "int64"
    device: str = "cpu"


@dataclass(frozen=True)
class LossShape:
    """Sizes of a valid problem: logits are ``(batch, max_frames, max_labels + 1, vocab)``."""

    batch: int
    max_frames: int
    max_labels: int
    vocab: int
    targets_width: int
    blank: int  # normalised to [0, vocab)


def _check_rank(spec: ArraySpec, rank: int, layout: str) -> None:
    if len(spec.shape) != rank:
        raise ValueError(
            f"{spec.name} must have {rank} dimension{'s' if rank > 1 else ''} {layout}, "
            f"got shape {tuple(spec.shape)}"
        )


def _check_dtype(spec: ArraySpec, allowed: Sequence[str], kind: str) -> None:
    if spec.dtype not in allowed:
        raise TypeError(f"{spec.name} must be {kind} ({' or '.join(allowed)}), got dtype {spec.dtype}")


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_arguments(
    logits: ArraySpec,
    targets: ArraySpec,
    logit_lengths: ArraySpec,
    target_lengths: ArraySpec,
    *,
    blank: object,
    clamp: object,
    reduction: object,
    fused_log_softmax: object,
    fastemit_lambda: object,
) -> LossShape:
    """Check shapes, dtypes, devices and options; return the problem sizes with ``blank`` normalised.

    Expected: ``logits (B, T, U+1, V)`` float, ``targets (B, W)`` int with ``W >= 0``, ``logit_lengths (B,)``
    and ``target_lengths (B,)`` int, all on one device; ``blank`` an int in ``[-V, V)``; ``clamp`` a real
    number (``<= 0`` disables clamping); ``fastemit_lambda`` a finite real ``>= 0``; ``reduction`` one of
    :data:`REDUCTIONS`; ``fused_log_softmax`` a bool.
    """
    _check_rank(logits, 4, "(batch, max frames T, max target length U + 1, vocabulary V)")
    _check_rank(targets, 2, "(batch, max target length)")
    _check_rank(logit_lengths, 1, "(batch,)")
    _check_rank(target_lengths, 1, "(batch,)")
    _check_dtype(logits, LOGIT_DTYPES, "floating point")
    for spec in (targets, logit_lengths, target_lengths):
        _check_dtype(spec, INDEX_DTYPES, "integer")

    devices = {spec.device for spec in (logits, targets, logit_lengths, target_lengths)}
    if len(devices) > 1:
        placed = ", ".join(f"{s.name} on {s.device}" for s in (logits, targets, logit_lengths, target_lengths))
        raise ValueError(f"all inputs must be on the same device as logits ({logits.device}); got {placed}")

    B, T, U1, V = logits.shape
    if B < 0 or T < 1 or U1 < 1 or V < 1:  # B = 0 (an empty shard) is allowed: the loss is then 0
        raise ValueError(f"logits must have non-empty dimensions T, U+1 and V (B, T, U+1, V), got shape "
                         f"{tuple(logits.shape)}")
    for spec in (targets, logit_lengths, target_lengths):
        if spec.shape[0] != B:
            raise ValueError(f"{spec.name} must have batch size {B} (as logits), got shape {tuple(spec.shape)}")

    if isinstance(blank, bool) or not isinstance(blank, Integral):
        raise TypeError(f"blank must be an int, got {type(blank).__name__} {blank!r}")
    if not -V <= int(blank) < V:
        raise ValueError(f"blank must be in [-{V}, {V}) for a vocabulary of V={V}, got {blank}")
    _check_real("clamp", clamp)
    lam = _check_real("fastemit_lambda", fastemit_lambda)
    if lam < 0 or math.isinf(lam):
        raise ValueError(f"fastemit_lambda must be a finite number >= 0, got {fastemit_lambda}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)}; got {reduction!r}")
    if not isinstance(fused_log_softmax, (bool, np.bool_)):
        raise TypeError(f"fused_log_softmax must be a bool, got {type(fused_log_softmax).__name__}")

    return LossShape(
        batch=B, max_frames=T, max_labels=U1 - 1, vocab=V, targets_width=targets.shape[1], blank=int(blank) % V
    )


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_lengths_and_labels(
    targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray, shape: LossShape
) -> None:
    """Check the values: ``1 <= logit_lengths[b] <= T``, ``0 <= target_lengths[b] <= min(U, W)`` and
    ``0 <= targets[b, u] < V`` for ``u < target_lengths[b]``. Padding past a target length is ignored."""
    logit_lengths = np.asarray(logit_lengths)
    target_lengths = np.asarray(target_lengths)
    T = shape.max_frames
    bad = (logit_lengths < 1) | (logit_lengths > T)
    if bad.any():
        (b,) = _first(bad)
        raise ValueError(
            f"logit_lengths must be in [1, {T}] (T = logits.shape[1]); logit_lengths[{b}] = {logit_lengths[b]}"
        )
    max_u = min(shape.max_labels, shape.targets_width)
    bad = (target_lengths < 0) | (target_lengths > max_u)
    if bad.any():
        (b,) = _first(bad)
        limit = (
            f"U = logits.shape[2] - 1 = {shape.max_labels}"
            if shape.max_labels <= shape.targets_width
            else f"targets.shape[1] = {shape.targets_width}"
        )
        raise ValueError(f"target_lengths must be in [0, {max_u}] ({limit}); target_lengths[{b}] = {target_lengths[b]}")
    if shape.targets_width == 0:
        return
    targets = np.asarray(targets)
    used = np.arange(shape.targets_width)[None, :] < target_lengths[:, None]
    bad = used & ((targets < 0) | (targets >= shape.vocab))
    if bad.any():
        b, u = _first(bad)
        raise ValueError(
            f"targets must hold labels in [0, {shape.vocab}) (V = logits.shape[3]) within each target length; "
            f"targets[{b}, {u}] = {targets[b, u]}"
        )
