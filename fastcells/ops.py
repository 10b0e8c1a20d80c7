"""Array-level API: forward and backward passes of LSTM, GRU and SimpleRNN on arrays.

Weights are in the Keras layout (LSTM gates i, f, c, o; GRU z, r, h). Every function
validates what it is given and raises ``ValueError``/``TypeError`` naming the argument and the
shapes seen, picks the engine, and calls the kernels of ``fastcells.cpu`` (or
``fastcells.cuda``). The parts of the work that are parallel in time run as large GEMMs:
the input projection ``x @ W`` before the recurrence, and the weight gradients
``x^T dz``, ``h^T dz`` after it.

Example::

    import numpy as np
    from fastcells import ops
    B, T, D, H = 4, 10, 3, 5
    x = np.random.rand(B, T, D).astype("float32")
    W = np.random.rand(D, 4 * H).astype("float32")
    U = np.random.rand(H, 4 * H).astype("float32")
    fwd = ops.lstm_forward(x, W, U, None)
    outputs, (h, c) = fwd.outputs, fwd.states          # [B, T, H], [B, H], [B, H]
    grads = ops.lstm_backward(fwd.cache, np.ones_like(outputs))
    grads.kernel.shape                                  # (3, 20)
"""
import contextlib
from collections import namedtuple
from types import SimpleNamespace

import numpy as np

from . import _math, config
from .cpu._fpstate import flushing_denormals as _ftz
from .cpu._parallel import single_threaded_blas as _blas_held

__all__ = ["lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "simple_rnn_forward", "simple_rnn_backward", "Forward", "Gradients",
           "ENGINES", "CELLS", "Cell", "cuda_available", "cache_nbytes"]

ENGINES = ("auto", "cpu", "cuda")

Forward = namedtuple("Forward", ["outputs", "states", "cache"])
Forward.__doc__ = """Result of a forward pass.

outputs: [B, T, H] (or [B, H] with return_sequences=False), in processing order.
states:  tuple of final states, each [B, H] (h, c for the LSTM; h otherwise).
cache:   what the matching backward needs (None when training=False).
"""
Gradients = namedtuple("Gradients", ["x", "kernel", "recurrent_kernel", "bias", "states"])
Gradients.__doc__ = """Gradients of a backward pass: x [B, T, D], kernel, recurrent_kernel,
bias (None when there is no bias) and states, a tuple of [B, H] for the initial states."""


class _Cache:
    """Everything a backward pass needs; opaque to users."""

    __slots__ = ("cell", "eng", "x", "xt", "W", "U", "b", "bias_shape", "states", "dmask",
                 "rmask", "mask", "mask_t", "opts", "kcache", "B", "T", "H",
                 "return_sequences", "dtype", "fast", "coef", "checkpoint", "chunks", "fused",
                 "V", "released", "from_x", "Wb")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------- engines
