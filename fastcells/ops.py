"""Array-level API: forward and backward passes of LSTM, GRU and SimpleRNN on arrays.

Weights are in the Keras layout (LSTM gates i, f, c, o; GRU z, r, h). Every function
validates what it is given and raises ``ValueError``/``TypeError`` naming the argument and the
shapes seen, picks the engine, and calls the kernels of ``fastcells.cpu`` (or
``fastcells.cuda``). The parts of the work that are parallel in time run as large GEMMs:
the input projection ``x @ W`` before the recurrence, and the weight gradients
``x^T dz``, ``h^T dz`` after it.

This module is the public tier: the functions, their results, the engines and the cells.
The argument checks are in ``fastcells._validate``; the preparation, the recurrence and the
backward in ``fastcells._recurrence``.

Example::

    import numpy as np
    from fastcells import ops
    B, T, D, H = 4, 10, 3, 5
    x = np.random.rand(B, T, D).astype("float32")
    W = np.random.rand(D, 4 * H).astype("float32")
    U = np.random.rand(H, 4 * H).astype("float32")
    fwd = ops.lstm_forward(x, W, U, None)
    outputs, (h, c) = fwd.outputs, fwd.states          # [B, T, H], [B, H], [B, H]
    grads = ops.lstm_backward(fwd.cache, np.ones_like(outputs))
    grads.kernel.shape                                  # (3, 20)
"""
from collections import namedtuple

from . import _recurrence, _validate

__all__ = ["lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "simple_rnn_forward", "simple_rnn_backward", "Forward", "Gradients",
           "ENGINES", "CELLS", "Cell", "cuda_available", "cache_nbytes"]

ENGINES = ("auto", "cpu", "cuda")

Forward = namedtuple("Forward", ["outputs", "states", "cache"])
Forward.__doc__ = """Result of a forward pass.

outputs: [B, T, H] (or [B, H] with return_sequences=False), in processing order.
states:  tuple of final states, each [B, H] (h, c for the LSTM; h otherwise).
cache:   what the matching backward needs (None when training=False).
"""
Gradients = namedtuple("Gradients", ["x", "kernel", "recurrent_kernel", "bias", "states"])
Gradients.__doc__ = """Gradients of a backward pass: x [B, T, D], kernel, recurrent_kernel,
bias (None when there is no bias) and states, a tuple of [B, H] for the initial states."""


# --------------------------------------------------------------------------- engines
def cuda_available():
    """True when numba.cuda finds a GPU (or the CUDA simulator is enabled); False where
    numba-cuda is not installed or finds no usable GPU (``cuda.is_available()`` says so for
    a missing or broken driver). Any other error, such as a broken numba-cuda install, is
    raised rather than taken for "no GPU"."""
    try:
        from numba import cuda
    except ImportError:
        return False
    return bool(cuda.is_available())


