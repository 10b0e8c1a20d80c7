"""The work behind ``fastcells.ops``: preparation, the forward recurrence and the backward.

``prepare`` turns the checked arguments of a forward into a ``Cache``; ``run_forward`` runs
the input projection and the recurrence on the engine's kernels (in chunks of
``checkpoint_steps`` when asked); ``run_backward`` runs the backward recurrence per chunk and
the weight-gradient GEMMs, or the fused kernels that compute both. Results are plain tuples,
which ``ops`` returns as its ``Forward`` and ``Gradients``. The names without an underscore
are what ``ops`` uses; the rest serve them.
"""
import contextlib
from types import SimpleNamespace

import numpy as np

from . import _coldstart, _math, config
from ._validate import (as_float_array, check_activation, check_checkpoint, check_dout,
                        check_dropout, check_mask, check_state, check_weight, check_x,
                        contiguous, to_host)
from .cpu._fpstate import flushing_denormals as _ftz
from .cpu._parallel import single_threaded_blas as _blas_held


# --------------------------------------------------------------------------- caches, engines
class Cache:
    """Everything a backward pass needs; opaque to users."""

    __slots__ = ("cell", "eng", "x", "xt", "W", "U", "b", "bias_shape", "states", "dmask",
                 "rmask", "mask", "mask_t", "opts", "kcache", "B", "T", "H",
                 "return_sequences", "dtype", "fast", "coef", "checkpoint", "chunks", "fused",
                 "V", "released", "from_x", "Wb")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


_ENGINE_MODULES = {}


def engine_modules(name):
    """The kernel modules of an engine: ``linalg`` (layouts, projection, GEMMs) and one
    driver module per cell, with the same functions on the CPU and on the GPU."""
    mods = _ENGINE_MODULES.get(name)
    if mods is None:
        if name == "cpu":
            from .cpu import _linalg, gru, lstm, simple_rnn
        else:
            from .cuda import _linalg, gru, lstm, simple_rnn
        mods = SimpleNamespace(name=name, linalg=_linalg, lstm=lstm, gru=gru,
                               simple_rnn=simple_rnn)
        _ENGINE_MODULES[name] = mods
    return mods


def check_cache(cache, cell):
    """``cache`` must be a live cache of a ``cell`` forward."""
    if not isinstance(cache, Cache) or cache.cell != cell:
        raise TypeError(f"cache must be the cache returned by {cell}_forward(..., training=True)"
                        f", got {type(cache).__name__}")
    if cache.released:
        raise ValueError(f"this {cell} cache was released (its backward already ran through a "
                         f"framework bridge); run {cell}_forward again")


