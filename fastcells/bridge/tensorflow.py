"""TensorFlow bridge: ``tf.numpy_function`` around the kernels, ``tf.custom_gradient`` for
the backward pass.

The forward keeps its cache in ``fastcells.bridge.pending`` and returns a scalar token that
the gradient function captures; the backward pops the cache by that token (or recomputes
the forward when it is gone, e.g. for a gradient of an inference-mode call). Only inputs,
outputs and gradients cross between TensorFlow and NumPy. This works the same eagerly,
inside ``tf.function`` and in ``model.fit``.
"""
import numpy as np
import tensorflow as tf

from .. import ops
from . import count, pending

_FORWARD = {"lstm": ops.lstm_forward, "gru": ops.gru_forward,
            "simple_rnn": ops.simple_rnn_forward}
_BACKWARD = {"lstm": ops.lstm_backward, "gru": ops.gru_backward,
             "simple_rnn": ops.simple_rnn_backward}
_NO_TOKEN = 0


def supports(call):
    """None when the call can run here, else the reason."""
    device = getattr(call.x, "device", "") or ""
    if "GPU" in device.upper():
        return "the inputs live on a GPU and the CUDA kernels are not available"
    return None


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
    n_in = 3 + has_bias + nstates + len(extra_names)

    def unpack(arrays):
        x, W, U = arrays[:3]
        i = 3
        b = None
        if has_bias:
            b, i = arrays[3], 4
        states = list(arrays[i:i + nstates])
        kw = dict(zip(extra_names, arrays[i + nstates:n_in]))
        return x, W, U, b, states, kw

    def np_forward(*arrays):
        x, W, U, b, states, kw = unpack(arrays)
        count(cell + "_forward")
        fwd = _FORWARD[cell](x, W, U, b, *states, training=keep, return_sequences=rs,
                             **kw, **opts)
        token = pending.put(fwd.cache) if keep else _NO_TOKEN
        return [fwd.outputs, *fwd.states, np.int64(token)]

    def np_backward(*arrays):
        x, W, U, b, states, kw = unpack(arrays[:n_in])
        token, grads_in = arrays[n_in], arrays[n_in + 1:]
        count(cell + "_backward")
        cache = pending.pop(token) if int(token) != _NO_TOKEN else None
        if cache is None:       # evicted, used twice, or an inference-mode forward
            cache = ops.rebuild_cache(cell, None, x, W, U, b, *states, training=keep,
                                      return_sequences=rs, **kw, **opts)
        g = _BACKWARD[cell](cache, *grads_in)
        ops.release_cache(cache)        # popped from the store: nothing else can use it
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
        outs = tf.numpy_function(np_forward, all_in, [dtype] * (1 + nstates) + [tf.int64],
                                 stateful=True, name=f"fastcells_{cell}_forward")
        y, states, token = outs[0], outs[1:1 + nstates], outs[-1]
        _set_shapes(x, call.recurrent_kernel, y, states, rs)

        def grad(*upstream):
            ups = [tf.zeros_like(t) if u is None else u
                   for u, t in zip(upstream, [y] + list(states))]
            gin = tf.numpy_function(np_backward, all_in + [token] + ups,
                                    [dtype] * len(diff_inputs), stateful=True,
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
