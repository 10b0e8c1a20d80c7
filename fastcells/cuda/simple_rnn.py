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
from ._common import (IDX, begin_block, cache_arrays, exchange_buffer,
                      initial_output, kernel_variant, launch, load_rows, masks, numba_type,
                      output_grad, outputs, pending_carry, plan, row_stride, step_barrier,
                      store_rows)


def _state(NR, Hb, H, split):
    """Shared elements of a block's state, forward or backward: own h and output (dh and
    pending output gradient) [NR, Hb]; without a split, two buffers of the row vector passed
    between units, h * r (dz) [NR, HS], too."""
    return 2 * NR * Hb + (0 if split else 2 * NR * row_stride(H))


@kernel_variant
def _forward_kernel(dtype, R, u_shared, act, fast, split):
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    f_act = _math.scalar_activation(act, fast)
    barrier = step_barrier(split)

    @cuda.jit
    def forward(xw, U, rmask, use_rmask, mask, use_mask, h0, out0, go_backwards, zero_output,
                keep_cache, rows, NR, UB, Hb, xg, XR, y, h_out, hs, hprev):
        # xw:    [T, B, H]   x @ W + b (input dropout already applied)
        # U:     [H, H]      recurrent kernel
        # rmask: [B, H]      recurrent dropout mask;  mask: [T, B]
        # h0, out0: [B, H] (out0 zero-size for zeros);  y: [T, B, H] or [1, B, H];
        # h_out: [B, H]
        # rows: batch rows per block;  NR: rows of the shared state buffers
        # UB, Hb: unit blocks per batch slice and units per block (1 and H unless split)
        # xg:    split: the global exchange buffer of h * r, 2 x [XR, H]
        # cache: hs [T, B, H] = act(pre) of the step; hprev [T, B, H] the state entering t
        T = xw.shape[0]
        B = h0.shape[0]
        H = h0.shape[1]
        HS = H if split else H | 1
        full = y.shape[0] == T
        # shared: [U columns] | h, out [NR, Hb] | 2 x h * r [NR, HS] (without a split)
        sm = cuda.shared.array(0, DT)
        own = H * Hb if u_shared else 0
        outs = own + NR * Hb
        hb = outs + NR * Hb
        buf = XR * HS if split else NR * HS
        acc = cuda.local.array(R, DT)
        tid, nt, b0, n, j0, nu, items, xs, hb = begin_block(
            sm, U, u_shared, 1, 0, xg, split, hb, 2 * buf, HS, zero, rows, NR, R, B, UB, Hb, H)
        cuda.syncthreads()
        for e in range(tid, n * nu, nt):
            i = e // nu
            jl = e % nu
            j = j0 + jl
            b = b0 + i
            h = h0[b, j]
            sm[own + i * Hb + jl] = h
            sm[outs + i * Hb + jl] = out0[b, j] if out0.shape[0] else zero
            xs[hb + i * HS + j] = h * rmask[b, j] if use_rmask else h
        barrier()
        for s in range(T):
            t = T - 1 - s if go_backwards else s
            cur = hb + (s % 2) * buf
            nxt = hb + ((s + 1) % 2) * buf
            for it in range(tid, items, nt):
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                for r in range(R):
                    acc[r] = zero
                for l in range(H):
                    u = sm[IDX(l * Hb + jl)] if u_shared else U[IDX(l), IDX(j)]
                    for r in range(R):
                        acc[r] += xs[IDX(cur + (r0 + r) * HS + l)] * u
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * Hb + jl
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
                        xs[nxt + i * HS + j] = h * rmask[b, j] if use_rmask else h
                        if full:
                            y[s, b, j] = sm[outs + e]
            barrier()
        store_rows(h_out, sm, own, b0, n, j0, nu, Hb, tid, nt)
        if not full:
            store_rows(y[0], sm, outs, b0, n, j0, nu, Hb, tid, nt)

    return forward



