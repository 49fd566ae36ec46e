"""Token-and-Duration Transducer (TDT) loss on NVIDIA GPUs: ``numba.cuda`` kernels (no framework imports).

The CUDA twin of :mod:`rnnt_xla.kernels.cpu_tdt`: the same semantics, entry points (plus the caller's
``stream``) and :class:`~rnnt_xla.kernels.cpu_tdt.Residuals` layout. Arrays, streams and precision are as in
:mod:`rnnt_xla.kernels.cuda`, whose device helpers (row maximum and sum reductions, log-add, the gradient row
writer with its shift + log-sum rules) these kernels share; only the lattice differs.

Kernels (``W = V + D``: the ``V`` label scores, then the ``D`` duration scores):

1. :func:`normalizers`, one block per ``(b, t, u)`` row: the label part as ``cuda.log_normalizers`` (shift,
   blank and next-label log-probabilities) and, on thread 0, the duration log-softmax (``D`` is small);
2. :func:`alphas_and_costs`, one block per utterance: a wavefront over the anti-diagonals ``t + u = n`` (every
   arc of duration ``d`` comes from diagonal ``n - d`` or ``n - d - 1``, so a diagonal depends only on earlier
   ones), then thread 0 sums the final blanks into ``log P`` and the cost;
3. :func:`betas`: the same wavefront, backwards;
4. :func:`gradients`, one block per row: thread 0 sums the row's blank and label posteriors over the
   durations and prepares the label part (``cuda``'s ``row_gradient_terms``), every thread writes the label
   part (``write_row_gradient``, the RNNT writer) and the duration entries it owns.

With ``label_head_only`` (NeMo's omega case) passes 2 and 3 are :mod:`.cuda`'s RNNT lattice passes
(``lattice_forward``, ``lattice_backward``) on the label part's log-probabilities (the plain RNNT loss of
``logits[..., :V]``, no sigma) and the duration part's gradient is zero; the residuals have the same shapes
either way.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import cuda as _cuda
from .cpu_tdt import Residuals, residual_shapes
from .cuda import _MAX_LATTICE_THREADS, _MAX_ROW_THREADS, _device, _stream, _synchronize, _threads

__all__ = ["Residuals", "residual_shapes", "forward", "backward", "compile_ptx", "kernel_signatures"]


# ``numba.cuda``, bound on first use; a module global because the CUDA simulator swaps the globals that hold it
# for its fake module (see ``cuda.cuda``).
cuda: Any = None


def _numba_cuda() -> Any:
    """``numba.cuda`` (``cuda._numba_cuda``: ImportError with the fix when it is missing), bound here too."""
    global cuda
    cuda = _cuda._numba_cuda()
    return cuda


class _Kernels(NamedTuple):
    """The four TDT kernels of one logits dtype."""

    normalizers: Any
    alphas_and_costs: Any
    betas: Any
    gradients: Any


def _python_kernels(dtype: np.dtype) -> _Kernels:
    """The TDT kernels of one logits dtype (:func:`rnnt_xla.kernels.cuda.kernel_dtype`) as plain Python
    functions for ``cuda.jit`` or ``compile_ptx``; they use :mod:`.cuda`'s module global ``cuda`` and device
    helpers (inlined, see ``cuda._python_kernels``)."""
    _numba_cuda()
    fn = _cuda.device_functions(np.dtype(dtype))
    float_t, load, store, row_max, row_sum_of_exp = fn.float_t, fn.load, fn.store, fn.row_max, fn.row_sum_of_exp
    row_gradient_terms, write_row_gradient = fn.row_gradient_terms, fn.write_row_gradient
    neg_inf = -math.inf

    @cuda.jit(device=True, inline="always")
    def fold_max(m, x):
        """The larger of ``m`` and ``x``, NaN once either is (as ``cpu_tdt._fold_max``)."""
        return x if (x > m or x != x) else m

    @cuda.jit(device=True, inline="always")
    def next_beta(betas, b, t, u, d, T_b, U_b, label):
        """``beta`` of the state an arc of duration ``d`` from ``(t, u)`` reaches (the arc rules of ``cpu_tdt.betas``)."""
        n = t + d
        if label:
            return betas[b, n, u + 1] if (u < U_b and n < T_b) else neg_inf
        if d == 0 or n > T_b:
            return neg_inf
        if n < T_b:
            return betas[b, n, u]
        return 0.0 if u == U_b else neg_inf

    def normalizers(logits, targets, logit_lengths, target_lengths, blank, log_norm, log_blank, log_emit,
                    log_durations):
        """Pass 1, grid ``B*T*U1`` blocks: the label part's shift and blank/label log-probabilities (as
        ``cuda.log_normalizers`` with the fused log-softmax) and ``log_durations[b, t, u]`` (float64)."""
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        B, T, U1, W = logits.shape
        D = log_durations.shape[3]
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        U_b = target_lengths[b]
        if t >= logit_lengths[b] or u > U_b:  # the whole block leaves
            return
        full = logits[b, t, u]
        row = full[: W - D]
        shift = row_max(row, scratch)
        log_sum = 0.0
        if shift != neg_inf:  # every entry masked: the log-probabilities are NaN (the utterance's cost)
            log_sum = math.log(np.float64(row_sum_of_exp(row, shift, scratch)))
        if cuda.threadIdx.x == 0:
            log_norm[b, t, u] = shift
            log_blank[b, t, u] = (np.float64(load(row[blank])) - np.float64(shift)) - log_sum
            if u < U_b:
                log_emit[b, t, u] = (np.float64(load(row[targets[b, u]])) - np.float64(shift)) - log_sum
            else:
                log_emit[b, t, u] = neg_inf
            V = W - D
            m = np.float64(load(full[V]))
            for i in range(1, D):
                x = np.float64(load(full[V + i]))
                m = x if x > m else m
            s = 0.0
            for i in range(D):
                s += math.exp(np.float64(load(full[V + i])) - m)
            log_sum_durations = math.log(s)
            for i in range(D):
                log_durations[b, t, u, i] = (np.float64(load(full[V + i])) - m) - log_sum_durations

    def alphas_and_costs(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma,
                         fastemit_lambda, alphas, log_likelihood, costs):
        """Pass 2, grid ``B`` blocks: ``alphas[b, t, u] = logsumexp(incoming arcs) - sigma`` by anti-diagonals
        (formulas in :func:`rnnt_xla.kernels.cpu_tdt.alphas_and_costs`), ``log P`` and the cost."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        D = durations.shape[0]
        for n in range(T_b + U_b):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    if t == 0 and u == 0:
                        alphas[b, 0, 0] = 0.0
                        continue
                    m = neg_inf
                    for i in range(D):
                        d = durations[i]
                        s = t - d
                        if s < 0:
                            break
                        if d > 0:
                            m = fold_max(m, alphas[b, s, u] + log_blank[b, s, u] + log_durations[b, s, u, i])
                        if u > 0:
                            m = fold_max(m, alphas[b, s, u - 1] + log_emit[b, s, u - 1]
                                         + log_durations[b, s, u - 1, i])
                    if m == neg_inf:  # unreachable (e.g. odd t with durations [0, 2])
                        alphas[b, t, u] = neg_inf
                        continue
                    acc = 0.0
                    for i in range(D):
                        d = durations[i]
                        s = t - d
                        if s < 0:
                            break
                        if d > 0:
                            acc += math.exp(alphas[b, s, u] + log_blank[b, s, u] + log_durations[b, s, u, i] - m)
                        if u > 0:
                            acc += math.exp(alphas[b, s, u - 1] + log_emit[b, s, u - 1]
                                            + log_durations[b, s, u - 1, i] - m)
                    alphas[b, t, u] = m + math.log(acc) - sigma
            cuda.syncthreads()  # the next diagonals read this one
        if tid == 0:  # the final state (T_b, U_b): the blanks that end exactly at T_b
            m = neg_inf
            for i in range(D):
                s = T_b - durations[i]
                if durations[i] > 0 and s >= 0:
                    m = fold_max(m, alphas[b, s, U_b] + log_blank[b, s, U_b] + log_durations[b, s, U_b, i])
            ll = neg_inf
            if m != neg_inf:
                acc = 0.0
                for i in range(D):
                    s = T_b - durations[i]
                    if durations[i] > 0 and s >= 0:
                        acc += math.exp(alphas[b, s, U_b] + log_blank[b, s, U_b] + log_durations[b, s, U_b, i] - m)
                ll = m + math.log(acc) - sigma
            log_likelihood[b] = ll
            costs[b] = -(1.0 + fastemit_lambda) * ll

    def betas(log_blank, log_emit, log_durations, durations, logit_lengths, target_lengths, sigma, out):
        """Pass 3, grid ``B`` blocks: ``out[b, t, u] = logsumexp(outgoing arcs' weight + beta[next]) - sigma``
        by anti-diagonals, backwards."""
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        D = durations.shape[0]
        for n in range(T_b + U_b - 1, -1, -1):
            for u in range(tid, U_b + 1, threads):
                t = n - u
                if 0 <= t < T_b:
                    lb = log_blank[b, t, u]
                    le = log_emit[b, t, u]
                    m = neg_inf
                    for i in range(D):
                        d = durations[i]
                        if t + d > T_b:
                            break
                        w = log_durations[b, t, u, i]
                        m = fold_max(m, lb + w + next_beta(out, b, t, u, d, T_b, U_b, False))
                        m = fold_max(m, le + w + next_beta(out, b, t, u, d, T_b, U_b, True))
                    if m == neg_inf:
                        out[b, t, u] = neg_inf
                        continue
                    acc = 0.0
                    for i in range(D):
                        d = durations[i]
                        if t + d > T_b:
                            break
                        w = log_durations[b, t, u, i]
                        acc += math.exp(lb + w + next_beta(out, b, t, u, d, T_b, U_b, False) - m)
                        acc += math.exp(le + w + next_beta(out, b, t, u, d, T_b, U_b, True) - m)
                    out[b, t, u] = m + math.log(acc) - sigma
            cuda.syncthreads()

    def gradients(logits, targets, logit_lengths, target_lengths, blank, durations, sigma, fastemit_lambda, clamp,
                  label_head_only, grad_scale, log_norm, log_blank, log_emit, log_durations, alphas, betas,
                  log_likelihood, grads):
        """Pass 4, grid ``B*T*U1`` blocks: ``grads[b]``, the gradient of ``cost_b`` times ``grad_scale[b]``, the
        label part clipped first (formulas in :func:`rnnt_xla.kernels.cpu_tdt.gradients`)."""
        B, T, U1, W = logits.shape
        D = durations.shape[0]
        V = W - D
        row_id = cuda.blockIdx.x
        b = row_id // (T * U1)
        t = row_id // U1 - b * T
        u = row_id - (b * T + t) * U1
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        T_b = logit_lengths[b]
        U_b = target_lengths[b]
        ll = log_likelihood[b]
        g = grads[b, t, u]
        if t >= T_b or u > U_b or (ll == neg_inf and not label_head_only):  # padding, or no alignment
            for v in range(tid, W, threads):
                g[v] = store(float_t(0))
            return
        terms = cuda.shared.array(5, np.float64)  # row_gradient_terms' four, then the posterior occupancy
        scratch = cuda.shared.array(_MAX_ROW_THREADS, float_t)
        full = logits[b, t, u]
        row = full[:V]
        shift = log_norm[b, t, u]
        label = targets[b, u] if u < U_b else blank
        alpha = alphas[b, t, u]
        lb = log_blank[b, t, u]
        le = log_emit[b, t, u]
        base = alpha - sigma - ll
        if tid == 0:
            if label_head_only:  # the RNNT posteriors (as cuda.gradients)
                if t < T_b - 1:
                    p_blank = math.exp(alpha + lb + betas[b, t + 1, u] - ll)
                elif u == U_b:
                    p_blank = math.exp(alpha + lb - ll)
                else:
                    p_blank = 0.0
                p_label = math.exp(alpha + le + betas[b, t, u + 1] - ll) if u < U_b else 0.0
            else:
                p_blank = 0.0
                p_label = 0.0
                for i in range(D):
                    d = durations[i]
                    w = base + log_durations[b, t, u, i]
                    next_blank = next_beta(betas, b, t, u, d, T_b, U_b, False)
                    next_label = next_beta(betas, b, t, u, d, T_b, U_b, True)
                    if next_blank != neg_inf:  # only the arcs that exist
                        p_blank += math.exp(w + lb + next_blank)
                    if next_label != neg_inf:
                        p_label += math.exp(w + le + next_label)
            row_gradient_terms(row, blank, label, u < U_b, True, shift, lb, le, p_blank,
                               (1.0 + fastemit_lambda) * p_label, terms)
            terms[4] = p_blank + p_label
        cuda.syncthreads()
        scale = grad_scale[b]
        write_row_gradient(row, g[:V], blank, label, u < U_b, True, shift, clamp, scale, terms, scratch)
        occupancy = terms[4]
        for i in range(tid, D, threads):  # the duration part through its log-softmax, not clipped
            if label_head_only:
                g[V + i] = store(float_t(0))
            else:
                d = durations[i]
                w = base + log_durations[b, t, u, i]
                next_blank = next_beta(betas, b, t, u, d, T_b, U_b, False)
                next_label = next_beta(betas, b, t, u, d, T_b, U_b, True)
                posterior = 0.0
                if next_blank != neg_inf:
                    posterior += math.exp(w + lb + next_blank)
                if next_label != neg_inf:
                    posterior += math.exp(w + le + next_label)
                softmax = math.exp(log_durations[b, t, u, i])
                g[V + i] = store(float_t((softmax * occupancy - posterior) * scale))

    return _Kernels(normalizers, alphas_and_costs, betas, gradients)


