"""Bad input to fastcells.ops gets a clear ValueError/TypeError naming the argument and shapes."""
import re

import numpy as np
import pytest

from fastcells import ops


def _args(B=2, T=3, D=4, H=5, G=4, dtype=np.float32):
    rng = np.random.default_rng(0)
    return dict(x=rng.random((B, T, D)).astype(dtype), kernel=rng.random((D, G * H)).astype(dtype),
                recurrent_kernel=rng.random((H, G * H)).astype(dtype),
                bias=rng.random(G * H).astype(dtype))


def _call(**over):
    a = _args()
    a.update(over)
    return ops.lstm_forward(a.pop("x"), a.pop("kernel"), a.pop("recurrent_kernel"),
                            a.pop("bias"), **a)


@pytest.mark.parametrize("over, exc, pattern", [
    (dict(x=np.zeros((2, 3), np.float32)), ValueError, r"x must be 3-D .* got shape \(2, 3\)"),
    (dict(x=np.zeros((2, 0, 4), np.float32)), ValueError, r"no time steps .*\(2, 0, 4\)"),
    (dict(x=np.zeros((2, 3, 4), np.int64)), TypeError, r"x must be a float32 or float64 .*int64"),
    (dict(x=np.zeros((2, 3, 6), np.float32)), ValueError, r"kernel must have shape \(6, 20\), got \(4, 20\)"),
    (dict(kernel=np.zeros((4, 16), np.float32)), ValueError, r"kernel must have shape \(4, 20\), got \(4, 16\)"),
    (dict(recurrent_kernel=np.zeros((5, 5), np.float32)), ValueError, r"recurrent_kernel must have shape \(units, 4 \* units\), got \(5, 5\)"),
    (dict(recurrent_kernel=np.zeros((5, 20), np.int32)), TypeError, r"recurrent_kernel .*int32"),
    (dict(bias=np.zeros(7, np.float32)), ValueError, r"bias must have shape \(20,\), got \(7,\)"),
    (dict(h0=np.zeros((3, 5), np.float32)), ValueError, r"h0 must have shape .*\(2, 5\), got \(3, 5\)"),
    (dict(c0=np.zeros((2, 4), np.float32)), ValueError, r"c0 must have shape .*\(2, 5\), got \(2, 4\)"),
    (dict(mask=np.ones((2, 4), bool)), ValueError, r"mask must have shape .*\(2, 3\), got \(2, 4\)"),
    (dict(mask=np.array([["a"] * 3] * 2)), TypeError, r"mask must be boolean"),
    (dict(dropout_mask=np.ones((3, 2, 4), np.float32)), ValueError, r"dropout_mask must have shape .*got \(3, 2, 4\)"),
    (dict(recurrent_dropout_mask=np.ones((2, 4), np.float32)), ValueError, r"recurrent_dropout_mask .*got \(2, 4\)"),
    (dict(activation="softsign"), ValueError, r"activation='softsign' is not covered"),
    (dict(engine="gpu"), ValueError, r"engine must be one of .* got engine='gpu'"),
])
def test_lstm_forward_rejects_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


def test_gru_bias_shape_depends_on_reset_after():
    a = _args(G=3)
    with pytest.raises(ValueError, match=re.escape("bias must have shape (2, 15), got (15,)")):
        ops.gru_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], reset_after=True)
    f = ops.gru_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], reset_after=False)
    assert f.outputs.shape == (2, 3, 5)


def test_backward_rejects_bad_gradients_and_caches():
    a = _args()
    f = ops.lstm_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"])
    with pytest.raises(ValueError, match=r"d_outputs must have shape \(2, 3, 5\) or \(2, 5\), got \(2, 3\)"):
        ops.lstm_backward(f.cache, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"d_c must have shape .*got \(1, 5\)"):
        ops.lstm_backward(f.cache, None, None, np.zeros((1, 5), np.float32))
    with pytest.raises(TypeError, match=r"cache must be the cache returned by gru_forward"):
        ops.gru_backward(f.cache, None)
    inf = ops.lstm_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], training=False)
    with pytest.raises(TypeError, match="cache must be"):
        ops.lstm_backward(inf.cache, None)


def test_inputs_are_never_modified():
    a = _args()
    before = {k: v.copy() for k, v in a.items()}
    for arr in a.values():
        arr.setflags(write=False)          # read-only arrays are accepted
    f = ops.lstm_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"])
    ops.lstm_backward(f.cache, np.ones_like(f.outputs))
    for k in a:
        np.testing.assert_array_equal(a[k], before[k])


