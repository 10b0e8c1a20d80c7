"""TensorFlow bridge: the kernels inside TensorFlow ops, with ``tf.custom_gradient`` for the
backward pass.

On the CPU the kernels run in a ``tf.numpy_function``. For tensors on a GPU they run on the
GPU engine: under ``tf.function`` (and so in ``model.fit``) in a ``tf.py_function``, which
TensorFlow places on the GPU with its inputs, and eagerly as a direct call. The tensors
cross without copies both ways through DLPack: ``fastcells.ops`` views TensorFlow's device
buffers in place (``Tensor.__dlpack__``), and TensorFlow takes the kernels' results back
from capsules that ``fastcells.bridge._dlpack`` builds around numba's device arrays.
TensorFlow runs its kernels on streams of its own, so the GPU route synchronises the device
before the kernels read their inputs and after they write their results (numba and
TensorFlow both use the device's primary context, so one ``cuda.synchronize()`` waits for
both). TensorFlow must leave GPU memory to numba: ``supports`` asks for memory growth (or a
memory limit) and the layer falls back to the built-in implementation without it.

The forward keeps its cache in ``fastcells.bridge.pending`` and returns a scalar token that
the gradient function captures; the backward pops the cache by that token (or recomputes
the forward when it is gone, e.g. for a gradient of an inference-mode call). Only inputs,
outputs and gradients cross between TensorFlow and the kernels. This works the same
eagerly, inside ``tf.function`` and in ``model.fit``.
"""
import os

import numpy as np
import tensorflow as tf

from .. import ops
from ..cpu import RESULT_ALIGN, copy_result
from . import HostCall


def _placed_on_gpu(t):
    """Whether TensorFlow keeps ``t`` on a GPU: its device when it has one (eager tensors,
    explicit placements), else whether TensorFlow sees a GPU, where it places the ops of a
    ``tf.function`` by default."""
    device = (getattr(t, "device", "") or "").upper()
    if device:
        return "GPU" in device
    return bool(tf.config.list_logical_devices("GPU"))


def engine_for(call):
    """The ops engine that runs ``call``: "cuda" for tensors on a GPU, "cpu" otherwise, and
    "cpu" wherever the layer asks for it (``tf.numpy_function`` copies tensors from a GPU).

    Example::

        engine_for(call)        # "cpu" on a machine without a GPU
    """
    if call.engine == "cpu":
        return "cpu"
    return "cuda" if _placed_on_gpu(call.x) else "cpu"


def _gpu_memory_reason():
    """Why the kernels would find no GPU memory left, or None."""
    if os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH", "").lower() == "true":
        return None
    for gpu in tf.config.list_physical_devices("GPU"):
        limited = any(getattr(c, "memory_limit", None)
                      for c in tf.config.get_logical_device_configuration(gpu) or ())
        if not limited and not tf.config.experimental.get_memory_growth(gpu):
            return ("TensorFlow reserves almost all of the GPU's memory for itself (memory "
                    "growth is off), which leaves none for the fastcells CUDA kernels; set "
                    "TF_FORCE_GPU_ALLOW_GROWTH=true, or call "
                    "tf.config.experimental.set_memory_growth(gpu, True) before TensorFlow "
                    "first uses the GPU")
    return None


def supports(call):
    """None when the call can run here, else the reason (for the layer's fallback warning).

    Example::

        supports(call)          # None, or e.g. "the inputs live on a GPU but numba.cuda ..."
    """
    if engine_for(call) == "cpu":
        return None
    if not ops.cuda_available():
        return ("the inputs live on a GPU but numba.cuda finds no usable GPU (is numba-cuda "
                "installed?)")
    return _gpu_memory_reason()