def cuda_available():
    """True when numba.cuda finds a GPU (or the CUDA simulator is enabled)."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or broken driver: no GPU for us
        return False


def _on_device(a):
    """A GPU array: anything with ``__cuda_array_interface__`` (torch, cupy, numba), or a
    numba device array (also the CUDA simulator's stand-in)."""
    return a is not None and (hasattr(a, "__cuda_array_interface__") or
                              bool(getattr(a, "__cuda_ndarray__", False)))


_ENGINE_MODULES = {}


def _engine_modules(name):
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


def _resolve_engine(engine, x=None):
    """The engine a call runs on: "auto" picks "cuda" for inputs that live on a GPU."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
    if engine == "auto":
        engine = "cuda" if _on_device(x) else "cpu"
    if engine == "cuda" and not cuda_available():
        raise RuntimeError("engine='cuda' needs an NVIDIA GPU with numba-cuda (pip install "
                           "'fastcells[cuda]'); numba.cuda finds none. Use engine='cpu'")
    if engine == "cpu" and _on_device(x):
        raise ValueError("x lives on a GPU (it has __cuda_array_interface__) but "
                         "engine='cpu'; use engine='cuda' or 'auto', or copy x to the host")
    return engine


# --------------------------------------------------------------------------- validation
def _to_host(a):
    if _on_device(a):
        from .cuda import _linalg
        return _linalg.to_host(a)
    return np.asarray(a)


class _WritableAlias:
    """Exposes a read-only array's memory as writable through the array interface."""

    def __init__(self, a):
        face = dict(a.__array_interface__)
        face["data"] = (face["data"][0], False)
        self.__array_interface__ = face
        self.base = a                   # keeps the memory alive as long as the alias


def _writable(a):
    """``a`` itself, or, where it is read-only, a writable view of the same memory (no copy).

    Numba types a read-only array apart from a writable one, so read-only inputs (JAX hands
    out nothing else) would compile every kernel again, once per pattern of read-only
    arguments: 10-20 s a kernel. The kernels never write their inputs (asserted by
    tests/test_ops_errors.py), so one writable view gives every caller the same compiled
    kernels."""
    if a.flags.writeable:
        return a
    return np.asarray(_WritableAlias(a))


def _as_float_array(name, a, eng="cpu"):
    """``a`` as an array of the engine (no copy where possible), checked to be float32/64."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if eng == "cuda":
        from .cuda import _linalg
        arr = _linalg.to_device(a)
    elif _on_device(a):
        raise ValueError(f"{name} lives on a GPU but the call runs on the CPU engine; "
                         f"use engine='cuda' or 'auto'")
    else:
        arr = _writable(np.asarray(a))
    dt = np.dtype(arr.dtype)
    if dt.kind != "f" or dt not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dt} "
                        f"with shape {tuple(arr.shape)}")
    return arr


def _contiguous(a, dtype, eng):
    if eng == "cuda":
        from .cuda import _linalg
        return _linalg.to_device(a, dtype)
    return np.ascontiguousarray(a, dtype)


def _check_x(x, eng):
    x = _as_float_array("x", x, eng)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [batch, time, features], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x has no time steps (shape {tuple(x.shape)}); a recurrence needs "
                         f"T >= 1")
    return x


def _check_weight(name, a, shape, dtype, eng):
    a = _as_float_array(name, a, eng)
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return _contiguous(a, dtype, eng)


def _check_state(name, a, B, H, dtype, eng):
    if a is None:
        return _engine_modules(eng).linalg.zeros((B, H), dtype)
    a = _as_float_array(name, a, eng)
    if tuple(a.shape) != (B, H):
        raise ValueError(f"{name} must have shape (batch, units) = {(B, H)}, got "
                         f"{tuple(a.shape)}")
    return _contiguous(a, dtype, eng)


def _check_mask(mask, B, T, eng):
    if mask is None:
        return None
    m = _to_host(mask)          # [B, T] bools: small next to x, checked on the host
    if m.shape != (B, T):
        raise ValueError(f"mask must have shape (batch, time) = {(B, T)}, got {m.shape}")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "biuf":
            raise TypeError(f"mask must be boolean (or 0/1), got dtype {m.dtype}")
        m = m != 0
    return _writable(np.ascontiguousarray(m))


def _check_dropout(name, m, G, B, n, dtype, eng, per_gate_only=False):
    """Normalise a dropout mask to None, [B, n] (shared) or [G, B, n] (per gate)."""
    if m is None:
        return None
    m = _as_float_array(name, m, eng)
    shape = tuple(m.shape)
    if shape == (B, n) and not per_gate_only:
        return _contiguous(m, dtype, eng)
    if shape == (G, B, n):
        return _contiguous(m, dtype, eng)
    if shape == (B, n):
        full = np.broadcast_to(_to_host(m), (G, B, n))
        return _contiguous(full, dtype, eng)
    raise ValueError(f"{name} must have shape (batch, {n}) = {(B, n)} or, one per gate, "
                     f"{(G, B, n)}; got {shape}")


def _check_activation(name, activation):
    code = activation if isinstance(activation, int) else _math.activation_code(activation)
    if code not in _math.ACTIVATIONS.values():
        raise ValueError(f"{name}={activation!r} is not covered by the fastcells kernels; "
                         f"supported: {sorted(_math.ACTIVATIONS)}")
    return code


def _check_checkpoint(steps, T):
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"checkpoint_steps must be a positive int or None, got {steps!r}")
    return int(steps) if steps < T else None


def _check_dout(c, d_outputs, d_states):
    B, T, H, dt, eng = c.B, c.T, c.H, c.dtype, c.eng.name
    la = c.eng.linalg
    # the gradients not given are zeros, from one fill (one launch on the GPU)
    zeros = iter(la.zeros_group([(1, B, H) if d_outputs is None else None]
                                + [(B, H) for _, d in d_states if d is None], dt))
    dy = next(zeros)
    if d_outputs is not None:
        d = _as_float_array("d_outputs", d_outputs, eng)
        shape = tuple(d.shape)
        if shape == (B, T, H) and c.return_sequences:
            dy = la.time_major(d.astype(dt, copy=False) if eng == "cpu"
                               else _contiguous(d, dt, eng), shared=True)
        elif shape == (B, H):        # a copy on the CPU: dy goes back to the workspace
            dy = (np.array(d, dt) if eng == "cpu" else _contiguous(d, dt, eng)).reshape(1, B, H)
        else:
            want = f"{(B, T, H)} or {(B, H)}" if c.return_sequences else f"{(B, H)}"
            raise ValueError(f"d_outputs must have shape {want}, got {shape}")
    ds = [next(zeros) if d is None else _check_state(name, d, B, H, dt, eng)
          for name, d in d_states]
    return dy, ds


def _check_cache(cache, cell):
    if not isinstance(cache, _Cache) or cache.cell != cell:
        raise TypeError(f"cache must be the cache returned by {cell}_forward(..., training=True)"
                        f", got {type(cache).__name__}")
    if cache.released:
        raise ValueError(f"this {cell} cache was released (its backward already ran through a "
                         f"framework bridge); run {cell}_forward again")


# --------------------------------------------------------------------------- preparation
def _prepare(cell, x, kernel, recurrent_kernel, bias, states, *, mask, go_backwards,
             zero_output_for_mask, dropout_mask, recurrent_dropout_mask, activation,
             recurrent_activation, reset_after, training, return_sequences, engine,
             checkpoint_steps=None):
    """Validate and normalise the arguments of a forward pass into a ``_Cache`` (no kernel
    results yet). Shared by the forward functions and by :func:`rebuild_cache`."""
    eng = _resolve_engine(engine, x)
    E = _engine_modules(eng)
    G = CELLS[cell].gates
    x = _check_x(x, eng)
    B, T, D = (int(n) for n in x.shape)
    dt = np.dtype(x.dtype)
    U = _as_float_array("recurrent_kernel", recurrent_kernel, eng)
    if U.ndim != 2 or U.shape[1] % G or U.shape[0] * G != U.shape[1]:
        raise ValueError(f"recurrent_kernel must have shape (units, {G} * units), "
                         f"got {tuple(U.shape)}")
    H = int(U.shape[0])
    U = _contiguous(U, dt, eng)
    W = _check_weight("kernel", kernel, (D, G * H), dt, eng)
    mask = _check_mask(mask, B, T, eng)
    dmask = rmask = None
    if training:
        dmask = _check_dropout("dropout_mask", dropout_mask, G, B, D, dt, eng)
        rmask = _check_dropout("recurrent_dropout_mask", recurrent_dropout_mask, G, B, H, dt,
                               eng, per_gate_only=cell != "simple_rnn")
    if cell == "simple_rnn":
        dmask = dmask[0] if dmask is not None and dmask.ndim == 3 else dmask
        rmask = rmask[0] if rmask is not None and rmask.ndim == 3 else rmask
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    b = None if bias is None else _check_weight("bias", bias, bshape, dt, eng)
    names = CELLS[cell].states
    if len(states) > len(names):
        raise ValueError(f"{cell} takes {len(names)} initial state(s) {names}, got "
                         f"{len(states)}")
    states = list(states) + [None] * (len(names) - len(states))
    # the states not given are zeros, from one fill (one launch on the GPU)
    zeros = iter(E.linalg.zeros_group([(B, H) for s in states if s is None], dt))
    states = tuple(next(zeros) if s is None else _check_state(n, s, B, H, dt, eng)
                   for n, s in zip(names, states))
    opts = dict(act=_check_activation("activation", activation),
                go_backwards=bool(go_backwards), zero_output=bool(zero_output_for_mask))
    if cell != "simple_rnn":
        opts["ract"] = _check_activation("recurrent_activation", recurrent_activation)
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
    return _Cache(cell=cell, eng=E, x=x, xt=xt, W=W, U=U, b=b,
                  bias_shape=None if b is None else tuple(b.shape), states=states,
                  dmask=dmask, rmask=rmask, mask=mask, mask_t=mask_t, opts=opts, kcache=None,
                  B=B, T=T, H=H, return_sequences=bool(return_sequences), dtype=dt, fast=fast,
                  coef=coef, checkpoint=_check_checkpoint(checkpoint_steps, T), chunks=None,
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


def _run_forward(p, training):
    """Run the recurrence of a prepared call; returns a :class:`Forward`."""
    B, T, H, dt = p.B, p.T, p.H, p.dtype
    la = p.eng.linalg
    if B == 0:
        y = la.zeros((0, T, H) if p.return_sequences else (0, H), dt)
        p.kcache = ()
        return Forward(y, tuple(la.zeros((0, H), dt) for _ in p.states),
                       p if training else None)
    keep = bool(training)
    with _held(p.eng.name):         # NaN/Inf propagate as in Keras, without warnings
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
    return Forward(out, states, p if keep else None)


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


def _backward(c, dy, dstates):
    """Backward of a whole call: per chunk (one chunk without checkpoints), from the last,
    recompute the chunk's cache where needed, run the backward recurrence, and accumulate
    the weight gradients. Returns a :class:`Gradients`."""
    if c.fused or (c.from_x and c.cell == "simple_rnn"):
        return _backward_fused(c, dy, dstates)
    if c.from_x and c.cell == "gru" and c.opts["reset_after"] and c.rmask is None:
        return _backward_fused_gru(c, dy, dstates)
    la, o = c.eng.linalg, c.opts
    B, T, H, dt = c.B, c.T, c.H, c.dtype
    G = CELLS[c.cell].gates
    if c.xt is None:        # the forward projected inside the step: dW needs x time-major
        c.xt = la.time_major(c.x)
        if c.dmask is not None:
            la.apply_shared_mask(c.xt, c.dmask)
    dxt = None if c.chunks is None else la.empty((T, B, c.W.shape[0]), dt)
    dW = None
    nb = G * H if c.cell != "gru" else 3 * H
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
            h_in, h_rec = _to_host(db_in), _to_host(db_rec)
            db = _contiguous(np.stack([h_in, np.concatenate([h_in[:2 * H], h_rec])]), dt,
                             c.eng.name)
    return Gradients(dx, dW, dU, db, tuple(dstates))


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
    return Gradients(dx, la.copy_result(tin[:D]), la.copy_result(trec[:H]), db,
                     tuple(dstates))


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
    return Gradients(dx, la.copy_result(total[:D]), la.copy_result(total[D:D + H]), db,
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
    return Gradients(la.zeros(tuple(c.x.shape), c.dtype), la.zeros(tuple(c.W.shape), c.dtype),
                     la.zeros(tuple(c.U.shape), c.dtype),
                     None if c.bias_shape is None else la.zeros(c.bias_shape, c.dtype),
                     tuple(la.zeros((0, c.H), c.dtype) for _ in range(nstates)))


def _backward_op(cell, cache, d_outputs, d_states):
    _check_cache(cache, cell)
    dy, ds = _check_dout(cache, d_outputs, d_states)
    if cache.B == 0:
        return _empty_grads(cache, len(ds))
    with _held(cache.eng.name):
        return _backward(cache, dy, ds)


def rebuild_cache(cell, kcache, x, kernel, recurrent_kernel, bias=None, *states, **options):
    """Rebuild the cache of a forward pass from its kernel arrays (``cache_arrays``) and the
    arguments the forward was called with. With ``kcache=None`` the forward is recomputed
    (what the framework bridges do when a cache was evicted or already used)."""
    options.setdefault("training", True)
    p = _prepare(cell, x, kernel, recurrent_kernel, bias, states, **_with_defaults(options))
    if kcache is None:
        _run_forward(p, True)
    else:
        p.kcache = tuple(kcache)
    return p


def release_cache(cache):
    """Give a cache's memory back for reuse by later calls; the cache is unusable after.
    For bridges that know a cache's backward has run and will not run again."""
    if isinstance(cache, _Cache) and not cache.released:
        cache.eng.linalg.give_back(*(cache.kcache or ()), cache.xt)
        cache.kcache = None
        cache.xt = None
        cache.chunks = None
        cache.released = True


def cache_arrays(cache):
    """The kernel arrays of a cache, to carry them as framework tensors."""
    return tuple(cache.kcache)


def cache_nbytes(cache):
    """Bytes held by a forward cache (kernel arrays, the time-major input, checkpoints)."""
    if not isinstance(cache, _Cache):
        return 0
    arrays = list(cache.kcache or ()) + ([cache.xt] if cache.xt is not None else [])
    for *_, states, out0 in cache.chunks or ():
        arrays += list(states) + ([out0] if out0 is not None else [])
    return int(sum(a.nbytes for a in arrays))


def _with_defaults(options):
    full = dict(mask=None, go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto", checkpoint_steps=None)
    unknown = set(options) - set(full)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    full.update(options)
    return full


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


# --------------------------------------------------------------------------- LSTM
def lstm_forward(x, kernel, recurrent_kernel, bias=None, h0=None, c0=None, *, mask=None,
                 go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                 recurrent_dropout_mask=None, activation="tanh",
                 recurrent_activation="sigmoid", training=True, return_sequences=True,
                 engine="auto", checkpoint_steps=None):
    """LSTM forward pass over a whole sequence (Keras semantics).

    Args:
        x: [B, T, D] float32 or float64 inputs.
        kernel: [D, 4H] input kernel, gates i, f, c, o.
        recurrent_kernel: [H, 4H].
        bias: [4H] or None.
        h0, c0: [B, H] initial states (zeros when None).
        mask: [B, T] bool, True where a step is processed; any pattern.
        go_backwards: consume the sequence from the end; outputs come in processing order.
        zero_output_for_mask: masked steps output zeros instead of the previous output.
        dropout_mask: [B, D] (shared by the gates) or [4, B, D] (one per gate).
        recurrent_dropout_mask: [B, H] or [4, B, H] (one per gate).
        activation, recurrent_activation: "tanh", "sigmoid", "relu", "hard_sigmoid",
            "linear" (or a Keras activation function of that name).
        training: apply the dropout masks and keep the cache for ``lstm_backward``.
        return_sequences: outputs [B, T, H] (True) or the last output [B, H].
        engine: "auto" (the CUDA kernels for arrays on a GPU, the CPU kernels otherwise),
            "cpu" or "cuda" (host arrays are copied to the GPU; results stay there).
        checkpoint_steps: None (default) keeps the whole forward cache for the backward,
            about (3 + gates) * B * T * H numbers. An int K keeps only the states entering
            every K-th step; the backward recomputes each chunk's cache from them (one more
            forward pass), bounding the cache to about (gates + 3) * B * K * H numbers plus
            3 * B * H per chunk. Gradients equal the full-cache ones to rounding.

    Returns:
        ``Forward(outputs, (h, c), cache)``.

    Example::

        fwd = lstm_forward(x, W, U, b, mask=x.any(-1))
        grads = lstm_backward(fwd.cache, d_outputs)
    """
    p = _prepare("lstm", x, kernel, recurrent_kernel, bias, (h0, c0), mask=mask,
                 go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask,
                 dropout_mask=dropout_mask, recurrent_dropout_mask=recurrent_dropout_mask,
                 activation=activation, recurrent_activation=recurrent_activation,
                 reset_after=True, training=training, return_sequences=return_sequences,
                 engine=engine, checkpoint_steps=checkpoint_steps)
    return _run_forward(p, training)


def lstm_backward(cache, d_outputs=None, d_h=None, d_c=None):
    """Gradients of an LSTM forward pass.

    Args:
        cache: ``lstm_forward(..., training=True).cache``.
        d_outputs: gradient of the outputs, [B, T, H] (return_sequences) or [B, H] (the last
            output only); None for zeros.
        d_h, d_c: gradients of the final states [B, H]; None for zeros.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0, dc0))``.
    """
    return _backward_op("lstm", cache, d_outputs, [("d_h", d_h), ("d_c", d_c)])


# --------------------------------------------------------------------------- GRU
def gru_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto", checkpoint_steps=None):
    """GRU forward pass over a whole sequence (Keras semantics, gates z, r, h).

    Args are those of :func:`lstm_forward` with 3 gates, one state ``h0`` and:
        bias: [2, 3H] (input and recurrent bias) when ``reset_after``, else [3H]; or None.
        reset_after: apply the reset gate after the recurrent matmul (Keras default, cuDNN
            compatible) or before it.

    Returns:
        ``Forward(outputs, (h,), cache)``.

    Example::

        fwd = gru_forward(x, W, U, b, reset_after=True)
        grads = gru_backward(fwd.cache, d_outputs)
    """
    p = _prepare("gru", x, kernel, recurrent_kernel, bias, (h0,), mask=mask,
                 go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask,
                 dropout_mask=dropout_mask, recurrent_dropout_mask=recurrent_dropout_mask,
                 activation=activation, recurrent_activation=recurrent_activation,
                 reset_after=reset_after, training=training,
                 return_sequences=return_sequences, engine=engine,
                 checkpoint_steps=checkpoint_steps)
    return _run_forward(p, training)


def gru_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a GRU forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    return _backward_op("gru", cache, d_outputs, [("d_h", d_h)])


# --------------------------------------------------------------------------- SimpleRNN
def simple_rnn_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                       go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                       recurrent_dropout_mask=None, activation="tanh", training=True,
                       return_sequences=True, engine="auto", checkpoint_steps=None):
    """SimpleRNN forward pass: h_t = act((x_t * m) @ W + b + (h_{t-1} * r) @ U).

    Args are those of :func:`lstm_forward` with one gate and one state ``h0``; the dropout
    masks are [B, D] and [B, H] (one per sample, as Keras draws them).

    Returns:
        ``Forward(outputs, (h,), cache)``.

    Example::

        fwd = simple_rnn_forward(x, W, U, b, activation="relu")
        grads = simple_rnn_backward(fwd.cache, d_outputs)
    """
    p = _prepare("simple_rnn", x, kernel, recurrent_kernel, bias, (h0,), mask=mask,
                 go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask,
                 dropout_mask=dropout_mask, recurrent_dropout_mask=recurrent_dropout_mask,
                 activation=activation, recurrent_activation=None, reset_after=True,
                 training=training, return_sequences=return_sequences, engine=engine,
                 checkpoint_steps=checkpoint_steps)
    return _run_forward(p, training)


def simple_rnn_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a SimpleRNN forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    return _backward_op("simple_rnn", cache, d_outputs, [("d_h", d_h)])


# --------------------------------------------------------------------------- the cells
Cell = namedtuple("Cell", ["name", "layer", "gates", "states", "forward", "backward"])
Cell.__doc__ = """What fastcells knows of one cell: its name ("lstm"), its Keras layer's
name ("LSTM"), its gates (the column blocks of the kernels), the names of its initial states,
and its forward and backward functions in this module."""

#: The cells, by name: the one table the bridges, the benchmarks and the warm-up use.
CELLS = {c.name: c for c in (
    Cell("lstm", "LSTM", 4, ("h0", "c0"), lstm_forward, lstm_backward),
    Cell("gru", "GRU", 3, ("h0",), gru_forward, gru_backward),
    Cell("simple_rnn", "SimpleRNN", 1, ("h0",), simple_rnn_forward, simple_rnn_backward),
)}
