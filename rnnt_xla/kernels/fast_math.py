"""Scalar helpers for the CPU kernels that LLVM can vectorise.

Numba from pip has no SVML, so ``math.exp`` inside a loop stays a scalar libm call. :func:`fast_exp`
on float32 is written in plain arithmetic (Cephes' ``expf``: range reduction, a degree-6 polynomial and
``2**n`` assembled from exponent bits), which LLVM turns into SIMD code; on float64 it is ``math.exp``.
Its error is below 2 ulp on the range the loss uses (arguments up to 70: the shifts of the
softmax keep ``x - shift <= log(1e30)``); from 88.38 on it returns +inf.

:func:`fast_exp64` is the same in float64 for the lattices and posteriors kept in float64 (the TDT kernels):
Cody-Waite range reduction, a degree-11 polynomial and ``2**n`` from exponent bits (in two factors, so
that subnormal results are rounded once), within 1 ulp of ``math.exp`` on its whole range, exactly 0 below
-745.2 (and for -inf), +inf above 709.78, NaN for NaN.

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
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["fast_exp", "fast_exp64", "cast_like", "load", "store", "fence", "wide_vectors", "prefetch_row"]

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


def _bitcast(source, target, llvm_target, doc: str):
    """An intrinsic reinterpreting the bits of a ``source`` value as a ``target`` (a no-op bitcast LLVM can
    vectorise)."""

    def typer(typingctx, value):
        if value != source:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_target)

        return target(source), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


_float32_from_bits = _bitcast(types.int32, types.float32, ir.FloatType(), "The float32 with the bits of an int32.")
_float64_from_bits = _bitcast(types.int64, types.float64, ir.DoubleType(), "The float64 with the bits of an int64.")
_bits_of_float32 = _bitcast(types.float32, types.int32, ir.IntType(32), "The bits of a float32 as an int32.")
_bits_of_float64 = _bitcast(types.float64, types.int64, ir.IntType(64), "The bits of a float64 as an int64.")


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


# LLVM's tuning for recent Intel cores (Ice Lake, Sapphire Rapids, ...) prefers 256-bit vectors even where
# AVX-512 exists (older cores lowered their clock for 512-bit code). The row loops here are bound by the
# arithmetic of fast_exp, and twice the lanes run them 1.3-1.6x faster on such a core (a 2-core Sapphire
# Rapids VM: the sum of exps over (81600, 256) float32 rows in 2.6 ms instead of 3.9 ms).
_PREFER_WIDE_VECTORS = '"prefer-vector-width"="512"'


@intrinsic
def wide_vectors(typingctx):
    """Mark the jitted function that calls this as preferring 512-bit vectors (a no-op at run time).

    Sets LLVM's ``prefer-vector-width`` attribute on the calling function only, not on the process (as
    ``NUMBA_CPU_FEATURES`` would): on a CPU without AVX-512 the widest legal vectors stay what they are.
    Call it first in a helper whose loop over a row is hot; the attribute must sit on the function that
    holds the loop.
    """

    def codegen(context, builder, signature, args):
        # llvmlite only knows LLVM's keyword attributes; a string attribute is printed as given
        set.add(builder.function.attributes, _PREFER_WIDE_VECTORS)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """``llvm.prefetch`` of the cache line holding ``array[index]`` (a 1-d array) for reading, kept in all
    cache levels. Only a hint: no fault, no effect on any value."""
    if not isinstance(array, types.Array) or array.ndim != 1 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        index_value = context.cast(builder, args[1], signature.args[1], types.intp)
        element = cgutils.get_item_pointer(context, builder, array_type, data, [index_value])  # strides kept
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        address = builder.bitcast(element, byte_pointer)
        # (address, read, locality 3: keep in every level, data cache)
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(array, index), codegen


_CACHE_LINE = 64


@njit
def prefetch_row(row):
    """Start loading a row of logits (a 1-d array, contiguous for one hint per cache line) into the caches.

    The row passes compute an ``exp`` per entry, and on rows from memory the hardware prefetcher alone does
    not overlap that with the loads: hinting the row after next made the log-normaliser pass 1.2x / 1.4x
    faster at (8, 200, 51, 256) / (16, 150, 41, 1024) float32 and the gradient pass 1.06x / 1.1x (2-core
    Sapphire Rapids VM). Hinting the gradient rows it writes made that pass slower at V = 1024."""
    step = max(1, _CACHE_LINE // row.itemsize)
    for v in range(0, row.shape[0], step):
        _prefetch(row, v)


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


# float64: exp(x) = 2**n * exp(r), n = round(x / ln 2) (rounded by adding 1.5 * 2**52, whose last bits are
# then n), r = x - n * ln 2 in two parts (n * _LN2_HI_64 is exact), |r| <= 0.347, where a degree-11
# polynomial (Chebyshev fit, within 4e-18 of exp(r)) is evaluated.
_LOG2E_64 = 1.4426950408889634
_LN2_HI_64 = 6.93145751953125e-1
_LN2_LO_64 = 1.42860682030941723212e-6
_ROUND_64 = 6755399441055744.0  # 1.5 * 2**52
_ROUND_BITS_64 = 0x4338000000000000
_MIN_ARG_64 = -745.2  # exp(-745.2) is below half the smallest subnormal
_MAX_ARG_64 = 709.782712893384  # the largest argument whose exp is finite
_E2, _E3, _E4, _E5 = 0.5000000000000019, 0.1666666666666668, 0.04166666666648795, 0.008333333333319589
_E6, _E7, _E8 = 0.0013888888952352863, 0.00019841269890076403, 2.4801485441561313e-05
_E9, _E10, _E11 = 2.755724088722987e-06, 2.763265472252779e-07, 2.5110049204818658e-08


def fast_exp64(x):  # pragma: no cover - replaced by the overload inside jitted code
    """``exp(x)`` in float64 for any float ``x``, in plain arithmetic (vectorisable). Only callable from jitted
    code."""
    raise TypeError("fast_exp64 is only available inside numba-jitted functions")


def _exp_float64(x):
    x = np.float64(x)
    xc = x if x > _MIN_ARG_64 else _MIN_ARG_64  # NaN too: n must stay a small integer
    xc = xc if xc < _MAX_ARG_64 else _MAX_ARG_64
    rounded = xc * _LOG2E_64 + _ROUND_64
    n = rounded - _ROUND_64
    r = xc - n * _LN2_HI_64
    r = r - n * _LN2_LO_64
    p = _E11
    p = p * r + _E10
    p = p * r + _E9
    p = p * r + _E8
    p = p * r + _E7
    p = p * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + 1.0
    p = p * r + 1.0
    # 2**n as 2**h * 2**(n - h): both factors are normal for n in [-1075, 1024], and p * 2**h is exact
    k = _bits_of_float64(rounded) - _ROUND_BITS_64
    h = k >> 1
    y = p * _float64_from_bits((h + 1023) << 52) * _float64_from_bits((k - h + 1023) << 52)
    y = np.inf if x > _MAX_ARG_64 else y
    y = 0.0 if x < _MIN_ARG_64 else y
    return x if x != x else y


@overload(fast_exp64, jit_options={"fastmath": {"contract"}})
def _fast_exp64_overload(x):
    if isinstance(x, types.Float):
        return _exp_float64
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
