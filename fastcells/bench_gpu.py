"""GPU benchmark: the fastcells CUDA engine against cuDNN and the built-in Keras layers, with
no TensorFlow needed.

``python -m fastcells bench --gpu`` runs it (and so does ``python -m fastcells bench`` where
TensorFlow is not installed). Every engine runs on torch CUDA tensors in this process:

- ``keras``: the built-in Keras layer on the torch backend (``KERAS_BACKEND=torch``). Keras
  runs cuDNN for the LSTM and GRU and its own step loop for SimpleRNN. It is the baseline of
  every ratio, as on the CPU;
- ``fastcells-cuda``: ``fastcells.ops.*_forward/*_backward`` with ``engine="cuda"`` on the
  torch tensors (the kernels alone, no Keras);
- ``fastcells-cuda-layer``: ``fastcells.LSTM/GRU/SimpleRNN(engine="cuda")`` under the torch
  backend (the kernels behind the drop-in layer, bridge included);
- ``torch-cudnn``: ``torch.nn.LSTM/GRU/RNN`` on the GPU (cuDNN);
- ``fastcells-cuda-unsplit`` (only when asked for with ``--engines``): ``fastcells-cuda``
  with ``config.CUDA_SPLIT_MIN_UNITS`` out of reach, so that a block owns all the units of
  its rows wherever that fits: beside ``fastcells-cuda`` at H >= 512 (``large``) it compares
  the two launch plans of ``fastcells/cuda/_common.py`` on this GPU.

Each call ends with ``torch.cuda.synchronize()`` (and ``numba.cuda.synchronize()``), so the
timed region holds the whole computation. TF32 is off (``Settings.allow_tf32``): every engine
computes in float32, as the fastcells kernels do. Every call is an NVTX range named after
its engine, with ``"<cell> forward"`` and ``"<cell> backward"`` ranges inside, so that a
profiler can pick one engine::

    ncu --nvtx --nvtx-include "fastcells-cuda/" -o lstm python -m fastcells bench --gpu \
        --shapes imdb --cells lstm --modes train --engines fastcells-cuda \
        --repeats 1 --warmup 0 --min-seconds 0

Example::

    import sys
    from fastcells import bench, bench_gpu
    if bench_gpu.no_gpu_reason() is None:
        results = bench_gpu.run_gpu_benchmarks(["imdb"], ["lstm"], ["train"])
        bench.write_report(bench.Report(layers=results), sys.stdout)
"""
import contextlib
import importlib.util
import sys

import numpy as np

from . import bench
from ._bench_torch import nvtx_range, torch_case

__all__ = ["GPU_ENGINES", "GPU_OPTIONAL_ENGINES", "GPU_SHAPES", "QUICK_GPU_SHAPES", "choose_bench", "no_gpu_reason",
           "gpu_engine_unavailable", "available_gpu_engines", "make_gpu_case",
           "run_gpu_benchmarks", "gpu_info", "configure", "synchronize", "LEGEND"]

#: Engines of the GPU comparison, the baseline first.
GPU_ENGINES = ("keras", "fastcells-cuda", "fastcells-cuda-layer", "torch-cudnn")

#: Engines run only when asked for (``--engines``): the CUDA ops without the unit split.
GPU_OPTIONAL_ENGINES = ("fastcells-cuda-unsplit",)
_ALL_GPU_ENGINES = GPU_ENGINES + GPU_OPTIONAL_ENGINES

#: The GPU workloads of the issue: the IMDB layer (B=128 T=500 D=32 H=32), B=64 T=100
#: D=256 H=256, B=32 T=100 D=512 H=1024 and one sequence at a time (B=1 T=100 D=64 H=128).
GPU_SHAPES = ("imdb", "medium", "large", "streaming")
QUICK_GPU_SHAPES = ("imdb", "streaming")

#: Engines whose outputs are the reference of the equivalence check, in order of preference.
_REFERENCES = ("keras", "torch-cudnn")

LEGEND = ("keras = built-in Keras layer on the torch backend (cuDNN for LSTM/GRU); "
          "fastcells-cuda = fastcells.ops engine='cuda' on torch CUDA tensors; "
          "fastcells-cuda-layer = fastcells layer engine='cuda' under KERAS_BACKEND=torch; "
          "torch-cudnn = torch.nn on CUDA; fastcells-cuda-unsplit = fastcells-cuda with every "
          "unit of a row in one block")


