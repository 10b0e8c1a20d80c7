"""Finite-difference gradient check through the Keras layers, float64."""
import numpy as np
import pytest
import tensorflow as tf

import fastcells
from helpers import random_mask
from layer_helpers import outputs_and_grads

CASES = {
    "plain": dict(),
    "mask_backwards_sequences": dict(use_mask=True, go_backwards=True, return_sequences=True),
    "state_zero_output": dict(use_mask=True, zero_output_for_mask=True, use_initial_state=True),
    "no_bias_relu": dict(use_bias=False, activation="relu"),
}
CELLS = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}), ("SimpleRNN", {})]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", range(len(CELLS)), ids=["lstm", "gru", "gru_rb", "simple_rnn"])
def test_layer_gradients_match_finite_differences(cell, case, rng):
    """The gradients of the inputs, every trainable weight (the bias too: [G*H], or [2, 3H]
    for the GRU with reset_after) and the initial states, by central differences."""
    name, base = CELLS[cell]
    kw = dict(base, **CASES[case])
    B, T, D, H = 3, 5, 2, 3
    x = rng.standard_normal((B, T, D))
    mask = random_mask(rng, B, T) if kw.pop("use_mask", False) else None
    states = None
    if kw.pop("use_initial_state", False):
        states = [rng.standard_normal((B, H)) for _ in range(2 if name == "LSTM" else 1)]
    layer = getattr(fastcells, name)(H, dtype="float64", engine="cpu", **kw)
    layer.build(x.shape)
    weights = layer.trainable_weights          # kernel, recurrent_kernel, (bias)
    assert len(weights) == (2 if kw.get("use_bias") is False else 3)

    def loss_and_grads(xv):
        # grads: x, each trainable weight, initial states
        _, grads, loss = outputs_and_grads(layer, xv, mask=mask, initial_state=states)
        return loss, grads

    _, grads = loss_and_grads(x)
    assert layer.last_engine == "cpu"
    eps = 1e-6

    def fd(get, set_, shape, analytic):
        n = int(np.prod(shape))
        for k in range(6):      # one entry in each sixth (C order): every row of a [2, 3H] bias
            lo = k * n // 6
            idx = np.unravel_index(rng.integers(lo, max((k + 1) * n // 6, lo + 1)), shape)
            old = get(idx)
            set_(idx, old + eps)
            lp, _ = loss_and_grads(x)
            set_(idx, old - eps)
            lm, _ = loss_and_grads(x)
            set_(idx, old)
            num = (lp - lm) / (2 * eps)
            assert abs(num - analytic[idx]) <= 1e-6 * max(1.0, abs(num)), (idx, num, analytic[idx])

    fd(lambda i: x[i], lambda i, v: x.__setitem__(i, v), x.shape, grads[0])
    for var, g in zip(weights, grads[1:]):
        def get(i, var=var):
            return var.numpy()[i]

        def set_(i, v, var=var):
            a = var.numpy()
            a[i] = v
            var.assign(a)
        fd(get, set_, tuple(var.shape), g)
    for k, s in enumerate(states or []):
        fd(lambda i, s=s: s[i], lambda i, v, s=s: s.__setitem__(i, v), s.shape,
           grads[1 + len(weights) + k])


@pytest.mark.parametrize("name", ["LSTM", "GRU", "SimpleRNN"])
def test_dropout_training_gradients_match_finite_differences(name, rng):
    """With dropout the masks are redrawn per call; a fixed seed redraws the same ones."""
    B, T, D, H = 4, 4, 3, 3
    x = rng.standard_normal((B, T, D))

    def run(xv):
        layer = getattr(fastcells, name)(H, dtype="float64", engine="cpu", dropout=0.4,
                                         recurrent_dropout=0.4, seed=5)
        layer.build(x.shape)
        layer.set_weights([np.random.default_rng(9).standard_normal(w.shape) * 0.5
                           for w in layer.get_weights()])
        xs = tf.constant(xv)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            loss = tf.reduce_sum(tf.sin(layer(xs, training=True)))
        return float(loss), np.asarray(tape.gradient(loss, xs))

    _, g = run(x)
    eps = 1e-6
    for _ in range(6):
        idx = tuple(rng.integers(0, n) for n in x.shape)
        old = x[idx]
        x[idx] = old + eps
        lp, _ = run(x)
        x[idx] = old - eps
        lm, _ = run(x)
        x[idx] = old
        num = (lp - lm) / (2 * eps)
        assert abs(num - g[idx]) <= 1e-6 * max(1.0, abs(num)), (idx, num, g[idx])
