"""rnnt_xla: the RNN-Transducer loss for PyTorch and JAX from one set of Numba kernels.

Framework adapters live in their own modules so that importing the package needs neither framework:
``rnnt_xla.torch`` (PyTorch); ``rnnt_xla.reference`` is the float64 explicit-loop reference and
``rnnt_xla.kernels`` the framework-agnostic Numba kernels. :func:`keep_freed_memory` (opt-in) makes glibc keep
freed memory for reuse, which spares every step's new buffers their page faults (JAX on the CPU most).
"""

from .buffers import keep_freed_memory

__all__ = ["keep_freed_memory"]
__version__ = "0.1.0"
