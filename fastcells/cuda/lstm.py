"""LSTM recurrence on the GPU: persistent numba-cuda kernels (one launch per sequence) and
their drivers, with the signatures of ``fastcells.cpu.lstm``.

Parallel decomposition. Rows of a batch never interact inside a recurrence, so block k
owns batch rows [k*rows, (k+1)*rows) for the whole sequence and blocks never synchronise
with each other. Inside a block, a thread takes items (unit j, group of R rows) and for
each computes the four gate pre-activations of unit j, ``z[., k*H + j] = h @ U[:, k*H + j]``,
with 4*R sums in registers, then the cell update of (row, j): the gates of a unit never
leave the thread. The recurrent input h (or h * r_k per gate with recurrent dropout) is
double-buffered in shared memory, so a step needs one ``syncthreads``. U stays in shared
memory when it fits (see ``fastcells.cuda._common`` for the launch shape and the limits),
and is read from global memory (L2) otherwise. The backward does the same with the step's
gate gradients dz double-buffered in shared memory and U^T. From ``CUDA_SPLIT_MIN_UNITS``
units a block owns a slice of the units as well (its columns of U), h and dz pass between
blocks through a global exchange buffer, and the step's barrier is the grid's (``split``;
see ``fastcells.cuda._common``).

Only the recurrence lives here; the input projection and the weight gradients are GEMMs in
``fastcells.cuda._linalg``. Layouts are those of the CPU side: time-major ``[T, B, ...]``,
time-aligned arrays (xw, mask, the cache, dz) indexed by input time t, outputs y and dy by
processing step s (t = T-1-s with go_backwards). Every sum runs in a fixed order, so the
results do not depend on the launch shape.

Shapes: B batch, T time steps, H units, G = 4 gates in Keras order i, f, c, o.
"""
import numpy as np
from numba import cuda

from .. import _math
from . import _linalg
from ._common import (begin_block, cache_arrays, gate_sums, initial_output, item, item_row,
                      kernel_constants, kernel_variant, load_backward_state,
                      load_initial_state, load_rows, masked_step_grad, masks, output_grad,
                      outputs, pending_carry, put_step_output, recurrence_dims, row_stride,
                      run_recurrence, state_offsets, step_buffers, store_rows, transposed_sums)

G = 4


def _forward_state(NR, Hb, H, use_rmask, split):
    """Shared elements of a forward block's state: own h, c and output [NR, Hb]; without a
    split, two buffers of the recurrent input ([NH, NR, HS]: h, or h * r_k per gate) too
    (a split plan exchanges it through global memory)."""
    nh = G if use_rmask else 1
    return 3 * NR * Hb + (0 if split else 2 * nh * NR * row_stride(H))


def _forward_exchange(use_rmask):
    """Elements per exchange row of a split forward: two [NH, H] buffers of the recurrent
    input (the row's length H is passed at the launch)."""
    return 2 * (G if use_rmask else 1)


