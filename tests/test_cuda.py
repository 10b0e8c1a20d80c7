"""fastcells.cuda (the drivers and _linalg) against the CPU drivers, NumPy and the reference.

Without a GPU this runs under Numba's CUDA simulator (tests/conftest.py turns it on) on tiny
shapes, with the launch tunables patched small so that several blocks, several items per
thread, padded row groups and both places for the recurrent weights (shared memory and
global memory) take part. On a GPU the same tests also run at full size with the default
tunables.
"""
import os

import numba
import numpy as np
import pytest

import reference as R
from fastcells import _math, config, ops
from fastcells.bench import relative_error
from fastcells.cpu import _linalg as cpu_la
from fastcells.cpu import gru as cpu_gru
from fastcells.cpu import lstm as cpu_lstm
from fastcells.cpu import simple_rnn as cpu_rnn
from helpers import CUDA_SMALL_TUNABLES, make_problem, needs_cuda, random_mask

pytestmark = needs_cuda

if ops.cuda_available():
    from fastcells.cuda import _common, _linalg as la
    from fastcells.cuda import gru, lstm, simple_rnn

SIM = bool(numba.config.ENABLE_CUDASIM)

TINY_GEMM = dict(CUDA_GEMM_BLOCK_M=4, CUDA_GEMM_BLOCK_N=4, CUDA_GEMM_BLOCK_K=2,
                 CUDA_GEMM_THREAD_M=2, CUDA_GEMM_THREAD_N=2)
TINY = (5, 4, 3, 5)                      # B, T, D, H
SHAPES = [TINY] if SIM else [TINY, (67, 37, 19, 45), (130, 12, 32, 128)]
CELLS = ["lstm", "gru", "gru_rb", "simple_rnn"]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: config.TOL_OUTPUT_F32, np.float64: config.TOL_F64}


def _sid(shape):
    return "x".join(map(str, shape))


def _cells_and_shapes(test):
    """Parametrize a test over every cell and every shape of SHAPES."""
    test = pytest.mark.parametrize("shape", SHAPES, ids=_sid)(test)
    return pytest.mark.parametrize("cell", CELLS)(test)


@pytest.fixture
def small(monkeypatch):
    for k, v in CUDA_SMALL_TUNABLES.items():
        monkeypatch.setattr(config, k, v)


def _tunables(monkeypatch, shape):
    """Small tunables for the tiny shape (and always under the simulator), defaults else."""
    if shape == TINY or SIM:
        for k, v in CUDA_SMALL_TUNABLES.items():
            monkeypatch.setattr(config, k, v)


def host(a):
    return None if a is None else la.to_host(a)


def dev(a):
    return None if a is None else la.to_device(a)


def assert_close(got, want, tol, name=""):
    got = host(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got.astype(np.float64) - want).max() if want.size else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.0e}"
    return err


# --------------------------------------------------------------------------- launch shapes
def test_launch_plan_spreads_the_batch_and_falls_back_to_global_weights(small, monkeypatch):
    # without a split 10 numbers per row and unit; split, 2 (the exchanged rows are global)
    state = lambda NR, Hb, split: (2 if split else 10) * NR * Hb          # noqa: E731
    p = _common.plan(5, 5, np.float32, 20, state)
    assert (p.rows, p.R, p.threads, p.blocks, p.padded_rows) == (2, 2, 4, 3, 2)
    assert p.u_shared and p.shared_bytes == (100 + state(2, 5, False)) * 4
    assert not p.split and (p.unit_blocks, p.block_units, p.exchange_rows) == (1, 5, 0)
    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", state(2, 5, False) * 4 + 10)
    p = _common.plan(5, 5, np.float32, 20, state)
    assert not p.u_shared and p.shared_bytes == state(2, 5, False) * 4
    # one row's state does not fit: the units are split over blocks (2 units each here)
    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", state(1, 5, False) * 4 - 4)
    monkeypatch.setattr(config, "CUDA_SPLIT_MAX_UNITS_PER_BLOCK", 2)
    monkeypatch.setattr(config, "CUDA_DEFAULT_SM_COUNT", 8)
    p = _common.plan(5, 5, np.float32, 20, state)
    assert p.split and (p.unit_blocks, p.block_units, p.rows, p.blocks) == (3, 2, 3, 6)
    assert not p.u_shared and p.shared_bytes == state(4, 2, True) * 4
    # a GPU without cooperative launches gets no split plan
    monkeypatch.setattr(_common, "cooperative_launch", lambda: False)
    with pytest.raises(ValueError, match="cooperative launch"):
        _common.plan(5, 5, np.float32, 20, state)
    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 48 * 1024)
    monkeypatch.setattr(config, "CUDA_SPLIT_MIN_UNITS", 1)
    assert not _common.plan(5, 5, np.float32, 20, state).split
    monkeypatch.setattr(_common, "cooperative_launch", lambda: True)
    assert _common.plan(5, 5, np.float32, 20, state).split
    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 16)
    with pytest.raises(ValueError, match="shared memory"):
        _common.plan(5, 5, np.float32, 20, state)


