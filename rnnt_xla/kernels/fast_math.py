"""Scalar helpers for the CPU kernels that LLVM can vectorise.

Numba from pip has no SVML, so ``math.exp`` inside a loop stays a scalar libm call. :func:`fast_exp`
on float32 is written in plain arithmetic (Cephes' ``expf``: range reduction, a degree-6 polynomial and
``2**n`` assembled from exponent bits), which LLVM turns into SIMD code; on float64 it is ``math.exp``.
Its error is below 2 ulp on the range the loss uses (arguments <= 0).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["fast_exp", "cast_like"]

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0 = np.float32(1.9875691500e-4)
_P1 = np.float32(1.3981999507e-3)
_P2 = np.float32(8.3334519073e-3)
_P3 = np.float32(4.1665795894e-2)
_P4 = np.float32(1.6666665459e-1)
_P5 = np.float32(5.0000001201e-1)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
# Below _MIN_ARG the result is under float32's normal range: return exactly 0 (also for -inf).
_MIN_ARG = np.float32(-87.33654)
_MAX_ARG = np.float32(88.72283)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (a no-op bitcast LLVM can vectorise)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def fast_exp(x):  # pragma: no cover - replaced by the overload inside jitted code
    """``exp(x)`` in the precision of ``x``; vectorisable for float32. Only callable from jitted code."""
    raise TypeError("fast_exp is only available inside numba-jitted functions")


def _exp_float32(x):
    # NaN fails both comparisons below and flows through to a NaN result.
    xc = _MIN_ARG if x < _MIN_ARG else x
    xc = _MAX_ARG if xc > _MAX_ARG else xc
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + _ONE
    # Numba widens int32 arithmetic to int64; the outer cast brings it back for the bitcast.
    scale = _float32_from_bits(np.int32((np.int32(n) + 127) << 23))
    return _ZERO if x < _MIN_ARG else p * scale


def _exp_libm(x):
    return math.exp(x)


@overload(fast_exp, jit_options={"fastmath": {"contract"}})
def _fast_exp_overload(x):
    if x == types.float32:
        return _exp_float32
    if isinstance(x, types.Float):
        return _exp_libm
    return None


def cast_like(value, array):  # pragma: no cover - replaced by the overload inside jitted code
    """``value`` converted to the element type of ``array``. Only callable from jitted code."""
    raise TypeError("cast_like is only available inside numba-jitted functions")


@overload(cast_like)
def _cast_like_overload(value, array):
    target = array.dtype

    def impl(value, array):
        return target(value)

    return impl
