"""Numba ``njit`` kernels for the CPU: one module per cell, same names as ``fastcells.cuda``."""
