"""Numba ``njit`` kernels for the CPU: one module per cell, same names as ``fastcells.cuda``.

What the framework bridges use from here: results start on a ``RESULT_ALIGN``-byte boundary
(TensorFlow adopts such a buffer without a copy), and ``copy_result`` makes such a copy of
an array that does not.
"""
from ._linalg import RESULT_ALIGN, copy_result

__all__ = ["RESULT_ALIGN", "copy_result"]
