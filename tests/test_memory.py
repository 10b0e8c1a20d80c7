"""Repeated calls keep the process's memory flat (workspace, cache store, TF bridge)."""
import os

import numpy as np
import tensorflow as tf

import fastcells
from fastcells import ops

CALLS = int(os.environ.get("FASTCELLS_MEMORY_CALLS", "10000"))


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_ops_forward_backward_do_not_grow():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 20, 8)).astype("float32")
    W = rng.standard_normal((8, 64)).astype("float32")
    U = rng.standard_normal((16, 64)).astype("float32")

    def step():
        f = ops.lstm_forward(x, W, U, None)
        ops.lstm_backward(f.cache, f.outputs)

    for _ in range(200):
        step()
    before = _rss_mb()
    for _ in range(CALLS):
        step()
    assert _rss_mb() - before < 20, f"RSS grew from {before:.0f} MB to {_rss_mb():.0f} MB"


def test_layer_training_steps_do_not_grow():
    layer = fastcells.GRU(16, return_sequences=True, engine="cpu")
    x = tf.constant(np.random.default_rng(1).standard_normal((8, 30, 4)).astype("float32"))
    layer.build(x.shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, layer.trainable_weights)

    for _ in range(100):
        step()
    before = _rss_mb()
    pending = len(fastcells.bridge.pending)
    for _ in range(CALLS // 4):
        step()
    assert len(fastcells.bridge.pending) == pending
    assert _rss_mb() - before < 20, f"RSS grew from {before:.0f} MB to {_rss_mb():.0f} MB"
