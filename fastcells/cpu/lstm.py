"""LSTM recurrence on the CPU: Numba kernels (one batch slice per thread) and their drivers.

Two paths. The plain kernels run only the recurrence: the input projection
``xw = x @ W + b`` is computed before (one GEMM over all time steps) and the weight
gradients after (GEMMs over the cache), by ``fastcells.ops``. The fused kernels (further
down) move the projection into the step and the input and weight gradients into the
backward. Every per-step product runs against weights packed once per call
(``_gemm.packed_dot``).

Layout: every array is time-major, ``[T, B, ...]``, so the rows a thread touches at one step
are one contiguous block (batch-major rows of one step lie T*4H floats apart: a page each,
which the prefetcher cannot follow). Time-aligned arrays (xw, mask, the cache, dz) are
indexed by input time t; outputs y and their gradients dy by processing step s
(t = T-1-s with go_backwards, as Keras returns them).

Shapes: B batch, T time steps, H units, G = 4 gates in Keras order i, f, c, o.
"""
import numpy as np
from numba import njit

from .. import config
from ..config import NJIT_OPTIONS
from .._workspace import workspace
from .._math import SIGMOID, TANH, activate, activate_grad, fast_tanh
from ._common import (copy_row, copy_rows, forward_outputs, initial_output, input_and_state_grads,
                      masked_row, next_window_slot, optional, output_grad_step, pending_carry,
                      stage_buffer, staged_inputs, store_backward_block, store_final, store_output,
                      take_pending, window_buffers, window_row)
from ._gemm import pack, pack_stack, packed_dot
from ._borrow import borrowed, keep_alive
from ._jit import called, kernel
from ._fpstate import flush_denormals, restore
from ._parallel import run_batch_parallel, run_block_parallel

G = 4


@njit(inline="always", **NJIT_OPTIONS)
def _gates(z, g, off, n, H, fused, coef, act, ract, fast):
    """g[off + i] = the activated gates of the pre-activations z[i] (i, f, c~, o)."""
    GH = G * H
    if fused:
        ca, cs, co = coef[0], coef[1], coef[2]
        for i in range(n):
            for j in range(GH):
                g[off + i, j] = fast_tanh(ca[j] * z[i, j]) * cs[j] + co[j]
    else:
        _other_gates(z, g, off, n, H, act, ract, fast)


@called
def _other_gates(z, g, off, n, H, act, ract, fast):
    """The gates of _gates for activations other than the fused tanh and sigmoid: called,
    not inlined (once per step, and it keeps the common kernels quick to compile)."""
    GH = G * H
    for i in range(n):
        gi = g[off + i]
        for j in range(GH):
            gi[j] = z[i, j]
        activate(ract, fast, gi, 0, 2 * H)          # i, f
        activate(act, fast, gi, 2 * H, 3 * H)       # c~
        activate(ract, fast, gi, 3 * H, 4 * H)      # o


@njit(inline="always", **NJIT_OPTIONS)
def _cell_update(g, ac, off, c, h, out, mask, use_mask, t, b0, n, H, act, fast, zero_output):
    """c = f c + i c~, h = o act(c) for the processed rows (ac[off + i] = act(c)); a masked
    row keeps its state and repeats its output (or outputs zeros) in ``out``. Without a
    mask the output is h and ``out`` is not written."""
    # one output array per loop: LLVM vectorises a loop only when it can rule out
    # overlaps, and a loop storing to two arrays runs 2.7 times slower
    for i in range(n):
        if use_mask and not mask[t, b0 + i]:
            continue
        gi, ci = g[off + i], c[i]
        for j in range(H):
            ci[j] = gi[H + j] * ci[j] + gi[j] * gi[2 * H + j]
    # act(c) as one sweep over the n x H block (c and ac[off:off + n] are contiguous),
    # masked rows too (their act(c) is not used): per row, each 32-float loop would pay its
    # alias checks and remainder
    cf = c.reshape(n * H)
    af = ac[off:off + n].reshape(n * H)
    if act == TANH and fast:
        for k in range(n * H):
            af[k] = fast_tanh(cf[k])
    else:
        _other_activation(act, fast, cf, af)
    for i in range(n):
        if use_mask and not mask[t, b0 + i]:
            if zero_output:
                for j in range(H):
                    out[i, j] = 0.0
            continue
        gi, ai, hi = g[off + i], ac[off + i], h[i]
        for j in range(H):
            hi[j] = gi[3 * H + j] * ai[j]
        if use_mask:
            oi = out[i]
            for j in range(H):  # a loop: a slice assignment (oi[:] = hi) takes 2.5 times
                oi[j] = hi[j]   # as long as the whole cell update


