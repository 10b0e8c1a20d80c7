"""The PyTorch side of the benchmarks, importable on its own: NumPy and (lazily) torch only,
never fastcells, Keras or TensorFlow.

- :func:`time_interleaved` (and :func:`time_calls`, its one-engine form) is the timing
  routine of every engine, here so that the worker below times torch with the very same
  code (``fastcells.bench`` re-exports it);
- :func:`torch_case` builds ``torch.nn.LSTM/GRU/RNN`` holding the Keras weights, on the CPU
  or on a CUDA device (cuDNN), with :func:`keras_to_torch` / :func:`torch_grads_to_keras`;
- :func:`nvtx_range` marks a region for Nsight Systems / Nsight Compute (a no-op without a
  CUDA build of torch);
- run as a script, this file is the **torch worker**: ``fastcells.bench`` starts it once per
  benchmark run so that ``torch.nn`` runs in a process of its own. In the process of
  TensorFlow and the fastcells kernels, the LSTM forward+backward of the IMDB shape took
  340 ms per call instead of 62-81 ms alone, and torch's OpenMP threads competed with the
  engines measured after it.

Worker protocol (one JSON object per line on stdin; one reply line on stdout starting with
:data:`REPLY_PREFIX`)::

    {"op": "case", "cell": "lstm", "shape": {"batch": 128, "time": 500, "features": 32,
     "units": 32, "layers": 1, "return_sequences": false}, "mode": "train",
     "inputs": "/tmp/.../in.npz", "outputs": "/tmp/.../out.npz", "threads": null,
     "timing": {"repeats": 7, "warmup": 1, ...}}
    -> FASTCELLS_TORCH {"ok": true, "times": [...], "n_grads": 4, "info": {...}}
    -> FASTCELLS_TORCH {"ok": false, "error": "RuntimeError: ..."}

``"op": "open"`` (the same fields, no ``timing``) makes the first call, writes the outputs
and keeps the case open; ``{"op": "time", "calls": k}`` then times k calls of it (the reply's
``times``), so that the benchmark can alternate torch's calls with the other engines' (see
:func:`time_interleaved`); ``{"op": "close"}`` drops it (so does the next case).

Started with ``--flush-denormal``, the worker flushes denormals in all of torch's threads
(as TensorFlow and the fastcells kernels do) before any work.

``inputs`` holds ``x`` [B, T, D] and ``w{layer}_{k}`` (kernel, recurrent_kernel, bias of each
layer, Keras layout); the worker writes ``y`` and ``g0``, ``g1``, ... (dx, then dW, dU, db of
each layer, Keras layout) to ``outputs``. End of input (or ``{"op": "exit"}``) ends it.
"""
import contextlib
import json
import os
import sys
import time
import types

if __name__ == "__main__":
    # run as a script, this file's folder (fastcells/, which holds config.py, ops.py,
    # cuda/, ...) must not shadow top-level modules that torch or numpy may import
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import numpy as np  # noqa: E402

#: Start of the worker's reply lines (anything else on its stdout is ignored).
REPLY_PREFIX = "FASTCELLS_TORCH "

GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


# --------------------------------------------------------------------------- timing
def timed(fn, clock=time.perf_counter):
    """A timer (see :func:`time_interleaved`) of the callable ``fn``: ``timer(k)`` calls it
    k times and returns the k durations in seconds."""
    def timer(k):
        times = []
        for _ in range(k):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return times
    return timer


def time_calls(fn, repeats=7, warmup=1, max_seconds=None, min_repeats=3, min_seconds=0.0,
               max_repeats=500):
    """Call ``fn`` ``warmup`` times untimed, then time it: :func:`time_interleaved` with one
    engine. Returns the list of durations in seconds (``time.perf_counter``). A GPU engine's
    ``fn`` synchronises the device before it returns, so that the whole call is timed."""
    return time_interleaved([timed(fn)], repeats, warmup, max_seconds, min_repeats,
                            min_seconds, max_repeats)[0]


