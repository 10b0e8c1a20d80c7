"""Random problems shared by the kernel tests: one place that knows each cell's shapes."""
import os

import numpy as np
import pytest

GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
NSTATES = {"lstm": 2, "gru": 1, "simple_rnn": 1}


def _cuda_skip_reason():
    from fastcells import ops
    from skips import CUDA_OPTED_OUT
    if ops.cuda_available():
        return None
    if CUDA_OPTED_OUT:
        return "opted out: FASTCELLS_TEST_CUDA=0"
    return "no GPU and the CUDA simulator is off"


#: ``@needs_cuda`` (or ``pytestmark = needs_cuda``): the CUDA tests, which run on a GPU or
#: under the simulator (tests/conftest.py); they skip only where numba-cuda is missing or the
#: run opted out, and tests/test_suite.py fails where numba-cuda is installed but neither
#: runs.
_CUDA_SKIP = _cuda_skip_reason()
needs_cuda = pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))

#: Launch tunables of the CUDA tests small enough that tiny problems take several blocks and
#: round-robin items (the simulator runs every thread as a Python thread and spins at each
#: barrier: GEMM tiles of 8 keep the K loop short; the GEMM test itself uses tiles of 4 by 2).
CUDA_SMALL_TUNABLES = dict(CUDA_THREADS_PER_BLOCK=4, CUDA_MAX_ROWS_PER_BLOCK=2,
                           CUDA_ROWS_PER_THREAD=2, CUDA_BLOCKS_PER_SM=1, CUDA_GEMM_BLOCK_M=8,
                           CUDA_GEMM_BLOCK_N=8, CUDA_GEMM_BLOCK_K=8, CUDA_GEMM_THREAD_M=4,
                           CUDA_GEMM_THREAD_N=4, CUDA_ELEMENTWISE_THREADS=16,
                           CUDA_REDUCE_ROWS=3)


def make_problem(rng, cell, B, T, D, H, *, bias=True, reset_after=True, mask=None,
                 dropout=False, recurrent_dropout=False, per_gate=True, dtype=np.float64,
                 scale=0.5):
    """Inputs, weights, states and options for one call, in the given dtype."""
    G = GATES[cell]
    p = dict(x=rng.standard_normal((B, T, D)),
             kernel=rng.standard_normal((D, G * H)) * scale,
             recurrent_kernel=rng.standard_normal((H, G * H)) * scale)
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    p["bias"] = rng.standard_normal(bshape) * scale if bias else None
    p["states"] = [rng.standard_normal((B, H)) * scale for _ in range(NSTATES[cell])]
    opts = {}
    if cell == "gru":
        opts["reset_after"] = reset_after
    if mask is not None:
        opts["mask"] = mask
    gg = G if (per_gate and cell != "simple_rnn") else None
    if dropout:
        shape = (gg, B, D) if gg else (B, D)
        opts["dropout_mask"] = (rng.random(shape) > 0.3) / 0.7
    if recurrent_dropout:
        shape = (gg, B, H) if gg else (B, H)
        opts["recurrent_dropout_mask"] = (rng.random(shape) > 0.3) / 0.7
    for k in ("x", "kernel", "recurrent_kernel", "bias"):
        if p[k] is not None:
            p[k] = p[k].astype(dtype)
    p["states"] = [s.astype(dtype) for s in p["states"]]
    for k in ("dropout_mask", "recurrent_dropout_mask"):
        if k in opts:
            opts[k] = opts[k].astype(dtype)
    return p, opts


def random_mask(rng, B, T, p_keep=0.6):
    """Any pattern, not only right padding: holes, fully masked rows, masked first steps."""
    m = rng.random((B, T)) < p_keep
    if B > 2:
        m[1] = False            # a fully masked sequence
    if B > 1 and T > 1:
        m[0, 0] = False         # the first step masked
    return m


# --------------------------------------------------------------------------- layer cases
#: The start of the warning a layer gives when it falls back to the built-in recurrence
#: (fastcells/layers.py), as a regular expression (with no colon: warning filters split on
#: it).
FALLBACK_WARNING = r"fastcells\.\w+ '[^']*'. using the built-in Keras implementation"

#: ``pytestmark = FAIL_ON_FALLBACK`` in a module that compares the layers with the built-in
#: ones: a fallback there would compare Keras with Keras, so its warning fails the test
#: (``pytest.warns`` still records it where a test expects the fallback).
FAIL_ON_FALLBACK = pytest.mark.filterwarnings(f"error:{FALLBACK_WARNING}:UserWarning")


#: The layers compared with the built-in ones, by id: (class name, layer arguments).
LAYER_CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}),
               "gru_reset_before": ("GRU", {"reset_after": False}),
               "simple_rnn": ("SimpleRNN", {})}