def _resolve_engine(engine, x=None):
    """The engine a call runs on: "auto" picks "cuda" for inputs that live on a GPU."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
    if engine == "auto":
        engine = "cuda" if _validate.on_device(x) else "cpu"
    if engine == "cuda" and not cuda_available():
        raise RuntimeError("engine='cuda' needs an NVIDIA GPU with numba-cuda (pip install "
                           "'fastcells[cuda]'); numba.cuda finds none. Use engine='cpu'")
    if engine == "cpu" and _validate.on_device(x):
        raise ValueError("x lives on a GPU (it has __cuda_array_interface__) but "
                         "engine='cpu'; use engine='cuda' or 'auto', or copy x to the host")
    return engine


# --------------------------------------------------------------------------- the calls
def _prepare(cell, x, kernel, recurrent_kernel, bias, states, options):
    """The ``_recurrence`` cache of a forward of ``cell`` (no kernel results yet), its
    options given by name and completed with the public defaults; the engine resolved here."""
    options = _validate.with_defaults(options)
    engine = _resolve_engine(options.pop("engine"), x)
    return _recurrence.prepare(CELLS[cell], engine, x, kernel, recurrent_kernel, bias, states,
                               **options)


def _forward(cell, args):
    """The forward of ``cell``; ``args`` are the arguments of its public function by name
    (its ``locals()``), the initial states named as in ``CELLS[cell].states``."""
    args = dict(args)
    x, kernel, recurrent_kernel, bias = (args.pop(k) for k in
                                         ("x", "kernel", "recurrent_kernel", "bias"))
    states = tuple(args.pop(name) for name in CELLS[cell].states)
    p = _prepare(cell, x, kernel, recurrent_kernel, bias, states, args)
    return Forward(*_recurrence.run_forward(p, args["training"]))


def _backward(cell, cache, d_outputs, d_states):
    return Gradients(*_recurrence.run_backward(cell, cache, d_outputs, d_states))


def rebuild_cache(cell, kcache, x, kernel, recurrent_kernel, bias=None, *states, **options):
    """Rebuild the cache of a forward pass from its kernel arrays (``cache_arrays``) and the
    arguments the forward was called with. With ``kcache=None`` the forward is recomputed
    (what the framework bridges do when a cache was evicted or already used)."""
    options.setdefault("training", True)
    p = _prepare(cell, x, kernel, recurrent_kernel, bias, states, options)
    return _recurrence.rebuild(p, kcache)


def release_cache(cache):
    """Give a cache's memory back for reuse by later calls; the cache is unusable after.
    For bridges that know a cache's backward has run and will not run again."""
    _recurrence.release(cache)


def cache_arrays(cache):
    """The kernel arrays of a cache, to carry them as framework tensors."""
    return tuple(cache.kcache)


def cache_nbytes(cache):
    """Bytes held by a forward cache (kernel arrays, the time-major input, checkpoints)."""
    return _recurrence.nbytes(cache)


# --------------------------------------------------------------------------- LSTM
def lstm_forward(x, kernel, recurrent_kernel, bias=None, h0=None, c0=None, *, mask=None,
                 go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                 recurrent_dropout_mask=None, activation="tanh",
                 recurrent_activation="sigmoid", training=True, return_sequences=True,
                 engine="auto", checkpoint_steps=None):
    """LSTM forward pass over a whole sequence (Keras semantics).

    Args:
        x: [B, T, D] float32 or float64 inputs.
        kernel: [D, 4H] input kernel, gates i, f, c, o.
        recurrent_kernel: [H, 4H].
        bias: [4H] or None.
        h0, c0: [B, H] initial states (zeros when None).
        mask: [B, T] bool, True where a step is processed; any pattern.
        go_backwards: consume the sequence from the end; outputs come in processing order.
        zero_output_for_mask: masked steps output zeros instead of the previous output.
        dropout_mask: [B, D] (shared by the gates) or [4, B, D] (one per gate).
        recurrent_dropout_mask: [B, H] or [4, B, H] (one per gate).
        activation, recurrent_activation: "tanh", "sigmoid", "relu", "hard_sigmoid",
            "linear" (or a Keras activation function of that name).
        training: apply the dropout masks and keep the cache for ``lstm_backward``.
        return_sequences: outputs [B, T, H] (True) or the last output [B, H].
        engine: "auto" (the CUDA kernels for arrays on a GPU, the CPU kernels otherwise),
            "cpu" or "cuda" (host arrays are copied to the GPU; results stay there).
        checkpoint_steps: None (default) keeps the whole forward cache for the backward,
            about (3 + gates) * B * T * H numbers. An int K keeps only the states entering
            every K-th step; the backward recomputes each chunk's cache from them (one more
            forward pass), bounding the cache to about (gates + 3) * B * K * H numbers plus
            3 * B * H per chunk. Gradients equal the full-cache ones to rounding.

    Returns:
        ``Forward(outputs, (h, c), cache)``.

    Example::

        fwd = lstm_forward(x, W, U, b, mask=x.any(-1))
        grads = lstm_backward(fwd.cache, d_outputs)
    """
    return _forward("lstm", locals())