# --------------------------------------------------------------------------- preparation
def prepare(kind, eng, x, kernel, recurrent_kernel, bias, states, *, mask, go_backwards,
            zero_output_for_mask, dropout_mask, recurrent_dropout_mask, activation,
            recurrent_activation, reset_after, training, return_sequences, checkpoint_steps):
    """Validate and normalise the arguments of a forward pass into a ``Cache`` (no kernel
    results yet). ``kind`` is the cell's record in ``ops.CELLS`` (its name, gates and state
    names), ``eng`` the engine the call runs on ("cpu" or "cuda")."""
    cell, G, names = kind.name, kind.gates, kind.states
    E = engine_modules(eng)
    x = check_x(x, eng)
    B, T, D = (int(n) for n in x.shape)
    dt = np.dtype(x.dtype)
    U = as_float_array("recurrent_kernel", recurrent_kernel, eng)
    if U.ndim != 2 or U.shape[1] % G or U.shape[0] * G != U.shape[1]:
        raise ValueError(f"recurrent_kernel must have shape (units, {G} * units), "
                         f"got {tuple(U.shape)}")
    H = int(U.shape[0])
    U = contiguous(U, dt, eng)
    W = check_weight("kernel", kernel, (D, G * H), dt, eng)
    mask = check_mask(mask, B, T, eng)
    dmask = rmask = None
    if training:
        dmask = check_dropout("dropout_mask", dropout_mask, G, B, D, dt, eng)
        rmask = check_dropout("recurrent_dropout_mask", recurrent_dropout_mask, G, B, H, dt,
                               eng, per_gate_only=cell != "simple_rnn")
    if cell == "simple_rnn":
        dmask = dmask[0] if dmask is not None and dmask.ndim == 3 else dmask
        rmask = rmask[0] if rmask is not None and rmask.ndim == 3 else rmask
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    b = None if bias is None else check_weight("bias", bias, bshape, dt, eng)
    if len(states) > len(names):
        raise ValueError(f"{cell} takes {len(names)} initial state(s) {names}, got "
                         f"{len(states)}")
    states = list(states) + [None] * (len(names) - len(states))
    # the states not given are zeros, from one fill (one launch on the GPU)
    zeros = iter(E.linalg.zeros_group([(B, H) for s in states if s is None], dt))
    states = tuple(next(zeros) if s is None else check_state(n, s, B, H, dt, eng)
                   for n, s in zip(names, states))
    opts = dict(act=check_activation("activation", activation),
                go_backwards=bool(go_backwards), zero_output=bool(zero_output_for_mask))
    if cell != "simple_rnn":
        opts["ract"] = check_activation("recurrent_activation", recurrent_activation)
    if cell == "gru":
        opts["reset_after"] = bool(reset_after)
    fast = bool(config.FAST_FLOAT32_ACTIVATIONS if dt == np.float32 else
                eng == "cpu" and config.FAST_FLOAT64_ACTIVATIONS)
    codes = {"lstm": ("ract", "ract", "act", "ract"), "gru": ("ract", "ract"),
             "simple_rnn": ("act",)}[cell]
    coef = _math.gate_coefficients([opts[k] for k in codes], H, dt) if fast else None
    la = E.linalg
    # the weights each fused step multiplies by, [W; U; b], stay near the core
    fits = (D + H + 1) * G * H * dt.itemsize <= config.FUSED_MAX_WEIGHT_BYTES
    fused = bool(eng == "cpu" and config.FUSED and cell == "lstm" and rmask is None and
                 (dmask is None or dmask.ndim == 2) and fits)
    # GRU and SimpleRNN: the projection inside the step (the backward builds xt if needed)
    from_x = bool(eng == "cpu" and config.FUSED and cell != "lstm" and
                  (dmask is None or dmask.ndim == 2) and fits)
    V = xt = Wb = None
    if fused:       # the kernels read x itself and project inside each step
        x = np.ascontiguousarray(x)
        V = np.concatenate([W, U, (b if b is not None else np.zeros(G * H, dt))[None]])
    elif from_x:
        x = np.ascontiguousarray(x)
        b_in = b if cell == "simple_rnn" or not reset_after else (None if b is None else b[0])
        Wb = np.concatenate([W, (b_in if b_in is not None else np.zeros(G * H, dt))[None]])
    elif B:     # an inference call reads x only during the call (training keeps a copy)
        xt = la.time_major(x, shared=not training)
        if dmask is not None and dmask.ndim == 2:
            la.apply_shared_mask(xt, dmask)   # once, for the projection and dW
    mask_t = None
    if mask is not None:
        mask_t = np.ascontiguousarray(mask.T)
        if eng == "cuda":
            mask_t = la.to_device(mask_t)
    return Cache(cell=cell, eng=E, x=x, xt=xt, W=W, U=U, b=b,
                  bias_shape=None if b is None else tuple(b.shape), states=states,
                  dmask=dmask, rmask=rmask, mask=mask, mask_t=mask_t, opts=opts, kcache=None,
                  B=B, T=T, H=H, return_sequences=bool(return_sequences), dtype=dt, fast=fast,
                  coef=coef, checkpoint=check_checkpoint(checkpoint_steps, T), chunks=None,
                  fused=fused, V=V, released=False, from_x=from_x, Wb=Wb)


# --------------------------------------------------------------------------- the recurrence
def _chunk_spans(p):
    """(s0, s1, t0, t1) per chunk: processing steps [s0, s1) read input times [t0, t1), a
    contiguous range also with go_backwards (processed from its end)."""
    K = p.checkpoint or p.T
    spans = []
    for s0 in range(0, p.T, K):
        s1 = min(s0 + K, p.T)
        t0, t1 = (p.T - s1, p.T - s0) if p.opts["go_backwards"] else (s0, s1)
        spans.append((s0, s1, t0, t1))
    return spans


