"""fastcells.ops with engine="cuda" (and "auto" on device arrays) against engine="cpu".

Without a GPU this runs under Numba's CUDA simulator (tests/conftest.py) on tiny shapes with
the launch tunables patched small, so several blocks take part; on a GPU the same tests run
with the default tunables.
"""
import contextlib

import numba
import numpy as np
import pytest

from fastcells import _validate, config, ops
from helpers import CUDA_SMALL_TUNABLES, NSTATES, make_problem, needs_cuda, random_mask

pytestmark = needs_cuda
if ops.cuda_available():
    from numba import cuda

SIM = bool(numba.config.ENABLE_CUDASIM)
OPTIONS = {
    "plain": dict(),
    "mask_backwards": dict(use_mask=True, go_backwards=True),
    "mask_zero_output_last": dict(use_mask=True, zero_output_for_mask=True,
                                  return_sequences=False),
    "dropout_per_gate": dict(dropout=True, recurrent_dropout=True, use_mask=True),
    "dropout_shared_no_bias": dict(dropout=True, per_gate=False, bias=False),
    "checkpoints": dict(use_mask=True, checkpoint_steps=2),
}
CELLS = ["lstm", "gru", "gru_rb", "simple_rnn"]


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    if SIM:
        for k, v in CUDA_SMALL_TUNABLES.items():
            monkeypatch.setattr(config, k, v)


def _on_device(a):
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def _pointer(a):
    if hasattr(a, "__cuda_array_interface__"):
        return a.__cuda_array_interface__["data"][0]
    return a._ary.__array_interface__["data"][0]       # the simulator's device array


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _problem(rng, name, option, B, T, D, H, dtype):
    cell, reset_after = ("gru", False) if name == "gru_rb" else (name, True)
    o = dict(OPTIONS[option])
    mask = random_mask(rng, B, T) if o.pop("use_mask", False) else None
    p, opts = make_problem(rng, cell, B, T, D, H, reset_after=reset_after, mask=mask,
                           bias=o.pop("bias", True), dropout=o.pop("dropout", False),
                           recurrent_dropout=o.pop("recurrent_dropout", False),
                           per_gate=o.pop("per_gate", True), dtype=dtype)
    opts.update(o)
    return cell, p, opts


def _run(cell, p, opts, dy, ds, engine, device_inputs=False):
    args = [p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"]]
    if device_inputs:
        args = [None if a is None else cuda.to_device(a) for a in args]
    f = getattr(ops, cell + "_forward")(*args, engine=engine, **opts)
    g = getattr(ops, cell + "_backward")(f.cache, dy, *ds)
    flat = [f.outputs, *f.states, g.x, g.kernel, g.recurrent_kernel, *g.states]
    return f, g, flat + ([g.bias] if g.bias is not None else [])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", CELLS)
def test_cuda_engine_equals_cpu_engine(name, option, rng):
    B, T, D, H = (3, 5, 2, 3) if SIM else (37, 29, 11, 45)
    cell, p, opts = _problem(rng, name, option, B, T, D, H, np.float64)
    rs = opts.get("return_sequences", True)
    dy = rng.standard_normal((B, T, H) if rs else (B, H))
    ds = [rng.standard_normal((B, H)) for _ in range(NSTATES[cell])]
    _, _, want = _run(cell, p, opts, dy, ds, "cpu")
    f, g, got = _run(cell, p, opts, dy, ds, "cuda")
    assert _on_device(f.outputs) and _on_device(g.kernel), "results stay on the device"
    for k, (a, b) in enumerate(zip(want, got)):
        np.testing.assert_allclose(_host(b), a, rtol=0, atol=config.TOL_F64, err_msg=str(k))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_device_inputs_pick_cuda_under_auto_float32(name, rng):
    B, T, D, H = (3, 4, 2, 3) if SIM else (64, 50, 16, 32)
    cell, p, opts = _problem(rng, name, "mask_backwards", B, T, D, H, np.float32)
    dy = rng.standard_normal((B, T, H)).astype(np.float32)
    _, _, want = _run(cell, p, opts, dy, [], "cpu")
    f, _, got = _run(cell, p, opts, cuda.to_device(dy), [], "auto", device_inputs=True)
    assert _on_device(f.outputs)
    for k, (a, b) in enumerate(zip(want, got)):
        err = np.abs(_host(b) - a).max() / max(np.abs(a).max(), 1.0)
        assert err <= config.TOL_GRAD_F32, (k, err)


@contextlib.contextmanager
def _launches():
    """Under the simulator, the names of the kernels launched in the block (device
    functions aside); on a GPU an empty list."""
    launched = []
    if not SIM:
        yield launched
        return
    from numba.cuda.simulator import kernel as simk
    real = simk.FakeCUDAKernel.__call__

    def counted(kern, *args):
        if not kern._device and simk._get_kernel_context() is None:
            launched.append(kern.fn.__name__)
        return real(kern, *args)
    simk.FakeCUDAKernel.__call__ = counted
    try:
        yield launched
    finally:
        simk.FakeCUDAKernel.__call__ = real


@pytest.mark.skipif(not SIM, reason="counts the simulator's launches")
@pytest.mark.parametrize("name", CELLS)
def test_a_training_step_fills_zeros_once_per_phase(name, rng):
    """The zeros a call starts from come from one fill each time: the missing initial
    states in the forward, the missing output and state gradients, and the accumulated
    weight gradients with the pending carry in the backward."""
    B, T, D, H = 3, 4, 2, 3
    cell, p, opts = _problem(rng, name, "plain", B, T, D, H, np.float32)
    args = [cuda.to_device(a) for a in (p["x"], p["kernel"], p["recurrent_kernel"],
                                        p["bias"])]
    with _launches() as fwd_launches:
        f = getattr(ops, cell + "_forward")(*args, engine="cuda", return_sequences=False,
                                            **opts)
    with _launches() as bwd_launches:
        g = getattr(ops, cell + "_backward")(f.cache, None)
    assert fwd_launches.count("_fill_kernel") == (2 if name == "gru_rb" else 1), fwd_launches
    assert bwd_launches.count("_fill_kernel") == 2, bwd_launches
    want = getattr(ops, cell + "_backward")(getattr(ops, cell + "_forward")(
        p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], engine="cpu",
        return_sequences=False, **opts).cache, None)
    for a, b in [(want.kernel, g.kernel), (want.recurrent_kernel, g.recurrent_kernel),
                 (want.bias, g.bias), (want.x, g.x)]:
        np.testing.assert_allclose(_host(b), a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CELLS)
