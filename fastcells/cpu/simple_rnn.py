"""SimpleRNN recurrence on the CPU: h_t = act(xw_t + (h_{t-1} * r) @ U).

Same conventions (time-major arrays) as ``fastcells.cpu.lstm`` (G = 1 gate).
"""
import numpy as np

from .._workspace import workspace
from .._math import TANH, activate, activate_grad, fast_tanh
from .. import config
from ._common import (copy_row, copy_rows, forward_outputs, initial_output, input_and_state_grads,
                      masked_row, next_window_slot, optional, output_grad_step, pending_carry,
                      stage_buffer, staged_inputs, step_inputs, step_projection,
                      store_backward_block, store_final, store_output, take_pending,
                      window_buffers, window_row)
from ._gemm import pack, packed_dot
from ._borrow import borrowed, keep_alive
from ._jit import kernel
from ._fpstate import flush_denormals, restore
from ._parallel import run_block_parallel


@kernel
def _forward_kernel(b0, b1, T, xw, x, t_off, stage, Wb, dmask, use_dmask, from_x, U, rmask,
                    use_rmask, mask, use_mask, h0, act, fast, go_backwards, zero_output,
                    keep_cache, out0, y, h_out, hs, hprev):
    # xw:    [T, B, H]   x @ W + b (input dropout already applied), unless from_x:
    # x:     [B, Tx, D]  batch-major input, step t reads x[:, t_off + t] (copied ``stage``
    #        bytes at a time, see _common.staged_inputs); Wb [D + 1, H] =
    #        [W; b] and dmask [B, D] project it inside the step
    # U:     [H, H]      recurrent kernel (Wb and U packed by _gemm.pack)
    # rmask: [B, H]      recurrent dropout mask
    # mask:  [T, B]      True where the step is processed
    # h0:    [B, H]      initial state
    # y:     [T, B, H] or [1, B, H];  h_out: [B, H]
    # cache: hs [T, B, H] = act(pre) of the step; hprev [T, B, H] the state entering step t
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    xw, x, Wb, dmask, U, rmask, mask, y, hs, hprev = borrowed(
        (xw, x, Wb, dmask, U, rmask, mask, y, hs, hprev))
    n = b1 - b0
    H = h0.shape[1]
    full = y.shape[0] == T
    dt = y.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (np.empty((n, H), dt), h0[b0:b1].copy(), np.empty((n, H), dt), np.empty((n, H), dt),
           out0[b0:b1].copy(), np.empty((n, H), dt), stage_buffer(x, n, T, stage, True))
    xs, h, hr, z, out, g_scratch, xst = borrowed(own)
    res = out if use_mask else h    # the output rows
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        if use_rmask:
            for i in range(n):
                for j in range(H):
                    hr[i, j] = h[i, j] * rmask[b0 + i, j]
            packed_dot(hr, U, z)
        else:
            packed_dot(h, U, z)
        if keep_cache:
            g, off = hs[t], b0
            copy_rows(hprev[t, b0:b1], h)
        else:
            g, off = g_scratch, 0
        xt, xo = step_projection(from_x, xw, t, x, t_off, T, s, b0, go_backwards, xst, dmask,
                                 use_dmask, Wb, xs)
        # pre-activation and activation of the n x H block in one sweep (every array here
        # is contiguous over it; a masked row's results are not used)
        gf = g[off:off + n].reshape(n * H)
        xf = xt[xo:xo + n].reshape(n * H)
        zf = z.reshape(n * H)
        if act == TANH and fast:
            for k in range(n * H):
                gf[k] = fast_tanh(xf[k] + zf[k])
        else:
            for k in range(n * H):
                gf[k] = xf[k] + zf[k]
            activate(act, fast, gf, 0, n * H)
        if use_mask:
            for i in range(n):
                if not mask[t, b0 + i]:
                    if zero_output:
                        out[i] = 0.0
                    continue
                hi, gi, oi = h[i], g[off + i], out[i]
                for j in range(H):
                    hi[j] = gi[j]
                for j in range(H):
                    oi[j] = hi[j]
        else:                       # the output is h
            hf = h.reshape(n * H)
            for k in range(n * H):
                hf[k] = gf[k]
        store_output(y, s, b0, b1, res, full)
    store_final(y, res, full, b0, b1, h_out, h)
    keep_alive(own)
    restore(fpmode)


