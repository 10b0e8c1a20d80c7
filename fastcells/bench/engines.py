"""The engines: their names, which comparison runs each, their order in a table, and the one
check of whether an engine can run here.

An engine name means the same in both comparisons (``python -m fastcells bench`` on the
CPU, ``python -m fastcells bench --gpu``); each comparison runs the engines it lists:

- ``keras``: the built-in Keras layer (``keras.layers.LSTM/GRU/SimpleRNN``) on the
  comparison's Keras backend: the backend of the run on the CPU (TensorFlow by default, see
  ``--backend``), torch on the GPU (cuDNN for LSTM and GRU). The baseline of every ratio;
- ``fastcells-cpu``: ``fastcells.LSTM/GRU/SimpleRNN(engine="cpu")`` on that backend;
- ``fastcells-cuda``: ``fastcells.LSTM/GRU/SimpleRNN(engine="cuda")`` on that backend, the
  drop-in layer with its bridge (on torch CUDA tensors in the GPU comparison);
- ``fastcells-cuda-ops``: ``fastcells.ops.*_forward/*_backward`` with ``engine="cuda"`` on
  torch CUDA tensors: the kernels alone, no Keras (GPU comparison);
- ``fastcells-cuda-ops-unsplit`` (only when asked for with ``--engines``):
  ``fastcells-cuda-ops`` with ``config.CUDA_SPLIT_MIN_UNITS`` out of reach, so that a block
  owns all the units of its rows wherever that fits (GPU comparison);
- ``torch``: ``torch.nn.LSTM/GRU/RNN`` on the CPU, in a worker process of its own (CPU
  comparison);
- ``torch-cudnn``: ``torch.nn.LSTM/GRU/RNN`` on the GPU, cuDNN (GPU comparison).
"""
import importlib.util

#: What each engine runs (the legend of the reports).
ENGINE_INFO = {
    "keras": "the built-in Keras layer on the comparison's backend (the baseline)",
    "fastcells-cpu": "fastcells layer engine='cpu'",
    "fastcells-cuda-ops": "fastcells.ops engine='cuda' on torch CUDA tensors (no Keras)",
    "fastcells-cuda": "fastcells layer engine='cuda' (the drop-in layer, bridge included)",
    "torch": "torch.nn on the CPU, in a worker process",
    "torch-cudnn": "torch.nn on CUDA (cuDNN)",
    "fastcells-cuda-ops-unsplit": "fastcells-cuda-ops with every unit of a row in one block",
}

#: Every engine, in the order of the tables: the built-in layer first (every ratio's
#: denominator).
ENGINES = tuple(ENGINE_INFO)
BASELINE = "keras"

#: The engines of the CPU comparison.
CPU_ENGINES = ("keras", "fastcells-cpu", "fastcells-cuda", "torch")
#: The engines of the GPU comparison.
GPU_ENGINES = ("keras", "fastcells-cuda-ops", "fastcells-cuda", "torch-cudnn")
#: GPU engines run only when asked for (``--engines``).
GPU_OPTIONAL_ENGINES = ("fastcells-cuda-ops-unsplit",)
COMPARISONS = {"cpu": CPU_ENGINES, "gpu": GPU_ENGINES + GPU_OPTIONAL_ENGINES}

#: Keras backends the CPU comparison runs on (``python -m fastcells bench --backend``).
CPU_BACKENDS = ("tensorflow", "torch", "jax")


def ordered_engines(engines):
    """Engines without repeats in the order of :data:`ENGINES` (the baseline first)."""
    return sorted(dict.fromkeys(engines), key=ENGINES.index)


# --------------------------------------------------------------------------- which run
def choose_bench(gpu_flag, tensorflow_found, keras_backend, gpu_found=False,
                 backend_flag=None):
    """Which comparison ``python -m fastcells bench`` runs: ``("cpu" | "gpu", note)``.

    The CPU comparison runs on the Keras backend of the process (TensorFlow, torch or JAX)
    against that backend's built-in layers. The GPU comparison runs for ``--gpu``, and
    where TensorFlow is missing on a machine with a CUDA GPU (the command line then starts
    Keras on torch) unless a backend was asked for (``--backend``, ``backend_flag``).
    ``note`` says why the GPU comparison was chosen (None when nothing needs saying).

    Example::

        choose_bench(False, tensorflow_found=False, keras_backend="torch", gpu_found=True)
        # ("gpu", "TensorFlow is not installed and a CUDA GPU is: ...")
    """
    if gpu_flag:
        return "gpu", None
    if backend_flag is None and not tensorflow_found and gpu_found:
        return "gpu", ("TensorFlow is not installed and a CUDA GPU is: running the GPU "
                       "comparison (--backend torch or jax runs the CPU comparison)")
    if keras_backend in CPU_BACKENDS:
        return "cpu", None
    return "gpu", (f"Keras runs on the '{keras_backend}' backend: the CPU comparison needs "
                   f"KERAS_BACKEND={', '.join(CPU_BACKENDS)}; running the GPU comparison")


