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
from ._common import (begin_block, cache_arrays, gate_sums, initial_output, item, item_row,
                      kernel_constants, kernel_variant, load_backward_state,
                      load_initial_state, masked_step_grad, masks, output_grad, outputs,
                      pending_carry, put_step_output, recurrence_dims, row_stride,
                      run_recurrence, state_offsets, step_buffers, store_rows, transposed_sums)


def _state(NR, Hb, H, split):
    """Shared elements of a block's state, forward or backward: own h and output (dh and
    pending output gradient) [NR, Hb]; without a split, two buffers of the row vector passed
    between units, h * r (dz) [NR, HS], too."""
    return 2 * NR * Hb + (0 if split else 2 * NR * row_stride(H))


def _one_plane(rmask):
    """The [B, H] recurrent dropout mask as the one plane [1, B, H] of the per-gate masks
    that the shared forward helpers read (a view, no copy)."""
    return rmask.reshape((1,) + tuple(rmask.shape))


@kernel_variant
def _forward_kernel(dtype, R, u_shared, act, fast, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    f_act = _math.scalar_activation(act, fast)

    @cuda.jit
    def forward(xw, U, rmask, use_rmask, mask, use_mask, h0, out0, go_backwards, zero_output,
                keep_cache, rows, NR, UB, Hb, xg, XR, y, h_out, hs, hprev):
        # xw:    [T, B, H]   x @ W + b (input dropout already applied)
        # U:     [H, H]      recurrent kernel
        # rmask: [1, B, H]   recurrent dropout mask;  mask: [T, B]
        # h0, out0: [B, H] (out0 zero-size for zeros);  y: [T, B, H] or [1, B, H];
        # h_out: [B, H]
        # rows: batch rows per block;  NR: rows of the shared state buffers
        # UB, Hb: unit blocks per batch slice and units per block (1 and H unless split)
        # xg:    split: the global exchange buffer of h * r, 2 x [XR, H]
        # cache: hs [T, B, H] = act(pre) of the step; hprev [T, B, H] the state entering t
        T, B, H, HS, XN, full = recurrence_dims(xw, h0, y, split, XR, NR)
        # shared: [U columns] | h, out [NR, Hb] | 2 x h * r [NR, HS] (without a split)
        sm = cuda.shared.array(0, DT)
        own, outs, hb, _, _ = state_offsets(H * Hb, u_shared, NR, Hb)
        buf = XN * HS
        acc = cuda.local.array(R, DT)
        u = cuda.local.array(1, DT)
        tid, nt, b0, n, j0, nu, items, xs, hb = begin_block(
            sm, U, u_shared, 1, 0, xg, split, hb, 2 * buf, HS, zero, rows, NR, R, B, UB, Hb, H)
        cuda.syncthreads()
        load_initial_state(sm, own, outs, xs, hb, buf, HS, h0, out0, rmask, use_rmask, 1, b0,
                           n, j0, nu, Hb, tid, nt, zero)
        barrier()
        for s in range(T):
            t, cur, nxt = step_buffers(s, T, go_backwards, hb, buf)
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                gate_sums(acc, 1, 0, 1, xs, cur, HS, buf, False, sm, u_shared, U, Hb, H, jl, j,
                          R, r0, u, zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        g = NPT(f_act(xw[t, b, j] + acc[r]))
                        hp = sm[own + e]
                        if keep_cache:
                            hs[t, b, j] = g
                            hprev[t, b, j] = hp
                        live = not (use_mask and not mask[t, b])
                        put_step_output(sm, own, outs, e, live, g if live else hp, zero_output,
                                        zero, xs, nxt, buf, HS, i, j, rmask, use_rmask, b, 1,
                                        full, y, s)
            barrier()
        store_rows(h_out, sm, own, b0, n, j0, nu, Hb, tid, nt)
        if not full:
            store_rows(y[0], sm, outs, b0, n, j0, nu, Hb, tid, nt)

    return forward


# Backward per processed step: the SimpleRNN derivation in docs/design.md (dz, then
# dh_{t-1} = (dz @ U^T) * r). Masked steps pass dh through with dz = 0 (``carry``).
@kernel_variant
def _backward_kernel(dtype, R, u_shared, act, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    d_act = _math.scalar_derivative(act)

    @cuda.jit
    def backward(hs, UT, rmask, use_rmask, mask, use_mask, dy, dh_in, go_backwards,
                 zero_output, rows, NR, UB, Hb, xg, XR, carry_io, dz, dh0):
        # hs:   [T, B, H] forward cache;  UT: [H, H] U transposed;  rmask: [B, H]
        # dy:   [T, B, H] or [1, B, H];   dh_in: [B, H];  carry_io: [B, H] in/out (chunks)
        # dz:   [T, B, H] out: gradient of the pre-activation;  dh0: [B, H] out
        # UB, Hb, xg, XR: as in the forward (xg exchanges dz)
        T, B, H, HS, XN, full = recurrence_dims(hs, dh_in, dy, split, XR, NR)
        # shared: [U^T columns] | dh, carry [NR, Hb] | 2 x dz [NR, HS] (without a split)
        sm = cuda.shared.array(0, DT)
        dhs, car, zb, _, _ = state_offsets(H * Hb, u_shared, NR, Hb)
        zbuf = XN * HS
        acc = cuda.local.array(R, DT)
        tid, nt, b0, n, j0, nu, items, xs, zb = begin_block(
            sm, UT, u_shared, 1, 0, xg, split, zb, 2 * zbuf, HS, zero, rows, NR, R, B, UB, Hb, H)
        load_backward_state(sm, dhs, dh_in, car, carry_io, b0, n, j0, nu, Hb, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            t, cur, _ = step_buffers(s, T, go_backwards, zb, zbuf)
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            masked_step_grad(dz, t, b, j, H, 1, xs, cur + i * HS, 1, sm, car, e,
                                             cr, zero_output, zero)
                        else:
                            d = NPT(d_act(sm[dhs + e] + cr, hs[t, b, j]))
                            sm[car + e] = zero
                            dz[t, b, j] = d
                            xs[cur + i * HS + j] = d
            barrier()
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                transposed_sums(acc, 1, 1, H, 0, xs, cur, HS, sm, u_shared, UT, Hb, jl, j, R, r0,
                                zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
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
        run_recurrence(_forward_kernel, (int(act), bool(fast)), B, H, dt, H,
                       lambda NR, Hb, split: _state(NR, Hb, H, split), 2 * H,
                       (xw, U, _one_plane(rm), use_rmask, m, use_mask, h0, o0,
                        bool(go_backwards), bool(zero_output), bool(keep_cache)),
                       (y, h, hs, hprev))
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
        run_recurrence(_backward_kernel, (int(act),), B, H, dt, H,
                       lambda NR, Hb, split: _state(NR, Hb, H, split), 2 * H,
                       (hs, _linalg.transpose(U), rm, use_rmask, m, use_mask, dy, dh,
                        bool(go_backwards), bool(zero_output)),
                       (cr, dz, dh0))
    return dz, dh0
