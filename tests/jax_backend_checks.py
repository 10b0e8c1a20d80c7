"""fastcells layers under the JAX Keras backend, against the built-in layers.

The Keras backend is fixed when keras is first imported, so these checks run in a process of
their own (``tests/test_jax_backend.py`` starts it); run it by hand with::

    KERAS_BACKEND=jax python tests/jax_backend_checks.py [name-substring ...]

Every check compares a fastcells layer (``engine="cpu"``) with the built-in layer holding
the same weights (float64: with the NumPy reference, tests/reference.py): outputs and
states, and the gradients ``jax.grad`` takes through
``Layer.stateless_call`` with respect to the inputs, the initial states and each trainable
weight, under ``jax.jit`` as ``model.fit`` runs them. The script prints one line per check
and exits with status 1 when any check fails (77 when jax is not importable).
"""
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

try:
    import jax  # noqa: E402
    import jax.numpy as jnp  # noqa: E402
except ImportError as e:        # tests/test_jax_backend.py skips on this status
    print(f"jax is not importable: {e}")
    sys.exit(77)
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastcells  # noqa: E402
from fastcells import bridge, config  # noqa: E402
from fastcells.bench import equivalence, relative_error, worst_of  # noqa: E402
from fastcells.bridge import jax as jax_bridge  # noqa: E402
from helpers import (LAYER_CELLS, LAYER_CONFIGS, bidirectional_pair,  # noqa: E402
                     layer_arguments, random_mask, run_backend_checks)

TOL_OUT = config.TOL_OUTPUT_F32         # absolute, float32 outputs and states
TOL_GRAD = config.TOL_GRAD_F32          # relative to the gradient's norm (relative_error)

TOL_F64 = config.TOL_F64

CELLS = LAYER_CELLS
# what changes the arrays that cross the bridge (each check compiles two jit functions):
# the extras (mask, dropout masks), the states in and out, no bias, reversed sequences
CONFIGS = {k: LAYER_CONFIGS[k] for k in (
    "last_output", "backwards", "mask_zero_output", "state_in_out", "no_bias",
    "dropout_training")}
# the other configurations of the TensorFlow layer tests (but "sequences", whose arrays
# "backwards" sends), each on some of the cells, so that every cell meets several of them
# within the suite's time
MORE_CONFIGS = {"mask": ("lstm", "simple_rnn"), "mask_last_backwards": ("gru",),
                "input_dropout_only": ("lstm", "gru_reset_before"),
                "dropout_inference": ("gru",),
                "other_activations": ("lstm", "gru_reset_before", "simple_rnn")}

worst = {"out": 0.0, "grad": 0.0, "out_f64": 0.0, "grad_f64": 0.0, "fit_loss": 0.0,
         "fit_grad": 0.0}


def pair(name, units, **kw):
    return (getattr(keras.layers, name)(units, **kw),
            getattr(fastcells, name)(units, engine="cpu", **kw))