def test_default_plan_for_a_typical_shape():
    """B=128, H=32 LSTM forward in float32: the whole batch spread over the GPU, U in shared
    memory, and within 48 KiB without opting in."""
    p = _common.plan(128, 32, np.float32, 4 * 32,
                     lambda NR, Hb, split: lstm._forward_state(NR, Hb, 32, False, split))
    assert p.u_shared and p.shared_bytes <= _common.DEFAULT_SHARED_BYTES
    assert p.blocks * p.rows >= 128 and p.threads % 32 == 0 and not p.split


def test_split_plan_for_a_large_lstm_on_an_h100(monkeypatch):
    """B=32, H=1024 LSTM forward in float32 on 132 multiprocessors with 227 KiB of shared
    memory: the units spread over 128 blocks of 8, each with its 128 KiB of U in shared
    memory, the whole batch in each block, one block per multiprocessor."""
    monkeypatch.setattr(_common, "sm_count", lambda: 132)
    monkeypatch.setattr(_common, "shared_limit", lambda: 227 * 1024)
    p = _common.plan(32, 1024, np.float32, 4 * 1024,
                     lambda NR, Hb, split: lstm._forward_state(NR, Hb, 1024, False, split))
    assert p.split and (p.unit_blocks, p.block_units, p.rows, p.blocks) == (128, 8, 32, 128)
    assert p.u_shared and p.shared_bytes == (4 * 1024 * 8 + 3 * 32 * 8) * 4
    assert p.exchange_rows == 32 and p.threads == 64


