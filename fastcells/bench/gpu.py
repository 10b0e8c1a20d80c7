"""The GPU comparison: the fastcells CUDA engines against cuDNN and the built-in Keras layers,
with no TensorFlow needed.

``python -m fastcells bench --gpu`` runs it (and so does ``python -m fastcells bench`` where
TensorFlow is not installed). Every engine runs on torch CUDA tensors in this process, Keras
on the torch backend (``KERAS_BACKEND=torch``); :data:`~fastcells.bench.engines.GPU_ENGINES`
are ``keras`` (cuDNN for the LSTM and GRU, Keras's own step loop for SimpleRNN; the baseline
of every ratio, as on the CPU), ``fastcells-cuda-ops`` (the kernels alone, no Keras),
``fastcells-cuda`` (the drop-in layer, bridge included) and ``torch-cudnn``;
``fastcells-cuda-ops-unsplit`` runs when asked for: beside ``fastcells-cuda-ops`` at
H >= 512 (``large``) it compares the two launch plans of ``fastcells/cuda/_common.py`` on
this GPU. :mod:`fastcells.bench.engines` says what each engine runs.

Each call ends with ``torch.cuda.synchronize()`` (and ``numba.cuda.synchronize()``), so the
timed region holds the whole computation. TF32 is off (``Settings.allow_tf32``): every engine
computes in float32, as the fastcells kernels do. Every call is an NVTX range named after
its engine, with ``"<cell> forward"`` and ``"<cell> backward"`` ranges inside, so that a
profiler can pick one engine::

    ncu --nvtx --nvtx-include "fastcells-cuda-ops/" -o lstm python -m fastcells bench --gpu \
        --shapes imdb --cells lstm --modes train --engines fastcells-cuda-ops \
        --repeats 1 --warmup 0 --min-seconds 0

Example::

    import sys
    from fastcells import bench
    from fastcells.bench import engines
    if engines.no_gpu_reason() is None:
        results = bench.run_gpu_benchmarks(["imdb"], ["lstm"], ["train"])
        bench.write_report(bench.Report(layers=results), sys.stdout)
"""
import contextlib
import sys

import numpy as np

from .equivalence import check_equivalence, compare
from .cpu import built_layers
from .engines import GPU_ENGINES, GPU_OPTIONAL_ENGINES, _numba_cuda_reason
from .engines import available_engines, ordered_engines
from .report import Result
from .timing import NoProgress, Settings, error_status, time_together, timing_kwargs
from .timing import timed as timed_calls
from .torch_worker import nvtx_range, torch_case
from .workloads import CELL_NAMES, MODES, Case, case_arrays, iter_workloads

_ALL_GPU_ENGINES = GPU_ENGINES + GPU_OPTIONAL_ENGINES

#: The GPU workloads: the IMDB layer (B=128 T=500 D=32 H=32), B=64 T=100 D=256 H=256,
#: B=32 T=100 D=512 H=1024 and one sequence at a time (B=1 T=100 D=64 H=128).
GPU_SHAPES = ("imdb", "medium", "large", "streaming")
QUICK_GPU_SHAPES = ("imdb", "streaming")

#: Engines whose outputs are the reference of the equivalence check, in order of preference.
_REFERENCES = ("keras", "torch-cudnn")