# dtype -> the TDT kernels of that logits dtype as lazily compiling ``cuda.jit`` dispatchers (cached)
_kernels = _cuda.kernel_cache(_python_kernels, _numba_cuda)


def kernel_signatures(dtype: np.dtype, index_dtype: np.dtype) -> _Kernels:
    """Numba signature of each TDT kernel for C-contiguous arrays of the given logits and index dtypes."""
    from numba import types

    f, c, indices = _cuda.signature_types(dtype, index_dtype)
    f64 = types.float64
    array = _cuda.c_array
    lengths = indices[1:]
    durations = array(types.int64, 1)
    lattice = (array(f64, 3), array(f64, 3), array(f64, 4), durations)  # log_blank, log_emit, log_durations
    return _Kernels(
        normalizers=(array(f, 4), *indices, types.int64, array(c, 3), array(f64, 3), array(f64, 3), array(f64, 4)),
        alphas_and_costs=(*lattice, *lengths, f64, f64, array(f64, 3), array(f64, 1), array(c, 1)),
        betas=(*lattice, *lengths, f64, array(f64, 3)),
        gradients=(array(f, 4), *indices, types.int64, durations, f64, f64, f64, types.boolean, array(f64, 1),
                   array(c, 3), array(f64, 3), array(f64, 3), array(f64, 4), array(f64, 3), array(f64, 3),
                   array(f64, 1), array(f, 4)),
    )


