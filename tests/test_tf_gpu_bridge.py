"""The TensorFlow bridge's GPU route: TensorFlow tensors on a GPU reach the CUDA kernels
through DLPack, and the results come back the same way.

Without a GPU, TensorFlow has none either, so these tests make the bridge treat every
tensor as placed on a GPU (``_placed_on_gpu``) and run the CUDA kernels under Numba's CUDA
simulator; the tensors are then host memory (DLPack device kDLCPU), which the engine copies
in, and the results come back through the same capsules, built for host memory. What only
a GPU can check (device pointers, streams) is not covered here; the DLPack producer itself
is tested on host arrays, where NumPy and TensorFlow consume it.
"""
import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastcells
from fastcells import bridge, config, ops
from fastcells.bench import relative_error
from fastcells.bridge import _dlpack
from fastcells.bridge import tensorflow as tfb
from helpers import CUDA_SMALL_TUNABLES, needs_cuda
from layer_helpers import (CELL_IDS, CELLS, TOL_GRAD, TOL_OUT, assert_same, layer_case,
                           outputs_and_grads, pair)



# --------------------------------------------------------------------------- DLPack producer
def _np_view(capsule):
    class Producer:
        def __dlpack__(self, **_):
            return capsule

        def __dlpack_device__(self):
            return (_dlpack.KDL_CPU, 0)

    return np.from_dlpack(Producer())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.bool_])
def test_capsule_shares_memory_with_numpy_and_tensorflow(dtype):
    a = (np.arange(12) % 3).astype(dtype).reshape(3, 4)
    v = _np_view(_dlpack.capsule(a))
    assert v.dtype == a.dtype and v.shape == a.shape
    assert v.ctypes.data == a.ctypes.data
    t = tf.experimental.dlpack.from_dlpack(_dlpack.capsule(a))
    assert t.dtype.as_numpy_dtype == a.dtype and tuple(t.shape) == a.shape
    np.testing.assert_array_equal(t.numpy(), a)
    assert np.from_dlpack(t).ctypes.data == a.ctypes.data      # TensorFlow did not copy


def test_capsule_describes_strided_views():
    a = np.arange(24.0).reshape(4, 6)
    for view in (a[:, ::2], a[1:3], a.T, a[::-1]):
        got = _np_view(_dlpack.capsule(view))
        np.testing.assert_array_equal(got, view)
        assert got.ctypes.data == view.ctypes.data


class _DeviceLike:
    """Host memory shown through the CUDA array interface, as numba's device arrays show
    theirs."""

    def __init__(self, a):
        self._a = a
        self.__cuda_array_interface__ = {
            "shape": a.shape, "strides": None if a.flags["C_CONTIGUOUS"] else a.strides,
            "typestr": a.dtype.str, "data": (a.ctypes.data, False), "version": 3}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_])
