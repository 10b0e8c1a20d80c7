"""One of two processes of a multi-process JAX data-parallel run on 127.0.0.1
(``tests/test_deploy.py`` starts both)::

    KERAS_BACKEND=jax python tests/jax_multiprocess_check.py PROCESS_ID PORT

``keras.distribution.initialize`` joins the processes (``jax.distributed``, with gloo
collectives between the CPUs), a ``DataParallel`` distribution spans the devices of both,
and each process feeds its own half of every batch. The built-in model and the fastcells
model train in turn from the same weights; the process prints one JSON line with both loss
histories and the kernel counts.
"""
import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
import keras  # noqa: E402
import numpy as np  # noqa: E402

pid, port = int(sys.argv[1]), sys.argv[2]
keras.distribution.initialize(job_addresses=f"127.0.0.1:{port}", num_processes=2,
                              process_id=pid)

import fastcells  # noqa: E402
from fastcells import bridge  # noqa: E402

assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1, jax.devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(
    devices=jax.devices(), auto_shard_dataset=False))      # each process feeds its half
rng = np.random.default_rng(7)
x = rng.standard_normal((32, 12, 5)).astype("float32")
y = rng.standard_normal((32, 1)).astype("float32")
result = {}
for module in (keras.layers, fastcells):
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((12, 5)), module.LSTM(8, return_sequences=True),
                              module.GRU(6), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=True)
    bridge.kernel_calls.clear()
    h = model.fit(x[pid::2], y[pid::2], batch_size=8, epochs=3, shuffle=False, verbose=0)
    result[module.__name__] = h.history["loss"]
result["kernel_calls"] = dict(bridge.kernel_calls)
print("RESULT " + json.dumps(result), flush=True)
