"""The backward kernels of a first training call, compiled on another core while the forward
kernels compile here.

A training step that finds nothing in the kernel cache compiles its forward kernel, runs it,
then compiles its backward kernel: two compilations of 10-20 s each, one after the other,
on one core (Numba compiles under one lock per process). When the forward kernel of a CPU
training call starts compiling, this module starts a second Python process that compiles
the backward kernels the same call will need into the on-disk cache: it repeats the call on
a tiny batch with the same kind of arguments (cell, dtype, path, which masks and dropout
masks, ...), with its forward kernels replaced by ones that do nothing, so that it goes
straight to the backward. The backward of the real call waits for that process and loads
the kernels from the cache. Kernel types depend on the kinds of the arguments, never on
their sizes or values, so the tiny call compiles what the real one uses.

Nothing depends on it: if the process fails, is slow or compiles something else, the
backward compiles its kernels itself, as it would without it. It runs only where the kernels
are cached on disk (``config.NJIT_OPTIONS["cache"]``), only for a real compilation (a
process that loads its kernels from the cache starts nothing), and not at all with
``FASTCELLS_BACKGROUND_COMPILE=0``.
"""
import json
import os
import subprocess
import sys
import threading

from . import config

#: Seconds the backward waits for the process compiling its kernels, at most.
WAIT_SECONDS = 600

_lock = threading.Lock()
_pending = {}       # thread id -> spec of the CPU training forward running in that thread
_jobs = {}          # spec -> subprocess.Popen compiling its backward kernels
#: spec -> exit status of its compiling process (None: it did not finish in time), once
#: the backward has waited for it
finished = {}


def spec_of(p):
    """What decides the backward kernels of a prepared call (``_recurrence.Cache``), as the
    JSON text the compiling process reads."""
    def ndim(a):
        return None if a is None else int(a.ndim)
    return json.dumps(dict(
        cell=p.cell, dtype=p.dtype.name, fused=bool(p.fused or p.from_x),
        mask=p.mask is not None, dropout=ndim(p.dmask), recurrent_dropout=ndim(p.rmask),
        bias=p.bias_shape is not None, reset_after=p.opts.get("reset_after"),
        return_sequences=p.return_sequences, checkpoint=p.checkpoint is not None,
        go_backwards=p.opts["go_backwards"], zero_output=p.opts["zero_output"],
        fast=bool(p.fast)), sort_keys=True)


def enabled():
    return config.BACKGROUND_COMPILE and bool(config.NJIT_OPTIONS.get("cache"))


class training_forward:
    """Context of a CPU training forward: a forward kernel that starts compiling inside it
    starts the compilation of the matching backward kernels (:func:`forward_compiling`)."""

    def __init__(self, p, training):
        self.spec = spec_of(p) if training and p.eng.name == "cpu" and enabled() else None

    def __enter__(self):
        if self.spec is not None:
            with _lock:
                _pending[threading.get_ident()] = self.spec
        return self

    def __exit__(self, *exc):
        if self.spec is not None:
            with _lock:
                _pending.pop(threading.get_ident(), None)


def forward_compiling():
    """Called when a forward kernel starts compiling (in whichever thread runs it): start
    the backward's compilation for the training forwards running now, once per spec."""
    with _lock:
        todo = [s for s in set(_pending.values()) if s not in _jobs]
        for spec in todo:
            _jobs[spec] = None          # claimed: started once, even if it fails to start
    for spec in todo:
        try:
            proc = _start(spec)
        except OSError:                 # no process to be had: the backward compiles here
            proc = None
        with _lock:
            _jobs[spec] = proc


def _start(spec):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTCELLS_KERNELS_ONLY="1", FASTCELLS_BACKGROUND_COMPILE="0",
               FASTCELLS_COMPILE_NOTICE="0",
               PYTHONPATH=os.pathsep.join([here] + [p for p in
                                                    [os.environ.get("PYTHONPATH")] if p]))
    code = "import sys; from fastcells import _coldstart; _coldstart.compile_backward(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-c", code, spec], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait(p):
    """Before a backward: wait for the process compiling its kernels, if one was started.
    Returns its exit status (None when there was none or it did not finish in time)."""
    if not _jobs:
        return None
    spec = spec_of(p)
    with _lock:
        proc = _jobs.get(spec)
        if proc is not None:
            _jobs[spec] = False         # waited for: later backwards do not wait again
    if not proc:
        return None
    try:
        status = proc.wait(WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = None
    finished[spec] = status
    return status


def _no_forward(*args):
    """A forward kernel that computes nothing: the compiling process needs only the shapes
    and types of the forward's results."""


def compile_backward(spec, set_attr=setattr, backward=True):
    """In the compiling process: repeat the training call of ``spec`` on a tiny batch with
    no forward kernels (replaced through ``set_attr``), so that only its backward kernels
    compile, into the on-disk cache. Returns the forward's cache; ``backward=False`` stops
    there."""
    import numpy as np

    from . import ops
    from .cpu import gru, lstm, simple_rnn
    s = json.loads(spec)
    set_attr(config, "FUSED", s["fused"])
    for name in ("FAST_FLOAT32_ACTIVATIONS", "FAST_FLOAT64_ACTIVATIONS"):
        set_attr(config, name, s["fast"])
    for module in (lstm, gru, simple_rnn):
        for name in dir(module):
            if name.startswith("_forward") and name.endswith("kernel"):
                set_attr(module, name, _no_forward)
    cell = ops.CELLS[s["cell"]]
    G, ra = cell.gates, s["reset_after"]
    B, T, D, H = 3, 4, 5, 6
    dt = np.dtype(s["dtype"])

    def ones(*shape):
        return np.ones(shape, dt)

    def dropout(ndim, n):
        return None if ndim is None else ones(*((G, B, n) if ndim == 3 else (B, n)))

    options = dict(mask=np.ones((B, T), bool) if s["mask"] else None,
                   dropout_mask=dropout(s["dropout"], D),
                   recurrent_dropout_mask=dropout(s["recurrent_dropout"], H),
                   return_sequences=s["return_sequences"], go_backwards=s["go_backwards"],
                   zero_output_for_mask=s["zero_output"],
                   checkpoint_steps=2 if s["checkpoint"] else None, training=True)
    if ra is not None:
        options["reset_after"] = ra
    bias = (ones(2, G * H) if ra else ones(G * H)) if s["bias"] else None
    f = cell.forward(ones(B, T, D), ones(D, G * H), ones(H, G * H), bias, **options)
    if backward:
        cell.backward(f.cache, np.ones_like(f.outputs), *[ones(B, H)] * len(cell.states))
    return f.cache
