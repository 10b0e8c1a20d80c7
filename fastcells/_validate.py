"""Argument checks and conversions of the array-level API (``fastcells.ops``).

Each check takes one argument of a call, raises ``ValueError``/``TypeError`` naming it and
the shapes seen, and returns it as an array of the call's engine (``"cpu"`` or ``"cuda"``),
contiguous and in the call's dtype, without a copy where none is needed.
"""
import numpy as np

from . import _math


def on_device(a):
    """A GPU array: anything with ``__cuda_array_interface__`` (torch, cupy, numba), or a
    numba device array (also the CUDA simulator's stand-in)."""
    return a is not None and (hasattr(a, "__cuda_array_interface__") or
                              bool(getattr(a, "__cuda_ndarray__", False)))


def to_host(a):
    if on_device(a):
        from .cuda import _linalg
        return _linalg.to_host(a)
    return np.asarray(a)


class WritableAlias:
    """Exposes a read-only array's memory as writable through the array interface."""

    def __init__(self, a):
        face = dict(a.__array_interface__)
        face["data"] = (face["data"][0], False)
        self.__array_interface__ = face
        self.base = a                   # keeps the memory alive as long as the alias


def writable(a):
    """``a`` itself, or, where it is read-only, a writable view of the same memory (no copy).

    Numba types a read-only array apart from a writable one, so read-only inputs (JAX hands
    out nothing else) would compile every kernel again, once per pattern of read-only
    arguments: 10-20 s a kernel. The kernels never write their inputs (asserted by
    tests/test_ops_errors.py), so one writable view gives every caller the same compiled
    kernels."""
    if a.flags.writeable:
        return a
    return np.asarray(WritableAlias(a))


def as_float_array(name, a, eng="cpu"):
    """``a`` as an array of the engine (no copy where possible), checked to be float32/64."""
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if eng == "cuda":
        from .cuda import _linalg
        arr = _linalg.to_device(a)
    elif on_device(a):
        raise ValueError(f"{name} lives on a GPU but the call runs on the CPU engine; "
                         f"use engine='cuda' or 'auto'")
    else:
        arr = writable(np.asarray(a))
    dt = np.dtype(arr.dtype)
    if dt.kind != "f" or dt not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dt} "
                        f"with shape {tuple(arr.shape)}")
    return arr


def contiguous(a, dtype, eng):
    if eng == "cuda":
        from .cuda import _linalg
        return _linalg.to_device(a, dtype)
    return np.ascontiguousarray(a, dtype)


def check_x(x, eng):
    x = as_float_array("x", x, eng)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [batch, time, features], got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"x has no time steps (shape {tuple(x.shape)}); a recurrence needs "
                         f"T >= 1")
    return x


def check_weight(name, a, shape, dtype, eng):
    a = as_float_array(name, a, eng)
    if tuple(a.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
    return contiguous(a, dtype, eng)


def check_state(name, a, B, H, dtype, eng):
    """A given state or state gradient, [B, H] (the callers make the missing ones zeros)."""
    a = as_float_array(name, a, eng)
    if tuple(a.shape) != (B, H):
        raise ValueError(f"{name} must have shape (batch, units) = {(B, H)}, got "
                         f"{tuple(a.shape)}")
    return contiguous(a, dtype, eng)


def check_mask(mask, B, T, eng):
    if mask is None:
        return None
    m = to_host(mask)           # [B, T] bools: small next to x, checked on the host
    if m.shape != (B, T):
        raise ValueError(f"mask must have shape (batch, time) = {(B, T)}, got {m.shape}")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "biuf":
            raise TypeError(f"mask must be boolean (or 0/1), got dtype {m.dtype}")
        m = m != 0
    return writable(np.ascontiguousarray(m))


def check_dropout(name, m, G, B, n, dtype, eng, per_gate_only=False):
    """Normalise a dropout mask to None, [B, n] (shared) or [G, B, n] (per gate)."""
    if m is None:
        return None
    m = as_float_array(name, m, eng)
    shape = tuple(m.shape)
    if shape == (B, n) and not per_gate_only:
        return contiguous(m, dtype, eng)
    if shape == (G, B, n):
        return contiguous(m, dtype, eng)
    if shape == (B, n):
        full = np.broadcast_to(to_host(m), (G, B, n))
        return contiguous(full, dtype, eng)
    raise ValueError(f"{name} must have shape (batch, {n}) = {(B, n)} or, one per gate, "
                     f"{(G, B, n)}; got {shape}")


def check_activation(name, activation):
    code = activation if isinstance(activation, int) else _math.activation_code(activation)
    if code not in _math.ACTIVATIONS.values():
        raise ValueError(f"{name}={activation!r} is not covered by the fastcells kernels; "
                         f"supported: {sorted(_math.ACTIVATIONS)}")
    return code


def check_checkpoint(steps, T):
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"checkpoint_steps must be a positive int or None, got {steps!r}")
    return int(steps) if steps < T else None


def check_dout(c, d_outputs, d_states):
    """The output and final-state gradients of a backward against its cache ``c``:
    ``dy`` time-major ([T, B, H], or [1, B, H] for the last output only) and the state
    gradients; the ones not given are zeros."""
    B, T, H, dt, eng = c.B, c.T, c.H, c.dtype, c.eng.name
    la = c.eng.linalg
    # the gradients not given are zeros, from one fill (one launch on the GPU)
    zeros = iter(la.zeros_group([(1, B, H) if d_outputs is None else None]
                                + [(B, H) for _, d in d_states if d is None], dt))
    dy = next(zeros)
    if d_outputs is not None:
        d = as_float_array("d_outputs", d_outputs, eng)
        shape = tuple(d.shape)
        if shape == (B, T, H) and c.return_sequences:
            dy = la.time_major(d.astype(dt, copy=False) if eng == "cpu"
                               else contiguous(d, dt, eng), shared=True)
        elif shape == (B, H):        # a copy on the CPU: dy goes back to the workspace
            dy = (np.array(d, dt) if eng == "cpu" else contiguous(d, dt, eng)).reshape(1, B, H)
        else:
            want = f"{(B, T, H)} or {(B, H)}" if c.return_sequences else f"{(B, H)}"
            raise ValueError(f"d_outputs must have shape {want}, got {shape}")
    ds = [next(zeros) if d is None else check_state(name, d, B, H, dt, eng)
          for name, d in d_states]
    return dy, ds


def with_defaults(options):
    """The options of a forward given by name (``rebuild_cache``), completed with the
    defaults of the public forward functions; unknown names are a ``TypeError``."""
    full = dict(mask=None, go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto", checkpoint_steps=None)
    unknown = set(options) - set(full)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}")
    full.update(options)
    return full
