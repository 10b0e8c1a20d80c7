"""The CPU comparison: the engines as cases (the built-in and fastcells layers under the
current Keras backend: TensorFlow in ``tf.function``, JAX under ``jax.jit``, torch eagerly;
and torch.nn), and the runners of the layer grid, the IMDB-style
``model.fit`` and the cold start."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from . import torch_worker as _torch
from .equivalence import check_equivalence, compare, compare_fit_step, gradient_step
from .engines import BASELINE, CPU_ENGINES, available_engines, ordered_engines
from .report import ColdResult, FitResult, Result
from .timing import NoProgress, Settings, error_status, time_together, timing_kwargs
from .timing import timed as timed_calls
from .workloads import (CELL_NAMES, CELLS, MODES, Case, case_arrays, imdb_batch,
                        iter_workloads)


def make_case(engine, cell, shape, mode, seed=0, dtype="float32", torch_threads=None):
    """Build ``engine`` (see :data:`~fastcells.bench.engines.CPU_ENGINES`) running ``cell``
    on ``shape`` in ``mode``.

    All engines get the weights of :func:`make_weights` and the inputs of
    :func:`make_inputs`. The Keras engines run on the current Keras backend (inside
    ``tf.function`` on TensorFlow, under ``jax.jit`` on JAX, eagerly on torch); training is
    one forward of ``sum(outputs)`` and its gradient with respect to the inputs and every
    trainable weight.
    """
    weights, x = case_arrays(cell, shape, mode, seed, dtype)
    if engine == "torch":
        return _torch_case(cell, shape, mode, weights, x, torch_threads)
    if engine in ("keras", "fastcells-cpu", "fastcells-cuda"):
        import keras
        backend = keras.backend.backend()
        make = {"tensorflow": _tf_case, "jax": _jax_case, "torch": _torch_backend_case}.get(
            backend)
        if make is None:
            raise ValueError(f"the CPU comparison runs on the tensorflow, torch or jax Keras "
                             f"backend; Keras runs on '{backend}'")
        return make(engine, cell, shape, mode, weights, x)
    raise ValueError(f"engine must be one of {CPU_ENGINES}, got {engine!r}")


def layer_class(engine, cell):
    """A maker ``make(units, **kwargs)`` of the Keras layer of ``engine`` ("keras",
    "fastcells-cpu" or "fastcells-cuda") for ``cell``."""
    import keras

    from .. import layers as fc_layers
    if engine == "keras":
        return {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
                "simple_rnn": keras.layers.SimpleRNN}[cell]
    cls = {"lstm": fc_layers.LSTM, "gru": fc_layers.GRU, "simple_rnn": fc_layers.SimpleRNN}[cell]
    kernel_engine = engine.split("-", 1)[1]

    def make(units, **kwargs):
        return cls(units, engine=kernel_engine, **kwargs)
    return make


def built_layers(engine, cell, shape, weights, dtype):
    """The stack of ``shape.layers`` layers of ``engine``, built, with ``weights``."""
    make_layer = layer_class(engine, cell)
    layers = []
    d = shape.features
    for i, w in enumerate(weights):
        last = i == shape.layers - 1
        layer = make_layer(shape.units, return_sequences=shape.return_sequences or not last,
                           dtype=str(dtype))
        layer.build((shape.batch, shape.time, d))
        layer.set_weights(w)
        layers.append(layer)
        d = shape.units
    return layers


def _apply(layers, inputs, training):
    """The stack of layers called on ``inputs``."""
    y = inputs
    for layer in layers:
        y = layer(y, training=training)
    return y


def _kernels_check(engine, layers):
    def check():
        if engine.startswith("fastcells"):
            check_kernels_ran(engine, layers)
    return check


def _tf_case(engine, cell, shape, mode, weights, x_np):
    import tensorflow as tf

    layers = built_layers(engine, cell, shape, weights, x_np.dtype)
    variables = [v for layer in layers for v in layer.trainable_variables]
    x = tf.constant(x_np)

    if mode == "forward":
        @tf.function
        def step(inputs):
            return _apply(layers, inputs, False), ()
    else:
        @tf.function
        def step(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = _apply(layers, inputs, True)
                loss = tf.reduce_sum(y)
            return y, tape.gradient(loss, [inputs] + variables)

    def run():
        return step(x)

    def fetch(out):
        y, grads = out
        return y.numpy(), ([g.numpy() for g in grads] if mode == "train" else None)

    return Case(engine, cell, shape, mode, run, fetch, _kernels_check(engine, layers))


def _jax_case(engine, cell, shape, mode, weights, x_np):
    """The layers under ``jax.jit`` through ``stateless_call``; training is ``jax.grad`` of
    ``sum(outputs)`` with respect to the inputs and every trainable weight."""
    import jax
    import jax.numpy as jnp

    layers = built_layers(engine, cell, shape, weights, x_np.dtype)
    trainable = [[v.value for v in layer.trainable_variables] for layer in layers]
    fixed = [[v.value for v in layer.non_trainable_variables] for layer in layers]
    x = jnp.asarray(x_np)

    def apply(inputs, trainable, training):
        y = inputs
        for layer, tv, nv in zip(layers, trainable, fixed):
            y, _ = layer.stateless_call(tv, nv, y, training=training)
        return y

    if mode == "forward":
        step = jax.jit(lambda inputs, tv: (apply(inputs, tv, False), ()))
    else:
        def loss(inputs, tv):
            y = apply(inputs, tv, True)
            return jnp.sum(y), y

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)

        @jax.jit
        def step(inputs, tv):
            (gx, gw), y = grad(inputs, tv)
            return y, [gx] + [g for layer_grads in gw for g in layer_grads]

    def run():
        return jax.block_until_ready(step(x, trainable))

    def fetch(out):
        y, grads = out
        return np.asarray(y), ([np.asarray(g) for g in grads] if mode == "train" else None)

    return Case(engine, cell, shape, mode, run, fetch, _kernels_check(engine, layers))


def _torch_backend_case(engine, cell, shape, mode, weights, x_np):
    """The layers on Keras's torch backend, eagerly; training is ``torch.autograd.grad`` of
    ``sum(outputs)`` with respect to the inputs and every trainable weight."""
    import torch

    layers = built_layers(engine, cell, shape, weights, x_np.dtype)
    variables = [v.value for layer in layers for v in layer.trainable_variables]
    x = torch.as_tensor(x_np)

    def run():
        if mode == "forward":
            with torch.no_grad():
                return _apply(layers, x, False), ()
        inputs = x.detach().requires_grad_(True)
        y = _apply(layers, inputs, True)
        return y, torch.autograd.grad(y.sum(), [inputs] + variables)

    def fetch(out):
        y, grads = out
        return (y.detach().cpu().numpy(),
                [g.detach().cpu().numpy() for g in grads] if mode == "train" else None)

    return Case(engine, cell, shape, mode, run, fetch, _kernels_check(engine, layers))


def check_kernels_ran(engine, layers):
    """Raise unless every layer of ``layers`` ran the kernels ``engine`` names."""
    used = {getattr(layer, "last_engine", None) for layer in layers}
    want = engine.split("-", 1)[1]
    if used != {want}:
        raise RuntimeError(f"{engine}: the layers ran {sorted(map(str, used))}, not the "
                           f"{want} kernels (a silent fallback would time Keras)")


def _torch_case(cell, shape, mode, weights, x_np, threads):
    run, fetch = _torch.torch_case(cell, shape, mode, weights, x_np, threads)
    return Case("torch", cell, shape, mode, run, fetch)


def _keras_model_engines(engines):
    """Engines for the whole-Keras-model workloads (fit, cold start): torch has no such
    model. Defaults to every engine available here; the baseline first."""
    if engines is None:
        engines, _ = available_engines()
    return [e for e in ordered_engines(engines) if e != "torch"]


def run_layer_benchmarks(shapes=("imdb",), cells=CELLS, modes=MODES, engines=None,
                         settings=None, progress=None, torch_worker=None):
    """Time every engine on every (shape, cell, mode) workload.

    For each workload the built-in layer runs first; its outputs (and gradients) are the
    reference every other engine is compared with, outside the timed region. An engine that
    fails is reported with status ``"error: ..."`` and the run goes on; one whose results are
    out of bounds keeps its timing with status ``"mismatch: ..."``.

    The PyTorch engine runs in ``torch_worker`` (a
    :class:`fastcells.bench.torch_worker.TorchWorker`; one is started for this call and
    stopped at its end when None), unless ``settings.torch_isolated`` is False.

    Returns a list of :class:`Result`.
    """
    settings = settings or Settings()
    progress = progress or NoProgress()
    if engines is None:
        engines, _ = available_engines()
    engines = ordered_engines(engines)
    if "torch" in engines and not settings.torch_isolated and settings.torch_flush_denormal:
        # complete only while torch has not started its threads in this process yet
        _torch.flush_denormals()
    own_worker = None
    if torch_worker is None and settings.torch_isolated and "torch" in engines:
        torch_worker = own_worker = _torch.TorchWorker(settings.subprocess_timeout,
                                                flush_denormal=settings.torch_flush_denormal)
    results = []
    try:
        for shape, cell, mode in iter_workloads(shapes, cells, modes):
            results += _run_workload(shape, cell, mode, engines, settings, progress,
                                     torch_worker)
    finally:
        if own_worker is not None:
            own_worker.close()
    return results


def _run_workload(shape, cell, mode, engines, settings, progress, torch_worker):
    """Every engine on one workload: each is built and called once (its results checked
    against the built-in layer's), then all are timed together, in alternation
    (:func:`fastcells.bench.timing.time_interleaved`)."""
    reference = None
    results, timed = [], []
    worker_open = False
    try:
        for engine in engines:
            progress.step(f"{shape.name} {CELL_NAMES[cell]} {mode} {engine}")
            res = Result(shape.name, cell, mode, engine, shape.time)
            results.append(res)
            try:
                if reference is None and engine != BASELINE:
                    reference = make_case(BASELINE, cell, shape, mode, settings.seed,
                                          settings.dtype).first_call()
                if engine == "torch" and settings.torch_isolated:
                    out = torch_worker.open(cell, shape, mode, settings)
                    worker_open = True
                    timer = torch_worker.time
                else:
                    case = make_case(engine, cell, shape, mode, settings.seed,
                                     settings.dtype, settings.torch_threads)
                    out = case.first_call()
                    timer = timed_calls(case)
                    del case
                if engine == BASELINE:
                    reference = out
                res.max_error, res.grad_error = compare(out, reference)
                del out
                problem = check_equivalence(engine, res.max_error, res.grad_error,
                                            settings.dtype)
                if problem:
                    res.status = f"mismatch: {problem}"
                timed.append((res, timer))
            except Exception as exc:  # reported in the table; the other engines still run
                res.status = error_status(exc)
        time_together(results, timed, timing_kwargs(settings))
    finally:
        if worker_open:
            try:
                torch_worker.close_case()
            except RuntimeError:
                pass                  # the worker died: the next case starts a new one
    return results


def build_imdb_model(engine, cell, time_steps=500, vocab=10000, embed=32, units=32,
                     dtype="float32"):
    """The IMDB example model: Embedding -> LSTM/GRU/SimpleRNN -> Dense(1, sigmoid), compiled
    with Adam and binary cross-entropy. ``engine`` is "keras" or "fastcells-cpu"/"-cuda";
    ``dtype`` the dtype of every layer's weights and computations."""
    import keras
    make_layer = layer_class(engine, cell)
    model = keras.Sequential([
        keras.Input((time_steps,), dtype="int32"),
        keras.layers.Embedding(vocab, embed, dtype=dtype),
        make_layer(units, dtype=dtype),
        keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
    ])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def run_fit_benchmarks(cells=("lstm", "gru"), engines=None, settings=None, progress=None,
                       batch=128, time_steps=500):
    """Time ``model.train_on_batch`` of the IMDB-style model for each cell and engine.

    The models share their initial weights; their predictions are compared before training,
    then the loss and the gradients of one training step (:func:`gradient_step`) with the
    built-in model's. Returns a list of :class:`FitResult`.
    """
    import keras
    settings = settings or Settings()
    progress = progress or NoProgress()
    engines = _keras_model_engines(engines)
    x, y = imdb_batch(batch, time_steps, seed=settings.seed)
    results = []
    for cell in cells:
        weights = reference = ref_step = None
        cell_results, timed = [], []
        for engine in engines:
            progress.step(f"model.fit imdb {CELL_NAMES[cell]} {engine}")
            res = FitResult(cell, engine, batch, time_steps)
            cell_results.append(res)
            try:
                keras.utils.set_random_seed(settings.seed)
                model = build_imdb_model(engine, cell, time_steps, dtype=settings.dtype)
                if weights is None:
                    weights = model.get_weights()
                else:
                    model.set_weights(weights)
                pred = np.asarray(model(x, training=False))
                if reference is None:
                    reference = pred
                res.max_error = compare((pred, None), (reference, None))[0]
                step = gradient_step(model, x, y)
                if engine.startswith("fastcells"):
                    check_kernels_ran(engine, [model.layers[1]])
                if ref_step is None:
                    ref_step = step
                res.loss_error, res.grad_error = compare_fit_step(step, ref_step)
                del step
                problem = check_equivalence(engine, res.max_error, None, settings.dtype,
                                            res.loss_error, res.grad_error)
                if problem:
                    res.status = f"mismatch: {problem}"
                timed.append((res, timed_calls(
                    lambda m=model: m.train_on_batch(x, y))))
            except Exception as exc:  # reported in the table; the other engines still run
                res.status = error_status(exc)

        # the models' batches in alternation, as the layers' calls (see _run_workload)
        time_together(cell_results, timed,
                      dict(repeats=settings.fit_batches, warmup=settings.fit_warmup,
                           max_seconds=settings.max_seconds,
                           min_repeats=settings.min_repeats))
        timed = model = None          # the models' memory, before the next cell's
        results += cell_results
    return results


_COLD_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
import tensorflow as tf
import keras
import fastcells
import_s = time.perf_counter() - t0
cell, engine = sys.argv[1], sys.argv[2]
B, T, D, H = (int(a) for a in sys.argv[3:7])
if engine == "keras":
    cls = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
           "simple_rnn": keras.layers.SimpleRNN}[cell]
    make = lambda: cls(H)