def test_device_capsule_as_a_cuda_consumer_reads_it(dtype):
    """A device array's capsule says kDLCUDA, its GPU, pointer, shape, strides and dtype;
    read back by cuda.core's DLPack parser (which needs no driver for this)."""
    smv = pytest.importorskip("cuda.core.utils").StridedMemoryView
    base = np.arange(24).astype(dtype).reshape(4, 6)
    for a in (base, base.T, base[1:3, ::2]):
        c = _dlpack.capsule(_DeviceLike(a), device_id=3)

        class Producer:
            def __dlpack__(self, **_):
                return c

            def __dlpack_device__(self):
                return (_dlpack.KDL_CUDA, 3)

        view = smv.from_dlpack(Producer(), stream_ptr=-1)
        assert view.ptr == a.ctypes.data and view.device_id == 3 and view.is_device_accessible
        assert tuple(view.shape) == a.shape and np.dtype(view.dtype) == a.dtype
        assert tuple(view.strides) == tuple(s // a.itemsize for s in a.strides)


def test_capsule_keeps_the_array_alive_until_released():
    base = _dlpack.live()
    a = np.arange(5.0, dtype=np.float32)
    t = tf.experimental.dlpack.from_dlpack(_dlpack.capsule(a))
    del a
    gc.collect()
    assert _dlpack.live() == base + 1
    np.testing.assert_array_equal(t.numpy(), np.arange(5.0))     # memory still valid
    del t
    gc.collect()
    assert _dlpack.live() == base
    c = _dlpack.capsule(np.ones(3))         # never consumed: released with the capsule
    assert _dlpack.live() == base + 1
    del c
    gc.collect()
    assert _dlpack.live() == base


def test_a_release_inside_capsule_does_not_deadlock():
    """A garbage collection while ``capsule`` holds its lock can free an exported tensor
    and run its deleter on the same thread."""
    import threading
    box = [tf.experimental.dlpack.from_dlpack(_dlpack.capsule(np.ones(4, np.float32)))]

    def release_under_the_lock():
        with _dlpack._lock:
            box.clear()             # the tensor's last reference: the deleter runs here

    worker = threading.Thread(target=release_under_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the deleter waited for the lock its own thread holds"


def test_capsule_rejects_what_dlpack_cannot_describe():
    with pytest.raises(TypeError, match="complex"):
        _dlpack.capsule(np.ones(3, np.complex64))
    with pytest.raises(TypeError, match="list"):
        _dlpack.capsule([1.0, 2.0])
    packed = np.zeros(10, np.uint8)[1:9].view(np.float32)      # fine: 4-byte strides
    _np_view(_dlpack.capsule(packed))
    odd = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (3,), (6,))
    with pytest.raises(ValueError, match="multiples of the item size"):
        _dlpack.capsule(odd)


# --------------------------------------------------------------------------- engine choice
class _Placed:
    def __init__(self, device):
        self.device = device


def test_placement_decides_the_engine():
    assert tfb._placed_on_gpu(_Placed("/job:localhost/replica:0/task:0/device:GPU:0"))
    assert not tfb._placed_on_gpu(_Placed("/job:localhost/replica:0/task:0/device:CPU:0"))
    # an unplaced graph tensor goes where TensorFlow puts ops by default
    assert tfb._placed_on_gpu(_Placed("")) == bool(tf.config.list_logical_devices("GPU"))
    assert tfb._placed_on_gpu(tf.constant([1.0])) == ("GPU" in tf.constant([1.0]).device)


def _call(x, **kw):
    return bridge.KernelCall(cell="simple_rnn", x=x, kernel=None, recurrent_kernel=None,
                             bias=None, states=[], mask=None, dropout_mask=None,
                             recurrent_dropout_mask=None, training=False, options={},
                             return_sequences=False, **kw)


def test_gpu_route_needs_numba_cuda_and_free_gpu_memory(monkeypatch):
    gpu = _call(_Placed("/device:GPU:0"))
    assert tfb.engine_for(gpu) == "cuda" and tfb.engine_for(_call(_Placed("/CPU:0"))) == "cpu"
    monkeypatch.setattr(ops, "cuda_available", lambda: False)
    assert "numba.cuda finds no usable GPU" in tfb.supports(gpu)
    assert tfb.supports(_call(_Placed("/CPU:0"))) is None
    monkeypatch.setattr(ops, "cuda_available", lambda: True)
    fake = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake])
    monkeypatch.setattr(tf.config, "get_logical_device_configuration", lambda d: None)
    growth = {"on": False}
    monkeypatch.setattr(tf.config.experimental, "get_memory_growth", lambda d: growth["on"])
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in tfb.supports(gpu)
    growth["on"] = True
    assert tfb.supports(gpu) is None
    growth["on"] = False
    monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    assert tfb.supports(gpu) is None
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH")
    limit = [tf.config.LogicalDeviceConfiguration(memory_limit=1024)]
    monkeypatch.setattr(tf.config, "get_logical_device_configuration", lambda d: limit)
    assert tfb.supports(gpu) is None


# --------------------------------------------------------------------------- layers on the route
@pytest.fixture
def on_gpu(monkeypatch):
    """Every TensorFlow tensor counts as placed on a GPU, where engine="auto" runs the CUDA
    kernels (config.AUTO_CUDA); small CUDA launch tunables; an empty store of forward
    caches."""
    monkeypatch.setattr(tfb, "_placed_on_gpu", lambda t: True)
    monkeypatch.setattr(config, "AUTO_CUDA", True)
    monkeypatch.setattr(bridge, "pending", bridge.CacheStore())    # empty, whatever ran before
    for k, v in CUDA_SMALL_TUNABLES.items():
        monkeypatch.setattr(config, k, v)