def _recur(p, t0, t1, states, out0, keep, return_sequences):
    """Projection and recurrence over input times [t0, t1): ``y, final states, kcache``."""
    E, la, o = p.eng, p.eng.linalg, p.opts
    m = None if p.mask_t is None else (p.mask_t if (t0, t1) == (0, p.T) else p.mask_t[t0:t1])
    if p.fused:
        y, h, c, kc = E.lstm.forward_fused(p.x, t0, t1 - t0, p.V, p.dmask, m, states[0],
                                           states[1], o["act"], o["ract"], o["go_backwards"],
                                           o["zero_output"], return_sequences, keep, p.fast,
                                           p.coef, out0=out0)
        return y, (h, c), kc
    if p.from_x:
        xt = None
        fx = dict(x=p.x, t_off=t0, T=t1 - t0, Wb=p.Wb, dmask=p.dmask)
    else:
        xt = p.xt if (t0, t1) == (0, p.T) else p.xt[t0:t1]
        fx = {}
    if p.cell == "lstm":
        xw = la.project(xt, p.W, p.b, p.dmask, 4)
        y, h, c, kc = E.lstm.forward(xw, p.U, p.rmask, m, states[0], states[1], o["act"],
                                     o["ract"], o["go_backwards"], o["zero_output"],
                                     return_sequences, keep, p.fast, p.coef, out0=out0)
        new = (h, c)
    elif p.cell == "gru":
        ra = o["reset_after"]
        b_in = None if p.b is None else (p.b[0] if ra else p.b)
        brec = p.b[1] if (p.b is not None and ra) else la.zeros((3 * p.H,), p.dtype)
        xw = None if p.from_x else la.project(xt, p.W, b_in, p.dmask, 3)
        y, h, kc = E.gru.forward(xw, p.U, brec, p.rmask, m, states[0], o["act"], o["ract"],
                                 ra, o["go_backwards"], o["zero_output"], return_sequences,
                                 keep, p.fast, p.coef, out0=out0, **fx)
        new = (h,)
    else:
        xw = None if p.from_x else la.project(xt, p.W, p.b, p.dmask, 1)
        y, h, kc = E.simple_rnn.forward(xw, p.U, p.rmask, m, states[0], o["act"],
                                        o["go_backwards"], o["zero_output"], return_sequences,
                                        keep, p.fast, out0=out0, **fx)
        new = (h,)
    if xw is not None:
        la.give_back(xw)
    return y, new, kc


def run_forward(p, training):
    """Run the recurrence of a prepared call: ``outputs, final states, cache`` (the cache
    None unless training)."""
    B, T, H, dt = p.B, p.T, p.H, p.dtype
    la = p.eng.linalg
    if B == 0:
        y = la.zeros((0, T, H) if p.return_sequences else (0, H), dt)
        p.kcache = ()
        return y, tuple(la.zeros((0, H), dt) for _ in p.states), p if training else None
    keep = bool(training)
    with _held(p.eng.name), _coldstart.training_forward(p, keep):  # see _Held
        if p.checkpoint is None or not keep:
            y, states, kc = _recur(p, 0, T, p.states, None, keep, p.return_sequences)
            p.kcache = kc
            out = la.finish_outputs(y, p.return_sequences)
        else:
            out, states = _run_forward_chunked(p, keep)
    if not keep:
        la.give_back(p.xt)
        p.xt = None
        p.released = True
    return out, states, p if keep else None


def _run_forward_chunked(p, keep):
    """Forward in chunks of ``p.checkpoint`` steps, keeping only the states entering each
    chunk (and the output a masked step would repeat) for the backward to recompute from."""
    la = p.eng.linalg
    B, T, H, dt = p.B, p.T, p.H, p.dtype
    rs = p.return_sequences
    y = la.empty((T, B, H) if rs else (1, B, H), dt)
    states, out0 = p.states, None
    chunks = []
    for s0, s1, t0, t1 in _chunk_spans(p):
        if s0 == 0:     # the caller's arrays could change before the backward
            states = tuple(la.copy(s) for s in states)
        chunks.append((s0, s1, t0, t1, states, out0))
        yc, states, _ = _recur(p, t0, t1, states, out0, False, rs)
        if rs:
            y[s0:s1] = yc
        else:
            y[0] = yc[0]
        out0 = la.copy(yc[-1])
        la.give_back(yc)
    p.chunks = chunks if keep else None
    p.kcache = ()
    return la.finish_outputs(y, rs), states


