"""The equivalence measure itself (fastcells/bench/equivalence.py): every check against the
built-in layers, in the tests and in the benchmarks, rests on it, so each of its guards is
tried with the input it is there for: NaN and Inf, one bad element in a large tensor,
gradient lists of unequal length, and a training step whose gradients differ in size only.
"""
import io
import math

import numpy as np
import pytest

from fastcells import bench, config
from fastcells.bench import equivalence as eq
from fastcells.bench import report as reporting


# --------------------------------------------------------------------------- relative_error
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["got", "want"])
def test_relative_error_is_nan_where_either_side_is_not_finite(bad, side):
    want = np.ones((4, 5))
    got = want.copy()
    (got if side == "got" else want)[2, 3] = bad
    assert math.isnan(eq.relative_error(got, want))
    assert eq.check_equivalence("fastcells-cpu", 0.0, eq.relative_error(got, want)) is not None


def test_relative_error_sees_one_wrong_element_of_a_large_tensor():
    """A million elements, one of them 1% off: the Frobenius ratio alone is 1e-5 (below the
    gradient bound), the largest-element ratio 1e-2."""
    rng = np.random.default_rng(0)
    want = rng.uniform(0.5, 1.0, (1000, 1000))
    got = want.copy()
    k = np.unravel_index(np.argmax(want), want.shape)
    got[k] *= 1.01
    frobenius = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert frobenius < config.TOL_GRAD_F32
    err = eq.relative_error(got, want)
    assert err == pytest.approx(0.01, rel=1e-6)
    assert eq.check_equivalence("fastcells-cpu", 0.0, err) is not None


def test_relative_error_is_the_size_independent_ratio():
    want = np.arange(1.0, 7.0).reshape(2, 3)
    assert eq.relative_error(want * (1 + 1e-3), want) == pytest.approx(1e-3)
    assert eq.relative_error(want * 10, want * 10) == 0.0
    assert eq.relative_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0
    assert eq.relative_error(np.full(3, 1e-30), np.zeros(3)) == math.inf   # zero reference
    with pytest.raises(AssertionError, match=r"shapes differ: \(2, 3\) and \(3, 2\)"):
        eq.relative_error(want, want.T)


def test_worst_of_keeps_nan_from_either_side():
    assert math.isnan(eq.worst_of(0.0, float("nan")))
    assert math.isnan(eq.worst_of(float("nan"), 0.0))
    assert eq.worst_of(None, 2e-5) == 2e-5
    assert eq.worst_of(3e-5, 1e-5) == 3e-5


# --------------------------------------------------------------------------- compare
def _grads(rng, n=3):
    return [rng.standard_normal((4, 6)) for _ in range(n)]


def test_compare_takes_the_worst_gradient_and_nan_anywhere(rng):
    y = rng.standard_normal((3, 5))
    g = _grads(rng)
    bad = [a.copy() for a in g]
    bad[1] *= 1.001
    max_error, grad_error = eq.compare((y, bad), (y, g))
    assert max_error == 0.0 and grad_error == pytest.approx(1e-3)
    bad[2][0, 0] = np.nan                           # after a worse error: still NaN
    assert math.isnan(eq.compare((y, bad), (y, g))[1])
    y_nan = y.copy()
    y_nan[1, 1] = np.nan
    assert math.isnan(eq.compare((y_nan, None), (y, None))[0])


def test_compare_refuses_gradient_lists_of_unequal_length_and_shape(rng):
    y = rng.standard_normal((3, 5))
    g = _grads(rng)
    with pytest.raises(AssertionError, match="2 gradients, the built-in layer has 3"):
        eq.compare((y, g[:2]), (y, g))
    with pytest.raises(AssertionError, match=r"a gradient has shape \(6, 4\)"):
        eq.compare((y, [g[0].T] + g[1:]), (y, g))
    with pytest.raises(AssertionError, match="gradients on one side only"):
        eq.compare((y, g), (y, None))
    with pytest.raises(AssertionError, match=r"outputs have shape \(5, 3\)"):
        eq.compare((y.T, g), (y, g))


