"""LSTM recurrence on the CPU: Numba kernels (one batch slice per thread) and their drivers.

Only the recurrence lives here. The input projection ``xw = x @ W + b`` is computed before
(one GEMM over all time steps) and the weight gradients after (GEMMs over the cache), by
``fastcells.ops``.

Shapes: B batch, T time steps, H units, G = 4 gates in Keras order i, f, c, o.
Time-aligned arrays (xw, mask, the cache, dz) are indexed by input time t; outputs y and
their gradients dy by processing step s (t = T-1-s with go_backwards, as Keras returns them).
"""
import numpy as np
from numba import njit

from .. import config
from .._math import activate, activate_grad
from ._parallel import run_batch_parallel

G = 4


@njit(**config.NJIT_OPTIONS)
def _forward_kernel(b0, b1, xw, U, Ug, rmask, use_rmask, mask, use_mask, h0, c0,
                    act, ract, fast, go_backwards, zero_output, keep_cache,
                    y, h_out, c_out, gates, hprev, cprev, actc):
    # xw:     [B, T, 4H]  x @ W + b (input dropout already applied)
    # U:      [H, 4H]     recurrent kernel (used without recurrent dropout)
    # Ug:     [4, H, H]   recurrent kernel split per gate (used with recurrent dropout)
    # rmask:  [4, B, H]   recurrent dropout mask per gate
    # mask:   [B, T]      True where the step is processed
    # h0, c0: [B, H]      initial states
    # y:      [B, T, H] or [B, 1, H] (last output only)
    # h_out, c_out: [B, H] final states
    # cache (keep_cache): gates [B, T, 4H] post-activation; hprev, cprev [B, T, H] the states
    #   entering step t; actc [B, T, H] = act(c_t)
    n = b1 - b0
    T = xw.shape[1]
    H = h0.shape[1]
    full = y.shape[1] == T
    dt = xw.dtype
    h = np.empty((n, H), dt)
    c = np.empty((n, H), dt)
    out = np.zeros((n, H), dt)
    z = np.empty((n, G * H), dt)
    hr = np.empty((n, H), dt)
    zk = np.empty((n, H), dt)
    row = np.empty(G * H, dt)
    hc = np.empty(H, dt)
    for i in range(n):
        for j in range(H):
            h[i, j] = h0[b0 + i, j]
            c[i, j] = c0[b0 + i, j]
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        # recurrent projection z = (h * r_k) @ U_k for every gate k
        if use_rmask:
            for k in range(G):
                for i in range(n):
                    for j in range(H):
                        hr[i, j] = h[i, j] * rmask[k, b0 + i, j]
                np.dot(hr, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        z[i, k * H + j] = zk[i, j]
        else:
            np.dot(h, U, z)
        for i in range(n):
            b = b0 + i
            if use_mask and not mask[b, t]:
                # masked step: the state is kept, the output repeats (or is zero)
                if zero_output:
                    for j in range(H):
                        out[i, j] = 0.0
                if keep_cache:
                    for j in range(H):
                        hprev[b, t, j] = h[i, j]
                        cprev[b, t, j] = c[i, j]
            else:
                g = gates[b, t] if keep_cache else row
                for j in range(G * H):
                    g[j] = xw[b, t, j] + z[i, j]
                activate(ract, fast, g, 0, 2 * H)          # i, f
                activate(act, fast, g, 2 * H, 3 * H)       # c~
                activate(ract, fast, g, 3 * H, 4 * H)      # o
                if keep_cache:
                    for j in range(H):
                        hprev[b, t, j] = h[i, j]
                        cprev[b, t, j] = c[i, j]
                for j in range(H):
                    c[i, j] = g[H + j] * c[i, j] + g[j] * g[2 * H + j]
                    hc[j] = c[i, j]
                activate(act, fast, hc, 0, H)
                for j in range(H):
                    h[i, j] = g[3 * H + j] * hc[j]
                    out[i, j] = h[i, j]
                if keep_cache:
                    for j in range(H):
                        actc[b, t, j] = hc[j]
            if full or s == T - 1:
                so = s if full else 0
                for j in range(H):
                    y[b, so, j] = out[i, j]
    for i in range(n):
        for j in range(H):
            h_out[b0 + i, j] = h[i, j]
            c_out[b0 + i, j] = c[i, j]


# Backward, per processed step t (masks and dropout aside), with s(.) the recurrent
# activation, a(.) the activation, and dh, dc the gradients reaching h_t and c_t:
#   c_t = f * c_{t-1} + i * c~          h_t = o * a(c_t)
#   do  = dh * a(c_t)                   dc += dh * o * a'(c_t)
#   di  = dc * c~      df = dc * c_{t-1}      dc~ = dc * i       dc_{t-1} = dc * f
#   dz_k = d(gate_k) * act_k'(gate_k)   (derivatives from the gate outputs)
#   dh_{t-1} = sum_k (dz_k @ U_k^T) * r_k
# A masked step passes dh and dc through unchanged and has dz = 0. The output gradient dy_s
# reaches h_t only if step t was processed; for a masked step it flows to the previous
# output (unless zero_output_for_mask), which is what ``carry`` tracks.
@njit(**config.NJIT_OPTIONS)
def _backward_kernel(b0, b1, gates, cprev, actc, UT, UgT, rmask, use_rmask, mask, use_mask,
                     dy, dh_in, dc_in, act, ract, go_backwards, zero_output,
                     dz, dh0, dc0):
    # gates, cprev, actc: the forward cache (see _forward_kernel)
    # UT:    [4H, H]    U transposed;  UgT: [4, H, H] U_k transposed per gate
    # dy:    [B, T, H] or [B, 1, H] (gradient of the last output only)
    # dh_in, dc_in: [B, H] gradients of the final states
    # dz:    [B, T, 4H] out: gradient of the gate pre-activations
    # dh0, dc0: [B, H] out: gradients of the initial states
    n = b1 - b0
    T = gates.shape[1]
    H = dh_in.shape[1]
    full = dy.shape[1] == T
    dt = gates.dtype
    dh = np.empty((n, H), dt)
    dc = np.empty((n, H), dt)
    carry = np.zeros((n, H), dt)
    dzb = np.zeros((n, G * H), dt)
    dhn = np.empty((n, H), dt)
    dhk = np.empty((n, H), dt)
    zk = np.empty((n, H), dt)
    live = np.empty(n, np.bool_)
    for i in range(n):
        for j in range(H):
            dh[i, j] = dh_in[b0 + i, j]
            dc[i, j] = dc_in[b0 + i, j]
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if go_backwards else s
        for i in range(n):
            b = b0 + i
            # total gradient reaching the output of this step
            if full:
                for j in range(H):
                    carry[i, j] += dy[b, s, j]
            elif s == T - 1:
                for j in range(H):
                    carry[i, j] += dy[b, 0, j]
            live[i] = not (use_mask and not mask[b, t])
            d = dzb[i]
            if not live[i]:
                for j in range(G * H):
                    d[j] = 0.0
                    dz[b, t, j] = 0.0
                if zero_output:
                    for j in range(H):
                        carry[i, j] = 0.0
                continue
            g = gates[b, t]
            for j in range(H):
                dhj = dh[i, j] + carry[i, j]
                carry[i, j] = 0.0
                ac = actc[b, t, j]
                o = g[3 * H + j]
                d[3 * H + j] = dhj * ac
                dh[i, j] = dhj * o          # reused below as the gradient reaching a(c_t)
                dhk[i, j] = ac
            activate_grad(act, dhk[i], dh[i], 0, H)
            for j in range(H):
                dcj = dc[i, j] + dh[i, j]
                d[j] = dcj * g[2 * H + j]
                d[H + j] = dcj * cprev[b, t, j]
                d[2 * H + j] = dcj * g[j]
                dc[i, j] = dcj * g[H + j]
            activate_grad(ract, g, d, 0, 2 * H)
            activate_grad(act, g, d, 2 * H, 3 * H)
            activate_grad(ract, g, d, 3 * H, 4 * H)
            for j in range(G * H):
                dz[b, t, j] = d[j]
        # dh_{t-1} = sum_k (dz_k @ U_k^T) * r_k
        if use_rmask:
            for i in range(n):
                for j in range(H):
                    dhn[i, j] = 0.0
            for k in range(G):
                np.dot(dzb[:, k * H:(k + 1) * H].copy(), UgT[k], zk)
                for i in range(n):
                    for j in range(H):
                        dhn[i, j] += zk[i, j] * rmask[k, b0 + i, j]
        else:
            np.dot(dzb, UT, dhn)
        for i in range(n):
            if live[i]:
                for j in range(H):
                    dh[i, j] = dhn[i, j]
    for i in range(n):
        for j in range(H):
            dh0[b0 + i, j] = dh[i, j]
            dc0[b0 + i, j] = dc[i, j]


def forward(xw, U, rmask, mask, h0, c0, act, ract, go_backwards, zero_output,
            return_sequences, keep_cache, fast):
    """Run the LSTM recurrence over all batch slices.

    Returns ``y, h, c, cache`` with ``cache = (gates, hprev, cprev, actc)`` (or None when
    ``keep_cache`` is False). Arrays must be C-contiguous and of one float dtype.
    """
    B, T, _ = xw.shape
    H = h0.shape[1]
    dt = xw.dtype
    y = np.empty((B, T if return_sequences else 1, H), dt)
    h = np.empty((B, H), dt)
    c = np.empty((B, H), dt)
    shape = (B, T, H) if keep_cache else (0, 0, 0)
    gates = np.empty((B, T, G * H) if keep_cache else (0, 0, 0), dt)
    hprev, cprev, actc = np.empty(shape, dt), np.empty(shape, dt), np.empty(shape, dt)
    use_rmask = rmask is not None
    Ug = split_gates(U, G) if use_rmask else np.empty((G, 0, 0), dt)
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_forward_kernel, B, xw, U, Ug, rm, use_rmask, m, use_mask, h0, c0,
                       act, ract, fast, go_backwards, zero_output, keep_cache,
                       y, h, c, gates, hprev, cprev, actc)
    return y, h, c, ((gates, hprev, cprev, actc) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, dc, act, ract, go_backwards, zero_output):
    """Backward recurrence. Returns ``dz [B, T, 4H], dh0, dc0``."""
    gates, hprev, cprev, actc = cache
    B, T, _ = gates.shape
    H = U.shape[0]
    dt = gates.dtype
    dz = np.empty((B, T, G * H), dt)
    dh0 = np.empty((B, H), dt)
    dc0 = np.empty((B, H), dt)
    use_rmask = rmask is not None
    UT = np.ascontiguousarray(U.T)
    UgT = (np.ascontiguousarray(split_gates(U, G).transpose(0, 2, 1)) if use_rmask
           else np.empty((G, 0, 0), dt))
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_backward_kernel, B, gates, cprev, actc, UT, UgT, rm, use_rmask, m,
                       use_mask, dy, dh, dc, act, ract, go_backwards, zero_output,
                       dz, dh0, dc0)
    return dz, dh0, dc0


def split_gates(U, gates):
    """[H, gates*H] -> [gates, H, H], C-contiguous."""
    H = U.shape[0]
    return np.ascontiguousarray(U.reshape(H, gates, -1).transpose(1, 0, 2))
