"""Split a recurrence over threads by batch slices.

Every kernel is compiled with ``nogil=True`` and takes the first two arguments ``b0, b1``:
the batch rows it owns for the whole sequence. Rows never interact inside a recurrence, so
threads need no barrier per time step, and the result of a row does not depend on how many
threads ran (no reduction crosses rows here: the weight gradients are GEMMs done afterwards).

A private thread pool is used instead of Numba's ``prange`` so that calls from several
Python threads at once are safe whatever threading layer Numba has.

BLAS is held to one thread for a whole op (``single_threaded_blas``) and the large GEMMs are
split over the same pool (``gemm``). A multithreaded BLAS next to our threads oversubscribes
the cores, and OpenBLAS workers keep spinning for a while after each GEMM, which can make
an LSTM backward several times to 40 times slower on 2 cores. GEMMs are
split by output rows or columns only, never along the summed dimension, so every result is
bit-identical whatever the number of threads.
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import config
from ._fpstate import init_worker_thread

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(workers):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcells",
                                       initializer=init_worker_thread)
            _pool_size = workers
        return _pool


def batch_slices(batch):
    """The [b0, b1) slices the batch is split into for ``config.NUM_THREADS`` threads."""
    chunks = max(1, min(config.NUM_THREADS, -(-batch // config.MIN_ROWS_PER_THREAD)))
    bounds = [batch * k // chunks for k in range(chunks + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(chunks) if bounds[k + 1] > bounds[k]]


class _SingleThreadedBlas:
    """Context: BLAS libraries at one thread; nested and concurrent uses are counted so that
    the first to enter saves the thread counts and the last to leave restores them.

    SciPy's OpenBLAS, the one Numba's ``np.dot`` calls inside the kernels, is an exception
    when ``config.HOLD_KERNEL_BLAS`` is set: it is set to one thread the first time and left
    there. Restoring its thread count after every call leaves an OpenBLAS worker spinning
    against the kernels of the next call, which inside a TensorFlow training loop makes an
    LSTM step 2 to 100 times slower (B=128 T=500 H=32, 2 cores).
    """

    def __init__(self):
        self._libs = None
        self._depth = 0
        self._saved = []
        self._lock = threading.Lock()

    def _controllers(self):
        if self._libs is None:
            try:
                import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls)
                from threadpoolctl import ThreadpoolController
                libs = [c for c in ThreadpoolController().lib_controllers
                        if c.user_api == "blas"]
            except Exception:  # threadpoolctl missing or a BLAS it cannot drive
                libs = []
            if config.HOLD_KERNEL_BLAS:
                for lib in libs:
                    if _is_scipy_blas(lib):
                        lib.set_num_threads(1)
                libs = [lib for lib in libs if not _is_scipy_blas(lib)]
            self._libs = libs
        return self._libs

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                libs = self._controllers()
                self._saved = [lib.num_threads for lib in libs]
                for lib in libs:
                    lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libs, self._saved):
                    lib.set_num_threads(n)


def _is_scipy_blas(lib):
    """True for the BLAS shipped with SciPy (what ``scipy.linalg.cython_blas`` binds)."""
    folder = os.path.basename(os.path.dirname(getattr(lib, "filepath", "") or ""))
    return folder in ("scipy.libs", "scipy", ".dylibs") and "scipy" in lib.filepath


single_threaded_blas = _SingleThreadedBlas()


def run_tasks(tasks):
    """Run callables on the pool (the first on this thread); returns their results."""
    if len(tasks) <= 1:
        return [t() for t in tasks]
    pool = _executor(len(tasks) - 1)
    futures = [pool.submit(t) for t in tasks[1:]]
    try:
        first = tasks[0]()
    finally:
        rest = [f.result() for f in futures]
    return [first] + rest


def _split(n, parts):
    bounds = [n * k // parts for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts) if bounds[k + 1] > bounds[k]]


def gemm(a, b, out=None):
    """``a @ b`` for 2-D arrays, split over the pool by rows of ``a`` (or by columns of ``b``
    when ``a`` has few rows, as in ``x^T @ dz``). Never splits the summed dimension."""
    M, N = a.shape[0], b.shape[1]
    if out is None:
        out = np.empty((M, N), np.result_type(a, b))
    parts = config.NUM_THREADS
    work = M * N * a.shape[1]
    if parts <= 1 or work < config.MIN_PARALLEL_GEMM_FLOPS:
        np.matmul(a, b, out=out)
        return out
    if M >= N:
        spans = _split(M, parts)
        tasks = [lambda r0=r0, r1=r1: np.matmul(a[r0:r1], b, out=out[r0:r1]) for r0, r1 in spans]
    else:
        spans = _split(N, parts)

        def column_block(c0, c1):
            out[:, c0:c1] = a @ b[:, c0:c1]
        tasks = [lambda c0=c0, c1=c1: column_block(c0, c1) for c0, c1 in spans]
    run_tasks(tasks)
    return out


def run_batch_parallel(kernel, batch, *args):
    """Call ``kernel(b0, b1, *args)`` for each batch slice, the slices in parallel."""
    _run_slices(kernel, batch_slices(batch), args)


def _run_slices(kernel, slices, args):
    if len(slices) <= 1:
        for b0, b1 in slices:
            kernel(b0, b1, *args)
        return
    with single_threaded_blas:
        run_tasks([lambda b0=b0, b1=b1: kernel(b0, b1, *args) for b0, b1 in slices])


def block_slices(batch, rows):
    """Thread slices made of whole blocks of ``rows`` batch rows (the last block may be
    short): the blocks, not the threads, define how the fused kernels sum over the batch."""
    nblocks = -(-batch // rows)
    parts = max(1, min(config.NUM_THREADS, nblocks))
    bounds = [min(batch, rows * (nblocks * k // parts)) for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts) if bounds[k + 1] > bounds[k]]


def run_block_parallel(kernel, batch, rows, *args):
    """Call ``kernel(b0, b1, *args)`` for slices of whole blocks, in parallel."""
    _run_slices(kernel, block_slices(batch, rows), args)
