"""Pieces shared by the LSTM, GRU and SimpleRNN kernels and their drivers."""
import numpy as np
from numba import njit

from .. import config
from .._workspace import workspace
from ._gemm import pack, packed_dot, strip_columns, strip_view


@njit(inline="always", **config.NJIT_OPTIONS)
def add_rows(acc, a):
    """acc += a for 2-D arrays, as loops (``+=`` on slices goes through Numba's general
    broadcasting code, see :func:`copy_row`)."""
    for i in range(a.shape[0]):
        ai, ci = a[i], acc[i]
        for j in range(ai.shape[0]):
            ci[j] += ai[j]


@njit(inline="always", **config.NJIT_OPTIONS)
def take_pending(dst, dh, carry):
    """dst[:H] = dh + carry, then carry = 0, for one row (1-D, H = len(dh)): the gradient
    reaching h_t, with the pending output gradient consumed. Backward element loops store
    to one array each: LLVM vectorises a loop only after ruling out overlaps between every
    stored and every loaded row at run time, and gives up past a few pairs (a loop storing
    four rows runs scalar, two to three times as slow)."""
    for j in range(dh.shape[0]):
        dst[j] = dh[j] + carry[j]
    for j in range(carry.shape[0]):
        carry[j] = 0.0


@njit(inline="always", **config.NJIT_OPTIONS)
def output_grad_step(carry, dy, s, T, b0, b1, go_backwards):
    """The start of processing step s of a backward: carry += the gradient of the step's
    output (dy [T, B, H] holds every step; dy [1, B, H] only the last one). Returns the
    step's input time t."""
    if dy.shape[0] == T:
        add_rows(carry, dy[s, b0:b1])
    elif s == T - 1:
        add_rows(carry, dy[0, b0:b1])
    return T - 1 - s if go_backwards else s


@njit(inline="always", **config.NJIT_OPTIONS)
def store_backward_block(b0, b1, dh0, dh, carry_io, carry):
    """The end of a backward block: its rows of the initial state's gradient and of the
    output gradient still pending (for the chunk before)."""
    copy_rows(dh0[b0:b1], dh)
    copy_rows(carry_io[b0:b1], carry)


@njit(inline="always", **config.NJIT_OPTIONS)
def store_output(y, s, b0, b1, res, full):
    """The rows of a forward step's output into y, where y holds every step's (``full``)."""
    if full:
        copy_rows(y[s, b0:b1], res)


@njit(inline="always", **config.NJIT_OPTIONS)
def store_final(y, res, full, b0, b1, h_out, h):
    """After a forward's last step: its output, where y holds only that one, and h."""
    if not full:
        copy_rows(y[0, b0:b1], res)
    copy_rows(h_out[b0:b1], h)


def optional(array, ndim, dtype):
    """Kernels take arrays, not None: ``(array or an empty stand-in, present?)``."""
    if array is None:
        return np.empty((0,) * ndim, dtype), False
    return array, True


def step_inputs(xw, x, T, Wb, dmask, dtype):
    """What the steps of a forward read: the projection ``xw`` [T, B, G*H], or (``xw`` None)
    ``x`` [B, Tx, D] with ``Wb`` = [W; b_in] and the shared dropout mask [B, D], projected
    inside the step. Returns ``T, xw, x, Wb packed, dmask, use_dmask, from_x`` with empty
    stand-ins for what the path does not read."""
    empty = np.empty((0, 0, 0), dtype)
    dm, use_dmask = optional(dmask, 2, dtype)
    if x is not None:
        return T, empty, x, pack(Wb), dm, use_dmask, True
    return xw.shape[0], xw, empty, empty, dm, use_dmask, False