# --------------------------------------------------------------------------- which run
def choose_bench(gpu_flag, tensorflow_found, keras_backend):
    """Which comparison ``python -m fastcells bench`` runs: ``("cpu" | "gpu", note)``.

    The CPU comparison needs the built-in layers on TensorFlow (the reference backend); where
    TensorFlow is missing, or Keras runs on another backend, the GPU comparison runs instead,
    and ``note`` says why (None when nothing needs saying).

    Example::

        choose_bench(False, tensorflow_found=False, keras_backend="torch")
        # ("gpu", "TensorFlow is not installed: ...")
    """
    if gpu_flag:
        return "gpu", None
    if not tensorflow_found:
        return "gpu", ("TensorFlow is not installed: the CPU comparison (built-in layers on "
                       "TensorFlow, fastcells-cpu, torch, model.fit, cold start) is skipped; "
                       "running the GPU comparison")
    if keras_backend != "tensorflow":
        return "gpu", (f"Keras runs on the '{keras_backend}' backend: the CPU comparison "
                       f"needs KERAS_BACKEND=tensorflow; running the GPU comparison")
    return "cpu", None


def no_gpu_reason():
    """None when torch sees a CUDA GPU, else why the GPU comparison cannot run."""
    if importlib.util.find_spec("torch") is None:
        return "no CUDA GPU usable: PyTorch is not installed (the GPU comparison runs on torch " \
               "CUDA tensors)"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _numba_cuda_reason():
    """None when numba.cuda can launch kernels on a real GPU, else why not."""
    from . import ops
    if not ops.cuda_available():
        return "numba.cuda finds no GPU (is numba-cuda installed?)"
    from numba import config as numba_config
    if getattr(numba_config, "ENABLE_CUDASIM", 0):
        return "numba runs its CUDA simulator (NUMBA_ENABLE_CUDASIM=1): nothing to time"
    return None


_unavailable = {}


def gpu_engine_unavailable(engine):
    """None when ``engine`` (one of :data:`GPU_ENGINES`) can run here, else the reason.

    Besides the static checks (a GPU, the Keras backend, numba.cuda) each engine runs a tiny
    LSTM forward+backward once: an engine that fails there is left out with the error.
    """
    if engine not in _ALL_GPU_ENGINES:
        raise ValueError(f"engine must be one of {_ALL_GPU_ENGINES}, got {engine!r}")
    if engine in _unavailable:
        return _unavailable[engine]
    reason = no_gpu_reason()
    if reason is None and engine in ("keras", "fastcells-cuda-layer"):
        import keras
        if keras.backend.backend() != "torch":
            reason = (f"Keras runs on the '{keras.backend.backend()}' backend; the GPU "
                      f"comparison needs KERAS_BACKEND=torch")
    if reason is None and engine.startswith("fastcells"):
        reason = _numba_cuda_reason()
    if reason is None and engine == "torch-cudnn":
        import torch
        if not torch.backends.cudnn.is_available():
            reason = "torch finds no cuDNN"
    if reason is None:
        reason = _probe(engine)
    _unavailable[engine] = reason
    return reason


def _probe(engine):
    tiny = bench.Shape("probe", 2, 3, 4, 5)
    try:
        make_gpu_case(engine, "lstm", tiny, "train").first_call()
    except Exception as exc:  # the reason is reported, not raised: the engine is left out
        return f"a tiny LSTM fails: {type(exc).__name__}: {exc}"
    return None


def available_gpu_engines(engines=GPU_ENGINES):
    """The engines of ``engines`` that can run here, and {engine: reason} for the others."""
    return bench.available_engines(engines, gpu_engine_unavailable)


# --------------------------------------------------------------------------- device
_numba_sync = None


def synchronize():
    """Wait for everything queued on the GPU: torch's work and numba's."""
    global _numba_sync
    import torch
    torch.cuda.synchronize()
    if _numba_sync is None:
        _numba_sync = False
        if _numba_cuda_reason() is None:
            from numba import cuda
            _numba_sync = cuda.synchronize
    if _numba_sync:
        _numba_sync()


