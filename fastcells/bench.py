"""Benchmark engine: time the fastcells layers against the built-in Keras layers (and PyTorch).

The command line (``python -m fastcells bench``) and the pytest-benchmark suite under
``benchmarks/`` both build on this module:

- :data:`SHAPES` are the workloads (the examples' shapes and two larger ones),
- :func:`make_case` builds one engine running one workload, with weights shared by all
  engines, and wraps the call in ``tf.function`` (graph mode, as ``model.fit`` runs it),
- :class:`TorchWorker` runs the PyTorch engine in a process of its own
  (``fastcells/_bench_torch.py``, which also holds the timing routine :func:`time_calls`),
- :func:`compare` / :func:`check_equivalence` check a case against the built-in layer,
- :func:`run_layer_benchmarks`, :func:`run_fit_benchmarks` and :func:`run_cold_start` time
  the grid, an IMDB-style ``model.fit`` and the first call in a fresh process,
- :func:`write_report`, :func:`save_json` and :func:`save_plot` present the results.

The GPU comparison (CUDA engines against cuDNN and Keras on the torch backend, no
TensorFlow) is :mod:`fastcells.bench_gpu`; it reuses the shapes, results and reports here.

Times are ``time.perf_counter`` medians of repeated calls after a first (compiling, tracing)
call and a warm-up; the engines of a workload are timed in alternation
(:func:`time_interleaved`), so that ratios are between engines measured over the same
stretch of time.

Example::

    import sys
    from fastcells import bench
    results = bench.run_layer_benchmarks(shapes=["imdb"], cells=["lstm"], modes=["forward"])
    bench.write_report(bench.Report(layers=results), sys.stdout)
"""
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import _bench_torch, config
from ._bench_torch import (keras_to_torch, time_calls, time_interleaved,  # noqa: F401
                           torch_grads_to_keras)
from ._bench_torch import timed as timed_calls

__all__ = ["Shape", "SHAPES", "CELLS", "MODES", "ENGINES", "BASELINE", "Settings", "Case",
           "make_case", "make_weights", "make_inputs", "relative_error", "worst_of", "compare",
           "fit_step", "compare_fit_step", "check_equivalence",
           "engine_unavailable", "available_engines", "time_calls", "timed_calls",
           "time_interleaved", "time_together",
           "Result", "FitResult",
           "ColdResult", "Report", "run_layer_benchmarks", "run_fit_benchmarks",
           "run_cold_start", "machine_info", "write_report", "save_json", "save_plot",
           "Progress", "quick_settings", "TorchWorker", "timing_kwargs", "keras_to_torch",
           "torch_grads_to_keras"]

# --------------------------------------------------------------------------- the grid
CELLS = ("lstm", "gru", "simple_rnn")
CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN"}
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}

MODES = ("forward", "train")
MODE_NAMES = {"forward": "inference (forward)",
              "train": "training (forward+backward)"}

#: Engines, the built-in layer first: it is the baseline of every ratio.
ENGINES = ("keras", "fastcells-cpu", "fastcells-cuda", "torch")
BASELINE = "keras"