@called
def _other_activation(act, fast, c, a):
    """a = act(c) for an activation other than the fast tanh (see _other_gates)."""
    for k in range(c.shape[0]):
        a[k] = c[k]
    activate(act, fast, a, 0, c.shape[0])


@njit(inline="always", **NJIT_OPTIONS)
def _step_end(z, g, ac, off, c, h, out, res, y, mask, use_mask, s, t, b0, b1, H, fused, coef,
              act, ract, fast, zero_output, full):
    """The rest of a forward step once z holds the gate pre-activations of rows b0..b1: the
    gates, the cell update and the step's output rows."""
    n = b1 - b0
    _gates(z, g, off, n, H, fused, coef, act, ract, fast)
    _cell_update(g, ac, off, c, h, out, mask, use_mask, t, b0, n, H, act, fast, zero_output)
    store_output(y, s, b0, b1, res, full)


@njit(inline="always", **NJIT_OPTIONS)
def _gate_grads(d, g, ac, cp, dh, dc, carry, i, H, act, ract, dht, da):
    """The gate pre-activation gradients d (di, df, dc~, do) of one processed row; dc[i]
    becomes the gradient reaching c_{t-1} (the LSTM derivation in docs/design.md).
    dht, da: [H] scratch. One stored array per loop (see _common.take_pending)."""
    take_pending(dht, dh[i], carry[i])
    for j in range(H):
        d[3 * H + j] = dht[j] * ac[j]
    for j in range(H):
        da[j] = dht[j] * g[3 * H + j]           # gradient reaching a(c_t)
    activate_grad(act, ac, da, 0, H)
    dci = dc[i]
    for j in range(H):
        da[j] = dci[j] + da[j]                  # now the gradient reaching c_t
    for j in range(H):
        d[j] = da[j] * g[2 * H + j]
    for j in range(H):
        d[H + j] = da[j] * cp[j]
    for j in range(H):
        d[2 * H + j] = da[j] * g[j]
    for j in range(H):
        dci[j] = da[j] * g[H + j]
    activate_grad(ract, g, d, 0, 2 * H)
    activate_grad(act, g, d, 2 * H, 3 * H)
    activate_grad(ract, g, d, 3 * H, 4 * H)


#: _gate_grads called rather than inlined, for the fused backward's activations other than
#: tanh and sigmoid (that kernel inlines its own code for those: inlining both would add
#: about 2 s to its compile time for a path most models never take)
_other_gate_grads = called(_gate_grads.py_func)