def configure(settings):
    """Set torch's TF32 switches from ``settings.allow_tf32`` (off: float32 everywhere)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = bool(settings.allow_tf32)
    torch.backends.cudnn.allow_tf32 = bool(settings.allow_tf32)


def gpu_info():
    """Name, compute capability, memory and library versions of the GPU torch uses."""
    import torch
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(name=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1),
                multiprocessors=props.multi_processor_count,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                allow_tf32=dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                                cudnn=torch.backends.cudnn.allow_tf32))


def _host(a):
    """A device result (torch tensor, numba device array) as a NumPy array."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


# --------------------------------------------------------------------------- cases
def make_gpu_case(engine, cell, shape, mode, seed=0, dtype="float32"):
    """Build ``engine`` (see :data:`GPU_ENGINES`) running ``cell`` on ``shape`` in ``mode`` on
    the GPU, with the weights and inputs of :func:`fastcells.bench.make_weights` /
    :func:`~fastcells.bench.make_inputs`. Returns a :class:`fastcells.bench.Case` whose
    calls end with :func:`synchronize`."""
    if cell not in bench.CELLS:
        raise ValueError(f"cell must be one of {bench.CELLS}, got {cell!r}")
    if mode not in bench.MODES:
        raise ValueError(f"mode must be one of {bench.MODES}, got {mode!r}")
    weights = bench.make_weights(cell, shape, seed, dtype)
    x = bench.make_inputs(shape, seed, dtype)
    if engine == "torch-cudnn":
        run, fetch = torch_case(cell, shape, mode, weights, x, device="cuda")
        return bench.Case(engine, cell, shape, mode, run, fetch)
    if engine in ("fastcells-cuda", "fastcells-cuda-unsplit"):
        return _ops_case(engine, cell, shape, mode, weights, x)
    if engine in ("keras", "fastcells-cuda-layer"):
        return _keras_case(engine, cell, shape, mode, weights, x)
    raise ValueError(f"engine must be one of {_ALL_GPU_ENGINES}, got {engine!r}")


@contextlib.contextmanager
def _unsplit(engine):
    """Within the block, ``fastcells-cuda-unsplit`` keeps a row's units in one block."""
    from . import config
    saved = config.CUDA_SPLIT_MIN_UNITS
    if engine == "fastcells-cuda-unsplit":
        config.CUDA_SPLIT_MIN_UNITS = 1 << 62
    try:
        yield
    finally:
        config.CUDA_SPLIT_MIN_UNITS = saved


def _ops_case(engine, cell, shape, mode, weights, x_np):
    """fastcells.ops with engine='cuda' on torch CUDA tensors; stacked layers in turn."""
    import torch

    from . import ops
    forward = {"lstm": ops.lstm_forward, "gru": ops.gru_forward,
               "simple_rnn": ops.simple_rnn_forward}[cell]
    backward = {"lstm": ops.lstm_backward, "gru": ops.gru_backward,
                "simple_rnn": ops.simple_rnn_backward}[cell]
    release = getattr(ops, "release_cache", None)
    dev = torch.device("cuda")
    x = torch.from_numpy(x_np).to(dev)
    params = [[torch.from_numpy(a).to(dev) for a in w] for w in weights]
    training = mode == "train"
    n = len(params)
    out_shape = ((shape.batch, shape.time, shape.units) if shape.return_sequences
                 else (shape.batch, shape.units))
    d_out = torch.ones(out_shape, device=dev, dtype=x.dtype)      # d sum(outputs)

    def run():
        with nvtx_range(engine), _unsplit(engine):
            with nvtx_range(f"{cell} forward"):
                y, caches = x, []
                for i, (W, U, b) in enumerate(params):
                    f = forward(y, W, U, b, training=training, engine="cuda",
                                return_sequences=shape.return_sequences or i < n - 1)
                    y = f.outputs
                    caches.append(f.cache)
            grads = ()
            if training:
                with nvtx_range(f"{cell} backward"):
                    dy, layer_grads = d_out, []
                    for cache in reversed(caches):
                        g = backward(cache, dy)
                        if release is not None:
                            release(cache)
                        layer_grads[:0] = [g.kernel, g.recurrent_kernel, g.bias]
                        dy = g.x
                    grads = [dy] + layer_grads
        synchronize()
        return y, grads

    def fetch(out):
        y, grads = out
        return _host(y), ([_host(g) for g in grads] if training else None)

    return bench.Case(engine, cell, shape, mode, run, fetch)