#: Bound on the difference between PyTorch and the built-in layer (not a fastcells contract:
#: it only catches a wrong weight conversion).
TORCH_TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One workload: a (stack of) recurrent layer(s) over a batch of sequences.

    batch, time, features, units: B, T, D, H of the first layer (later layers take H inputs).
    layers: how many layers are stacked (all but the last return sequences).
    return_sequences: whether the last layer returns the whole sequence.
    modes: the modes timed for this workload.
    heavy: left out of the default runs (opt in with ``--heavy`` / ``--bench-heavy``).
    rounds: timed rounds in the pytest-benchmark suite.
    """
    name: str
    batch: int
    time: int
    features: int
    units: int
    layers: int = 1
    return_sequences: bool = True
    modes: tuple = MODES
    heavy: bool = False
    rounds: int = 5

    def describe(self):
        """A one-line description, e.g. ``B=128 T=500 D=32 H=32, 1 layer, last output``."""
        layers = f"{self.layers} stacked layers" if self.layers > 1 else "1 layer"
        out = "all outputs" if self.return_sequences else "last output"
        return (f"B={self.batch} T={self.time} D={self.features} H={self.units}, {layers}, "
                f"{out}")


SHAPES = {s.name: s for s in (
    # the IMDB example: Embedding(10000, 32) -> LSTM(32)
    Shape("imdb", 128, 500, 32, 32, return_sequences=False, rounds=5),
    # the stacked example: two return_sequences=True layers
    Shape("stacked", 32, 256, 256, 32, layers=2, return_sequences=True, rounds=5),
    Shape("medium", 64, 100, 256, 256, rounds=5),
    Shape("large", 32, 100, 512, 1024, heavy=True, rounds=3),
    # one sequence at a time, as a server answering requests
    Shape("streaming", 1, 100, 64, 128, modes=("forward",), rounds=50),
)}


def product_flops(cell, shape, mode):
    """Floating-point operations (2 per multiply-add) of the matrix products that one call
    of ``shape`` cannot do without: per layer and step the input and recurrent products,
    x_t @ W and h @ U; a training step adds their gradients with respect to the inputs and
    the states ([dx | dh] = dz @ [W; U]^T) and the weights ([dW; dU] = [x | h]^T dz), as
    many again twice. The bias and everything element by element are left out."""
    G, H = GATES[cell], shape.units
    total, d = 0, shape.features
    for _ in range(shape.layers):
        total += 2 * shape.batch * shape.time * (d + H) * G * H
        d = H
    return total * (3 if mode == "train" else 1)


#: tanh evaluations per unit and step: LSTM i, f, o (sigmoids), c~ and act(c); GRU z, r and
#: the candidate; SimpleRNN h. The backward takes the derivatives from the outputs.
ACTIVATIONS = {"lstm": 5, "gru": 3, "simple_rnn": 1}


def activation_count(cell, shape, mode):
    """tanh (and sigmoid) evaluations of one call of ``shape``, the same in both modes."""
    return ACTIVATIONS[cell] * shape.batch * shape.time * shape.units * shape.layers


def compute_floor(cell, shape, mode, peak):
    """Seconds one call's products and activations take at the rates of ``peak``
    (``Report.peak``, :func:`measure_peak`): a floor for the fastcells kernels, and for any
    engine whose products do not beat the core's peak (the packed product runs at one
    vector FMA per cycle). None without a peak."""
    if not peak or not peak.get("flops_per_s"):
        return None
    return (product_flops(cell, shape, mode) / peak["flops_per_s"]
            + activation_count(cell, shape, mode) / peak["tanh_per_s"])


def workload_floor(cell, shape, mode, peak):
    """The floor of one workload as the report, its JSON and the pytest-benchmark suite give
    it: ``dict(flops, tanh, floor_s)`` (:func:`product_flops`, :func:`activation_count`,
    :func:`compute_floor`), or None without a peak."""
    floor = compute_floor(cell, shape, mode, peak)
    if floor is None:
        return None
    return dict(flops=product_flops(cell, shape, mode),
                tanh=activation_count(cell, shape, mode), floor_s=floor)


def measure_peak(dtype="float32", threads=None, previous=None):
    """This machine's rates for the kernels' arithmetic, as ``Report.peak``: FLOP/s of the
    packed product and tanh evaluations per second, on every fastcells thread at once
    (``fastcells.cpu._rates``), with the dtype and thread count they were measured with.

    With ``previous`` (an earlier measurement of the same run), each rate is the better of
    the two: the runs measure at their start and end, so that a stretch in which another
    load held the cores does not set the floor."""
    from .cpu._rates import activation_rate, product_rate
    threads = config.NUM_THREADS if threads is None else threads
    peak = dict(flops_per_s=product_rate(dtype, threads),
                tanh_per_s=activation_rate(dtype, threads),
                dtype=str(np.dtype(dtype)), threads=threads)
    if previous:
        for key in ("flops_per_s", "tanh_per_s"):
            peak[key] = max(peak[key], previous[key])
    return peak


@dataclasses.dataclass
class Settings:
    """Every tunable of a benchmark run (the command line sets them from its flags).

    repeats: timed calls per case; the median is reported.
    warmup: untimed calls after the first (compiling, tracing) call.
    max_seconds: time budget of the timed calls of one case: a slow case stops after
        ``min_repeats`` calls once the budget is spent.
    min_repeats: fewest timed calls of a case.
    min_seconds: a fast case is repeated (beyond ``repeats``) until this much time was spent.
    max_repeats: most timed calls of a case.
    seed: seed of the weights and inputs.
    dtype: "float32" or "float64".
    fit_batches: timed ``train_on_batch`` calls of the model.fit workload.
    fit_warmup: untimed ``train_on_batch`` calls before those, after the first one (which
        traces the step and is checked against the built-in model's).
    torch_threads: ``torch.set_num_threads`` for the PyTorch engine (None: its default).
    torch_isolated: run the PyTorch engine in a worker process of its own (see
        :class:`TorchWorker`); False runs it in this process, next to TensorFlow.
    torch_flush_denormal: torch's threads flush denormals to zero, as TensorFlow's and the
        fastcells kernels' threads do (in this process too with ``torch_isolated=False``:
        then this thread flushes them from then on, and torch's threads only if it had not
        started them yet).
    allow_tf32: let cuDNN and torch matmuls use TF32 in the GPU comparison (off by default:
        every engine then computes in float32, as the fastcells kernels do).
    cold_shape: (B, T, D, H) of the cold-start measurement.
    subprocess_timeout: seconds allowed to one cold-start subprocess.
    """
    repeats: int = 7
    warmup: int = 1
    max_seconds: float = 10.0
    min_repeats: int = 3
    min_seconds: float = 1.0
    max_repeats: int = 500
    seed: int = 0
    dtype: str = "float32"
    fit_batches: int = 9
    fit_warmup: int = 2
    torch_threads: int = None
    torch_isolated: bool = True
    torch_flush_denormal: bool = True
    allow_tf32: bool = False
    cold_shape: tuple = (16, 50, 16, 32)
    subprocess_timeout: float = 300.0


def quick_settings():
    """The settings of ``bench --quick``: fewer repeats, a tighter budget per case."""
    return Settings(repeats=5, warmup=1, max_seconds=3.0, min_repeats=3, min_seconds=0.25,
                    fit_batches=5, fit_warmup=1)


# --------------------------------------------------------------------------- data
def make_weights(cell, shape, seed=0, dtype="float32"):
    """Weights of every layer of a workload, in the Keras layout, the same for all engines.

    Returns a list (one entry per layer) of ``[kernel, recurrent_kernel, bias]``: kernel
    [D, G*H] Glorot-uniform, recurrent_kernel [H, G*H] with orthonormal rows (as Keras's
    orthogonal initializer), bias [G*H] (GRU: [2, 3H]) small and non-zero, LSTM forget bias
    shifted by one (``unit_forget_bias``).
    """
    rng = np.random.default_rng(seed + 1)
    G, H = GATES[cell], shape.units
    weights = []
    d = shape.features
    for _ in range(shape.layers):
        lim = math.sqrt(6.0 / (d + G * H))
        W = rng.uniform(-lim, lim, (d, G * H))
        q, _ = np.linalg.qr(rng.standard_normal((G * H, H)))   # [G*H, H] orthonormal columns
        U = q.T
        if cell == "gru":
            b = rng.uniform(-0.1, 0.1, (2, 3 * H))
        else:
            b = rng.uniform(-0.1, 0.1, (G * H,))
            if cell == "lstm":
                b[H:2 * H] += 1.0
        weights.append([np.ascontiguousarray(a, dtype) for a in (W, U, b)])
        d = H
    return weights


def make_inputs(shape, seed=0, dtype="float32"):
    """Inputs [B, T, D] of a workload: standard normal."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((shape.batch, shape.time, shape.features)).astype(dtype)


# --------------------------------------------------------------------------- engines
_unavailable_cache = {}