CASES = [("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
         ("SimpleRNN", {"return_sequences": True})]


def _assert_same(ref_outputs, ref_grads, outputs, grads):
    assert len(ref_outputs) == len(outputs) and len(ref_grads) == len(grads)
    for a, b in zip(ref_outputs, outputs):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= TOL_OUT
    for a, b in zip(ref_grads, grads):
        assert relative_error(b, a) <= TOL_GRAD


@needs_cuda
@pytest.mark.parametrize("name,kw", CASES, ids=["lstm", "gru", "gru_rb", "simple_rnn"])
@pytest.mark.parametrize("engine", ["cuda", "auto"])
def test_layers_on_the_gpu_route_equal_builtin(on_gpu, rng, name, kw, engine):
    B, T, D, H = 3, 4, 3, 4
    x = rng.standard_normal((B, T, D)).astype("float32")
    mask = np.ones((B, T), bool)
    mask[0, 2:] = False
    h0 = [rng.standard_normal((B, H)).astype("float32")
          for _ in range(2 if name == "LSTM" else 1)]
    ref = getattr(keras.layers, name)(H, return_state=True, **kw)
    fc = getattr(fastcells, name)(H, return_state=True, engine=engine, **kw)
    ro, rg, _ = outputs_and_grads(ref, x, mask=mask, initial_state=h0, training=True)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    calls = dict(bridge.kernel_calls)
    base = _dlpack.live()
    fo, fg, _ = outputs_and_grads(fc, x, mask=mask, initial_state=h0, training=True)
    assert fc.last_engine == "cuda"
    cell = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "simple_rnn"}[name]
    for phase in ("forward", "backward"):
        key = f"{cell}_{phase}"
        assert bridge.kernel_calls[key] == calls.get(key, 0) + 1, key
    _assert_same(ro, rg, fo, fg)
    assert len(bridge.pending) == 0                # the backward took its cache
    assert _dlpack.live() > base                # the results share the kernels' memory
    del fo, fg                                  # (NumPy views of TensorFlow tensors)
    gc.collect()
    assert _dlpack.live() == base               # and all of it is released with them


@needs_cuda
def test_auto_keeps_the_builtin_layer_on_a_gpu_and_says_so_once(on_gpu, monkeypatch, rng,
                                                                caplog):
    """Until a real GPU has checked the CUDA kernels, engine="auto" runs the built-in
    implementation for tensors on a GPU (cuDNN there), with one log line saying how to
    opt in; engine="cuda" runs the kernels."""
    from fastcells import layers
    monkeypatch.setattr(config, "AUTO_CUDA", False)
    monkeypatch.setattr(layers, "_said_gpu", [])
    x = rng.standard_normal((3, 4, 2)).astype("float32")
    ref = keras.layers.LSTM(4, return_sequences=True)
    fc = fastcells.LSTM(4, return_sequences=True)
    ro, rg, _ = outputs_and_grads(ref, x, training=True)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    calls = dict(bridge.kernel_calls)
    with caplog.at_level("WARNING", logger="fastcells"):
        for _ in range(2):
            fo, fg, _ = outputs_and_grads(fc, x, training=True)
    assert fc.last_engine == "keras" and dict(bridge.kernel_calls) == calls
    said = [r for r in caplog.records if "engine='auto' runs the built-in" in r.getMessage()]
    assert len(said) == 1 and "FASTCELLS_AUTO_CUDA=1" in said[0].getMessage()
    _assert_same(ro, rg, fo, fg)
    cuda = fastcells.LSTM(4, return_sequences=True, engine="cuda")
    cuda.build(x.shape)
    cuda.set_weights(ref.get_weights())
    outputs_and_grads(cuda, x, training=True)
    assert cuda.last_engine == "cuda"


@needs_cuda
@pytest.mark.parametrize("config", ["backwards", "mask_zero_output", "no_bias",
                                    "dropout_training", "other_activations"])
@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_layer_configurations_on_the_gpu_route(on_gpu, rng, cell, config):
    """The layer options of tests/test_layers.py that change what crosses the bridge (masks,
    dropout masks, no bias, reversed sequences, other activations), on the GPU route."""
    ref, fc, x, call = layer_case(cell, config, rng, engine="cuda", shape=(3, 5, 2, 4))
    assert_same(ref, fc, x, engine="cuda", **call)


@needs_cuda
@pytest.mark.parametrize("cell", range(len(CELLS)), ids=CELL_IDS)
def test_float64_on_the_gpu_route(on_gpu, rng, cell):
    from helpers import random_mask
    name, kw = CELLS[cell]
    x = rng.standard_normal((3, 5, 2))
    ref, fc = pair(name, 4, engine="cuda", return_sequences=True, dtype="float64", **kw)
    assert_same(ref, fc, x, mask=random_mask(rng, 3, 5), tol_out=1e-12, tol_grad=1e-12,
                engine="cuda")


