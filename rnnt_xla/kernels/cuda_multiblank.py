"""Multi-blank RNNT loss on NVIDIA GPUs: ``numba.cuda`` kernels (no framework imports).

The CUDA twin of :mod:`rnnt_xla.kernels.cpu_multiblank` (NeMo's semantics and vocabulary layout, described
there: big blank ``i``, of ``big_blank_durations[i]`` frames, is entry ``blank - 1 - i``): the same entry points
(plus the caller's ``stream``) and :class:`~rnnt_xla.kernels.cpu_multiblank.Residuals` layout. Arrays, streams
and precision as in :mod:`rnnt_xla.kernels.cuda`, whose device helpers these kernels share.

Kernels:

1. :func:`log_normalizers`, one block per row: the row's shift and log-sum (``cuda``'s row reductions), then
   on thread 0 the blank, next-label and big-blank log-probabilities;
2. :func:`alphas_and_costs`, one block per utterance: the anti-diagonal wavefront (a big blank of ``d`` frames
   comes from diagonal ``n - d``), each cell's log-sum-exp shifted by its largest term; ``log P`` and the cost;
3. :func:`betas`: the same, backwards;
4. :func:`gradients`, one block per row: thread 0 computes the posteriors, every thread writes the row
   through ``cuda``'s row writer with every blank-like arc's weight at the blank (right for every entry but
   the blanks), then the thread that wrote each blank-like entry rewrites it with its own posterior.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import cuda as _cuda
from .cpu_multiblank import Residuals, residual_shapes
from .cuda import _MAX_LATTICE_THREADS, _MAX_ROW_THREADS, _device, _stream, _synchronize, _threads
from .cuda_tdt import _durations

__all__ = ["Residuals", "residual_shapes", "forward", "backward", "compile_ptx", "kernel_signatures"]

# ``numba.cuda``, a module global for the CUDA simulator (see ``cuda.cuda``).
cuda: Any = None


def _numba_cuda() -> Any:
    global cuda
    cuda = _cuda._numba_cuda()
    return cuda


class _Kernels(NamedTuple):
    """The four multi-blank kernels of one logits dtype."""

    log_normalizers: Any
    alphas_and_costs: Any
    betas: Any
    gradients: Any


def _python_kernels(dtype: np.dtype) -> _Kernels:
    """The multi-blank kernels of one logits dtype as plain Python functions (see ``cuda._python_kernels``)."""
    _numba_cuda()
    fn = _cuda.device_functions(np.dtype(dtype))
    float_t, load, store, row_max, row_sum_of_exp = fn.float_t, fn.load, fn.store, fn.row_max, fn.row_sum_of_exp
    row_gradient_terms, write_row_gradient = fn.row_gradient_terms, fn.write_row_gradient
    neg_inf = -math.inf
    inf = math.inf

    @cuda.jit(device=True, inline="always")
    def beta_at(betas, b, t, u, T_b, U_b):
        """Backward variable of ``(t, u)`` for ``t <= T_b``: past the last frame only ``(T_b, U_b)`` (0)."""
        if t < T_b:
            return betas[b, t, u]
        return 0.0 if u == U_b else neg_inf

    @cuda.jit(device=True, inline="always")
    def usable_shift(m):
        """A log-sum-exp's shift: its largest term, or 0 when that is infinite (no arc: -inf; NaN and inf then
        propagate through the exps)."""
        return m if abs(m) < inf else 0.0

    def log_normalizers(logits, targets, logit_lengths, target_lengths, blank, log_norm, log_blank, log_emit,
                        log_big):
        """Pass 1, grid ``B*T*U1`` blocks: shift, blank, next-label and big-blank log-probabilities (float64,
        ``(x - shift) - log_sum``)."""
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        B, T, U1, V = logits.shape
        K = log_big.shape[3]
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        U_b = target_lengths[b]
        if t >= logit_lengths[b] or u > U_b:  # the whole block leaves
            return
        row = logits[b, t, u]
        shift = row_max(row, scratch)
        log_sum = 0.0
        if shift != neg_inf:  # every entry masked: NaN log-probabilities (the utterance's cost)
            log_sum = math.log(np.float64(row_sum_of_exp(row, shift, scratch)))
        if cuda.threadIdx.x == 0:
            s = np.float64(shift)
            log_norm[b, t, u] = shift
            log_blank[b, t, u] = (np.float64(load(row[blank])) - s) - log_sum
            log_emit[b, t, u] = (np.float64(load(row[targets[b, u]])) - s) - log_sum if u < U_b else neg_inf
            for i in range(K):
                log_big[b, t, u, i] = (np.float64(load(row[blank - 1 - i])) - s) - log_sum

    def alphas_and_costs(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, sigma,
                         fastemit_lambda, alphas, log_likelihood, costs):
        """Pass 2, grid ``B`` blocks: forward variables by anti-diagonals (formulas in
        :func:`rnnt_xla.kernels.cpu_multiblank.alphas_and_costs`), ``log P`` and the cost."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        K = durations.shape[0]
        for n in range(T_b + U_b):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    if n == 0:
                        alphas[b, 0, 0] = 0.0
                        continue
                    from_blank = alphas[b, t - 1, u] + log_blank[b, t - 1, u] if t > 0 else neg_inf
                    from_label = alphas[b, t, u - 1] + log_emit[b, t, u - 1] if u > 0 else neg_inf
                    m = max(from_blank, from_label)
                    for i in range(K):
                        s = t - durations[i]
                        if s >= 0:
                            m = max(m, alphas[b, s, u] + log_big[b, s, u, i])
                    shift = usable_shift(m)
                    total = math.exp(from_blank - shift) + math.exp(from_label - shift)
                    for i in range(K):
                        s = t - durations[i]
                        if s >= 0:
                            total += math.exp(alphas[b, s, u] + log_big[b, s, u, i] - shift)
                    alphas[b, t, u] = shift + math.log(total) - sigma  # each arc in carries one -sigma
            cuda.syncthreads()
        if tid == 0:  # the end: the blank of the last frame and each big blank that ends at T_b
            last = alphas[b, T_b - 1, U_b] + log_blank[b, T_b - 1, U_b]
            m = last
            for i in range(K):
                s = T_b - durations[i]
                if s >= 0:
                    m = max(m, alphas[b, s, U_b] + log_big[b, s, U_b, i])
            shift = usable_shift(m)
            total = math.exp(last - shift)
            for i in range(K):
                s = T_b - durations[i]
                if s >= 0:
                    total += math.exp(alphas[b, s, U_b] + log_big[b, s, U_b, i] - shift)
            ll = shift + math.log(total) - sigma
            log_likelihood[b] = ll
            costs[b] = -(1.0 + fastemit_lambda) * ll

    def betas(log_blank, log_emit, log_big, logit_lengths, target_lengths, durations, sigma, out):
        """Pass 3, grid ``B`` blocks: backward variables ``out: (B, T, U1)`` float64 by anti-diagonals from the
        end (arcs into frame ``T_b`` end the lattice if ``u = U_b``)."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        K = durations.shape[0]
        for n in range(T_b + U_b - 1, -1, -1):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    to_blank = beta_at(out, b, t + 1, u, T_b, U_b) + log_blank[b, t, u]
                    to_label = out[b, t, u + 1] + log_emit[b, t, u] if u < U_b else neg_inf
                    m = max(to_blank, to_label)
                    for i in range(K):
                        s = t + durations[i]
                        if s <= T_b:
                            m = max(m, beta_at(out, b, s, u, T_b, U_b) + log_big[b, t, u, i])
                    shift = usable_shift(m)
                    total = math.exp(to_blank - shift) + math.exp(to_label - shift)
                    for i in range(K):
                        s = t + durations[i]
                        if s <= T_b:
                            total += math.exp(beta_at(out, b, s, u, T_b, U_b) + log_big[b, t, u, i] - shift)
                    out[b, t, u] = shift + math.log(total) - sigma
            cuda.syncthreads()

    def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
                  grad_scale, log_norm, log_blank, log_emit, log_big, alphas, betas, log_likelihood, grads):
        """Pass 4, grid ``B*T*U1`` blocks: ``grads[b] = clip(d cost_b / d logits[b], -clamp, clamp) *
        grad_scale[b]`` (formulas in :func:`rnnt_xla.kernels.cpu_multiblank.gradients`)."""
        B, T, U1, V = logits.shape
        K = durations.shape[0]
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
        terms = cuda.shared.array(7, np.float64)  # row_gradient_terms' four, occupancy, p_blank, emit
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        row = logits[b, t, u]
        shift = log_norm[b, t, u]
        label = targets[b, u] if u < U_b else blank
        base = alphas[b, t, u] - sigma - log_likelihood[b]  # an arc's posterior: exp(base + log_prob + beta)
        if tid == 0:
            lb = log_blank[b, t, u]
            p_blank = math.exp(base + lb + beta_at(betas, b, t + 1, u, T_b, U_b))
            blanks = p_blank  # the standard and the big blanks
            for i in range(K):
                s = t + durations[i]
                if s <= T_b:
                    blanks += math.exp(base + log_big[b, t, u, i] + beta_at(betas, b, s, u, T_b, U_b))
            emit = (1.0 + fastemit_lambda) * math.exp(base + log_emit[b, t, u] + betas[b, t, u + 1]) \
                if u < U_b else 0.0
            row_gradient_terms(row, blank, label, u < U_b, True, shift, lb, log_emit[b, t, u], blanks, emit, terms)
            terms[4] = blanks + emit
            terms[5] = p_blank
            terms[6] = emit
        cuda.syncthreads()
        scale = grad_scale[b]
        write_row_gradient(row, g, blank, label, u < U_b, True, shift, clamp, scale, terms, scratch)
        # The blank-like entries, each rewritten by the thread that wrote it above (so no race).
        occupancy = terms[4]
        emit = terms[6]
        limit = clamp if clamp > 0 else inf
        for i in range(-1, K):
            v = blank - 1 - i
            if v % threads == tid:
                if i < 0:
                    lp = log_blank[b, t, u]
                    posterior = terms[5]
                else:
                    lp = log_big[b, t, u, i]
                    s = t + durations[i]
                    posterior = math.exp(base + lp + beta_at(betas, b, s, u, T_b, U_b)) if s <= T_b else 0.0
                value = math.exp(float_t(lp)) * occupancy - posterior
                if u < U_b and label == v:
                    value -= emit
                g[v] = store(float_t(min(max(value, -limit), limit) * scale))

    return _Kernels(log_normalizers, alphas_and_costs, betas, gradients)


# dtype -> the multi-blank kernels of that logits dtype as lazily compiling ``cuda.jit`` dispatchers (cached)
_kernels = _cuda.kernel_cache(_python_kernels, _numba_cuda)


def kernel_signatures(dtype: np.dtype, index_dtype: np.dtype) -> _Kernels:
    """Numba signature of each multi-blank kernel for C-contiguous arrays of the given dtypes."""
    from numba import types

    f, c, indices = _cuda.signature_types(dtype, index_dtype)
    f64 = types.float64
    array = _cuda.c_array
    grid, big, durations = array(f64, 3), array(f64, 4), array(types.int64, 1)
    return _Kernels(
        log_normalizers=(array(f, 4), *indices, types.int64, array(c, 3), grid, grid, big),
        alphas_and_costs=(grid, grid, big, *indices[1:], durations, f64, f64, grid, array(f64, 1), array(c, 1)),
        betas=(grid, grid, big, *indices[1:], durations, f64, grid),
        gradients=(array(f, 4), *indices, types.int64, durations, f64, f64, f64, array(f64, 1), array(c, 3), grid,
                   grid, big, grid, grid, array(f64, 1), array(f, 4)),
    )


def compile_ptx(dtype: np.dtype, index_dtype: np.dtype, cc: tuple[int, int]) -> dict[str, str]:
    """PTX of every multi-blank kernel for compute capability ``cc``, without a GPU."""
    _numba_cuda()
    signatures = kernel_signatures(dtype, index_dtype)
    return {name: cuda.compile_ptx(pyfunc, signature, cc=cc)[0]
            for name, pyfunc, signature in zip(_Kernels._fields, _python_kernels(dtype), signatures)}


def forward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
            big_blank_durations: Any, sigma: float, fastemit_lambda: float, costs: Any, residuals: Residuals,
            stream: Any = None) -> None:
    """Costs ``(B,)`` and the forward residuals (:func:`residual_shapes`) into caller-allocated device arrays;
    ``big_blank_durations: (K,)`` host ints (or an int64 device array). Asynchronous on ``stream``."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, costs = map(
        _device, (logits, targets, logit_lengths, target_lengths, costs))
    res = Residuals(*map(_device, residuals))
    durations = _durations(big_blank_durations)
    kernels = _kernels(logits.dtype)
    s = _stream(stream)
    B, T, U1, V = logits.shape
    kernels.log_normalizers[B * T * U1, _threads(V, _MAX_ROW_THREADS), s](
        logits, targets, logit_lengths, target_lengths, blank, res.log_norm, res.log_blank, res.log_emit,
        res.log_big_blanks)
    kernels.alphas_and_costs[B, _threads(U1, _MAX_LATTICE_THREADS), s](
        res.log_blank, res.log_emit, res.log_big_blanks, logit_lengths, target_lengths, durations, float(sigma),
        float(fastemit_lambda), res.alphas, res.log_likelihood, costs)


