"""RNNT loss on NVIDIA GPUs: ``numba.cuda`` kernels over device arrays (no framework imports).

The CUDA twin of :mod:`rnnt_xla.kernels.cpu`: the same four passes, semantics, argument order and
:class:`~rnnt_xla.kernels.cpu.Residuals` layout, so adapters call either backend the same way. Arrays are
anything with ``__cuda_array_interface__`` (torch CUDA tensors, JAX GPU callback buffers, Numba device
arrays); they are used in place, never copied. Every launch goes on the caller's stream (``stream``: a
``CUstream`` handle as an int, e.g. ``torch.cuda.current_stream().cuda_stream`` or a JAX callback's
``ctx.stream``; or a Numba stream; ``None`` is the legacy default stream).

Kernels (``B`` batch, ``T`` max frames, ``U1 = U + 1`` label positions, ``V`` vocabulary):

1. :func:`log_normalizers`: one block per ``(b, t, u)`` row, threads strided over ``V`` (coalesced), the row
   maximum and the sum of exponentials reduced through shared memory; thread 0 writes the row's shift
   (its maximum) and its blank and next-label log-probabilities. Rows outside an utterance are skipped.
2. :func:`alphas_and_costs`: one block per utterance, threads over ``u``, a wavefront over the
   anti-diagonals ``t + u = n`` (every cell of a diagonal depends only on the previous one), one
   ``syncthreads`` per diagonal; thread 0 then writes ``log P(y|x)`` and the cost.
3. :func:`betas`: the same wavefront, backwards.
4. :func:`gradients`: one block per ``(b, t, u)`` row, threads strided over ``V``: thread 0 computes the
   row's two transition posteriors and softmax weight and shares them through shared memory, then each
   thread writes its entries once, clamped and scaled. Padded rows are written with exact zeros.

Precision, as in the CPU kernels: the passes over ``V`` compute in float64 for float64 logits and in float32
for float32, float16 and bfloat16 logits (16-bit logits are read element by element and their gradient is
rounded back to 16 bits); the lattice (residuals, alphas, betas, posteriors) is float64. As on the CPU, a
row's log-normaliser is kept as its shift and the log of its sum, never as their rounded sum, so that
logits far from 0 lose no accuracy. Only the gradient buffer is ``B*T*U1*V``; the backward pass needs one
``(B, T, U1)`` float64 workspace for the betas.

``numba.cuda`` is imported on first use, so this module imports without numba-cuda or a GPU. Kernels are
compiled on first launch for each logits dtype (and index dtype), then cached by Numba for the process.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from .cpu import _PIVOT_LIMIT, Residuals, residual_shapes

__all__ = [
    "Residuals",
    "residual_shapes",
    "available",
    "normalise",
    "lattice_forward",
    "lattice_backward",
    "gradient",
    "forward",
    "backward",
    "compile_ptx",
    "kernel_signatures",
    "compute_dtype",
    "kernel_dtype",
    "KERNEL_DTYPES",
    "on_device",
    "device_view",
    "empty",
    "to_host",
    "copy_from_host",
    "to_device",
    "fill",
    "synchronize",
]

# Threads per block: at least one warp; row kernels reduce through a shared array of _MAX_ROW_THREADS.
_MIN_THREADS = 32
_MAX_ROW_THREADS = 256
_MAX_LATTICE_THREADS = 1024


# ``numba.cuda``, bound by :func:`_numba_cuda` on first use. The kernels must reach it as a module global:
# the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) swaps the globals that hold it for its fake module.
cuda: Any = None


def _numba_cuda() -> Any:
    """Import ``numba.cuda`` and bind the module global; ImportError with the fix when it is missing."""
    global cuda
    if cuda is None:
        try:
            from numba import cuda as module
        except ImportError as error:
            raise ImportError("rnnt_xla's CUDA kernels need numba-cuda: pip install 'numba-cuda[cu13]' "
                              "(or 'numba-cuda[cu12]' for a CUDA 12 driver); then run python -m rnnt_xla doctor"
                              ) from error
        if getattr(module, "implementation", None) != "NVIDIA":  # Numba's deprecated built-in CUDA target
            raise ImportError("rnnt_xla's CUDA kernels need the numba-cuda package, not Numba's built-in "
                              "numba.cuda: pip install 'numba-cuda[cu13]' (or 'numba-cuda[cu12]')")
        cuda = module
    return cuda


def available() -> bool:
    """Whether numba-cuda is installed and sees a usable GPU (never raises)."""
    try:
        return bool(_numba_cuda().is_available())
    except Exception:  # numba-cuda missing, or its bindings or driver fail to load
        return False


class _Kernels(NamedTuple):
    """The four compiled kernels of one logits dtype (Numba dispatchers, specialised lazily)."""

    log_normalizers: Any
    alphas_and_costs: Any
    betas: Any
    gradients: Any


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic dtype of the kernels (and dtype of the costs and log-normalisers): float64 for float64
    logits, float32 for the rest (float32, float16, bfloat16 bits)."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def kernel_dtype(name: str) -> np.dtype:
    """How the kernels see logits of dtype ``name``: bfloat16 as int16 bits (NumPy and Numba have no
    bfloat16; adapters pass a same-memory int16 view), the others as themselves."""
    if name not in KERNEL_DTYPES:
        raise TypeError(f"the CUDA kernels take float32, float64, float16 or bfloat16 logits, got {name}")
    return KERNEL_DTYPES[name]


KERNEL_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                 "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.int16)}


def _converters(storage: np.dtype, float_t: type) -> tuple[Any, Any]:
    """``load(x)``: a logits element in the compute dtype; ``store(x)``: a compute value as a gradient
    element (rounded to nearest even for the 16-bit types)."""
    if storage != np.int16:
        storage_t = storage.type

        @cuda.jit(device=True, inline="always")
        def load(x):
            return float_t(x)

        @cuda.jit(device=True, inline="always")
        def store(x):
            return storage_t(x)

        return load, store
    if _simulating():
        return _bfloat16_load_simulated, _bfloat16_store_simulated

    @cuda.jit(device=True, inline="always")
    def load_bfloat16(bits):
        return cuda.libdevice.int_as_float(np.int32((np.int32(bits) & 0xFFFF) << 16))

    @cuda.jit(device=True, inline="always")
    def store_bfloat16(value):
        x = np.float32(value)
        bits = np.int64(cuda.libdevice.float_as_int(x)) & 0xFFFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
        return np.int16(0x7FC0 if x != x else rounded)  # a truncating cast keeps the low 16 bits; NaN stays NaN

    return load_bfloat16, store_bfloat16


def _simulating() -> bool:
    """Whether ``numba.cuda`` is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` when Numba was imported)."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


# The simulator has no libdevice, so the bfloat16 bit casts go through NumPy there; same rounding as above.
def _bfloat16_load_simulated(bits):
    return np.array([np.int32(bits) << 16], np.int32).view(np.float32)[0]


def _bfloat16_store_simulated(value):
    x = np.float32(value)
    bits = int(np.array([x], np.float32).view(np.uint32)[0])
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.array([0x7FC0 if x != x else rounded & 0xFFFF], np.uint16).view(np.int16)[0]


class DeviceFunctions(NamedTuple):
    """The device helpers of one logits dtype (:func:`device_functions`), shared with the other losses'
    CUDA kernels (``cuda_tdt``): ``float_t`` is the compute dtype's scalar type."""

    float_t: type
    load: Any
    store: Any
    block_max: Any
    block_sum: Any
    log_add: Any
    row_max: Any
    row_sum_of_exp: Any
    row_gradient_terms: Any
    write_row_gradient: Any


@functools.cache
def device_functions(dtype: np.dtype) -> DeviceFunctions:
    """The device helpers of the kernels of one logits dtype (see :func:`_python_kernels`), as
    ``cuda.jit(device=True, inline="always")`` functions for other kernels to call."""
    _numba_cuda()
    storage = np.dtype(dtype)
    float_t = np.dtype(compute_dtype(storage)).type
    neg_inf = -math.inf
    load, store = _converters(storage, float_t)

    @cuda.jit(device=True, inline="always")
    def block_max(value, scratch):
        """Maximum of ``value`` over the block (power-of-two size), returned to every thread."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride and scratch[tid + stride] > scratch[tid]:
                scratch[tid] = scratch[tid + stride]
            cuda.syncthreads()
            stride //= 2
        result = scratch[0]
        cuda.syncthreads()  # scratch is reused by the next reduction
        return result

    @cuda.jit(device=True, inline="always")
    def block_sum(value, scratch):
        """Sum of ``value`` over the block (power-of-two size), returned to every thread."""
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                scratch[tid] += scratch[tid + stride]
            cuda.syncthreads()
            stride //= 2
        result = scratch[0]
        cuda.syncthreads()
        return result

    @cuda.jit(device=True, inline="always")
    def log_add(a, b):
        """``log(exp(a) + exp(b))`` in float64, exact for infinite arguments (as the CPU kernels)."""
        if a < b:
            a, b = b, a
        if b == neg_inf:
            return a
        return a + math.log1p(math.exp(b - a))

    @cuda.jit(device=True, inline="always")
    def row_max(row, scratch):
        """Maximum of a row (threads strided over ``V``), returned to every thread of the block."""
        m = load(row[0])
        for v in range(cuda.threadIdx.x, row.shape[0], cuda.blockDim.x):
            x = load(row[v])
            if x > m:
                m = x
        return block_max(m, scratch)

    @cuda.jit(device=True, inline="always")
    def row_sum_of_exp(row, shift, scratch):
        """``sum_v exp(row[v] - shift)`` in the compute dtype, returned to every thread of the block."""
        s = float_t(0)
        for v in range(cuda.threadIdx.x, row.shape[0], cuda.blockDim.x):
            s += math.exp(load(row[v]) - shift)
        return block_sum(s, scratch)

    @cuda.jit(device=True, inline="always")
    def row_gradient_terms(row, blank, label, has_label, fused_log_softmax, shift, lb, le, p_blank, emit,
                           terms):
        """Thread 0's part of a row's gradient (float64 exponentials are slow on most GPUs, so one thread
        computes them once): from the posteriors ``p_blank`` and ``emit`` (the label's, FastEmit-weighted) of
        the row's blank and label transitions and the lattice's log-probabilities ``lb``/``le`` of its blank
        and label, into the shared ``terms: (4,)`` float64: the blank and label entries, the softmax weight
        occupancy / sum and whether that sum could be recovered from ``lb`` (``cpu._PIVOT_LIMIT``)."""
        recovered = 1.0
        if fused_log_softmax:
            occupancy = p_blank + emit
            # from the lattice's log-probabilities, exponentiated in the compute dtype (as on the CPU)
            g_blank = math.exp(float_t(lb)) * occupancy - p_blank
            g_label = math.exp(float_t(le)) * occupancy - emit if has_label else 0.0
            if abs(lb) <= _PIVOT_LIMIT:  # 1 / sum = exp(-log_sum), log_sum = (x_blank - shift) - log_blank
                terms[2] = occupancy * math.exp(lb - (np.float64(load(row[blank])) - np.float64(shift)))
            else:
                terms[2] = occupancy  # divided by the recomputed sum in write_row_gradient
                recovered = 0.0
        else:
            g_blank = -p_blank
            g_label = -emit
            terms[2] = 0.0
        if has_label and label == blank:  # a label equal to blank: both transitions use the entry
            g_blank -= emit
        terms[0] = g_blank
        terms[1] = g_label
        terms[3] = recovered

    @cuda.jit(device=True, inline="always")
    def write_row_gradient(row, g, blank, label, has_label, fused_log_softmax, shift, clamp, scale, terms,
                           scratch):
        """Every thread's part (after a ``syncthreads``): the row's gradient entries from ``terms``
        (:func:`row_gradient_terms`), clamped and scaled, one write per entry (threads strided over ``V``)."""
        weight = terms[2]
        if terms[3] == 0.0:  # the same for the whole block: a masked or absurdly unlikely blank
            shift = row_max(row, scratch)
            weight /= np.float64(row_sum_of_exp(row, shift, scratch))
        limit = clamp if clamp > 0 else math.inf
        blank_value = store(float_t(min(max(terms[0], -limit), limit) * scale))
        label_value = store(float_t(min(max(terms[1], -limit), limit) * scale))
        label_entry = label if has_label and label != blank else -1
        occ = float_t(weight)
        lim = float_t(limit)
        sc = float_t(scale)
        for v in range(cuda.threadIdx.x, row.shape[0], cuda.blockDim.x):
            if v == blank:
                g[v] = blank_value
            elif v == label_entry:
                g[v] = label_value
            elif fused_log_softmax:
                x = math.exp(load(row[v]) - shift) * occ
                g[v] = store(min(max(x, -lim), lim) * sc)
            else:
                g[v] = store(float_t(0))

    return DeviceFunctions(float_t, load, store, block_max, block_sum, log_add, row_max, row_sum_of_exp,
                           row_gradient_terms, write_row_gradient)


def _python_kernels(dtype: np.dtype) -> _Kernels:
    """The kernels of one logits dtype as plain Python functions (for ``cuda.jit`` or ``compile_ptx``).

    ``dtype`` is how the kernels see the logits and the gradient (:func:`kernel_dtype`): float32, float64,
    float16, or int16 holding bfloat16 bits. They are closures over ``float_t``, the compute dtype (float64
    for float64, else float32: it types the shared reduction array, the log-normalisers and the costs),
    and over ``load``/``store``, which convert single elements to and from it; they use the module
    global ``cuda``. The device helpers (:func:`device_functions`) are inlined in Numba IR
    (``inline="always"``): a separately compiled device function would be compiled for the current GPU,
    which breaks ``compile_ptx`` on machines without one.
    """
    (float_t, load, store, block_max, block_sum, log_add, row_max, row_sum_of_exp, row_gradient_terms,
     write_row_gradient) = device_functions(np.dtype(dtype))
    neg_inf = -math.inf

    def log_normalizers(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax,
                        log_norm, log_blank, log_emit):
        """Pass 1, grid ``B*T*U1`` blocks: a row's shift (its maximum) and its blank and label
        log-probabilities ``(x - shift) - log(sum_v exp(x_v - shift))`` in float64, exact for any finite
        logits (the rounded ``shift + log(sum)`` loses the log next to a large shift). As on the CPU the
        log of the sum is not stored: the gradient recovers it from ``log_blank``."""
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        B, T, U1, V = logits.shape
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        U_b = target_lengths[b]
        if t >= logit_lengths[b] or u > U_b:  # the whole block leaves: no syncthreads is skipped
            return
        row = logits[b, t, u]
        shift = float_t(0)
        log_sum = 0.0
        if fused_log_softmax:
            shift = row_max(row, scratch)
            if shift != neg_inf:  # every entry masked: the log-probabilities are NaN (the utterance's cost)
                log_sum = math.log(np.float64(row_sum_of_exp(row, shift, scratch)))
        if cuda.threadIdx.x == 0:
            log_norm[b, t, u] = shift
            log_blank[b, t, u] = (np.float64(load(row[blank])) - np.float64(shift)) - log_sum
            if u < U_b:
                log_emit[b, t, u] = (np.float64(load(row[targets[b, u]])) - np.float64(shift)) - log_sum
            else:
                log_emit[b, t, u] = neg_inf

    def alphas_and_costs(log_blank, log_emit, logit_lengths, target_lengths, fastemit_lambda,
                         alphas, log_likelihood, costs):
        """Pass 2, grid ``B`` blocks: forward variables by anti-diagonals, ``log P(y|x)`` and the cost."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        for n in range(T_b + U_b):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    if t == 0:
                        a = 0.0 if u == 0 else alphas[b, 0, u - 1] + log_emit[b, 0, u - 1]
                    elif u == 0:
                        a = alphas[b, t - 1, 0] + log_blank[b, t - 1, 0]
                    else:
                        a = log_add(alphas[b, t - 1, u] + log_blank[b, t - 1, u],
                                    alphas[b, t, u - 1] + log_emit[b, t, u - 1])
                    alphas[b, t, u] = a
            cuda.syncthreads()  # the next diagonal reads this one (global writes are block-visible)
        if tid == 0:
            ll = alphas[b, T_b - 1, U_b] + log_blank[b, T_b - 1, U_b]
            log_likelihood[b] = ll
            costs[b] = -(1.0 + fastemit_lambda) * ll

    def betas(log_blank, log_emit, logit_lengths, target_lengths, out):
        """Pass 3, grid ``B`` blocks: backward variables ``out: (B, T, U1)`` float64 by anti-diagonals."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        for n in range(T_b + U_b - 1, -1, -1):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    if t == T_b - 1:
                        if u == U_b:
                            out[b, t, u] = log_blank[b, t, u]
                        else:
                            out[b, t, u] = out[b, t, u + 1] + log_emit[b, t, u]
                    elif u == U_b:
                        out[b, t, u] = out[b, t + 1, u] + log_blank[b, t, u]
                    else:
                        out[b, t, u] = log_add(out[b, t + 1, u] + log_blank[b, t, u],
                                               out[b, t, u + 1] + log_emit[b, t, u])
            cuda.syncthreads()

    def gradients(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda,
                  clamp, grad_scale, log_norm, log_blank, log_emit, alphas, betas, log_likelihood, grads):
        """Pass 4, grid ``B*T*U1`` blocks: ``grads[b] = clip(d cost_b / d logits[b], -clamp, clamp) *
        grad_scale[b]``, one write per entry (formulas in :func:`rnnt_xla.kernels.cpu.gradients`)."""
        B, T, U1, V = logits.shape
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        g = grads[b, t, u]
        if t >= T_b or u > U_b:
            for v in range(tid, V, threads):
                g[v] = store(float_t(0))
            return
        # Thread 0 computes the row's float64 terms once and shares them (float64 exponentials are slow on
        # most GPUs): the blank and label entries, the softmax weight occupancy / sum and whether that sum
        # could be recovered from the blank's log-probability (``cpu._PIVOT_LIMIT``).
        terms = cuda.shared.array(4, np.float64)
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        row = logits[b, t, u]
        shift = log_norm[b, t, u]
        label = targets[b, u] if u < U_b else blank
        if tid == 0:
            ll = log_likelihood[b]
            alpha = alphas[b, t, u]
            lb = log_blank[b, t, u]
            if t < T_b - 1:
                p_blank = math.exp(alpha + lb + betas[b, t + 1, u] - ll)
            elif u == U_b:  # the final blank, which ends the lattice
                p_blank = math.exp(alpha + lb - ll)
            else:
                p_blank = 0.0
            emit = 0.0  # FastEmit-weighted
            if u < U_b:
                emit = (1.0 + fastemit_lambda) * math.exp(alpha + log_emit[b, t, u] + betas[b, t, u + 1] - ll)
            row_gradient_terms(row, blank, label, u < U_b, fused_log_softmax, shift, lb, log_emit[b, t, u],
                               p_blank, emit, terms)
        cuda.syncthreads()  # the block leaves above as a whole or not at all
        write_row_gradient(row, g, blank, label, u < U_b, fused_log_softmax, shift, clamp, grad_scale[b], terms,
                           scratch)

    return _Kernels(log_normalizers, alphas_and_costs, betas, gradients)


@functools.cache
def _kernels(dtype: np.dtype) -> _Kernels:
    """The kernels of one logits dtype as lazily compiling ``cuda.jit`` dispatchers (cached)."""
    return jit_kernels(_python_kernels, dtype)


def kernel_cache(python_kernels, bind: Callable[[], Any]) -> Callable[[np.dtype], Any]:
    """``dtype -> jit_kernels(python_kernels, dtype)``, cached per dtype; ``bind()`` first binds the calling
    module's ``cuda`` global, which its kernel functions read (see ``cuda``)."""

    @functools.cache
    def kernels(dtype: np.dtype):
        bind()
        return jit_kernels(python_kernels, dtype)

    return kernels


def jit_kernels(python_kernels, dtype: np.dtype):
    """``python_kernels(dtype)`` (a NamedTuple of kernel functions for one logits dtype) as lazily compiling
    ``cuda.jit`` dispatchers, after checking the dtype; every loss's CUDA module caches its own."""
    if np.dtype(dtype) not in KERNEL_DTYPES.values():
        raise TypeError(f"the CUDA kernels take float32, float64, float16 or int16 (bfloat16 bits) arrays, "
                        f"got {np.dtype(dtype)}")
    jit = _numba_cuda().jit
    kernels = python_kernels(np.dtype(dtype))
    return type(kernels)(*(jit(f) for f in kernels))


def c_array(dt, ndim: int):
    """The Numba type of a C-contiguous array of element type ``dt``."""
    from numba import types

    return types.Array(dt, ndim, "C")


def signature_types(dtype: np.dtype, index_dtype: np.dtype) -> tuple[Any, Any, tuple]:
    """Numba types shared by every loss's kernel signatures: the logits' (and gradient's) element type, the
    compute dtype (log-normalisers, costs), and ``(targets (B, W), logit_lengths (B,), target_lengths (B,))``."""
    from numba.np.numpy_support import from_dtype

    i = from_dtype(np.dtype(index_dtype))
    return (from_dtype(np.dtype(dtype)), from_dtype(compute_dtype(dtype)),
            (c_array(i, 2), c_array(i, 1), c_array(i, 1)))


def kernel_signatures(dtype: np.dtype, index_dtype: np.dtype) -> _Kernels:
    """Numba signature of each kernel for C-contiguous arrays of the given logits and index dtypes."""
    from numba import types

    f, c, indices = signature_types(dtype, index_dtype)
    f64, array = types.float64, c_array
    grid = (array(c, 3), array(f64, 3), array(f64, 3))  # log_norm, log_blank, log_emit
    return _Kernels(
        log_normalizers=(array(f, 4), *indices, types.int64, types.boolean, *grid),
        alphas_and_costs=(array(f64, 3), array(f64, 3), *indices[1:], f64, array(f64, 3), array(f64, 1),
                          array(c, 1)),
        betas=(array(f64, 3), array(f64, 3), *indices[1:], array(f64, 3)),
        gradients=(array(f, 4), *indices, types.int64, types.boolean, f64, f64, array(f64, 1), *grid,
                   array(f64, 3), array(f64, 3), array(f64, 1), array(f, 4)),
    )


def compile_ptx(dtype: np.dtype, index_dtype: np.dtype, cc: tuple[int, int]) -> dict[str, str]:
    """PTX of every kernel for compute capability ``cc``, without a GPU (``numba.cuda.compile_ptx``)."""
    _numba_cuda()
    signatures = kernel_signatures(dtype, index_dtype)
    return {name: cuda.compile_ptx(pyfunc, signature, cc=cc)[0]
            for name, pyfunc, signature in zip(_Kernels._fields, _python_kernels(dtype), signatures)}


def _threads(n: int, most: int) -> int:
    """Block size: the smallest power of two >= n within [one warp, most]."""
    threads = _MIN_THREADS
    while threads < n and threads < most:
        threads *= 2
    return threads


def _device(array: Any) -> Any:
    """A Numba device array viewing ``array``'s memory (no copy, no synchronisation)."""
    if getattr(array, "__cuda_ndarray__", False):  # already a Numba (or simulator) device array
        return array
    return _numba_cuda().as_cuda_array(array, sync=False)  # we launch on the caller's stream: nothing to wait for


def _stream(stream: Any) -> Any:
    """A Numba stream for ``stream`` (int handle, Numba stream or None for the legacy default stream)."""
    if stream is None or (isinstance(stream, int) and stream == 0):
        return 0
    if isinstance(stream, int):
        return _numba_cuda().external_stream(stream)
    return stream


def _synchronize(stream: Any) -> None:
    """Wait for the work queued on a stream from :func:`_stream` (0: the legacy default stream)."""
    (cuda.legacy_default_stream() if isinstance(stream, int) else stream).synchronize()


def on_device(ordinal: int) -> Any:
    """Context manager making GPU ``ordinal``'s primary context current, for Numba calls from threads (e.g. a
    JAX callback's) where another device's context, or none, may be current."""
    return _numba_cuda().gpus[ordinal]


def device_view(array: Any, shape: tuple[int, ...], dtype: Any = None) -> Any:
    """Zero-copy view of a C-contiguous device array with another ``shape`` (same size) and optionally
    another ``dtype`` read from the same bytes, e.g. ``(..., 2)`` uint32 holding ``(...)`` float64."""
    _numba_cuda()
    view = _device(array)
    if view.size == 0:  # Numba cannot reshape empty arrays (e.g. width-0 targets); there is nothing to view
        return cuda.device_array(tuple(shape), dtype=np.dtype(dtype or view.dtype))
    if dtype is not None and np.dtype(dtype) != view.dtype:
        view = view.view(np.dtype(dtype))  # reinterprets the last axis; the reshape below fixes the shape
    return view.reshape(tuple(shape))


def empty(shape: tuple[int, ...], dtype: Any, stream: Any = None) -> Any:
    """Uninitialised Numba device array (Numba's allocator, not a framework's)."""
    return _numba_cuda().device_array(tuple(shape), dtype=np.dtype(dtype), stream=_stream(stream))


def to_host(array: Any, stream: Any = None) -> np.ndarray:
    """A host copy of a device array once the work queued on ``stream`` is done (synchronises it)."""
    _numba_cuda()
    s = _stream(stream)
    host = _device(array).copy_to_host(stream=s)
    _synchronize(s)
    return host


def copy_from_host(host: np.ndarray, out: Any, stream: Any = None) -> None:
    """Enqueue a copy of ``host`` (converted to the dtype of ``out``) into the device array ``out``."""
    _numba_cuda()
    out = _device(out)
    # From pageable memory the copy is staged before the call returns, so ``host`` may be freed at once.
    out.copy_to_device(np.ascontiguousarray(host, dtype=out.dtype).reshape(out.shape), stream=_stream(stream))


def to_device(host: np.ndarray, stream: Any = None) -> Any:
    """A new Numba device array holding a copy of ``host``, enqueued on ``stream``. Numba frees it when it is
    dropped: keep it, or :func:`synchronize` the stream, until the kernels that read it are done."""
    out = empty(host.shape, host.dtype, stream)
    copy_from_host(host, out, stream)
    return out


def synchronize(stream: Any = None) -> None:
    """Wait for the work queued on ``stream`` (an int handle, a Numba stream or None)."""
    _numba_cuda()
    _synchronize(_stream(stream))


def _fill(out, value):
    """``out[i] = value`` for every element of the 1-D ``out``, one thread each (:func:`fill`)."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = value


@functools.cache
def _fill_kernel() -> Any:
    return _numba_cuda().jit(_fill)


def fill(array: Any, value: float, stream: Any = None) -> None:
    """Set every element of a C-contiguous float device array to ``value``. Asynchronous on ``stream``."""
    _numba_cuda()
    view = _device(array)
    if view.size:
        flat = view.reshape((view.size,))
        threads = _threads(flat.size, _MAX_ROW_THREADS)
        _fill_kernel()[-(-flat.size // threads), threads, _stream(stream)](flat, float(value))


def normalise(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
              fused_log_softmax: bool, residuals: Residuals, stream: Any = None) -> None:
    """Pass 1 (:func:`log_normalizers`) into ``residuals.log_norm/log_blank/log_emit`` (device arrays; the
    other residuals are not touched and may be None). Asynchronous on ``stream``.

    ``logits: (B, T, U1, V)`` may be a tile of frames of a longer problem: ``logit_lengths`` are then counted
    from the tile's first frame and may exceed ``T`` (rows past the tile are simply not there)."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths = map(_device, (logits, targets, logit_lengths, target_lengths))
    log_norm, log_blank, log_emit = map(_device, residuals[:3])
    B, T, U1, V = logits.shape
    _kernels(logits.dtype).log_normalizers[B * T * U1, _threads(V, _MAX_ROW_THREADS), _stream(stream)](
        logits, targets, logit_lengths, target_lengths, blank, bool(fused_log_softmax), log_norm, log_blank, log_emit)


def lattice_forward(logit_lengths: Any, target_lengths: Any, fastemit_lambda: float, residuals: Residuals,
                    costs: Any, stream: Any = None) -> None:
    """Pass 2 (:func:`alphas_and_costs`) into ``residuals.alphas/log_likelihood`` and ``costs`` (device
    arrays, ``costs`` in :func:`compute_dtype`). Asynchronous on ``stream``."""
    _numba_cuda()
    logit_lengths, target_lengths, costs = map(_device, (logit_lengths, target_lengths, costs))
    res = Residuals(None, *map(_device, residuals[1:]))
    B, T, U1 = res.alphas.shape
    _kernels(np.dtype(costs.dtype)).alphas_and_costs[B, _threads(U1, _MAX_LATTICE_THREADS), _stream(stream)](
        res.log_blank, res.log_emit, logit_lengths, target_lengths, float(fastemit_lambda), res.alphas,
        res.log_likelihood, costs)


def lattice_backward(logit_lengths: Any, target_lengths: Any, residuals: Residuals, out: Any,
                     stream: Any = None) -> None:
    """Pass 3 (:func:`betas`) into ``out: (B, T, U1)`` float64 (a device array). Asynchronous on ``stream``."""
    _numba_cuda()
    logit_lengths, target_lengths, out = map(_device, (logit_lengths, target_lengths, out))
    log_blank, log_emit = map(_device, residuals[1:3])
    B, T, U1 = out.shape
    # The lattice kernels do not read the logits: any dtype's variant will do (float64 is always compiled).
    _kernels(np.dtype(np.float64)).betas[B, _threads(U1, _MAX_LATTICE_THREADS), _stream(stream)](
        log_blank, log_emit, logit_lengths, target_lengths, out)


def gradient(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
             fused_log_softmax: bool, fastemit_lambda: float, clamp: float, grad_scale: Any,
             residuals: Residuals, betas: Any, grads: Any, stream: Any = None) -> None:
    """Pass 4 (:func:`gradients`) into ``grads`` (same shape and dtype as ``logits``), all device arrays
    (``grad_scale: (B,)`` float64 too). Asynchronous on ``stream``.

    As :func:`normalise`, ``logits`` may be a tile of frames; ``betas`` then has one frame more than the
    tile (``betas[t + 1]`` of its last frame belongs to the next tile)."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, grad_scale, betas, grads = map(
        _device, (logits, targets, logit_lengths, target_lengths, grad_scale, betas, grads))
    res = Residuals(*map(_device, residuals))
    B, T, U1, V = logits.shape
    _kernels(logits.dtype).gradients[B * T * U1, _threads(V, _MAX_ROW_THREADS), _stream(stream)](
        logits, targets, logit_lengths, target_lengths, blank, bool(fused_log_softmax), float(fastemit_lambda),
        float(clamp), grad_scale, res.log_norm, res.log_blank, res.log_emit, res.alphas, betas,
        res.log_likelihood, grads)


def forward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
            fused_log_softmax: bool, fastemit_lambda: float, costs: Any, residuals: Residuals,
            stream: Any = None) -> None:
    """Costs ``(B,)`` into ``costs`` and the forward residuals into ``residuals``, all
    caller-allocated device arrays (layout of :func:`rnnt_xla.kernels.cpu.residual_shapes`).

    ``logits: (B, T, U1, V)`` float32/float64/float16, or bfloat16 as int16 bits (:func:`kernel_dtype`);
    ``targets: (B, W)``, ``logit_lengths``, ``target_lengths: (B,)`` int32/int64, validated; all C-contiguous
    on one GPU. ``costs`` and ``residuals.log_norm`` are in :func:`compute_dtype`. Asynchronous on ``stream``.
    """
    normalise(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, residuals, stream)
    lattice_forward(logit_lengths, target_lengths, fastemit_lambda, residuals, costs, stream)


def backward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
             fused_log_softmax: bool, fastemit_lambda: float, clamp: float, grad_scale: Any,
             residuals: Residuals, grads: Any, stream: Any = None, betas: Any = None) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype, device), each utterance's gradient
    clamped and then multiplied by ``grad_scale: (B,) float64`` (a device array, or a host numpy array
    that is copied over).

    ``betas`` is an optional ``(B, T, U1)`` float64 device workspace. When it is not given, or
    ``grad_scale`` is on the host, this function allocates device memory itself (through Numba, outside
    the framework's allocator) and synchronises ``stream`` before returning, so that the memory is not
    freed under a running kernel. With both given it only enqueues work on ``stream``.
    """
    _numba_cuda()
    s = _stream(stream)
    owns_memory = betas is None or isinstance(grad_scale, np.ndarray)
    if isinstance(grad_scale, np.ndarray):
        grad_scale = cuda.to_device(np.ascontiguousarray(grad_scale, dtype=np.float64), stream=s)
    if betas is None:
        B, T, U1 = _device(residuals.alphas).shape
        betas = cuda.device_array((B, T, U1), dtype=np.float64, stream=s)
    lattice_backward(logit_lengths, target_lengths, residuals, betas, s)
    gradient(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda, clamp,
             grad_scale, residuals, betas, grads, s)
    if owns_memory:
        _synchronize(s)