# Backward per processed step: the SimpleRNN derivation in docs/design.md (dz, then
# dh_{t-1} = (dz @ U^T) * r). Masked steps pass dh through with dz = 0 (``carry``).
@kernel_variant
def _backward_kernel(dtype, R, u_shared, act, split):
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    d_act = _math.scalar_derivative(act)
    barrier = step_barrier(split)

    @cuda.jit
    def backward(hs, UT, rmask, use_rmask, mask, use_mask, dy, dh_in, go_backwards,
                 zero_output, rows, NR, UB, Hb, xg, XR, carry_io, dz, dh0):
        # hs:   [T, B, H] forward cache;  UT: [H, H] U transposed;  rmask: [B, H]
        # dy:   [T, B, H] or [1, B, H];   dh_in: [B, H];  carry_io: [B, H] in/out (chunks)
        # dz:   [T, B, H] out: gradient of the pre-activation;  dh0: [B, H] out
        # UB, Hb, xg, XR: as in the forward (xg exchanges dz)
        T = hs.shape[0]
        B = dh_in.shape[0]
        H = dh_in.shape[1]
        HS = H if split else H | 1
        full = dy.shape[0] == T
        # shared: [U^T columns] | dh, carry [NR, Hb] | 2 x dz [NR, HS] (without a split)
        sm = cuda.shared.array(0, DT)
        dhs = H * Hb if u_shared else 0
        car = dhs + NR * Hb
        zb = car + NR * Hb
        zbuf = XR * HS if split else NR * HS
        acc = cuda.local.array(R, DT)
        tid, nt, b0, n, j0, nu, items, xs, zb = begin_block(
            sm, UT, u_shared, 1, 0, xg, split, zb, 2 * zbuf, HS, zero, rows, NR, R, B, UB, Hb, H)
        load_rows(sm, dhs, dh_in, b0, n, j0, nu, Hb, tid, nt)
        load_rows(sm, car, carry_io, b0, n, j0, nu, Hb, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if go_backwards else s
            cur = zb + (s % 2) * zbuf
            for it in range(tid, items, nt):
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * Hb + jl
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            dz[t, b, j] = zero
                            xs[cur + i * HS + j] = zero
                            sm[car + e] = zero if zero_output else cr
                        else:
                            d = NPT(d_act(sm[dhs + e] + cr, hs[t, b, j]))
                            sm[car + e] = zero
                            dz[t, b, j] = d
                            xs[cur + i * HS + j] = d
            barrier()
            for it in range(tid, items, nt):
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                for r in range(R):
                    acc[r] = zero
                for l in range(H):
                    u = sm[IDX(l * Hb + jl)] if u_shared else UT[IDX(l), IDX(j)]
                    for r in range(R):
                        acc[r] += xs[IDX(cur + (r0 + r) * HS + l)] * u
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        if not (use_mask and not mask[t, b]):
                            sm[dhs + i * Hb + jl] = acc[r] * rmask[b, j] if use_rmask else acc[r]
        cuda.syncthreads()
        store_rows(dh0, sm, dhs, b0, n, j0, nu, Hb, tid, nt)
        store_rows(carry_io, sm, car, b0, n, j0, nu, Hb, tid, nt)

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
        p = plan(B, H, dt, H, lambda NR, Hb, split: _state(NR, Hb, H, split))
        kern = _forward_kernel(dt.str, p.R, p.u_shared, int(act), bool(fast), p.split)
        launch(kern, p, xw, U, rm, use_rmask, m, use_mask, h0, o0, bool(go_backwards),
               bool(zero_output), bool(keep_cache), p.rows, p.padded_rows, p.unit_blocks,
               p.block_units, exchange_buffer(p, 2 * H, dt), p.exchange_rows, y, h, hs, hprev)
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
        p = plan(B, H, dt, H, lambda NR, Hb, split: _state(NR, Hb, H, split))
        kern = _backward_kernel(dt.str, p.R, p.u_shared, int(act), p.split)
        launch(kern, p, hs, UT, rm, use_rmask, m, use_mask, dy, dh, bool(go_backwards),
               bool(zero_output), p.rows, p.padded_rows, p.unit_blocks, p.block_units,
               exchange_buffer(p, 2 * H, dt), p.exchange_rows, cr, dz, dh0)
    return dz, dh0
