"""Compile the CPU kernels ahead of their first use, into Numba's on-disk cache.

A kernel is compiled the first time a process calls it with a new kind of argument (cell,
dtype, path) and kept on disk from then on, so that later processes load it in a fraction of
a second. :func:`warmup` compiles every kernel that the layers and ``fastcells.ops`` use on
this machine, so that a container image, a CI cache or a notebook server can be prepared
once::

    python -m fastcells warmup                      # every cell, float32 and float64
    python -m fastcells warmup --cells lstm,gru --dtypes float32

Each (cell, dtype, path) is compiled in a process of its own, ``jobs`` at a time (the
compiler holds one lock per process). The cache lives where Numba puts it:
``NUMBA_CACHE_DIR`` when it is set, else the ``__pycache__`` folders of the installed
package (or, where those are read-only, Numba's per-user cache folder). Set
``NUMBA_CACHE_DIR`` to the same folder for the warm-up and for the processes that use it.

Example::

    from fastcells import warmup
    warmup.warmup(cells=["lstm"], dtypes=["float32"])     # [(job, seconds), ...]
"""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from . import ops

#: The cells a warm-up can compile.
CELLS = tuple(ops.CELLS)
#: The dtypes a warm-up can compile.
DTYPES = ("float32", "float64")
#: The kernel paths of each cell: "fused" (the input projection inside each step, what a
#: layer uses while its weights stay near the core) and "unfused" (the projection as one
#: product before the recurrence: weights too large to stay near the core, per-gate
#: dropout, ``FASTCELLS_FUSED=0``).
PATHS = ("fused", "unfused")


def jobs_for(cells=CELLS, dtypes=DTYPES):
    """The ``(cell, dtype, path)`` jobs of a warm-up, in the order of ``CELLS`` (the
    longest to compile first)."""
    for name, allowed, given in (("cells", CELLS, cells), ("dtypes", DTYPES, dtypes)):
        bad = [v for v in given if v not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    return [(c, d, p) for c in CELLS if c in cells for d in dtypes for p in PATHS]


def run_job(cell, dtype, path):
    """Compile (or load) the kernels of one job in this process: training calls (forward
    and backward; with and without a mask, dropout masks and whole sequences) and an
    inference call, on a tiny batch. Which kernels a call reaches depends on the path
    (``config.FUSED``), the cell and the dtype, never on the sizes."""
    from . import config
    config.FUSED = path == "fused"
    G, n_states = ops.CELLS[cell].gates, len(ops.CELLS[cell].states)
    B, T, D, H = 3, 4, 5, 6
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    x = rng.standard_normal((B, T, D)).astype(dt)
    W = rng.standard_normal((D, G * H)).astype(dt)
    U = rng.standard_normal((H, G * H)).astype(dt)
    forward, backward = ops.CELLS[cell].forward, ops.CELLS[cell].backward
    rmask = dict(recurrent_dropout_mask=np.ones((G, B, H), dt))
    variants = [{}, dict(mask=np.ones((B, T), bool)), dict(return_sequences=True),
                dict(dropout_mask=np.ones((B, D), dt))]
    # recurrent dropout (and per-gate input dropout) take the LSTM off its fused path:
    # those calls belong to the unfused job
    if path == "unfused" or cell != "lstm":
        variants.append(dict(dropout_mask=np.ones((B, D), dt), **rmask))
    if path == "unfused":
        variants.append(dict(dropout_mask=np.ones((G, B, D), dt), **rmask))
    for reset_after in ((True, False) if cell == "gru" else (None,)):
        gru = {} if reset_after is None else dict(reset_after=reset_after)
        b = np.zeros((2, G * H) if reset_after else G * H, dt)
        for kw in variants:
            f = forward(x, W, U, b, training=True, **gru, **kw)
            backward(f.cache, np.ones_like(f.outputs), *[np.ones((B, H), dt)] * n_states)
        forward(x, W, U, b, training=False, **gru)


def warmup(cells=CELLS, dtypes=DTYPES, jobs=None, progress=True, stream=None):
    """Compile the kernels of every ``(cell, dtype, path)`` into the on-disk cache, each in
    a subprocess, ``jobs`` at a time (default: the number of CPUs). Prints a progress line
    per finished job to ``stream`` (stderr) when ``progress``. Returns ``[(job, seconds)]``;
    raises RuntimeError naming the job and its error output when a job fails (the jobs not
    started yet are dropped)."""
    stream = sys.stderr if stream is None else stream
    todo = jobs_for(cells, dtypes)
    # the kernels need no framework; each job compiles its own backward kernels
    env = dict(os.environ, FASTCELLS_KERNELS_ONLY="1", FASTCELLS_BACKGROUND_COMPILE="0")
    code = "import sys; from fastcells import warmup; warmup.run_job(*sys.argv[1:])"

    def compile_job(job):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, *job], env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if out.returncode != 0:
            raise RuntimeError(f"fastcells warmup: compiling {' '.join(job)} failed "
                               f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
        return job, time.perf_counter() - t0

    start, done = time.perf_counter(), []
    workers = max(1, int(jobs or os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(compile_job, job) for job in todo]
        try:
            for future in as_completed(futures):
                done.append(future.result())
                if progress:
                    n = len(done)
                    print(f"\r[{'#' * (20 * n // len(todo)):<20}] {n}/{len(todo)} "
                          f"{' '.join(done[-1][0])} ({done[-1][1]:.0f} s)", file=stream,
                          end="\n" if n == len(todo) else "", flush=True)
        finally:
            for future in futures:
                future.cancel()
    if progress:
        print(f"compiled {len(todo)} kernel sets in {time.perf_counter() - start:.0f} s; "
              f"cache: {cache_location()}", file=stream, flush=True)
    return done


def cache_location():
    """Where Numba keeps the kernels, in words: ``NUMBA_CACHE_DIR``, or the package's own
    ``__pycache__`` folders."""
    import numba
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    here = os.path.dirname(os.path.abspath(__file__))
    return f"the __pycache__ folders under {here} (NUMBA_CACHE_DIR is not set)"
