"""Pieces shared by the LSTM, GRU and SimpleRNN kernels and their drivers."""
import numpy as np
from numba import njit

from .. import config


@njit(inline="always", **config.NJIT_OPTIONS)
def add_output_grad(carry, dy, s, T, b0, b1):
    """carry += the gradient of the output of processing step s (dy [T, B, H] holds every
    step; dy [1, B, H] only the last one)."""
    if dy.shape[0] == T:
        carry += dy[s, b0:b1]
    elif s == T - 1:
        carry += dy[0, b0:b1]


def optional(array, ndim, dtype):
    """Kernels take arrays, not None: ``(array or an empty stand-in, present?)``."""
    if array is None:
        return np.empty((0,) * ndim, dtype), False
    return array, True
