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
import functools
from collections import namedtuple

import numpy as np

from . import _math, config
from .cpu import gru as _cpu_gru
from .cpu import lstm as _cpu_lstm
from .cpu import simple_rnn as _cpu_rnn
from .cpu._parallel import gemm as _gemm
from .cpu._fpstate import flushing_denormals as _ftz
from .cpu._parallel import single_threaded_blas as _blas_held
from ._workspace import workspace as _ws

__all__ = ["lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "simple_rnn_forward", "simple_rnn_backward", "Forward", "Gradients",
           "ENGINES", "cuda_available"]

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

    __slots__ = ("cell", "x", "xt", "W", "U", "b", "bias_shape", "states", "dmask", "rmask",
                 "mask", "mask_t", "opts", "kcache", "B", "T", "H", "return_sequences",
                 "dtype", "fast", "coef")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


# --------------------------------------------------------------------------- validation
def cuda_available():
    """True when numba.cuda finds a GPU (or the CUDA simulator is enabled)."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or broken driver: no GPU for us
        return False


def _resolve_engine(engine):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
    if engine == "cuda":
        raise NotImplementedError(
            "engine='cuda': the CUDA kernels are not part of this build of fastcells yet; "
            "use engine='cpu' (or 'auto')")
    return "cpu"


def _as_float_array(name, a):
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    arr = np.asarray(a)
    if arr.dtype.kind != "f" or arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype} "
                        f"with shape {arr.shape}")
    return arr


def _check_x(x):
    x = _as_float_array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [batch, time, features], got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"x has no time steps (shape {x.shape}); a recurrence needs T >= 1")
    return x


def _check_weight(name, a, shape, dtype):
    a = _as_float_array(name, a)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a, dtype)


def _check_state(name, a, B, H, dtype):
    if a is None:
        return np.zeros((B, H), dtype)
    a = _as_float_array(name, a)
    if a.shape != (B, H):
        raise ValueError(f"{name} must have shape (batch, units) = {(B, H)}, got {a.shape}")
    return np.ascontiguousarray(a, dtype)


def _check_mask(mask, B, T):
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != (B, T):
        raise ValueError(f"mask must have shape (batch, time) = {(B, T)}, got {m.shape}")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "biuf":
            raise TypeError(f"mask must be boolean (or 0/1), got dtype {m.dtype}")
        m = m != 0
    return np.ascontiguousarray(m)


def _check_dropout(name, m, G, B, n, dtype, per_gate_only=False):
    """Normalise a dropout mask to None, [B, n] (shared) or [G, B, n] (per gate)."""
    if m is None:
        return None
    m = _as_float_array(name, m)
    if m.shape == (B, n) and not per_gate_only:
        return np.ascontiguousarray(m, dtype)
    if m.shape == (G, B, n):
        return np.ascontiguousarray(m, dtype)
    if m.shape == (B, n):
        return np.ascontiguousarray(np.broadcast_to(m, (G, B, n)), dtype)
    raise ValueError(f"{name} must have shape (batch, {n}) = {(B, n)} or, one per gate, "
                     f"{(G, B, n)}; got {m.shape}")


def _check_activation(name, activation):
    code = activation if isinstance(activation, int) else _math.activation_code(activation)
    if code not in _math.ACTIVATIONS.values():
        raise ValueError(f"{name}={activation!r} is not covered by the fastcells kernels; "
                         f"supported: {sorted(_math.ACTIVATIONS)}")
    return code


def _common(x, W, U, G, dropout_mask, recurrent_dropout_mask, mask, training,
            rmask_per_gate):
    x = _check_x(x)
    B, T, D = x.shape
    dtype = x.dtype
    U = _as_float_array("recurrent_kernel", U)
    if U.ndim != 2 or U.shape[1] % G or U.shape[0] * G != U.shape[1]:
        raise ValueError(f"recurrent_kernel must have shape (units, {G} * units), "
                         f"got {U.shape}")
    H = U.shape[0]
    U = np.ascontiguousarray(U, dtype)
    W = _check_weight("kernel", W, (D, G * H), dtype)
    mask = _check_mask(mask, B, T)
    dmask = _check_dropout("dropout_mask", dropout_mask, G, B, D, dtype) if training else None
    rmask = (_check_dropout("recurrent_dropout_mask", recurrent_dropout_mask, G, B, H, dtype,
                            per_gate_only=rmask_per_gate) if training else None)
    return x, W, U, B, T, D, H, dtype, mask, dmask, rmask


def _project(xt, W, b_in, dmask, G):
    """xw = (x * dropout) @ W + b_in, time-major [T, B, G*H], C-contiguous.

    ``xt`` is the time-major input [T, B, D], a shared [B, D] dropout mask already applied
    (see ``_prepare``); per-gate masks [G, B, D] are applied here."""
    T, B, D = xt.shape
    GH = W.shape[1]
    H = GH // G
    if dmask is None or dmask.ndim == 2:
        xw = _ws.empty((T, B, GH), xt.dtype)
        _gemm(xt.reshape(T * B, D), W, out=xw.reshape(T * B, GH))
    else:
        xw = _ws.empty((T, B, GH), xt.dtype)
        for k in range(G):
            xk = (xt * dmask[k][None]).reshape(T * B, D)
            xw[:, :, k * H:(k + 1) * H] = _gemm(xk, W[:, k * H:(k + 1) * H]).reshape(T, B, H)
    if b_in is not None:
        xw += b_in
    return xw


def _input_grads(c, dz):
    """dx [B, T, D] and dW from the time-major dz [T, B, G*H] (gradient of the input-side
    pre-activations)."""
    xt, W, dmask = c.xt, c.W, c.dmask
    T, B, D = xt.shape
    GH = W.shape[1]
    G = GH // c.H
    dz2 = dz.reshape(T * B, GH)
    if dmask is None or dmask.ndim == 2:         # xt already carries a shared mask
        dW = _gemm(xt.reshape(T * B, D).T, dz2)
        dxt = _gemm(dz2, W.T).reshape(T, B, D)
        if dmask is not None:
            dxt *= dmask[None]
    else:
        dW = np.empty_like(W)
        dxt = np.zeros_like(xt)
        H = c.H
        for k in range(G):
            sl = slice(k * H, (k + 1) * H)
            xk = (xt * dmask[k][None]).reshape(T * B, D)
            dW[:, sl] = _gemm(xk.T, dz2[:, sl])
            dxt += _gemm(dz2[:, sl], W[:, sl].T).reshape(T, B, D) * dmask[k][None]
    dx = _batch_major(dxt)
    _ws.give_back(dxt)
    return dx, dW


def _column_sums(a):
    """Sum over every axis but the last, as one GEMV (4x faster than ``a.sum``)."""
    a2 = a.reshape(-1, a.shape[-1])
    return _gemm(np.ones((1, a2.shape[0]), a.dtype), a2)[0]


def _time_major(a):
    """[B, T, ...] -> C-contiguous [T, B, ...], in workspace memory (internal use only)."""
    out = _ws.empty((a.shape[1], a.shape[0]) + a.shape[2:], a.dtype)
    np.copyto(out, np.swapaxes(a, 0, 1))
    return out


def _batch_major(a):
    """[T, B, ...] -> a fresh C-contiguous [B, T, ...] (handed to the caller)."""
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def _recurrent_grad(src, dz, rmask, gates):
    """dU[:, k] = (src * r_k)^T dz_k, with src [T, B, H] the recurrent input of each step
    and dz [T, B, gates*H] (time-major); rmask [gates, B, H] or None."""
    T, B, H = src.shape
    if rmask is None:
        return _gemm(src.reshape(T * B, H).T, dz.reshape(T * B, -1))
    dU = np.empty((H, gates * H), src.dtype)
    for k in range(gates):
        sk = (src * rmask[k][None]).reshape(T * B, H)
        dU[:, k * H:(k + 1) * H] = _gemm(sk.T, dz[:, :, k * H:(k + 1) * H].reshape(T * B, H))
    return dU


def _check_dout(c, d_outputs, d_states):
    B, T, H, dt = c.B, c.T, c.H, c.dtype
    if d_outputs is None:
        dy = np.zeros((1, B, H), dt)
    else:
        d = _as_float_array("d_outputs", d_outputs)
        if d.shape == (B, T, H) and c.return_sequences:
            dy = _time_major(d.astype(dt, copy=False))
        elif d.shape == (B, H):
            dy = _ws.empty((1, B, H), dt)        # a copy: dy is given back to the workspace
            dy[0] = d
        else:
            want = f"{(B, T, H)} or {(B, H)}" if c.return_sequences else f"{(B, H)}"
            raise ValueError(f"d_outputs must have shape {want}, got {d.shape}")
    ds = [_check_state(name, d, B, H, dt) for name, d in d_states]
    return dy, ds


def _empty_grads(c, nstates):
    zeros = np.zeros
    return Gradients(zeros(c.x.shape, c.dtype), zeros(c.W.shape, c.dtype),
                     zeros(c.U.shape, c.dtype),
                     None if c.bias_shape is None else zeros(c.bias_shape, c.dtype),
                     tuple(zeros((0, c.H), c.dtype) for _ in range(nstates)))


def _finish_outputs(y, return_sequences):
    """Kernel outputs [T or 1, B, H] (time-major, workspace) -> fresh [B, T, H] or [B, H]."""
    out = _batch_major(y) if return_sequences else y[0].copy()
    _ws.give_back(y)
    return out


def _check_cache(cache, cell):
    if not isinstance(cache, _Cache) or cache.cell != cell:
        raise TypeError(f"cache must be the cache returned by {cell}_forward(..., training=True)"
                        f", got {type(cache).__name__}")


# --------------------------------------------------------------------------- preparation
_GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
_STATES = {"lstm": ("h0", "c0"), "gru": ("h0",), "simple_rnn": ("h0",)}


def _prepare(cell, x, kernel, recurrent_kernel, bias, states, *, mask, go_backwards,
             zero_output_for_mask, dropout_mask, recurrent_dropout_mask, activation,
             recurrent_activation, reset_after, training, return_sequences, engine):
    """Validate and normalise the arguments of a forward pass into a ``_Cache`` (no kernel
    results yet). Shared by the forward functions and by :func:`rebuild_cache`."""
    _resolve_engine(engine)
    G = _GATES[cell]
    x, W, U, B, T, D, H, dt, mask, dmask, rmask = _common(
        x, kernel, recurrent_kernel, G, dropout_mask, recurrent_dropout_mask, mask, training,
        rmask_per_gate=cell != "simple_rnn")
    if cell == "simple_rnn":
        dmask = dmask[0] if dmask is not None and dmask.ndim == 3 else dmask
        rmask = rmask[0] if rmask is not None and rmask.ndim == 3 else rmask
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    b = None if bias is None else _check_weight("bias", bias, bshape, dt)
    names = _STATES[cell]
    if len(states) > len(names):
        raise ValueError(f"{cell} takes {len(names)} initial state(s) {names}, got "
                         f"{len(states)}")
    states = list(states) + [None] * (len(names) - len(states))
    states = tuple(_check_state(n, s, B, H, dt) for n, s in zip(names, states))
    opts = dict(act=_check_activation("activation", activation),
                go_backwards=bool(go_backwards), zero_output=bool(zero_output_for_mask))
    if cell != "simple_rnn":
        opts["ract"] = _check_activation("recurrent_activation", recurrent_activation)
    if cell == "gru":
        opts["reset_after"] = bool(reset_after)
    fast = bool(dt == np.float32 and config.FAST_FLOAT32_ACTIVATIONS)
    codes = {"lstm": ("ract", "ract", "act", "ract"), "gru": ("ract", "ract"),
             "simple_rnn": ("act",)}[cell]
    coef = _math.gate_coefficients([opts[k] for k in codes], H, dt) if fast else None
    xt = _time_major(x)
    if dmask is not None and dmask.ndim == 2:
        xt *= dmask[None]       # a shared mask is applied once, for the projection and dW
    return _Cache(cell=cell, x=x, xt=xt, W=W, U=U, b=b,
                  bias_shape=None if b is None else b.shape, states=states, dmask=dmask,
                  rmask=rmask, mask=mask, mask_t=None if mask is None else _time_major(mask),
                  opts=opts, kcache=None, B=B, T=T, H=H,
                  return_sequences=bool(return_sequences), dtype=dt, fast=fast, coef=coef)


def _run_forward(p, training):
    """Run the recurrence of a prepared call; returns a :class:`Forward`."""
    B, T, H, dt, o = p.B, p.T, p.H, p.dtype, p.opts
    if B == 0:
        y = np.zeros((0, T, H) if p.return_sequences else (0, H), dt)
        p.kcache = ()
        return Forward(y, tuple(np.zeros((0, H), dt) for _ in p.states),
                       p if training else None)
    keep = bool(training)
    with np.errstate(all="ignore"), _blas_held, _ftz:   # NaN/Inf propagate as in Keras
        return _run_forward_arrays(p, keep)


def _run_forward_arrays(p, keep):
    H, dt, o = p.H, p.dtype, p.opts
    if p.cell == "lstm":
        xw = _project(p.xt, p.W, p.b, p.dmask, 4)
        y, h, c, kc = _cpu_lstm.forward(xw, p.U, p.rmask, p.mask_t, p.states[0], p.states[1],
                                        o["act"], o["ract"], o["go_backwards"],
                                        o["zero_output"], p.return_sequences, keep, p.fast,
                                        p.coef)
        states = (h, c)
    elif p.cell == "gru":
        ra = o["reset_after"]
        b_in = None if p.b is None else (p.b[0] if ra else p.b)
        brec = np.ascontiguousarray(p.b[1]) if (p.b is not None and ra) else np.zeros(3 * H, dt)
        xw = _project(p.xt, p.W, b_in, p.dmask, 3)
        y, h, kc = _cpu_gru.forward(xw, p.U, brec, p.rmask, p.mask_t, p.states[0], o["act"],
                                    o["ract"], ra, o["go_backwards"], o["zero_output"],
                                    p.return_sequences, keep, p.fast, p.coef)
        states = (h,)
    else:
        xw = _project(p.xt, p.W, p.b, p.dmask, 1)
        y, h, kc = _cpu_rnn.forward(xw, p.U, p.rmask, p.mask_t, p.states[0], o["act"],
                                    o["go_backwards"], o["zero_output"], p.return_sequences,
                                    keep, p.fast)
        states = (h,)
    _ws.give_back(xw)
    p.kcache = kc
    if not keep:
        _ws.give_back(p.xt)
        p.xt = None
    return Forward(_finish_outputs(y, p.return_sequences), states, p if keep else None)


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
    if isinstance(cache, _Cache) and cache.kcache:
        _ws.give_back(*cache.kcache, cache.xt)
        cache.kcache = None
        cache.xt = None


def cache_arrays(cache):
    """The kernel arrays of a cache, to carry them as framework tensors."""
    return tuple(cache.kcache)


def _with_defaults(options):
    full = dict(mask=None, go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto")
    unknown = set(options) - set(full)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    full.update(options)
    return full


def _holding_blas(fn):
    """Run ``fn`` with BLAS at one thread (the pool does the parallel work), denormals
    flushed (as TensorFlow runs its ops) and NaN/Inf propagating without NumPy warnings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"), _blas_held, _ftz:
            return fn(*args, **kwargs)
    return wrapper