@needs_cuda
def test_gpu_route_under_tf_function_and_fit(on_gpu, rng):
    """In graph mode the kernels run in a py_function; training equals the built-in layer."""
    B, T, D, H = 4, 5, 3, 4

    def model(module):
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((T, D)), module.GRU(H, return_sequences=True),
                                 module.LSTM(H), keras.layers.Dense(1)])

    ref, fc = model(keras.layers), model(fastcells)
    fc.set_weights(ref.get_weights())
    for m in (ref, fc):
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.standard_normal((B, T, D)).astype("float32")
    y = rng.standard_normal((B, 1)).astype("float32")
    before = bridge.kernel_calls["lstm_backward"]
    for _ in range(2):
        lr, lf = ref.train_on_batch(x, y), fc.train_on_batch(x, y)
        assert abs(lr - lf) <= 1e-5 * max(1.0, abs(lr))
    assert bridge.kernel_calls["lstm_backward"] == before + 2
    assert [layer.last_engine for layer in fc.layers[:2]] == ["cuda", "cuda"]
    for a, b in zip(ref.get_weights(), fc.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(ref.predict(x, verbose=0), fc.predict(x, verbose=0), atol=1e-5)


@needs_cuda
def test_eager_gpu_route_leaves_nothing_in_tensorflow_tape_cache(on_gpu, rng):
    from tensorflow.python.ops import script_ops
    layer = fastcells.LSTM(4, engine="cuda")
    x = tf.constant(rng.standard_normal((2, 3, 3)).astype("float32"))
    layer(x)
    before = len(script_ops.tape_cache)
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        tape.gradient(loss, layer.trainable_weights)
    assert len(script_ops.tape_cache) == before


@needs_cuda
def test_ops_take_tensorflow_tensors_through_dlpack(rng):
    """``fastcells.ops`` with engine="cuda" takes TensorFlow tensors as DLPack producers, and
    asks them for their buffer without a stream argument, which ``tf.Tensor.__dlpack__``
    refuses (on a GPU the consumer would otherwise pass one)."""
    from fastcells.cuda import _linalg as la

    seen = []

    class Strict:                       # refuses any argument, as TensorFlow refuses streams
        def __init__(self, t):
            self._t = t

        def __dlpack__(self, *args, **kwargs):
            seen.append((args, kwargs))
            if args or kwargs:
                raise RuntimeError("no stream, please")
            return self._t.__dlpack__()

        def __dlpack_device__(self):
            return self._t.__dlpack_device__()

    t = tf.constant(rng.standard_normal((3, 4)).astype("float32"))
    view = la._DefaultStreamDLPack(Strict(t))
    np.testing.assert_array_equal(np.from_dlpack(view), t.numpy())
    view.__dlpack__(stream=-1, max_version=(1, 0))        # what a CUDA consumer passes
    assert seen == [((), {}), ((), {})]
    np.testing.assert_array_equal(la.to_host(la.to_device(Strict(t))), t.numpy())
    B, T, D, H = 2, 3, 2, 4
    x, W, U = (tf.constant(rng.standard_normal(s).astype("float32"))
               for s in ((B, T, D), (D, H), (H, H)))
    want = ops.simple_rnn_forward(x.numpy(), W.numpy(), U.numpy(), None,
                                  np.zeros((B, H), "float32"), engine="cpu")
    got = ops.simple_rnn_forward(x, W, U, None, tf.zeros((B, H)), engine="cuda")
    np.testing.assert_allclose(la.to_host(got.outputs), want.outputs, atol=TOL_OUT)


def test_engine_cpu_runs_the_cpu_kernels_on_gpu_tensors(on_gpu, rng):
    """engine="cpu" asks for the CPU kernels wherever the tensors are (the
    ``tf.numpy_function`` copies them); "auto" takes the GPU route there."""
    x = rng.standard_normal((3, 4, 2)).astype("float32")
    ref = keras.layers.GRU(4, return_sequences=True)
    fc = fastcells.GRU(4, return_sequences=True, engine="cpu")
    ro, rg, _ = outputs_and_grads(ref, x, training=True)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    fo, fg, _ = outputs_and_grads(fc, x, training=True)
    assert fc.last_engine == "cpu"
    _assert_same(ro, rg, fo, fg)
    call = _call(_Placed("/device:GPU:0"), engine="cpu")
    assert tfb.engine_for(call) == "cpu" and tfb.supports(call) is None
    assert tfb.engine_for(_call(_Placed("/device:GPU:0"))) == "cuda"