def forward_outputs(T, B, H, return_sequences, keep_cache, dtype, *columns):
    """The outputs of a forward: y [T or 1, B, H], the final h [B, H], and one cache array
    [T, B, n] for each n of ``columns`` (empty stand-ins without ``keep_cache``)."""
    y = workspace.empty((T if return_sequences else 1, B, H), dtype)
    cache = [workspace.empty((T, B, n) if keep_cache else (0, 0, 0), dtype) for n in columns]
    return y, np.empty((B, H), dtype), cache


def initial_output(out0, B, H, dtype):
    """The output before the first step, [B, H]: ``out0`` or zeros."""
    return np.zeros((B, H), dtype) if out0 is None else out0


def pending_carry(carry, B, H, dtype):
    """The in/out pending output gradient of a backward, [B, H]: ``carry`` or zeros."""
    return np.zeros((B, H), dtype) if carry is None else carry


@njit(inline="always", **config.NJIT_OPTIONS)
def copy_row(dst, src):
    """dst[:n] = src for 1-D arrays, as a loop: Numba's slice assignment (``dst[:] = src``)
    goes through a general broadcasting copy that costs more than a whole LSTM cell update
    when done per row and step (32 floats)."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@njit(inline="always", **config.NJIT_OPTIONS)
def copy_rows(dst, src):
    """dst[:n] = src for 2-D arrays (n rows of src), as loops (see :func:`copy_row`)."""
    for i in range(src.shape[0]):
        copy_row(dst[i], src[i])


@njit(inline="always", **config.NJIT_OPTIONS)
def stage_buffer(x, rows, T, stage_bytes, bias_column):
    """A thread's staging buffer for :func:`staged_inputs`: ``[C, rows, D]`` with C steps
    (at least 1, at most T) taking about ``stage_bytes``; with ``bias_column``,
    ``[C, rows, D + 1]`` for :func:`step_projection`."""
    D = x.shape[2]
    C = max(1, min(T, stage_bytes // max(1, rows * D * x.itemsize)))
    return np.empty((C, rows, D + 1 if bias_column else D), x.dtype)


@njit(inline="always", **config.NJIT_OPTIONS)
def staged_inputs(x, t_off, T, s, b0, go_backwards, reverse, xs, dmask, use_dmask):
    """The inputs of processing step s for the rows b0 .. b0 + n - 1 of a thread, ``[n, D]``
    (n = xs.shape[1]), from the batch-major ``x`` [B, Tx, D] (step s reads x[:, t_off + t],
    t = T-1-s with go_backwards), times ``dmask[b0 + i]`` when ``use_dmask``; when ``xs``
    has D + 1 columns, each row ends with a 1 (the bias input of ``[W; b]``).

    ``xs`` [C, n, D or D + 1] holds a chunk of C consecutive steps, copied when the loop
    enters the chunk (its first step going forward, its last one when ``reverse``, as in a
    backward): every row's chunk is one contiguous stretch of x, read once, instead of n
    pages per step.
    """
    C = xs.shape[0]
    n = xs.shape[1]
    D = x.shape[2]
    q = s % C
    if (q == 0) if not reverse else (q == C - 1 or s == T - 1):
        c0 = s - q
        c1 = min(c0 + C, T)
        bias = xs.shape[2] > D
        for i in range(n):
            xi = x[b0 + i]
            for sl in range(c0, c1):
                t = T - 1 - sl if go_backwards else sl
                row = xs[sl - c0, i]
                src = xi[t_off + t]
                if use_dmask:
                    dm = dmask[b0 + i]
                    for j in range(D):
                        row[j] = src[j] * dm[j]
                else:
                    copy_row(row, src)
                if bias:
                    row[D] = 1.0
    return xs[q]


@njit(inline="always", **config.NJIT_OPTIONS)
def step_projection(from_x, xw, t, x, t_off, T, s, b0, go_backwards, xs, dmask, use_dmask,
                    Wb, out):
    """The input projection of a thread's rows at processing step s (input time t), and the
    index of its first row: rows b0.. of xw[t], or, ``from_x``, out = [x_t * dmask | 1] @
    [W; b] computed where it is used (``Wb`` = ``_gemm.pack([W; b])``; ``xs`` from
    ``stage_buffer(..., bias_column=True)``: the rows are staged with their mask and bias
    input, so the product reads them where they were copied) and 0."""
    if from_x:
        packed_dot(staged_inputs(x, t_off, T, s, b0, go_backwards, False, xs, dmask,
                                 use_dmask), Wb, out)
        return out, 0
    return xw[t], b0


@njit(inline="always", **config.NJIT_OPTIONS)
def window_row(i, w, R, n):
    """Where row i of a thread's slice (n rows, blocks of R) goes in the window buffers of
    a fused backward at window slot w: ``(block, row)``. A block's rows of one step are
    contiguous and its steps follow each other, so a short last block of rk < R rows fills
    only w * rk rows and no GEMM works on rows that are not there (at B=1 the padding to
    R rows made the windowed weight-gradient GEMM 16 times larger)."""
    k = i // R
    return k, w * min(R, n - k * R) + i % R


@njit(inline="always", **config.NJIT_OPTIONS)
def input_and_state_grads(dzw, w, R, VT, dd, dxw, dh, live, n, dmask, use_dmask, rmask,
                          use_rmask, b0):
    """After the gate gradients dz_t of a step are in the window buffers: per batch block,
    [dx_t | dh_{t-1}] = dz_t @ [W; U]^T (``VT`` packed by ``_gemm.pack``). dx_t (times the
    dropout mask) goes to the window buffer ``dxw`` [n, window, D] at slot w; dh_{t-1}
    (times the recurrent mask ``rmask`` [B, H]) replaces ``dh`` for the rows the step
    processed.

    Where D is a whole number of packed strips, each half of the product is written straight
    where it belongs (dx rows into the window buffer, dh rows over ``dh`` when no row of
    the block is masked) unless a dropout mask has to multiply it: two 32-float row copies
    per row and step less, which at H=32 cost as much as a tenth of the backward."""
    D = dxw.shape[2]
    H = dh.shape[1]
    nb = (n + R - 1) // R
    SX = D // VT.shape[2] if D % VT.shape[2] == 0 else -1     # strips of the dx half
    for k in range(nb):
        rows = min(R, n - k * R)
        r0 = k * R
        dz = dzw[k, w * rows:(w + 1) * rows]
        all_live = True
        for ii in range(rows):
            all_live = all_live and live[r0 + ii]
        direct_x = SX >= 0 and not use_dmask
        direct_h = SX >= 0 and not use_rmask and all_live
        if SX < 0:
            packed_dot(dz, VT, dd[:rows])
        else:
            packed_dot(dz, VT[:SX], dxw[r0:r0 + rows, w] if direct_x else dd[:rows, :D])
            packed_dot(dz, VT[SX:], dh[r0:r0 + rows] if direct_h else dd[:rows, D:])
        for ii in range(rows):
            i = r0 + ii
            b = b0 + i
            if not direct_x:
                dxr = dxw[i, w]
                if use_dmask:
                    for j in range(D):
                        dxr[j] = dd[ii, j] * dmask[b, j]
                else:
                    for j in range(D):
                        dxr[j] = dd[ii, j]
            if live[i] and not direct_h:
                dhi = dh[i]
                if use_rmask:
                    for j in range(H):
                        dhi[j] = dd[ii, D + j] * rmask[b, j]
                else:
                    for j in range(H):
                        dhi[j] = dd[ii, D + j]


@njit(inline="always", **config.NJIT_OPTIONS)
def add_window_product(s, dz, part, acc):
    """acc += s^T @ dz for the rows of a window (s [K, F], dz [K, N'] with N' a whole number
    of strips, ``_gemm.strip_columns``; acc, part [F, N]), by ``packed_dot`` reading s^T
    through its strides and dz in place as strips (OpenBLAS re-packed both operands: 109
    against 96 us for K=512, F=65, N=128), ``part`` scratch."""
    packed_dot(s.T, strip_view(dz), part)
    add_rows(acc, part)


@njit(inline="always", **config.NJIT_OPTIONS)
def flush_window(sw, dzw, acc, part, k0, R, w, n, dxw, dx, b0, s, T, t_off,
                 go_backwards):
    """End of a window of ``w`` steps (the last processed one is step s): add each block's
    s_w^T @ dz_w to its share of the weight gradients, and write the window's dx rows,
    a contiguous stretch of steps per batch row (batch-major rows of one step lie a page
    apart). The kernels fill ``dxw`` [n, window, D] from its last slot down (through the
    view ``dxw[:, ::-1]``, see :func:`dx_window`), so the window's steps lie in time order
    in its last w slots: without go_backwards one copy of w * D values per row (dx [B, Tx,
    D] C-contiguous, as the drivers make it)."""
    nb = (n + R - 1) // R
    for k in range(nb):
        rw = w * min(R, n - k * R)
        add_window_product(sw[k, :rw], dzw[k, :rw], part, acc[k0 + k])
    window, D = dxw.shape[1], dxw.shape[2]
    for i in range(n):
        src = dxw[i, window - w:]                   # steps s .. s + w - 1 in slot order
        if go_backwards:
            for u in range(w):
                copy_row(dx[b0 + i, t_off + T - 1 - (s + u)], src[u])
        else:
            copy_row(dx[b0 + i, t_off + s:t_off + s + w].reshape(w * D),
                     src.reshape(w * D))


@njit(inline="always", **config.NJIT_OPTIONS)
def next_window_slot(w, window, sw, dzw, acc, part, k0, R, n, dxw, dx, b0, s, T, t_off,
                     go_backwards):
    """After step s filled window slot w: the next slot, flushing the window first
    (:func:`flush_window`) when it is full or s is the last step processed."""
    w += 1
    if w == window or s == 0:
        flush_window(sw, dzw, acc, part, k0, R, w, n, dxw, dx, b0, s, T, t_off, go_backwards)
        return 0
    return w


@njit(inline="always", **config.NJIT_OPTIONS)
def dx_window(dxw):
    """The view of the window buffer for dx [n, window, D] that the backward kernels write
    at slot w for the w-th step they process in a window: the buffer's slots backwards,
    so that :func:`flush_window` finds the steps in time order."""
    return dxw[:, ::-1]


@njit(inline="always", **config.NJIT_OPTIONS)
def window_buffers(n, R, window, D, H, GH, cache):
    """The buffers of a fused backward's window products for n rows in blocks of R (the
    dtype is ``cache``'s): dzw [blocks, window * R, GH in whole strips] (read in place, see
    ``_gemm.strip_view``; rows: :func:`window_row`), sw [blocks, window * R, D + H + 1],
    dd [R, D + H], dxw [n, window, D] and its view :func:`dx_window`, part [D + H + 1, GH]."""
    nb = (n + R - 1) // R
    F = D + H + 1
    dt = cache.dtype
    dxw = np.empty((n, window, D), dt)
    return (np.zeros((nb, window * R, strip_columns(GH, cache)), dt),
            np.zeros((nb, window * R, F), dt), np.empty((R, D + H), dt), dxw, dx_window(dxw),
            np.empty((F, GH), dt))


@njit(inline="always", **config.NJIT_OPTIONS)
def masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
    """Backward bookkeeping of row i (batch row b) at input step t: records in live[i]
    whether the step was processed; a masked row gets a zero gate gradient d, passes its
    state gradients through, and with zero_output_for_mask drops the pending output
    gradient (its output was a constant zero). Returns True for a masked row."""
    live[i] = not (use_mask and not mask[t, b])
    if live[i]:
        return False
    d[:] = 0.0
    if zero_output:
        carry[i] = 0.0
    return True
