"""The time-parallel parts of a call on the GPU: layouts, the input projection and the
weight-gradient GEMMs around a recurrence, with the functions of ``fastcells.cpu._linalg``
for numba device arrays (``fastcells.ops`` composes them without knowing the engine).

Kernels (all deterministic: every output element is summed by one thread, in a fixed order;
no atomics):

- ``gemm``: a tiled shared-memory GEMM. A block computes a ``CUDA_GEMM_BLOCK_M x
  CUDA_GEMM_BLOCK_N`` tile of C, stepping through K ``CUDA_GEMM_BLOCK_K`` at a time; each
  thread keeps ``CUDA_GEMM_THREAD_M x CUDA_GEMM_THREAD_N`` sums in registers. Operands may
  be strided (column slices of a weight or of a time-major tensor), transposed (a flag
  instead of a view) and 3-D: a time-major [T, B, X] array is read as the [T*B, X] matrix
  it is, without a reshape (a column slice of it cannot be reshaped).
- ``column_sums``: two passes, partial sums of ``CUDA_REDUCE_ROWS`` rows per thread, then
  the partial sums in order.
- element-wise kernels: copies and casts, the [B, T, X] <-> [T, B, X] swap, fills and the
  dropout-mask multiplies, one thread per element (``CUDA_ELEMENTWISE_THREADS`` per block).

Arrays handed between these functions are numba device arrays. ``to_device`` wraps what
already lives on the GPU without a copy (``__cuda_array_interface__``, DLPack) and copies
host arrays. ``give_back`` is a no-op: device memory goes back to numba's allocator (plug in
an external memory manager such as RMM to pool it).
"""
import functools

import numpy as np
from numba import cuda

from .. import config
from ._common import IDX, SIMULATOR, empty_stand_in, inline_device, kernel_variant, numba_type


# --------------------------------------------------------------------------- memory
def is_device(a):
    """True for a device array: a numba device array (or the simulator's stand-in) or any
    object with ``__cuda_array_interface__``."""
    return a is not None and (bool(getattr(a, "__cuda_ndarray__", False))
                              or hasattr(a, "__cuda_array_interface__"))


def empty(shape, dtype):
    """An uninitialised C-contiguous device array."""
    return cuda.device_array(tuple(int(n) for n in shape), np.dtype(dtype))


def zeros(shape, dtype):
    a = empty(shape, dtype)
    fill(a, 0)
    return a


_GROUP_ALIGN = 256      # bytes: what a fresh allocation gives (TensorFlow's DLPack needs 64)