# --------------------------------------------------------------------------- the backward
def _backward(c, dy, dstates):
    """Backward of a whole call: per chunk (one chunk without checkpoints), from the last,
    recompute the chunk's cache where needed, run the backward recurrence, and accumulate
    the weight gradients. Returns ``dx, dW, dU, db, initial-state gradients``."""
    if c.fused or (c.from_x and c.cell == "simple_rnn"):
        return _backward_fused(c, dy, dstates)
    if c.from_x and c.cell == "gru" and c.opts["reset_after"] and c.rmask is None:
        return _backward_fused_gru(c, dy, dstates)
    la, o = c.eng.linalg, c.opts
    B, T, H, dt = c.B, c.T, c.H, c.dtype
    if c.xt is None:        # the forward projected inside the step: dW needs x time-major
        c.xt = la.time_major(c.x)
        if c.dmask is not None:
            la.apply_shared_mask(c.xt, c.dmask)
    dxt = None if c.chunks is None else la.empty((T, B, c.W.shape[0]), dt)
    dW = None
    nb = c.U.shape[1]       # bias columns: G * H (the GRU's input bias with reset_after)
    has_b = c.bias_shape is not None
    # the accumulated gradients start from zeros: one fill (one launch on the GPU)
    dU, db_in, db_rec, carry = la.zeros_group(
        [c.U.shape, (nb,) if has_b else None,
         (H,) if has_b and c.cell == "gru" and o["reset_after"] else None, (B, H)], dt)
    if c.chunks is None:
        chunks = [(0, T, 0, T, None, None)]
    else:
        chunks = c.chunks
    for s0, s1, t0, t1, states0, out0 in reversed(chunks):
        kc = _chunk_cache(c, t0, t1, states0, out0)
        dyc = _chunk_dy(c, dy, s0, s1)
        xt = c.xt if (t0, t1) == (0, T) else c.xt[t0:t1]
        m = None if c.mask_t is None else c.mask_t[t0:t1]
        dz, dstates, dah_rec = _cell_backward(c, kc, m, dyc, dstates, carry)
        dxc, dW = la.input_grads(xt, c.W, c.dmask, dz, dW)
        _weight_grads(c, kc, dz, dah_rec, dU, db_in, db_rec)
        la.give_back(dz, dah_rec)
        if dxt is None:
            dxt = dxc
        else:
            dxt[t0:t1] = dxc
            la.give_back(dxc, *kc)
    dx = la.batch_major(dxt)
    la.give_back(dxt, dy)
    db = None
    if c.bias_shape is not None:
        db = db_in
        if db_rec is not None:      # GRU reset_after: [input bias; recurrent bias]
            h_in, h_rec = to_host(db_in), to_host(db_rec)
            db = contiguous(np.stack([h_in, np.concatenate([h_in[:2 * H], h_rec])]), dt,
                             c.eng.name)
    return dx, dW, dU, db, tuple(dstates)


