"""Calls from several Python threads at once give the results of the same calls one after
the other (the thread pool, workspace, cache store and BLAS hold are shared state)."""
import threading

import numpy as np
import pytest

from fastcells import ops
from helpers import make_problem, random_mask


def _work(cell, seed):
    rng = np.random.default_rng(seed)
    p, opts = make_problem(rng, cell, 24, 40, 5, 16, mask=random_mask(rng, 24, 40),
                           dtype=np.float32)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts)
    g = getattr(ops, cell + "_backward")(f.cache, np.ones_like(f.outputs))
    ops.release_cache(f.cache)
    return [f.outputs, *f.states, g.x, g.kernel, g.recurrent_kernel, g.bias]


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_two_threads_equal_sequential(cell):
    seeds = list(range(6))
    sequential = {s: _work(cell, s) for s in seeds}
    results, errors = {}, []

    def worker(my_seeds):
        try:
            for _ in range(3):
                for s in my_seeds:
                    results.setdefault(s, []).append(_work(cell, s))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seeds[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in seeds:
        for run in results[s]:
            for a, b in zip(sequential[s], run):
                np.testing.assert_array_equal(a, b)
