"""SimpleRNN recurrence on the CPU: h_t = act(xw_t + (h_{t-1} * r) @ U).

Same conventions as ``fastcells.cpu.lstm`` (G = 1 gate).
"""
import numpy as np
from numba import njit

from .. import config
from .._math import activate, activate_grad
from ._parallel import run_batch_parallel


@njit(**config.NJIT_OPTIONS)
def _forward_kernel(b0, b1, xw, U, rmask, use_rmask, mask, use_mask, h0,
                    act, fast, go_backwards, zero_output, keep_cache,
                    y, h_out, hs, hprev):
    # xw:    [B, T, H]   x @ W + b (input dropout already applied)
    # U:     [H, H]      recurrent kernel
    # rmask: [B, H]      recurrent dropout mask
    # mask:  [B, T]      True where the step is processed
    # h0:    [B, H]      initial state
    # y:     [B, T, H] or [B, 1, H];  h_out: [B, H]
    # cache: hs [B, T, H] = act(pre) of the step; hprev [B, T, H] the state entering step t
    n = b1 - b0
    T = xw.shape[1]
    H = h0.shape[1]
    full = y.shape[1] == T
    dt = xw.dtype
    h = np.empty((n, H), dt)
    hr = np.empty((n, H), dt)
    z = np.empty((n, H), dt)
    out = np.zeros((n, H), dt)
    row = np.empty(H, dt)
    for i in range(n):
        for j in range(H):
            h[i, j] = h0[b0 + i, j]
    for s in range(T):
        t = T - 1 - s if go_backwards else s
        if use_rmask:
            for i in range(n):
                for j in range(H):
                    hr[i, j] = h[i, j] * rmask[b0 + i, j]
            np.dot(hr, U, z)
        else:
            np.dot(h, U, z)
        for i in range(n):
            b = b0 + i
            if keep_cache:
                for j in range(H):
                    hprev[b, t, j] = h[i, j]
            if use_mask and not mask[b, t]:
                if zero_output:
                    for j in range(H):
                        out[i, j] = 0.0
            else:
                g = hs[b, t] if keep_cache else row
                for j in range(H):
                    g[j] = xw[b, t, j] + z[i, j]
                activate(act, fast, g, 0, H)
                for j in range(H):
                    h[i, j] = g[j]
                    out[i, j] = g[j]
            if full or s == T - 1:
                so = s if full else 0
                for j in range(H):
                    y[b, so, j] = out[i, j]
    for i in range(n):
        for j in range(H):
            h_out[b0 + i, j] = h[i, j]


# Backward per processed step: dz = (dh + dout) * act'(h_t);  dh_{t-1} = (dz @ U^T) * r.
# Masked steps pass dh through and have dz = 0 (output gradient handling as in lstm.py).
@njit(**config.NJIT_OPTIONS)
def _backward_kernel(b0, b1, hs, UT, rmask, use_rmask, mask, use_mask, dy, dh_in,
                     act, go_backwards, zero_output, dz, dh0):
    # hs:   [B, T, H] forward cache;  UT: [H, H] U transposed
    # dy:   [B, T, H] or [B, 1, H];   dh_in: [B, H]
    # dz:   [B, T, H] out: gradient of the pre-activation;  dh0: [B, H] out
    n = b1 - b0
    T = hs.shape[1]
    H = dh_in.shape[1]
    full = dy.shape[1] == T
    dt = hs.dtype
    dh = np.empty((n, H), dt)
    carry = np.zeros((n, H), dt)
    dzb = np.zeros((n, H), dt)
    dhn = np.empty((n, H), dt)
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
            d = dzb[i]
            if not live[i]:
                for j in range(H):
                    d[j] = 0.0
                    dz[b, t, j] = 0.0
                if zero_output:
                    for j in range(H):
                        carry[i, j] = 0.0
                continue
            for j in range(H):
                d[j] = dh[i, j] + carry[i, j]
                carry[i, j] = 0.0
            activate_grad(act, hs[b, t], d, 0, H)
            for j in range(H):
                dz[b, t, j] = d[j]
        np.dot(dzb, UT, dhn)
        for i in range(n):
            if live[i]:
                for j in range(H):
                    dh[i, j] = dhn[i, j] * rmask[b0 + i, j] if use_rmask else dhn[i, j]
    for i in range(n):
        for j in range(H):
            dh0[b0 + i, j] = dh[i, j]


def forward(xw, U, rmask, mask, h0, act, go_backwards, zero_output, return_sequences,
            keep_cache, fast):
    """Run the SimpleRNN recurrence. Returns ``y, h, cache`` with ``cache = (hs, hprev)``."""
    B, T, H = xw.shape
    dt = xw.dtype
    y = np.empty((B, T if return_sequences else 1, H), dt)
    h = np.empty((B, H), dt)
    shape = (B, T, H) if keep_cache else (0, 0, 0)
    hs, hprev = np.empty(shape, dt), np.empty(shape, dt)
    use_rmask = rmask is not None
    rm = rmask if use_rmask else np.empty((0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_forward_kernel, B, xw, U, rm, use_rmask, m, use_mask, h0, act, fast,
                       go_backwards, zero_output, keep_cache, y, h, hs, hprev)
    return y, h, ((hs, hprev) if keep_cache else None)


def backward(cache, U, rmask, mask, dy, dh, act, go_backwards, zero_output):
    """Backward recurrence. Returns ``dz [B, T, H], dh0``."""
    hs, _ = cache
    B, T, H = hs.shape
    dt = hs.dtype
    dz = np.empty((B, T, H), dt)
    dh0 = np.empty((B, H), dt)
    use_rmask = rmask is not None
    rm = rmask if use_rmask else np.empty((0, 0), dt)
    use_mask = mask is not None
    m = mask if use_mask else np.empty((0, 0), np.bool_)
    run_batch_parallel(_backward_kernel, B, hs, np.ascontiguousarray(U.T), rm, use_rmask, m,
                       use_mask, dy, dh, act, go_backwards, zero_output, dz, dh0)
    return dz, dh0