def _backward_fused_gru(c, dy, dstates):
    """Backward of the GRU (reset_after, no recurrent dropout) whose forward projected
    inside the step: dx, [dW; db_in] and [dU; db_rec] per batch block from the kernel."""
    o, la = c.opts, c.eng.linalg
    B, T, H, dt = c.B, c.T, c.H, c.dtype
    D = c.W.shape[0]
    nblocks = -(-B // config.BLOCK_ROWS)
    dx = la.empty_result((B, T, D), dt)
    acc_in = np.zeros((nblocks, D + 1, 3 * H), dt)
    acc_rec = np.zeros((nblocks, H + 1, 3 * H), dt)
    carry = la.zeros((B, H), dt)
    WT, UT = np.ascontiguousarray(c.W.T), np.ascontiguousarray(c.U.T)
    for s0, s1, t0, t1, states0, out0 in reversed(c.chunks or [(0, T, 0, T, None, None)]):
        kc = _chunk_cache(c, t0, t1, states0, out0)
        m = None if c.mask_t is None else c.mask_t[t0:t1]
        dstates = (c.eng.gru.backward_fused(
            kc, c.x, t0, WT, UT, c.dmask, m, _chunk_dy(c, dy, s0, s1), dstates[0],
            o["act"], o["ract"], o["go_backwards"], o["zero_output"], carry, dx, acc_in,
            acc_rec),)
        if states0 is not None:
            la.give_back(*kc)
    la.give_back(dy)
    tin, trec = _block_sum(acc_in), _block_sum(acc_rec)
    db = None if c.bias_shape is None else np.stack([tin[D], trec[H]])
    return dx, la.copy_result(tin[:D]), la.copy_result(trec[:H]), db, tuple(dstates)


def _block_sum(acc):
    """Sum of the blocks' shares, in block order (the same bits for any thread count)."""
    total = acc[0].copy()
    for k in range(1, acc.shape[0]):
        total += acc[k]
    return total


def _chunk_cache(c, t0, t1, states0, out0):
    """The kernel cache of a chunk: the forward's own, or recomputed from a checkpoint."""
    if states0 is None:
        return c.kcache
    yc, _, kc = _recur(c, t0, t1, states0, out0, True, True)
    c.eng.linalg.give_back(yc)
    return kc


def _chunk_dy(c, dy, s0, s1):
    """The output gradients of processing steps [s0, s1)."""
    if dy.shape[0] == c.T:
        return dy if (s0, s1) == (0, c.T) else dy[s0:s1]
    return dy if s1 == c.T else c.eng.linalg.zeros((1, c.B, c.H), c.dtype)


def _backward_fused(c, dy, dstates):
    """Backward of the fused LSTM and SimpleRNN: dx and each batch block's share of
    [dW; dU; db] come out of the kernel; the shares are added in block order (any thread
    count, same bits)."""
    o, la = c.opts, c.eng.linalg
    B, T, H, dt = c.B, c.T, c.H, c.dtype
    D = c.W.shape[0]
    dx = la.empty_result((B, T, D), dt)
    acc = np.zeros((-(-B // config.BLOCK_ROWS), D + H + 1, c.U.shape[1]), dt)
    carry = la.zeros((B, H), dt)
    VT = (c.V[:-1] if c.fused else np.concatenate([c.W, c.U])).T    # the driver packs it
    for s0, s1, t0, t1, states0, out0 in reversed(c.chunks or [(0, T, 0, T, None, None)]):
        kc = _chunk_cache(c, t0, t1, states0, out0)
        m = None if c.mask_t is None else c.mask_t[t0:t1]
        dyc = _chunk_dy(c, dy, s0, s1)
        if c.cell == "lstm":
            dstates = c.eng.lstm.backward_fused(
                kc, VT, c.dmask, m, dyc, dstates[0], dstates[1], o["act"], o["ract"],
                o["go_backwards"], o["zero_output"], carry, dx, acc, t0)
        else:
            dstates = (c.eng.simple_rnn.backward_fused(
                kc, c.x, t0, VT, c.dmask, c.rmask, m, dyc, dstates[0], o["act"],
                o["go_backwards"], o["zero_output"], carry, dx, acc),)
        if states0 is not None:
            la.give_back(*kc)
    la.give_back(dy)
    total = _block_sum(acc)
    db = None if c.bias_shape is None else total[D + H].copy()
    return (dx, la.copy_result(total[:D]), la.copy_result(total[D:D + H]), db,
            tuple(dstates))


def _cell_backward(c, kc, m, dy, dstates, carry):
    """The backward recurrence of one chunk: ``dz, gradients of the chunk's initial states,
    dah_rec (GRU reset_after) or None``; ``carry`` is updated in place."""
    E, o = c.eng, c.opts
    if c.cell == "lstm":
        dz, dh0, dc0 = E.lstm.backward(kc, c.U, c.rmask, m, dy, dstates[0], dstates[1],
                                       o["act"], o["ract"], o["go_backwards"],
                                       o["zero_output"], carry=carry)
        return dz, (dh0, dc0), None
    if c.cell == "gru":
        dz, dah_rec, dh0 = E.gru.backward(kc, c.U, c.rmask, m, dy, dstates[0], o["act"],
                                          o["ract"], o["reset_after"], o["go_backwards"],
                                          o["zero_output"], carry=carry)
        return dz, (dh0,), dah_rec
    dz, dh0 = E.simple_rnn.backward(kc, c.U, c.rmask, m, dy, dstates[0], o["act"],
                                    o["go_backwards"], o["zero_output"], carry=carry)
    return dz, (dh0,), None


def _weight_grads(c, kc, dz, dah_rec, dU, db_in, db_rec):
    """Add one chunk's recurrent-kernel and bias gradients to dU, db_in (and db_rec)."""
    la, H, rm = c.eng.linalg, c.H, c.rmask
    if c.cell == "lstm":
        la.recurrent_grad(kc[1], dz, rm, 4, out=dU)
    elif c.cell == "simple_rnn":
        la.recurrent_grad(kc[1], dz, rm, 1, out=dU)      # rm: [B, H], one per sample
    else:
        _, hprev, aux = kc
        # z and r: recurrent input h_{t-1} (* r_k), gradient the same as on the input side
        la.recurrent_grad(hprev, dz[:, :, :2 * H], None if rm is None else rm[:2], 2,
                          out=dU[:, :2 * H])
        if c.opts["reset_after"]:   # h: input h_{t-1} (* r_h), gradient da_h
            la.recurrent_grad(hprev, dah_rec, None if rm is None else rm[2:], 1,
                              out=dU[:, 2 * H:])
        else:                       # h: input q = r * (h * r_h), kept in the cache
            la.recurrent_grad(aux, dz[:, :, 2 * H:], None, 1, out=dU[:, 2 * H:])
    if db_in is not None:
        la.column_sums(dz, out=db_in)
    if db_rec is not None:
        la.column_sums(dah_rec, out=db_rec)


def _empty_grads(c, nstates):
    la = c.eng.linalg
    return (la.zeros(tuple(c.x.shape), c.dtype), la.zeros(tuple(c.W.shape), c.dtype),
            la.zeros(tuple(c.U.shape), c.dtype),
            None if c.bias_shape is None else la.zeros(c.bias_shape, c.dtype),
            tuple(la.zeros((0, c.H), c.dtype) for _ in range(nstates)))


def run_backward(cell, cache, d_outputs, d_states):
    """The backward of ``cell`` ("lstm", ...) from its forward's cache and the gradients
    given by name (``d_states``: (name, array or None) per state): ``dx, dW, dU, db,
    initial-state gradients``."""
    check_cache(cache, cell)
    dy, ds = check_dout(cache, d_outputs, d_states)
    if cache.B == 0:
        return _empty_grads(cache, len(ds))
    _coldstart.wait(cache)
    with _held(cache.eng.name):
        return _backward(cache, dy, ds)


# --------------------------------------------------------------------------- cache upkeep
def rebuild(p, kcache):
    """A prepared call's cache with the kernel arrays ``kcache``, or, for None, with those of
    its forward, run again."""
    if kcache is None:
        run_forward(p, True)
    else:
        p.kcache = tuple(kcache)
    return p


def release(cache):
    """Give a cache's arrays back to the workspace; the cache is marked released."""
    if isinstance(cache, Cache) and not cache.released:
        cache.eng.linalg.give_back(*(cache.kcache or ()), cache.xt)
        cache.kcache = None
        cache.xt = None
        cache.chunks = None
        cache.released = True


def nbytes(cache):
    """Bytes held by a cache (kernel arrays, the time-major input, checkpoints); 0 for
    anything that is not one."""
    if not isinstance(cache, Cache):
        return 0
    arrays = list(cache.kcache or ()) + ([cache.xt] if cache.xt is not None else [])
    for *_, states, out0 in cache.chunks or ():
        arrays += list(states) + ([out0] if out0 is not None else [])
    return int(sum(a.nbytes for a in arrays))


# --------------------------------------------------------------------------- the held context
class _Held:
    """For a CPU op: BLAS at one thread (the pool does the parallel work), denormals flushed
    (as TensorFlow runs its ops) and NaN/Inf propagating without NumPy warnings."""

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(np.errstate(all="ignore"))
        self._stack.enter_context(_blas_held)
        self._stack.enter_context(_ftz)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def _held(eng):
    return _Held() if eng == "cpu" else contextlib.nullcontext()