def backward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
             big_blank_durations: Any, sigma: float, fastemit_lambda: float, clamp: float, grad_scale: Any,
             residuals: Residuals, grads: Any, stream: Any = None, betas: Any = None) -> None:
    """Gradient w.r.t. ``logits`` into ``grads``, clamped per utterance then scaled by ``grad_scale``; memory
    and synchronisation as :func:`rnnt_xla.kernels.cuda.backward`."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, grads = map(
        _device, (logits, targets, logit_lengths, target_lengths, grads))
    res = Residuals(*map(_device, residuals))
    durations = _durations(big_blank_durations)
    kernels = _kernels(logits.dtype)
    s = _stream(stream)
    B, T, U1, V = logits.shape
    owns_memory = betas is None or isinstance(grad_scale, np.ndarray)
    if isinstance(grad_scale, np.ndarray):
        grad_scale = cuda.to_device(np.ascontiguousarray(grad_scale, dtype=np.float64), stream=s)
    else:
        grad_scale = _device(grad_scale)
    betas = cuda.device_array((B, T, U1), dtype=np.float64, stream=s) if betas is None else _device(betas)
    kernels.betas[B, _threads(U1, _MAX_LATTICE_THREADS), s](
        res.log_blank, res.log_emit, res.log_big_blanks, logit_lengths, target_lengths, durations, float(sigma),
        betas)
    kernels.gradients[B * T * U1, _threads(V, _MAX_ROW_THREADS), s](
        logits, targets, logit_lengths, target_lengths, blank, durations, float(sigma), float(fastemit_lambda),
        float(clamp), grad_scale, res.log_norm, res.log_blank, res.log_emit, res.log_big_blanks, res.alphas, betas,
        res.log_likelihood, grads)
    if owns_memory:
        _synchronize(s)
