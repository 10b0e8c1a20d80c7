"""The time-parallel parts of a call on the CPU: layouts, the input projection and the
weight-gradient GEMMs around a recurrence.

``fastcells.cuda._linalg`` has the same functions for device arrays; ``fastcells.ops``
composes them without knowing which engine it holds. Time-major arrays ([T, B, ...]) that
never reach the caller come from the workspace and go back to it.
"""
import numpy as np

from .._workspace import workspace
from ._parallel import gemm

empty = workspace.empty
give_back = workspace.give_back


# Results handed to the caller start on a 64-byte boundary: TensorFlow's numpy_function
# adopts such an array as its output tensor, and copies one that is less aligned (NumPy
# aligns to 16 bytes); in an LSTM training step at B=128 T=500 D=32 H=32 the copy of the
# 8 MB input gradient would be 2% of the step.
RESULT_ALIGN = 64


def empty_result(shape, dtype):
    """An uninitialised C-contiguous array of ``shape`` for a result handed to the caller,
    starting on a ``RESULT_ALIGN``-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + RESULT_ALIGN, np.uint8)
    start = -raw.ctypes.data % RESULT_ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def copy_result(a):
    """A C-contiguous copy of ``a`` made by :func:`empty_result`."""
    out = empty_result(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def zeros(shape, dtype):
    """A zeroed array (made by :func:`empty_result`: it may be handed to the caller)."""
    out = empty_result(shape, dtype)
    out.fill(0)
    return out


def zeros_group(shapes, dtype):
    """Zeroed arrays of ``shapes`` (None gives None): one buffer and one fill on the GPU
    engine, separate arrays here."""
    return [None if s is None else zeros(s, dtype) for s in shapes]


def time_major(a, shared=False):
    """[B, T, ...] -> C-contiguous [T, B, ...], in workspace memory (internal use only;
    always a copy, which the caller gives back: ``shared`` is for the GPU engine)."""
    out = workspace.empty((a.shape[1], a.shape[0]) + a.shape[2:], a.dtype)
    np.copyto(out, np.swapaxes(a, 0, 1))
    return out


def batch_major(a):
    """[T, B, ...] -> a fresh C-contiguous [B, T, ...] (handed to the caller)."""
    return copy_result(np.swapaxes(a, 0, 1))


def finish_outputs(y, return_sequences):
    """Kernel outputs [T or 1, B, H] (time-major, workspace) -> fresh [B, T, H] or [B, H]."""
    out = batch_major(y) if return_sequences else copy_result(y[0])
    workspace.give_back(y)
    return out


def apply_shared_mask(xt, dmask):
    """xt [T, B, D] *= dmask [B, D], in place."""
    xt *= dmask[None]


def project(xt, W, b_in, dmask, G):
    """xw = (x * dropout) @ W + b_in, time-major [T, B, G*H], C-contiguous.

    ``xt`` is the time-major input [T, B, D], a shared [B, D] dropout mask already applied;
    per-gate masks [G, B, D] are applied here."""
    T, B, D = xt.shape
    GH = W.shape[1]
    H = GH // G
    xw = workspace.empty((T, B, GH), xt.dtype)
    if dmask is None or dmask.ndim == 2:
        gemm(xt.reshape(T * B, D), W, out=xw.reshape(T * B, GH))
    else:
        for k in range(G):
            xk = (xt * dmask[k][None]).reshape(T * B, D)
            xw[:, :, k * H:(k + 1) * H] = gemm(xk, W[:, k * H:(k + 1) * H]).reshape(T, B, H)
    if b_in is not None:
        xw += b_in
    return xw


def input_grads(xt, W, dmask, dz, dW=None):
    """dxt [T, B, D] (time-major, workspace) and dW from the time-major dz [T, B, G*H]
    (gradient of the input-side pre-activations). With ``dW`` given, the weight gradient is
    added to it (chunked backward) and returned."""
    T, B, D = xt.shape
    GH = W.shape[1]
    G = 1 if dmask is None or dmask.ndim == 2 else dmask.shape[0]
    dz2 = dz.reshape(T * B, GH)
    dxt = workspace.empty((T, B, D), xt.dtype)
    if G == 1:                                   # xt already carries a shared mask
        dWc = gemm(xt.reshape(T * B, D).T, dz2, out=empty_result(W.shape, W.dtype))
        gemm(dz2, W.T, out=dxt.reshape(T * B, D))
        if dmask is not None:
            dxt *= dmask[None]
    else:
        H = GH // G
        dWc = empty_result(W.shape, W.dtype)
        dxt[:] = 0.0
        for k in range(G):
            sl = slice(k * H, (k + 1) * H)
            xk = (xt * dmask[k][None]).reshape(T * B, D)
            dWc[:, sl] = gemm(xk.T, dz2[:, sl])
            dxt += gemm(dz2[:, sl], W[:, sl].T).reshape(T, B, D) * dmask[k][None]
    if dW is None:
        return dxt, dWc
    dW += dWc
    return dxt, dW


def recurrent_grad(src, dz, rmask, gates, out=None):
    """dU[:, k] = (src * r_k)^T dz_k, with src [T, B, H] the recurrent input of each step
    and dz [T, B, gates*H] (time-major, may be a column slice); rmask [gates, B, H] (or
    [B, H] for one gate) or None. With ``out`` ([H, gates*H], may be a view) the result is
    added to it."""
    T, B, H = src.shape
    if rmask is not None and rmask.ndim == 2:
        rmask = rmask[None]
    n = dz.shape[2] // gates
    if rmask is None:
        d = gemm(src.reshape(T * B, H).T, dz.reshape(T * B, -1))
    else:
        d = np.empty((H, gates * n), src.dtype)
        for k in range(gates):
            sk = (src * rmask[k][None]).reshape(T * B, H)
            d[:, k * n:(k + 1) * n] = gemm(sk.T, dz[:, :, k * n:(k + 1) * n].reshape(T * B, n))
    if out is None:
        return d
    out += d
    return out


def column_sums(a, out=None):
    """Sum over every axis but the last, as one GEMV (4x faster than ``a.sum``); added to
    ``out`` when given."""
    a2 = a.reshape(-1, a.shape[-1])
    s = gemm(np.ones((1, a2.shape[0]), a.dtype), a2)[0]
    if out is None:
        return s
    out += s
    return out


def copy(a):
    """A fresh copy of ``a``."""
    return a.copy()