def _keras_case(engine, cell, shape, mode, weights, x_np):
    """A built-in or fastcells Keras layer under the torch backend, on CUDA tensors."""
    import torch

    make_layer = bench._layer_class("keras" if engine == "keras" else "fastcells-cuda", cell)
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
    variables = [v.value for layer in layers for v in layer.trainable_variables]
    x = torch.from_numpy(x_np).to("cuda")
    training = mode == "train"
    xg = x.clone().requires_grad_(True) if training else x

    def apply(inputs):
        y = inputs
        for layer in layers:
            y = layer(y, training=training)
        return y

    def run():
        with nvtx_range(engine):
            grads = ()
            if training:
                with nvtx_range(f"{cell} forward"):
                    y = apply(xg)
                with nvtx_range(f"{cell} backward"):
                    grads = torch.autograd.grad(y.sum(), [xg] + variables)
            else:
                with nvtx_range(f"{cell} forward"), torch.no_grad():
                    y = apply(x)
        synchronize()
        return y, grads

    def fetch(out):
        y, grads = out
        return _host(y), ([_host(g) for g in grads] if training else None)

    def check():
        if engine != "keras":
            used = {getattr(layer, "last_engine", None) for layer in layers}
            if used != {"cuda"}:
                raise RuntimeError(f"{engine}: the layers ran {sorted(map(str, used))}, not "
                                   f"the cuda kernels (a silent fallback would time Keras)")

    return bench.Case(engine, cell, shape, mode, run, fetch, check)


# --------------------------------------------------------------------------- runner
def _ordered(engines):
    engines = [e for e in dict.fromkeys(engines) if e in _ALL_GPU_ENGINES]
    return sorted(engines, key=_ALL_GPU_ENGINES.index)


def _tolerance_engine(engine):
    """The engine whose bounds :func:`fastcells.bench.check_equivalence` applies."""
    return "torch" if engine == "torch-cudnn" else engine


def run_gpu_benchmarks(shapes=QUICK_GPU_SHAPES, cells=("lstm", "gru"), modes=bench.MODES,
                       engines=None, settings=None, progress=None):
    """Time every GPU engine on every (shape, cell, mode) workload; same rules as
    :func:`fastcells.bench.run_layer_benchmarks`: the built-in layer first (every ratio's
    denominator), errors against it (against cuDNN where Keras cannot run), an engine that
    fails is reported and the run goes on.

    Returns a list of :class:`fastcells.bench.Result`.
    """
    settings = settings or bench.Settings()
    progress = progress or bench._NoProgress()
    if engines is None:
        engines, _ = available_gpu_engines()
    engines = _ordered(engines)
    configure(settings)
    ref_engine = next((e for e in _REFERENCES if e in engines), None)
    results = []
    for shape, cell, mode in bench._workloads(shapes, cells, modes):
        reference = None
        rows, timed = [], []
        for engine in engines:
            progress.step(f"GPU {shape.name} {bench.CELL_NAMES[cell]} {mode} {engine}")
            res = bench.Result(shape.name, cell, mode, engine, shape.time)
            rows.append(res)
            try:
                if reference is None and ref_engine is not None and engine != ref_engine:
                    reference = make_gpu_case(ref_engine, cell, shape, mode, settings.seed,
                                              settings.dtype).first_call()
                case = make_gpu_case(engine, cell, shape, mode, settings.seed, settings.dtype)
                out = case.first_call()
                if engine == ref_engine:
                    reference = out
                if reference is not None:
                    res.max_error, res.grad_error = bench.compare(out, reference)
                del out
                problem = bench.check_equivalence(_tolerance_engine(engine), res.max_error,
                                                  res.grad_error, settings.dtype)
                if problem:
                    res.status = f"mismatch: {problem.replace('the built-in layer', ref_engine)}"
                timed.append((res, bench.timed_calls(case)))
                del case
            except Exception as exc:  # reported in the table; the other engines still run
                res.status = bench._error_status(exc)

        # in alternation, as on the CPU (fastcells.bench._run_workload)
        bench.time_together(rows, timed, bench.timing_kwargs(settings))
        del timed
        results += rows
        _free_gpu_memory()
    return results


def _free_gpu_memory():
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.empty_cache()
