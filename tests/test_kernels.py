"""fastcells.ops (the Numba kernels) against the NumPy reference."""
import numpy as np
import pytest

import reference as R
from fastcells import config, ops
from fastcells.bench import relative_error
from fastcells.cpu._gemm import strip_width
from helpers import GATES, make_problem, random_mask

CELLS = ["lstm", "gru", "gru_rb", "simple_rnn"]
SHAPES = [(1, 1, 1, 1), (1, 7, 3, 5), (5, 1, 4, 3), (17, 13, 7, 11), (3, 500, 3, 5)]
OPTIONS = {
    "plain": dict(),
    "mask_backwards": dict(use_mask=True, go_backwards=True),
    "mask_zero_output": dict(use_mask=True, zero_output_for_mask=True),
    "dropout": dict(dropout=True, recurrent_dropout=True, use_mask=True),
    "shared_dropout": dict(dropout=True, per_gate=False),
    "no_bias_last_only": dict(bias=False, return_sequences=False),
    "relu_hard_sigmoid": dict(activation="relu", recurrent_activation="hard_sigmoid"),
}


@pytest.fixture(autouse=True)
def several_threads(monkeypatch):
    # several batch slices even for small batches, so slicing is exercised
    monkeypatch.setattr(config, "MIN_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(config, "NUM_THREADS", 3)
    # fused kernels: several batch blocks (the last one short) and windows of steps
    monkeypatch.setattr(config, "BLOCK_ROWS", 4)
    monkeypatch.setattr(config, "WINDOW_STEPS", 3)
    # inputs staged a few steps at a time (chunks of 1-3 steps at these sizes, the last short)
    monkeypatch.setattr(config, "STAGE_BYTES", 200)


def _split(cell):
    return ("gru", False) if cell == "gru_rb" else (cell, True)


def run_both(rng, cell, shape, option, dtype=np.float64):
    cell, reset_after = _split(cell)
    B, T, D, H = shape
    o = dict(OPTIONS[option])
    mask = random_mask(rng, B, T) if o.pop("use_mask", False) else None
    p, opts = make_problem(rng, cell, B, T, D, H, bias=o.pop("bias", True),
                           reset_after=reset_after, mask=mask, dropout=o.pop("dropout", False),
                           recurrent_dropout=o.pop("recurrent_dropout", False),
                           per_gate=o.pop("per_gate", True), dtype=dtype)
    return_sequences = o.pop("return_sequences", True)
    if cell == "simple_rnn":
        o.pop("recurrent_activation", None)
    opts.update(o)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    fwd = getattr(ops, cell + "_forward")(*args, return_sequences=return_sequences, **opts)
    yr, sr = getattr(R, cell + "_forward")(*args, **opts)
    dy = rng.standard_normal(yr.shape)
    if not return_sequences:
        yr, dy = yr[:, -1], dy[:, -1]
    ds = [rng.standard_normal(s.shape) for s in sr]
    g = getattr(ops, cell + "_backward")(fwd.cache, dy.astype(dtype),
                                         *[d.astype(dtype) for d in ds])
    if not return_sequences:
        full = np.zeros((B, T, H))
        full[:, -1] = dy
        dy = full
    gr = getattr(R, cell + "_backward")(*args, d_outputs=dy, d_states=ds, **opts)
    got = dict(outputs=fwd.outputs, x=g.x, kernel=g.kernel,
               recurrent_kernel=g.recurrent_kernel, bias=g.bias)
    want = dict(outputs=yr, x=gr["x"], kernel=gr["kernel"],
                recurrent_kernel=gr["recurrent_kernel"], bias=gr["bias"])
    for k, (a, b) in enumerate(zip(fwd.states, sr)):
        got[f"state{k}"], want[f"state{k}"] = a, b
    for k, (a, b) in enumerate(zip(g.states, gr["states"])):
        got[f"d_state{k}"], want[f"d_state{k}"] = a, b
    return got, want


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cell", CELLS)
def test_float64_equals_reference(cell, shape, option, rng):
    got, want = run_both(rng, cell, shape, option)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == np.float64, name
        assert got[name].shape == want[name].shape, name
        err = np.abs(got[name] - want[name]).max() if want[name].size else 0.0
        assert err <= 1e-10, f"{name}: max abs error {err:.3e}"


@pytest.mark.parametrize("option", ["plain", "mask_backwards", "dropout", "shared_dropout"])
@pytest.mark.parametrize("cell", CELLS)
def test_float64_fast_and_libm_activations_agree_to_rounding(cell, option, monkeypatch):
    """float64 kernels compute tanh and sigmoid in plain arithmetic (``_math.tanh64``, the
    default, checked against the reference above); with FAST_FLOAT64_ACTIVATIONS off they
    call libm per element. The two give the same outputs and gradients to rounding."""
    shape = (6, 40, 5, 7)
    got, _ = run_both(np.random.default_rng(7), cell, shape, option)
    monkeypatch.setattr(config, "FAST_FLOAT64_ACTIVATIONS", False)
    exact, want = run_both(np.random.default_rng(7), cell, shape, option)
    for name in want:
        if want[name] is None:
            continue
        np.testing.assert_allclose(got[name], exact[name], rtol=0, atol=1e-13, err_msg=name)
        err = np.abs(exact[name] - want[name]).max()
        assert err <= 1e-10, f"{name} (libm activations): max abs error {err:.3e}"


@pytest.mark.parametrize("option", ["plain", "mask_backwards", "dropout", "shared_dropout",
                                    "no_bias_last_only"])
@pytest.mark.parametrize("cell", CELLS)
def test_input_of_whole_strips_equals_reference(cell, option, rng):
    """D a whole number of packed strips (32 and 64 at the imdb and stacked shapes): the
    fused backward writes the dx and dh halves of its in-step product straight into place
    where no dropout mask multiplies them and no row of the block is masked, and copies
    them otherwise (blocks of 4 rows, some with masked rows, in the same call)."""
    got, want = run_both(rng, cell, (9, 11, 2 * strip_width(np.float64), 5), option)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        err = np.abs(got[name] - want[name]).max()
        assert err <= 1e-10, f"{name}: max abs error {err:.3e}"


@pytest.mark.parametrize("option", ["plain", "mask_backwards", "dropout"])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_close_to_reference(cell, option, rng):
    """float32 kernels (fast activations) against the float64 reference, T=500."""
    got, want = run_both(rng, cell, (4, 500, 6, 9), option, dtype=np.float32)
    for name in want:
        if want[name] is None:
            continue
        assert got[name].dtype == np.float32
        if name in ("outputs",) or name.startswith("state"):
            err = np.abs(got[name] - want[name]).max()
            assert err <= 1e-5, f"{name}: max abs error {err:.3e}"
        else:
            err = relative_error(got[name], want[name])
            assert err <= 1e-4, f"{name}: error relative to the norm {err:.3e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_results_do_not_depend_on_thread_count(cell, dtype, rng, monkeypatch):
    """Bit-identical outputs and gradients for 1, 2 and 5 threads."""
    p, opts = make_problem(rng, cell, 13, 20, 4, 6, mask=random_mask(rng, 13, 20), dtype=dtype)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    results = []
    for threads in (1, 2, 5):
        monkeypatch.setattr(config, "NUM_THREADS", threads)
        f = getattr(ops, cell + "_forward")(*args, **opts)
        g = getattr(ops, cell + "_backward")(f.cache, np.ones_like(f.outputs))
        results.append([f.outputs, *f.states, g.x, g.kernel, g.recurrent_kernel])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)      # bit for bit


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_inference_keeps_no_cache_and_ignores_dropout(cell, rng):
    p, opts = make_problem(rng, cell, 3, 5, 4, 2, dropout=True, recurrent_dropout=True)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, training=False, **opts)
    assert f.cache is None
    opts.pop("dropout_mask"), opts.pop("recurrent_dropout_mask")
    yr, _ = getattr(R, cell + "_forward")(*args, **opts)
    np.testing.assert_allclose(f.outputs, yr, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_empty_batch(cell, rng):
    p, opts = make_problem(rng, cell, 0, 4, 3, 5)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts)
    assert f.outputs.shape == (0, 4, 5)
    assert all(s.shape == (0, 5) for s in f.states)
    g = getattr(ops, cell + "_backward")(f.cache, np.zeros((0, 4, 5)))
    assert g.x.shape == (0, 4, 3) and g.kernel.shape == p["kernel"].shape
    assert not g.kernel.any()


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_rebuilt_cache_gives_the_same_gradients(cell, rng):
    p, opts = make_problem(rng, cell, 4, 6, 3, 5, mask=random_mask(rng, 4, 6), dropout=True)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts)
    dy = rng.standard_normal(f.outputs.shape)
    g1 = getattr(ops, cell + "_backward")(f.cache, dy)
    for kcache in (ops.cache_arrays(f.cache), None):     # None: recompute the forward
        c = ops.rebuild_cache(cell, kcache, *args, **opts)
        g2 = getattr(ops, cell + "_backward")(c, dy)
        np.testing.assert_array_equal(g1.kernel, g2.kernel)
        np.testing.assert_array_equal(g1.x, g2.x)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_nan_and_inf_propagate(cell, rng):
    p, opts = make_problem(rng, cell, 3, 4, 2, 3, dtype=np.float32)
    p["x"][0, 1, 0] = np.nan
    p["x"][1, 2, 1] = np.inf
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts)
    assert np.isnan(f.outputs[0, 1:]).all()              # NaN from step 1 on
    assert np.isfinite(f.outputs[0, 0]).all() and np.isfinite(f.outputs[2]).all()
    with np.errstate(invalid="ignore"):
        yr, _ = getattr(R, cell + "_forward")(*args, **opts)
    np.testing.assert_array_equal(np.isnan(f.outputs), np.isnan(yr))


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_long_sequences_match_reference(cell, rng):
    """T=10,000 forward and backward, T=100,000 forward, float64, against the reference."""
    p, opts = make_problem(rng, cell, 2, 10_000, 2, 3, scale=0.4)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts)
    yr, _ = getattr(R, cell + "_forward")(*args, **opts)
    np.testing.assert_allclose(f.outputs, yr, atol=1e-10, rtol=0)
    dy = rng.standard_normal(yr.shape)
    g = getattr(ops, cell + "_backward")(f.cache, dy)
    gr = getattr(R, cell + "_backward")(*args, d_outputs=dy, **opts)
    for a, b in [(g.x, gr["x"]), (g.kernel, gr["kernel"]),
                 (g.recurrent_kernel, gr["recurrent_kernel"])]:
        assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max())
    p, opts = make_problem(rng, cell, 1, 100_000, 2, 3, scale=0.4)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, training=False, return_sequences=False, **opts)
    yr, _ = getattr(R, cell + "_forward")(*args, **opts)
    np.testing.assert_allclose(f.outputs, yr[:, -1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("option", ["plain", "mask_backwards", "shared_dropout",
                                    "no_bias_last_only"])
@pytest.mark.parametrize("cell", CELLS)
def test_unfused_paths_match_the_reference(cell, option, rng, monkeypatch):
    """The paths with the projection as one GEMM before the loop (what large weights use)."""
    monkeypatch.setattr(config, "FUSED", False)
    got, want = run_both(rng, cell, (17, 13, 7, 11), option)
    for name in want:
        if want[name] is not None:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-10,
                                       err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_large_weights_take_the_unfused_path(cell, dtype, rng, monkeypatch):
    """The projection moves into the step exactly while [W; U; b], what each fused step
    multiplies by, fits in FUSED_MAX_WEIGHT_BYTES, for every cell."""
    cell, reset_after = _split(cell)
    D, H = 5, 6
    p, _ = make_problem(rng, cell, 3, 4, D, H, reset_after=reset_after, dtype=dtype)
    G = GATES[cell]
    size = (D + H + 1) * G * H * np.dtype(dtype).itemsize
    forward = getattr(ops, cell + "_forward")
    kw = {} if cell != "gru" else dict(reset_after=reset_after)
    for limit, fused in ((size - 1, False), (size, True)):
        monkeypatch.setattr(config, "FUSED_MAX_WEIGHT_BYTES", limit)
        f = forward(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], **kw)
        assert (f.cache.fused or f.cache.from_x) == fused, (limit, size)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("option", ["plain", "dropout", "shared_dropout", "no_bias_last_only"])
@pytest.mark.parametrize("cell", CELLS)
def test_large_results_start_on_64_byte_boundaries(cell, option, fused, rng, monkeypatch):
    """TensorFlow's numpy_function adopts a result this aligned as its tensor and copies any
    other (NumPy aligns to 16 bytes): outputs, input and weight gradients are made so."""
    monkeypatch.setattr(config, "FUSED", fused)
    got, _ = run_both(rng, cell, (5, 7, 3, 4), option, dtype=np.float32)
    for name in ("outputs", "x", "kernel", "recurrent_kernel"):
        a = got[name]
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0, (name, a.ctypes.data % 64)