def time_interleaved(timers, repeats=7, warmup=1, max_seconds=None, min_repeats=3,
                     min_seconds=0.0, max_repeats=500, on_error=None, most_per_round=64,
                     rounds=None):
    """Time several engines in alternation, so that each one's calls spread over the same
    stretch of time.

    ``timers[i](k)`` makes k calls of engine i and returns their k durations (see
    :func:`timed`; the torch worker's timer runs them in its own process). Each engine first
    makes ``warmup`` untimed calls; then rounds follow, and in each round every engine makes
    about as many calls as fill the time of one call of the slowest (at most
    ``most_per_round``), from its median so far, the engines' order turning by one each round.

    Why: on a shared machine the speed of a core comes and goes in stretches of about a
    second (on the 2-core development machine, stretches where two threads ran a kernel at
    the speed of one, 64-67 ms against 35-37 ms a call). Timed one after the other, a
    stretch falls on one engine's calls and its ratio to the others is off by up to 2x;
    timed in alternation, it falls on every engine alike.

    Rounds go on until every engine has made at least ``repeats`` timed calls and spent
    ``min_seconds`` (so that a short call is repeated enough for a stable median); they stop
    early once an engine has made ``max_repeats`` calls, or once the slowest engine has spent
    ``max_seconds`` and every engine has made ``min(min_repeats, repeats)`` calls (so that
    a slow case does not take forever).

    A timer that raises is dropped from the rounds: ``on_error(i, exc)`` is called, or the
    exception propagates when ``on_error`` is None. Returns one list of durations per timer
    (empty for a dropped one). ``rounds``, a list, gets one dict per round: timer index ->
    the durations of that round (for ratios paired round by round).
    """
    n = len(timers)
    times = [[] for _ in range(n)]
    warm = [[] for _ in range(n)]
    live = list(range(n))

    def call(i, k):
        try:
            return timers[i](k)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(i, exc)
            live.remove(i)
            return None

    for i in list(live):
        if warmup > 0:
            warm[i] = call(i, warmup) or []
    first = max(1, repeats)
    r = 0
    while live:
        typical = {i: float(np.median(times[i] or warm[i])) if times[i] or warm[i]
                   else None for i in live}
        slowest = max((v for v in typical.values() if v is not None), default=None)
        order = live[r % len(live):] + live[:r % len(live)]
        this_round = {}
        for i in order:
            k = 1
            if slowest is not None and typical[i]:
                k = int(min(most_per_round, max(1, slowest / typical[i])))
            k = max(1, min(k, max_repeats - len(times[i])))
            got = call(i, k)
            if got is not None:
                this_round[i] = [float(t) for t in got]
                times[i] += this_round[i]
        if rounds is not None:
            rounds.append(this_round)
        r += 1
        if not live:
            break
        counts = [len(times[i]) for i in live]
        totals = [sum(times[i]) for i in live]
        if all(c >= first and t >= min_seconds for c, t in zip(counts, totals)):
            break
        if max(counts) >= max_repeats:
            break
        if (max_seconds is not None and max(totals) >= max_seconds
                and min(counts) >= min(min_repeats, first)):
            break
    return times


# --------------------------------------------------------------------------- NVTX
_NO_NVTX = (lambda name: None, lambda: None)
_nvtx = None


def _nvtx_functions():
    """(push, pop) of torch.cuda.nvtx when a CUDA build of torch sees a GPU, else no-ops."""
    global _nvtx
    if _nvtx is not None:
        return _nvtx
    torch = sys.modules.get("torch")            # never import torch just for this
    if torch is None:
        return _NO_NVTX                         # decided once torch is loaded
    _nvtx = _NO_NVTX
    try:
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push("fastcells-nvtx-probe")
            torch.cuda.nvtx.range_pop()
            _nvtx = (torch.cuda.nvtx.range_push, lambda: torch.cuda.nvtx.range_pop())
    except Exception:  # a CPU-only torch build has no NVTX: ranges are no-ops
        pass
    return _nvtx


@contextlib.contextmanager
def nvtx_range(name):
    """An NVTX push/pop range named ``name`` around the block (a no-op without a GPU).

    Example::

        with nvtx_range("fastcells-cuda"), nvtx_range("lstm forward"):
            ...
    """
    push, pop = _nvtx_functions()
    push(name)
    try:
        yield
    finally:
        pop()


