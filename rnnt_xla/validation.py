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
    "KINDS",
    "RNNT_TYPES",
    "REDUCTIONS",
    "LOGIT_DTYPES",
    "INDEX_DTYPES",
    "ArraySpec",
    "LossShape",
    "check_arguments",
    "check_durations",
    "check_lengths_and_labels",
]

KINDS = ("rnnt", "tdt", "multiblank")  # the transducer losses (``rnnt_xla.family``)
RNNT_TYPES = ("regular", "modified", "constrained")  # k2's variants of the RNNT lattice
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
    """Sizes of a valid problem: logits are ``(batch, max_frames, max_labels + 1, vocab)`` (TDT:
    ``(..., vocab + len(durations))``, ``vocab`` being the label part, blank included)."""

    batch: int
    max_frames: int
    max_labels: int
    vocab: int
    targets_width: int
    blank: int  # normalised to [0, vocab)
    rnnt_type: str = "regular"  # "modified"/"constrained": each label takes a frame, so T_b >= U_b


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


def _check_finite(name: str, value: object, lower: float | None = None, upper: float | None = None) -> float:
    """A finite real number in ``[lower, upper]`` (bounds optional)."""
    number = _check_real(name, value)
    if math.isinf(number) or (lower is not None and number < lower) or (upper is not None and number > upper):
        bounds = ("" if lower is None else f" >= {lower:g}") + ("" if upper is None else f" and <= {upper:g}")
        raise ValueError(f"{name} must be a finite number{bounds}, got {value}")
    return number