def lstm_backward(cache, d_outputs=None, d_h=None, d_c=None):
    """Gradients of an LSTM forward pass.

    Args:
        cache: ``lstm_forward(..., training=True).cache``.
        d_outputs: gradient of the outputs, [B, T, H] (return_sequences) or [B, H] (the last
            output only); None for zeros.
        d_h, d_c: gradients of the final states [B, H]; None for zeros.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0, dc0))``.
    """
    return _backward("lstm", cache, d_outputs, [("d_h", d_h), ("d_c", d_c)])


# --------------------------------------------------------------------------- GRU
def gru_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                recurrent_dropout_mask=None, activation="tanh",
                recurrent_activation="sigmoid", reset_after=True, training=True,
                return_sequences=True, engine="auto", checkpoint_steps=None):
    """GRU forward pass over a whole sequence (Keras semantics, gates z, r, h).

    Args are those of :func:`lstm_forward` with 3 gates, one state ``h0`` and:
        bias: [2, 3H] (input and recurrent bias) when ``reset_after``, else [3H]; or None.
        reset_after: apply the reset gate after the recurrent matmul (Keras default, cuDNN
            compatible) or before it.

    Returns:
        ``Forward(outputs, (h,), cache)``.

    Example::

        fwd = gru_forward(x, W, U, b, reset_after=True)
        grads = gru_backward(fwd.cache, d_outputs)
    """
    return _forward("gru", locals())


def gru_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a GRU forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    return _backward("gru", cache, d_outputs, [("d_h", d_h)])


# --------------------------------------------------------------------------- SimpleRNN
def simple_rnn_forward(x, kernel, recurrent_kernel, bias=None, h0=None, *, mask=None,
                       go_backwards=False, zero_output_for_mask=False, dropout_mask=None,
                       recurrent_dropout_mask=None, activation="tanh", training=True,
                       return_sequences=True, engine="auto", checkpoint_steps=None):
    """SimpleRNN forward pass: h_t = act((x_t * m) @ W + b + (h_{t-1} * r) @ U).

    Args are those of :func:`lstm_forward` with one gate and one state ``h0``; the dropout
    masks are [B, D] and [B, H] (one per sample, as Keras draws them).

    Returns:
        ``Forward(outputs, (h,), cache)``.

    Example::

        fwd = simple_rnn_forward(x, W, U, b, activation="relu")
        grads = simple_rnn_backward(fwd.cache, d_outputs)
    """
    return _forward("simple_rnn", locals())


def simple_rnn_backward(cache, d_outputs=None, d_h=None):
    """Gradients of a SimpleRNN forward pass; see :func:`lstm_backward`.

    Returns:
        ``Gradients(x, kernel, recurrent_kernel, bias, (dh0,))``.
    """
    return _backward("simple_rnn", cache, d_outputs, [("d_h", d_h)])


# --------------------------------------------------------------------------- the cells
Cell = namedtuple("Cell", ["name", "layer", "gates", "states", "forward", "backward"])
Cell.__doc__ = """What fastcells knows of one cell: its name ("lstm"), its Keras layer's
name ("LSTM"), its gates (the column blocks of the kernels), the names of its initial states,
and its forward and backward functions in this module."""

#: The cells, by name: the one table the bridges, the benchmarks and the warm-up use.
CELLS = {c.name: c for c in (
    Cell("lstm", "LSTM", 4, ("h0", "c0"), lstm_forward, lstm_backward),
    Cell("gru", "GRU", 3, ("h0",), gru_forward, gru_backward),
    Cell("simple_rnn", "SimpleRNN", 1, ("h0",), simple_rnn_forward, simple_rnn_backward),
)}
