"""Whole models: fit, serialization, weights interchange, bad input through the layers."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcells
from fastcells import config
from helpers import FAIL_ON_FALLBACK

pytestmark = FAIL_ON_FALLBACK       # a fallback would compare Keras with Keras

VOCAB, T, B = 500, 40, 16


def imdb_model(module, cell, units=8):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 16),
        getattr(module, cell)(units),
        keras.layers.Dense(1, activation="sigmoid"),
    ])


def synthetic_tokens(seed=0, n=4 * B):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, (n, T)).astype("int32")
    y = (x[:, :5].mean(1) > VOCAB / 2).astype("float32")
    return x, y


def _trained_pair(cell, optimizer, batch_size, epochs):
    """The built-in and the fastcells IMDB-style model from the same weights, each
    compiled with ``optimizer()`` and fitted on the same tokens: ``[(loss history,
    model), ...]``; asserts the kernels ran in the fastcells one."""
    x, y = synthetic_tokens()
    out, initial = [], None
    for module in (keras.layers, fastcells):
        model = imdb_model(module, cell)
        if initial is None:
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        model.compile(optimizer=optimizer(), loss="binary_crossentropy")
        h = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
        out.append((np.array(h.history["loss"]), model))
    assert out[1][1].layers[1].last_engine == "cpu"
    return out


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_a_fit_step_has_the_builtin_gradients(cell):
    """The gradients of a ``model.fit`` step of the IMDB-style model, every weight's
    (Embedding, recurrent layer, Dense), equal the built-in model's, measured by their size
    (fastcells.bench.equivalence.gradient_probe: the step leaves the gradients in the
    weights), as the loss histories below cannot: Adam's first steps barely depend on it."""
    from fastcells.bench import equivalence
    (ref, ref_model), (fc, fc_model) = _trained_pair(cell, equivalence.gradient_probe,
                                                     batch_size=4 * B, epochs=1)
    grads = fc_model.get_weights()
    loss_error, grad_error = equivalence.compare_fit_step((fc[0], grads),
                                                          (ref[0], ref_model.get_weights()))
    assert loss_error <= config.TOL_OUTPUT_F32
    assert grad_error <= config.TOL_GRAD_F32, grad_error
    assert all(np.abs(g).max() > 0 for g in grads)          # every weight had one


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_fit_loss_history_equals_builtin(cell):
    """The IMDB-style model (Embedding, RNN, Dense) trains to the same losses."""
    (ref, _), (fc, model) = _trained_pair(cell, lambda: keras.optimizers.Adam(1e-2),
                                          batch_size=B, epochs=3)
    x, y = synthetic_tokens()
    ev = model.evaluate(x, y, batch_size=B, verbose=0)
    pr = model.predict(x, batch_size=B, verbose=0)
    assert np.isfinite(ev) and pr.shape == (len(x), 1)
    np.testing.assert_allclose(ref, fc, atol=1e-4)
    assert fc[-1] < fc[0]          # it did learn


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_save_and_load_round_trip(cell, tmp_path):
    x, _ = synthetic_tokens(n=5)
    model = imdb_model(fastcells, cell)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)                # no custom_objects needed
    layer = loaded.layers[1]
    assert type(layer) is getattr(fastcells, cell)
    assert layer.engine == "auto"
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    assert model.layers[1].last_engine == layer.last_engine == "cpu"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_weights_move_between_builtin_and_fastcells(cell, tmp_path):
    x, _ = synthetic_tokens(n=5)
    ref = imdb_model(keras.layers, cell)
    path = os.path.join(tmp_path, "w.weights.h5")
    ref.save_weights(path)
    fc = imdb_model(fastcells, cell)
    fc.layers[1].cell.kernel.assign(np.zeros(fc.layers[1].cell.kernel.shape))
    fc.load_weights(path)
    np.testing.assert_allclose(ref.predict(x, verbose=0), fc.predict(x, verbose=0), atol=1e-6)
    assert fc.layers[1].last_engine == "cpu"
    path2 = os.path.join(tmp_path, "w2.weights.h5")
    fc.save_weights(path2)
    back = imdb_model(keras.layers, cell)
    back.load_weights(path2)
    for a, b in zip(ref.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_jit_compile_auto_turns_xla_off_for_the_layer():
    model = imdb_model(fastcells, "LSTM")
    assert model.layers[1].supports_jit is False
    model.compile(optimizer="adam", loss="binary_crossentropy", jit_compile="auto")
    x, y = synthetic_tokens(n=B)
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert model.jit_compile is False
    assert model.layers[1].last_engine == "cpu"


# ------------------------------------------------------------------ bad input, edge cases
def _built(cell="LSTM", **kw):
    layer = getattr(fastcells, cell)(4, engine="cpu", **kw)
    layer.build((None, None, 3))
    return layer


@pytest.mark.parametrize("make_input, pattern", [
    (lambda: np.zeros((2, 3), "float32"), r"ndim=3|3-D"),
    (lambda: np.zeros((2, 5, 7), "float32"), r"7 features but the layer was built for 3 "
                                             r"\(kernel shape \(3, 16\)\)"),
])
def test_bad_input_shape_names_the_shapes(make_input, pattern):
    layer = _built()
    weights = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError, match=pattern):
        layer(make_input())
    for a, b in zip(weights, layer.get_weights()):        # a failed call changes no weight
        np.testing.assert_array_equal(a, b)


def test_bad_initial_state_and_mask():
    layer = _built()
    x = np.zeros((2, 5, 3), "float32")
    with pytest.raises(ValueError, match=r"expects 2 initial state\(s\) .* got 1"):
        layer(x, initial_state=[np.zeros((2, 4), "float32")])
    with pytest.raises(ValueError,
                       match=r"initial_state\[1\] must have shape .*\(2, 4\), got \(2, 5\)"):
        layer(x, initial_state=[np.zeros((2, 4), "float32"), np.zeros((2, 5), "float32")])
    with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 5\), got \(2, 6\)"):
        layer(x, mask=np.ones((2, 6), bool))


def test_zero_time_steps_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no time steps"):
        _built()(np.zeros((2, 0, 3), "float32"))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_empty_batch(cell):
    layer = _built(cell, return_sequences=True, return_state=True)
    x = tf.zeros((0, 5, 3))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
        loss = tf.reduce_sum(out[0])
    assert tuple(out[0].shape) == (0, 5, 4)
    assert all(tuple(s.shape) == (0, 4) for s in out[1:])
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    assert tuple(grads[0].shape) == (0, 5, 3)
    assert all(not np.asarray(g).any() for g in grads[1:])


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_nan_and_inf_propagate_like_builtin(cell):
    x = np.random.default_rng(0).standard_normal((3, 6, 3)).astype("float32")
    x[0, 2, 1] = np.nan
    x[1, 4, 0] = np.inf
    x[2, 1, 2] = -np.inf
    ref = getattr(keras.layers, cell)(4, return_sequences=True)
    fc = getattr(fastcells, cell)(4, return_sequences=True, engine="cpu")
    ref.build(x.shape)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    a, b = ref(x).numpy(), fc(x).numpy()
    assert fc.last_engine == "cpu"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b))
    finite = np.isfinite(a)
    np.testing.assert_allclose(a[finite], b[finite], atol=1e-5)