def test_check_equivalence_fails_nan_and_names_what_is_off():
    assert eq.check_equivalence("fastcells-cpu", 1e-6, 1e-6, loss_error=1e-6,
                                step_grad_error=1e-6) is None
    nan = float("nan")
    for kw, words in ((dict(max_error=nan), "outputs differ"),
                      (dict(grad_error=nan), "gradients differ"),
                      (dict(loss_error=nan), "the loss of a training step"),
                      (dict(step_grad_error=2e-4), "the gradients of a training step")):
        args = dict(max_error=0.0, grad_error=0.0)
        args.update(kw)
        problem = eq.check_equivalence("fastcells-cpu", **args)
        assert problem is not None and words in problem, problem
    # float64 is held to float64's bound
    assert eq.check_equivalence("fastcells-cpu", 1e-8, None, "float64") is not None


def test_compare_fit_step_refuses_unequal_weight_lists_and_keeps_nan(rng):
    g = _grads(rng)
    with pytest.raises(AssertionError, match="2 weights after the step"):
        eq.compare_fit_step((0.5, g[:2]), (0.5, g))
    loss_error, grad_error = eq.compare_fit_step((float("nan"), g), (0.5, g))
    assert math.isnan(loss_error) and grad_error == 0.0


# --------------------------------------------------------------------------- tables
def test_the_tables_print_nan_errors_as_nan():
    """A NaN error must read as "nan" in the printed table, never as a number or "-"."""
    nan = float("nan")
    layer = reporting.Result("imdb", "lstm", "train", "fastcells-cpu", 500, times=[0.01],
                             max_error=nan, grad_error=nan, status="mismatch")
    fit = reporting.FitResult("lstm", "fastcells-cpu", 128, 500, times=[0.05],
                              max_error=0.0, loss_error=nan, grad_error=nan)
    stream = io.StringIO()
    bench.write_report(bench.Report(layers=[layer], fit=[fit]), stream)
    text = stream.getvalue()
    rows = [line for line in text.splitlines() if "fastcells-cpu" in line]
    assert len(rows) == 2, text
    assert rows[0].split().count("nan") == 2, rows[0]       # max|err| and grad err
    assert rows[1].split().count("nan") == 2, rows[1]       # loss err and grad err


# --------------------------------------------------------------------------- the probe
def _probe_model(scale):
    """A small Keras model whose first layer's gradient is multiplied by ``scale``."""
    import keras

    class Scaled(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 3), initializer="glorot_uniform")

        def call(self, x):
            # the forward is x @ w; the gradient reaching w is scaled by ``scale``
            w = self.w * scale + keras.ops.stop_gradient(self.w * (1 - scale))
            return keras.ops.matmul(x, w)

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), Scaled(), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_the_gradient_probe_sees_a_gradient_one_percent_too_large():
    """Adam's first step is about lr * sign(g): the weights after it are the same with a
    gradient 1% too large. The probe step's weights are the gradients, so it tells them
    apart; the model gets its weights and optimizer back afterwards."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype("float32")
    y = rng.standard_normal((16, 1)).astype("float32")
    ref, off = _probe_model(1.0), _probe_model(1.01)
    off.set_weights(ref.get_weights())
    weights = ref.get_weights()

    adam = [eq.fit_step(m, x, y) for m in (ref, off)]
    assert eq.compare_fit_step(adam[1], adam[0])[1] < config.TOL_GRAD_F32   # blind

    probe = [eq.gradient_step(m, x, y) for m in (ref, off)]
    loss_error, grad_error = eq.compare_fit_step(probe[1], probe[0])
    assert loss_error == 0.0
    assert grad_error == pytest.approx(0.01, rel=1e-3)
    assert eq.check_equivalence("fastcells-cpu", 0.0, None, "float32", loss_error,
                                grad_error) is not None
    for a, b in zip(ref.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    assert type(ref.optimizer).__name__ == "Adam"


def test_the_gradient_probe_densifies_an_embedding_gradient():
    """An Embedding's gradient is sparse (one row per token, repeated tokens repeated): the
    probe leaves the summed dense gradient, zero for the rows no token used."""
    import keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2),
                              keras.layers.Flatten(), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.array([[1, 1, 3]], "int32")
    y = np.zeros((1, 1), "float32")
    emb, dense = model.get_weights()
    _, (g_emb, g_dense) = eq.gradient_step(model, x, y)
    pred = float(np.asarray(model(x)).ravel()[0])
    d = 2 * pred                                    # d mse / d prediction, batch of one
    k = dense.reshape(3, 2)
    want = np.zeros_like(emb)
    for slot, token in enumerate(x[0]):
        want[token] += d * k[slot]
    np.testing.assert_allclose(g_emb, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_dense.ravel(), d * emb[x[0]].ravel(), rtol=1e-5)