def engine_unavailable(engine):
    """None when ``engine`` can run on this machine, else the reason why not."""
    if engine in _unavailable_cache:
        return _unavailable_cache[engine]
    reason = None
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("keras", "fastcells-cpu", "fastcells-cuda"):
        import keras
        if keras.backend.backend() != "tensorflow":
            reason = (f"the benchmarks run on the TensorFlow Keras backend, this process uses "
                      f"'{keras.backend.backend()}' (set KERAS_BACKEND=tensorflow)")
    if reason is None and engine == "torch":
        # found, not imported: the torch engine runs in a worker process of its own
        if importlib.util.find_spec("torch") is None:
            reason = "PyTorch is not installed"
    if reason is None and engine == "fastcells-cuda":
        from . import ops
        if not ops.cuda_available():
            reason = "no CUDA GPU (numba.cuda.is_available() is False)"
        else:
            reason = _probe_cuda()
    _unavailable_cache[engine] = reason
    return reason


def _probe_cuda():
    """Run a tiny LSTM with engine='cuda'; None when it works, else the error."""
    tiny = Shape("probe", 2, 3, 4, 5, modes=("forward",))
    try:
        case = make_case("fastcells-cuda", "lstm", tiny, "forward")
        case.first_call()
    except Exception as exc:  # the reason is reported, not raised: the engine is left out
        return f"engine='cuda' fails: {type(exc).__name__}: {exc}"
    return None


def available_engines(engines=ENGINES, unavailable=None):
    """The engines of ``engines`` that can run here, and {engine: reason} for the others;
    ``unavailable(engine)`` gives the reason or None (default: :func:`engine_unavailable`)."""
    unavailable = unavailable or engine_unavailable
    ok, missing = [], {}
    for e in engines:
        reason = unavailable(e)
        if reason is None:
            ok.append(e)
        else:
            missing[e] = reason
    return ok, missing


class Case:
    """One engine running one workload in one mode.

    Calling the case runs it once (this is what is timed). :meth:`first_call` runs it the
    first time (JIT compilation, graph tracing) and returns its results as NumPy arrays in the
    Keras layout: ``(outputs, grads)`` with grads ``[dx, dW1, dU1, db1, dW2, ...]`` in
    training mode and None in inference mode.
    """

    def __init__(self, engine, cell, shape, mode, run, fetch, check=None):
        self.engine, self.cell, self.shape, self.mode = engine, cell, shape, mode
        self._run = run
        self._fetch = fetch
        self._check = check

    def __call__(self):
        return self._run()

    def first_call(self):
        """Run once (compiling and tracing) and return ``(outputs, grads)`` as arrays."""
        result = self._fetch(self._run())
        if self._check is not None:
            self._check()
        return result

    @property
    def steps(self):
        """Time steps per call (the unit of "microseconds per time step")."""
        return self.shape.time


