"""Slow, plain NumPy reference for LSTM, GRU and SimpleRNN: the truth every kernel is checked
against. One time step at a time, one gate at a time, float64, no cleverness. It shares no
code with fastcells; it is itself checked by finite differences (tests/test_reference.py).

Semantics are Keras 3's (keras/src/layers/rnn and backend.rnn):
- gate order: LSTM i, f, c, o; GRU z, r, h. Weights in Keras layout: W [D, G*H],
  U [H, G*H], bias [G*H] (GRU reset_after: [2, 3H], row 0 input bias, row 1 recurrent).
- dropout masks: ``dmask`` is [B, D] (one mask for every gate) or [G, B, D] (one per gate,
  Keras's implementation=1); ``rmask`` is [B, H] or [G, B, H]. Applied as given.
- ``mask`` [B, T] bool: a masked step keeps the state; its output is the previous output
  (zeros before any step ran), or zeros with ``zero_output``.
- go_backwards: inputs are consumed from the last step to the first and outputs are
  returned in the order they were produced.

Forward functions return ``(outputs [B, T, H], final_states list)``; backward functions take
the upstream gradients of the outputs [B, T, H] and of the final states and return a dict
of gradients: x, kernel, recurrent_kernel, bias (None without bias) and the initial states.
"""
import numpy as np

ACTS = {
    "tanh": (np.tanh, lambda y: 1.0 - y * y),
    "sigmoid": (lambda x: 1.0 / (1.0 + np.exp(-x)), lambda y: y * (1.0 - y)),
    "relu": (lambda x: np.maximum(x, 0.0), lambda y: (y > 0).astype(y.dtype)),
    "linear": (lambda x: x, lambda y: np.ones_like(y)),
    "hard_sigmoid": (lambda x: np.clip(x + 3.0, 0.0, 6.0) / 6.0,
                     lambda y: ((y > 0) & (y < 1)).astype(y.dtype) / 6.0),
}
NGATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


def _per_gate(m, G, shape):
    if m is None:
        return [np.ones(shape)] * G
    m = np.asarray(m, np.float64)
    return [m[k] for k in range(G)] if m.ndim == 3 else [m] * G


def _steps(T, go_backwards):
    return [T - 1 - s for s in range(T)] if go_backwards else list(range(T))


# ---------------------------------------------------------------- one step of each cell
def _lstm_step(P, x, states, dm, rm):
    h, c = states
    W, U, b, act, ract = P["W"], P["U"], P["b"], P["act"], P["ract"]
    H = h.shape[1]
    pre = []
    for k in range(4):
        sl = slice(k * H, (k + 1) * H)
        p = (x * dm[k]) @ W[:, sl] + (h * rm[k]) @ U[:, sl]
        if b is not None:
            p = p + b[sl]
        pre.append(p)
    i = ACTS[ract][0](pre[0])
    f = ACTS[ract][0](pre[1])
    g = ACTS[act][0](pre[2])
    o = ACTS[ract][0](pre[3])
    c_new = f * c + i * g
    ac = ACTS[act][0](c_new)
    h_new = o * ac
    aux = dict(x=x, h=h, c=c, i=i, f=f, g=g, o=o, ac=ac)
    return [h_new, c_new], h_new, aux


def _lstm_step_back(P, aux, dstates, dm, rm, grads):
    dh, dc = dstates
    W, U, act, ract = P["W"], P["U"], P["act"], P["ract"]
    H = dh.shape[1]
    i, f, g, o, ac, c = aux["i"], aux["f"], aux["g"], aux["o"], aux["ac"], aux["c"]
    do = dh * ac
    dc = dc + dh * o * ACTS[act][1](ac)
    di, df, dg = dc * g, dc * c, dc * i
    dpre = [di * ACTS[ract][1](i), df * ACTS[ract][1](f), dg * ACTS[act][1](g),
            do * ACTS[ract][1](o)]
    dx = np.zeros_like(aux["x"])
    dh_prev = np.zeros_like(dh)
    for k in range(4):
        sl = slice(k * H, (k + 1) * H)
        grads["kernel"][:, sl] += (aux["x"] * dm[k]).T @ dpre[k]
        grads["recurrent_kernel"][:, sl] += (aux["h"] * rm[k]).T @ dpre[k]
        if grads["bias"] is not None:
            grads["bias"][sl] += dpre[k].sum(0)
        dx += (dpre[k] @ W[:, sl].T) * dm[k]
        dh_prev += (dpre[k] @ U[:, sl].T) * rm[k]
    return [dh_prev, dc * f], dx


