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


def initial_output(out0, B, H, dtype):
    """The output before the first step, [B, H]: ``out0`` or zeros."""
    return np.zeros((B, H), dtype) if out0 is None else out0


def pending_carry(carry, B, H, dtype):
    """The in/out pending output gradient of a backward, [B, H]: ``carry`` or zeros."""
    return np.zeros((B, H), dtype) if carry is None else carry