# --------------------------------------------------------------------------- LSTM
def lstm_forward(x, kernel, recurrent_kernel, bias=None, h0=None, c0=None, *, mask=None,
                 go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                 recurrent_dropout_mask=None, activation="tanh",
                 recurrent_activation="sigmoid", training=True, return_sequences=True,
                 engine="auto"):
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
        engine: "auto", "cpu" or "cuda".

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
                 engine=engine)
    return _run_forward(p, training)


@_holding_blas
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
    _check_cache(cache, "lstm")
    c = cache
    dy, (dh, dc) = _check_dout(c, d_outputs, [("d_h", d_h), ("d_c", d_c)])
    if c.B == 0:
        return _empty_grads(c, 2)
    o = c.opts
    dz, dh0, dc0 = _cpu_lstm.backward(c.kcache, c.U, c.rmask, c.mask_t, dy, dh, dc, o["act"],
                                      o["ract"], o["go_backwards"], o["zero_output"])
    dx, dW = _input_grads(c, dz)
    dU = _recurrent_grad(c.kcache[1], dz, c.rmask, 4)
    db = None if c.bias_shape is None else _column_sums(dz)
    _ws.give_back(dz, dy)
    return Gradients(dx, dW, dU, db, (dh0, dc0))


# --------------------------------------------------------------------------- GRU
def gru_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto"):
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
                 return_sequences=return_sequences, engine=engine)
    return _run_forward(p, training)