def _gru_biases(P, H):
    b = P["b"]
    zero = np.zeros(3 * H)
    if b is None:
        return zero, zero
    if P["reset_after"]:
        return b[0], b[1]
    return b, zero


def _gru_step(P, x, states, dm, rm):
    (h,) = states
    W, U, act, ract = P["W"], P["U"], P["act"], P["ract"]
    H = h.shape[1]
    bi, br = _gru_biases(P, H)
    sz, sr, sh = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    xz = (x * dm[0]) @ W[:, sz] + bi[sz]
    xr = (x * dm[1]) @ W[:, sr] + bi[sr]
    xh = (x * dm[2]) @ W[:, sh] + bi[sh]
    z = ACTS[ract][0](xz + (h * rm[0]) @ U[:, sz] + br[sz])
    r = ACTS[ract][0](xr + (h * rm[1]) @ U[:, sr] + br[sr])
    if P["reset_after"]:
        rh = (h * rm[2]) @ U[:, sh] + br[sh]
        hh = ACTS[act][0](xh + r * rh)
    else:
        rh = None
        hh = ACTS[act][0](xh + (r * (h * rm[2])) @ U[:, sh])
    h_new = z * h + (1.0 - z) * hh
    return [h_new], h_new, dict(x=x, h=h, z=z, r=r, hh=hh, rh=rh)


def _gru_step_back(P, aux, dstates, dm, rm, grads):
    (dh,) = dstates
    W, U, act, ract = P["W"], P["U"], P["act"], P["ract"]
    H = dh.shape[1]
    x, h, z, r, hh = aux["x"], aux["h"], aux["z"], aux["r"], aux["hh"]
    sz, sr, sh = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    dz = dh * (h - hh)
    dah = dh * (1.0 - z) * ACTS[act][1](hh)
    dh_prev = dh * z
    if P["reset_after"]:
        drh = dah * r
        dr = dah * aux["rh"]
        grads["recurrent_kernel"][:, sh] += (h * rm[2]).T @ drh
        dh_prev += (drh @ U[:, sh].T) * rm[2]
    else:
        hr = h * rm[2]
        q = r * hr
        dq = dah @ U[:, sh].T
        grads["recurrent_kernel"][:, sh] += q.T @ dah
        dr = dq * hr
        dh_prev += dq * r * rm[2]
        drh = None
    daz = dz * ACTS[ract][1](z)
    dar = dr * ACTS[ract][1](r)
    for k, (sl, d) in enumerate([(sz, daz), (sr, dar)]):
        grads["recurrent_kernel"][:, sl] += (h * rm[k]).T @ d
        dh_prev += (d @ U[:, sl].T) * rm[k]
    dx = np.zeros_like(x)
    for k, (sl, d) in enumerate([(sz, daz), (sr, dar), (sh, dah)]):
        grads["kernel"][:, sl] += (x * dm[k]).T @ d
        dx += (d @ W[:, sl].T) * dm[k]
    if grads["bias"] is not None:
        if P["reset_after"]:
            grads["bias"][0] += np.concatenate([daz.sum(0), dar.sum(0), dah.sum(0)])
            grads["bias"][1] += np.concatenate([daz.sum(0), dar.sum(0), drh.sum(0)])
        else:
            grads["bias"] += np.concatenate([daz.sum(0), dar.sum(0), dah.sum(0)])
    return [dh_prev], dx


def _rnn_step(P, x, states, dm, rm):
    (h,) = states
    pre = (x * dm[0]) @ P["W"] + (h * rm[0]) @ P["U"]
    if P["b"] is not None:
        pre = pre + P["b"]
    h_new = ACTS[P["act"]][0](pre)
    return [h_new], h_new, dict(x=x, h=h, y=h_new)


def _rnn_step_back(P, aux, dstates, dm, rm, grads):
    (dh,) = dstates
    dpre = dh * ACTS[P["act"]][1](aux["y"])
    grads["kernel"] += (aux["x"] * dm[0]).T @ dpre
    grads["recurrent_kernel"] += (aux["h"] * rm[0]).T @ dpre
    if grads["bias"] is not None:
        grads["bias"] += dpre.sum(0)
    return [(dpre @ P["U"].T) * rm[0]], (dpre @ P["W"].T) * dm[0]


