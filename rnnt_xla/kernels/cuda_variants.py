"""k2's variants of the RNNT lattice on NVIDIA GPUs: ``rnnt_type`` "modified" / "constrained" and the delay
penalty, as ``numba.cuda`` kernels (no framework imports).

The CUDA twin of the variant passes of :mod:`rnnt_xla.kernels.cpu` (``alphas_and_costs_variant``,
``betas_variant``, ``gradients_variant``; semantics there): the variants change only the label arc out of
``(t, u)``, never the log-probabilities, so pass 1 is :mod:`.cuda`'s ``log_normalizers`` and the residuals are
:class:`~rnnt_xla.kernels.cpu.Residuals`. The label arc's score is ``log_emit[t, u]``, plus
``log_blank[t, u + 1]`` for "constrained", plus ``delay_penalty * ((T_b - 1) / 2 - t)``; for "modified" and
"constrained" it leads to ``(t + 1, u + 1)`` (one symbol per frame) instead of ``(t, u + 1)``. These are
separate kernels so that the regular RNNT kernels stay as they are.

Kernels: :func:`alphas_and_costs` and :func:`betas`, one block per utterance, threads over ``u``: with one
symbol per frame a frame's cells depend only on the previous frame (one ``syncthreads`` per frame), otherwise
the anti-diagonal wavefront of :mod:`.cuda`; :func:`gradients`, one block per row, thread 0 computes the
variant's posteriors and every thread writes through :mod:`.cuda`'s shared row writer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import cuda as _cuda
from .cpu import Residuals, residual_shapes
from .cuda import _MAX_LATTICE_THREADS, _MAX_ROW_THREADS, _device, _stream, _synchronize, _threads

__all__ = ["Residuals", "residual_shapes", "RNNT_TYPES", "forward", "backward", "compile_ptx", "kernel_signatures"]

RNNT_TYPES = ("regular", "modified", "constrained")

# ``numba.cuda``, a module global for the CUDA simulator (see ``cuda.cuda``).
cuda: Any = None


def _numba_cuda() -> Any:
    global cuda
    cuda = _cuda._numba_cuda()
    return cuda


def _flags(rnnt_type: str) -> tuple[bool, bool]:
    """``(one_symbol_per_frame, context_blank)`` of ``rnnt_type``."""
    if rnnt_type not in RNNT_TYPES:
        raise ValueError(f"rnnt_type must be one of {RNNT_TYPES}, got {rnnt_type!r}")
    return rnnt_type != "regular", rnnt_type == "constrained"


class _Kernels(NamedTuple):
    """The three variant kernels of one logits dtype (pass 1 is ``cuda``'s)."""

    alphas_and_costs: Any
    betas: Any
    gradients: Any


def _python_kernels(dtype: np.dtype) -> _Kernels:
    """The variant kernels of one logits dtype as plain Python functions (see ``cuda._python_kernels``)."""
    _numba_cuda()
    fn = _cuda.device_functions(np.dtype(dtype))
    float_t, store, log_add = fn.float_t, fn.store, fn.log_add
    row_gradient_terms, write_row_gradient = fn.row_gradient_terms, fn.write_row_gradient
    neg_inf = -math.inf

    @cuda.jit(device=True, inline="always")
    def label_score(log_blank, log_emit, b, t, u, T_b, context_blank, delay_penalty):
        """Score of the label arc out of ``(t, u)`` (``cpu._label_score``)."""
        score = log_emit[b, t, u]
        if context_blank:
            score += log_blank[b, t, u + 1]
        if delay_penalty != 0.0:
            score += delay_penalty * ((T_b - 1) * 0.5 - t)
        return score

    @cuda.jit(device=True, inline="always")
    def beta_at(betas, b, t, u, T_b, U_b):
        """Backward variable of ``(t, u)`` for ``t <= T_b``: past the last frame only ``(T_b, U_b)`` (0)."""
        if t < T_b:
            return betas[b, t, u]
        return 0.0 if u == U_b else neg_inf

    def alphas_and_costs(log_blank, log_emit, logit_lengths, target_lengths, fastemit_lambda, one_symbol_per_frame,
                         context_blank, delay_penalty, alphas, log_likelihood, costs):
        """Pass 2, grid ``B`` blocks: forward variables, ``log P`` and the costs."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if one_symbol_per_frame:
            for t in range(T_b):
                for u in range(tid, U_b + 1, threads):
                    if t == 0:
                        a = 0.0 if u == 0 else neg_inf
                    elif u == 0:
                        a = alphas[b, t - 1, 0] + log_blank[b, t - 1, 0]
                    else:
                        a = log_add(alphas[b, t - 1, u] + log_blank[b, t - 1, u],
                                    alphas[b, t - 1, u - 1] + label_score(log_blank, log_emit, b, t - 1, u - 1, T_b,
                                                                          context_blank, delay_penalty))
                    alphas[b, t, u] = a
                cuda.syncthreads()  # the next frame reads this one
        else:
            for n in range(T_b + U_b):
                for u in range(tid, U_b + 1, threads):
                    t = n - u
                    if 0 <= t < T_b:
                        if u == 0:
                            a = 0.0 if t == 0 else alphas[b, t - 1, 0] + log_blank[b, t - 1, 0]
                        else:
                            a = alphas[b, t, u - 1] + label_score(log_blank, log_emit, b, t, u - 1, T_b, False,
                                                                  delay_penalty)
                            if t > 0:
                                a = log_add(alphas[b, t - 1, u] + log_blank[b, t - 1, u], a)
                        alphas[b, t, u] = a
                cuda.syncthreads()
        if tid == 0:
            ll = alphas[b, T_b - 1, U_b] + log_blank[b, T_b - 1, U_b]
            if one_symbol_per_frame and U_b > 0:  # the last label on the last frame also ends the lattice
                ll = log_add(ll, alphas[b, T_b - 1, U_b - 1] + label_score(log_blank, log_emit, b, T_b - 1, U_b - 1,
                                                                           T_b, context_blank, delay_penalty))
            log_likelihood[b] = ll
            costs[b] = -(1.0 + fastemit_lambda) * ll

    def betas(log_blank, log_emit, logit_lengths, target_lengths, one_symbol_per_frame, context_blank, delay_penalty,
              out):
        """Pass 3, grid ``B`` blocks: backward variables ``out: (B, T, U1)`` float64."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        if one_symbol_per_frame:
            for t in range(T_b - 1, -1, -1):
                for u in range(tid, U_b + 1, threads):
                    blank_arc = beta_at(out, b, t + 1, u, T_b, U_b) + log_blank[b, t, u]
                    if u == U_b:
                        out[b, t, u] = blank_arc
                    else:
                        out[b, t, u] = log_add(blank_arc, beta_at(out, b, t + 1, u + 1, T_b, U_b)
                                               + label_score(log_blank, log_emit, b, t, u, T_b, context_blank,
                                                             delay_penalty))
                cuda.syncthreads()
        else:
            for n in range(T_b + U_b - 1, -1, -1):
                for u in range(tid, U_b + 1, threads):
                    t = n - u
                    if 0 <= t < T_b:
                        if u == U_b:
                            out[b, t, u] = beta_at(out, b, t + 1, u, T_b, U_b) + log_blank[b, t, u]
                        else:
                            label = out[b, t, u + 1] + label_score(log_blank, log_emit, b, t, u, T_b, False,
                                                                   delay_penalty)
                            if t < T_b - 1:
                                label = log_add(out[b, t + 1, u] + log_blank[b, t, u], label)
                            out[b, t, u] = label
                cuda.syncthreads()

    def gradients(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda, clamp,
                  one_symbol_per_frame, context_blank, delay_penalty, grad_scale, log_norm, log_blank, log_emit,
                  alphas, betas, log_likelihood, grads):
        """Pass 4, grid ``B*T*U1`` blocks: as ``cuda.gradients`` with the variant's posteriors (with
        "constrained" the label arc out of ``(t, u - 1)`` also uses the blank of ``(t, u)``)."""
        B, T, U1, V = logits.shape
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        tid = cuda.threadIdx.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        g = grads[b, t, u]
        if t >= T_b or u > U_b:
            for v in range(tid, V, cuda.blockDim.x):
                g[v] = store(float_t(0))
            return
        terms = cuda.shared.array(4, np.float64)
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        row = logits[b, t, u]
        shift = log_norm[b, t, u]
        label = targets[b, u] if u < U_b else blank
        if tid == 0:
            ll = log_likelihood[b]
            emit_weight = 1.0 + fastemit_lambda
            step = 1 if one_symbol_per_frame else 0
            lb = log_blank[b, t, u]
            p_blank = math.exp(alphas[b, t, u] + lb + beta_at(betas, b, t + 1, u, T_b, U_b) - ll)
            emit = 0.0
            if u < U_b:
                score = label_score(log_blank, log_emit, b, t, u, T_b, context_blank, delay_penalty)
                emit = emit_weight * math.exp(alphas[b, t, u] + score + beta_at(betas, b, t + step, u + 1, T_b, U_b)
                                              - ll)
            if context_blank and u > 0:
                score = label_score(log_blank, log_emit, b, t, u - 1, T_b, True, delay_penalty)
                p_blank += emit_weight * math.exp(alphas[b, t, u - 1] + score + beta_at(betas, b, t + 1, u, T_b, U_b)
                                                  - ll)
            row_gradient_terms(row, blank, label, u < U_b, fused_log_softmax, shift, lb, log_emit[b, t, u], p_blank,
                               emit, terms)
        cuda.syncthreads()
        write_row_gradient(row, g, blank, label, u < U_b, fused_log_softmax, shift, clamp, grad_scale[b], terms,
                           scratch)

    return _Kernels(alphas_and_costs, betas, gradients)


# dtype -> the variant kernels of that logits dtype as lazily compiling ``cuda.jit`` dispatchers (cached)
_kernels = _cuda.kernel_cache(_python_kernels, _numba_cuda)


def kernel_signatures(dtype: np.dtype, index_dtype: np.dtype) -> _Kernels:
    """Numba signature of each variant kernel for C-contiguous arrays of the given logits and index dtypes."""
    from numba import types

    f, c, indices = _cuda.signature_types(dtype, index_dtype)
    f64, flag = types.float64, types.boolean
    array = _cuda.c_array
    grid = array(f64, 3)
    return _Kernels(
        alphas_and_costs=(grid, grid, *indices[1:], f64, flag, flag, f64, grid, array(f64, 1), array(c, 1)),
        betas=(grid, grid, *indices[1:], flag, flag, f64, grid),
        gradients=(array(f, 4), *indices, types.int64, flag, f64, f64, flag, flag, f64, array(f64, 1),
                   array(c, 3), grid, grid, grid, grid, array(f64, 1), array(f, 4)),
    )


def compile_ptx(dtype: np.dtype, index_dtype: np.dtype, cc: tuple[int, int]) -> dict[str, str]:
    """PTX of every variant kernel for compute capability ``cc``, without a GPU."""
    _numba_cuda()
    signatures = kernel_signatures(dtype, index_dtype)
    return {name: cuda.compile_ptx(pyfunc, signature, cc=cc)[0]
            for name, pyfunc, signature in zip(_Kernels._fields, _python_kernels(dtype), signatures)}


def forward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
            fused_log_softmax: bool, fastemit_lambda: float, costs: Any, residuals: Residuals,
            rnnt_type: str = "regular", delay_penalty: float = 0.0, stream: Any = None) -> None:
    """:func:`rnnt_xla.kernels.cuda.forward` on the variant's lattice (``rnnt_type``, ``delay_penalty``); same
    arrays and residuals. Asynchronous on ``stream``."""
    one_per_frame, context_blank = _flags(rnnt_type)
    _numba_cuda()
    logit_lengths, target_lengths, costs = map(_device, (logit_lengths, target_lengths, costs))
    res = Residuals(*map(_device, residuals))
    s = _stream(stream)
    _cuda.normalise(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, res, s)
    B, T, U1 = res.alphas.shape
    _kernels(_device(logits).dtype).alphas_and_costs[B, _threads(U1, _MAX_LATTICE_THREADS), s](
        res.log_blank, res.log_emit, logit_lengths, target_lengths, float(fastemit_lambda), one_per_frame,
        context_blank, float(delay_penalty), res.alphas, res.log_likelihood, costs)


def backward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int,
             fused_log_softmax: bool, fastemit_lambda: float, clamp: float, grad_scale: Any, residuals: Residuals,
             grads: Any, rnnt_type: str = "regular", delay_penalty: float = 0.0, stream: Any = None,
             betas: Any = None) -> None:
    """:func:`rnnt_xla.kernels.cuda.backward` on the variant's lattice; same arrays, memory and
    synchronisation rules."""
    one_per_frame, context_blank = _flags(rnnt_type)
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, grads = map(
        _device, (logits, targets, logit_lengths, target_lengths, grads))
    res = Residuals(*map(_device, residuals))
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
        res.log_blank, res.log_emit, logit_lengths, target_lengths, one_per_frame, context_blank,
        float(delay_penalty), betas)
    kernels.gradients[B * T * U1, _threads(V, _MAX_ROW_THREADS), s](
        logits, targets, logit_lengths, target_lengths, blank, bool(fused_log_softmax), float(fastemit_lambda),
        float(clamp), one_per_frame, context_blank, float(delay_penalty), grad_scale, res.log_norm, res.log_blank,
        res.log_emit, res.alphas, betas, res.log_likelihood, grads)
    if owns_memory:
        _synchronize(s)