def make_case(engine, cell, shape, mode, seed=0, dtype="float32", torch_threads=None):
    """Build ``engine`` (see :data:`ENGINES`) running ``cell`` on ``shape`` in ``mode``.

    All engines get the weights of :func:`make_weights` and the inputs of
    :func:`make_inputs`. The TensorFlow engines run inside ``tf.function``; training is one
    ``GradientTape`` forward of ``sum(outputs)`` and its gradient with respect to the inputs
    and every trainable weight.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    weights = make_weights(cell, shape, seed, dtype)
    x = make_inputs(shape, seed, dtype)
    if engine == "torch":
        return _torch_case(cell, shape, mode, weights, x, torch_threads)
    if engine in ("keras", "fastcells-cpu", "fastcells-cuda"):
        return _tf_case(engine, cell, shape, mode, weights, x)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


def _layer_class(engine, cell):
    import keras

    from . import layers as fc_layers
    if engine == "keras":
        return {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU,
                "simple_rnn": keras.layers.SimpleRNN}[cell]
    cls = {"lstm": fc_layers.LSTM, "gru": fc_layers.GRU, "simple_rnn": fc_layers.SimpleRNN}[cell]
    kernel_engine = engine.split("-", 1)[1]

    def make(units, **kwargs):
        return cls(units, engine=kernel_engine, **kwargs)
    return make


def _tf_case(engine, cell, shape, mode, weights, x_np):
    import tensorflow as tf

    make_layer = _layer_class(engine, cell)
    layers = []
    d = shape.features
    for i, w in enumerate(weights):
        last = i == shape.layers - 1
        layer = make_layer(shape.units, return_sequences=shape.return_sequences or not last,
                           dtype=str(x_np.dtype))
        layer.build((shape.batch, shape.time, d))
        layer.set_weights(w)
        layers.append(layer)
        d = shape.units
    variables = [v for layer in layers for v in layer.trainable_variables]
    x = tf.constant(x_np)

    def apply(inputs, training):
        y = inputs
        for layer in layers:
            y = layer(y, training=training)
        return y

    if mode == "forward":
        @tf.function
        def step(inputs):
            return apply(inputs, False), ()
    else:
        @tf.function
        def step(inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = apply(inputs, True)
                loss = tf.reduce_sum(y)
            return y, tape.gradient(loss, [inputs] + variables)

    def run():
        return step(x)

    def fetch(out):
        y, grads = out
        return y.numpy(), ([g.numpy() for g in grads] if mode == "train" else None)

    def check():
        if engine.startswith("fastcells"):
            _check_kernels_ran(engine, layers)

    return Case(engine, cell, shape, mode, run, fetch, check)


def _check_kernels_ran(engine, layers):
    used = {getattr(layer, "last_engine", None) for layer in layers}
    want = engine.split("-", 1)[1]
    if used != {want}:
        raise RuntimeError(f"{engine}: the layers ran {sorted(map(str, used))}, not the "
                           f"{want} kernels (a silent fallback would time Keras)")


def _torch_case(cell, shape, mode, weights, x_np, threads):
    run, fetch = _bench_torch.torch_case(cell, shape, mode, weights, x_np, threads)
    return Case("torch", cell, shape, mode, run, fetch)


class TorchWorker:
    """The PyTorch engine in a process of its own (``fastcells/_bench_torch.py`` run as a
    script), started at the first case and kept for the whole benchmark run.

    In the process of TensorFlow and the fastcells kernels, ``torch.nn.LSTM`` forward+backward
    at B=128 T=500 D=32 H=32 took 340 ms per call against 62-81 ms alone, and torch's OpenMP
    threads slowed the engines measured after it; the worker measures torch as it runs on
    its own, and the benchmark process never imports torch. Its threads flush denormals to
    zero (``flush_denormal``), as TensorFlow's and the kernels' do: the IMDB-shape LSTM
    backward took 360 ms with denormals and 75 ms without. The weights and inputs go to the
    worker in a temporary ``.npz`` (the very arrays the other engines get); it times the
    calls with :func:`time_calls` and sends the times back, with the outputs and gradients
    for the equivalence check.

    Example::

        with TorchWorker() as worker:
            (outputs, grads), times = worker.run("lstm", SHAPES["imdb"], "train", Settings())
        worker.info          # {"torch_version": ..., "torch_threads": ..., "pid": ...}
    """

    def __init__(self, timeout=300.0, env=None, flush_denormal=True):
        self.timeout = timeout
        self.env = env
        self.flush_denormal = flush_denormal
        self.info = {}
        self._proc = None
        self._lines = None
        self._stderr = None
        self._tmp = None

    # ---------------------------------------------------------------- process
    def _start(self):
        import queue
        import threading

        self._tmp = tempfile.TemporaryDirectory(prefix="fastcells-torch-")
        self._stderr = open(os.path.join(self._tmp.name, "stderr.txt"), "w+")
        cmd = [sys.executable, "-u", _bench_torch.__file__]
        if self.flush_denormal:
            cmd.append("--flush-denormal")
        env = dict(os.environ if self.env is None else self.env)
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, text=True, env=env)
        self._lines = queue.Queue()
        proc, lines = self._proc, self._lines

        def read():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)                        # end of output: the worker exited

        threading.Thread(target=read, daemon=True).start()

    def _stderr_tail(self):
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        tail = [ln for ln in self._stderr.read().strip().splitlines() if ln.strip()][-3:]
        return " | ".join(tail)

    def _fail(self, what):
        tail = self._stderr_tail()
        self.close(kill=True)
        return RuntimeError(f"torch worker {what}" + (f": {tail}" if tail else ""))

    def _request(self, request):
        import queue

        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:
            raise self._fail(f"exited with {self._proc.poll()}") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self._fail(f"took more than {self.timeout:g} s") from None
            if line is None:
                raise self._fail(f"exited with {self._proc.wait()}")
            reply = _bench_torch.parse_reply(line)
            if reply is not None:
                return reply

    # ---------------------------------------------------------------- cases
    def run(self, cell, shape, mode, settings):
        """Run one torch case in the worker: ``((outputs, grads), times)``.

        The worker builds ``torch.nn`` from :func:`make_weights` / :func:`make_inputs`
        (``settings.seed``, ``settings.dtype``), calls it once untimed, then times it with
        ``settings``. Raises RuntimeError with the worker's message when the case fails.
        """
        reply, outputs = self._case("case", cell, shape, mode, settings)
        return self.parse(reply, outputs)

    def open(self, cell, shape, mode, settings):
        """Build a torch case in the worker and call it once: ``(outputs, grads)``. The case
        stays open for :meth:`time` until :meth:`close_case` or the next case."""
        reply, outputs = self._case("open", cell, shape, mode, settings)
        return self.parse(reply, outputs)[0]

    def time(self, calls):
        """Durations of ``calls`` calls of the open case, timed in the worker."""
        reply = self._request(dict(op="time", calls=int(calls)))
        if not reply.get("ok"):
            raise RuntimeError(f"in the torch worker: {reply.get('error', 'unknown error')}")
        return [float(t) for t in reply["times"]]

    def close_case(self):
        """Drop the open case (its memory) in the worker, if the worker runs."""
        if self._proc is not None and self._proc.poll() is None:
            self._request(dict(op="close"))

    def _case(self, op, cell, shape, mode, settings):
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        weights = make_weights(cell, shape, settings.seed, settings.dtype)
        x = make_inputs(shape, settings.seed, settings.dtype)
        inputs = os.path.join(self._tmp.name, "inputs.npz")
        outputs = os.path.join(self._tmp.name, "outputs.npz")
        _bench_torch.save_inputs(inputs, weights, x)
        del weights, x
        request = dict(op=op, cell=cell, mode=mode, inputs=inputs, outputs=outputs,
                       threads=settings.torch_threads,
                       shape=dict(batch=shape.batch, time=shape.time,
                                  features=shape.features, units=shape.units,
                                  layers=shape.layers,
                                  return_sequences=shape.return_sequences))
        if op == "case":
            request["timing"] = timing_kwargs(settings)
        return self._request(request), outputs

    def parse(self, reply, outputs_path):
        """``((outputs, grads), times)`` of a worker reply; RuntimeError for a failure."""
        if not reply.get("ok"):
            raise RuntimeError(f"in the torch worker: {reply.get('error', 'unknown error')}")
        self.info.update(reply.get("info") or {})
        times = [float(t) for t in reply["times"]]
        out = _bench_torch.load_outputs(outputs_path, int(reply.get("n_grads", 0)))
        return out, times

    def close(self, kill=False):
        """Stop the worker (it ends at the end of its input; ``kill``: at once) and remove
        the temp files."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if kill:
                proc.kill()
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def timing_kwargs(settings):
    """The keyword arguments of :func:`time_calls` that ``settings`` set."""
    return dict(repeats=settings.repeats, warmup=settings.warmup,
                max_seconds=settings.max_seconds, min_repeats=settings.min_repeats,
                min_seconds=settings.min_seconds, max_repeats=settings.max_repeats)


