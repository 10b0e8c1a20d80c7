"""GRU recurrence on the CPU, both Keras variants (reset_after True and False).

Gate order z, r, h (G = 3). With ``xw = x @ W + b_in`` and recurrent dropout masks r_k:
  reset_after=True:   a_k = (h * r_k) @ U_k + b_rec_k      for k in z, r, h
                      z = s(xw_z + a_z)   r = s(xw_r + a_r)   hh = act(xw_h + r * a_h)
  reset_after=False:  z = s(xw_z + (h*r_z) @ U_z)   r = s(xw_r + (h*r_r) @ U_r)
                      q = r * (h * r_h)   hh = act(xw_h + q @ U_h)
  h_t = z * h_{t-1} + (1 - z) * hh
Same conventions as ``fastcells.cpu.lstm``.
"""
import numpy as np
from numba import njit

from .. import config
from .._math import activate, activate_grad
from ._parallel import run_batch_parallel
from .lstm import split_gates

G = 3


@njit(**config.NJIT_OPTIONS)
def _forward_kernel(b0, b1, xw, U, Ug, brec, rmask, use_rmask, mask, use_mask, h0,
                    act, ract, fast, reset_after, go_backwards, zero_output, keep_cache,
                    y, h_out, gates, hprev, aux):
    # xw:    [B, T, 3H]  x @ W + input bias (input dropout already applied)
    # U:     [H, 3H]     recurrent kernel (used without recurrent dropout)
    # Ug:    [3, H, H]   recurrent kernel split per gate
    # brec:  [3H]        recurrent bias (reset_after; zeros otherwise)
    # rmask: [3, B, H]   recurrent dropout mask per gate
    # mask:  [B, T];  h0: [B, H];  y: [B, T, H] or [B, 1, H];  h_out: [B, H]
    # cache: gates [B, T, 3H] (z, r, hh); hprev [B, T, H];
    #        aux [B, T, H] = a_h (reset_after) or q (reset_after=False)
    n = b1 - b0
    T = xw.shape[1]
    H = h0.shape[1]
    full = y.shape[1] == T
    dt = xw.dtype
    h = np.empty((n, H), dt)
    out = np.zeros((n, H), dt)
    rec = np.empty((n, G * H), dt)
    hr = np.empty((n, H), dt)
    zk = np.empty((n, H), dt)
    q = np.empty((n, H), dt)
    rows = np.empty((n, G * H), dt)
    live = np.empty(n, np.bool_)
    for i in range(n):
        for j in range(H):
            h[i, j] = h0[b0 + i, j]
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        # recurrent terms of z and r (and of h when reset_after)
        if use_rmask:
            for k in range(G if reset_after else 2):
                for i in range(n):
                    for j in range(H):
                        hr[i, j] = h[i, j] * rmask[k, b0 + i, j]
                np.dot(hr, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        rec[i, k * H + j] = zk[i, j]
        elif reset_after:
            np.dot(h, U, rec)
        else:
            for k in range(2):
                np.dot(h, Ug[k], zk)
                for i in range(n):
                    for j in range(H):
                        rec[i, k * H + j] = zk[i, j]
        for i in range(n):
            b = b0 + i
            live[i] = not (use_mask and not mask[b, t])
            if not live[i]:
                continue
            g = rows[i]
            for j in range(2 * H):
                g[j] = xw[b, t, j] + rec[i, j] + brec[j]
            activate(ract, fast, g, 0, 2 * H)
            if reset_after:
                for j in range(H):
                    a_h = rec[i, 2 * H + j] + brec[2 * H + j]
                    q[i, j] = a_h
                    g[2 * H + j] = xw[b, t, 2 * H + j] + g[H + j] * a_h
            else:
                for j in range(H):
                    hrh = h[i, j] * rmask[2, b, j] if use_rmask else h[i, j]
                    q[i, j] = g[H + j] * hrh
        if not reset_after:
            np.dot(q, Ug[2], zk)
            for i in range(n):
                if live[i]:
                    for j in range(H):
                        rows[i, 2 * H + j] = xw[b0 + i, t, 2 * H + j] + zk[i, j]
        for i in range(n):
            b = b0 + i
            if keep_cache:
                for j in range(H):
                    hprev[b, t, j] = h[i, j]
            if not live[i]:
                if zero_output:
                    for j in range(H):
                        out[i, j] = 0.0
                if keep_cache:
                    # aux feeds the dU GEMM, where 0 * garbage could be NaN
                    for j in range(H):
                        aux[b, t, j] = 0.0
            else:
                g = rows[i]
                activate(act, fast, g, 2 * H, 3 * H)
                for j in range(H):
                    z = g[j]
                    h[i, j] = z * h[i, j] + (1.0 - z) * g[2 * H + j]
                    out[i, j] = h[i, j]
                if keep_cache:
                    for j in range(G * H):
                        gates[b, t, j] = g[j]
                    for j in range(H):
                        aux[b, t, j] = q[i, j]
            if full or s == T - 1:
                so = s if full else 0
                for j in range(H):
                    y[b, so, j] = out[i, j]
    for i in range(n):
        for j in range(H):
            h_out[b0 + i, j] = h[i, j]


# Backward per processed step, dh the gradient reaching h_t (state and output):
#   dz  = dh * (h_{t-1} - hh)          dah = dh * (1 - z) * act'(hh)     dh_{t-1} = dh * z + ...
#   reset_after:  dr = dah * a_h       da_h = dah * r
#   otherwise:    dq = dah @ U_h^T     dr = dq * (h_{t-1} * r_h)        dh_{t-1} += dq * r * r_h
#   daz = dz * s'(z)   dar = dr * s'(r)
#   dh_{t-1} += sum_k (da_k @ U_k^T) * r_k   over z, r (and h with da_h when reset_after)
# Outputs: dz [B, T, 3H] = (daz, dar, dah), the gradient of the input-side pre-activations,
# and dah_rec [B, T, H] = da_h (reset_after only), the gradient of the recurrent h term.
@njit(**config.NJIT_OPTIONS)
def _backward_kernel(b0, b1, gates, hprev, aux, UT, UgT, rmask, use_rmask, mask, use_mask,
                     dy, dh_in, act, ract, reset_after, go_backwards, zero_output,
                     dz, dah_rec, dh0):
    # gates, hprev, aux: the forward cache;  UT: [3H, H];  UgT: [3, H, H] per-gate transposes
    # dy: [B, T, H] or [B, 1, H];  dh_in: [B, H]
    # dz: [B, T, 3H] out;  dah_rec: [B, T, H] out (reset_after);  dh0: [B, H] out
    n = b1 - b0
    T = gates.shape[1]
    H = dh_in.shape[1]
    full = dy.shape[1] == T
    dt = gates.dtype
    dh = np.empty((n, H), dt)
    dhz = np.empty((n, H), dt)           # dh * z, the direct path to h_{t-1}
    carry = np.zeros((n, H), dt)
    da = np.zeros((n, G * H), dt)        # daz, dar, and dah (input side)
    drec = np.zeros((n, G * H), dt)      # daz, dar, da_h (recurrent side)
    dq = np.empty((n, H), dt)
    dhn = np.empty((n, H), dt)
    zk = np.empty((n, H), dt)
    dk = np.empty((n, H), dt)
    live = np.empty(n, np.bool_)
    for i in range(n):
        for j in range(H):
            dh[i, j] = dh_in[b0 + i, j]
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if go_backwards else s
        for i in range(n):
            b = b0 + i
            if full:
                for j in range(H):
                    carry[i, j] += dy[b, s, j]
            elif s == T - 1:
                for j in range(H):
                    carry[i, j] += dy[b, 0, j]
            live[i] = not (use_mask and not mask[b, t])
            if not live[i]:
                for j in range(G * H):
                    da[i, j] = 0.0
                    drec[i, j] = 0.0
                    dz[b, t, j] = 0.0
                if reset_after:
                    for j in range(H):
                        dah_rec[b, t, j] = 0.0
                if zero_output:
                    for j in range(H):
                        carry[i, j] = 0.0
                continue
            g = gates[b, t]
            d = da[i]
            for j in range(H):
                dhj = dh[i, j] + carry[i, j]
                carry[i, j] = 0.0
                z = g[j]
                d[j] = dhj * (hprev[b, t, j] - g[2 * H + j])
                d[2 * H + j] = dhj * (1.0 - z)
                dhz[i, j] = dhj * z
            activate_grad(act, g, d, 2 * H, 3 * H)
            if reset_after:
                for j in range(H):
                    d[H + j] = d[2 * H + j] * aux[b, t, j]
                    drec[i, 2 * H + j] = d[2 * H + j] * g[H + j]
        if not reset_after:
            for i in range(n):
                for j in range(H):
                    dk[i, j] = da[i, 2 * H + j]
            np.dot(dk, UgT[2], dq)
            for i in range(n):
                if live[i]:
                    b = b0 + i
                    for j in range(H):
                        hrh = hprev[b, t, j] * rmask[2, b, j] if use_rmask else hprev[b, t, j]
                        da[i, H + j] = dq[i, j] * hrh
                        r_h = rmask[2, b, j] if use_rmask else 1.0
                        dhz[i, j] += dq[i, j] * gates[b, t, H + j] * r_h
        for i in range(n):
            if live[i]:
                b = b0 + i
                activate_grad(ract, gates[b, t], da[i], 0, 2 * H)
                for j in range(2 * H):
                    drec[i, j] = da[i, j]
                for j in range(G * H):
                    dz[b, t, j] = da[i, j]
                if reset_after:
                    for j in range(H):
                        dah_rec[b, t, j] = drec[i, 2 * H + j]
        # dh_{t-1} = dh * z + sum_k (drec_k @ U_k^T) * r_k
        nk = G if reset_after else 2
        if use_rmask or not reset_after:
            for i in range(n):
                for j in range(H):
                    dhn[i, j] = dhz[i, j]
            for k in range(nk):
                for i in range(n):
                    for j in range(H):
                        dk[i, j] = drec[i, k * H + j]
                np.dot(dk, UgT[k], zk)
                for i in range(n):
                    for j in range(H):
                        r_k = rmask[k, b0 + i, j] if use_rmask else 1.0
                        dhn[i, j] += zk[i, j] * r_k
        else:
            np.dot(drec, UT, dhn)
            for i in range(n):
                for j in range(H):
                    dhn[i, j] += dhz[i, j]
        for i in range(n):
            if live[i]:
                for j in range(H):
                    dh[i, j] = dhn[i, j]
    for i in range(n):
        for j in range(H):
            dh0[b0 + i, j] = dh[i, j]


def forward(xw, U, brec, rmask, mask, h0, act, ract, reset_after, go_backwards, zero_output,
            return_sequences, keep_cache, fast):
    """Run the GRU recurrence. Returns ``y, h, cache`` with ``cache = (gates, hprev, aux)``."""
    B, T, _ = xw.shape
    H = h0.shape[1]
    dt = xw.dtype
    y = np.empty((B, T if return_sequences else 1, H), dt)
    h = np.empty((B, H), dt)
    shape = (B, T, H) if keep_cache else (0, 0, 0)
    gates = np.empty((B, T, G * H) if keep_cache else (0, 0, 0), dt)
    hprev, aux = np.empty(shape, dt), np.empty(shape, dt)
    use_rmask = rmask is not None
    Ug = split_gates(U, G)
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_forward_kernel, B, xw, U, Ug, brec, rm, use_rmask, m, use_mask, h0,
                       act, ract, fast, reset_after, go_backwards, zero_output, keep_cache,
                       y, h, gates, hprev, aux)
    return y, h, ((gates, hprev, aux) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, ract, reset_after, go_backwards, zero_output):
    """Backward recurrence. Returns ``dz [B, T, 3H], dah_rec [B, T, H] or None, dh0``."""
    gates, hprev, aux = cache
    B, T, _ = gates.shape
    H = U.shape[0]
    dt = gates.dtype
    dz = np.empty((B, T, G * H), dt)
    dah_rec = np.empty((B, T, H) if reset_after else (0, 0, 0), dt)
    dh0 = np.empty((B, H), dt)
    use_rmask = rmask is not None
    UT = np.ascontiguousarray(U.T)
    UgT = np.ascontiguousarray(split_gates(U, G).transpose(0, 2, 1))
    rm = rmask if use_rmask else np.empty((G, 0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_backward_kernel, B, gates, hprev, aux, UT, UgT, rm, use_rmask, m,
                       use_mask, dy, dh, act, ract, reset_after, go_backwards, zero_output,
                       dz, dah_rec, dh0)
    return dz, (dah_rec if reset_after else None), dh0
