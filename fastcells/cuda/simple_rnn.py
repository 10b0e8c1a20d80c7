"""SimpleRNN recurrence on the GPU: h_t = act(xw_t + (h_{t-1} * r) @ U), with the
signatures of ``fastcells.cpu.simple_rnn``.

Parallel decomposition as in ``fastcells.cuda.lstm`` (G = 1 gate): a block owns batch rows
for the whole sequence, a thread owns (unit j, R rows) items; h * r is double-buffered in
shared memory (one ``syncthreads`` per step); the backward computes dz of its items, meets
the block at a barrier, and computes dh_{t-1} = (dz @ U^T) * r from the row's dz.
"""
import numpy as np
from numba import cuda

from .. import _math
from . import _linalg
from ._common import (IDX, begin_block, cache_arrays, initial_output, kernel_variant, launch,
                      load_rows, masks, numba_type, output_grad, outputs, pending_carry, plan,
                      row_stride, store_rows)


def _forward_state(NR, H):
    """Two buffers of the recurrent input h * r [NR, HS], own h and output [NR, H]."""
    return 2 * NR * row_stride(H) + 2 * NR * H


@kernel_variant
def _forward_kernel(dtype, R, u_shared, act, fast):
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    f_act = _math.scalar_activation(act, fast)

    @cuda.jit
    def forward(xw, U, rmask, use_rmask, mask, use_mask, h0, out0, go_backwards, zero_output,
                keep_cache, rows, NR, y, h_out, hs, hprev):
        # xw:    [T, B, H]   x @ W + b (input dropout already applied)
        # U:     [H, H]      recurrent kernel
        # rmask: [B, H]      recurrent dropout mask;  mask: [T, B]
        # h0, out0: [B, H];  y: [T, B, H] or [1, B, H];  h_out: [B, H]
        # rows: batch rows per block;  NR: rows of the shared state buffers
        # cache: hs [T, B, H] = act(pre) of the step; hprev [T, B, H] the state entering t
        T = xw.shape[0]
        B = h0.shape[0]
        H = h0.shape[1]
        HS = H | 1
        full = y.shape[0] == T
        # shared: [U] | 2 x h * r [NR, HS] | h, out [NR, H]
        sm = cuda.shared.array(0, DT)
        hb = H * H if u_shared else 0
        buf = NR * HS
        own = hb + 2 * buf
        outs = own + NR * H
        acc = cuda.local.array(R, DT)
        tid, nt, b0, n, items = begin_block(sm, U, u_shared, hb, own, zero, rows, NR, R, B, H)
        cuda.syncthreads()
        for e in range(tid, n * H, nt):
            i = e // H
            j = e % H
            b = b0 + i
            h = h0[b, j]
            sm[own + e] = h
            sm[outs + e] = out0[b, j]
            sm[hb + i * HS + j] = h * rmask[b, j] if use_rmask else h
        cuda.syncthreads()
        for s in range(T):
            t = T - 1 - s if go_backwards else s
            cur = hb + (s % 2) * buf
            nxt = hb + ((s + 1) % 2) * buf
            for it in range(tid, items, nt):
                j = it % H
                r0 = (it // H) * R
                for r in range(R):
                    acc[r] = zero
                for l in range(H):
                    u = sm[IDX(l * H + j)] if u_shared else U[IDX(l), IDX(j)]
                    for r in range(R):
                        acc[r] += sm[IDX(cur + (r0 + r) * HS + l)] * u
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * H + j
                        g = NPT(f_act(xw[t, b, j] + acc[r]))
                        hp = sm[own + e]
                        if keep_cache:
                            hs[t, b, j] = g
                            hprev[t, b, j] = hp
                        h = hp
                        if use_mask and not mask[t, b]:
                            if zero_output:
                                sm[outs + e] = zero
                        else:
                            h = g
                            sm[own + e] = h
                            sm[outs + e] = h
                        sm[nxt + i * HS + j] = h * rmask[b, j] if use_rmask else h
                        if full:
                            y[s, b, j] = sm[outs + e]
            cuda.syncthreads()
        store_rows(h_out, sm, own, b0, n, H, tid, nt)
        if not full:
            store_rows(y[0], sm, outs, b0, n, H, tid, nt)

    return forward


def _backward_state(NR, H):
    """Two buffers of the step's dz [NR, HS], own dh and pending output gradient [NR, H]."""
    return 2 * NR * row_stride(H) + 2 * NR * H


# Backward per processed step: dz = (dh + dout) * act'(h_t);  dh_{t-1} = (dz @ U^T) * r.
# Masked steps pass dh through and have dz = 0 (output gradient handling as in lstm.py).
@kernel_variant
def _backward_kernel(dtype, R, u_shared, act):
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    d_act = _math.scalar_derivative(act)

    @cuda.jit
    def backward(hs, UT, rmask, use_rmask, mask, use_mask, dy, dh_in, go_backwards,
                 zero_output, rows, NR, carry_io, dz, dh0):
        # hs:   [T, B, H] forward cache;  UT: [H, H] U transposed;  rmask: [B, H]
        # dy:   [T, B, H] or [1, B, H];   dh_in: [B, H];  carry_io: [B, H] in/out (chunks)
        # dz:   [T, B, H] out: gradient of the pre-activation;  dh0: [B, H] out
        T = hs.shape[0]
        B = dh_in.shape[0]
        H = dh_in.shape[1]
        HS = H | 1
        full = dy.shape[0] == T
        # shared: [U^T] | 2 x dz [NR, HS] | dh, carry [NR, H]
        sm = cuda.shared.array(0, DT)
        zb = H * H if u_shared else 0
        zbuf = NR * HS
        dhs = zb + 2 * zbuf
        car = dhs + NR * H
        acc = cuda.local.array(R, DT)
        tid, nt, b0, n, items = begin_block(sm, UT, u_shared, zb, dhs, zero, rows, NR, R, B, H)
        load_rows(sm, dhs, dh_in, b0, n, H, tid, nt)
        load_rows(sm, car, carry_io, b0, n, H, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if go_backwards else s
            cur = zb + (s % 2) * zbuf
            for it in range(tid, items, nt):
                j = it % H
                r0 = (it // H) * R
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * H + j
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            dz[t, b, j] = zero
                            sm[cur + i * HS + j] = zero
                            sm[car + e] = zero if zero_output else cr
                        else:
                            d = NPT(d_act(sm[dhs + e] + cr, hs[t, b, j]))
                            sm[car + e] = zero
                            dz[t, b, j] = d
                            sm[cur + i * HS + j] = d
            cuda.syncthreads()
            for it in range(tid, items, nt):
                j = it % H
                r0 = (it // H) * R
                for r in range(R):
                    acc[r] = zero
                for l in range(H):
                    u = sm[IDX(l * H + j)] if u_shared else UT[IDX(l), IDX(j)]
                    for r in range(R):
                        acc[r] += sm[IDX(cur + (r0 + r) * HS + l)] * u
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        if not (use_mask and not mask[t, b]):
                            sm[dhs + i * H + j] = acc[r] * rmask[b, j] if use_rmask else acc[r]
        cuda.syncthreads()
        store_rows(dh0, sm, dhs, b0, n, H, tid, nt)
        store_rows(carry_io, sm, car, b0, n, H, tid, nt)

    return backward


def forward(xw, U, rmask, mask, h0, act, go_backwards, zero_output, return_sequences,
            keep_cache, fast, out0=None):
    """Run the SimpleRNN recurrence (time-major device arrays). Returns ``y, h, cache`` with
    ``cache = (hs, hprev)``; ``out0`` as in ``lstm.forward``."""
    xw, U, h0 = (_linalg.to_device(a) for a in (xw, U, h0))
    T, B, H = xw.shape
    dt = np.dtype(xw.dtype)
    y, h = outputs(T, B, H, dt, return_sequences, 1)
    hs, hprev = cache_arrays(keep_cache, T, B, (H, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 2, mask, dt)
    o0 = initial_output(out0, B, H, dt)
    if B:
        p = plan(B, H, dt, H * H, lambda NR: _forward_state(NR, H))
        kern = _forward_kernel(dt.str, p.R, p.u_shared, int(act), bool(fast))
        launch(kern, p, xw, U, rm, use_rmask, m, use_mask, h0, o0, bool(go_backwards),
               bool(zero_output), bool(keep_cache), p.rows, p.padded_rows, y, h, hs, hprev)
    return y, h, ((hs, hprev) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, go_backwards, zero_output, carry=None):
    """Backward recurrence (time-major device arrays). Returns ``dz [T, B, H], dh0``;
    ``carry`` as in ``lstm.backward``."""
    hs, _ = cache
    U, dy, dh = (_linalg.to_device(a) for a in (U, dy, dh))
    T, B, H = hs.shape
    dt = np.dtype(hs.dtype)
    dz = _linalg.empty((T, B, H), dt)
    dh0 = _linalg.empty((B, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 2, mask, dt)
    cr = pending_carry(carry, B, H, dt)
    if B:
        UT = _linalg.transpose(U)
        p = plan(B, H, dt, H * H, lambda NR: _backward_state(NR, H))
        kern = _backward_kernel(dt.str, p.R, p.u_shared, int(act))
        launch(kern, p, hs, UT, rm, use_rmask, m, use_mask, dy, dh, bool(go_backwards),
               bool(zero_output), p.rows, p.padded_rows, cr, dz, dh0)
    return dz, dh0