def compile_ptx(dtype: np.dtype, index_dtype: np.dtype, cc: tuple[int, int]) -> dict[str, str]:
    """PTX of every TDT kernel for compute capability ``cc``, without a GPU."""
    _numba_cuda()
    signatures = kernel_signatures(dtype, index_dtype)
    return {name: cuda.compile_ptx(pyfunc, signature, cc=cc)[0]
            for name, pyfunc, signature in zip(_Kernels._fields, _python_kernels(dtype), signatures)}


# Device copies of the durations, per (GPU, durations): tiny, made once, and never freed under a running kernel.
_DURATIONS: dict[tuple[Any, tuple[int, ...]], Any] = {}


def _durations(durations: Any) -> Any:
    """``durations`` (host ints or a device array) as a device int64 array."""
    if hasattr(durations, "__cuda_array_interface__") or getattr(durations, "__cuda_ndarray__", False):
        return _device(durations)
    values = tuple(int(d) for d in np.asarray(durations).reshape(-1))
    key = (getattr(cuda.get_current_device(), "id", None), values)  # the simulator has no ids
    if key not in _DURATIONS:
        _DURATIONS[key] = cuda.to_device(np.array(values, dtype=np.int64))
    return _DURATIONS[key]


def _rnnt_residuals(res: Residuals) -> _cuda.Residuals:
    """The RNNT residuals among the TDT ones (same arrays), for ``cuda``'s lattice passes."""
    return _cuda.Residuals(res.log_norm, res.log_blank, res.log_emit, res.alphas, res.log_likelihood)


