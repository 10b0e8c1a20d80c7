"""TensorFlow bridge: ``tf.numpy_function`` around the kernels, ``tf.custom_gradient`` for
the backward pass.

The forward's cache crosses to the backward as ordinary tensors (outputs of the forward
``numpy_function`` captured by the gradient function), so TensorFlow owns its lifetime: no
registry on the Python side, nothing to leak, and it works the same eagerly, inside
``tf.function`` and in ``model.fit``. When the forward ran without a cache (inference) and a
gradient is asked for anyway, the backward recomputes the forward first.
"""
import numpy as np
import tensorflow as tf

from .. import ops
from . import count

_FORWARD = {"lstm": ops.lstm_forward, "gru": ops.gru_forward,
            "simple_rnn": ops.simple_rnn_forward}
_BACKWARD = {"lstm": ops.lstm_backward, "gru": ops.gru_backward,
             "simple_rnn": ops.simple_rnn_backward}
_NCACHE = {"lstm": 4, "gru": 3, "simple_rnn": 2}


def supports(call):
    """None when the call can run here, else the reason."""
    if any(_on_gpu(t) for t in (call.x,)):
        return "the inputs live on a GPU and the CUDA kernels are not available"
    return None


def _on_gpu(t):
    device = getattr(t, "device", "") or ""
    return "GPU" in device.upper()


def run(call):
    """Run the recurrence; returns ``(outputs, [final states])`` as tensors."""
    cell = call.cell
    dtype = call.x.dtype
    nstates = len(call.states)
    has_bias = call.bias is not None
    keep = bool(call.training)
    rs = call.return_sequences
    opts = dict(call.options)
    extras = [("mask", call.mask), ("dropout_mask", call.dropout_mask),
              ("recurrent_dropout_mask", call.recurrent_dropout_mask)]
    extra_names = [n for n, v in extras if v is not None]
    extra_vals = [v for _, v in extras if v is not None]

    def unpack(arrays):
        x, W, U = arrays[:3]
        i = 3
        b = None
        if has_bias:
            b, i = arrays[3], 4
        states = list(arrays[i:i + nstates])
        kw = dict(zip(extra_names, arrays[i + nstates:i + nstates + len(extra_names)]))
        return x, W, U, b, states, kw

    def np_forward(*arrays):
        x, W, U, b, states, kw = unpack(arrays)
        count(cell + "_forward")
        fwd = _FORWARD[cell](x, W, U, b, *states, training=keep, return_sequences=rs,
                             **kw, **opts)
        cache = list(ops.cache_arrays(fwd.cache)) if keep else []
        return [fwd.outputs, *fwd.states, *cache]

    def np_backward(*arrays):
        n_in = 3 + has_bias + nstates + len(extra_names)
        x, W, U, b, states, kw = unpack(arrays[:n_in])
        rest = arrays[n_in:]
        kcache = list(rest[:_NCACHE[cell]]) if keep else None
        grads_in = rest[_NCACHE[cell] if keep else 0:]
        count(cell + "_backward")
        cache = ops.rebuild_cache(cell, kcache, x, W, U, b, *states, training=keep,
                                  return_sequences=rs, **kw, **opts)
        g = _BACKWARD[cell](cache, *grads_in)
        out = [g.x, g.kernel, g.recurrent_kernel]
        if has_bias:
            out.append(g.bias)
        return out + list(g.states)

    x = call.x
    inputs = [x, call.kernel, call.recurrent_kernel] + ([call.bias] if has_bias else [])
    inputs += list(call.states)

    @tf.custom_gradient
    def _rnn(*diff_inputs):
        all_in = list(diff_inputs) + extra_vals
        n_cache = _NCACHE[cell] if keep else 0
        outs = tf.numpy_function(np_forward, all_in, [dtype] * (1 + nstates + n_cache),
                                 stateful=False, name=f"fastcells_{cell}_forward")
        y, states, cache = outs[0], outs[1:1 + nstates], outs[1 + nstates:]
        _set_shapes(x, call.recurrent_kernel, y, states, rs)

        def grad(*upstream):
            ups = [tf.zeros_like(t) if u is None else u
                   for u, t in zip(upstream, [y] + list(states))]
            gin = tf.numpy_function(np_backward, all_in + list(cache) + ups,
                                    [dtype] * len(diff_inputs), stateful=False,
                                    name=f"fastcells_{cell}_backward")
            for gt, t in zip(gin, diff_inputs):
                gt.set_shape(t.shape)
            return gin

        return (y, *states), grad

    res = _rnn(*inputs)
    return res[0], list(res[1:])


def _set_shapes(x, U, y, states, return_sequences):
    B, T = x.shape[0], x.shape[1]
    H = U.shape[0]
    y.set_shape((B, T, H) if return_sequences else (B, H))
    for s in states:
        s.set_shape((B, H))


def to_numpy(t):
    return np.asarray(t)