@kernel_variant
def _forward_kernel(dtype, R, u_shared, act, ract, fast, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    f_act = _math.scalar_activation(act, fast)
    f_ract = _math.scalar_activation(ract, fast)
    NACC = R * G

    @cuda.jit
    def forward(xw, U, rmask, use_rmask, mask, use_mask, h0, c0, out0, go_backwards,
                zero_output, keep_cache, rows, NR, UB, Hb, xg, XR, y, h_out, c_out, gates,
                hprev, cprev, actc):
        # xw:     [T, B, 4H]  x @ W + b (input dropout already applied)
        # U:      [H, 4H]     recurrent kernel
        # rmask:  [4, B, H]   recurrent dropout mask per gate (used when ``use_rmask``)
        # mask:   [T, B]      True where the step is processed (used when ``use_mask``)
        # h0, c0: [B, H]      initial states
        # out0:   [B, H]      the output before the first step (what a masked step repeats);
        #                     zero-size for zeros
        # rows:   batch rows per block;  NR: rows of the shared state buffers (R | NR)
        # UB, Hb: unit blocks per batch slice and units per block (1 and H unless split)
        # xg:     split: the global exchange buffer, 2 x [NH, XR, H]
        # y:      [T, B, H] or [1, B, H] (last output only), in processing order
        # h_out, c_out: [B, H] final states
        # cache (keep_cache): gates [T, B, 4H] post-activation; hprev, cprev [T, B, H] the
        #   states entering step t; actc [T, B, H] = act(c_t)
        T, B, H, HS, XN, full = recurrence_dims(xw, h0, y, split, XR, NR)
        # shared memory: [U columns] | own h, c, out [NR, Hb] | 2 x [NH, NR, HS] recurrent
        # input (without a split; with one it is xg, [NH, XR, H] per step parity)
        sm = cuda.shared.array(0, DT)
        own, cs, outs, rin, _ = state_offsets(H * G * Hb, u_shared, NR, Hb)
        plane = XN * HS
        buf = (G if use_rmask else 1) * plane
        acc = cuda.local.array(NACC, DT)
        u = cuda.local.array(G, DT)
        tid, nt, b0, n, j0, nu, items, xs, rin = begin_block(
            sm, U, u_shared, G, H, xg, split, rin, 2 * buf, H, zero, rows, NR, R, B, UB, Hb, H)
        cuda.syncthreads()
        load_initial_state(sm, own, outs, xs, rin, plane, HS, h0, out0, rmask, use_rmask, G,
                           b0, n, j0, nu, Hb, tid, nt, zero)
        load_rows(sm, cs, c0, b0, n, j0, nu, Hb, tid, nt)
        barrier()
        for s in range(T):
            t, cur, nxt = step_buffers(s, T, go_backwards, rin, buf)
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                # z[r, k] = sum_l hin_k[r0 + r, l] * U[l, k*H + j]
                gate_sums(acc, G, 0, G, xs, cur, HS, plane, use_rmask, sm, u_shared, U, Hb, H,
                          jl, j, R, r0, u, zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        gi = NPT(f_ract(xw[t, b, j] + acc[r * G]))
                        gf = NPT(f_ract(xw[t, b, H + j] + acc[r * G + 1]))
                        gc = NPT(f_act(xw[t, b, 2 * H + j] + acc[r * G + 2]))
                        go = NPT(f_ract(xw[t, b, 3 * H + j] + acc[r * G + 3]))
                        hp = sm[own + e]
                        cp = sm[cs + e]
                        if keep_cache:
                            gates[t, b, j] = gi
                            gates[t, b, H + j] = gf
                            gates[t, b, 2 * H + j] = gc
                            gates[t, b, 3 * H + j] = go
                            hprev[t, b, j] = hp
                            cprev[t, b, j] = cp
                        h = hp
                        # a masked step keeps the state; the output repeats (or is zero)
                        live = not (use_mask and not mask[t, b])
                        if live:
                            c = gf * cp + gi * gc
                            a = NPT(f_act(c))
                            h = go * a
                            sm[cs + e] = c
                            if keep_cache:
                                actc[t, b, j] = a
                        put_step_output(sm, own, outs, e, live, h, zero_output, zero, xs, nxt,
                                        plane, HS, i, j, rmask, use_rmask, b, G, full, y, s)
            barrier()
        store_rows(h_out, sm, own, b0, n, j0, nu, Hb, tid, nt)
        store_rows(c_out, sm, cs, b0, n, j0, nu, Hb, tid, nt)
        if not full:
            store_rows(y[0], sm, outs, b0, n, j0, nu, Hb, tid, nt)

    return forward


def _backward_state(NR, Hb, H, split):
    """Shared elements of a backward block's state: own dh, dc and pending output gradient
    [NR, Hb]; without a split, two buffers of the step's gate gradients [NR, ZS] too."""
    return 3 * NR * Hb + (0 if split else 2 * NR * row_stride(G * H))


# Backward, per processed step t: the LSTM derivation in docs/design.md (dh, dc the
# gradients reaching h_t and c_t; dz_k the gate pre-activation gradients, then
# dh_{t-1} = sum_k (dz_k @ U_k^T) * r_k). A masked step passes dh and dc through with dz = 0;
# the output gradient of a masked step flows to the previous output, tracked by ``carry``.
# Phase 1 of a step computes dz for the thread's (row, unit) items, phase 2 (after one
# syncthreads) dh_{t-1} for the same items from every dz of the row.
@kernel_variant
def _backward_kernel(dtype, R, u_shared, act, ract, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    d_act = _math.scalar_derivative(act)
    d_ract = _math.scalar_derivative(ract)
    NACC = R * G

    @cuda.jit
    def backward(gates, cprev, actc, UT, rmask, use_rmask, mask, use_mask, dy, dh_in, dc_in,
                 go_backwards, zero_output, rows, NR, UB, Hb, xg, XR, carry_io, dz, dh0, dc0):
        # gates, cprev, actc: the forward cache (see the forward kernel), [T, B, .]
        # UT:    [4H, H]    U transposed
        # rmask: [4, B, H]  recurrent dropout mask per gate;  mask: [T, B]
        # dy:    [T, B, H] or [1, B, H] (gradient of the last output only), processing order
        # dh_in, dc_in: [B, H] gradients of the final states
        # carry_io: [B, H]  in/out: output gradient pending for the previous output (chunks)
        # dz:    [T, B, 4H] out: gradient of the gate pre-activations
        # UB, Hb: unit blocks per batch slice and units per block (1 and H unless split)
        # xg:    split: the global exchange buffer of dz, 2 x [XR, 4H]
        # dh0, dc0: [B, H] out: gradients of the initial states
        T, B, H, _, XN, full = recurrence_dims(gates, dh_in, dy, split, XR, NR)
        GH = G * H
        ZS = GH if split else GH | 1
        # shared memory: [U^T columns] | dh, dc, carry [NR, Hb] | 2 x dz [NR, ZS] (without a
        # split; with one, dz rows are exchanged through xg, [XR, ZS] per step parity)
        sm = cuda.shared.array(0, DT)
        dhs, dcs, car, zb, _ = state_offsets(GH * Hb, u_shared, NR, Hb)
        zbuf = XN * ZS
        acc = cuda.local.array(NACC, DT)
        tid, nt, b0, n, j0, nu, items, xs, zb = begin_block(
            sm, UT, u_shared, 1, 0, xg, split, zb, 2 * zbuf, ZS, zero, rows, NR, R, B, UB, Hb, H)
        load_backward_state(sm, dhs, dh_in, car, carry_io, b0, n, j0, nu, Hb, tid, nt)
        load_rows(sm, dcs, dc_in, b0, n, j0, nu, Hb, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            t, cur, _ = step_buffers(s, T, go_backwards, zb, zbuf)
            # phase 1: dz of the thread's items
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        zr = cur + i * ZS
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            masked_step_grad(dz, t, b, j, H, G, xs, zr, G, sm, car, e, cr,
                                             zero_output, zero)
                        else:
                            dhj = sm[dhs + e] + cr
                            sm[car + e] = zero
                            gi = gates[t, b, j]
                            gf = gates[t, b, H + j]
                            gc = gates[t, b, 2 * H + j]
                            go = gates[t, b, 3 * H + j]
                            a = actc[t, b, j]
                            do = dhj * a
                            dc = sm[dcs + e] + NPT(d_act(dhj * go, a))
                            di = NPT(d_ract(dc * gc, gi))
                            df = NPT(d_ract(dc * cprev[t, b, j], gf))
                            dg = NPT(d_act(dc * gi, gc))
                            do = NPT(d_ract(do, go))
                            sm[dcs + e] = dc * gf
                            dz[t, b, j] = di
                            dz[t, b, H + j] = df
                            dz[t, b, 2 * H + j] = dg
                            dz[t, b, 3 * H + j] = do
                            xs[zr + j] = di
                            xs[zr + H + j] = df
                            xs[zr + 2 * H + j] = dg
                            xs[zr + 3 * H + j] = do
            barrier()
            # phase 2: dh_{t-1}[., j] = sum_k (dz_k @ U_k^T)[., j] * r_k[., j]
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                if use_rmask:
                    transposed_sums(acc, G, G, H, 0, xs, cur, ZS, sm, u_shared, UT, Hb, jl, j,
                                    R, r0, zero)
                else:
                    transposed_sums(acc, G, 1, GH, 0, xs, cur, ZS, sm, u_shared, UT, Hb, jl, j,
                                    R, r0, zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        if not (use_mask and not mask[t, b]):
                            if use_rmask:
                                v = zero
                                for k in range(G):
                                    v += acc[r * G + k] * rmask[k, b, j]
                            else:
                                v = acc[r * G]
                            sm[dhs + i * Hb + jl] = v
        cuda.syncthreads()
        store_rows(dh0, sm, dhs, b0, n, j0, nu, Hb, tid, nt)
        store_rows(dc0, sm, dcs, b0, n, j0, nu, Hb, tid, nt)
        store_rows(carry_io, sm, car, b0, n, j0, nu, Hb, tid, nt)

    return backward


def forward(xw, U, rmask, mask, h0, c0, act, ract, go_backwards, zero_output,
            return_sequences, keep_cache, fast, coef, out0=None):
    """Run the LSTM recurrence over the batch (time-major device arrays, see above).

    Returns ``y, h, c, cache`` with ``cache = (gates, hprev, cprev, actc)`` (or None when
    ``keep_cache`` is False). ``coef`` (``_math.gate_coefficients``) is accepted for parity
    with the CPU driver and not needed: each thread's gates have fixed activations, compiled
    in. ``out0`` [B, H] is the output before the first step (zeros when None).

    Example::

        xw = _linalg.project(_linalg.time_major(x), W, b, None, 4)
        y, h, c, cache = forward(xw, U, None, None, h0, c0, TANH, SIGMOID, False, False,
                                 True, True, True, None)
    """
    xw, U, h0, c0 = (_linalg.to_device(a) for a in (xw, U, h0, c0))
    T, B, _ = xw.shape
    H = h0.shape[1]
    dt = np.dtype(xw.dtype)
    y, h, c = outputs(T, B, H, dt, return_sequences, 2)
    gates, hprev, cprev, actc = cache_arrays(keep_cache, T, B, (G * H, H, H, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 3, mask, dt)
    o0 = initial_output(out0, B, H, dt)
    if B:
        run_recurrence(_forward_kernel, (int(act), int(ract), bool(fast)), B, H, dt, G * H,
                       lambda NR, Hb, split: _forward_state(NR, Hb, H, use_rmask, split),
                       _forward_exchange(use_rmask) * H,
                       (xw, U, rm, use_rmask, m, use_mask, h0, c0, o0, bool(go_backwards),
                        bool(zero_output), bool(keep_cache)),
                       (y, h, c, gates, hprev, cprev, actc))
    return y, h, c, ((gates, hprev, cprev, actc) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, dc, act, ract, go_backwards, zero_output,
             carry=None):
    """``fastcells.cpu.lstm.backward`` on device arrays: ``dz [T, B, 4H], dh0, dc0``, with
    ``carry`` read and updated in place when given."""
    gates, hprev, cprev, actc = cache
    U, dy, dh, dc = (_linalg.to_device(a) for a in (U, dy, dh, dc))
    T, B, _ = gates.shape
    H = U.shape[0]
    dt = np.dtype(gates.dtype)
    dz = _linalg.empty((T, B, G * H), dt)
    dh0 = _linalg.empty((B, H), dt)
    dc0 = _linalg.empty((B, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 3, mask, dt)
    cr = pending_carry(carry, B, H, dt)
    if B:
        run_recurrence(_backward_kernel, (int(act), int(ract)), B, H, dt, G * H,
                       lambda NR, Hb, split: _backward_state(NR, Hb, H, split), 2 * G * H,
                       (gates, cprev, actc, _linalg.transpose(U), rm, use_rmask, m, use_mask,
                        dy, dh, dc, bool(go_backwards), bool(zero_output)),
                       (cr, dz, dh0, dc0))
    return dz, dh0, dc0