def test_streaming_calls_swap_layouts_without_copies(name, rng, monkeypatch):
    """With one sequence (B = 1) the batch-major and time-major layouts are the same memory:
    an inference call (zero initial states) launches no layout copy and no output fill,
    returns views of its own outputs, and equals the CPU engine; a training call still
    copies x (the backward must not see the caller change it)."""
    from fastcells.cuda import _linalg
    B, T, D, H = (1, 4, 2, 3) if SIM else (1, 100, 64, 128)
    cell, p, opts = _problem(rng, name, "plain", B, T, D, H, np.float64)
    fwd = getattr(ops, cell + "_forward")
    args = [cuda.to_device(a) for a in (p["x"], p["kernel"], p["recurrent_kernel"],
                                        p["bias"], *p["states"])]
    for rs in (True, False):
        want = fwd(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], engine="cpu",
                   training=False, return_sequences=rs, **opts)
        swaps = []
        real = _linalg._swap01
        monkeypatch.setattr(_linalg, "_swap01", lambda a: swaps.append(a.shape) or real(a))
        with _launches() as launched:
            got = fwd(*args[:4], engine="cuda", training=False, return_sequences=rs, **opts)
        monkeypatch.undo()
        assert swaps == [], f"layout copies launched: {swaps}"
        # one zero fill for the initial states (both of the LSTM's; the GRU without
        # reset_after fills its zero recurrent bias too), the projection and the
        # recurrence: no output fill, no copies
        fills = ["_fill_kernel"] * (2 if name == "gru_rb" else 1)
        assert not SIM or sorted(launched) == fills + ["forward", "gemm"], launched
        for a, b in zip([want.outputs, *want.states], [got.outputs, *got.states]):
            np.testing.assert_allclose(_host(b), a, rtol=0, atol=config.TOL_F64)
    f = fwd(*args, engine="cuda", training=True, **opts)
    assert _pointer(f.cache.xt) != _pointer(args[0])
    dy = rng.standard_normal((B, T, H))
    g = getattr(ops, cell + "_backward")(f.cache, dy)
    want = getattr(ops, cell + "_backward")(
        fwd(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"],
            engine="cpu", training=True, **opts).cache, dy)
    np.testing.assert_allclose(_host(g.kernel), want.kernel, rtol=0, atol=config.TOL_F64)


def test_device_arrays_are_taken_without_a_copy(rng):
    x = cuda.to_device(rng.standard_normal((2, 3, 4)))
    got = _validate.as_float_array("x", x, "cuda")
    assert _pointer(got) == _pointer(x)


def test_device_input_with_cpu_engine_is_a_clear_error(rng):
    _, p, _ = _problem(rng, "lstm", "plain", 2, 3, 2, 2, np.float32)
    x = cuda.to_device(p["x"])
    with pytest.raises(ValueError, match=r"x lives on a GPU.*engine='cpu'"):
        ops.lstm_forward(x, p["kernel"], p["recurrent_kernel"], engine="cpu")
    W = cuda.to_device(p["kernel"])
    with pytest.raises(ValueError, match=r"kernel lives on a GPU"):
        ops.lstm_forward(p["x"], W, p["recurrent_kernel"], engine="cpu")
    with pytest.raises(ValueError, match=r"x must have shape|x must be 3-D"):
        ops.lstm_forward(cuda.to_device(np.zeros((2, 3), np.float32)), p["kernel"],
                         p["recurrent_kernel"], engine="cuda")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the simulator's NaN
@pytest.mark.parametrize("name", CELLS)
def test_nan_inputs_give_the_same_nan_outputs_as_the_cpu(name, rng):
    """A NaN in one sample's input reaches that sample's outputs from its step on, on the GPU
    as on the CPU (the float32 tanh clamps with min/max, which numba-cuda lowers to
    fmaxf/fminf: they drop a NaN, and the activation must give it back itself)."""
    B, T, D, H = 5, 4, 3, 5
    cell, p, opts = _problem(rng, name, "plain", B, T, D, H, np.float32)
    p["x"][2, 1, 0] = np.nan
    p["x"][4, 0, :] = np.inf
    fwd = getattr(ops, cell + "_forward")
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    want = fwd(*args, engine="cpu", training=False, **opts).outputs
    got = _host(fwd(*args, engine="cuda", training=False, **opts).outputs)
    assert np.isnan(want[2, 1:]).all() and not np.isnan(want[[0, 1, 3]]).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[[0, 1, 3]], want[[0, 1, 3]], rtol=0,
                               atol=config.TOL_OUTPUT_F32)