LEGEND = ("keras = built-in Keras layer on the torch backend (cuDNN for LSTM/GRU); "
          "fastcells-cuda-ops = fastcells.ops engine='cuda' on torch CUDA tensors; "
          "fastcells-cuda = fastcells layer engine='cuda' under KERAS_BACKEND=torch; "
          "torch-cudnn = torch.nn on CUDA; fastcells-cuda-ops-unsplit = fastcells-cuda-ops "
          "with every unit of a row in one block")


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
    """Build ``engine`` (see :data:`~fastcells.bench.engines.GPU_ENGINES`) running ``cell``
    on ``shape`` in ``mode`` on the GPU, with the weights and inputs of
    :func:`~fastcells.bench.workloads.make_weights` /
    :func:`~fastcells.bench.workloads.make_inputs`. Returns a
    :class:`~fastcells.bench.workloads.Case` whose calls end with :func:`synchronize`."""
    weights, x = case_arrays(cell, shape, mode, seed, dtype)
    if engine == "torch-cudnn":
        run, fetch = torch_case(cell, shape, mode, weights, x, device="cuda")
        return Case(engine, cell, shape, mode, run, fetch)
    if engine in ("fastcells-cuda-ops", "fastcells-cuda-ops-unsplit"):
        return _ops_case(engine, cell, shape, mode, weights, x)
    if engine in ("keras", "fastcells-cuda"):
        return _keras_case(engine, cell, shape, mode, weights, x)
    raise ValueError(f"engine must be one of {_ALL_GPU_ENGINES}, got {engine!r}")


@contextlib.contextmanager
def _unsplit(engine):
    """Within the block, ``fastcells-cuda-ops-unsplit`` keeps a row's units in one block."""
    from .. import config
    saved = config.CUDA_SPLIT_MIN_UNITS
    if engine == "fastcells-cuda-ops-unsplit":
        config.CUDA_SPLIT_MIN_UNITS = 1 << 62
    try:
        yield
    finally:
        config.CUDA_SPLIT_MIN_UNITS = saved


def _ops_case(engine, cell, shape, mode, weights, x_np):
    """fastcells.ops with engine='cuda' on torch CUDA tensors; stacked layers in turn."""
    import torch

    from .. import ops
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

    return Case(engine, cell, shape, mode, run, fetch)


def _keras_case(engine, cell, shape, mode, weights, x_np):
    """A built-in or fastcells Keras layer under the torch backend, on CUDA tensors."""
    import torch

    layers = built_layers(engine, cell, shape, weights, x_np.dtype)
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

    return Case(engine, cell, shape, mode, run, fetch, check)


# --------------------------------------------------------------------------- runner
def run_gpu_benchmarks(shapes=QUICK_GPU_SHAPES, cells=("lstm", "gru"), modes=MODES,
                       engines=None, settings=None, progress=None):
    """Time every GPU engine on every (shape, cell, mode) workload; same rules as
    :func:`fastcells.bench.cpu.run_layer_benchmarks`: the built-in layer first (every ratio's
    denominator), errors against it (against cuDNN where Keras cannot run), an engine that
    fails is reported and the run goes on.

    Returns a list of :class:`fastcells.bench.report.Result`.
    """
    settings = settings or Settings()
    progress = progress or NoProgress()
    if engines is None:
        engines, _ = available_engines(comparison="gpu")
    engines = ordered_engines(e for e in engines if e in _ALL_GPU_ENGINES)
    configure(settings)
    ref_engine = next((e for e in _REFERENCES if e in engines), None)
    results = []
    for shape, cell, mode in iter_workloads(shapes, cells, modes):
        reference = None
        rows, timed = [], []
        for engine in engines:
            progress.step(f"GPU {shape.name} {CELL_NAMES[cell]} {mode} {engine}")
            res = Result(shape.name, cell, mode, engine, shape.time)
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
                    res.max_error, res.grad_error = compare(out, reference)
                del out
                problem = check_equivalence(engine, res.max_error,
                                                  res.grad_error, settings.dtype)
                if problem:
                    res.status = f"mismatch: {problem.replace('the built-in layer', ref_engine)}"
                timed.append((res, timed_calls(case)))
                del case
            except Exception as exc:  # reported in the table; the other engines still run
                res.status = error_status(exc)

        # in alternation, as on the CPU (fastcells.bench.cpu)
        time_together(rows, timed, timing_kwargs(settings))
        del timed
        results += rows
        _free_gpu_memory()
    return results


def _free_gpu_memory():
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.cuda.empty_cache()
