"""fastcells layers against the built-in Keras layers holding the same weights."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcells
from fastcells import bridge
from fastcells.bench import relative_error
from helpers import FAIL_ON_FALLBACK, layer_arguments, random_mask
from layer_helpers import (CELL_IDS, CELLS, CONFIGS, TOL_GRAD, assert_same, layer_case,
                           outputs_and_grads, pair)

pytestmark = FAIL_ON_FALLBACK       # a fallback would compare Keras with Keras


def assert_same_gradients(want, got, what=""):
    """Each gradient of ``got`` within TOL_GRAD (relative_error) of the same in ``want``."""
    assert len(want) == len(got), (what, len(want), len(got))
    for k, (a, b) in enumerate(zip(want, got)):
        assert a is not None and b is not None, (what, k)
        err = relative_error(np.asarray(b), np.asarray(a))
        assert err <= TOL_GRAD, f"{what} gradient {k}: error relative to the norm {err:.3e}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_layer_equals_builtin(cell, config, rng):
    ref, fc, x, call = layer_case(cell, config, rng)
    assert_same(ref, fc, x, **call)


@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_long_sequence_500_steps(cell, rng):
    name, kw = CELLS[cell]
    x = rng.standard_normal((3, 500, 8)).astype("float32")
    ref, fc = pair(name, 16, return_sequences=True, **kw)
    assert_same(ref, fc, x, mask=random_mask(rng, 3, 500, p_keep=0.9))


@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_float64(cell, rng):
    name, kw = CELLS[cell]
    x = rng.standard_normal((4, 12, 3))
    ref, fc = pair(name, 5, return_sequences=True, dtype="float64", **kw)
    assert_same(ref, fc, x, mask=random_mask(rng, 4, 12), tol_out=1e-12, tol_grad=1e-12)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "SimpleRNN"])
def test_awkward_shapes(name, rng):
    for B, T, D, H in [(1, 1, 1, 1), (1, 7, 3, 13), (11, 1, 5, 3), (7, 3, 17, 31)]:
        x = rng.standard_normal((B, T, D)).astype("float32")
        ref, fc = pair(name, H, return_sequences=True, return_state=True)
        assert_same(ref, fc, x)


def test_kernels_really_run(rng):
    before = dict(bridge.kernel_calls)
    x = rng.standard_normal((2, 3, 4)).astype("float32")
    ref, fc = pair("GRU", 3)
    assert_same(ref, fc, x)
    assert bridge.kernel_calls["gru_forward"] > before.get("gru_forward", 0)
    assert bridge.kernel_calls["gru_backward"] > before.get("gru_backward", 0)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_dropout_training_same_seed_same_outputs_under_tf_function(name, rng):
    """Same seed, same draws in the same order: the same masks as the built-in layer, so
    the same outputs and the same gradients of the inputs and the weights."""
    x = tf.constant(rng.standard_normal((6, 10, 4)).astype("float32"))
    w = tf.constant(rng.standard_normal((6, 10, 5)).astype("float32"))
    ref, fc = pair(name, 5, dropout=0.5, recurrent_dropout=0.5, seed=11, return_sequences=True)
    ref.build(x.shape)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())

    def step(layer):
        @tf.function
        def run(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = layer(t, training=True)
                loss = tf.reduce_sum(y * w)
            return y, tape.gradient(loss, [t] + layer.trainable_weights)
        return run

    run_ref, run_fc = step(ref), step(fc)
    for draw in range(3):       # successive draws stay in step
        (a, ga), (b, gb) = run_ref(x), run_fc(x)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        assert_same_gradients(ga, gb, f"draw {draw}")
    assert fc.last_engine == "cpu"


_IMPLEMENTATION_1 = {      # id: (layer arguments, masks of Keras before 3.11)
    "no_dropout": (dict(), False),
    "dropout": (dict(dropout=0.4, recurrent_dropout=0.3), False),
    "recurrent_only": (dict(recurrent_dropout=0.3), False),
    "single_mask_dropout": (dict(dropout=0.4, recurrent_dropout=0.3), True),
    "single_mask_input_only": (dict(dropout=0.4), True),
    "single_mask_recurrent_only": (dict(recurrent_dropout=0.3), True),
}


@pytest.mark.parametrize("case", list(_IMPLEMENTATION_1))
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_implementation_1_equals_builtin(name, case, rng):
    """implementation=1 (the per-gate products), with the dropout masks of Keras 3.15 (one
    full mask per gate) and those of Keras before 3.11 (``single_mask``: one [B, n] mask
    whose row k gate k uses, broadcast over the batch; emulated by clearing both cells'
    ``dropout_mask_count``, so that the layer takes the single-mask branch of its mask
    stacking). Input dropout alone with per-gate masks is left out: Keras 3.15's own layers
    raise there (their fused path broadcasts the list of G masks to the sequence)."""
    kw, single_mask = _IMPLEMENTATION_1[case]
    x = rng.standard_normal((5, 9, 4)).astype("float32")
    ref, fc = pair(name, 6, implementation=1, seed=3, return_sequences=True, **kw)
    ref.build(x.shape)
    fc.build(x.shape)
    assert ref.cell.implementation == fc.cell.implementation == 1
    if single_mask:
        ref.cell.dropout_mask_count = fc.cell.dropout_mask_count = None
    assert_same(ref, fc, x, mask=random_mask(rng, 5, 9), training=bool(kw))


#: GRU reset_after=False with implementation=1, in training, with a mask and initial and
#: final states: the per-gate products without dropout, and one recurrent mask per gate (z, r
#: and the candidate's h_{t-1} * r_h) drawn as the built-in layer draws them from the same
#: seed, alone and with input dropout (recurrent dropout makes Keras take implementation=1
#: whatever was asked)
_RESET_BEFORE_IMPLEMENTATION_1 = {
    name: dict(implementation=1, training=True, return_sequences=True, return_state=True,
               use_mask=True, use_initial_state=True, **kw)
    for name, kw in {"no_dropout": dict(),
                     "recurrent_dropout": dict(recurrent_dropout=0.4, seed=7),
                     "dropout": dict(dropout=0.3, recurrent_dropout=0.4, seed=7)}.items()}


@pytest.mark.parametrize("config", list(_RESET_BEFORE_IMPLEMENTATION_1))
def test_gru_reset_before_implementation_1_equals_builtin(config, rng):
    """Outputs, final state and the gradients of the inputs, weights and initial state."""
    name, kw, units, x, call = layer_arguments("gru_reset_before", config, rng,
                                               configs=_RESET_BEFORE_IMPLEMENTATION_1)
    ref, fc = pair(name, units, **kw)
    ref.build(x.shape)
    fc.build(x.shape)
    assert ref.cell.implementation == fc.cell.implementation == 1
    assert not ref.cell.reset_after and not fc.cell.reset_after
    assert_same(ref, fc, x, **call)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "SimpleRNN"])
def test_bidirectional(name, rng):
    x = rng.standard_normal((4, 7, 3)).astype("float32")
    ref = keras.layers.Bidirectional(getattr(keras.layers, name)(5, return_sequences=True))
    fc = keras.layers.Bidirectional(getattr(fastcells, name)(5, return_sequences=True,
                                                             engine="cpu"))
    assert isinstance(fc.backward_layer, getattr(fastcells, name))
    fc.build(x.shape)
    fc.last_engine = "cpu"       # checked on the inner layers below
    assert_same(ref, fc, x, mask=random_mask(rng, 4, 7))
    assert fc.forward_layer.last_engine == fc.backward_layer.last_engine == "cpu"


def _stacked(module, cell, T, D):
    return keras.Sequential([
        keras.Input((T, D)),
        getattr(module, cell)(8, return_sequences=True),
        getattr(module, cell)(6, return_sequences=True),
        keras.layers.TimeDistributed(keras.layers.Dense(3)),
    ])


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_stacked_with_time_distributed_head(cell, rng):
    x = rng.standard_normal((4, 9, 5)).astype("float32")
    ref = _stacked(keras.layers, cell, 9, 5)
    fc = _stacked(fastcells, cell, 9, 5)
    fc.set_weights(ref.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        yr = ref(x)
        yf = fc(x)
        lr, lf = tf.reduce_sum(yr * yr), tf.reduce_sum(yf * yf)
    np.testing.assert_allclose(yr.numpy(), yf.numpy(), atol=1e-5)
    gr, gf = tape.gradient(lr, ref.trainable_weights), tape.gradient(lf, fc.trainable_weights)
    assert len(gr) == len(gf)
    for a, b in zip(gr, gf):
        assert relative_error(b.numpy(), a.numpy()) <= TOL_GRAD
    assert all(layer.last_engine == "cpu" for layer in fc.layers[:2])


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_embedding_mask_zero_and_masking_layer(cell, rng):
    """The mask of Embedding(mask_zero=True) and of Masking (any pattern): the outputs and
    the gradients of the inputs and every weight of the built-in model."""
    tokens = rng.integers(1, 50, (5, 12))
    tokens[0, 8:] = 0
    tokens[2, :3] = 0            # left padding and holes are allowed too
    tokens[3, 5] = 0

    def model(module, masking):
        layers = [keras.Input((12,), dtype="int32"), keras.layers.Embedding(50, 4, mask_zero=True)]
        if masking:
            layers = [keras.Input((12, 4)), keras.layers.Masking(0.0)]
        return keras.Sequential(layers + [getattr(module, cell)(6)])

    w = rng.standard_normal((5, 6)).astype("float32")

    def outputs_and_grads_of(net, inputs):
        """Outputs, and the gradients of sum(y * w) for the float inputs (not the tokens)
        and every trainable weight (the embedding's too)."""
        xs = tf.constant(inputs)
        with tf.GradientTape() as tape:
            if xs.dtype.is_floating:
                tape.watch(xs)
            y = net(xs)
            loss = tf.reduce_sum(y * w)
        targets = ([xs] if xs.dtype.is_floating else []) + net.trainable_weights
        return y.numpy(), [tf.convert_to_tensor(g) for g in tape.gradient(loss, targets)]

    ref, fc = model(keras.layers, False), model(fastcells, False)
    fc.set_weights(ref.get_weights())
    (a, ga), (b, gb) = outputs_and_grads_of(ref, tokens), outputs_and_grads_of(fc, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert_same_gradients(ga, gb, "mask_zero")
    assert fc.layers[-1].last_engine == "cpu"
    x = rng.standard_normal((5, 12, 4)).astype("float32")
    x[tokens == 0] = 0.0
    ref, fc = model(keras.layers, True), model(fastcells, True)
    fc.set_weights(ref.get_weights())
    (a, ga), (b, gb) = outputs_and_grads_of(ref, x), outputs_and_grads_of(fc, x)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert_same_gradients(ga, gb, "Masking")
    assert fc.layers[-1].last_engine == "cpu"


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "SimpleRNN"])
def test_stateful_and_reset_state(cell, rng):
    """stateful=True: the outputs, the states carried between calls (and after
    reset_state) and the gradients of the inputs and the weights, which run through the
    carried states, are the built-in ones."""
    x = rng.standard_normal((3, 4, 2)).astype("float32")
    ref = getattr(keras.layers, cell)(5, stateful=True, return_sequences=True)
    fc = getattr(fastcells, cell)(5, stateful=True, return_sequences=True, engine="cpu")
    ref.build(x.shape)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    for step in range(3):
        if step == 2:
            ref.reset_state()
            fc.reset_state()
        (a,), ga, _ = outputs_and_grads(ref, x)        # one call each: the states move on
        (b,), gb, _ = outputs_and_grads(fc, x)
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert_same_gradients(ga, gb, f"step {step}")
        assert fc.last_engine == "cpu"
        for a, b in zip(ref.states, fc.states):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_mixed_float16_policy(cell, rng):
    x = rng.standard_normal((4, 20, 3)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        ref, fc = pair(cell, 6, return_sequences=True)
        yr = ref(x)
        fc.build(x.shape)
        fc.set_weights(ref.get_weights())
        yf = fc(x)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert fc.last_engine == "cpu"
    assert yr.dtype == yf.dtype == "float16"
    assert fc.cell.kernel.dtype == "float32"
    # the built-in layer computes in float16; fastcells in float32 and rounds the outputs
    np.testing.assert_allclose(yr.numpy().astype("float32"), yf.numpy().astype("float32"),
                               atol=5e-3)


def test_same_weights_layout_and_config_as_builtin():
    ref = keras.layers.GRU(7, reset_after=True)
    fc = fastcells.GRU(7, reset_after=True)
    ref.build((None, None, 3))
    fc.build((None, None, 3))
    assert [w.shape for w in ref.weights] == [w.shape for w in fc.weights]
    names = [[w.path.split("/")[-1] for w in layer.weights] for layer in (ref, fc)]
    assert names[0] == names[1]
    cfg = fc.get_config()
    assert cfg.pop("engine") == "auto"
    assert cfg.pop("checkpoint_steps") is None
    assert cfg == ref.get_config() | {"name": cfg["name"]}


def test_fallback_warns_once_and_matches_builtin(rng):
    x = rng.standard_normal((3, 5, 2)).astype("float32")
    ref = keras.layers.LSTM(4, activation="softsign")
    fc = fastcells.LSTM(4, activation="softsign")           # engine="auto"
    ref.build(x.shape)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    with pytest.warns(UserWarning, match="activation='softsign'") as record:
        fc(x)
        fc(x)
    assert len([w for w in record if "softsign" in str(w.message)]) == 1
    assert fc.last_engine == "keras"
    np.testing.assert_allclose(ref(x).numpy(), fc(x).numpy(), atol=1e-6)
    forced = fastcells.LSTM(4, activation="softsign", engine="cpu")
    with pytest.raises(ValueError, match=r"engine='cpu'.*softsign"):
        forced(x)
    keras_engine = fastcells.LSTM(4, engine="keras")
    keras_engine(x)
    assert keras_engine.last_engine == "keras"


def test_engine_argument_is_checked():
    with pytest.raises(ValueError, match=r"engine must be one of .* got engine='tpu'"):
        fastcells.GRU(3, engine="tpu")
    # TF tensors on the CPU: the CUDA kernels cannot take them, and the error says why
    with pytest.raises(ValueError, match=r"engine='cuda'.*the CPU"):
        fastcells.GRU(3, engine="cuda")(np.zeros((1, 2, 3), "float32"))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="checkpoint_steps"):
            fastcells.LSTM(3, checkpoint_steps=bad)


@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_checkpoint_steps_same_results_as_builtin(cell, rng):
    """Chunked recomputation through the layer: outputs and gradients of the built-in layer."""
    name, kw = CELLS[cell]
    x = rng.standard_normal((6, 40, 3)).astype("float32")
    mask = random_mask(rng, 6, 40)
    ref, fc = pair(name, 5, return_sequences=True, **kw)
    fc.checkpoint_steps = 7
    assert_same(ref, fc, x, mask=mask, training=True)
    clone = type(fc).from_config(fc.get_config())
    assert clone.checkpoint_steps == 7