# --------------------------------------------------------------------------- equivalence
def relative_error(got, want):
    """The difference of ``got`` from ``want`` relative to ``want``, in the two norms at once:
    ``max(||got - want|| / ||want||, max|got - want| / max|want|)`` (Frobenius, then largest
    element), in float64. Neither ratio grows with the number of elements, and the second
    sees one wrong element of a large tensor. NaN (or Inf) in either array gives NaN, which
    fails every bound; 0.0 for empty arrays."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: {got.shape} and {want.shape}")
    if want.size == 0:
        return 0.0
    e = got - want
    if not np.isfinite(e).all():
        return float("nan")
    worst = 0.0
    for err, size in ((np.linalg.norm(e), np.linalg.norm(want)),
                      (np.abs(e).max(), np.abs(want).max())):
        if err:
            worst = max(worst, float(err / size) if size else float("inf"))
    return worst


def worst_of(a, b):
    """The larger of two errors, NaN when either is NaN (``max(0.0, nan)`` is 0.0)."""
    if a is None:
        return b
    return float(np.maximum(a, b))


def compare(result, reference):
    """Differences of ``(outputs, grads)`` against the reference (the built-in layer).

    Returns ``(max_error, grad_error)``: the largest absolute difference of the outputs, and
    (training mode) the largest over the gradient tensors of :func:`relative_error` (None in
    inference mode). NaN anywhere gives NaN; gradient lists of different lengths or tensors
    of different shapes raise ``AssertionError``.
    """
    y, grads = result
    y_ref, g_ref = reference
    if y.shape != y_ref.shape:
        raise AssertionError(f"outputs have shape {y.shape}, the built-in layer's "
                             f"{y_ref.shape}")
    max_error = 0.0
    if y.size:
        e = np.abs(y.astype(np.float64) - y_ref)
        max_error = float(e.max()) if np.isfinite(e).all() else float("nan")
    grad_error = None
    if grads is not None and g_ref is not None:
        grads, g_ref = list(grads), list(g_ref)
        if len(grads) != len(g_ref):
            raise AssertionError(f"{len(grads)} gradients, the built-in layer has "
                                 f"{len(g_ref)}")
        grad_error = 0.0
        for g, r in zip(grads, g_ref):
            if g.shape != r.shape:
                raise AssertionError(f"a gradient has shape {g.shape}, the built-in layer's "
                                     f"{r.shape}")
            grad_error = worst_of(grad_error, relative_error(g, r))
    elif (grads is None) != (g_ref is None):
        raise AssertionError("gradients on one side only")
    return max_error, grad_error


def tolerances(engine, dtype="float32"):
    """``(output_tol, grad_tol)`` an engine must meet against the built-in layer."""
    if engine == "torch":
        t = TORCH_TOLERANCE[dtype]
        return t, t
    if dtype == "float64":
        return config.TOL_F64, config.TOL_F64
    return config.TOL_OUTPUT_F32, config.TOL_GRAD_F32


def fit_step(model, x, y):
    """One ``model.train_on_batch(x, y)`` from the model's current weights: ``(loss, the
    weights after the step)``."""
    loss = float(np.asarray(model.train_on_batch(x, y)))
    return loss, [np.asarray(w) for w in model.get_weights()]


def compare_fit_step(step, reference):
    """``(loss_error, weight_error)`` of a :func:`fit_step` against the built-in model's
    from the same weights: the absolute difference of the losses, and the largest
    :func:`relative_error` of the weights after the step (NaN anywhere gives NaN)."""
    (loss, weights), (loss_ref, weights_ref) = step, reference
    if len(weights) != len(weights_ref):
        raise AssertionError(f"{len(weights)} weights after the step, the built-in model has "
                             f"{len(weights_ref)}")
    loss_error = abs(loss - loss_ref) if math.isfinite(loss - loss_ref) else float("nan")
    weight_error = 0.0
    for w, r in zip(weights, weights_ref):
        weight_error = worst_of(weight_error, relative_error(w, r))
    return loss_error, weight_error


def check_equivalence(engine, max_error, grad_error, dtype="float32", loss_error=None,
                      weight_error=None):
    """None when the errors are within :func:`tolerances`, else a message saying what is off.
    The loss of a training step (``loss_error``) has the outputs' bound, the weights after
    it (``weight_error``, relative as the gradients) the gradients' bound."""
    out_tol, grad_tol = tolerances(engine, dtype)
    problems = []
    if max_error is not None and not max_error <= out_tol:   # NaN fails too
        problems.append(f"outputs differ from the built-in layer by {max_error:.3g} "
                        f"(bound {out_tol:g})")
    if loss_error is not None and not loss_error <= out_tol:
        problems.append(f"the loss of a training step differs from the built-in model's by "
                        f"{loss_error:.3g} (bound {out_tol:g})")
    if weight_error is not None and not weight_error <= grad_tol:
        problems.append(f"the weights after a training step differ from the built-in "
                        f"model's by {weight_error:.3g} of their norm (bound {grad_tol:g})")
    if grad_error is not None and not grad_error <= grad_tol:
        problems.append(f"gradients differ from the built-in layer's by {grad_error:.3g} of "
                        f"their norm (bound {grad_tol:g}; the larger of the Frobenius and "
                        f"the largest-element ratio)")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- timing
def _median(times):
    return float(np.median(times)) if times else float("nan")


@dataclasses.dataclass
class Result:
    """Timing of one engine on one workload (cell x shape x mode)."""
    shape: str
    cell: str
    mode: str
    engine: str
    steps: int
    times: list = dataclasses.field(default_factory=list)
    max_error: float = None
    grad_error: float = None
    status: str = "ok"            # "ok", "skipped: ...", "error: ...", "mismatch: ..."
    baseline_median: float = None  # the built-in layer's median in the same run
    speedup_range: tuple = None    # middle half of the speed-ups paired round by round

    @property
    def median(self):
        """Median seconds per call."""
        return _median(self.times)

    @property
    def us_per_step(self):
        """Median microseconds per time step."""
        return self.median / self.steps * 1e6 if self.times else float("nan")

    @property
    def speedup(self):
        """The built-in layer's median over this engine's (> 1: faster than built-in)."""
        if self.baseline_median is None or not self.times:
            return None
        return self.baseline_median / self.median

    @property
    def workload(self):
        return (self.shape, self.cell, self.mode)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.update(median_s=self.median if self.times else None,
                 us_per_step=self.us_per_step if self.times else None,
                 speedup_vs_keras=self.speedup)
        return d


@dataclasses.dataclass
class FitResult:
    """``train_on_batch`` of the IMDB-style model with one recurrent layer."""
    cell: str
    engine: str
    batch: int
    time: int
    times: list = dataclasses.field(default_factory=list)
    max_error: float = None       # predictions before training vs the built-in layer's
    loss_error: float = None      # the first train_on_batch's loss vs the built-in model's
    weight_error: float = None    # the weights after it vs the built-in model's (relative)
    status: str = "ok"
    baseline_median: float = None
    speedup_range: tuple = None

    @property
    def median(self):
        return _median(self.times)

    @property
    def ms_per_batch(self):
        return self.median * 1e3 if self.times else float("nan")

    @property
    def speedup(self):
        if self.baseline_median is None or not self.times:
            return None
        return self.baseline_median / self.median

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.update(ms_per_batch=self.ms_per_batch if self.times else None,
                 speedup_vs_keras=self.speedup)
        return d