# --------------------------------------------------------------------------- _linalg
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_transposes_strides_bias_accumulate(dtype, small, monkeypatch, rng):
    for k, v in TINY_GEMM.items():
        monkeypatch.setattr(config, k, v)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    a3 = rng.standard_normal((3, 4, 7)).astype(dtype)         # [T, B, X] -> [12, 7]
    w = rng.standard_normal((5, 9)).astype(dtype)
    a2 = a3.reshape(12, 7)
    # 3-D A, column slice of a 2-D B, column slice of a 3-D C, bias
    out = la.zeros((3, 4, 9), dtype)
    bias = rng.standard_normal(9).astype(dtype)
    la.gemm(dev(a3)[:, :, 2:7], dev(w)[:, 4:9], out=out[:, :, 4:9], bias=dev(bias)[4:9])
    want = np.zeros((12, 9))
    want[:, 4:9] = a2[:, 2:7] @ w[:, 4:9] + bias[4:9]
    assert_close(out, want.reshape(3, 4, 9), tol, "3-D slices")
    # A^T B with A 3-D (x^T dz), accumulated into a strided view
    dz = rng.standard_normal((3, 4, 6)).astype(dtype)
    acc = rng.standard_normal((7, 10)).astype(dtype)
    d_acc = dev(acc)
    la.gemm(dev(a3), dev(dz), out=d_acc[:, 2:8], trans_a=True, accumulate=True)
    want = acc.copy()
    want[:, 2:8] += a2.T @ dz.reshape(12, 6)
    assert_close(d_acc, want, tol, "A^T B accumulate")
    # A B^T into a fresh array (dz W^T)
    w2 = rng.standard_normal((7, 6)).astype(dtype)
    got = la.gemm(dev(dz), dev(w2), trans_b=True)
    assert_close(got, dz.reshape(12, 6) @ w2.T, tol, "A B^T")
    # both transposed, sizes that are not multiples of the tiles
    x = rng.standard_normal((9, 5)).astype(dtype)
    y = rng.standard_normal((3, 9)).astype(dtype)
    assert_close(la.gemm(dev(x), dev(y), trans_a=True, trans_b=True), x.T @ y.T, tol, "A^T B^T")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_copies_and_column_sums(dtype, small, rng):
    x = rng.standard_normal((5, 4, 3)).astype(dtype)
    xt = la.time_major(dev(x))
    np.testing.assert_array_equal(host(xt), cpu_la.time_major(x))
    np.testing.assert_array_equal(host(la.batch_major(xt)), x)
    np.testing.assert_array_equal(host(la.finish_outputs(xt, True)), x)
    np.testing.assert_array_equal(host(la.finish_outputs(xt, False)), x.swapaxes(0, 1)[0])
    # strided (non-contiguous) source
    np.testing.assert_array_equal(host(la.time_major(dev(x)[:, 1:3])), x[:, 1:3].swapaxes(0, 1))
    np.testing.assert_array_equal(host(la.copy(dev(x)[1:4, :, 2])), x[1:4, :, 2])
    other = np.float32 if dtype == np.float64 else np.float64
    c = la.copy(dev(x), other)
    assert c.dtype == other and np.array_equal(host(c), x.astype(other))
    np.testing.assert_array_equal(host(la.transpose(dev(x[0]))), x[0].T)
    z = la.zeros((3, 7), dtype)
    assert z.dtype == dtype and not host(z).any()
    la.fill(z, 2.5)
    assert (host(z) == 2.5).all()
    s = la.column_sums(dev(x))
    np.testing.assert_allclose(host(s), x.reshape(-1, 3).sum(0), rtol=1e-6, atol=1e-6)
    out = dev(np.ones(2, dtype))
    la.column_sums(dev(x)[:, :, 1:], out=out)
    np.testing.assert_allclose(host(out), 1 + x[:, :, 1:].reshape(-1, 2).sum(0), rtol=1e-6,
                               atol=1e-6)
    m = (rng.random((5, 3)) > 0.4).astype(dtype)
    xt2 = la.time_major(dev(x))
    la.apply_shared_mask(xt2, dev(m))
    np.testing.assert_array_equal(host(xt2), x.swapaxes(0, 1) * m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_group_gives_separate_aligned_zero_arrays(dtype):
    shapes = [(3, 5), None, (7,), (0, 4), (2, 1, 3)]
    got = la.zeros_group(shapes, dtype)
    assert got[1] is None and la.zeros_group([None, None], dtype) == [None, None]
    arrays = [a for a in got if a is not None]
    for a, s in zip(arrays, [s for s in shapes if s is not None]):
        assert a.shape == s and a.dtype == dtype and not host(a).any()
    if not SIM:     # the simulator's arrays are host memory of its own
        for a in arrays:
            assert a.size == 0 or a.__cuda_array_interface__["data"][0] % 256 == 0
    la.fill(got[0], 1.0)                # the arrays share a buffer, not memory
    la.fill(got[2], 2.0)
    assert (host(got[0]) == 1).all() and (host(got[2]) == 2).all()
    assert not host(got[4]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dmask", [None, "shared", "per_gate"])
def test_projection_and_gradient_gemms_match_the_cpu(dmask, dtype, small, rng):
    tol = 1e-5 if dtype == np.float32 else 1e-12
    T, B, D, G, H = 3, 5, 4, 4, 3
    x = rng.standard_normal((B, T, D)).astype(dtype)
    W = rng.standard_normal((D, G * H)).astype(dtype)
    b = rng.standard_normal(G * H).astype(dtype)
    m = None
    if dmask == "shared":
        m = (rng.random((B, D)) > 0.3).astype(dtype)
    elif dmask == "per_gate":
        m = (rng.random((G, B, D)) > 0.3).astype(dtype)
    xc, xd = cpu_la.time_major(x), la.time_major(dev(x))
    if m is not None and m.ndim == 2:
        cpu_la.apply_shared_mask(xc, m)
        la.apply_shared_mask(xd, dev(m))
    assert_close(la.project(xd, dev(W), dev(b), dev(m), G), cpu_la.project(xc, W, b, m, G), tol,
                 "project")
    dz = rng.standard_normal((T, B, G * H)).astype(dtype)
    dx1, dW1 = la.input_grads(xd, dev(W), dev(m), dev(dz))
    dx2, dW2 = cpu_la.input_grads(xc, W, m, dz)
    assert_close(dx1, dx2, tol, "dx")
    assert_close(dW1, dW2, tol, "dW")
    start = rng.standard_normal(W.shape).astype(dtype)
    _, dW3 = la.input_grads(xd, dev(W), dev(m), dev(dz), dev(start))
    assert_close(dW3, start + dW2, tol, "dW accumulated")
    src = rng.standard_normal((T, B, H)).astype(dtype)
    rm = (rng.random((G, B, H)) > 0.3).astype(dtype) if dmask else None
    ddz = dev(dz)
    got = la.recurrent_grad(dev(src), ddz[:, :, :2 * H], dev(None if rm is None else rm[:2]), 2)
    want = cpu_la.recurrent_grad(src, dz[:, :, :2 * H], None if rm is None else rm[:2], 2)
    assert_close(got, want, tol, "dU")
    out = la.zeros((H, G * H), dtype)
    la.recurrent_grad(dev(src), ddz[:, :, 2 * H:3 * H], dev(None if rm is None else rm[2]), 1,
                      out=out[:, 2 * H:3 * H])
    full = np.zeros((H, G * H))
    full[:, 2 * H:3 * H] = cpu_la.recurrent_grad(src, dz[:, :, 2 * H:3 * H],
                                                 None if rm is None else rm[2:3], 1)
    assert_close(out, full, tol, "dU into a view, one mask for the gate")


def test_to_device_wraps_device_arrays_and_copies_host_ones(small, rng):
    x = rng.standard_normal((3, 4))
    d = la.to_device(x)
    assert la.is_device(d) and not la.is_device(x)
    assert la.to_device(d) is d                                 # no copy
    f = la.to_device(d, np.float32)                             # converted on the device
    assert f.dtype == np.float32 and np.allclose(host(f), x)
    assert la.to_device(f, np.float32) is f
    s = la.to_device(x[:, ::2])                                 # non-contiguous host array
    np.testing.assert_array_equal(host(s), x[:, ::2])
    np.testing.assert_array_equal(la.to_host(d[:, 1:3]), x[:, 1:3])   # strided device view

    class DLPackOnly:           # a producer that speaks DLPack and nothing else (host memory)
        def __init__(self, a):
            self._a = a

        def __dlpack__(self, **kw):
            return self._a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self._a.__dlpack_device__()

    np.testing.assert_array_equal(host(la.to_device(DLPackOnly(x))), x)
    # the CUDA-array-interface description of a DLPack view (what numba then wraps)
    smv = pytest.importorskip("cuda.core.utils").StridedMemoryView
    xs = x[:, ::2]
    cai = la._DLPackView(xs, smv.from_dlpack(xs, stream_ptr=-1)).__cuda_array_interface__
    ai = xs.__array_interface__
    assert (cai["data"][0], cai["shape"], cai["typestr"]) == (ai["data"][0], ai["shape"],
                                                               ai["typestr"])
    assert cai["strides"] == xs.strides
    if not SIM:                 # a foreign object with __cuda_array_interface__: a view
        class Foreign:
            def __init__(self, a):
                self.__cuda_array_interface__ = a.__cuda_array_interface__
        v = la.to_device(Foreign(d))
        la.fill(v, 3.0)
        assert (host(d) == 3.0).all()


# --------------------------------------------------------------------------- drivers vs CPU
DRIVER_OPTIONS = {
    "plain": dict(),
    "mask_backwards": dict(mask=True, go_backwards=True),
    "mask_zero_output_last": dict(mask=True, zero_output=True, return_sequences=False),
    "recurrent_dropout_mask": dict(rmask=True, mask=True, go_backwards=True),
    "out0_carry": dict(mask=True, chunk=True),
    "relu_hard_sigmoid": dict(mask=True, act=_math.RELU, ract=_math.HARD_SIGMOID),
    "exact_activations_linear": dict(exact=True, act=_math.LINEAR),
}


def _driver_problem(rng, cell, shape, dtype, o):
    """Random driver arguments (time-major), the same for the CPU and the CUDA driver."""
    B, T, _, H = shape
    G = {"lstm": 4, "gru": 3, "gru_rb": 3, "simple_rnn": 1}[cell]
    f = lambda *s: rng.standard_normal(s).astype(dtype)        # noqa: E731
    p = dict(xw=f(T, B, G * H), U=f(H, G * H) * dtype(0.6), h0=f(B, H), c0=f(B, H),
             brec=f(G * H) if cell == "gru" else np.zeros(G * H, dtype))
    p["mask"] = (random_mask(rng, B, T).T.copy() if o.get("mask") else None)
    rshape = (B, H) if cell == "simple_rnn" else (G, B, H)
    p["rmask"] = ((rng.random(rshape) > 0.3) / 0.7).astype(dtype) if o.get("rmask") else None
    p["out0"] = f(B, H) if o.get("chunk") else None
    p["carry"] = f(B, H) if o.get("chunk") else None
    rs = o.get("return_sequences", True)
    p["dy"] = f(T if rs else 1, B, H)
    p["dh"], p["dc"] = f(B, H), f(B, H)
    return p


def _run_driver(mods, cell, p, o, dtype, on_device):
    """Forward and backward of one driver module set; returns named host arrays."""
    d = dev if on_device else (lambda a: a)
    act, ract = o.get("act", _math.TANH), o.get("ract", _math.SIGMOID)
    fast = dtype == np.float32 and not o.get("exact", False)
    common = dict(go_backwards=o.get("go_backwards", False),
                  zero_output=o.get("zero_output", False))
    rs = o.get("return_sequences", True)
    carry = None if p["carry"] is None else d(p["carry"].copy())
    res = {}
    if cell == "lstm":
        coef = _math.gate_coefficients([ract, ract, act, ract], p["U"].shape[0], dtype)
        y, h, c, kc = mods.lstm.forward(d(p["xw"]), d(p["U"]), d(p["rmask"]), d(p["mask"]),
                                        d(p["h0"]), d(p["c0"]), act, ract,
                                        return_sequences=rs, keep_cache=True, fast=fast,
                                        coef=coef if fast else None, out0=d(p["out0"]),
                                        **common)
        dz, dh0, dc0 = mods.lstm.backward(kc, d(p["U"]), d(p["rmask"]), d(p["mask"]),
                                          d(p["dy"]), d(p["dh"]), d(p["dc"]), act, ract,
                                          carry=carry, **common)
        res.update(y=y, h=h, c=c, gates=kc[0], hprev=kc[1], cprev=kc[2], actc=kc[3], dz=dz,
                   dh0=dh0, dc0=dc0)
    elif cell in ("gru", "gru_rb"):
        ra = cell == "gru"
        coef = _math.gate_coefficients([ract, ract], p["U"].shape[0], dtype)
        y, h, kc = mods.gru.forward(d(p["xw"]), d(p["U"]), d(p["brec"]), d(p["rmask"]),
                                    d(p["mask"]), d(p["h0"]), act, ract, ra,
                                    return_sequences=rs, keep_cache=True, fast=fast,
                                    coef=coef if fast else None, out0=d(p["out0"]), **common)
        dz, dah, dh0 = mods.gru.backward(kc, d(p["U"]), d(p["rmask"]), d(p["mask"]),
                                         d(p["dy"]), d(p["dh"]), act, ract, ra, carry=carry,
                                         **common)
        res.update(y=y, h=h, gates=kc[0], hprev=kc[1], aux=kc[2], dz=dz, dah_rec=dah, dh0=dh0)
    else:
        y, h, kc = mods.simple_rnn.forward(d(p["xw"]), d(p["U"]), d(p["rmask"]), d(p["mask"]),
                                           d(p["h0"]), act, return_sequences=rs,
                                           keep_cache=True, fast=fast, out0=d(p["out0"]),
                                           **common)
        dz, dh0 = mods.simple_rnn.backward(kc, d(p["U"]), d(p["rmask"]), d(p["mask"]),
                                           d(p["dy"]), d(p["dh"]), act, carry=carry, **common)
        res.update(y=y, h=h, hs=kc[0], hprev=kc[1], dz=dz, dh0=dh0)
    res["carry"] = carry
    return {k: (None if v is None else np.asarray(host(v))) for k, v in res.items()}


class _Mods:
    def __init__(self, lstm, gru, simple_rnn):
        self.lstm, self.gru, self.simple_rnn = lstm, gru, simple_rnn


@pytest.mark.parametrize("option", list(DRIVER_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@_cells_and_shapes
def test_drivers_match_the_cpu_drivers(shape, cell, dtype, option, monkeypatch, rng):
    _tunables(monkeypatch, shape)
    if option == "recurrent_dropout_mask" and shape == TINY:
        # weights in global memory for this one (the others keep them in shared memory)
        monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 600)
    o = DRIVER_OPTIONS[option]
    p = _driver_problem(rng, cell, shape, dtype, o)
    want = _run_driver(_Mods(cpu_lstm, cpu_gru, cpu_rnn), cell, p, o, dtype, False)
    got = _run_driver(_Mods(lstm, gru, simple_rnn), cell, p, o, dtype, True)
    tol = TOL[dtype]
    for name, w in want.items():
        if w is None:
            assert got[name] is None, name
            continue
        g = got[name]
        assert g.dtype == dtype, name
        if name == "actc" and p["mask"] is not None:
            live = p["mask"][:, :, None].repeat(w.shape[2], 2)   # garbage where masked
            g, w = np.where(live, g, 0), np.where(live, w, 0)
        assert_close(g, w, tol * max(1.0, np.abs(w).max()), name)


@pytest.mark.parametrize("cell", CELLS)
def test_results_do_not_depend_on_the_launch_shape(cell, monkeypatch, rng):
    """Bit-identical results for other blocks, rows per thread, threads, U in global
    memory, and units split over blocks: every sum runs in the same order whatever the
    launch shape."""
    shape = TINY if SIM else (45, 9, 4, 40)
    o = dict(mask=True, rmask=True)
    p = _driver_problem(rng, cell, shape, np.float32, o)
    mods = _Mods(lstm, gru, simple_rnn)
    results = []
    other = dict(CUDA_SMALL_TUNABLES, CUDA_MAX_ROWS_PER_BLOCK=3, CUDA_ROWS_PER_THREAD=1,
                 CUDA_THREADS_PER_BLOCK=7, CUDA_SHARED_MEMORY_BYTES=500)
    for tun in (CUDA_SMALL_TUNABLES, other, dict(other, **SPLIT_TUNABLES)):
        for k, v in tun.items():
            monkeypatch.setattr(config, k, v)
        results.append(_run_driver(mods, cell, p, o, np.float32, True))
    for other_result in results[1:]:
        for name, a in results[0].items():
            if name != "actc":
                np.testing.assert_array_equal(a, other_result[name], err_msg=name)


# --------------------------------------------------------------------------- ops vs reference
OPS_OPTIONS = {
    "plain": dict(),
    "mask_backwards_zero_output": dict(use_mask=True, go_backwards=True,
                                       zero_output_for_mask=True),
    "dropout_per_gate": dict(dropout=True, recurrent_dropout=True, use_mask=True),
    "shared_dropout_last_only": dict(dropout=True, per_gate=False, return_sequences=False),
    "no_bias_relu": dict(bias=False, activation="relu", recurrent_activation="hard_sigmoid"),
    "checkpoint": dict(use_mask=True, checkpoint_steps=3),
}


def _ops_vs_reference(rng, cell, shape, option, dtype):
    cell, reset_after = ("gru", False) if cell == "gru_rb" else (cell, True)
    B, T, D, H = shape
    o = dict(OPS_OPTIONS[option])
    mask = random_mask(rng, B, T) if o.pop("use_mask", False) else None
    p, opts = make_problem(rng, cell, B, T, D, H, bias=o.pop("bias", True),
                           reset_after=reset_after, mask=mask, dropout=o.pop("dropout", False),
                           recurrent_dropout=o.pop("recurrent_dropout", False),
                           per_gate=o.pop("per_gate", True), dtype=dtype)
    rs = o.pop("return_sequences", True)
    ckpt = o.pop("checkpoint_steps", None)
    if cell == "simple_rnn":
        o.pop("recurrent_activation", None)
    opts.update(o)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    fwd = getattr(ops, cell + "_forward")(*args, return_sequences=rs, engine="cuda",
                                          checkpoint_steps=ckpt, **opts)
    yr, sr = getattr(R, cell + "_forward")(*args, **opts)
    dy = rng.standard_normal(yr.shape)
    if not rs:
        yr, dy = yr[:, -1], dy[:, -1]
    ds = [rng.standard_normal(s.shape) for s in sr]
    g = getattr(ops, cell + "_backward")(fwd.cache, dy.astype(dtype),
                                         *[d.astype(dtype) for d in ds])
    if not rs:
        full = np.zeros((B, T, H))
        full[:, -1] = dy
        dy = full
    gr = getattr(R, cell + "_backward")(*args, d_outputs=dy, d_states=ds, **opts)
    pairs = dict(outputs=(fwd.outputs, yr), x=(g.x, gr["x"]), kernel=(g.kernel, gr["kernel"]),
                 recurrent_kernel=(g.recurrent_kernel, gr["recurrent_kernel"]),
                 bias=(g.bias, gr["bias"]))
    for k, (a, b) in enumerate(zip(fwd.states, sr)):
        pairs[f"state{k}"] = (a, b)
    for k, (a, b) in enumerate(zip(g.states, gr["states"])):
        pairs[f"d_state{k}"] = (a, b)
    return pairs


def _compared(monkeypatch, rng, cell, shape, option, dtype):
    """``(name, got, want)`` of ``_ops_vs_reference`` under the tunables of the shape, for
    what the reference has (what it has not, the CUDA engine must not have either)."""
    _tunables(monkeypatch, shape)
    for name, (got, want) in _ops_vs_reference(rng, cell, shape, option, dtype).items():
        if want is None:
            assert got is None, name
        else:
            yield name, got, want


@pytest.mark.parametrize("option", list(OPS_OPTIONS))
@_cells_and_shapes
def test_float64_equals_reference(shape, cell, option, monkeypatch, rng):
    for name, got, want in _compared(monkeypatch, rng, cell, shape, option, np.float64):
        assert la.is_device(got) and got.dtype == np.float64, name
        assert_close(got, want, config.TOL_F64 * max(1.0, np.abs(want).max()), name)


@pytest.mark.parametrize("option", ["plain", "dropout_per_gate"])
@_cells_and_shapes
def test_float32_close_to_reference(shape, cell, option, monkeypatch, rng):
    for name, got, want in _compared(monkeypatch, rng, cell, shape, option, np.float32):
        assert got.dtype == np.float32, name
        if name == "outputs" or name.startswith("state"):
            assert_close(got, want, config.TOL_OUTPUT_F32, name)
        else:       # gradients: relative to their norm, as the CPU tests
            err = relative_error(host(got), want)
            assert err <= config.TOL_GRAD_F32, f"{name}: {err:.3e}"


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 1, 3, 2), (1, 3, 2, 3)], ids=_sid)
@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_awkward_shapes_equal_reference(cell, shape, split, small, monkeypatch, rng):
    """B=1, T=1, H=1 (a block with one row, a step with one unit), with and without the
    units split over blocks."""
    if split:
        for k, v in SPLIT_TUNABLES.items():
            monkeypatch.setattr(config, k, v)
    for name, (got, want) in _ops_vs_reference(rng, cell, shape, "dropout_per_gate",
                                                np.float64).items():
        if want is not None:
            assert_close(got, want, config.TOL_F64 * max(1.0, np.abs(want).max()), name)