def run(call):
    """Run the recurrence; returns ``(outputs, [final states])`` as tensors."""
    engine = engine_for(call)
    host = HostCall(call, engine)
    op = _numpy_op if engine == "cpu" else _device_op
    dtype = call.x.dtype
    nstates, n_diff, n_in = host.nstates, host.n_diff, host.n_in
    arrays = host.arrays(call)

    def np_forward(*arrays):
        outputs, states, token = host.forward(arrays, keep=True)
        return [outputs, *states, np.int64(token)]

    def np_backward(*arrays):
        return host.backward(arrays[:n_in], arrays[n_in], arrays[n_in + 1:])

    @tf.custom_gradient
    def _rnn(*diff_inputs):
        all_in = list(diff_inputs) + arrays[n_diff:]
        outs = op(np_forward, all_in, [dtype] * (1 + nstates) + [tf.int64],
                  f"fastcells_{call.cell}_forward")
        y, states, token = outs[0], outs[1:1 + nstates], outs[-1]
        _set_shapes(call.x, call.recurrent_kernel, y, states, host.return_sequences)

        def grad(*upstream):
            ups = [tf.zeros_like(t) if u is None else u
                   for u, t in zip(upstream, [y] + list(states))]
            gin = op(np_backward, all_in + [token] + ups, [dtype] * n_diff,
                     f"fastcells_{call.cell}_backward")
            for gt, t in zip(gin, diff_inputs):
                gt.set_shape(t.shape)
            return gin

        return (y, *states), grad

    res = _rnn(*arrays[:n_diff])
    return res[0], list(res[1:])


def _numpy_op(fn, inputs, Tout, name):
    """``fn`` (NumPy arrays in and out) as a TensorFlow op on the CPU."""
    return tf.numpy_function(fn, inputs, Tout, stateful=True, name=name)


def _device_op(fn, inputs, Tout, name):
    """``fn`` (device arrays in and out) on tensors that live on the GPU, without copies.

    Under ``tf.function`` this is a ``tf.py_function``; eagerly ``fn`` is called directly
    (an eager ``py_function`` under a ``GradientTape`` would keep its inputs and outputs in
    TensorFlow's tape cache for a gradient that ``tf.custom_gradient`` never asks for).
    """
    from numba import cuda

    def body(*tensors):
        cuda.synchronize()      # TensorFlow's kernels that produce the inputs may still run
        results = fn(*[_from_tf(t) for t in tensors])
        cuda.synchronize()      # TensorFlow may read the results as soon as this returns
        return [_to_tf(r, dt) for r, dt in zip(results, Tout)]

    if tf.executing_eagerly():
        return body(*inputs)
    return tf.py_function(body, inputs, Tout, name=name)


def _from_tf(t):
    """A tensor as the GPU engine takes it: a scalar on the host, an array as a numba
    device array viewing the tensor's memory (a copy only for a tensor that TensorFlow
    placed on the CPU after all)."""
    if t.shape.rank == 0:
        return t.numpy()
    from .. import cuda as la
    kind, index = t.__dlpack_device__()
    if int(kind) == 2 and not la.SIMULATOR:      # kDLCUDA
        from numba import cuda
        current = cuda.get_current_device().id
        if int(index) != current:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} lives on GPU {index} while "
                             f"numba.cuda's current device is GPU {current}; select the "
                             f"same GPU for both (e.g. with numba.cuda.gpus[{index}])")
    return la.to_device(t)


def _to_tf(a, dtype):
    """A result of the GPU engine as a tensor of ``dtype`` on the device it lives on, sharing
    its memory (NumPy results and the CUDA simulator's arrays are host memory)."""
    from .. import cuda as la
    from . import _dlpack
    host = isinstance(a, (np.ndarray, np.generic)) or la.SIMULATOR
    if host:
        a = la.to_host(a)
    if a.ndim == 0 or a.size == 0:
        return tf.constant(np.zeros(a.shape, dtype.as_numpy_dtype) if a.size == 0 else a,
                           dtype)
    # TensorFlow takes row-major buffers only, and its kernels assume aligned ones (a CPU
    # tensor that is not 64-byte aligned aborts the process in Eigen's checks)
    if host:
        if not a.flags["C_CONTIGUOUS"] or a.ctypes.data % RESULT_ALIGN:
            a = copy_result(a)
    elif not la.c_contiguous(a) or a.__cuda_array_interface__["data"][0] % RESULT_ALIGN:
        a = la.copy(a)                          # a new device allocation: 256-byte aligned
    t = tf.experimental.dlpack.from_dlpack(_dlpack.capsule(a))
    return t if t.dtype == dtype else tf.cast(t, dtype)


def _set_shapes(x, U, y, states, return_sequences):
    B, T = x.shape[0], x.shape[1]
    H = U.shape[0]
    y.set_shape((B, T, H) if return_sequences else (B, H))
    for s in states:
        s.set_shape((B, H))
