"""Models with fastcells layers under a compiler or a distribution, against the built-in
layers: the same gradients in a training step (measured by their size: the step of
``fastcells.bench.equivalence.gradient_probe`` leaves them in the weights) and the same loss
history, with the kernels running.

The Keras backend, the number of host devices and TensorFlow's logical devices are fixed
when a process starts, so these checks run in processes of their own
(``tests/test_deploy.py`` starts them); run them by hand with::

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/deploy_checks.py
    KERAS_BACKEND=torch python tests/deploy_checks.py
    KERAS_BACKEND=tensorflow python tests/deploy_checks.py

- JAX: ``model.fit`` jitted as a whole (``jit_compile=True``), and under
  ``keras.distribution.DataParallel`` over two host devices.
- torch: ``jit_compile=True``, so Keras runs the train step under ``torch.compile``.
- TensorFlow: ``tf.distribute.MirroredStrategy`` over two logical CPU devices.

The script prints one line per check and exits with status 1 when any check fails (77 when
the backend's framework cannot be imported).
"""
import os
import sys

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

try:
    if BACKEND == "tensorflow":
        import tensorflow as tf
        _cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    else:
        __import__(BACKEND)
except ImportError as e:
    print(f"{BACKEND} is not importable: {e}")
    sys.exit(77)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastcells  # noqa: E402
from fastcells import bridge, config  # noqa: E402
from fastcells.bench import equivalence  # noqa: E402
from helpers import run_backend_checks  # noqa: E402

#: relative difference of the loss histories (float32, a few Adam steps)
TOL_LOSS = 1e-4
worst = {"loss_history": 0.0, "step_gradients": 0.0}

B, T, D = 16, 12, 5


def data():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2 * B, T, D)).astype("float32")
    y = rng.standard_normal((2 * B, 1)).astype("float32")
    return x, y


def stacked(module, name):
    """Two recurrent layers (the first returning sequences) and a Dense head."""
    cls = getattr(module, name)
    return keras.Sequential([keras.Input((T, D)), cls(8, return_sequences=True), cls(6),
                             keras.layers.Dense(1)])


def _trained(name, fit, build, fit_ref):
    """``fit_ref(model)`` (default ``fit``) and ``fit(model)`` of the built-in and the
    fastcells model, from the same weights; asserts the kernels ran in the fastcells one."""
    out, initial = [], None
    for module, train in ((keras.layers, fit_ref or fit), (fastcells, fit)):
        keras.utils.set_random_seed(11)
        model = build(module, name)
        if initial is None:
            initial = model.get_weights()
        else:
            model.set_weights(initial)
        bridge.kernel_calls.clear()
        out.append((train(model), model.get_weights()))
    cell = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "simple_rnn"}[name]
    assert bridge.kernel_calls[cell + "_forward"] > 0, dict(bridge.kernel_calls)
    assert bridge.kernel_calls[cell + "_backward"] > 0, dict(bridge.kernel_calls)
    return out


def histories(name, fit, build=stacked, fit_ref=None):
    """The loss histories of the built-in and the fastcells model trained by ``fit``."""
    (ref, _), (fc, _) = _trained(name, fit, build, fit_ref)
    ref, fc = np.asarray(ref, "float64"), np.asarray(fc, "float64")
    err = float(np.max(np.abs(fc - ref) / np.abs(ref)))
    worst["loss_history"] = max(worst["loss_history"], err)
    assert err <= TOL_LOSS, (ref, fc, err)
    assert fc[-1] < fc[0], fc
    return ref, fc


def step_gradients(name, fit, build=stacked, fit_ref=None):
    """The gradients of one step of ``fit(model, probe=True)`` (the whole data in one
    batch, under the route being checked), every weight's, against the built-in model's,
    within the gradient bound relative to their size."""
    def probe(train):
        return lambda model: train(model, probe=True)

    ref, fc = _trained(name, probe(fit), build, probe(fit_ref) if fit_ref else None)
    (loss_error, grad_error) = equivalence.compare_fit_step(
        (fc[0][0], fc[1]), (ref[0][0], ref[1]))
    worst["step_gradients"] = max(worst["step_gradients"], grad_error)
    assert loss_error <= config.TOL_OUTPUT_F32, loss_error
    assert grad_error <= config.TOL_GRAD_F32, grad_error
    assert all(np.abs(g).max() > 0 for g in fc[1]), "a weight had no gradient"


def fit_compiled(model, jit_compile=True, probe=False):
    """Adam for three epochs of two batches, or with ``probe`` one step of
    :func:`~fastcells.bench.equivalence.gradient_probe` over the whole data."""
    optimizer = equivalence.gradient_probe() if probe else keras.optimizers.Adam(1e-2)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    assert model.jit_compile is jit_compile, (model.jit_compile, jit_compile)
    x, y = data()
    batch, epochs = (len(x), 1) if probe else (B, 3)
    return model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False,
                     verbose=0).history["loss"]


def jit_case(name):
    step_gradients(name, fit_compiled)
    histories(name, fit_compiled)


def torch_compile_case(name):
    # the reference runs eagerly: torch.compile of the built-in layer's loop takes minutes
    # and gives the same results
    def eager(m, probe=False):
        return fit_compiled(m, jit_compile=False, probe=probe)
    step_gradients(name, fit_compiled, fit_ref=eager)
    histories(name, fit_compiled, fit_ref=eager)


def data_parallel_case(name):
    import jax
    devices = jax.devices("cpu")
    assert len(devices) >= 2, f"needs two host devices, got {devices}"
    dist = keras.distribution.DataParallel(devices=devices[:2])
    keras.distribution.set_distribution(dist)
    try:
        from fastcells.bridge import jax as jax_bridge
        assert jax_bridge._batch_sharding() is not None     # the kernels run per shard
        step_gradients(name, fit_compiled)
        histories(name, fit_compiled)
    finally:
        keras.distribution.set_distribution(None)


_strategy = []


def mirrored_case(name):
    import tensorflow as tf
    if not _strategy:       # one per process: a second one's collectives would clash
        _strategy.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    strategy = _strategy[0]
    assert strategy.num_replicas_in_sync == 2

    def build(module, name):
        with strategy.scope():
            return stacked(module, name)

    def fit(model, probe=False):
        with strategy.scope():
            optimizer = equivalence.gradient_probe() if probe else keras.optimizers.Adam(1e-2)
            model.compile(optimizer=optimizer, loss="mse")
        x, y = data()
        batch, epochs = (len(x), 1) if probe else (B, 3)
        return model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False,
                         verbose=0).history["loss"]

    step_gradients(name, fit, build)
    histories(name, fit, build)


def cases():
    for name in ("LSTM", "GRU"):
        if BACKEND == "jax":
            yield f"jax/jit/{name}", lambda n=name: jit_case(n)
            yield f"jax/data_parallel/{name}", lambda n=name: data_parallel_case(n)
        elif BACKEND == "torch":
            yield f"torch/compile/{name}", lambda n=name: torch_compile_case(n)
        else:
            yield f"tensorflow/mirrored/{name}", lambda n=name: mirrored_case(n)


if __name__ == "__main__":
    sys.exit(run_backend_checks(BACKEND, cases, sys.argv[1:], worst))