@dataclasses.dataclass
class ColdResult:
    """First forward+backward call in a fresh Python process."""
    cell: str
    engine: str
    cache: str                     # "warm" or "cold" (numba on-disk cache), "-" for keras
    shape: tuple
    import_s: float = None         # import numpy, tensorflow, keras, fastcells
    first_s: float = None          # first call: build, trace, JIT (or cache load), run
    second_s: float = None         # the same call again
    status: str = "ok"

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """Everything a benchmark run measured."""
    layers: list = dataclasses.field(default_factory=list)
    fit: list = dataclasses.field(default_factory=list)
    cold: list = dataclasses.field(default_factory=list)
    machine: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    unavailable: dict = dataclasses.field(default_factory=dict)
    elapsed_s: float = None
    peak: dict = None             # measure_peak(): the rates behind the floor rows

    def mismatches(self):
        """Results whose equivalence check failed."""
        return [r for r in self.layers + self.fit if r.status.startswith("mismatch")]


# --------------------------------------------------------------------------- progress
class Progress:
    """A text progress bar on a stream (stderr), one line redrawn in place on a terminal and
    one line per item otherwise.

    Example::

        bar = Progress(10)
        for i in range(10):
            bar.step(f"item {i}")
            ...
        bar.close()
    """

    def __init__(self, total, stream=None, enabled=True, width=24):
        self.total = max(1, int(total))
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0

    def step(self, label):
        """Announce the next item (``label``) and redraw the bar."""
        if not self.enabled:
            return
        self.count += 1
        done = min(self.count - 1, self.total)
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {self.count}/{self.total} {elapsed:5.0f}s  {label}"
        if self._tty:
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """Finish the bar (clears the line on a terminal)."""
        if self.enabled and self._tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()


class _NoProgress(Progress):
    def __init__(self):
        super().__init__(1, enabled=False)


# --------------------------------------------------------------------------- runners
def _workloads(shapes, cells, modes):
    for name in shapes:
        shape = SHAPES[name] if isinstance(name, str) else name
        for cell in cells:
            for mode in modes:
                if mode in shape.modes:
                    yield shape, cell, mode


def _ordered_engines(engines):
    """Engines with the baseline first (its time is the denominator of every ratio)."""
    engines = list(dict.fromkeys(engines))
    return sorted(engines, key=lambda e: (e != BASELINE, ENGINES.index(e)))


def _keras_model_engines(engines):
    """Engines for the whole-Keras-model workloads (fit, cold start): torch has no such
    model. Defaults to every engine available here; the baseline first."""
    if engines is None:
        engines, _ = available_engines()
    return [e for e in _ordered_engines(engines) if e != "torch"]


def count_layer_cases(shapes, cells, modes, engines):
    """How many (workload, engine) cases :func:`run_layer_benchmarks` will time."""
    return sum(1 for _ in _workloads(shapes, cells, modes)) * len(engines)


def run_layer_benchmarks(shapes=("imdb",), cells=CELLS, modes=MODES, engines=None,
                         settings=None, progress=None, torch_worker=None):
    """Time every engine on every (shape, cell, mode) workload.

    For each workload the built-in layer runs first; its outputs (and gradients) are the
    reference every other engine is compared with, outside the timed region. An engine that
    fails is reported with status ``"error: ..."`` and the run goes on; one whose results are
    out of bounds keeps its timing with status ``"mismatch: ..."``.

    The PyTorch engine runs in ``torch_worker`` (a :class:`TorchWorker`; one is started for
    this call and stopped at its end when None), unless ``settings.torch_isolated`` is False.

    Returns a list of :class:`Result`.
    """
    settings = settings or Settings()
    progress = progress or _NoProgress()
    if engines is None:
        engines, _ = available_engines()
    engines = _ordered_engines(engines)
    if "torch" in engines and not settings.torch_isolated and settings.torch_flush_denormal:
        # complete only while torch has not started its threads in this process yet
        _bench_torch.flush_denormals()
    own_worker = None
    if torch_worker is None and settings.torch_isolated and "torch" in engines:
        torch_worker = own_worker = TorchWorker(settings.subprocess_timeout,
                                                flush_denormal=settings.torch_flush_denormal)
    results = []
    try:
        for shape, cell, mode in _workloads(shapes, cells, modes):
            results += _run_workload(shape, cell, mode, engines, settings, progress,
                                     torch_worker)
    finally:
        if own_worker is not None:
            own_worker.close()
    return results


def _run_workload(shape, cell, mode, engines, settings, progress, torch_worker):
    """Every engine on one workload: each is built and called once (its results checked
    against the built-in layer's), then all are timed together, in alternation
    (:func:`time_interleaved`)."""
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
                res.status = _error_status(exc)
        time_together(results, timed, timing_kwargs(settings))
    finally:
        if worker_open:
            try:
                torch_worker.close_case()
            except RuntimeError:
                pass                  # the worker died: the next case starts a new one
    return results


def time_together(rows, timed, settings_kwargs):
    """Time the ``(row, timer)`` pairs of ``timed`` in alternation with
    :func:`time_interleaved` (keyword arguments ``settings_kwargs``) and fill in their
    ``times``; then set every row's ``baseline_median`` (``rows``: all :class:`Result` or
    :class:`FitResult` of one workload, timed or failed) and each timed row's
    ``speedup_range``: the 25th to 75th percentile of the speed-ups over the built-in layer
    paired round by round (its calls and the engine's in the same round, a fraction of a
    second apart), how far the single ratio could move within the run. A timer that fails
    gives its row status ``"error: ..."``."""
    def failed(i, exc):
        timed[i][0].status = _error_status(exc)

    rounds = []
    times = time_interleaved([timer for _, timer in timed], **settings_kwargs,
                             on_error=failed, rounds=rounds)
    for (res, _), t in zip(timed, times):
        res.times = t
    baseline = next((r.median for r in rows if r.engine == BASELINE and r.times), None)
    for res in rows:
        res.baseline_median = baseline
    base = next((i for i, (r, _) in enumerate(timed) if r.engine == BASELINE and r.times),
                None)
    if base is None:
        return
    for i, (res, _) in enumerate(timed):
        paired = [float(np.median(rd[base]) / np.median(rd[i])) for rd in rounds
                  if base in rd and i in rd]
        if i != base and len(paired) >= 2:
            lo, hi = np.percentile(paired, [25, 75])
            res.speedup_range = (float(lo), float(hi))


