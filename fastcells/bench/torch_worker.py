"""The PyTorch engine: ``torch.nn`` holding the Keras weights, and the worker process that
runs it away from the Keras backend and the fastcells kernels.

Run as a script, this file is the **torch worker**, importable on its own: NumPy, (lazily)
torch and the timing code of :mod:`fastcells.bench.timing` (loaded from its file), never
fastcells, Keras or TensorFlow.

- :func:`torch_case` builds ``torch.nn.LSTM/GRU/RNN`` holding the Keras weights, on the CPU
  or on a CUDA device (cuDNN), with :func:`keras_to_torch` / :func:`torch_grads_to_keras`;
- :func:`nvtx_range` marks a region for Nsight Systems / Nsight Compute (a no-op without a
  CUDA build of torch);
- :class:`TorchWorker`, the benchmark's side, starts the worker once per benchmark run so
  that ``torch.nn`` runs in a process of its own. In the process of TensorFlow and the
  fastcells kernels, the LSTM forward+backward of the IMDB shape took 340 ms per call
  instead of 62-81 ms alone, and torch's OpenMP threads competed with the engines measured
  after it.

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
:func:`fastcells.bench.timing.time_interleaved`); ``{"op": "close"}`` drops it (so does
the next case).

Started with ``--flush-denormal``, the worker flushes denormals in all of torch's threads
(as TensorFlow and the fastcells kernels do) before any work.

``inputs`` holds ``x`` [B, T, D] and ``w{layer}_{k}`` (kernel, recurrent_kernel, bias of each
layer, Keras layout); the worker writes ``y`` and ``g0``, ``g1``, ... (dx, then dW, dU, db of
each layer, Keras layout) to ``outputs``. End of input (or ``{"op": "exit"}``) ends it.
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types

if __name__ == "__main__":
    # run as a script, this file's folder (fastcells/bench/, which holds cpu.py, gpu.py,
    # ...) must not shadow top-level modules that torch or numpy may import
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import numpy as np  # noqa: E402

if __package__:
    from .timing import time_calls, timed
else:
    # a script: the timing code is loaded from its file, without the fastcells package (and
    # so without Keras or TensorFlow) in this process
    import importlib.util as _util
    _spec = _util.spec_from_file_location(
        "_fastcells_bench_timing", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "timing.py"))
    _timing = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_timing)
    time_calls, timed = _timing.time_calls, _timing.timed

#: Start of the worker's reply lines (anything else on its stdout is ignored).
REPLY_PREFIX = "FASTCELLS_TORCH "


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
def _gate_perm(cell, H, G):
    """Indices taking Keras's gate order to PyTorch's (GRU: z, r, h -> r, z, n), for G gates
    of H units (G from the weights' shapes: this module never imports fastcells)."""
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
    p = _gate_perm(cell, H, U.shape[1] // H)
    if cell == "gru":
        b_ih, b_hh = b[0][p], b[1][p]
    else:
        b_ih, b_hh = b[p], np.zeros_like(b)
    return [np.ascontiguousarray(a) for a in (W[:, p].T, U[:, p].T, b_ih, b_hh)]


def torch_grads_to_keras(cell, grads, H):
    """Inverse of :func:`keras_to_torch` for the gradients of one layer."""
    g_ih, g_hh, gb_ih, gb_hh = grads
    inv = np.argsort(_gate_perm(cell, H, g_hh.shape[0] // H))
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


# --------------------------------------------------------------------------- the client
class TorchWorker:
    """The PyTorch engine in a process of its own (this file run as a
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

        with TorchWorker() as worker:      # SHAPES and Settings: fastcells.bench
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
        cmd = [sys.executable, "-u", __file__]
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
            reply = parse_reply(line)
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
        from .timing import timing_kwargs
        from .workloads import make_inputs, make_weights
        weights = make_weights(cell, shape, settings.seed, settings.dtype)
        x = make_inputs(shape, settings.seed, settings.dtype)
        inputs = os.path.join(self._tmp.name, "inputs.npz")
        outputs = os.path.join(self._tmp.name, "outputs.npz")
        save_inputs(inputs, weights, x)
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
        out = load_outputs(outputs_path, int(reply.get("n_grads", 0)))
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




if __name__ == "__main__":
    sys.exit(main(argv=sys.argv[1:]))
