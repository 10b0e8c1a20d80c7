"""What this machine's cores reach on the kernels' two kinds of arithmetic, the products
against packed weights and the activations: the rates behind the benchmarks' compute floor
(``fastcells.bench.compute_floor``).

Both are measured the way the kernels run: every fastcells thread at once, each on data of
its own that stays in its core's caches, the best of a few short rounds.
"""
import math
import time

import numpy as np

from .. import config
from .._math import fast_tanh
from ._gemm import pack, packed_dot
from ._jit import kernel
from ._parallel import run_tasks


@kernel
def _repeat_dot(a, P, out, repeats):
    for _ in range(repeats):
        packed_dot(a, P, out)


@kernel
def _repeat_tanh(x, out, repeats):
    for _ in range(repeats):
        for i in range(x.shape[0]):
            out[i] = fast_tanh(x[i])


def _threads(threads):
    threads = config.NUM_THREADS if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _best_rate(run, args, work, threads, seconds, rounds):
    """Units of ``work`` per second of ``run(*args[i], repeats)`` on ``threads`` threads at
    once, ``repeats`` set for about ``seconds`` a round (by calls on this thread that grow
    until they take a quarter of that, the first one compiling)."""
    repeats = 1
    run(*args[0], repeats)
    while True:
        start = time.perf_counter()
        run(*args[0], repeats)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        repeats *= 4
    repeats = max(1, int(repeats * seconds / elapsed))
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        run_tasks([lambda a=a: run(*a, repeats) for a in args[:threads]])
        best = min(best, time.perf_counter() - start)
    return work * repeats * threads / best


def product_rate(dtype="float32", threads=None, rows=64, K=256, N=1024, seconds=0.05,
                 rounds=5):
    """FLOP/s (2 per multiply-add) of ``packed_dot`` on ``threads`` threads
    (``config.NUM_THREADS`` when None), each multiplying ``rows`` rows of its own by shared
    packed weights [K, N]. The default is a per-thread step of the stacked and medium
    workloads; the rate is the core's peak (one vector FMA per cycle) within a few %."""
    threads = _threads(threads)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    V = rng.standard_normal((K, N)).astype(dtype)
    P = pack(V)
    args = [(rng.standard_normal((rows, K)).astype(dtype), P, np.empty((rows, N), dtype))
            for _ in range(threads)]
    rate = _best_rate(_repeat_dot, args, 2.0 * rows * K * N, threads, seconds, rounds)
    a, _, out = args[0]
    if not np.allclose(out, a @ V, rtol=1e-3, atol=1e-3 * math.sqrt(K)):
        raise RuntimeError("packed_dot gave a wrong product: its rate would mean nothing")
    return rate


def activation_rate(dtype="float32", threads=None, n=4096, seconds=0.05, rounds=5):
    """tanh evaluations per second (``_math.fast_tanh``, what the kernels' gates and
    sigmoids run on) on ``threads`` threads at once, each over ``n`` values of its own."""
    threads = _threads(threads)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    args = [(rng.uniform(-6.0, 6.0, n).astype(dtype), np.empty(n, dtype))
            for _ in range(threads)]
    rate = _best_rate(_repeat_tanh, args, float(n), threads, seconds, rounds)
    x, out = args[0]
    if not np.allclose(out, np.tanh(x), rtol=0, atol=1e-6):
        raise RuntimeError("fast_tanh gave wrong values: its rate would mean nothing")
    return rate