@kernel
def _forward_kernel(b0, b1, xw, U, Ug, rmask, use_rmask, mask, use_mask, h0, c0,
                    act, ract, fast, coef, fused, go_backwards, zero_output, keep_cache,
                    out0, y, h_out, c_out, gates, hprev, cprev, actc):
    # xw:     [T, B, 4H]  x @ W + b (input dropout already applied)
    # U:      the recurrent kernel [H, 4H] packed by _gemm.pack (used without recurrent
    #         dropout)
    # Ug:     [4, H, H] the recurrent kernel split per gate, packed by _gemm.pack_stack
    #         (used with recurrent dropout)
    # rmask:  [4, B, H]   recurrent dropout mask per gate
    # mask:   [T, B]      True where the step is processed
    # h0, c0: [B, H]      initial states
    # coef:   [3, 4H]     gate g_j = tanh(a_j x) * s_j + o_j, used when ``fused``
    # out0:   [B, H]      the output before the first step (what a masked step repeats)
    # y:      [T, B, H] or [1, B, H] (last output only), in processing order
    # h_out, c_out: [B, H] final states
    # cache (keep_cache): gates [T, B, 4H] post-activation; hprev, cprev [T, B, H] the
    #   states entering step t; actc [T, B, H] = act(c_t)
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    xw, U, Ug, rmask, mask, coef, y, gates, hprev, cprev, actc = borrowed(
        (xw, U, Ug, rmask, mask, coef, y, gates, hprev, cprev, actc))
    n = b1 - b0
    T = xw.shape[0]
    H = h0.shape[1]
    GH = G * H
    full = y.shape[0] == T
    dt = xw.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (h0[b0:b1].copy(), c0[b0:b1].copy(), out0[b0:b1].copy(), np.empty((n, GH), dt),
           np.empty((n, H), dt), np.empty((n, H), dt), np.empty((n, GH), dt),
           np.empty((n, H), dt))
    h, c, out, z, hr, zk, g_scratch, a_scratch = borrowed(own)
    res = out if use_mask else h    # the output rows (see _cell_update)
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        # recurrent projection z = (h * r_k) @ U_k for every gate k
        if use_rmask:
            for k in range(G):
                for i in range(n):
                    for j in range(H):
                        hr[i, j] = h[i, j] * rmask[k, b0 + i, j]
                packed_dot(hr, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        z[i, k * H + j] = zk[i, j]
        else:
            packed_dot(h, U, z)
        if keep_cache:
            g, off, ac = gates[t], b0, actc[t]
            copy_rows(hprev[t, b0:b1], h)
            copy_rows(cprev[t, b0:b1], c)
        else:
            g, off, ac = g_scratch, 0, a_scratch
        xt = xw[t]
        for i in range(n):
            for j in range(GH):
                z[i, j] += xt[b0 + i, j]
        # gates of every row (masked rows too: branch-free, their results are not used)
        _step_end(z, g, ac, off, c, h, out, res, y, mask, use_mask, s, t, b0, b1, H, fused,
                  coef, act, ract, fast, zero_output, full)
    store_final(y, res, full, b0, b1, h_out, h)
    copy_rows(c_out[b0:b1], c)
    keep_alive(own)
    restore(fpmode)


# Backward, per processed step t: the LSTM derivation in docs/design.md (dh, dc the
# gradients reaching h_t and c_t; dz_k the gate pre-activation gradients, then
# dh_{t-1} = sum_k (dz_k @ U_k^T) * r_k). A masked step passes dh and dc through with dz = 0;
# the output gradient of a masked step flows to the previous output, tracked by ``carry``.
@kernel
def _backward_kernel(b0, b1, gates, cprev, actc, UT, UgT, rmask, use_rmask, mask, use_mask,
                     dy, dh_in, dc_in, act, ract, go_backwards, zero_output,
                     carry_io, dz, dh0, dc0):
    # gates, cprev, actc: the forward cache (see _forward_kernel), [T, B, .]
    # UT:    [4H, H]    U transposed;  UgT: [4, H, H] U_k transposed per gate (both packed)
    # dy:    [T, B, H] or [1, B, H] (gradient of the last output only), processing order
    # dh_in, dc_in: [B, H] gradients of the final states
    # carry_io: [B, H]  in/out: output gradient pending for the previous output (chunks)
    # dz:    [T, B, 4H] out: gradient of the gate pre-activations
    # dh0, dc0: [B, H] out: gradients of the initial states
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    gates, cprev, actc, UT, UgT, rmask, mask, dy, dz = borrowed(
        (gates, cprev, actc, UT, UgT, rmask, mask, dy, dz))
    n = b1 - b0
    T = gates.shape[0]
    H = dh_in.shape[1]
    dt = gates.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (dh_in[b0:b1].copy(), carry_io[b0:b1].copy(), dc_in[b0:b1].copy(),
           np.empty((n, H), dt), np.empty((n, H), dt), np.empty((n, H), dt), np.empty(H, dt),
           np.empty(H, dt), np.empty(n, np.bool_))
    dh, carry, dc, dhn, dk, zk, dht, da, live = borrowed(own)
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        dzt = dz[t]
        gt = gates[t]
        for i in range(n):
            b = b0 + i
            d = dzt[b]
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                continue
            _gate_grads(d, gt[b], actc[t, b], cprev[t, b], dh, dc, carry, i, H, act, ract,
                        dht, da)
        # dh_{t-1} = sum_k (dz_k @ U_k^T) * r_k
        if use_rmask:
            dhn[:] = 0.0
            for k in range(G):
                for i in range(n):
                    for j in range(H):
                        dk[i, j] = dzt[b0 + i, k * H + j]
                packed_dot(dk, UgT[k], zk)
                for i in range(n):
                    for j in range(H):
                        dhn[i, j] += zk[i, j] * rmask[k, b0 + i, j]
        else:
            packed_dot(dzt[b0:b1], UT, dhn)
        for i in range(n):
            if live[i]:
                dh[i] = dhn[i]
    copy_rows(dc0[b0:b1], dc)
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    keep_alive(own)
    restore(fpmode)


def forward(xw, U, rmask, mask, h0, c0, act, ract, go_backwards, zero_output,
            return_sequences, keep_cache, fast, coef, out0=None):
    """Run the LSTM recurrence over all batch slices (time-major arrays, see above).

    Returns ``y, h, c, cache`` with ``cache = (gates, hprev, cprev, actc)`` (or None when
    ``keep_cache`` is False). ``coef`` is ``_math.gate_coefficients`` or None. ``out0`` [B, H]
    is the output before the first step (zeros when None): a chunk of a longer sequence
    continues from the previous chunk's last output.
    """
    T, B, _ = xw.shape
    H = h0.shape[1]
    dt = xw.dtype
    y, h, (gates, hprev, cprev, actc) = forward_outputs(
        T, B, H, return_sequences, keep_cache, dt, G * H, H, H, H)
    c = np.empty((B, H), dt)
    use_rmask = rmask is not None
    Up = np.empty((0, 0, 0), dt) if use_rmask else pack(U)
    Ug = pack_stack(split_gates(U, G)) if use_rmask else np.empty((G, 0, 0, 0), dt)
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    m, use_mask = optional(mask, 2, np.bool_)
    fused = coef is not None and fast
    cf = coef if fused else np.zeros((3, G * H), dt)
    run_batch_parallel(_forward_kernel, B, xw, Up, Ug, rm, use_rmask, m, use_mask, h0, c0,
                       act, ract, fast, cf, fused, go_backwards, zero_output, keep_cache,
                       initial_output(out0, B, H, dt), y, h, c, gates, hprev, cprev, actc)
    return y, h, c, ((gates, hprev, cprev, actc) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, dc, act, ract, go_backwards, zero_output,
             carry=None):
    """Backward recurrence (time-major). Returns ``dz [T, B, 4H], dh0, dc0``.

    ``carry`` [B, H], when given, is read and updated in place: the output gradient that
    flows through masked steps to the output before the first step (chunked backward)."""
    gates, hprev, cprev, actc = cache
    T, B, _ = gates.shape
    H = U.shape[0]
    dt = gates.dtype
    dz = workspace.empty((T, B, G * H), dt)
    dh0 = np.empty((B, H), dt)
    dc0 = np.empty((B, H), dt)
    use_rmask = rmask is not None
    UT = np.empty((0, 0, 0), dt) if use_rmask else pack(U.T)
    UgT = (pack_stack(split_gates(U, G).transpose(0, 2, 1)) if use_rmask
           else np.empty((G, 0, 0, 0), dt))
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_batch_parallel(_backward_kernel, B, gates, cprev, actc, UT, UgT, rm, use_rmask, m,
                       use_mask, dy, dh, dc, act, ract, go_backwards, zero_output,
                       pending_carry(carry, B, H, dt), dz, dh0, dc0)
    return dz, dh0, dc0


# --------------------------------------------------------------------------- fused kernels
# Without per-gate dropout masks the input projection moves into the step and the input and
# weight gradients into the backward, so the projected input xw and the gate gradients dz,
# [T, B, 4H] each, never go through memory. Step t multiplies one row block
#   s_t = [x_t | h_{t-1} | 1]   ([n, F], F = D + H + 1, kept as the cache ``xh``)
# by V = [W; U; b] ([F, 4H]); the backward multiplies dz_t by [W; U]^T once for dx_t and
# dh_{t-1} together, and adds s^T dz over a window of steps to the block's share of
# [dW; dU; db]. Batch blocks of ``config.BLOCK_ROWS`` rows each keep their own share, so the
# sums do not depend on how many threads ran.
@kernel
def _forward_fused_kernel(b0, b1, x, t_off, T, stage, V, dmask, use_dmask, mask, use_mask, h0,
                          c0, act, ract, fast, coef, fused, go_backwards, zero_output,
                          keep_cache, out0, y, h_out, c_out, gates, xh, cprev, actc):
    # x:      [B, Tx, D]  batch-major input; step t reads x[:, t_off + t]
    # stage:  bytes of x a thread copies at once (see _common.staged_inputs)
    # V:      [W; U; b] ([F, 4H], b zeros without a bias) packed by _gemm.pack
    # dmask:  [B, D]      input dropout mask (shared by the gates)
    # mask:   [T, B]      True where the step is processed
    # cache (keep_cache): gates [T, B, 4H]; xh [T, B, F] the rows s_t; cprev, actc [T, B, H]
    # other arguments as in _forward_kernel
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    x, V, dmask, mask, coef, y, gates, xh, cprev, actc = borrowed(
        (x, V, dmask, mask, coef, y, gates, xh, cprev, actc))
    n = b1 - b0
    D = x.shape[2]
    H = h0.shape[1]
    GH = G * H
    F = D + H + 1
    full = y.shape[0] == T
    dt = y.dtype
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (h0[b0:b1].copy(), c0[b0:b1].copy(), out0[b0:b1].copy(), np.empty((n, GH), dt),
           np.empty((n, F), dt), np.empty((n, GH), dt), np.empty((n, H), dt),
           stage_buffer(x, n, T, stage, False))
    h, c, out, z, s_scratch, g_scratch, a_scratch, xs = borrowed(own)
    res = out if use_mask else h    # the output rows (see _cell_update)
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        if keep_cache:
            st, g, off, ac = xh[t, b0:b1], gates[t], b0, actc[t]
            copy_rows(cprev[t, b0:b1], c)
        else:
            st, g, off, ac = s_scratch, g_scratch, 0, a_scratch
        xt = staged_inputs(x, t_off, T, s, b0, go_backwards, False, xs, dmask, use_dmask)
        for i in range(n):
            row = st[i]
            copy_row(row, xt[i])
            copy_row(row[D:], h[i])     # a view from 0: see _math.activate
            row[D + H] = 1.0
        packed_dot(st, V, z)
        _step_end(z, g, ac, off, c, h, out, res, y, mask, use_mask, s, t, b0, b1, H, fused,
                  coef, act, ract, fast, zero_output, full)
    store_final(y, res, full, b0, b1, h_out, h)
    copy_rows(c_out[b0:b1], c)
    keep_alive(own)
    restore(fpmode)


# The backward of the fused forward: the per-step gate derivation of _backward_kernel, then
# per block of R rows the in-step and window products of docs/design.md ("Fused steps"):
# [dx_t | dh_{t-1}] = dz_t @ [W; U]^T and acc_block += s_w^T @ dz_w, acc = [dW; dU; db].
@kernel
def _backward_fused_kernel(b0, b1, R, window, gates, xh, cprev, actc, VT, dmask, use_dmask,
                           mask, use_mask, dy, dh_in, dc_in, act, ract, go_backwards,
                           zero_output, t_off, carry_io, dx, acc, dh0, dc0):
    # gates, xh, cprev, actc: the cache of _forward_fused_kernel, [T, B, .]
    # VT:    [4H, D+H]  [W; U]^T, packed by _gemm.pack
    # dx:    [B, Tx, D] out: rows of steps t_off + t
    # acc:   [nblocks, F, 4H] in/out: each block's share of [dW; dU; db]
    # other arguments as in _backward_kernel
    fpmode = flush_denormals()
    # the arguments, held by the caller, without reference counts (see _borrow)
    gates, xh, cprev, actc, VT, dmask, mask, dy, dx, acc = borrowed(
        (gates, xh, cprev, actc, VT, dmask, mask, dy, dx, acc))
    n = b1 - b0
    T = gates.shape[0]
    H = dh_in.shape[1]
    D = dx.shape[2]
    GH = G * H
    dt = gates.dtype
    k0 = b0 // R
    # the kernel's own arrays, borrowed for its loops and kept alive to its end (_borrow)
    own = (dh_in[b0:b1].copy(), carry_io[b0:b1].copy(), dc_in[b0:b1].copy(), np.empty(H, dt),
           np.empty(H, dt), np.empty(H, dt), np.empty(n, np.bool_))
    dh, carry, dc, da, dht, dct, live = borrowed(own)
    # the in-step product reads the first GH columns of dzw, its K being that of the packed VT
    windows = window_buffers(n, R, window, D, H, GH, gates)
    dzw, sw, dd, dxw, dxv, part = borrowed(windows)
    standard = act == TANH and ract == SIGMOID
    w = 0
    for s in range(T - 1, -1, -1):
        t = output_grad_step(carry, dy, s, T, b0, b1, go_backwards)
        gt = gates[t]
        for i in range(n):
            b = b0 + i
            k, row = window_row(i, w, R, n)
            d = dzw[k, row]
            copy_row(sw[k, row], xh[t, b])
            if masked_row(d, carry, live, i, mask, use_mask, t, b, zero_output):
                continue
            g = gt[b]
            ac = actc[t, b]
            cp = cprev[t, b]
            if standard:
                # tanh and sigmoid, derivatives from the outputs; one stored array per
                # loop (see _common.take_pending)
                take_pending(dht, dh[i], carry[i])
                dci = dc[i]
                for j in range(H):      # no literal constants: they would be float64
                    a = ac[j]
                    e = dht[j] * g[3 * H + j]
                    dct[j] = dci[j] + (e - e * a * a)
                for j in range(H):
                    gi = g[j]
                    d[j] = dct[j] * g[2 * H + j] * (gi - gi * gi)
                for j in range(H):
                    gf = g[H + j]
                    d[H + j] = dct[j] * cp[j] * (gf - gf * gf)
                for j in range(H):
                    e = dct[j] * g[j]
                    gc = g[2 * H + j]
                    d[2 * H + j] = e - e * gc * gc
                for j in range(H):
                    go = g[3 * H + j]
                    d[3 * H + j] = dht[j] * ac[j] * (go - go * go)
                for j in range(H):
                    dci[j] = dct[j] * g[H + j]
                continue
            _other_gate_grads(d, g, ac, cp, dh, dc, carry, i, H, act, ract, dht, da)
        input_and_state_grads(dzw, w, R, VT, dd, dxv, dh, live, n, dmask, use_dmask,
                              dmask, False, b0)
        w = next_window_slot(w, window, sw, dzw, acc, part, k0, R, n, dxw, dx, b0, s, T,
                             t_off, go_backwards)
    copy_rows(dc0[b0:b1], dc)
    store_backward_block(b0, b1, dh0, dh, carry_io, carry)
    keep_alive(own)
    keep_alive(windows)
    restore(fpmode)


def forward_fused(x, t_off, T, V, dmask, mask, h0, c0, act, ract, go_backwards, zero_output,
                  return_sequences, keep_cache, fast, coef, out0=None):
    """The fused forward over steps [t_off, t_off + T) of the batch-major ``x`` [B, Tx, D].

    ``V`` = [W; U; b] ([D + H + 1, 4H]); ``dmask`` [B, D] or None. Returns ``y, h, c,
    cache`` with ``cache = (gates, xh, cprev, actc)``; the rest as in :func:`forward`."""
    B, _, D = x.shape
    H = h0.shape[1]
    dt = V.dtype
    y, h, (gates, xh, cprev, actc) = forward_outputs(
        T, B, H, return_sequences, keep_cache, dt, G * H, D + H + 1, H, H)
    c = np.empty((B, H), dt)
    dm, use_dmask = optional(dmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    fused = coef is not None and fast
    cf = coef if fused else np.zeros((3, G * H), dt)
    run_block_parallel(_forward_fused_kernel, B, config.BLOCK_ROWS, x, t_off, T,
                       config.STAGE_BYTES, pack(V), dm,
                       use_dmask, m, use_mask, h0, c0, act, ract, fast, cf, fused,
                       go_backwards, zero_output, keep_cache, initial_output(out0, B, H, dt),
                       y, h, c, gates, xh, cprev, actc)
    return y, h, c, ((gates, xh, cprev, actc) if keep_cache else None)


def backward_fused(cache, VT, dmask, mask, dy, dh, dc, act, ract, go_backwards, zero_output,
                   carry, dx, acc, t_off):
    """Backward of :func:`forward_fused`: writes dx[:, t_off:t_off + T] and adds each
    block's share of [dW; dU; db] to ``acc`` [nblocks, D + H + 1, 4H]. Returns dh0, dc0."""
    gates, xh, cprev, actc = cache
    T, B, _ = gates.shape
    H = dh.shape[1]
    dt = gates.dtype
    dh0 = np.empty((B, H), dt)
    dc0 = np.empty((B, H), dt)
    dm, use_dmask = optional(dmask, 2, dt)
    m, use_mask = optional(mask, 2, np.bool_)
    run_block_parallel(_backward_fused_kernel, B, config.BLOCK_ROWS, config.BLOCK_ROWS,
                       config.WINDOW_STEPS, gates, xh, cprev, actc, pack(VT), dm, use_dmask, m,
                       use_mask, dy, dh, dc, act, ract, go_backwards, zero_output, t_off,
                       pending_carry(carry, B, H, dt), dx, acc, dh0, dc0)
    return dh0, dc0


def split_gates(U, gates):
    """[H, gates*H] -> [gates, H, H], C-contiguous."""
    H = U.shape[0]
    return np.ascontiguousarray(U.reshape(H, gates, -1).transpose(1, 0, 2))