def check_durations(name: str, durations: object, kind: str) -> tuple[int, ...]:
    """``durations`` as a tuple of ints, checked for ``kind``.

    TDT (``name="durations"``): a non-empty ascending sequence of distinct ints ``>= 0`` (typically
    ``[0, 1, 2, 3, 4]``) with at least one positive duration, since a blank advances at least one frame.
    Multi-blank (``name="big_blank_durations"``): a non-empty sequence of ints ``>= 2`` (e.g. ``[2, 4, 8]``),
    one per big blank. Duration 1 is refused: it is the standard blank, and NeMo's kernels do not handle it
    consistently (its alphas count the final arc of a duration-1 big blank, its betas do not). Order and repeats are
    free, as in NeMo: big blank ``i`` is vocabulary entry ``blank - 1 - i`` whatever its duration.
    """
    if hasattr(durations, "tolist"):  # numpy or torch arrays of ints
        durations = durations.tolist()
    if isinstance(durations, (str, bytes)) or not hasattr(durations, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(durations).__name__} {durations!r}")
    values = tuple(durations)
    for d in values:
        if isinstance(d, bool) or not isinstance(d, Integral):
            raise TypeError(f"{name} must hold ints, got {type(d).__name__} {d!r} in {list(values)}")
    values = tuple(int(d) for d in values)
    if not values:
        raise ValueError(f"{name} must not be empty")
    if kind == "multiblank":
        if min(values) < 2:
            raise ValueError(f"{name} must be ints >= 2 (a duration-1 blank is the standard blank), "
                             f"got {list(values)}")
        return values
    if min(values) < 0:
        raise ValueError(f"{name} must be >= 0 (frames a token advances), got {list(values)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {list(values)}")
    if list(values) != sorted(values):
        raise ValueError(f"{name} must be sorted in ascending order, got {list(values)}")
    if values[-1] == 0:
        raise ValueError(f"{name} must contain a positive duration (a blank advances at least one frame), "
                         f"got {list(values)}")
    return values


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
    kind: object = "rnnt",
    durations: object = (),
    sigma: object = 0.0,
    omega: object = 0.0,
    rnnt_type: object = "regular",
    delay_penalty: object = 0.0,
) -> LossShape:
    """Check shapes, dtypes, devices and options; return the problem sizes with ``blank`` normalised.

    Expected: ``logits (B, T, U+1, V)`` float, ``targets (B, W)`` int with ``W >= 0``, ``logit_lengths (B,)``
    and ``target_lengths (B,)`` int, all on one device; ``blank`` an int in ``[-V, V)``; ``clamp`` a real
    number (``<= 0`` disables clamping); ``fastemit_lambda`` a finite real ``>= 0``; ``reduction`` one of
    :data:`REDUCTIONS`; ``fused_log_softmax`` a bool.

    The loss family (``rnnt_xla.family``): ``kind`` one of :data:`KINDS`. ``"rnnt"``: ``rnnt_type`` one of
    :data:`RNNT_TYPES`, ``delay_penalty`` a finite real, no durations. ``"tdt"``: ``logits (B, T, U+1, V +
    len(durations))`` with ``V >= 1`` label scores (blank included; ``blank`` counts in that part),
    ``durations`` as :func:`check_durations`, ``sigma`` finite ``>= 0``, ``omega`` in ``[0, 1]``.
    ``"multiblank"``: ``durations`` the big blanks' (named ``big_blank_durations``), which sit just below the
    standard ``blank`` (NeMo's layout), so ``blank >= len(big_blank_durations)``; ``sigma`` finite ``>= 0``.
    TDT and multi-blank always fuse the log-softmax.
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

    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(repr(k) for k in KINDS)}; got {kind!r}")
    durations_name = "big_blank_durations" if kind == "multiblank" else "durations"
    if kind == "rnnt":
        if not hasattr(durations, "__len__") or len(durations):
            raise ValueError(f"durations must be empty for the RNNT loss, got {durations!r}")
        durations = ()
    else:
        durations = check_durations(durations_name, durations, kind)

    B, T, U1, width = logits.shape
    V = width - len(durations) if kind == "tdt" else width
    if B < 0 or T < 1 or U1 < 1 or width < 1:  # B = 0 (an empty shard) is allowed: the loss is then 0
        raise ValueError(f"logits must have non-empty dimensions T, U+1 and V (B, T, U+1, V), got shape "
                         f"{tuple(logits.shape)}")
    if V < 1:
        raise ValueError(f"logits must have a last axis of V + len(durations) = V + {len(durations)} with V >= 1 "
                         f"label scores (the blank included) before the {len(durations)} duration scores, "
                         f"got shape {tuple(logits.shape)}")
    for spec in (targets, logit_lengths, target_lengths):
        if spec.shape[0] != B:
            raise ValueError(f"{spec.name} must have batch size {B} (as logits), got shape {tuple(spec.shape)}")

    if isinstance(blank, bool) or not isinstance(blank, Integral):
        raise TypeError(f"blank must be an int, got {type(blank).__name__} {blank!r}")
    part = " (the label part of logits' last axis)" if kind == "tdt" else ""
    if not -V <= int(blank) < V:
        raise ValueError(f"blank must be in [-{V}, {V}) for a vocabulary of V={V}{part}, got {blank}")
    if kind == "multiblank" and int(blank) % V < len(durations):
        raise ValueError(f"blank must leave room for the {len(durations)} big blanks just below it (big blank i "
                         f"is entry blank - 1 - i), so blank % V must be >= {len(durations)}; got blank={blank} "
                         f"for V={V}")
    _check_real("clamp", clamp)
    lam = _check_real("fastemit_lambda", fastemit_lambda)
    if lam < 0 or math.isinf(lam):
        raise ValueError(f"fastemit_lambda must be a finite number >= 0, got {fastemit_lambda}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(repr(r) for r in REDUCTIONS)}; got {reduction!r}")
    if not isinstance(fused_log_softmax, (bool, np.bool_)):
        raise TypeError(f"fused_log_softmax must be a bool, got {type(fused_log_softmax).__name__}")

    sigma = _check_finite("sigma", sigma, lower=0.0)
    omega = _check_finite("omega", omega, lower=0.0, upper=1.0)
    if not isinstance(rnnt_type, str) or rnnt_type not in RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {', '.join(repr(r) for r in RNNT_TYPES)}; got {rnnt_type!r}")
    delay = _check_finite("delay_penalty", delay_penalty)
    if kind != "rnnt":
        if not fused_log_softmax:
            raise ValueError(f"fused_log_softmax must be True for the {kind} loss (it always normalises itself)")
        if rnnt_type != "regular" or delay != 0.0:
            raise ValueError(f"rnnt_type and delay_penalty are options of the RNNT loss, not of the {kind} loss; "
                             f"got rnnt_type={rnnt_type!r}, delay_penalty={delay_penalty}")
    elif sigma != 0.0:
        raise ValueError(f"sigma is an option of the TDT and multi-blank losses, not of the RNNT loss; got {sigma}")
    if kind != "tdt" and omega != 0.0:
        raise ValueError(f"omega is an option of the TDT loss, not of the {kind} loss; got {omega}")

    return LossShape(
        batch=B, max_frames=T, max_labels=U1 - 1, vocab=V, targets_width=targets.shape[1], blank=int(blank) % V,
        rnnt_type=rnnt_type,
    )


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_lengths_and_labels(
    targets: np.ndarray, logit_lengths: np.ndarray, target_lengths: np.ndarray, shape: LossShape
) -> None:
    """Check the values: ``1 <= logit_lengths[b] <= T``, ``0 <= target_lengths[b] <= min(U, W)`` and
    ``0 <= targets[b, u] < V`` for ``u < target_lengths[b]``; for ``rnnt_type`` "modified"/"constrained",
    also ``target_lengths[b] <= logit_lengths[b]``. Padding past a target length is ignored."""
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
    if shape.rnnt_type != "regular":
        bad = logit_lengths < target_lengths
        if bad.any():
            (b,) = _first(bad)
            raise ValueError(
                f"logit_lengths must be >= target_lengths for rnnt_type={shape.rnnt_type!r} (each label takes a "
                f"frame); logit_lengths[{b}] = {logit_lengths[b]} < target_lengths[{b}] = {target_lengths[b]}"
            )
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