#: Layer arguments, plus what the call takes: training, use_mask, use_initial_state.
LAYER_CONFIGS = {
    "last_output": dict(),
    "sequences": dict(return_sequences=True),
    "backwards": dict(return_sequences=True, go_backwards=True),
    "mask": dict(return_sequences=True, use_mask=True),
    "mask_last_backwards": dict(go_backwards=True, use_mask=True),
    "mask_zero_output": dict(return_sequences=True, use_mask=True, zero_output_for_mask=True),
    "state_in_out": dict(return_state=True, use_initial_state=True),
    "no_bias": dict(use_bias=False, return_sequences=True),
    "dropout_training": dict(dropout=0.3, recurrent_dropout=0.4, seed=7, training=True,
                             return_sequences=True),
    "input_dropout_only": dict(dropout=0.5, seed=3, training=True),
    "dropout_inference": dict(dropout=0.3, recurrent_dropout=0.3, seed=7, training=False),
    "other_activations": dict(activation="relu", recurrent_activation="hard_sigmoid"),
}


def bidirectional_pair(name):
    """``(built-in, fastcells, x, mask)``: a Bidirectional pair of ``name`` layers (5 units,
    whole sequences), an input [4, 7, 3] and a random mask, for the backend checks."""
    import keras

    import fastcells
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 7, 3)).astype("float32")
    ref = keras.layers.Bidirectional(getattr(keras.layers, name)(5, return_sequences=True))
    fc = keras.layers.Bidirectional(getattr(fastcells, name)(5, return_sequences=True,
                                                             engine="cpu"))
    return ref, fc, x, random_mask(rng, 4, 7)


def layer_arguments(cell, config, rng, shape=(5, 9, 4, 6), configs=LAYER_CONFIGS):
    """(class name, layer arguments, units, x, call arguments) for LAYER_CELLS[cell] in
    ``configs[config]``: x [B, T, D] float32, and the call's training, mask (any pattern)
    and initial states as NumPy arrays."""
    name, base = LAYER_CELLS[cell]
    kw = dict(base, **configs[config])
    B, T, D, H = shape
    x = rng.standard_normal((B, T, D)).astype("float32")
    call = dict(training=kw.pop("training", False))
    if kw.pop("use_mask", False):
        call["mask"] = random_mask(rng, B, T)
    if kw.pop("use_initial_state", False):
        n = 2 if name == "LSTM" else 1
        call["initial_state"] = [rng.standard_normal((B, H)).astype("float32") for _ in range(n)]
    if name == "SimpleRNN":
        kw.pop("recurrent_activation", None)
    return name, kw, H, x, call


def run_backend_checks(backend, cases, argv, worst):
    """The main loop of the ``*_backend_checks.py`` scripts: run the ``(name, function)``
    pairs of ``cases`` whose names contain one of ``argv`` (all without), each after seeding
    Keras (``FASTCELLS_CHECK_SEED``, default 0), print one line per check, the worst errors
    and the failures; a fastcells fallback warning counts as a failure. Returns the exit
    status: 1 when a check failed, or when an argument of ``argv`` selects no check (a
    misspelt or renamed selection would otherwise pass without checking anything)."""
    import time
    import traceback
    import warnings

    import keras
    assert keras.backend.backend() == backend, keras.backend.backend()
    warnings.filterwarnings("error", message="fastcells")   # a fallback warns: make it fail
    everything = list(cases())
    selected = [(n, f) for n, f in everything if not argv or any(a in n for a in argv)]
    unmatched = [a for a in argv if not any(a in n for n, _ in everything)]
    if unmatched or not selected:
        print(f"no check selected by {unmatched or argv}: no check name contains them")
        return 1
    failed = []
    seed = int(os.environ.get("FASTCELLS_CHECK_SEED", "0"))
    for name, fn in selected:
        keras.utils.set_random_seed(seed)      # the layers' initial weights
        start = time.perf_counter()
        try:
            fn()
            print(f"ok    {name} ({time.perf_counter() - start:.1f} s)")
        except Exception:
            failed.append(name)
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"{len(selected) - len(failed)} passed, {len(failed)} failed")
    print("worst errors vs the built-in layers: " +
          ", ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    for name in failed:
        print(f"failed: {name}")
    return 1 if failed else 0


def assert_backend_checks_pass(backend, *selection):
    """Run ``tests/<backend>_backend_checks.py`` in a process of its own under
    ``KERAS_BACKEND=<backend>`` and fail with its output when a check fails (skip when the
    script exits 77: the backend's framework cannot be imported)."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, os.path.join(here, f"{backend}_backend_checks.py"),
                           *selection], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    print(proc.stdout)
    assert proc.returncode == 0, (f"{backend} backend checks failed (status {proc.returncode}):"
                                  f"\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")
    assert " 0 failed" in proc.stdout