else:
    cls = {"lstm": fastcells.LSTM, "gru": fastcells.GRU, "simple_rnn": fastcells.SimpleRNN}[cell]
    make = lambda: cls(H, engine=engine.split("-", 1)[1])
x = tf.constant(np.random.default_rng(0).standard_normal((B, T, D)).astype("float32"))

def call(layer):
    t = time.perf_counter()
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True))
    grads = tape.gradient(loss, [x] + layer.trainable_variables)
    [g.numpy() for g in grads]
    return time.perf_counter() - t

layer = make()
first_s = call(layer)
second_s = call(layer)
if engine != "keras" and layer.last_engine != engine.split("-", 1)[1]:
    raise SystemExit(f"the layer ran {layer.last_engine!r}, not {engine!r}")
print("FASTCELLS_COLD " + json.dumps(dict(import_s=import_s, first_s=first_s,
                                          second_s=second_s)))
"""


def _cold_subprocess(cell, engine, shape, env, timeout):
    cmd = [sys.executable, "-c", _COLD_SCRIPT, cell, engine] + [str(s) for s in shape]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("FASTCELLS_COLD "):
            return json.loads(line[len("FASTCELLS_COLD "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"subprocess exited with {proc.returncode}: {' | '.join(tail)}")


def run_cold_start(cells=("lstm",), engines=None, cold=False, settings=None, progress=None):
    """Time the first forward+backward call in a fresh process, for each cell.

    fastcells runs with the numba on-disk cache warm (a first subprocess fills it) and, with
    ``cold=True``, also with an empty cache (``NUMBA_CACHE_DIR`` set to a new temporary
    folder: every kernel is compiled). The built-in layer runs once for comparison.
    Returns a list of :class:`ColdResult`.
    """
    settings = settings or Settings()
    progress = progress or NoProgress()
    engines = _keras_model_engines(engines)
    shape = tuple(settings.cold_shape)
    base_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    results = []
    for cell in cells:
        for engine in engines:
            runs = [("-", None)] if engine == BASELINE else [("warm", None)]
            if engine != BASELINE and cold:
                runs.append(("cold", "fresh"))
            for cache, numba_dir in runs:
                progress.step(f"cold start {CELL_NAMES[cell]} {engine} ({cache} cache)")
                res = ColdResult(cell, engine, cache, shape)
                results.append(res)
                try:
                    if numba_dir is None:
                        env = base_env
                        if cache == "warm":      # make sure the cache holds these kernels
                            _cold_subprocess(cell, engine, shape, env,
                                             settings.subprocess_timeout)
                        out = _cold_subprocess(cell, engine, shape, env,
                                               settings.subprocess_timeout)
                    else:
                        with tempfile.TemporaryDirectory(prefix="fastcells-numba-") as tmp:
                            env = dict(base_env, NUMBA_CACHE_DIR=tmp)
                            out = _cold_subprocess(cell, engine, shape, env,
                                                   settings.subprocess_timeout)
                    res.import_s, res.first_s, res.second_s = (
                        out["import_s"], out["first_s"], out["second_s"])
                except Exception as exc:  # reported in the table
                    res.status = f"error: {type(exc).__name__}: {exc}"
    return results
