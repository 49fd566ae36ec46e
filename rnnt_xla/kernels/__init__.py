"""Framework-agnostic Numba kernels. They work on raw numpy arrays and never import torch or jax."""