# Backward per processed step (docs/design.md): dz = (dh + dout) * act'(h_t), then
# dh_{t-1} = (dz @ U^T) * r. Masked steps pass dh through with dz = 0 (``carry`` as in lstm.py).
@kernel
def _backward_kernel(b0, b1, hs, UT, rmask, use_rmask, mask, use_mask, dy, dh_in,
                     act, go_backwards, zero_output, carry_io, dz, dh0):
    # hs:   [T, B, H] forward cache;  UT: [H, H] U transposed (packed)
    # dy:   [T, B, H] or [1, B, H];   dh_in: [B, H]
    # dz:   [T, B, H] out: gradient of the pre-activation;  dh0: [B, H] out
    fpmode = flush_denormals()
    n = b1 - b0
    dh = dh_in[b0:b1].copy()
    carry = carry_io[b0:b1].copy()
    T = hs.shape[0]
    H = dh_in.shape[1]
    dt = hs.dtype
    dhn = np.empty((n, H), dt)
    live = np.empty(n, np.bool_)
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        dzt = dz[t]
        for i in range(n):
            b = b0 + i
            d = dzt[b]
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                continue
            take_pending(d, dh[i], carry[i])
            activate_grad(act, hs[t, b], d, 0, H)
        packed_dot(dzt[b0:b1], UT, dhn)
        for i in range(n):
            if live[i]:
                for j in range(H):
                    dh[i, j] = dhn[i, j] * rmask[b0 + i, j] if use_rmask else dhn[i, j]
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    restore(fpmode)


# The fused backward (the forward projected inside the step): per step and batch block,
#   [dx_t | dh_{t-1}] = dz_t @ [W; U]^T        (times the dropout masks)
# and, per window of steps, acc_block += s_w^T @ dz_w with s = [x_t * m | h_{t-1} * r | 1],
# so acc = [dW; dU; db] with nothing of size [T, B, H] but the cache going through memory.
@kernel
def _backward_fused_kernel(b0, b1, R, window, hs, hprev, x, t_off, stage, dmask, use_dmask,
                           VT,
                           rmask, use_rmask, mask, use_mask, dy, dh_in, act, go_backwards,
                           zero_output, carry_io, dx, acc, dh0):
    # hs, hprev: the forward cache [T, B, H];  x: [B, Tx, D] the input (steps t_off + t)
    # VT:   [H, D + H] = [W; U]^T;  dmask [B, D], rmask [B, H]: the dropout masks
    # dx:   [B, Tx, D] out;  acc: [nblocks, D + H + 1, H] in/out, each block's share of
    #       [dW; dU; db];  other arguments as in _backward_kernel
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    hs, hprev, x, dmask, VT, rmask, mask, dy, dx, acc = borrowed(
        (hs, hprev, x, dmask, VT, rmask, mask, dy, dx, acc))
    n = b1 - b0
    T = hs.shape[0]
    H = dh_in.shape[1]
    D = dx.shape[2]
    k0 = b0 // R
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (dh_in[b0:b1].copy(), carry_io[b0:b1].copy(), np.empty(n, np.bool_),
           stage_buffer(x, n, T, stage, False))
    dh, carry, live, xst = borrowed(own)
    windows = window_buffers(n, R, window, D, H, H, hs)
    dzw, sw, dd, dxw, dxv, part = borrowed(windows)
    w = 0
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        xt = staged_inputs(x, t_off, T, s, b0, go_backwards, True, xst, dmask, use_dmask)
        for i in range(n):
            b = b0 + i
            k, row = window_row(i, w, R, n)
            d = dzw[k, row]
            si = sw[k, row]
            xi = xt[i]
            hp = hprev[t, b]
            copy_row(si, xi)                # x_t * m, masked when staged
            for j in range(H):
                si[D + j] = hp[j] * rmask[b, j] if use_rmask else hp[j]
            si[D + H] = 1.0
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                continue
            take_pending(d, dh[i], carry[i])
            activate_grad(act, hs[t, b], d, 0, H)
        input_and_state_grads(dzw, w, R, VT, dd, dxv, dh, live, n, dmask, use_dmask, rmask,
                              use_rmask, b0)
        w = next_window_slot(w, window, sw, dzw, acc, part, k0, R, n, dxw, dx, b0, s, T,
                             t_off, go_backwards)
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    keep_alive(own)
    keep_alive(windows)
    restore(fpmode)


