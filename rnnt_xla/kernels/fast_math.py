"""Scalar helpers for the CPU kernels that LLVM can vectorise.

Numba from pip has no SVML, so ``math.exp`` inside a loop stays a scalar libm call. :func:`fast_exp`
on float32 is written in plain arithmetic (Cephes' ``expf``: range reduction, a degree-6 polynomial and
``2**n`` assembled from exponent bits), which LLVM turns into SIMD code; on float64 it is ``math.exp``.
Its error is below 2 ulp on the range the loss uses (arguments up to 70: the shifts of the
softmax keep ``x - shift <= log(1e30)``); from 88.38 on it returns +inf.

Also here: :func:`cast_like` (a value in an array's element type, for dtype-generic kernels),
:func:`load`/:func:`store`, which read logits and write gradients (16-bit ones as raw bits; subnormal
gradient entries flushed to zero), and
:func:`fence`, which keeps the kernels' fast-math reassociation away from a value.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["fast_exp", "cast_like", "load", "store", "fence"]

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


@intrinsic
def fence(typingctx, x):
    """``x`` itself, as a value the optimiser cannot reassociate through (``llvm.arithmetic.fence``).

    The kernels are compiled with fast-math reassociation (for vectorised sums), and a callee compiled
    without it still has its arithmetic merged with the caller's: ``fence(a - b) - c`` is the only reliable
    way to keep LLVM from rewriting ``(a - b) - c`` as ``a - (b + c)``, whose rounded ``b + c`` loses ``c``
    next to a large ``b``. Scalar use only (it stops a loop from being vectorised).
    """
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        intrinsic_fn = builder.module.declare_intrinsic("llvm.arithmetic.fence", [ty], ir.FunctionType(ty, [ty]))
        return builder.call(intrinsic_fn, args)

    return x(x), codegen


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


# 16-bit logits and gradients. Numba has no 16-bit float type on the CPU, so they travel as raw bits:
# IEEE float16 as uint16 and bfloat16 as int16 (see ``as_kernel_array``); ``load`` and ``store`` convert
# to and from float32 element by element, in code LLVM vectorises (F16C for float16, shifts for bfloat16).

@intrinsic
def _float32_from_half_bits(typingctx, bits):
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _half_bits_from_float32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit
def _bfloat16_to_float32(bits):
    return _float32_from_bits(np.int32((np.int32(bits) & 0xFFFF) << 16))


@njit
def _float32_to_bfloat16(value):
    x = np.float32(value)
    bits = np.int64(_bits_of_float32(x)) & 0xFFFFFFFF
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    return np.int16(0x7FC0 if x != x else rounded)  # a truncating cast: keeps the low 16 bits


def load(array, index):  # pragma: no cover - replaced by the overload inside jitted code
    """``array[index]`` as a float: float32 for 16-bit logits (uint16: float16 bits, int16: bfloat16 bits)."""
    raise TypeError("load is only available inside numba-jitted functions")


def store(array, index, value):  # pragma: no cover - replaced by the overload inside jitted code
    """``array[index] = value`` for a gradient entry, rounding to float16/bfloat16 bits for 16-bit arrays.

    A value below the smallest normal float32 (float64 for float64 arrays; bfloat16 shares float32's
    range) is written as zero: the gradient's far-off rows are full of such subnormal products, and a
    CPU computes with subnormals many times slower: the backward matmul of the joint network that
    consumes the gradient took 4x longer (7.2 s instead of 1.8 s at B,T,U,V = 4,300,80,1024). XLA's CPU
    runtime flushes subnormals itself; torch does not (``torch.set_flush_denormal`` is off by default).
    The change is below 1.2e-38 absolute. float16's own subnormals (below 6.1e-5) are kept: they are
    normal numbers once a matmul converts them to float32."""
    raise TypeError("store is only available inside numba-jitted functions")


@overload(load)
def _load_overload(array, index):
    if array.dtype == types.uint16:
        return lambda array, index: _float32_from_half_bits(array[index])
    if array.dtype == types.int16:
        return lambda array, index: _bfloat16_to_float32(array[index])
    return lambda array, index: array[index]


# The smallest normal float32 / float64. A gradient entry below it is flushed to zero (see ``store``).
_TINY32 = np.float32(np.finfo(np.float32).tiny)
_TINY64 = np.float64(np.finfo(np.float64).tiny)


@njit(fastmath={"contract"})
def _normal32(value):
    """``value`` as a float32, a subnormal result flushed to (signed) zero; NaN and infinities kept."""
    x = np.float32(value)
    return x if abs(x) >= _TINY32 or x != x else x * _ZERO


@njit(fastmath={"contract"})
def _normal64(value):
    x = np.float64(value)
    return x if abs(x) >= _TINY64 or x != x else x * 0.0


@overload(store)
def _store_overload(array, index, value):
    if array.dtype == types.uint16:
        def store_half(array, index, value):
            array[index] = _half_bits_from_float32(np.float32(value))
        return store_half
    if array.dtype == types.int16:
        def store_bfloat16(array, index, value):
            array[index] = _float32_to_bfloat16(_normal32(value))
        return store_bfloat16
    if array.dtype == types.float32:
        def store_float32(array, index, value):
            array[index] = _normal32(value)
        return store_float32
    if array.dtype == types.float64:
        def store_float64(array, index, value):
            array[index] = _normal64(value)
        return store_float64

    def store_other(array, index, value):
        array[index] = value
    return store_other