# --------------------------------------------------------------------------- real compiler
@pytest.mark.skipif(not SIM, reason="on a GPU every test above compiles the kernels it runs")
@pytest.mark.early
def test_every_kernel_compiles_to_ptx_for_a_gpu(monkeypatch, rng, tmp_path):
    """The simulator never types or lowers a kernel. Record the launches of the drivers and
    ops (every cell, both dtypes, every driver option, weights in shared and in global
    memory), then compile each kernel with its argument types to PTX for sm_80 and sm_90
    with NVVM in a process of its own (tests/ptx_compile.py), split-unit (cooperative)
    kernels included; assemble each with ptxas and require that no kernel spills registers.
    NVVM and ptxas come with ``.[test]`` (NVIDIA's wheels); where they are missing this
    skips, which tests/skips.py does not accept. The options kept are those that change the
    compiled kernels (activations, exact or fast, weights in global memory); the others are
    run-time arguments of the same kernels."""
    import pickle
    import subprocess
    import sys

    import ptx_compile
    mods = _Mods(lstm, gru, simple_rnn)
    with ptx_compile.recording() as seen:
        for cell in CELLS:
            for dtype in DTYPES:
                for option in ("plain", "recurrent_dropout_mask", "relu_hard_sigmoid",
                               "exact_activations_linear"):
                    o = DRIVER_OPTIONS[option]
                    for k, v in CUDA_SMALL_TUNABLES.items():
                        monkeypatch.setattr(config, k, v)
                    if option == "recurrent_dropout_mask":
                        monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 600)
                    p = _driver_problem(rng, cell, TINY, dtype, o)
                    _run_driver(mods, cell, p, o, dtype, True)
                    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 48 * 1024)
            for option in ("plain", "shared_dropout_last_only", "checkpoint"):
                _ops_vs_reference(rng, cell, TINY, option, np.float32)
            for dtype in DTYPES:    # the default tunables: 4 rows per thread, as on a GPU
                for option in ("plain", "recurrent_dropout_mask"):
                    monkeypatch.undo()
                    if option == "recurrent_dropout_mask":
                        monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 600)
                    o = DRIVER_OPTIONS[option]
                    _run_driver(mods, cell, _driver_problem(rng, cell, TINY, dtype, o), o,
                                dtype, True)
            for option in ("plain", "recurrent_dropout_mask"):      # split units
                for k, v in SPLIT_TUNABLES.items():
                    monkeypatch.setattr(config, k, v)
                if option == "recurrent_dropout_mask":
                    monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 200)
                o = DRIVER_OPTIONS[option]
                p = _driver_problem(rng, cell, TINY, np.float32, o)
                _run_driver(mods, cell, p, o, np.float32, True)
                monkeypatch.setattr(config, "CUDA_SPLIT_MIN_UNITS", 512)
                monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 48 * 1024)
    split = {k[1:3] for k, _ in seen if k[0] == "variant" and k[3][-1] is True}
    assert len(split) == 6, split       # the forward and backward of each cell, split
    path = tmp_path / "launches.pkl"
    path.write_bytes(pickle.dumps(seen))
    import fastcells
    here = os.path.dirname(os.path.dirname(fastcells.__file__))    # the fastcells under test
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0",
               PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, ptx_compile.__file__, str(path)], env=env,
                         capture_output=True, text=True, timeout=1200)
    if run.returncode == ptx_compile.NO_NVVM:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert f"{len(seen)} of {len(seen)} kernels compiled" in run.stdout
    if "no ptxas" in run.stdout:        # PTX checked; registers and spills cannot be
        pytest.skip(f"every kernel compiled to PTX, but the spill check needs ptxas: "
                    f"{run.stdout.strip().splitlines()[-1]}")
    assert f"ptxas: {len(seen)} assembled" in run.stdout, run.stdout
    assert "SPILL" not in run.stdout, run.stdout      # registers suffice for every kernel
    print(run.stdout)                                   # counts and registers (pytest -s)