def _error_status(exc):
    return f"error: {type(exc).__name__}: {exc}"


def build_imdb_model(engine, cell, time_steps=500, vocab=10000, embed=32, units=32,
                     dtype="float32"):
    """The IMDB example model: Embedding -> LSTM/GRU/SimpleRNN -> Dense(1, sigmoid), compiled
    with Adam and binary cross-entropy. ``engine`` is "keras" or "fastcells-cpu"/"-cuda";
    ``dtype`` the dtype of every layer's weights and computations."""
    import keras
    make_layer = _layer_class(engine, cell)
    model = keras.Sequential([
        keras.Input((time_steps,), dtype="int32"),
        keras.layers.Embedding(vocab, embed, dtype=dtype),
        make_layer(units, dtype=dtype),
        keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
    ])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def imdb_batch(batch=128, time_steps=500, vocab=10000, seed=0):
    """A synthetic IMDB-style batch: int32 tokens [B, T] and 0/1 labels [B, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (batch, time_steps)).astype("int32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    return x, y


def run_fit_benchmarks(cells=("lstm", "gru"), engines=None, settings=None, progress=None,
                       batch=128, time_steps=500):
    """Time ``model.train_on_batch`` of the IMDB-style model for each cell and engine.

    The models share their initial weights; their predictions are compared before training,
    then one training step (:func:`fit_step`: the loss and the weights after it) with the
    built-in model's. Returns a list of :class:`FitResult`.
    """
    import keras
    settings = settings or Settings()
    progress = progress or _NoProgress()
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
                step = fit_step(model, x, y)              # the first one traces the step
                if engine.startswith("fastcells"):
                    _check_kernels_ran(engine, [model.layers[1]])
                if ref_step is None:
                    ref_step = step
                res.loss_error, res.weight_error = compare_fit_step(step, ref_step)
                del step
                problem = check_equivalence(engine, res.max_error, None, settings.dtype,
                                            res.loss_error, res.weight_error)
                if problem:
                    res.status = f"mismatch: {problem}"
                timed.append((res, timed_calls(
                    lambda m=model: m.train_on_batch(x, y))))
            except Exception as exc:  # reported in the table; the other engines still run
                res.status = _error_status(exc)

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
    progress = progress or _NoProgress()
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


# --------------------------------------------------------------------------- machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Distributions whose versions the report records, by name (several for one name: the
#: first installed one).
_DISTRIBUTIONS = {"numpy": ("numpy",), "numba": ("numba",), "numba-cuda": ("numba-cuda",),
                  "tensorflow": ("tensorflow", "tensorflow-cpu"), "keras": ("keras",),
                  "torch": ("torch",)}


def _version(name):
    """The installed version of ``name``, without importing it (importing torch here would
    put its threads next to the engines measured in this process); None when missing."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except Exception:  # not installed under this name
            continue
    return None


def machine_info():
    """CPU, core count, library versions and the fastcells configuration of this machine."""
    import fastcells
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    info = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cpu=_cpu_model(), cores=os.cpu_count(), cores_usable=affinity,
        platform=platform.platform(), python=platform.python_version(),
        versions={m: _version(m) for m in _DISTRIBUTIONS},
        fastcells=dict(version=fastcells.__version__,
                       num_threads=getattr(config, "NUM_THREADS", None),
                       config={k: getattr(config, k) for k in dir(config) if k.isupper()}),
    )
    try:
        if "tensorflow" not in sys.modules:     # not loaded by this run: not imported here
            raise ImportError("tensorflow")
        tf = sys.modules["tensorflow"]
        info["tensorflow_threads"] = dict(
            intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
            inter_op=tf.config.threading.get_inter_op_parallelism_threads())
    except Exception:  # TensorFlow missing: nothing to record
        pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