def backward_fused(cache, x, t_off, VT, dmask, rmask, mask, dy, dh, act, go_backwards,
                   zero_output, carry, dx, acc):
    """Backward of a forward that projected inside the step (``forward(x=...)``): writes
    dx[:, t_off:t_off + T] and adds each block's share of [dW; dU; db] to ``acc``
    [nblocks, D + H + 1, H]. Returns dh0."""
    hs, hprev = cache
    B, H = dh.shape
    dt = hs.dtype
    dh0 = np.empty((B, H), dt)
    dm, use_dmask = optional(dmask, 2, dt)
    rm, use_rmask = optional(rmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_backward_fused_kernel, B, config.BLOCK_ROWS, config.BLOCK_ROWS,
                       config.WINDOW_STEPS, hs, hprev, x, t_off, config.STAGE_BYTES, dm,
                       use_dmask, pack(VT), rm,
                       use_rmask, m, use_mask, dy, dh, act, go_backwards, zero_output,
                       pending_carry(carry, B, H, dt), dx, acc, dh0)
    return dh0


def forward(xw, U, rmask, mask, h0, act, go_backwards, zero_output, return_sequences,
            keep_cache, fast, out0=None, x=None, t_off=0, T=None, Wb=None, dmask=None):
    """Run the SimpleRNN recurrence (time-major). Returns ``y, h, cache`` with
    ``cache = (hs, hprev)``; ``out0`` as in ``lstm.forward``; ``x``, ``t_off``, ``T``, ``Wb``,
    ``dmask``: the projection inside the step, as in ``gru.forward``."""
    dt = U.dtype
    B, H = h0.shape
    T, xw, x, Wb, dm, use_dmask, from_x = step_inputs(xw, x, T, Wb, dmask, dt)
    y, h, (hs, hprev) = forward_outputs(T, B, H, return_sequences, keep_cache, dt, H, H)
    rm, use_rmask = optional(rmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_forward_kernel, B, config.BLOCK_ROWS, T, xw, x, t_off,
                       config.STAGE_BYTES, Wb, dm, use_dmask, from_x, pack(U), rm, use_rmask, m,
                       use_mask, h0, act, fast,
                       go_backwards, zero_output, keep_cache, initial_output(out0, B, H, dt), y, h,
                       hs, hprev)
    return y, h, ((hs, hprev) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, go_backwards, zero_output, carry=None):
    """Backward recurrence (time-major). Returns ``dz [T, B, H], dh0``; ``carry`` as in
    ``lstm.backward``."""
    hs, _ = cache
    T, B, H = hs.shape
    dt = hs.dtype
    dz = workspace.empty((T, B, H), dt)
    dh0 = np.empty((B, H), dt)
    rm, use_rmask = optional(rmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_backward_kernel, B, config.BLOCK_ROWS, hs, pack(U.T), rm, use_rmask, m,
                       use_mask, dy, dh, act, go_backwards, zero_output,
                       pending_carry(carry, B, H, dt), dz, dh0)
    return dz, dh0