# --------------------------------------------------------------------------- weights
def _gate_perm(cell, H):
    """Indices taking Keras's gate order to PyTorch's (GRU: z, r, h -> r, z, n)."""
    G = GATES[cell]
    if cell == "gru":
        order = (1, 0, 2)
    else:
        order = tuple(range(G))     # LSTM: i, f, c(g), o in both
    return np.concatenate([np.arange(k * H, (k + 1) * H) for k in order])


def keras_to_torch(cell, layer_weights):
    """Convert ``[kernel, recurrent_kernel, bias]`` of one Keras layer to the parameters of a
    PyTorch layer: ``[weight_ih, weight_hh, bias_ih, bias_hh]``."""
    W, U, b = layer_weights
    H = U.shape[0]
    p = _gate_perm(cell, H)
    if cell == "gru":
        b_ih, b_hh = b[0][p], b[1][p]
    else:
        b_ih, b_hh = b[p], np.zeros_like(b)
    return [np.ascontiguousarray(a) for a in (W[:, p].T, U[:, p].T, b_ih, b_hh)]


def torch_grads_to_keras(cell, grads, H):
    """Inverse of :func:`keras_to_torch` for the gradients of one layer."""
    g_ih, g_hh, gb_ih, gb_hh = grads
    inv = np.argsort(_gate_perm(cell, H))
    dW, dU = g_ih.T[:, inv], g_hh.T[:, inv]
    db = np.stack([gb_ih[inv], gb_hh[inv]]) if cell == "gru" else gb_ih[inv]
    return [dW, dU, db]


# --------------------------------------------------------------------------- the torch case
def torch_case(cell, shape, mode, weights, x_np, threads=None, device="cpu"):
    """``torch.nn.LSTM/GRU/RNN`` holding the Keras ``weights`` of every layer.

    shape: anything with ``features``, ``units``, ``layers`` and ``return_sequences``.
    Returns ``(run, fetch)``: ``run()`` is one call (inference, or forward plus the gradient
    of ``sum(outputs)`` with respect to the inputs and every weight), ending with a device
    synchronisation on CUDA; ``fetch(run())`` gives ``(outputs, grads)`` as NumPy arrays in the
    Keras layout (grads ``[dx, dW1, dU1, db1, ...]``, None in inference mode).
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "simple_rnn": torch.nn.RNN}[cell]
    tdtype = {"float32": torch.float32, "float64": torch.float64}[str(x_np.dtype)]
    module = cls(shape.features, shape.units, num_layers=shape.layers,
                 batch_first=True).to(device=dev, dtype=tdtype)
    with torch.no_grad():
        for layer, w in enumerate(weights):
            names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}", f"bias_ih_l{layer}",
                     f"bias_hh_l{layer}"]
            for name, value in zip(names, keras_to_torch(cell, w)):
                getattr(module, name).copy_(torch.from_numpy(value))
    if cuda:
        module.flatten_parameters()
    params = [getattr(module, f"{kind}_l{layer}") for layer in range(shape.layers)
              for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    x = torch.from_numpy(x_np).to(dev)
    name = "torch-cudnn" if cuda else "torch"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def select(out):
        return out if shape.return_sequences else out[:, -1]

    if mode == "forward":
        def run():
            with nvtx_range(name), nvtx_range(f"{cell} forward"), torch.inference_mode():
                out = select(module(x)[0]), ()
            sync()
            return out
    else:
        xg = x.clone().requires_grad_(True)

        def run():
            with nvtx_range(name):
                with nvtx_range(f"{cell} forward"):
                    y = select(module(xg)[0])
                with nvtx_range(f"{cell} backward"):
                    grads = torch.autograd.grad(y.sum(), [xg] + params)
            sync()
            return y, grads

    def fetch(out):
        y, grads = out
        y = y.detach().cpu().numpy()
        if mode == "forward":
            return y, None
        g = [t.detach().cpu().numpy() for t in grads]
        keras_grads = [g[0]]
        for layer in range(shape.layers):
            keras_grads += torch_grads_to_keras(cell, g[1 + 4 * layer:5 + 4 * layer],
                                                shape.units)
        return y, keras_grads

    return run, fetch


# --------------------------------------------------------------------------- the worker
def save_inputs(path, weights, x):
    """Write a case's inputs for the worker: ``x`` and ``w{layer}_{k}``."""
    arrays = {"x": x}
    for i, w in enumerate(weights):
        for k, a in enumerate(w):
            arrays[f"w{i}_{k}"] = a
    np.savez(path, **arrays)