def forward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int, durations: Any,
            sigma: float, fastemit_lambda: float, label_head_only: bool, costs: Any, residuals: Residuals,
            stream: Any = None) -> None:
    """Costs ``(B,)`` into ``costs`` and the forward residuals (:func:`residual_shapes`) into ``residuals``,
    caller-allocated device arrays; ``logits: (B, T, U1, V + D)`` as :func:`rnnt_xla.kernels.cuda.forward`
    takes them, ``durations: (D,)`` host ints (or an int64 device array). Asynchronous on ``stream``."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, costs = map(
        _device, (logits, targets, logit_lengths, target_lengths, costs))
    res = Residuals(*map(_device, residuals))
    durations = _durations(durations)
    kernels = _kernels(logits.dtype)
    s = _stream(stream)
    B, T, U1, W = logits.shape
    kernels.normalizers[B * T * U1, _threads(W - durations.shape[0], _MAX_ROW_THREADS), s](
        logits, targets, logit_lengths, target_lengths, blank, res.log_norm, res.log_blank, res.log_emit,
        res.log_durations)
    if label_head_only:  # the RNNT lattice of the label part
        _cuda.lattice_forward(logit_lengths, target_lengths, fastemit_lambda, _rnnt_residuals(res), costs, s)
        return
    kernels.alphas_and_costs[B, _threads(U1, _MAX_LATTICE_THREADS), s](
        res.log_blank, res.log_emit, res.log_durations, durations, logit_lengths, target_lengths, float(sigma),
        float(fastemit_lambda), res.alphas, res.log_likelihood, costs)


def backward(logits: Any, targets: Any, logit_lengths: Any, target_lengths: Any, blank: int, durations: Any,
             sigma: float, fastemit_lambda: float, clamp: float, label_head_only: bool, grad_scale: Any,
             residuals: Residuals, grads: Any, stream: Any = None, betas: Any = None) -> None:
    """Gradient w.r.t. ``logits`` into ``grads`` (same shape and dtype, device), each utterance's label part
    clamped, then all of it multiplied by ``grad_scale: (B,) float64`` (device, or host: copied over).

    ``betas``: optional ``(B, T, U1)`` float64 device workspace; memory and synchronisation as
    :func:`rnnt_xla.kernels.cuda.backward` (without ``betas``, or with a host ``grad_scale``, this function
    allocates through Numba and synchronises ``stream`` before returning)."""
    _numba_cuda()
    logits, targets, logit_lengths, target_lengths, grads = map(
        _device, (logits, targets, logit_lengths, target_lengths, grads))
    res = Residuals(*map(_device, residuals))
    durations = _durations(durations)
    kernels = _kernels(logits.dtype)
    s = _stream(stream)
    B, T, U1, W = logits.shape
    owns_memory = betas is None or isinstance(grad_scale, np.ndarray)
    if isinstance(grad_scale, np.ndarray):
        grad_scale = cuda.to_device(np.ascontiguousarray(grad_scale, dtype=np.float64), stream=s)
    else:
        grad_scale = _device(grad_scale)
    betas = cuda.device_array((B, T, U1), dtype=np.float64, stream=s) if betas is None else _device(betas)
    if label_head_only:
        _cuda.lattice_backward(logit_lengths, target_lengths, _rnnt_residuals(res), betas, s)
    else:
        kernels.betas[B, _threads(U1, _MAX_LATTICE_THREADS), s](res.log_blank, res.log_emit, res.log_durations, durations,
                                             logit_lengths, target_lengths, float(sigma), betas)
    kernels.gradients[B * T * U1, _threads(W - durations.shape[0], _MAX_ROW_THREADS), s](
        logits, targets, logit_lengths, target_lengths, blank, durations, float(sigma), float(fastemit_lambda),
        float(clamp), bool(label_head_only), grad_scale, res.log_norm, res.log_blank, res.log_emit,
        res.log_durations, res.alphas, betas, res.log_likelihood, grads)
    if owns_memory:
        _synchronize(s)
