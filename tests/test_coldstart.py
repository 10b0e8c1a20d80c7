"""A cold training call compiles its backward kernels in a second process
(``fastcells._coldstart``): the right ones, and never at the cost of a result."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastcells import _coldstart, config, ops

import reference as R

COLD = """
import json
import numpy as np
from numba.core import event
from fastcells import _coldstart, ops
compiled = []
class Seen(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        compiled.append(f.__module__ + "." + f.__name__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
rng = np.random.default_rng(3)
x = rng.standard_normal((5, 7, 3)).astype(np.float32)
W = rng.standard_normal((3, 4)).astype(np.float32)
U = (0.5 * rng.standard_normal((4, 4))).astype(np.float32)
b = rng.standard_normal(4).astype(np.float32)
dy = rng.standard_normal((5, 4)).astype(np.float32)
f = ops.simple_rnn_forward(x, W, U, b, training=True)     # the cell that compiles fastest
g = ops.simple_rnn_backward(f.cache, dy)
print("RESULT " + json.dumps(dict(
    compiled=[c for c in compiled if c.startswith("fastcells.cpu.")],
    finished=list(_coldstart.finished.values()),
    outputs=f.outputs.tolist(), dx=g.x.tolist(), dW=g.kernel.tolist(),
    dU=g.recurrent_kernel.tolist(), db=g.bias.tolist())))
"""


def _cold_run(tmp_path, **env):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTCELLS_KERNELS_ONLY="1", **env)
    out = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, out.stdout
    return json.loads(line[0][len("RESULT "):])


def test_a_cold_training_call_loads_its_backward_compiled_by_a_second_process(tmp_path):
    """With an empty kernel cache, the process compiles its forward kernel only; the
    backward kernel comes from the second process through the cache, and the gradients
    are those of the NumPy reference."""
    r = _cold_run(tmp_path)
    assert r["finished"] == [0], r
    assert any(".simple_rnn._forward" in c for c in r["compiled"]), r["compiled"]
    assert not [c for c in r["compiled"] if "_backward" in c], r["compiled"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7, 3)).astype(np.float32)
    W = rng.standard_normal((3, 4)).astype(np.float32)
    U = (0.5 * rng.standard_normal((4, 4))).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    dy = rng.standard_normal((5, 4)).astype(np.float32)
    d_outputs = np.zeros((5, 7, 4))
    d_outputs[:, -1] = dy                           # the gradient of the last output only
    want = R.simple_rnn_backward(x, W, U, b, np.zeros((5, 4)), d_outputs=d_outputs)
    for name, key in (("dx", "x"), ("dW", "kernel"), ("dU", "recurrent_kernel"),
                      ("db", "bias")):
        np.testing.assert_allclose(np.array(r[name]), want[key], rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_off_the_backward_compiles_in_the_process_itself(tmp_path):
    r = _cold_run(tmp_path, FASTCELLS_BACKGROUND_COMPILE="0")
    assert r["finished"] == []
    assert [c for c in r["compiled"] if ".simple_rnn._backward" in c], r["compiled"]


def _arrays(cell, B=2, T=3, D=4, H=5, dtype=np.float32):
    G = ops.CELLS[cell].gates
    rng = np.random.default_rng(0)
    return (rng.standard_normal((B, T, D)).astype(dtype),
            rng.standard_normal((D, G * H)).astype(dtype),
            rng.standard_normal((H, G * H)).astype(dtype))


VARIANTS = [
    ("lstm", {}), ("lstm", dict(mask=True, go_backwards=True, return_sequences=True)),
    ("lstm", dict(recurrent_dropout=3, dropout=3)), ("lstm", dict(dropout=2, bias=False)),
    ("lstm", dict(checkpoint=True, dtype=np.float64)), ("gru", {}),
    ("gru", dict(reset_after=False, zero_output=True, mask=True)),
    ("gru", dict(recurrent_dropout=3)), ("simple_rnn", dict(dropout=2, recurrent_dropout=2)),
]


@pytest.mark.parametrize("cell, kw", VARIANTS)
def test_the_tiny_call_has_the_spec_of_the_call_it_stands_for(cell, kw, monkeypatch):
    """The second process's tiny call (forward kernels replaced, so nothing compiles here)
    reaches the backward with the same kinds of arguments as the call it stands for: the
    same path, masks, dropout masks, bias, options and dtype."""
    dtype = kw.get("dtype", np.float32)
    x, W, U = _arrays(cell, dtype=dtype)
    B, T, D = x.shape
    H, G = U.shape[0], ops.CELLS[cell].gates
    ra = kw.get("reset_after", True)
    options = dict(mask=(np.ones((B, T), bool) if kw.get("mask") else None),
                   dropout_mask=None, recurrent_dropout_mask=None, training=True,
                   go_backwards=kw.get("go_backwards", False),
                   return_sequences=kw.get("return_sequences", False),
                   zero_output_for_mask=kw.get("zero_output", False),
                   checkpoint_steps=2 if kw.get("checkpoint") else None)
    for key, n in (("dropout", D), ("recurrent_dropout", H)):
        if key in kw:
            shape = (G, B, n) if kw[key] == 3 else (B, n)
            options[key + "_mask"] = np.ones(shape, dtype)
    if cell == "gru":
        options["reset_after"] = ra
    bias = None
    if kw.get("bias", True):
        bias = np.zeros((2, G * H) if cell == "gru" and ra else G * H, dtype)
    p = ops._prepare(cell, x, W, U, bias, (), options)
    spec = _coldstart.spec_of(p)
    tiny = _coldstart.compile_backward(spec, monkeypatch.setattr, backward=False)
    assert _coldstart.spec_of(tiny) == spec


def test_one_process_per_kind_of_call_and_none_outside_training(monkeypatch):
    started = []
    monkeypatch.setattr(_coldstart, "_start", lambda spec: started.append(spec) or None)
    monkeypatch.setattr(_coldstart, "_jobs", {})
    monkeypatch.setattr(config, "BACKGROUND_COMPILE", True)
    x, W, U = _arrays("gru")
    p = ops._prepare("gru", x, W, U, None, (), dict(training=True))
    with _coldstart.training_forward(p, False):     # inference: nothing to prepare for
        _coldstart.forward_compiling()
    assert started == []
    for _ in range(2):
        with _coldstart.training_forward(p, True):
            _coldstart.forward_compiling()
            _coldstart.forward_compiling()
    assert started == [_coldstart.spec_of(p)]
    _coldstart.forward_compiling()                  # outside a training forward
    assert len(started) == 1
    monkeypatch.setattr(config, "BACKGROUND_COMPILE", False)
    with _coldstart.training_forward(p, True) as ctx:
        assert ctx.spec is None


def test_a_failed_compiling_process_costs_nothing_but_the_wait(monkeypatch):
    """The backward waits for a process that fails, then computes what it computes
    without one."""
    x, W, U = _arrays("simple_rnn")
    dy = np.ones((x.shape[0], U.shape[0]), np.float32)
    want = ops.simple_rnn_backward(ops.simple_rnn_forward(x, W, U, None, training=True).cache,
                                   dy)
    f = ops.simple_rnn_forward(x, W, U, None, training=True)
    spec = _coldstart.spec_of(f.cache)
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(_coldstart, "_jobs", {spec: failing})
    monkeypatch.setattr(_coldstart, "finished", {})
    got = ops.simple_rnn_backward(f.cache, dy)
    assert _coldstart.finished == {spec: 3}
    assert _coldstart._jobs[spec] is False          # waited for once
    for a, b in zip(got[:4], want[:4]):
        np.testing.assert_array_equal(a, b)