def outputs_and_grads(layer, x, *, mask=None, initial_state=None, training=False, seed=0):
    """Outputs and the gradients of ``sum(o * w)`` over the outputs (fixed random w) with
    respect to x, the trainable weights and the initial states, by ``jax.vjp`` under one
    ``jax.jit``."""
    nontrainable = [v.value for v in layer.non_trainable_variables]
    rng = np.random.default_rng(seed)

    def outputs(tv, xs, states):
        kwargs = {"training": training}
        if mask is not None:
            kwargs["mask"] = jnp.asarray(mask)
        if states is not None:
            kwargs["initial_state"] = list(states)
        out, _ = layer.stateless_call(tv, nontrainable, xs, **kwargs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    states = None if initial_state is None else tuple(jnp.asarray(s) for s in initial_state)
    tv = [v.value for v in layer.trainable_variables]
    xs = jnp.asarray(x)
    shapes = jax.eval_shape(outputs, tv, xs, states)        # traced, not compiled
    weights = [rng.standard_normal(o.shape).astype(o.dtype) for o in shapes]

    @jax.jit
    def outputs_and_vjp(tv, xs, states):
        outs, vjp = jax.vjp(outputs, tv, xs, states)
        return outs, vjp([jnp.asarray(w) for w in weights])  # the gradients of sum(o * w)

    outs, (g_tv, g_x, g_states) = outputs_and_vjp(tv, xs, states)
    grads = [g_x] + list(g_tv) + list(g_states or ())
    return [np.asarray(o) for o in outs], [np.asarray(g) for g in grads]


def compare(ro, rg, fo, fg, tol_out=TOL_OUT, tol_grad=TOL_GRAD, kind=""):
    assert len(ro) == len(fo) and len(rg) == len(fg)
    for k, (a, b) in enumerate(zip(ro, fo)):
        assert a.shape == b.shape, (k, a.shape, b.shape)
        err = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        assert err <= tol_out, f"output {k}: max abs error {err:.3e}"      # NaN fails too
        worst["out" + kind] = worst_of(worst["out" + kind], err)
    for k, (a, b) in enumerate(zip(rg, fg)):
        assert a.shape == b.shape, (k, a.shape, b.shape)
        err = relative_error(b, a)
        assert err <= tol_grad, f"gradient {k}: error relative to the norm {err:.3e}"
        worst["grad" + kind] = worst_of(worst["grad" + kind], err)


def assert_same(ref, fc, x, *, inner=None, tol=(TOL_OUT, TOL_GRAD, ""), **kw):
    """Build both layers, copy the built-in weights, compare outputs and gradients; the
    kernels must have run in ``fc`` (or in each of the ``inner`` layers)."""
    calls = dict(bridge.kernel_calls)
    ref.build(x.shape)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    ro, rg = outputs_and_grads(ref, x, **kw)
    fo, fg = outputs_and_grads(fc, x, **kw)
    for layer in inner or [fc]:
        assert layer.last_engine == "cpu", f"the kernels did not run ({layer.last_engine})"
    assert sum(bridge.kernel_calls.values()) > sum(calls.values()), "no kernel ran"
    compare(ro, rg, fo, fg, *tol)


def layer_case(cell, config):
    name, kw, units, x, call = layer_arguments(cell, config, np.random.default_rng(1))
    ref, fc = pair(name, units, **kw)
    assert_same(ref, fc, x, **call)


def float64_case(cell):
    """float64 (JAX's 64-bit mode on) against the NumPy reference (tests/reference.py) to
    TOL_F64, with a mask, initial states and the final states returned, in both
    directions. The built-in layers are no float64 reference here: under Keras 3.15 their
    JAX scan carries float32 states out of float64 ones and fails."""
    import reference
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    name, kw = CELLS[cell]
    base = cell.replace("_reset_before", "")
    rng = np.random.default_rng(7)
    B, T, D, H = 4, 12, 3, 5
    x = rng.standard_normal((B, T, D))
    mask = random_mask(rng, B, T)
    states = [rng.standard_normal((B, H)) for _ in range(2 if name == "LSTM" else 1)]
    with enable_x64(True):
        for backwards in (False, True):
            fc = getattr(fastcells, name)(H, return_sequences=True, return_state=True,
                                          go_backwards=backwards, dtype="float64",
                                          engine="cpu", **kw)
            fc.build(x.shape)
            fo, fg = outputs_and_grads(fc, x, mask=mask, initial_state=states)
            assert fc.last_engine == "cpu", fc.last_engine
            assert all(o.dtype == np.float64 for o in fo + fg)
            projections = np.random.default_rng(0)      # those of outputs_and_grads
            w = [projections.standard_normal(o.shape) for o in fo]
            weights = fc.get_weights()
            opts = dict(mask=mask, go_backwards=backwards,
                        reset_after=kw.get("reset_after", True))
            y, final = getattr(reference, f"{base}_forward")(x, *weights, *states, **opts)
            g = getattr(reference, f"{base}_backward")(x, *weights, *states, d_outputs=w[0],
                                                       d_states=w[1:], **opts)
            want = [g["x"], g["kernel"], g["recurrent_kernel"], g["bias"], *g["states"]]
            compare([y, *final], want, fo, fg, TOL_F64, TOL_F64, "_f64")


def bidirectional_case(name):
    ref, fc, x, mask = bidirectional_pair(name)
    assert isinstance(fc.backward_layer, getattr(fastcells, name))
    assert_same(ref, fc, x, mask=mask, inner=[fc.forward_layer, fc.backward_layer])


def stateful_case(name):
    """stateful=True: outputs, the states carried between calls (and after reset_state)
    and the gradients of a call from the carried states (``stateless_call`` takes them
    from the non-trainable variables) are the built-in ones."""
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((3, 5, 2)).astype("float32") for _ in range(3)]
    ref, fc = pair(name, 4, stateful=True, return_sequences=True)
    ref.build(xs[0].shape)
    fc.build(xs[0].shape)
    fc.set_weights(ref.get_weights())
    for step, x in enumerate(xs):
        if step == 2:
            ref.reset_state()
            fc.reset_state()
        ro, rg = outputs_and_grads(ref, x)      # the states stay where they are
        fo, fg = outputs_and_grads(fc, x)
        compare(ro, rg, fo, fg)
        want, got = np.asarray(ref(x)), np.asarray(fc(x))      # the states move on
        compare([want], [], ro, [])             # the gradients' call ran from them
        assert fc.last_engine == "cpu", fc.last_engine
        compare([want] + [np.asarray(s) for s in ref.states], [],
                [got] + [np.asarray(s) for s in fc.states], [])


def evicted_cache_case():
    """A backward whose cache is gone recomputes the forward: the same gradients."""
    saved = config.MAX_PENDING_CACHES
    config.MAX_PENDING_CACHES = 0
    try:
        x = np.random.default_rng(2).standard_normal((3, 7, 2)).astype("float32")
        ref, fc = pair("GRU", 4, return_sequences=True)
        assert_same(ref, fc, x, training=True)
    finally:
        config.MAX_PENDING_CACHES = saved
    assert len(bridge.pending) == 0


