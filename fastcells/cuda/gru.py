"""GRU recurrence on the GPU, both Keras variants (reset_after True and False), with the
signatures of ``fastcells.cpu.gru``.

Gate order z, r, h (G = 3); the equations of both variants (a_k, hh, q) are in
docs/design.md.

Parallel decomposition as in ``fastcells.cuda.lstm``: a block owns batch rows for the whole
sequence, a thread owns (unit j, R rows) items and computes the three gates of its unit.
reset_after=True needs one barrier per step (``syncthreads``, or the grid's when the units
are split over blocks). reset_after=False needs two: q of the whole row must be in shared
(or, split, global) memory before ``q @ U_h``. The backward takes one barrier per
step with reset_after (dz of the step, then dh_{t-1}) and two without (dah of the row, then
dq = dah @ U_h^T and the z, r gradients, then dh_{t-1}).
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

G = 3


def _forward_state(NR, Hb, H, use_rmask, reset_after, split):
    """Shared elements of a forward block's state: own h and output [NR, Hb], without
    reset_after z [NR, Hb] too; without a split, two buffers of the recurrent input
    [NH, NR, HS] and (without reset_after) q [NR, HS], which a split plan exchanges through
    global memory instead."""
    own = (2 if reset_after else 3) * NR * Hb
    if split:
        return own
    return own + (2 * (G if use_rmask else 1) + (0 if reset_after else 1)) * NR * row_stride(H)


def _forward_exchange(H, use_rmask, reset_after):
    """Elements per exchange row of a split forward: 2 x [NH, H] recurrent input, q [H]."""
    return (2 * (G if use_rmask else 1) + (0 if reset_after else 1)) * H


@kernel_variant
def _forward_kernel(dtype, R, u_shared, act, ract, fast, reset_after, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    f_act = _math.scalar_activation(act, fast)
    f_ract = _math.scalar_activation(ract, fast)
    NACC = R * G
    NA = G if reset_after else 2        # gates with recurrent terms in phase A

    @cuda.jit
    def forward(xw, U, brec, rmask, use_rmask, mask, use_mask, h0, out0, go_backwards,
                zero_output, keep_cache, rows, NR, UB, Hb, xg, XR, y, h_out, gates, hprev,
                aux):
        # xw:    [T, B, 3H]  x @ W + input bias (input dropout already applied)
        # U:     [H, 3H]     recurrent kernel
        # brec:  [3H]        recurrent bias (reset_after; zeros otherwise)
        # rmask: [3, B, H]   recurrent dropout mask per gate;  mask: [T, B]
        # h0, out0: [B, H] (out0 zero-size for zeros);  y: [T, B, H] or [1, B, H];
        # h_out: [B, H]
        # rows: batch rows per block;  NR: rows of the shared state buffers
        # UB, Hb: unit blocks per batch slice and units per block (1 and H unless split)
        # xg:    split: the global exchange buffer, 2 x [NH, XR, H] | q [XR, H]
        # cache: gates [T, B, 3H] (z, r, hh); hprev [T, B, H];
        #        aux [T, B, H] = a_h (reset_after) or q (reset_after=False), 0 where masked
        T, B, H, HS, XN, full = recurrence_dims(xw, h0, y, split, XR, NR)
        # shared: [U columns] | h, out, z [NR, Hb] | 2 x [NH, NR, HS] recurrent input,
        # q [NR, HS] (without a split; with one they are in xg)
        sm = cuda.shared.array(0, DT)
        own, outs, zsv, zsv_end, _ = state_offsets(H * G * Hb, u_shared, NR, Hb)
        hb = zsv if reset_after else zsv_end
        plane = XN * HS
        buf = (G if use_rmask else 1) * plane
        hplane = 2 * plane if use_rmask else 0         # the plane holding h * r_h
        acc = cuda.local.array(NACC, DT)
        u = cuda.local.array(G, DT)
        tid, nt, b0, n, j0, nu, items, xs, hb = begin_block(
            sm, U, u_shared, G, H, xg, split, hb, 2 * buf + (0 if reset_after else plane), HS,
            zero, rows, NR, R, B, UB, Hb, H)
        qs = hb + 2 * buf                              # q, after the recurrent input
        cuda.syncthreads()
        load_initial_state(sm, own, outs, xs, hb, plane, HS, h0, out0, rmask, use_rmask, G,
                           b0, n, j0, nu, Hb, tid, nt, zero)
        barrier()
        for s in range(T):
            t, cur, nxt = step_buffers(s, T, go_backwards, hb, buf)
            # phase A: the recurrent terms of z, r (and h with reset_after) of each item
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                gate_sums(acc, G, 0, NA, xs, cur, HS, plane, use_rmask, sm, u_shared, U, Hb, H,
                          jl, j, R, r0, u, zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        gz = NPT(f_ract(xw[t, b, j] + acc[r * G] + brec[j]))
                        gr = NPT(f_ract(xw[t, b, H + j] + acc[r * G + 1] + brec[H + j]))
                        hp = sm[own + e]
                        live = not (use_mask and not mask[t, b])
                        if keep_cache:
                            gates[t, b, j] = gz
                            gates[t, b, H + j] = gr
                            hprev[t, b, j] = hp
                        if reset_after:
                            a_h = acc[r * G + 2] + brec[2 * H + j]
                            pre = xw[t, b, 2 * H + j] + gr * a_h
                            h = hp
                            g_h = pre               # cached: hh, or the pre-activation
                            if live:
                                g_h = NPT(f_act(pre))
                                h = g_h + gz * (hp - g_h)
                            if keep_cache:
                                gates[t, b, 2 * H + j] = g_h
                                aux[t, b, j] = a_h if live else zero
                            put_step_output(sm, own, outs, e, live, h, zero_output, zero, xs,
                                            nxt, plane, HS, i, j, rmask, use_rmask, b, G, full,
                                            y, s)
                        else:
                            q = gr * xs[cur + hplane + i * HS + j]    # r * (h * r_h)
                            xs[qs + i * HS + j] = q
                            sm[zsv + e] = gz
                            if keep_cache:
                                # aux feeds the dU GEMM, where 0 * garbage could be NaN
                                aux[t, b, j] = q if live else zero
            if not reset_after:
                barrier()
                # phase B: hh = act(xw_h + q @ U_h) and the state update
                for it in range(tid, items, nt):
                    jl, j, r0 = item(it, nu, j0, R)
                    gate_sums(acc, G, 2, 1, xs, qs, HS, plane, False, sm, u_shared, U, Hb, H,
                              jl, j, R, r0, u, zero)
                    for r in range(R):
                        i, b, e = item_row(r0, r, b0, Hb, jl)
                        if i < n:
                            pre = xw[t, b, 2 * H + j] + acc[r * G]
                            hp = sm[own + e]
                            h = hp
                            g_h = pre               # cached: hh, or the pre-activation
                            live = not (use_mask and not mask[t, b])
                            if live:
                                g_h = NPT(f_act(pre))
                                h = g_h + sm[zsv + e] * (hp - g_h)
                            if keep_cache:
                                gates[t, b, 2 * H + j] = g_h
                            put_step_output(sm, own, outs, e, live, h, zero_output, zero, xs,
                                            nxt, plane, HS, i, j, rmask, use_rmask, b, G, full,
                                            y, s)
            barrier()
        store_rows(h_out, sm, own, b0, n, j0, nu, Hb, tid, nt)
        if not full:
            store_rows(y[0], sm, outs, b0, n, j0, nu, Hb, tid, nt)

    return forward


def _backward_state(NR, Hb, H, reset_after, split):
    """Shared elements of a backward block's state: own dh, carry, dh*z [NR, Hb] (and dz_z
    without reset_after); without a split, the row vectors passed between units too:
    reset_after, two buffers of the recurrent-side gradients (daz, dar, da_h) [NR, ZS];
    otherwise dah [NR, HS] and (daz, dar) [NR, ZS]. A split plan exchanges those through
    global memory instead (``_backward_exchange`` elements per row)."""
    own = (3 if reset_after else 4) * NR * Hb
    if split:
        return own
    if reset_after:
        return own + 2 * NR * row_stride(G * H)
    return own + NR * row_stride(H) + NR * row_stride(2 * H)


def _backward_exchange(H, reset_after):
    return 2 * G * H if reset_after else 3 * H


# Backward per processed step, dh the gradient reaching h_t (state and output): the GRU
# derivation in docs/design.md, in its symbols (dz, dah, dr, dq, daz, dar, da_h).
# Outputs: dz [T, B, 3H] = (daz, dar, dah), the gradient of the input-side pre-activations,
# and dah_rec [T, B, H] = da_h (reset_after only), the gradient of the recurrent h term.
# Masked steps pass dh through and have dz = 0; output gradients as in lstm.py (carry).
@kernel_variant
def _backward_kernel(dtype, R, u_shared, act, ract, reset_after, split):
    DT, NPT, zero, barrier = kernel_constants(dtype, split)
    d_act = _math.scalar_derivative(act)
    d_ract = _math.scalar_derivative(ract)
    NACC = R * G
    NK = G if reset_after else 2        # gates whose gradients reach h_{t-1} through U^T

    @cuda.jit
    def backward(gates, hprev, aux, UT, rmask, use_rmask, mask, use_mask, dy, dh_in,
                 go_backwards, zero_output, rows, NR, UB, Hb, xg, XR, carry_io, dz, dah_rec,
                 dh0):
        # gates, hprev, aux: the forward cache, [T, B, .];  UT: [3H, H] U transposed
        # rmask: [3, B, H];  mask: [T, B];  dy: [T, B, H] or [1, B, H];  dh_in: [B, H]
        # carry_io: [B, H] in/out pending output gradient (chunks)
        # dz: [T, B, 3H] out;  dah_rec: [T, B, H] out (reset_after);  dh0: [B, H] out
        # UB, Hb, xg, XR: as in the forward (xg exchanges the row vectors below)
        T, B, H, HS, XN, full = recurrence_dims(gates, dh_in, dy, split, XR, NR)
        GH = G * H
        # shared: [U^T columns] | dh, carry, dh*z (, dz_z) [NR, Hb] | the row vectors passed
        # between units (without a split; with one they are in xg, XR rows):
        #   reset_after: 2 x (daz, dar, da_h) [NR, ZS];  otherwise dah [NR, HS] | (daz, dar)
        #   [NR, ZS]
        sm = cuda.shared.array(0, DT)
        dhs, car, dhz, dzz, dzz_end = state_offsets(GH * Hb, u_shared, NR, Hb)
        xb = dzz if reset_after else dzz_end
        ZS = (GH if reset_after else 2 * H) | (0 if split else 1)
        zbuf = XN * ZS
        # dah (without reset_after) first
        tid, nt, b0, n, j0, nu, items, xs, dab = begin_block(
            sm, UT, u_shared, 1, 0, xg, split, xb, zbuf * 2 if reset_after else NR * HS + zbuf,
            HS, zero, rows, NR, R, B, UB, Hb, H)
        acc = cuda.local.array(NACC, DT)
        # then (daz, dar[, da_h]), two of them with reset_after
        zb0 = (0 if reset_after else XN * HS) + (b0 * ZS if split else xb)
        load_backward_state(sm, dhs, dh_in, car, carry_io, b0, n, j0, nu, Hb, tid, nt)
        cuda.syncthreads()
        for s in range(T - 1, -1, -1):
            # the buffer of the recurrent-side gradients this step (one without reset_after)
            t, zb, _ = step_buffers(s, T, go_backwards, zb0, zbuf if reset_after else 0)
            # phase 1: dz, dah (and with reset_after da_h) of the thread's items
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        cr = output_grad(sm, car, e, dy, full, s, T, b, j)
                        if use_mask and not mask[t, b]:
                            if reset_after:
                                dah_rec[t, b, j] = zero
                                masked_step_grad(dz, t, b, j, H, G, xs, zb + i * ZS, G, sm, car,
                                                 e, cr, zero_output, zero)
                            else:
                                masked_step_grad(dz, t, b, j, H, G, xs, dab + i * HS, 1, sm,
                                                 car, e, cr, zero_output, zero)
                        else:
                            dhj = sm[dhs + e] + cr
                            sm[car + e] = zero
                            gz = gates[t, b, j]
                            gr = gates[t, b, H + j]
                            hh = gates[t, b, 2 * H + j]
                            d_z = dhj * (hprev[t, b, j] - hh)
                            dah = NPT(d_act(dhj - dhj * gz, hh))
                            sm[dhz + e] = dhj * gz
                            dz[t, b, 2 * H + j] = dah
                            if reset_after:
                                daz = NPT(d_ract(d_z, gz))
                                dar = NPT(d_ract(dah * aux[t, b, j], gr))
                                drh = dah * gr
                                dz[t, b, j] = daz
                                dz[t, b, H + j] = dar
                                dah_rec[t, b, j] = drh
                                xs[zb + i * ZS + j] = daz
                                xs[zb + i * ZS + H + j] = dar
                                xs[zb + i * ZS + 2 * H + j] = drh
                            else:
                                xs[dab + i * HS + j] = dah
                                sm[dzz + e] = d_z
            barrier()
            if not reset_after:
                # phase 2: dq = dah @ U_h^T, then dr, daz, dar and the direct dh_{t-1} terms
                for it in range(tid, items, nt):
                    jl, j, r0 = item(it, nu, j0, R)
                    transposed_sums(acc, G, 1, H, 2 * H, xs, dab, HS, sm, u_shared, UT, Hb, jl,
                                    j, R, r0, zero)
                    for r in range(R):
                        i, b, e = item_row(r0, r, b0, Hb, jl)
                        if i < n:
                            if use_mask and not mask[t, b]:
                                xs[zb + i * ZS + j] = zero
                                xs[zb + i * ZS + H + j] = zero
                            else:
                                dq = acc[r * G]
                                gr = gates[t, b, H + j]
                                if use_rmask:
                                    rh = rmask[2, b, j]
                                    d_r = dq * (hprev[t, b, j] * rh)
                                    sm[dhz + e] += dq * gr * rh
                                else:
                                    d_r = dq * hprev[t, b, j]
                                    sm[dhz + e] += dq * gr
                                daz = NPT(d_ract(sm[dzz + e], gates[t, b, j]))
                                dar = NPT(d_ract(d_r, gr))
                                dz[t, b, j] = daz
                                dz[t, b, H + j] = dar
                                xs[zb + i * ZS + j] = daz
                                xs[zb + i * ZS + H + j] = dar
                barrier()
            # last phase: dh_{t-1} = dh * z (+ dq terms) + sum_k (da_k @ U_k^T) * r_k
            for it in range(tid, items, nt):
                jl, j, r0 = item(it, nu, j0, R)
                if use_rmask or not reset_after:
                    transposed_sums(acc, G, NK, H, 0, xs, zb, ZS, sm, u_shared, UT, Hb, jl, j,
                                    R, r0, zero)
                else:
                    transposed_sums(acc, G, 1, GH, 0, xs, zb, ZS, sm, u_shared, UT, Hb, jl, j,
                                    R, r0, zero)
                for r in range(R):
                    i, b, e = item_row(r0, r, b0, Hb, jl)
                    if i < n:
                        if not (use_mask and not mask[t, b]):
                            if use_rmask or not reset_after:
                                v = sm[dhz + e]
                                for k in range(NK):
                                    if use_rmask:
                                        v += acc[r * G + k] * rmask[k, b, j]
                                    else:
                                        v += acc[r * G + k]
                            else:
                                v = acc[r * G] + sm[dhz + e]
                            sm[dhs + e] = v
        cuda.syncthreads()
        store_rows(dh0, sm, dhs, b0, n, j0, nu, Hb, tid, nt)
        store_rows(carry_io, sm, car, b0, n, j0, nu, Hb, tid, nt)

    return backward


def forward(xw, U, brec, rmask, mask, h0, act, ract, reset_after, go_backwards, zero_output,
            return_sequences, keep_cache, fast, coef, out0=None):
    """Run the GRU recurrence (time-major device arrays). Returns ``y, h, cache`` with
    ``cache = (gates, hprev, aux)``; ``coef`` is accepted for parity with the CPU driver
    (unused); ``out0`` as in ``lstm.forward``."""
    xw, U, brec, h0 = (_linalg.to_device(a) for a in (xw, U, brec, h0))
    T, B, _ = xw.shape
    H = h0.shape[1]
    dt = np.dtype(xw.dtype)
    y, h = outputs(T, B, H, dt, return_sequences, 1)
    gates, hprev, aux = cache_arrays(keep_cache, T, B, (G * H, H, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 3, mask, dt)
    o0 = initial_output(out0, B, H, dt)
    ra = bool(reset_after)
    if B:
        run_recurrence(_forward_kernel, (int(act), int(ract), bool(fast), ra), B, H, dt, G * H,
                       lambda NR, Hb, split: _forward_state(NR, Hb, H, use_rmask, ra, split),
                       _forward_exchange(H, use_rmask, ra),
                       (xw, U, brec, rm, use_rmask, m, use_mask, h0, o0, bool(go_backwards),
                        bool(zero_output), bool(keep_cache)),
                       (y, h, gates, hprev, aux))
    return y, h, ((gates, hprev, aux) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, ract, reset_after, go_backwards, zero_output,
             carry=None):
    """Backward recurrence (time-major device arrays). Returns ``dz [T, B, 3H], dah_rec or
    None, dh0``; ``carry`` as in ``lstm.backward``."""
    gates, hprev, aux = cache
    U, dy, dh = (_linalg.to_device(a) for a in (U, dy, dh))
    T, B, _ = gates.shape
    H = U.shape[0]
    dt = np.dtype(gates.dtype)
    ra = bool(reset_after)
    dz = _linalg.empty((T, B, G * H), dt)
    dah_rec = _linalg.empty((T, B, H) if ra else (0, 0, 0), dt)
    dh0 = _linalg.empty((B, H), dt)
    rm, use_rmask, m, use_mask = masks(rmask, 3, mask, dt)
    cr = pending_carry(carry, B, H, dt)
    if B:
        run_recurrence(_backward_kernel, (int(act), int(ract), ra), B, H, dt, G * H,
                       lambda NR, Hb, split: _backward_state(NR, Hb, H, ra, split),
                       _backward_exchange(H, ra),
                       (gates, hprev, aux, _linalg.transpose(U), rm, use_rmask, m, use_mask,
                        dy, dh, bool(go_backwards), bool(zero_output)),
                       (cr, dz, dah_rec, dh0))
    return dz, (dah_rec if ra else None), dh0
