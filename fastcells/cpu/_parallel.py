"""Split a recurrence over threads by batch slices.

Every kernel is compiled with ``nogil=True`` and takes the first two arguments ``b0, b1``:
the batch rows it owns for the whole sequence. Rows never interact inside a recurrence, so
threads need no barrier per time step, and the result of a row does not depend on how many
threads ran (no reduction crosses rows here: the weight gradients are GEMMs done afterwards).

A private thread pool is used instead of Numba's ``prange`` so that calls from several
Python threads at once are safe whatever threading layer Numba has.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

from .. import config

_pool = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(workers):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcells")
            _pool_size = workers
        return _pool


def batch_slices(batch):
    """The [b0, b1) slices the batch is split into for ``config.NUM_THREADS`` threads."""
    chunks = max(1, min(config.NUM_THREADS, -(-batch // config.MIN_ROWS_PER_THREAD)))
    bounds = [batch * k // chunks for k in range(chunks + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(chunks) if bounds[k + 1] > bounds[k]]


def run_batch_parallel(kernel, batch, *args):
    """Call ``kernel(b0, b1, *args)`` for each batch slice, the slices in parallel."""
    slices = batch_slices(batch)
    if len(slices) <= 1:
        for b0, b1 in slices:
            kernel(b0, b1, *args)
        return
    pool = _executor(len(slices) - 1)
    futures = [pool.submit(kernel, b0, b1, *args) for b0, b1 in slices[1:]]
    b0, b1 = slices[0]
    kernel(b0, b1, *args)
    for f in futures:
        f.result()