def fit_case(name):
    """The IMDB-style model has the built-in gradients in a training step (their size, with
    the gradient probe) and trains to the same losses (model.fit runs under jax.jit)."""
    rng = np.random.default_rng(3)
    x = rng.integers(1, 50, size=(32, 12)).astype("int32")
    y = (rng.random((32, 1)) < 0.5).astype("float32")
    histories, models, initial = [], [], None
    steps = []
    for module in (keras.layers, fastcells):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((12,), dtype="int32"),
                                  keras.layers.Embedding(50, 8, mask_zero=True),
                                  getattr(module, name)(6), keras.layers.Dense(1)])
        if initial is None:
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        steps.append(equivalence.gradient_step(model, x, y))   # one step's gradients
        h = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        histories.append(np.array(h.history["loss"]))
        models.append(model)
    assert models[1].layers[1].last_engine == "cpu"
    loss_error, grad_error = equivalence.compare_fit_step(steps[1], steps[0])
    worst["fit_grad"] = max(worst["fit_grad"], grad_error)
    assert loss_error <= TOL_OUT and grad_error <= TOL_GRAD, (loss_error, grad_error)
    err = float(np.abs(histories[0] - histories[1]).max())
    worst["fit_loss"] = max(worst["fit_loss"], err)
    assert err <= 1e-4, (histories, err)
    assert histories[1][-1] < histories[1][0]
    np.testing.assert_allclose(models[0].predict(x, verbose=0), models[1].predict(x, verbose=0),
                               atol=1e-4)


def ffi_case():
    """A jitted training step runs the kernels as the XLA FFI target (on every JAX that has
    ``jax.ffi``: a failed registration fails here), and leaves no kept cache behind."""
    from fastcells.bridge import _xla_ffi
    assert config.JAX_FFI
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 2)), jnp.float32)
    layer = fastcells.LSTM(4, engine="cpu")
    layer.build(x.shape)
    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]

    def loss(tv, x):
        out, _ = layer.stateless_call(tv, ntv, x, training=True)
        return jnp.sum(out ** 2)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    hlo = step.lower(tv, x).as_text()
    if _xla_ffi.supported():
        assert _xla_ffi.available(), f"the FFI target did not register: {_xla_ffi.failure}"
        assert _xla_ffi.TARGET in hlo and "callback" not in hlo.lower(), "not the FFI target"
    else:                       # a JAX without jax.ffi: the callback instead
        assert _xla_ffi.TARGET not in hlo and "callback" in hlo.lower()
    jax.block_until_ready(step(tv, x))
    assert len(bridge.pending) == 0 and not jax_bridge._views


def pure_callback_case():
    """With ``config.JAX_FFI`` off the kernels run in ``jax.pure_callback``: the same
    outputs and gradients."""
    from fastcells.bridge import _xla_ffi

    def no_ffi(*args):
        raise AssertionError("the FFI target was used with config.JAX_FFI off")

    config.JAX_FFI, saved = False, _xla_ffi.call
    _xla_ffi.call = no_ffi
    try:
        layer_case("lstm", "mask_zero_output")
        layer_case("gru", "state_in_out")
    finally:
        config.JAX_FFI, _xla_ffi.call = True, saved


def fallback_case():
    """What the bridge cannot run falls back to the built-in layer with one warning (auto)
    and raises with engine='cpu'."""
    call = bridge.KernelCall(cell="simple_rnn", x=np.zeros((2, 3, 1), "float32"),
                             kernel=jnp.zeros((1, 2)), recurrent_kernel=jnp.zeros((2, 2)),
                             bias=None, states=[jnp.zeros((2, 2))], mask=None,
                             dropout_mask=None, recurrent_dropout_mask=None, training=False,
                             options={}, return_sequences=False)
    reason = jax_bridge.supports(call)
    assert reason is not None and "x is a ndarray, not a JAX array" in reason, reason
    call.x = jnp.zeros((2, 3, 1))
    assert jax_bridge.supports(call) is None


def cases():
    for cell in CELLS:
        for config_name in CONFIGS:
            yield (f"layer/{cell}/{config_name}",
                   lambda c=cell, k=config_name: layer_case(c, k))
    for config_name, cells in MORE_CONFIGS.items():
        for cell in cells:
            yield (f"layer/{cell}/{config_name}",
                   lambda c=cell, k=config_name: layer_case(c, k))
    for cell in CELLS:
        yield f"float64/{cell}", lambda c=cell: float64_case(c)
    yield "bidirectional/GRU", lambda: bidirectional_case("GRU")
    yield "stateful/LSTM", lambda: stateful_case("LSTM")
    for name in ("LSTM", "GRU"):
        yield f"fit/{name}", lambda n=name: fit_case(n)
    yield "bridge/evicted_cache", evicted_cache_case
    yield "bridge/ffi", ffi_case
    yield "bridge/pure_callback", pure_callback_case
    yield "bridge/supports", fallback_case


def main(argv):
    return run_backend_checks("jax", cases, argv, worst)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