@_holding_blas
def gru_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a GRU forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    _check_cache(cache, "gru")
    c = cache
    dy, (dh,) = _check_dout(c, d_outputs, [("d_h", d_h)])
    if c.B == 0:
        return _empty_grads(c, 1)
    o = c.opts
    reset_after = o["reset_after"]
    dz, dah_rec, dh0 = _cpu_gru.backward(c.kcache, c.U, c.rmask, c.mask_t, dy, dh, o["act"],
                                         o["ract"], reset_after, o["go_backwards"],
                                         o["zero_output"])
    dx, dW = _input_grads(c, dz)
    _, hprev, aux = c.kcache
    H = c.H
    rm = c.rmask
    dU = np.empty_like(c.U)
    # z and r: recurrent input h_{t-1} (* r_k), gradient the same as on the input side
    dU[:, :2 * H] = _recurrent_grad(hprev, dz[:, :, :2 * H], None if rm is None else rm[:2], 2)
    if reset_after:     # h: input h_{t-1} (* r_h), gradient da_h
        dU[:, 2 * H:] = _recurrent_grad(hprev, dah_rec, None if rm is None else rm[2:], 1)
    else:               # h: input q = r * (h * r_h), kept in the cache, gradient dah
        dU[:, 2 * H:] = _recurrent_grad(aux, dz[:, :, 2 * H:], None, 1)
    db = None
    if c.bias_shape is not None:
        db_in = _column_sums(dz)
        db = (np.stack([db_in, np.concatenate([db_in[:2 * H], _column_sums(dah_rec)])])
              if reset_after else db_in)
    _ws.give_back(dz, dy, dah_rec)
    return Gradients(dx, dW, dU, db, (dh0,))


# --------------------------------------------------------------------------- SimpleRNN
def simple_rnn_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                       go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                       recurrent_dropout_mask=None, activation="tanh", training=True,
                       return_sequences=True, engine="auto"):
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
                 training=training, return_sequences=return_sequences, engine=engine)
    return _run_forward(p, training)


@_holding_blas
def simple_rnn_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a SimpleRNN forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    _check_cache(cache, "simple_rnn")
    c = cache
    dy, (dh,) = _check_dout(c, d_outputs, [("d_h", d_h)])
    if c.B == 0:
        return _empty_grads(c, 1)
    o = c.opts
    dz, dh0 = _cpu_rnn.backward(c.kcache, c.U, c.rmask, c.mask_t, dy, dh, o["act"],
                                o["go_backwards"], o["zero_output"])
    dx, dW = _input_grads(c, dz)
    dU = _recurrent_grad(c.kcache[1], dz, None if c.rmask is None else c.rmask[None], 1)
    db = None if c.bias_shape is None else _column_sums(dz)
    _ws.give_back(dz, dy)
    return Gradients(dx, dW, dU, db, (dh0,))
