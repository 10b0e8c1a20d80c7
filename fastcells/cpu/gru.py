"""GRU recurrence on the CPU, both Keras variants (reset_after True and False).

Gate order z, r, h (G = 3); the equations of both variants (a_k, hh, q) are in
docs/design.md.
Same conventions (time-major arrays) as ``fastcells.cpu.lstm``.
"""
import numpy as np
from numba import njit

from .. import config
from .._math import SIGMOID, TANH, activate, activate_grad, fast_tanh
from .._workspace import workspace
from ..config import NJIT_OPTIONS
from ._common import (add_rows, add_window_product, copy_row, copy_rows, dx_window, flush_window,
                      forward_outputs, initial_output, masked_row, optional, output_grad_step,
                      pending_carry, stage_buffer, staged_inputs, step_inputs, step_projection,
                      store_backward_block, store_final, store_output, take_pending, window_row)
from ._gemm import pack, pack_stack, packed_dot, strip_columns
from ._borrow import borrowed, keep_alive
from ._jit import kernel
from ._fpstate import flush_denormals, restore
from ._parallel import run_block_parallel
from .lstm import split_gates

G = 3


@kernel
def _forward_kernel(b0, b1, T, xw, x, t_off, stage, Wb, dmask, use_dmask, from_x, U, Ug, brec,
                    rmask, use_rmask, mask, use_mask, h0, act, ract, fast, coef, fused,
                    reset_after, go_backwards, zero_output, keep_cache, out0, y, h_out, gates,
                    hprev, aux):
    # xw:    [T, B, 3H]  x @ W + input bias (input dropout already applied), unless from_x:
    # x:     [B, Tx, D]  batch-major input, step t reads x[:, t_off + t] (copied ``stage``
    #        bytes at a time, see _common.staged_inputs); with Wb = [W; b_in]
    #        ([D + 1, 3H]) and dmask [B, D] the projection is made inside the step
    # U:     [H, 3H]     recurrent kernel (used without recurrent dropout)
    # Ug:    [3, H, H]   recurrent kernel split per gate
    #        (Wb, U, Ug packed by _gemm.pack / pack_stack)
    # brec:  [3H]        recurrent bias (reset_after; zeros otherwise)
    # rmask: [3, B, H]   recurrent dropout mask per gate
    # mask:  [T, B];  h0: [B, H];  y: [T, B, H] or [1, B, H];  h_out: [B, H]
    # coef:  [3, 2H]     z, r gates as tanh(a x) * s + o, used when ``fused``
    # cache: gates [T, B, 3H] (z, r, hh); hprev [T, B, H];
    #        aux [T, B, H] = a_h (reset_after) or q (reset_after=False)
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    xw, x, Wb, dmask, U, Ug, brec, rmask, mask, coef, y, gates, hprev, aux = borrowed(
        (xw, x, Wb, dmask, U, Ug, brec, rmask, mask, coef, y, gates, hprev, aux))
    n = b1 - b0
    H = h0.shape[1]
    full = y.shape[0] == T
    dt = y.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (h0[b0:b1].copy(), out0[b0:b1].copy(), np.empty((n, G * H), dt),
           np.empty((n, G * H), dt), np.empty((n, G * H), dt), np.empty((n, H), dt),
           np.empty((n, H), dt), np.empty((n, H), dt), stage_buffer(x, n, T, stage, True))
    h, out, xs, rec, g_scratch, hr, zk, q, xst = borrowed(own)
    res = out if use_mask else h    # the output rows
    ca, cs, co = coef[0], coef[1], coef[2]
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        # recurrent terms of z and r (and of h when reset_after)
        if use_rmask:
            for k in range(G if reset_after else 2):
                for i in range(n):
                    for j in range(H):
                        hr[i, j] = h[i, j] * rmask[k, b0 + i, j]
                packed_dot(hr, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        rec[i, k * H + j] = zk[i, j]
        elif reset_after:
            packed_dot(h, U, rec)
        else:
            for k in range(2):
                packed_dot(h, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        rec[i, k * H + j] = zk[i, j]
        if keep_cache:
            g, off = gates[t], b0
            copy_rows(hprev[t, b0:b1], h)
        else:
            g, off = g_scratch, 0
        xt, xo = step_projection(from_x, xw, t, x, t_off, T, s, b0, go_backwards, xst, dmask,
                                 use_dmask, Wb, xs)
        # z and r for every row (masked rows too: branch-free, results unused)
        for i in range(n):
            gi = g[off + i]
            xi = xt[xo + i]
            if fused:
                for j in range(2 * H):
                    gi[j] = fast_tanh(ca[j] * (xi[j] + rec[i, j] + brec[j])) * cs[j] + co[j]
            else:
                for j in range(2 * H):
                    gi[j] = xi[j] + rec[i, j] + brec[j]
                activate(ract, fast, gi, 0, 2 * H)
            # one output array per loop (see lstm._cell_update)
            qi = q[i]
            if reset_after:
                for j in range(H):
                    qi[j] = rec[i, 2 * H + j] + brec[2 * H + j]
                for j in range(H):
                    gi[2 * H + j] = xi[2 * H + j] + gi[H + j] * qi[j]
            elif use_rmask:
                for j in range(H):
                    qi[j] = gi[H + j] * (h[i, j] * rmask[2, b0 + i, j])
            else:
                for j in range(H):
                    qi[j] = gi[H + j] * h[i, j]
        if not reset_after:
            packed_dot(q, Ug[2], zk)
            for i in range(n):
                gi = g[off + i]
                for j in range(H):
                    gi[2 * H + j] = xt[xo + i, 2 * H + j] + zk[i, j]
        for i in range(n):
            gi = g[off + i]
            if use_mask and not mask[t, b0 + i]:
                if zero_output:
                    out[i] = 0.0
                if keep_cache:
                    # aux feeds the dU GEMM, where 0 * garbage could be NaN
                    aux[t, b0 + i] = 0.0
                continue
            activate(act, fast, gi, 2 * H, 3 * H)
            hi, oi = h[i], out[i]
            for j in range(H):
                hh = gi[2 * H + j]
                hi[j] = hh + gi[j] * (hi[j] - hh)
            if use_mask:            # without a mask the output is h (``res``)
                for j in range(H):
                    oi[j] = hi[j]
            if keep_cache:
                copy_row(aux[t, b0 + i], q[i])
        store_output(y, s, b0, b1, res, full)
    store_final(y, res, full, b0, b1, h_out, h)
    keep_alive(own)
    restore(fpmode)


@njit(inline="always", **NJIT_OPTIONS)
def _state_grads(d, g, hp, dh, carry, dhz, i, H, act):
    """Of one processed row: dz (into d[:H]), dah (into d[2H:]) and dh * z, the direct
    path to h_{t-1} (into dhz[i]), from dh[i] plus the pending output gradient. One stored
    array per loop (see _common.take_pending)."""
    dhr = dhz[i]
    take_pending(dhr, dh[i], carry[i])
    for j in range(H):
        d[j] = dhr[j] * (hp[j] - g[2 * H + j])
    for j in range(H):
        d[2 * H + j] = dhr[j] - dhr[j] * g[j]
    for j in range(H):
        dhr[j] = dhr[j] * g[j]
    activate_grad(act, g, d, 2 * H, 3 * H)


# Backward per processed step, dh the gradient reaching h_t (state and output): the GRU
# derivation in docs/design.md, in its symbols (dz, dah, dr, dq, daz, dar, da_h).
# Outputs: dz [T, B, 3H] = (daz, dar, dah), the gradient of the input-side pre-activations,
# and dah_rec [T, B, H] = da_h (reset_after only), the gradient of the recurrent h term.
@kernel
def _backward_kernel(b0, b1, gates, hprev, aux, UT, UgT, rmask, use_rmask, mask, use_mask,
                     dy, dh_in, act, ract, reset_after, go_backwards, zero_output,
                     carry_io, dz, dah_rec, dh0):
    # gates, hprev, aux: the forward cache, [T, B, .];  UT: [3H, H];  UgT: [3, H, H]
    #   (UT, UgT packed by _gemm.pack / pack_stack)
    # dy: [T, B, H] or [1, B, H];  dh_in: [B, H]
    # dz: [T, B, 3H] out;  dah_rec: [T, B, H] out (reset_after);  dh0: [B, H] out
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    gates, hprev, aux, UT, UgT, rmask, mask, dy, dz, dah_rec = borrowed(
        (gates, hprev, aux, UT, UgT, rmask, mask, dy, dz, dah_rec))
    n = b1 - b0
    T = gates.shape[0]
    H = dh_in.shape[1]
    dt = gates.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow);
    # dhz = dh * z, the direct path to h_{t-1}; drec = (daz, dar, da_h), the recurrent side
    own = (dh_in[b0:b1].copy(), carry_io[b0:b1].copy(), np.empty((n, H), dt),
           np.zeros((n, G * H), dt), np.empty((n, H), dt), np.empty((n, H), dt),
           np.empty((n, H), dt), np.empty((n, H), dt), np.empty(n, np.bool_))
    dh, carry, dhz, drec, dq, dhn, zk, dk, live = borrowed(own)
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        dzt = dz[t]
        for i in range(n):
            b = b0 + i
            d = dzt[b]
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                drec[i] = 0.0
                if reset_after:
                    dah_rec[t, b] = 0.0
                continue
            g = gates[t, b]
            _state_grads(d, g, hprev[t, b], dh, carry, dhz, i, H, act)
            if reset_after:
                ax = aux[t, b]
                for j in range(H):
                    d[H + j] = d[2 * H + j] * ax[j]
                for j in range(H):
                    drec[i, 2 * H + j] = d[2 * H + j] * g[H + j]
        if not reset_after:
            for i in range(n):
                for j in range(H):
                    dk[i, j] = dzt[b0 + i, 2 * H + j]
            packed_dot(dk, UgT[2], dq)
            for i in range(n):
                if live[i]:
                    b = b0 + i
                    for j in range(H):
                        hrh = hprev[t, b, j] * rmask[2, b, j] if use_rmask else hprev[t, b, j]
                        dzt[b, H + j] = dq[i, j] * hrh
                    for j in range(H):
                        r_h = rmask[2, b, j] if use_rmask else 1.0
                        dhz[i, j] += dq[i, j] * gates[t, b, H + j] * r_h
        for i in range(n):
            if live[i]:
                b = b0 + i
                d = dzt[b]
                activate_grad(ract, gates[t, b], d, 0, 2 * H)
                for j in range(2 * H):
                    drec[i, j] = d[j]
                if reset_after:
                    for j in range(H):
                        dah_rec[t, b, j] = drec[i, 2 * H + j]
        # dh_{t-1} = dh * z + sum_k (drec_k @ U_k^T) * r_k
        nk = G if reset_after else 2
        if use_rmask or not reset_after:
            copy_rows(dhn, dhz)
            for k in range(nk):
                for i in range(n):
                    for j in range(H):
                        dk[i, j] = drec[i, k * H + j]
                packed_dot(dk, UgT[k], zk)
                for i in range(n):
                    for j in range(H):
                        r_k = rmask[k, b0 + i, j] if use_rmask else 1.0
                        dhn[i, j] += zk[i, j] * r_k
        else:
            packed_dot(drec, UT, dhn)
            add_rows(dhn, dhz)
        for i in range(n):
            if live[i]:
                dh[i] = dhn[i]
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    keep_alive(own)
    restore(fpmode)


@njit(inline="always", **NJIT_OPTIONS)
def _standard_row_grads(d, dr, g, hp, ax, dhi, ci, dzi, H, pending):
    """_state_grads and the rest of a row's gate gradients in the fused backward, for tanh
    and sigmoid (derivatives from the outputs): d = (daz, dar, dah) and dr = (daz, dar,
    da_h) of one row, dzi = dh * z; the pending output gradient ci is added and consumed
    when ``pending`` (where it is not, it is zero and left out: only the sign of a zero
    can differ). The same operations in the same order as the general path, in four loops
    instead of ten, each of which pays its loop setup, alias checks and remainder."""
    gz, gr, gh = g[:H], g[H:2 * H], g[2 * H:3 * H]     # views from 0: see _math.activate
    dz_, dr_, dah_ = d[:H], d[H:2 * H], d[2 * H:3 * H]
    for j in range(H):          # one stored array (d) per loop: see _common.take_pending
        e = dhi[j] + ci[j] if pending else dhi[j]
        z = gz[j]
        hh = gh[j]
        a = e - e * z
        dah = a - a * hh * hh
        dah_[j] = dah
        dz_[j] = (e * (hp[j] - hh)) * (z - z * z)
        r = gr[j]
        dr_[j] = (dah * ax[j]) * (r - r * r)
    for j in range(2 * H):
        dr[j] = d[j]
    rh = dr[2 * H:3 * H]
    for j in range(H):
        rh[j] = dah_[j] * gr[j]
    if pending:
        for j in range(H):
            dzi[j] = (dhi[j] + ci[j]) * gz[j]
        for j in range(H):
            ci[j] = 0.0
    else:
        for j in range(H):
            dzi[j] = dhi[j] * gz[j]


# The fused backward (reset_after, no recurrent dropout; the forward projected inside the
# step): the gate gradients of _backward_kernel, then per step and batch block
#   dx_t = dz_t @ W^T (times the dropout mask)     dh_{t-1} = dh * z + drec_t @ U^T
# and per window of steps
#   acc_in += [x_t * m | 1]^T dz       acc_rec += [h_{t-1} | 1]^T drec
# which hold [dW; db_in] and [dU; db_rec]: neither dz nor the projection goes through memory.
@kernel
def _backward_fused_kernel(b0, b1, R, window, gates, hprev, aux, x, t_off, stage, dmask,
                           use_dmask,
                           WT, UT, mask, use_mask, dy, dh_in, act, ract, go_backwards,
                           zero_output, carry_io, dx, acc_in, acc_rec, dh0):
    # gates, hprev, aux: the forward cache [T, B, .];  x: [B, Tx, D] (steps t_off + t)
    # WT: [3H, D], UT: [3H, H] the kernels transposed (packed);  dmask: [B, D]
    # dx: [B, Tx, D] out;  acc_in: [nblocks, D + 1, 3H], acc_rec: [nblocks, H + 1, 3H]
    #     in/out, each block's share of [dW; db_in] and [dU; db_rec]
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    gates, hprev, aux, x, dmask, WT, UT, mask, dy, dx, acc_in, acc_rec = borrowed(
        (gates, hprev, aux, x, dmask, WT, UT, mask, dy, dx, acc_in, acc_rec))
    n = b1 - b0
    T = gates.shape[0]
    H = dh_in.shape[1]
    D = dx.shape[2]
    GH = G * H
    dt = gates.dtype
    k0 = b0 // R
    nb = (n + R - 1) // R
    # gate gradients of a window, input side (daz, dar, dah) and recurrent side (daz, dar,
    # da_h); columns: whole strips (read in place, _gemm.strip_view)
    GS = strip_columns(GH, gates)
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (dh_in[b0:b1].copy(), carry_io[b0:b1].copy(), np.empty((n, H), dt),
           np.zeros((nb, window * R, GS), dt), np.zeros((nb, window * R, GS), dt),
           np.zeros((nb, window * R, D + 1), dt), np.zeros((nb, window * R, H + 1), dt),
           stage_buffer(x, n, T, stage, False), np.empty((R, D), dt), np.empty((R, H), dt),
           np.empty((n, window, D), dt), np.empty((D + 1, GH), dt), np.empty((H + 1, GH), dt),
           np.empty(n, np.bool_))
    (dh, carry, dhz, dzw, drw, sxw, shw, xst, ddx, ddh, dxw, part_in, part_rec,
     live) = borrowed(own)
    dxv = dx_window(dxw)
    w = 0
    standard = act == TANH and ract == SIGMOID
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        # the pending output gradient can be nonzero only at the last step (dy of the last
        # output, or carried in from the chunk after), at every step with dy of every
        # step, or when masked rows pass it on: otherwise it is zero and not read
        pending = use_mask or dy.shape[0] == T or s == T - 1
        xt = staged_inputs(x, t_off, T, s, b0, go_backwards, True, xst, dmask, use_dmask)
        for i in range(n):
            b = b0 + i
            k, row = window_row(i, w, R, n)
            d = dzw[k, row]
            dr = drw[k, row]
            sx = sxw[k, row]
            sh = shw[k, row]
            xi = xt[i]
            hp = hprev[t, b]
            copy_row(sx, xi)                # x_t * m, masked when staged
            sx[D] = 1.0
            for j in range(H):
                sh[j] = hp[j]
            sh[H] = 1.0
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                dr[:] = 0.0
                continue
            g = gates[t, b]
            ax = aux[t, b]
            if standard:
                _standard_row_grads(d, dr, g, hp, ax, dh[i], carry[i], dhz[i], H,
                                    pending)
                continue
            _state_grads(d, g, hp, dh, carry, dhz, i, H, act)
            for j in range(H):
                d[H + j] = d[2 * H + j] * ax[j]
            for j in range(H):
                dr[2 * H + j] = d[2 * H + j] * g[H + j]
            activate_grad(ract, g, d, 0, 2 * H)
            for j in range(2 * H):
                dr[j] = d[j]
        for k in range(nb):
            rows = min(R, n - k * R)
            # dx rows straight into the window buffer unless the dropout mask multiplies them
            packed_dot(dzw[k, w * rows:(w + 1) * rows], WT,
                       ddx[:rows] if use_dmask else dxv[k * R:k * R + rows, w])
            packed_dot(drw[k, w * rows:(w + 1) * rows], UT, ddh[:rows])
            for ii in range(rows):
                i = k * R + ii
                if use_dmask:
                    dxr = dxv[i, w]
                    for j in range(D):
                        dxr[j] = ddx[ii, j] * dmask[b0 + i, j]
                if live[i]:
                    for j in range(H):
                        dh[i, j] = dhz[i, j] + ddh[ii, j]
        w += 1
        if w == window or s == 0:
            for k in range(nb):
                rw = w * min(R, n - k * R)
                add_window_product(shw[k, :rw], drw[k, :rw], part_rec, acc_rec[k0 + k])
            flush_window(sxw, dzw, acc_in, part_in, k0, R, w, n, dxw, dx, b0, s, T, t_off,
                         go_backwards)
            w = 0
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    keep_alive(own)
    restore(fpmode)


def backward_fused(cache, x, t_off, WT, UT, dmask, mask, dy, dh, act, ract, go_backwards,
                   zero_output, carry, dx, acc_in, acc_rec):
    """Backward of a reset_after forward that projected inside the step, without recurrent
    dropout: writes dx[:, t_off:t_off + T], adds each block's share of [dW; db_in] to
    ``acc_in`` [nblocks, D + 1, 3H] and of [dU; db_rec] to ``acc_rec`` [nblocks, H + 1, 3H].
    Returns dh0."""
    gates, hprev, aux = cache
    B, H = dh.shape
    dt = gates.dtype
    dh0 = np.empty((B, H), dt)
    dm, use_dmask = optional(dmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_backward_fused_kernel, B, config.BLOCK_ROWS, config.BLOCK_ROWS,
                       config.WINDOW_STEPS, gates, hprev, aux, x, t_off, config.STAGE_BYTES,
                       dm, use_dmask, pack(WT),
                       pack(UT), m, use_mask, dy, dh, act, ract, go_backwards, zero_output,
                       pending_carry(carry, B, H, dt), dx, acc_in, acc_rec, dh0)
    return dh0


def forward(xw, U, brec, rmask, mask, h0, act, ract, reset_after, go_backwards, zero_output,
            return_sequences, keep_cache, fast, coef, out0=None, x=None, t_off=0, T=None,
            Wb=None, dmask=None):
    """Run the GRU recurrence (time-major). Returns ``y, h, cache`` with
    ``cache = (gates, hprev, aux)``; ``coef`` is ``_math.gate_coefficients`` of z, r or None;
    ``out0`` as in ``lstm.forward``. With ``x`` [B, Tx, D] instead of ``xw`` (None), steps
    [t_off, t_off + T) of x are projected inside the step by ``Wb`` = [W; b_in] (and the
    shared input dropout mask ``dmask`` [B, D]), so xw never goes through memory."""
    dt = U.dtype
    B, H = h0.shape
    T, xw, x, Wb, dm, use_dmask, from_x = step_inputs(xw, x, T, Wb, dmask, dt)
    y, h, (gates, hprev, aux) = forward_outputs(T, B, H, return_sequences, keep_cache, dt,
                                                G * H, H, H)
    use_rmask = rmask is not None
    Ug = pack_stack(split_gates(U, G))
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    m, use_mask = optional(mask, 2, np.bool_)
    fused = coef is not None and fast
    cf = coef if fused else np.zeros((3, 2 * H), dt)
    run_block_parallel(_forward_kernel, B, config.BLOCK_ROWS, T, xw, x, t_off,
                       config.STAGE_BYTES, Wb, dm, use_dmask, from_x, pack(U), Ug, brec, rm,
                       use_rmask, m, use_mask, h0,
                       act, ract, fast, cf, fused, reset_after, go_backwards, zero_output,
                       keep_cache, initial_output(out0, B, H, dt), y, h, gates, hprev, aux)
    return y, h, ((gates, hprev, aux) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, ract, reset_after, go_backwards, zero_output,
             carry=None):
    """Backward recurrence (time-major). Returns ``dz [T, B, 3H], dah_rec or None, dh0``;
    ``carry`` as in ``lstm.backward``."""
    gates, hprev, aux = cache
    T, B, _ = gates.shape
    H = U.shape[0]
    dt = gates.dtype
    dz = workspace.empty((T, B, G * H), dt)
    dah_rec = workspace.empty((T, B, H) if reset_after else (0, 0, 0), dt)
    dh0 = np.empty((B, H), dt)
    use_rmask = rmask is not None
    UT = pack(U.T)
    UgT = pack_stack(split_gates(U, G).transpose(0, 2, 1))
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_backward_kernel, B, config.BLOCK_ROWS, gates, hprev, aux, UT, UgT, rm,
                       use_rmask, m, use_mask, dy, dh, act, ract, reset_after, go_backwards,
                       zero_output, pending_carry(carry, B, H, dt), dz, dah_rec, dh0)
    return dz, (dah_rec if reset_after else None), dh0
