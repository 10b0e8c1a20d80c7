"""Models with fastcells layers where Keras models go after training: exported artifacts
served by a process without fastcells, conversion both ways, compiled steps and
distributions (in processes of their own: ``tests/deploy_checks.py``)."""
import json
import os
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcells
from fastcells import __main__ as cli
from fastcells import _export, bridge, convert

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(code_or_args, env=None, timeout=600):
    args = ([sys.executable, "-c", code_or_args] if isinstance(code_or_args, str)
            else [sys.executable, *code_or_args])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def _stacked(module, seed=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((7, 5))
    h = keras.layers.Bidirectional(module.LSTM(6, return_sequences=True))(inp)
    h = module.GRU(4, return_sequences=True)(h)
    h = module.SimpleRNN(3)(h)
    return keras.Model(inp, keras.layers.Dense(2)(h))


def _x(n=3):
    return np.random.default_rng(0).standard_normal((n, 7, 5)).astype("float32")


# ------------------------------------------------------------------ export and serving
SERVE = r"""
import sys
sys.modules["fastcells"] = None          # importing fastcells fails in this process
import numpy as np, tensorflow as tf
d = sys.argv[1]
x = np.load(d + "/x.npy")
archive = tf.saved_model.load(d + "/archive")
np.save(d + "/archive.npy", archive.serve(tf.constant(x)).numpy())
saved = tf.saved_model.load(d + "/saved")
out = saved.signatures["serving_default"](tf.constant(x))
np.save(d + "/saved.npy", list(out.values())[0].numpy())
print("served", "fastcells" in sys.modules and sys.modules["fastcells"] is not None)
"""


def test_export_serves_in_a_process_without_fastcells(tmp_path):
    model = _stacked(fastcells)
    x = _x()
    expected = model(x).numpy()
    assert model.layers[2].last_engine == "cpu"
    model.export(str(tmp_path / "archive"), verbose=False)        # the Keras export archive
    tf.saved_model.save(model, str(tmp_path / "saved"))
    np.save(tmp_path / "x.npy", x)
    # the artifacts hold TensorFlow ops only, no Python callback
    for name in ("archive", "saved"):
        pb = (tmp_path / name / "saved_model.pb").read_bytes()
        assert b"PyFunc" not in pb and b"fastcells_" not in pb, name
    # the model in this process still runs the kernels after exporting
    bridge.kernel_calls.clear()
    np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-6)
    assert bridge.kernel_calls["lstm_forward"] > 0 and model.layers[2].last_engine == "cpu"

    proc = _run(["-c", SERVE, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "served False" in proc.stdout
    for name in ("archive", "saved"):
        served = np.load(tmp_path / f"{name}.npy")
        assert np.max(np.abs(served - expected)) <= 1e-5, name


def test_exporting_is_recognised_only_inside_an_export():
    assert not _export.exporting()
    seen = []

    @tf.function(input_signature=[tf.TensorSpec((None, 7, 5))])
    def f(x):
        seen.append(_export.exporting())
        return x

    f(_x())
    assert seen == [False]


# ------------------------------------------------------------------ TensorFlow XLA
def test_tf_jit_compile_true_runs_the_builtin_recurrence_with_one_clear_warning():
    x, y = _x(8), np.ones((8, 2), "float32")
    losses = []
    for module in (keras.layers, fastcells):
        model = _stacked(module)
        model.compile(optimizer="adam", loss="mse", jit_compile=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses.append(model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                                    shuffle=False).history["loss"])
        assert model.jit_compile is True
    messages = [str(w.message) for w in caught]
    ours = [m for m in messages if m.startswith("fastcells.")]
    # one warning per layer (the Bidirectional's two LSTMs, the GRU, the SimpleRNN), each
    # saying why and what to do; not Keras's generic "doesn't support jit_compile"
    assert len(ours) == 4, messages
    assert all("XLA" in m and "jit_compile=False" in m for m in ours), ours
    assert not any("support `jit_compile=True`" in m for m in messages), messages
    assert model.layers[2].last_engine == "keras"
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_tf_jit_compile_auto_runs_the_kernels():
    model = _stacked(fastcells)
    model.compile(optimizer="adam", loss="mse")         # jit_compile="auto"
    bridge.kernel_calls.clear()
    model.fit(_x(4), np.ones((4, 2), "float32"), verbose=0)
    assert model.jit_compile is False
    assert bridge.kernel_calls["gru_backward"] > 0


# ------------------------------------------------------------------ conversion
def _nested(module):
    keras.utils.set_random_seed(5)
    inner = keras.Sequential([keras.Input((6, 8)),
                              module.GRU(5, return_sequences=True, reset_after=False,
                                         recurrent_dropout=0.2)], name="inner")
    inp = keras.Input((6, 3))
    h = keras.layers.Bidirectional(module.LSTM(4, return_sequences=True, unit_forget_bias=False,
                                               kernel_regularizer="l2"),
                                   merge_mode="concat")(inp)
    h = inner(h)
    h = keras.layers.TimeDistributed(keras.layers.Dense(3))(h)
    h = module.SimpleRNN(3, go_backwards=True)(h)
    return keras.Model(inp, keras.layers.Dense(1)(h))


def _recurrent(model):
    return [lay for lay in model._flatten_layers()
            if isinstance(lay, (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN))]


def _configs(model):
    out = []
    for lay in _recurrent(model):
        c = lay.get_config()
        c.pop("engine", None), c.pop("checkpoint_steps", None)
        out.append(c)
    return out


@pytest.mark.parametrize("direction", ["from_keras", "to_keras"])
def test_conversion_replaces_every_recurrent_layer_and_keeps_the_rest(direction):
    source_module = keras.layers if direction == "from_keras" else fastcells
    model = _nested(source_module)
    model.compile(optimizer="adam", loss="mse")
    x = _x(4)[:, :6, :3]
    model.fit(x, np.ones((4, 1)), verbose=0)              # optimizer state to carry over
    before = [w.copy() for w in model.get_weights()]
    kinds = [type(lay) for lay in _recurrent(model)]

    out = getattr(fastcells, direction)(model)

    want_fast = direction == "from_keras"
    layers = _recurrent(out)
    assert len(layers) == 4          # two LSTMs in the Bidirectional, a GRU in a nested model
    assert all(type(lay).__module__.startswith("fastcells") == want_fast for lay in layers)
    assert _configs(out) == _configs(model)
    for a, b in zip(out.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(out.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
    assert int(out.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    for a, b in zip(out.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the input model is unchanged
    assert [type(lay) for lay in _recurrent(model)] == kinds
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_conversion_keeps_the_fastcells_arguments_and_round_trips():
    model = keras.Sequential([keras.Input((4, 2)),
                              fastcells.LSTM(3, engine="cpu", checkpoint_steps=2)])
    back = fastcells.from_keras(fastcells.to_keras(model))
    assert back.layers[0].engine == "auto" and back.layers[0].checkpoint_steps is None
    kept = fastcells.from_keras(model)                  # already fastcells: left as it is
    assert kept.layers[0].engine == "cpu" and kept.layers[0].checkpoint_steps == 2


def test_a_converted_file_loads_without_fastcells(tmp_path):
    model = _nested(fastcells)
    x = _x(2)[:, :6, :3]
    src, dst = tmp_path / "fast.keras", tmp_path / "plain.keras"
    model.save(src)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    assert cli.main(["convert", str(src), str(dst), "--to", "keras"]) == 0
    code = (
        "import sys; sys.modules['fastcells'] = None\n"
        "import numpy as np, keras\n"
        f"d = {str(tmp_path)!r}\n"
        "m = keras.saving.load_model(d + '/plain.keras')\n"
        "y = m.predict(np.load(d + '/x.npy'), verbose=0)\n"
        "err = np.max(np.abs(y - np.load(d + '/y.npy')))\n"
        "print('err', err)\n"
        "assert err <= 1e-6, err\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # and the file converted back runs the kernels again
    again = tmp_path / "again.keras"
    assert cli.main(["convert", str(dst), str(again), "--to", "fastcells"]) == 0
    loaded = keras.saving.load_model(again)
    assert all(type(lay).__module__ == "fastcells.layers" for lay in _recurrent(loaded))
    np.testing.assert_allclose(loaded.predict(x, verbose=0), np.load(tmp_path / "y.npy"),
                               atol=1e-6)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("bad", [None, "model.keras", keras.layers.LSTM(3), np.zeros(3)])
def test_conversion_of_something_that_is_not_a_model_raises(bad):
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        fastcells.from_keras(bad)
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        fastcells.to_keras(bad)


def test_convert_file_rejects_what_is_not_a_keras_archive(tmp_path, capsys):
    text = tmp_path / "notes.keras"
    text.write_text("not a zip")
    with pytest.raises(ValueError, match="is not a .keras archive"):
        convert.convert_file(text, tmp_path / "out.keras", "keras")
    other_zip = tmp_path / "other.keras"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="it has no config.json"):
        convert.convert_file(other_zip, tmp_path / "out.keras", "keras")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.convert_file(tmp_path / "missing.keras", tmp_path / "out.keras", "keras")
    with pytest.raises(ValueError, match="to must be one of"):
        convert.convert_file(other_zip, tmp_path / "out.keras", "torch")
    with pytest.raises(ValueError, match="dst must differ from src"):
        convert.convert_file(other_zip, other_zip, "keras")
    assert not (tmp_path / "out.keras").exists()
    # the command line says what is wrong and exits with status 2
    assert cli.main(["convert", str(text), str(tmp_path / "out.keras"), "--to", "keras"]) == 2
    assert "is not a .keras archive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", str(text), str(tmp_path / "out.keras"), "--to", "onnx"])
    assert e.value.code == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


# ------------------------------------------------------------------ other processes
def _checks(backend, env=None):
    proc = _run([os.path.join(HERE, "deploy_checks.py")],
                env=dict(env or {}, KERAS_BACKEND=backend))
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " 0 failed" in proc.stdout


@pytest.mark.late
def test_jax_jitted_step_and_data_parallel_over_two_host_devices():
    _checks("jax", {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


@pytest.mark.late
def test_torch_compile_runs_the_kernels_as_an_opaque_op():
    _checks("torch")


@pytest.mark.late
def test_tensorflow_mirrored_strategy_over_two_logical_cpus():
    _checks("tensorflow")


@pytest.mark.late
def test_jax_data_parallel_over_two_processes():
    """``jax.distributed`` over two processes on 127.0.0.1: the same loss history as the
    built-in layers in both, each running the kernels on its own shard."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = os.path.join(HERE, "jax_multiprocess_check.py")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="jax")
    procs = [subprocess.Popen([sys.executable, script, str(pid), port], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for pid in (0, 1)]
    try:
        done = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:         # a process left waiting for its peer
            if p.poll() is None:
                p.kill()
    outs = []
    for p, (out, err) in zip(procs, done):
        assert p.returncode == 0, err[-4000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        outs.append(json.loads(line[len("RESULT "):]))
    for res in outs:
        ref, fc = np.array(res["keras.layers"]), np.array(res["fastcells"])
        np.testing.assert_allclose(fc, ref, rtol=1e-4)
        assert fc[-1] < fc[0]
        assert res["kernel_calls"].get("lstm_backward", 0) > 0, res
        assert res["kernel_calls"].get("gru_backward", 0) > 0, res
    np.testing.assert_array_equal(outs[0]["fastcells"], outs[1]["fastcells"])
