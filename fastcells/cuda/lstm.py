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
from ._common import (IDX, begin_block, cache_arrays, exchange_buffer,
                      initial_output, kernel_variant, launch, load_initial_state, load_rows,
                      masks, numba_type, output_grad, outputs, pending_carry, plan,
                      put_recurrent_input, row_stride, step_barrier, store_rows)

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
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    f_act = _math.scalar_activation(act, fast)
    f_ract = _math.scalar_activation(ract, fast)
    NACC = R * G
    barrier = step_barrier(split)

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
        T = xw.shape[0]
        B = h0.shape[0]
        H = h0.shape[1]
        GHb = G * Hb
        full = y.shape[0] == T
        # shared memory: [U columns] | own h, c, out [NR, Hb] | 2 x [NH, NR, HS] recurrent
        # input (without a split; with one it is xg, [NH, XR, H] per step parity)
        sm = cuda.shared.array(0, DT)
        own = H * GHb if u_shared else 0
        cs = own + NR * Hb
        outs = cs + NR * Hb
        rin = outs + NR * Hb
        HS = H if split else H | 1
        plane = XR * H if split else NR * HS
        buf = (G if use_rmask else 1) * plane
        acc = cuda.local.array(NACC, DT)
        tid, nt, b0, n, j0, nu, items, xs, rin = begin_block(
            sm, U, u_shared, G, H, xg, split, rin, 2 * buf, H, zero, rows, NR, R, B, UB, Hb, H)
        cuda.syncthreads()
        load_initial_state(sm, own, outs, xs, rin, plane, HS, h0, out0, rmask, use_rmask, G,
                           b0, n, j0, nu, Hb, tid, nt, zero)
        load_rows(sm, cs, c0, b0, n, j0, nu, Hb, tid, nt)
        barrier()
        for s in range(T):
            t = T - 1 - s if go_backwards else s
            cur = rin + (s % 2) * buf
            nxt = rin + ((s + 1) % 2) * buf
            for it in range(tid, items, nt):
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                # z[r, k] = sum_l hin_k[r0 + r, l] * U[l, k*H + j]
                for q in range(NACC):
                    acc[q] = zero
                for l in range(H):
                    if u_shared:
                        p = l * GHb + jl
                        u0 = sm[IDX(p)]
                        u1 = sm[IDX(p + Hb)]
                        u2 = sm[IDX(p + 2 * Hb)]
                        u3 = sm[IDX(p + 3 * Hb)]
                    else:
                        lu = IDX(l)
                        u0 = U[lu, IDX(j)]
                        u1 = U[lu, IDX(H + j)]
                        u2 = U[lu, IDX(2 * H + j)]
                        u3 = U[lu, IDX(3 * H + j)]
                    if use_rmask:
                        for r in range(R):
                            p = cur + (r0 + r) * HS + l
                            acc[r * G] += xs[IDX(p)] * u0
                            acc[r * G + 1] += xs[IDX(p + plane)] * u1
                            acc[r * G + 2] += xs[IDX(p + 2 * plane)] * u2
                            acc[r * G + 3] += xs[IDX(p + 3 * plane)] * u3
                    else:
                        for r in range(R):
                            hv = xs[IDX(cur + (r0 + r) * HS + l)]
                            acc[r * G] += hv * u0
                            acc[r * G + 1] += hv * u1
                            acc[r * G + 2] += hv * u2
                            acc[r * G + 3] += hv * u3
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * Hb + jl
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
                        if use_mask and not mask[t, b]:
                            # masked step: the state is kept, the output repeats (or is zero)
                            if zero_output:
                                sm[outs + e] = zero
                        else:
                            c = gf * cp + gi * gc
                            a = NPT(f_act(c))
                            h = go * a
                            sm[cs + e] = c
                            sm[own + e] = h
                            sm[outs + e] = h
                            if keep_cache:
                                actc[t, b, j] = a
                        put_recurrent_input(xs, nxt, plane, HS, i, j, h, rmask, use_rmask, b, G)
                        if full:
                            y[s, b, j] = sm[outs + e]
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
    DT = numba_type(dtype)
    NPT = np.dtype(dtype).type
    zero = NPT(0)
    d_act = _math.scalar_derivative(act)
    d_ract = _math.scalar_derivative(ract)
    NACC = R * G
    barrier = step_barrier(split)

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
        T = gates.shape[0]
        B = dh_in.shape[0]
        H = dh_in.shape[1]
        GH = G * H
        ZS = GH if split else GH | 1
        full = dy.shape[0] == T
        # shared memory: [U^T columns] | dh, dc, carry [NR, Hb] | 2 x dz [NR, ZS] (without a
        # split; with one, dz rows are exchanged through xg, [XR, ZS] per step parity)
        sm = cuda.shared.array(0, DT)
        dhs = GH * Hb if u_shared else 0
        dcs = dhs + NR * Hb
        car = dcs + NR * Hb
        zb = car + NR * Hb
        zbuf = XR * ZS if split else NR * ZS
        acc = cuda.local.array(NACC, DT)
        tid, nt, b0, n, j0, nu, items, xs, zb = begin_block(
            sm, UT, u_shared, 1, 0, xg, split, zb, 2 * zbuf, ZS, zero, rows, NR, R, B, UB, Hb, H)
        load_rows(sm, dhs, dh_in, b0, n, j0, nu, Hb, tid, nt)
        load_rows(sm, dcs, dc_in, b0, n, j0, nu, Hb, tid, nt)
        load_rows(sm, car, carry_io, b0, n, j0, nu, Hb, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if go_backwards else s
            cur = zb + (s % 2) * zbuf
            # phase 1: dz of the thread's items
            for it in range(tid, items, nt):
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
                        e = i * Hb + jl
                        zr = cur + i * ZS
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            for k in range(G):
                                dz[t, b, k * H + j] = zero
                                xs[zr + k * H + j] = zero
                            sm[car + e] = zero if zero_output else cr
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
                jl = it % nu
                j = j0 + jl
                r0 = (it // nu) * R
                for q in range(NACC):
                    acc[q] = zero
                if use_rmask:
                    for k in range(G):
                        for l in range(H):
                            col = k * H + l
                            u = sm[IDX(col * Hb + jl)] if u_shared else UT[IDX(col), IDX(j)]
                            for r in range(R):
                                acc[r * G + k] += xs[IDX(cur + (r0 + r) * ZS + col)] * u
                else:
                    for col in range(GH):
                        u = sm[IDX(col * Hb + jl)] if u_shared else UT[IDX(col), IDX(j)]
                        for r in range(R):
                            acc[r * G] += xs[IDX(cur + (r0 + r) * ZS + col)] * u
                for r in range(R):
                    i = r0 + r
                    if i < n:
                        b = b0 + i
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
        p = plan(B, H, dt, G * H,
                 lambda NR, Hb, split: _forward_state(NR, Hb, H, use_rmask, split))
        kern = _forward_kernel(dt.str, p.R, p.u_shared, int(act), int(ract), bool(fast),
                               p.split)
        xg = exchange_buffer(p, _forward_exchange(use_rmask) * H, dt)
        launch(kern, p, xw, U, rm, use_rmask, m, use_mask, h0, c0, o0, bool(go_backwards),
               bool(zero_output), bool(keep_cache), p.rows, p.padded_rows, p.unit_blocks,
               p.block_units, xg, p.exchange_rows, y, h, c, gates, hprev, cprev, actc)
    return y, h, c, ((gates, hprev, cprev, actc) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, dc, act, ract, go_backwards, zero_output,
             carry=None):
    """Backward recurrence (time-major device arrays). Returns ``dz [T, B, 4H], dh0, dc0``.

    ``carry`` [B, H], when given, is read and updated in place: the output gradient that
    flows through masked steps to the output before the first step (chunked backward)."""
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
        UT = _linalg.transpose(U)
        p = plan(B, H, dt, G * H, lambda NR, Hb, split: _backward_state(NR, Hb, H, split))
        kern = _backward_kernel(dt.str, p.R, p.u_shared, int(act), int(ract), p.split)
        xg = exchange_buffer(p, 2 * G * H, dt)
        launch(kern, p, gates, cprev, actc, UT, rm, use_rmask, m, use_mask, dy, dh, dc,
               bool(go_backwards), bool(zero_output), p.rows, p.padded_rows, p.unit_blocks,
               p.block_units, xg, p.exchange_rows, cr, dz, dh0, dc0)
    return dz, dh0, dc0