# --------------------------------------------------------------------------- availability
def cuda_gpu_found():
    """True when torch sees a CUDA GPU (see :func:`no_gpu_reason`)."""
    return no_gpu_reason() is None


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
    from .. import ops
    if not ops.cuda_available():
        return "numba.cuda finds no GPU (numba.cuda.is_available() is False)"
    from numba import config as numba_config
    if getattr(numba_config, "ENABLE_CUDASIM", 0):
        return "numba runs its CUDA simulator (NUMBA_ENABLE_CUDASIM=1): nothing to time"
    return None


def _backend_reason(comparison):
    """None when Keras runs on a backend of ``comparison``, else why not."""
    import keras
    backend = keras.backend.backend()
    if comparison == "gpu" and backend != "torch":
        return (f"Keras runs on the '{backend}' backend; the GPU comparison needs "
                f"KERAS_BACKEND=torch")
    if comparison == "cpu" and backend not in CPU_BACKENDS:
        return (f"the CPU comparison runs on the {', '.join(CPU_BACKENDS)} Keras "
                f"backend(s), this process uses '{backend}'")
    return None


def _probe(engine, comparison):
    """Run a tiny LSTM on ``engine`` (forward on the CPU comparison, forward+backward on the
    GPU); None when it works, else the error."""
    tiny_args = ("probe", 2, 3, 4, 5)
    try:
        from .workloads import Shape
        if comparison == "gpu":
            from .gpu import make_gpu_case
            make_gpu_case(engine, "lstm", Shape(*tiny_args), "train").first_call()
        else:
            from .cpu import make_case
            make_case(engine, "lstm", Shape(*tiny_args, modes=("forward",)),
                      "forward").first_call()
    except Exception as exc:  # the reason is reported, not raised: the engine is left out
        return f"a tiny LSTM fails: {type(exc).__name__}: {exc}"
    return None


_unavailable_cache = {}


def engine_unavailable(engine, comparison="cpu"):
    """None when ``engine`` can run here in ``comparison`` ("cpu" or "gpu"), else the
    reason why not.

    The static checks (the engine belongs to the comparison, the Keras backend, PyTorch
    installed, a CUDA GPU for numba and for torch) come first; an engine that passes them and
    computes on a GPU runs a tiny LSTM once, and one that fails there is left out with the
    error. The CPU comparison never imports torch here (its worker process does). Answers
    are cached per process.
    """
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {tuple(COMPARISONS)}, got "
                         f"{comparison!r}")
    engines = COMPARISONS[comparison]
    if engine not in engines:
        raise ValueError(f"engine must be one of {engines}, got {engine!r}")
    key = (comparison, engine)
    if key in _unavailable_cache:
        return _unavailable_cache[key]
    reason = None
    if comparison == "gpu":
        reason = no_gpu_reason()
    if reason is None and engine in ("keras", "fastcells-cpu", "fastcells-cuda"):
        reason = _backend_reason(comparison)
    if reason is None and engine == "torch":
        # found, not imported: the torch engine runs in a worker process of its own
        if importlib.util.find_spec("torch") is None:
            reason = "PyTorch is not installed"
    if reason is None and engine.startswith("fastcells-cuda"):
        reason = _numba_cuda_reason()
    if reason is None and engine == "torch-cudnn":
        import torch
        if not torch.backends.cudnn.is_available():
            reason = "torch finds no cuDNN"
    if reason is None and (comparison == "gpu" or engine == "fastcells-cuda"):
        reason = _probe(engine, comparison)
    _unavailable_cache[key] = reason
    return reason


def available_engines(engines=None, comparison="cpu"):
    """The engines of ``engines`` (default: the comparison's, :data:`CPU_ENGINES` or
    :data:`GPU_ENGINES`) that can run here, and {engine: reason} for the others (see
    :func:`engine_unavailable`)."""
    if engines is None:
        engines = CPU_ENGINES if comparison == "cpu" else GPU_ENGINES
    ok, missing = [], {}
    for e in engines:
        reason = engine_unavailable(e, comparison)
        if reason is None:
            ok.append(e)
        else:
            missing[e] = reason
    return ok, missing