def _compiled_signatures():
    """Every (kernel, argument types) the CPU kernels have been compiled for so far."""
    import importlib
    import pkgutil

    import fastcells.cpu
    from fastcells.cpu._jit import CacheSafe
    seen = set()
    for info in pkgutil.iter_modules(fastcells.cpu.__path__):
        mod = importlib.import_module(f"fastcells.cpu.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CacheSafe):
                seen.update((mod.__name__, name, sig) for sig in obj.dispatcher.signatures)
    return seen


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_read_only_inputs_reuse_the_compiled_kernels(cell):
    """Read-only arrays (what JAX hands out) run the kernels compiled for writable ones:
    the same results, nothing compiled again, nothing written."""
    G = {"lstm": 4, "gru": 3, "simple_rnn": 1}[cell]
    a = _args(G=G)
    rng = np.random.default_rng(1)
    B, T, H = 2, 3, 5
    if cell == "gru":                            # reset_after: input and recurrent biases
        a["bias"] = rng.random((2, G * H)).astype(np.float32)
    states = [rng.random((B, H)).astype(np.float32) for _ in range(2 if cell == "lstm" else 1)]
    mask = np.ones((B, T), bool)
    mask[1, 2] = False
    dy = rng.random((B, T, H)).astype(np.float32)
    forward, backward = getattr(ops, f"{cell}_forward"), getattr(ops, f"{cell}_backward")

    def run(arrays, states):
        x, k, r, b, m, d = arrays
        f = forward(x, k, r, b, *states, mask=m, training=True, return_sequences=True)
        g = backward(f.cache, d, *states)       # the state gradients: any [B, H] arrays
        return [f.outputs, *f.states, g.x, g.kernel, g.recurrent_kernel, g.bias, *g.states]

    def frozen(arr):
        c = arr.copy()
        c.setflags(write=False)
        return c

    arrays = [a["x"], a["kernel"], a["recurrent_kernel"], a["bias"], mask, dy]
    want = run(arrays, states)
    compiled = _compiled_signatures()
    ro_arrays, ro_states = [frozen(x) for x in arrays], [frozen(s) for s in states]
    got = run(ro_arrays, ro_states)
    assert _compiled_signatures() == compiled, "read-only inputs compiled kernels again"
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)
    for x, ro in zip(arrays + states, ro_arrays + ro_states):
        np.testing.assert_array_equal(ro, x)
        assert not ro.flags.writeable


def test_mixed_float_dtypes_follow_x_and_layouts_are_accepted():
    a = _args(dtype=np.float64)
    x32 = np.asfortranarray(a["x"].astype(np.float32))
    f = ops.lstm_forward(x32, a["kernel"], a["recurrent_kernel"][:, ::1], a["bias"])
    assert f.outputs.dtype == np.float32
    ref = ops.lstm_forward(np.ascontiguousarray(x32), a["kernel"].astype(np.float32),
                           a["recurrent_kernel"].astype(np.float32), a["bias"].astype(np.float32))
    np.testing.assert_array_equal(f.outputs, ref.outputs)
    # a non-contiguous view of x reaches the kernels correctly
    big = np.zeros((2, 6, 4), np.float64)
    big[:, ::2] = a["x"]
    g = ops.lstm_forward(big[:, ::2], a["kernel"], a["recurrent_kernel"], a["bias"])
    h = ops.lstm_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"])
    np.testing.assert_array_equal(g.outputs, h.outputs)


def test_cuda_engine_without_a_gpu_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(ops, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="engine='cuda'"):
        _call(engine="cuda")


def test_caller_arrays_are_never_recycled_by_the_workspace():
    """Gradients passed in and results handed out are never reused as scratch memory."""
    a = _args(B=64, T=6, H=2048 // 4)      # d_outputs [B, H] of 1 MiB: above the pool's floor
    f = ops.lstm_forward(a["x"], a["kernel"], a["recurrent_kernel"], a["bias"])
    d_last = np.ones((64, 512), np.float32)
    g1 = ops.lstm_backward(f.cache, d_last)
    kept = [d_last.copy(), f.outputs.copy(), g1.x.copy()]
    for _ in range(3):                     # later calls must not write into them
        f2 = ops.lstm_forward(a["x"] * 2, a["kernel"], a["recurrent_kernel"], a["bias"])
        ops.lstm_backward(f2.cache, np.full((64, 512), 3, np.float32))
    for before, now in zip(kept, [d_last, f.outputs, g1.x]):
        np.testing.assert_array_equal(before, now)