def zeros_group(shapes, dtype):
    """Zeroed C-contiguous device arrays of ``shapes`` (None gives None) carved out of one
    buffer, so one fill launch serves them all; each starts on a 256-byte boundary."""
    if all(s is None for s in shapes):
        return [None] * len(shapes)
    dt = np.dtype(dtype)
    step = _GROUP_ALIGN // dt.itemsize
    sizes = [None if s is None else int(np.prod(s)) for s in shapes]
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += 0 if n is None else -(-n // step) * step
    flat = zeros((total,), dt)
    return [None if n is None else flat[k:k + n].reshape(tuple(int(d) for d in s))
            for s, n, k in zip(shapes, sizes, starts)]


def give_back(*arrays):
    """Kept for symmetry with the CPU workspace: device memory is freed by numba."""


class _DLPackView:
    """Holds a DLPack producer alive and shows its device buffer through the CUDA array
    interface, so that numba can view it without a copy."""

    def __init__(self, owner, view):
        self._owner = owner
        self._view = view
        itemsize = np.dtype(view.dtype).itemsize
        strides = view.strides
        self.__cuda_array_interface__ = {
            "shape": tuple(view.shape),
            "strides": None if strides is None else tuple(s * itemsize for s in strides),
            "typestr": np.dtype(view.dtype).str,
            "data": (int(view.ptr), bool(getattr(view, "readonly", False))),
            "version": 3,
        }


class _DefaultStreamDLPack:
    """A DLPack producer asked for its buffer with no stream argument, whatever stream the
    consumer names. By the DLPack protocol ``stream=None`` means the legacy default stream,
    the one numba launches on, so the producer makes the buffer ready for it; TensorFlow's
    ``__dlpack__`` refuses every stream argument (it leaves synchronisation to the caller,
    see ``fastcells.bridge.tensorflow``)."""

    def __init__(self, producer):
        self._producer = producer

    def __dlpack__(self, **_):
        return self._producer.__dlpack__()

    def __dlpack_device__(self):
        return self._producer.__dlpack_device__()


def _from_dlpack(a):
    """A device array for a DLPack producer: a view of device memory, a copy of host
    memory."""
    kind = a.__dlpack_device__()[0] if hasattr(a, "__dlpack_device__") else None
    a = _DefaultStreamDLPack(a)
    if int(kind) in (2, 13) and not SIMULATOR:       # kDLCUDA, kDLCUDAManaged
        from cuda.core.utils import StridedMemoryView
        view = StridedMemoryView.from_dlpack(a, stream_ptr=-1)
        return cuda.as_cuda_array(_DLPackView(a, view))
    return cuda.to_device(np.ascontiguousarray(np.from_dlpack(a)))


def to_device(a, dtype=None):
    """``a`` as a numba device array.

    Device arrays (numba's, or any object with ``__cuda_array_interface__`` such as torch and
    CuPy tensors) are wrapped without a copy; a DLPack-only object is viewed through DLPack
    when it lives on the GPU; host arrays are copied. With ``dtype``, the result is
    C-contiguous of that dtype (converted on the device where needed).
    """
    if getattr(a, "__cuda_ndarray__", False):
        d = a
    elif hasattr(a, "__cuda_array_interface__"):
        d = cuda.as_cuda_array(a)
    elif hasattr(a, "__dlpack__") and not isinstance(a, np.ndarray):
        d = _from_dlpack(a)
    else:
        h = np.asarray(a)
        return cuda.to_device(np.ascontiguousarray(h, dtype if dtype is not None else h.dtype))
    if dtype is not None and (np.dtype(d.dtype) != np.dtype(dtype) or not _c_contiguous(d)):
        d = copy(d, dtype)
    return d


def to_host(a):
    """A NumPy copy of a device array (``a`` itself if it is already on the host)."""
    if not is_device(a):
        return np.asarray(a)
    d = to_device(a)
    if not _c_contiguous(d):
        d = copy(d)
    return d.copy_to_host()


def _c_contiguous(a):
    return bool(a.is_c_contiguous()) if hasattr(a, "is_c_contiguous") else \
        bool(a.flags["C_CONTIGUOUS"])


def _blocks(n):
    t = config.CUDA_ELEMENTWISE_THREADS
    return -(-n // t), t


# --------------------------------------------------------------------------- element-wise
@cuda.jit
def _fill_kernel(a, value):
    # a: [n] contiguous
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = value


def fill(a, value):
    """a[...] = value, for a C-contiguous device array."""
    n = int(np.prod(a.shape))
    if n:
        flat = a.reshape(n)
        _fill_kernel[_blocks(n)](flat, flat.dtype.type(value))


@cuda.jit
def _copy1(src, dst):
    # src, dst: [n] (any strides; dst's dtype)
    i = cuda.grid(1)
    if i < dst.shape[0]:
        dst[i] = src[i]


@cuda.jit
def _copy2(src, dst):
    # src, dst: [n0, n1]
    i = cuda.grid(1)
    n1 = dst.shape[1]
    if i < dst.shape[0] * n1:
        dst[i // n1, i % n1] = src[i // n1, i % n1]


@inline_device
def _flat3(i, n1, n2):
    """(t, b, c) of the flat index i = (t * n1 + b) * n2 + c of an [n0, n1, n2] array."""
    r = i // n2
    return r // n1, r % n1, i % n2


@cuda.jit
def _copy3(src, dst, swap):
    # src: [n0, n1, n2], or [n1, n0, n2] when ``swap``;  dst: [n0, n1, n2]
    i = cuda.grid(1)
    n1 = dst.shape[1]
    n2 = dst.shape[2]
    if i < dst.shape[0] * n1 * n2:
        t, b, c = _flat3(i, n1, n2)
        if swap:
            dst[t, b, c] = src[b, t, c]
        else:
            dst[t, b, c] = src[t, b, c]


def copy(a, dtype=None):
    """A fresh C-contiguous copy of a device array (1-D to 3-D, any strides), converted to
    ``dtype`` when given."""
    out = empty(a.shape, a.dtype if dtype is None else dtype)
    n = int(np.prod(a.shape))
    if n == 0:
        return out
    if a.ndim == 1:
        _copy1[_blocks(n)](a, out)
    elif a.ndim == 2:
        _copy2[_blocks(n)](a, out)
    elif a.ndim == 3:
        _copy3[_blocks(n)](a, out, False)
    else:
        raise ValueError(f"fastcells.cuda: copy of a {a.ndim}-D array is not supported")
    return out


def _swap01(a):
    """[n0, n1, X] -> a fresh C-contiguous [n1, n0, X]."""
    out = empty((a.shape[1], a.shape[0]) + tuple(a.shape[2:]), a.dtype)
    n = int(np.prod(out.shape))
    if n:
        _copy3[_blocks(n)](a, out, True)
    return out


def _swapped_view(a):
    """``a`` [n0, n1, X] seen as [n1, n0, X] without a copy, or None. With n0 or n1 equal
    to 1 the two layouts are the same memory (streaming calls: B = 1), so the swap needs no
    kernel launch."""
    if (a.shape[0] == 1 or a.shape[1] == 1) and a.is_c_contiguous():
        return a.reshape((a.shape[1], a.shape[0]) + tuple(a.shape[2:]))
    return None


def time_major(a, shared=False):
    """[B, T, X] -> C-contiguous [T, B, X]: a fresh copy, or with ``shared`` (the caller
    only reads the result, and only during the call) a view of ``a`` where the layouts are
    the same memory (B or T is 1)."""
    view = _swapped_view(a) if shared else None
    return _swap01(a) if view is None else view


def batch_major(a):
    """[T, B, X] -> C-contiguous [B, T, X] (handed to the caller; ``a`` is the call's own
    fresh array, so where the layouts are the same memory it is a view of ``a``)."""
    view = _swapped_view(a)
    return _swap01(a) if view is None else view


def finish_outputs(y, return_sequences):
    """Kernel outputs [T or 1, B, H] (time-major, the call's own) -> [B, T, H] or [B, H]
    without a copy where the layouts allow."""
    return batch_major(y) if return_sequences else y[0]


@cuda.jit
def _scale_rows(src, mask, dst, accumulate):
    # src, dst: [T, B, X];  mask: [B, X];  dst = (dst +) src * mask[b]
    i = cuda.grid(1)
    B = dst.shape[1]
    X = dst.shape[2]
    if i < dst.shape[0] * B * X:
        t, b, c = _flat3(i, B, X)
        v = src[t, b, c] * mask[b, c]
        if accumulate:
            dst[t, b, c] = dst[t, b, c] + v
        else:
            dst[t, b, c] = v


def scale_rows(src, mask, out=None, accumulate=False):
    """out[t, b] = (out[t, b] +) src[t, b] * mask[b] for time-major src [T, B, X] and a
    dropout mask [B, X]; in place when ``out`` is ``src``. Returns ``out``."""
    if out is None:
        out = empty(src.shape, src.dtype)
    n = int(np.prod(src.shape))
    if n:
        _scale_rows[_blocks(n)](src, mask, out, accumulate)
    return out


def apply_shared_mask(xt, dmask):
    """xt [T, B, D] *= dmask [B, D], in place."""
    scale_rows(xt, dmask, xt)


# --------------------------------------------------------------------------- GEMM
# A 3-D operand [T, B, X] is the matrix [T*B, X]: row r is (r // B, r % B).
@cuda.jit(device=True)
def _get2(a, r, c):
    return a[r, c]


@cuda.jit(device=True)
def _get3(a, r, c):
    return a[r // a.shape[1], r % a.shape[1], c]


@cuda.jit(device=True)
def _split2(a, r):
    return r, 0


@cuda.jit(device=True)
def _split3(a, r):
    return r // a.shape[1], r % a.shape[1]


@cuda.jit(device=True)
def _load2(a, rt, rb, c):
    return a[rt, c]


@cuda.jit(device=True)
def _load3(a, rt, rb, c):
    return a[rt, rb, c]


@cuda.jit(device=True)
def _store2(a, rt, rb, c, v):
    a[rt, c] = v


@cuda.jit(device=True)
def _store3(a, rt, rb, c, v):
    a[rt, rb, c] = v


@functools.lru_cache(maxsize=None)
def _tile_stager(get):
    """A device function that stages a [BK, BX] tile of a GEMM operand in shared memory
    (block-cooperative), with ``get`` (``_get2``, ``_get3``) reading the operand:
    S[kk * P + xx] = X[k0 + kk, x0 + xx], zero outside the [K, NX] matrix X. X is the
    operand as stored, [K, NX] (read ``get(x, k, x)``) when ``k_major``, [NX, K]
    (``get(x, x, k)``) otherwise; consecutive threads walk its contiguous axis."""
    @inline_device
    def stage(S, P, x, k_major, x0, NX, BX, k0, K, BK, tid, NT, zero):
        for e in range(tid, BK * BX, NT):
            if k_major:
                kk = e // BX
                xx = e % BX
            else:
                kk = e % BK
                xx = e // BK
            c = x0 + xx
            k = k0 + kk
            v = zero
            if c < NX and k < K:
                v = get(x, k, c) if k_major else get(x, c, k)
            S[IDX(kk * P + xx)] = v
    return stage


@kernel_variant
def _gemm_kernel(dtype, nda, ndb, ndc, BM, BN, BK, TM, TN):
    DT = numba_type(dtype)
    zero = np.dtype(dtype).type(0)
    NX = BN // TN               # threads along N
    NY = BM // TM               # threads along M
    NT = NX * NY
    AP = BM + 1                 # padded rows of the shared tiles (no bank conflicts on store)
    BP = BN + 1
    ASZ = BK * AP
    BSZ = BK * BP
    TMN = TM * TN
    stage_a = _tile_stager(_get3 if nda == 3 else _get2)
    stage_b = _tile_stager(_get3 if ndb == 3 else _get2)
    split_c = _split3 if ndc == 3 else _split2
    load_c = _load3 if ndc == 3 else _load2
    store_c = _store3 if ndc == 3 else _store2

    @cuda.jit
    def gemm(a, ta, b, tb, c, bias, use_bias, accumulate, M, N, K):
        # a: [M, K], or [K, M] when ``ta``;  b: [K, N], or [N, K] when ``tb``
        # c: [M, N] out (c + a @ b when ``accumulate``);  bias: [N], added when ``use_bias``
        As = cuda.shared.array(ASZ, DT)        # [BK, BM] tile of A (transposed), padded
        Bs = cuda.shared.array(BSZ, DT)        # [BK, BN] tile of B, padded
        acc = cuda.local.array(TMN, DT)        # [TM, TN] outputs of this thread
        ar = cuda.local.array(TM, DT)
        br = cuda.local.array(TN, DT)
        tid = cuda.threadIdx.x
        tx = tid % NX
        ty = tid // NX
        m0 = cuda.blockIdx.x * BM
        n0 = cuda.blockIdx.y * BN
        for q in range(TMN):
            acc[q] = zero
        for k0 in range(0, K, BK):
            stage_a(As, AP, a, ta, m0, M, BM, k0, K, BK, tid, NT, zero)
            stage_b(Bs, BP, b, not tb, n0, N, BN, k0, K, BK, tid, NT, zero)
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(TM):
                    ar[i] = As[IDX(kk * AP + ty + i * NY)]
                for j in range(TN):
                    br[j] = Bs[IDX(kk * BP + tx + j * NX)]
                for i in range(TM):
                    for j in range(TN):
                        acc[i * TN + j] += ar[i] * br[j]
            cuda.syncthreads()
        for i in range(TM):
            m = m0 + ty + i * NY
            if m < M:
                rt, rb = split_c(c, m)
                for j in range(TN):
                    n = n0 + tx + j * NX
                    if n < N:
                        v = acc[i * TN + j]
                        if use_bias:
                            v = v + bias[n]
                        if accumulate:
                            v = load_c(c, rt, rb, n) + v
                        store_c(c, rt, rb, n, v)

    return gemm, NT


def _rows(a):
    return a.shape[0] * a.shape[1] if a.ndim == 3 else a.shape[0]


def _cols(a):
    return a.shape[a.ndim - 1]          # the simulator's shapes take no negative index


def gemm(a, b, out=None, trans_a=False, trans_b=False, bias=None, accumulate=False):
    """``out = a @ b`` (``out += a @ b`` with ``accumulate``; ``+ bias`` per column).

    ``a`` is [M, K] ([K, M] with ``trans_a``), ``b`` [K, N] ([N, K] with ``trans_b``);
    each may be a 2-D array or a time-major [T, B, X] array read as [T*B, X], with any
    strides. ``out`` ([M, N], 2-D or 3-D, any strides) is allocated [M, N] when None."""
    M, Ka = (_cols(a), _rows(a)) if trans_a else (_rows(a), _cols(a))
    Kb, N = (_cols(b), _rows(b)) if trans_b else (_rows(b), _cols(b))
    if Ka != Kb:
        raise ValueError(f"gemm: inner dimensions differ ({Ka} and {Kb})")
    dt = np.result_type(a.dtype, b.dtype)
    if out is None:
        out = empty((M, N), dt)
    if _rows(out) != M or _cols(out) != N:
        raise ValueError(f"gemm: out has shape {tuple(out.shape)}, want {(M, N)}")
    if M == 0 or N == 0:
        return out
    BM, BN, BK = config.CUDA_GEMM_BLOCK_M, config.CUDA_GEMM_BLOCK_N, config.CUDA_GEMM_BLOCK_K
    TM, TN = config.CUDA_GEMM_THREAD_M, config.CUDA_GEMM_THREAD_N
    if BM % TM or BN % TN:
        raise ValueError("config.CUDA_GEMM_BLOCK_M/N must be multiples of CUDA_GEMM_THREAD_M/N")
    kern, threads = _gemm_kernel(np.dtype(dt).str, a.ndim, b.ndim, out.ndim, BM, BN, BK, TM,
                                 TN)
    use_bias = bias is not None
    bias_arr = bias if use_bias else empty_stand_in(1, dt)
    grid = (-(-M // BM), -(-N // BN))
    kern[grid, threads](a, bool(trans_a), b, bool(trans_b), out, bias_arr, use_bias,
                        bool(accumulate), M, N, Ka)
    return out


# --------------------------------------------------------------------------- reductions
@kernel_variant
def _colsum_kernels(dtype, nda):
    zero = np.dtype(dtype).type(0)
    get = _get3 if nda == 3 else _get2

    @cuda.jit
    def partial(a, part, M, N, rows):
        # a: [M, N] (2-D, or [T, B, N] read as [T*B, N]);  part: [P, N] out, P*rows >= M
        i = cuda.grid(1)
        if i < part.shape[0] * N:
            n = i % N
            p = i // N
            s = zero
            r1 = min(M, (p + 1) * rows)
            for r in range(p * rows, r1):
                s += get(a, r, n)
            part[p, n] = s

    @cuda.jit
    def final(part, out, accumulate):
        # part: [P, N];  out: [N] (out + sum when ``accumulate``)
        n = cuda.grid(1)
        if n < out.shape[0]:
            s = zero
            for p in range(part.shape[0]):
                s += part[p, n]
            if accumulate:
                out[n] = out[n] + s
            else:
                out[n] = s

    return partial, final


def column_sums(a, out=None):
    """Sum over every axis but the last (a 2-D or time-major 3-D array); added to ``out``
    when given."""
    N = _cols(a)
    M = _rows(a)
    accumulate = out is not None
    if out is None:
        out = empty((N,), a.dtype)
    if N == 0:
        return out
    rows = max(1, config.CUDA_REDUCE_ROWS)
    P = max(1, -(-M // rows))
    part = empty((P, N), a.dtype)
    partial, final = _colsum_kernels(np.dtype(a.dtype).str, a.ndim)
    if M == 0:
        fill(part, 0)
    else:
        partial[_blocks(P * N)](a, part, M, N, rows)
    final[_blocks(N)](part, out, accumulate)
    return out


# --------------------------------------------------------------------------- the GEMMs of a call
def project(xt, W, b_in, dmask, G):
    """``fastcells.cpu._linalg.project`` on device arrays: one GEMM with the bias, or one
    per gate with per-gate dropout masks."""
    T, B, D = xt.shape
    GH = W.shape[1]
    H = GH // G
    xw = empty((T, B, GH), xt.dtype)
    if dmask is None or dmask.ndim == 2:
        gemm(xt, W, out=xw, bias=b_in)
    else:
        xk = empty((T, B, D), xt.dtype)
        for k in range(G):
            sl = slice(k * H, (k + 1) * H)
            scale_rows(xt, dmask[k], xk)
            gemm(xk, W[:, sl], out=xw[:, :, sl], bias=None if b_in is None else b_in[sl])
    return xw


def input_grads(xt, W, dmask, dz, dW=None):
    """dxt [T, B, D] (time-major) and dW from the time-major dz [T, B, G*H] (gradient of the
    input-side pre-activations). With ``dW`` given, the weight gradient is added to it
    (chunked backward) and returned."""
    T, B, D = xt.shape
    GH = W.shape[1]
    G = 1 if dmask is None or dmask.ndim == 2 else dmask.shape[0]
    dxt = empty((T, B, D), xt.dtype)
    acc = dW is not None
    if dW is None:
        dW = empty(W.shape, xt.dtype)
    if G == 1:                                   # xt already carries a shared mask
        gemm(xt, dz, out=dW, trans_a=True, accumulate=acc)
        gemm(dz, W, out=dxt, trans_b=True)
        if dmask is not None:
            scale_rows(dxt, dmask, dxt)
    else:
        H = GH // G
        xk = empty((T, B, D), xt.dtype)
        tmp = empty((T, B, D), xt.dtype)
        for k in range(G):
            sl = slice(k * H, (k + 1) * H)
            scale_rows(xt, dmask[k], xk)
            gemm(xk, dz[:, :, sl], out=dW[:, sl], trans_a=True, accumulate=acc)
            gemm(dz[:, :, sl], W[:, sl], out=tmp, trans_b=True)
            scale_rows(tmp, dmask[k], dxt, accumulate=k > 0)
    return dxt, dW


def recurrent_grad(src, dz, rmask, gates, out=None):
    """dU[:, k] = (src * r_k)^T dz_k, with src [T, B, H] the recurrent input of each step
    and dz [T, B, gates*H] (time-major, may be a column slice); rmask [gates, B, H], one
    mask [B, H] for every gate, or None. With ``out`` ([H, gates*H], may be a view) the
    result is added to it."""
    T, B, H = src.shape
    n = dz.shape[2] // gates
    acc = out is not None
    if out is None:
        out = empty((H, dz.shape[2]), src.dtype)
    if rmask is None:
        gemm(src, dz, out=out, trans_a=True, accumulate=acc)
    else:
        sk = empty((T, B, H), src.dtype)
        for k in range(gates):
            sl = slice(k * n, (k + 1) * n)
            scale_rows(src, rmask if rmask.ndim == 2 else rmask[k], sk)
            gemm(sk, dz[:, :, sl], out=out[:, sl], trans_a=True, accumulate=acc)
    return out


@cuda.jit
def _transpose2(src, dst):
    # src: [n0, n1];  dst: [n1, n0]
    i = cuda.grid(1)
    n0 = dst.shape[1]
    if i < dst.shape[0] * n0:
        dst[i // n0, i % n0] = src[i % n0, i // n0]


def transpose(a):
    """A fresh C-contiguous a.T of a 2-D device array."""
    out = empty((a.shape[1], a.shape[0]), a.dtype)
    n = int(np.prod(a.shape))
    if n:
        _transpose2[_blocks(n)](a, out)
    return out