# --------------------------------------------------------------------------- reporting
def _fmt(value, spec, missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _si(count, unit, sep=""):
    """``count`` with a metric prefix: 3150000000 -> "3.15 GFLOP", 25600 -> "25.6 k tanh"."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g} {prefix}{sep}{unit}"
    return f"{count:.3g} {unit}"


def _fmt_error(value):
    """An error for the tables: NaN shows as "nan" (a missing one as "-")."""
    return "nan" if isinstance(value, float) and math.isnan(value) else _fmt(value, ".1e")


def _fmt_range(span):
    """``(lo, hi)`` of :attr:`Result.speedup_range` as ``"lo-hi x"``, or "" without one."""
    return "" if span is None else f"{span[0]:.2f}-{span[1]:.2f}x"


def _table(header, rows, stream):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        stream.write("  " + "  ".join(cells).rstrip() + "\n")


def _status_note(status):
    return "" if status == "ok" else status


def write_report(report, stream):
    """Write the tables of a :class:`Report` to ``stream``: one per workload with
    microseconds per time step, the speed-up over the built-in layer and the errors against
    it; then model.fit and cold start."""
    groups = {}
    for r in report.layers:
        groups.setdefault(r.workload, []).append(r)
    for (shape_name, cell, mode), rows in groups.items():
        shape = SHAPES.get(shape_name)
        desc = shape.describe() if shape else ""
        stream.write(f"\n{shape_name} · {CELL_NAMES[cell]} · {MODE_NAMES[mode]}   {desc}\n")
        header = ["engine", "us/step", "ms/call", "vs keras", "middle half", "max|err|",
                  "grad err", "n", ""]
        table = []
        for r in rows:
            table.append([r.engine, _fmt(r.us_per_step, ".1f"), _fmt(r.median * 1e3, ".2f"),
                          _fmt(r.speedup, ".2f", "-") + ("x" if r.speedup else ""),
                          _fmt_range(r.speedup_range),
                          _fmt_error(r.max_error), _fmt_error(r.grad_error),
                          len(r.times) or "-", _status_note(r.status)])
        f = workload_floor(cell, shape, mode, report.peak) if shape else None
        if f is not None:
            floor = f["floor_s"]
            base = next((r.median for r in rows if r.engine == BASELINE and r.times), None)
            table.append(["floor", _fmt(floor / shape.time * 1e6, ".1f"),
                          _fmt(floor * 1e3, ".2f"),
                          "" if base is None else f"{base / floor:.2f}x", "", "", "", "",
                          f"{_si(f['flops'], 'FLOP')} + {_si(f['tanh'], 'tanh', ' ')}"])
        _table(header, table, stream)
    if report.fit:
        r0 = report.fit[0]
        stream.write(f"\nmodel.fit · IMDB-style model (Embedding(10000, 32) -> RNN(32) -> "
                     f"Dense(1)), train_on_batch, B={r0.batch} T={r0.time}\n")
        header = ["cell", "engine", "ms/batch", "vs keras", "middle half", "max|err|",
                  "loss err", "weights err", "n", ""]
        table = [[CELL_NAMES[r.cell], r.engine, _fmt(r.ms_per_batch, ".1f"),
                  _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
                  _fmt_range(r.speedup_range),
                  _fmt_error(r.max_error), _fmt_error(r.loss_error),
                  _fmt_error(r.weight_error), len(r.times) or "-", _status_note(r.status)]
                 for r in report.fit]
        _table(header, table, stream)
    if report.cold:
        B, T, D, H = report.cold[0].shape
        stream.write(f"\ncold start · first forward+backward in a fresh process, "
                     f"B={B} T={T} D={D} H={H}\n")
        header = ["cell", "engine", "numba cache", "import s", "first call s",
                  "second call s", ""]
        table = [[CELL_NAMES[r.cell], r.engine, r.cache, _fmt(r.import_s, ".2f"),
                  _fmt(r.first_s, ".3f"), _fmt(r.second_s, ".3f"), _status_note(r.status)]
                 for r in report.cold]
        _table(header, table, stream)
    if report.unavailable:
        stream.write("\nnot run: " + "; ".join(f"{e} ({why})" for e, why in
                                               report.unavailable.items()) + "\n")
    m = report.machine
    if m:
        v = m.get("versions", {})
        dtype = report.settings.get("dtype")
        stream.write(f"\nmachine: {m.get('cpu')}, {m.get('cores')} cores; "
                     + (f"{dtype}; " if dtype else "")
                     + f"fastcells threads {m.get('fastcells', {}).get('num_threads')}; "
                     + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "\n")
        worker = m.get("torch_worker")
        if worker:
            flush = ", denormals flushed" if worker.get("flush_denormal") else ""
            stream.write(f"torch ran in a worker process of its own, "
                         f"{worker.get('torch_threads')} threads{flush}\n")
        elif m.get("torch_threads"):
            stream.write(f"torch ran in this process, {m['torch_threads']} threads\n")
        if m.get("gpu"):
            stream.write(f"GPU: {m['gpu']}\n")
    if report.peak:
        p = report.peak
        stream.write(f"floor: the products and activations alone, at the best rates of "
                     f"this run on {p['threads']} thread(s) in {p['dtype']}: "
                     f"{p['flops_per_s'] / 1e9:.0f} GFLOP/s (the packed product), "
                     f"{p['tanh_per_s'] / 1e9:.1f} G tanh/s; the element-wise updates, "
                     f"copies and the call around the kernels come on top\n")
    if report.elapsed_s is not None:
        stream.write(f"total time {report.elapsed_s:.0f} s\n")


def _floors(report):
    """The compute floor of each workload of the report, for its JSON."""
    floors = {}
    for r in report.layers:
        shape = SHAPES.get(r.shape)
        f = None if shape is None else workload_floor(r.cell, shape, r.mode, report.peak)
        if f is not None and r.workload not in floors:
            floors[r.workload] = dict(shape=r.shape, cell=r.cell, mode=r.mode, **f)
    return list(floors.values())


def save_json(path, report):
    """Save a :class:`Report` as JSON (results, settings, machine information)."""
    data = dict(machine=report.machine, settings=report.settings,
                unavailable=report.unavailable, elapsed_s=report.elapsed_s,
                layers=[r.to_dict() for r in report.layers],
                fit=[r.to_dict() for r in report.fit],
                cold=[r.to_dict() for r in report.cold],
                peak=report.peak, floors=_floors(report))
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def save_plot(path, report):
    """Write a PNG bar chart of the layer results (microseconds per step and speed-up).

    Returns None on success, or a message saying why no plot was written (matplotlib
    missing, nothing to plot).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, no plot written "
                "(pip install matplotlib, or pip install fastcells[plot])")
    timed = [r for r in report.layers if r.times]
    if not timed:
        return "no timed results to plot"
    workloads = list(dict.fromkeys(r.workload for r in timed))
    engines = _ordered_engines({r.engine for r in timed})
    by_key = {(r.workload, r.engine): r for r in timed}
    labels = [f"{s}\n{CELL_NAMES[c]}\n{'fwd' if m == 'forward' else 'fwd+bwd'}"
              for s, c, m in workloads]
    n = len(engines)
    width = 0.8 / n
    xs = np.arange(len(workloads))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(workloads) + 2), 7), sharex=True)
    for k, engine in enumerate(engines):
        us = [by_key[(w, engine)].us_per_step if (w, engine) in by_key else np.nan
              for w in workloads]
        sp = [(by_key[(w, engine)].speedup or np.nan) if (w, engine) in by_key else np.nan
              for w in workloads]
        axes[0].bar(xs + (k - (n - 1) / 2) * width, us, width, label=engine)
        axes[1].bar(xs + (k - (n - 1) / 2) * width, sp, width, label=engine)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("microseconds per time step")
    axes[0].legend(fontsize="small")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylabel("speed-up over keras")
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels, fontsize="small")
    cpu = report.machine.get("cpu", "")
    axes[0].set_title(f"fastcells benchmark, {cpu}, {report.machine.get('cores', '?')} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