def load_inputs(path):
    """Inverse of :func:`save_inputs`: ``(weights, x)``."""
    with np.load(path) as f:
        x = f["x"]
        weights = []
        i = 0
        while f"w{i}_0" in f.files:
            weights.append([f[f"w{i}_{k}"] for k in range(3)])
            i += 1
    return weights, x


def load_outputs(path, n_grads):
    """The ``(outputs, grads)`` a worker wrote (grads None when ``n_grads`` is 0)."""
    with np.load(path) as f:
        y = f["y"]
        grads = [f[f"g{k}"] for k in range(n_grads)] if n_grads else None
    return y, grads


def parse_reply(line):
    """The reply of one worker line (a dict), or None for a line that is not a reply."""
    if not line.startswith(REPLY_PREFIX):
        return None
    reply = json.loads(line[len(REPLY_PREFIX):])
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ValueError(f"malformed worker reply: {line.strip()[:200]}")
    return reply


def flush_denormals():
    """Flush denormal floats to zero in torch's CPU threads, as TensorFlow and the fastcells
    kernels run theirs.

    ``torch.set_flush_denormal`` sets the calling thread only, and threads inherit the
    setting when they are created: called before torch starts its thread pool, it covers
    every thread. It matters: the IMDB-shape LSTM backward (gradients fading over 500 steps)
    took 360 ms with denormals and 75 ms without, on 2 threads.
    """
    import torch
    return bool(torch.set_flush_denormal(True))


def worker_info():
    """What the report records about the worker's torch."""
    import torch
    return dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                flush_denormal=_flushed, pid=os.getpid())


_flushed = False


_open = None          # the run() of the case an "open" request left open


def handle(request):
    """Run one request of the worker protocol; returns the reply (a dict)."""
    global _open
    op = request.get("op", "case")
    if op == "time":
        if _open is None:
            raise RuntimeError("no open case to time")
        return dict(ok=True, times=timed(_open)(int(request.get("calls", 1))))
    if op == "close":
        _open = None
        return dict(ok=True)
    if op not in ("case", "open"):
        raise ValueError(f"unknown op {op!r}")
    _open = None
    shape = types.SimpleNamespace(**request["shape"])
    weights, x = load_inputs(request["inputs"])
    run, fetch = torch_case(request["cell"], shape, request["mode"], weights, x,
                            request.get("threads"))
    y, grads = fetch(run())          # first call, outside the timing
    arrays = {"y": y}
    for k, g in enumerate(grads or ()):
        arrays[f"g{k}"] = g
    np.savez(request["outputs"], **arrays)
    n_grads = len(grads or ())
    del y, grads, arrays
    if op == "open":
        _open = run
        return dict(ok=True, times=[], n_grads=n_grads, info=worker_info())
    times = time_calls(run, **request["timing"])
    return dict(ok=True, times=times, n_grads=n_grads, info=worker_info())


def main(stdin=None, stdout=None, argv=()):
    """The worker loop: one request per line in, one reply per line out. ``argv``:
    ``--flush-denormal`` flushes denormals in every torch thread (see
    :func:`flush_denormals`), before any work."""
    global _flushed
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if "--flush-denormal" in argv:
        _flushed = flush_denormals()
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
            if request.get("op") == "exit":
                break
            reply = handle(request)
        except Exception as exc:  # sent back: the benchmark reports it and goes on
            reply = dict(ok=False, error=f"{type(exc).__name__}: {exc}")
        stdout.write(REPLY_PREFIX + json.dumps(reply) + "\n")
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