CELLS = {"lstm": (_lstm_step, _lstm_step_back), "gru": (_gru_step, _gru_step_back),
         "simple_rnn": (_rnn_step, _rnn_step_back)}


# ---------------------------------------------------------------- the recurrence
def _run(cell, x, W, U, b, states, mask, go_backwards, zero_output, dmask, rmask, act, ract,
         reset_after):
    x = np.asarray(x, np.float64)
    B, T, D = x.shape
    H = U.shape[0]
    G = NGATES[cell]
    P = dict(W=np.asarray(W, np.float64), U=np.asarray(U, np.float64),
             b=None if b is None else np.asarray(b, np.float64), act=act, ract=ract,
             reset_after=reset_after)
    dm = _per_gate(dmask, G, (B, D))
    rm = _per_gate(rmask, G, (B, H))
    states = [np.asarray(s, np.float64).copy() for s in states]
    out = np.zeros((B, H))
    ys, tape = [], []
    step = CELLS[cell][0]
    for t in _steps(T, go_backwards):
        m = np.ones((B, 1), bool) if mask is None else np.asarray(mask, bool)[:, t:t + 1]
        new_states, y, aux = step(P, x[:, t], states, dm, rm)
        states = [np.where(m, ns, s) for ns, s in zip(new_states, states)]
        out = np.where(m, y, 0.0 if zero_output else out)
        ys.append(out)
        tape.append((t, m, aux))
    return np.stack(ys, 1), states, (P, dm, rm, tape)


def _run_back(cell, x, W, b, nstates, run, dy, dstates, zero_output):
    P, dm, rm, tape = run
    B, T, D = np.shape(x)
    grads = dict(x=np.zeros((B, T, D)), kernel=np.zeros(np.shape(W)),
                 recurrent_kernel=np.zeros(P["U"].shape),
                 bias=None if b is None else np.zeros(np.shape(b)))
    back = CELLS[cell][1]
    dy = np.zeros((B, T, P["U"].shape[0])) if dy is None else np.asarray(dy, np.float64)
    ds = [np.zeros((B, P["U"].shape[0])) if d is None else np.asarray(d, np.float64).copy()
          for d in (dstates or [None] * nstates)]
    dout = np.zeros_like(ds[0])          # gradient reaching the previous output
    for s in range(T - 1, -1, -1):
        t, m, aux = tape[s]
        dout = dout + dy[:, s]
        # the step's own result is used where m, the previous state/output elsewhere
        ds_new = [np.where(m, d, 0.0) for d in ds]
        ds_new[0] = ds_new[0] + np.where(m, dout, 0.0)
        ds_prev, dx = back(P, aux, ds_new, dm, rm, grads)
        grads["x"][:, t] = dx
        ds = [dp + np.where(m, 0.0, d) for dp, d in zip(ds_prev, ds)]
        dout = np.where(m, 0.0, 0.0 if zero_output else dout)
    return grads, ds


def _api(cell, nstates):
    def forward(x, kernel, recurrent_kernel, bias, *states, mask=None, go_backwards=False,
                zero_output_for_mask=False, dropout_mask=None, recurrent_dropout_mask=None,
                activation="tanh", recurrent_activation="sigmoid", reset_after=True):
        y, st, _ = _run(cell, x, kernel, recurrent_kernel, bias, states, mask, go_backwards,
                        zero_output_for_mask, dropout_mask, recurrent_dropout_mask,
                        activation, recurrent_activation, reset_after)
        return y, st

    def backward(x, kernel, recurrent_kernel, bias, *states, d_outputs=None, d_states=None,
                 mask=None, go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                 recurrent_dropout_mask=None, activation="tanh",
                 recurrent_activation="sigmoid", reset_after=True):
        _, _, run = _run(cell, x, kernel, recurrent_kernel, bias, states, mask, go_backwards,
                         zero_output_for_mask, dropout_mask, recurrent_dropout_mask,
                         activation, recurrent_activation, reset_after)
        grads, ds = _run_back(cell, x, kernel, bias, nstates, run, d_outputs, d_states,
                              zero_output_for_mask)
        grads["states"] = ds
        return grads

    return forward, backward


lstm_forward, lstm_backward = _api("lstm", 2)
gru_forward, gru_backward = _api("gru", 1)
simple_rnn_forward, simple_rnn_backward = _api("simple_rnn", 1)
