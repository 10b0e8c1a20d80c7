"""Compare a fastcells layer with the built-in Keras layer holding the same weights."""
import keras
import numpy as np
import tensorflow as tf

import fastcells
from fastcells import config
from fastcells.bench import relative_error, worst_of
from helpers import LAYER_CELLS, LAYER_CONFIGS, layer_arguments

TOL_OUT = config.TOL_OUTPUT_F32     # absolute, float32 outputs and states
TOL_GRAD = config.TOL_GRAD_F32      # relative to the gradient's norm (relative_error)


CELL_IDS = list(LAYER_CELLS)
CELLS = [LAYER_CELLS[c] for c in CELL_IDS]
CONFIGS = LAYER_CONFIGS


def pair(name, units, engine="cpu", **kw):
    """(built-in layer, fastcells layer with ``engine``), not built yet."""
    return (getattr(keras.layers, name)(units, **kw),
            getattr(fastcells, name)(units, engine=engine, **kw))


def layer_case(cell, config, rng, engine="cpu", shape=(5, 9, 4, 6)):
    """(built-in layer, fastcells layer, inputs, call arguments) for CELLS[cell] in
    CONFIGS[config], ready for :func:`assert_same`."""
    name, kw, units, x, call = layer_arguments(CELL_IDS[cell], config, rng, shape)
    ref, fc = pair(name, units, engine=engine, **kw)
    return ref, fc, x, call


def outputs_and_grads(layer, x, *, mask=None, initial_state=None, training=False, seed=0):
    """Outputs (list), gradients and value of a fixed random projection of the outputs; the
    gradients are with respect to the inputs, every trainable weight and the initial states."""
    xs = tf.constant(x)
    states = None if initial_state is None else [tf.constant(s) for s in initial_state]
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = tf.constant(mask)
    if states is not None:
        kwargs["initial_state"] = states
    with tf.GradientTape() as tape:
        tape.watch(xs)
        if states is not None:
            tape.watch(states)
        out = layer(xs, training=training, **kwargs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        rng = np.random.default_rng(seed)
        loss = 0.0
        for o in outs:
            w = tf.constant(rng.standard_normal(o.shape).astype(o.dtype.name))
            loss += tf.reduce_sum(tf.cast(o * w, "float64"))
    targets = [xs] + list(layer.trainable_weights) + (states or [])
    grads = tape.gradient(loss, targets)
    return ([np.asarray(o) for o in outs], [None if g is None else np.asarray(g) for g in grads],
            float(loss))


def assert_same(ref_layer, fc_layer, x, *, tol_out=TOL_OUT, tol_grad=TOL_GRAD, engine="cpu",
                **kw):
    """Build both layers, copy the built-in weights, compare outputs and gradients.
    Returns the worst (output error, gradient error)."""
    ro, rg, _ = outputs_and_grads(ref_layer, x, **kw)
    if not fc_layer.built:
        fc_layer.build(x.shape)
    fc_layer.set_weights(ref_layer.get_weights())
    fo, fg, _ = outputs_and_grads(fc_layer, x, **kw)
    assert fc_layer.last_engine == engine, f"the fastcells {engine} kernels did not run"
    assert len(ro) == len(fo)
    worst_out = 0.0
    for k, (a, b) in enumerate(zip(ro, fo)):
        assert a.shape == b.shape, (k, a.shape, b.shape)
        err = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        assert err <= tol_out, f"output {k}: max abs error {err:.3e}"      # NaN fails too
        worst_out = worst_of(worst_out, err)
    assert len(rg) == len(fg), (len(rg), len(fg))
    worst_grad = 0.0
    for k, (a, b) in enumerate(zip(rg, fg)):
        assert (a is None) == (b is None), k
        if a is None:
            continue
        err = relative_error(b, a)
        assert err <= tol_grad, f"gradient {k}: error relative to the norm {err:.3e}"
        worst_grad = worst_of(worst_grad, err)
    return worst_out, worst_grad