# --------------------------------------------------------------------------- split units
#: Tunables that split TINY's 5 units over 3 blocks (2, 2 and 1 units) and its 5 rows over 2
#: (3 and 2 rows, padded to 4), so that 6 blocks meet at each step's grid barrier.
SPLIT_TUNABLES = dict(CUDA_SMALL_TUNABLES, CUDA_SPLIT_MIN_UNITS=1,
                      CUDA_SPLIT_MAX_UNITS_PER_BLOCK=2, CUDA_DEFAULT_SM_COUNT=8)


@pytest.mark.parametrize("option", ["plain", "mask_backwards", "mask_zero_output_last",
                                    "recurrent_dropout_mask", "out0_carry"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cell", CELLS)
def test_split_units_match_the_cpu_drivers(cell, dtype, option, monkeypatch, rng):
    """Units split over blocks that exchange h (forward) and dz (backward) through global
    memory at a grid barrier (under the simulator, every block runs at once, see
    fastcells/cuda/_simulator.py): the same results as the CPU drivers."""
    for k, v in SPLIT_TUNABLES.items():
        monkeypatch.setattr(config, k, v)
    shape = TINY if SIM else (67, 37, 19, 45)
    if option == "recurrent_dropout_mask" and SIM:      # U in global memory
        monkeypatch.setattr(config, "CUDA_SHARED_MEMORY_BYTES", 50 * np.dtype(dtype).itemsize)
    B, _, _, H = shape
    G = {"lstm": 4, "gru": 3, "gru_rb": 3, "simple_rnn": 1}[cell]
    p = _common.plan(B, H, dtype, G * H, lambda NR, Hb, split: 4 * NR * Hb)
    assert p.split and p.unit_blocks >= 2 and p.blocks == p.unit_blocks * -(-B // p.rows)
    if SIM:
        assert (p.unit_blocks, p.block_units, p.rows, p.padded_rows, p.blocks) == (3, 2, 3, 4, 6)
    o = DRIVER_OPTIONS[option]
    p = _driver_problem(rng, cell, shape, dtype, o)
    want = _run_driver(_Mods(cpu_lstm, cpu_gru, cpu_rnn), cell, p, o, dtype, False)
    got = _run_driver(_Mods(lstm, gru, simple_rnn), cell, p, o, dtype, True)
    for name, w in want.items():
        if w is None:
            assert got[name] is None, name
            continue
        g = got[name]
        if name == "actc" and p["mask"] is not None:
            live = p["mask"][:, :, None].repeat(w.shape[2], 2)
            g, w = np.where(live, g, 0), np.where(live, w, 0)
        assert_close(g, w, TOL[dtype] * max(1.0, np.abs(w).max()), name)
