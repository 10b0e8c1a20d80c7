"""The activations of ``fastcells._math`` against float64 NumPy: the rational float32 tanh
and sigmoid, the float64 tanh in plain arithmetic, and ``activate`` / ``activate_grad`` on a
range of a row (the form every CPU kernel uses)."""
import numpy as np
import pytest
from numba import njit

from fastcells import _math as M, config


@njit
def _map(f, a):
    out = np.empty_like(a)
    for i in range(a.shape[0]):
        out[i] = f(a[i])
    return out


def _grid():
    """Every float32 step near 0, a dense sweep through the curved part, the clamp at 9 and
    far beyond."""
    parts = [np.linspace(-12, 12, 400_001), np.geomspace(1e-30, 1e-3, 2000),
             np.array([0.0, 8.999999, 9.0, 9.000001, 30.0, 1e30, 3.4e38])]
    a = np.concatenate([parts[0], parts[1], -parts[1], parts[2], -parts[2]])
    return a.astype(np.float32)


def test_float32_tanh_is_within_its_documented_error_of_float64_tanh():
    x = _grid()
    got = _map(M.tanh32, x)
    assert got.dtype == np.float32
    err = np.abs(got.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() <= 4e-7, f"max |tanh32 - tanh| = {err.max():.3g} at x = {x[err.argmax()]}"
    # odd, bounded by 1, and exact near 0 where tanh(x) rounds to x
    np.testing.assert_array_equal(_map(M.tanh32, -x), -got)
    assert np.abs(got).max() <= 1.0
    tiny = x[np.abs(x) < 1e-4]
    np.testing.assert_allclose(_map(M.tanh32, tiny), tiny, rtol=2e-7, atol=0)


def test_float32_sigmoid_is_within_its_documented_error_of_float64_sigmoid():
    x = _grid()
    got = _map(M.sigmoid32, x)
    with np.errstate(over="ignore"):        # exp(3.4e38) is inf: the sigmoid is 0
        want = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    err = np.abs(got.astype(np.float64) - want)
    assert err.max() <= 2.5e-7, f"max error {err.max():.3g} at x = {x[err.argmax()]}"
    assert got.min() >= 0.0 and got.max() <= 1.0


@pytest.mark.parametrize("f", [M.tanh32, M.sigmoid32])
def test_float32_activations_propagate_nan_and_saturate_at_infinity(f):
    got = _map(f, np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(got[0])
    want_hi, want_lo = (1.0, -1.0) if f is M.tanh32 else (1.0, 0.0)
    assert got[1] == want_hi and got[2] == want_lo


def _grid64():
    """A dense sweep through the curved part and past 20 (where tanh rounds to 1), each
    branch of the exponent reduction, tiny and subnormal arguments, and the extremes."""
    k = np.arange(60)
    parts = [np.linspace(-25, 25, 1_000_001), np.geomspace(5e-324, 1e-3, 4000),
             k * np.log(2.0) / 2 + np.array([[-1e-12], [0.0], [1e-12]]).repeat(60, 1),
             np.array([0.0, 19.99, 20.0, 20.01, 700.0, 1e300, 1.7e308])]
    a = np.concatenate([p.ravel() for p in parts])
    return np.concatenate([a, -a])


def test_float64_tanh_is_within_3_ulp_of_numpy():
    x = _grid64()
    got = _map(M.tanh64, x)
    want = np.tanh(x)
    ulp = np.spacing(np.abs(want))
    err = np.abs(got - want) / ulp
    assert err.max() <= 3, f"{err.max():.2f} ulp at x = {x[err.argmax()]!r}"
    # odd, exactly, with the sign of zero kept
    np.testing.assert_array_equal(_map(M.tanh64, -x), -got)
    zeros = _map(M.tanh64, np.array([0.0, -0.0]))
    assert zeros[0] == 0.0 and not np.signbit(zeros[0]) and np.signbit(zeros[1])


def test_float64_tanh_propagates_nan_and_saturates_at_infinity():
    got = _map(M.tanh64, np.array([np.nan, np.inf, -np.inf]))
    assert np.isnan(got[0]) and got[1] == 1.0 and got[2] == -1.0


def _kernel_map(f):
    """``f`` over a 1-D array, compiled with the kernels' options (multiply-adds fused), so
    that functions inlined into it round as they do inside a kernel."""
    @njit(**{k: v for k, v in config.NJIT_OPTIONS.items() if k != "cache"})
    def run(a):
        out = np.empty_like(a)
        for i in range(a.shape[0]):
            out[i] = f(a[i])
        return out
    return run


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_activations_pick_the_formula_of_the_argument_type(dtype):
    """fast_tanh and fast_sigmoid are tanh32 and sigmoid32 bit for bit on float32, and tanh64
    and 0.5 tanh64(x / 2) + 0.5 on float64 (in the kernels, one source for both types)."""
    x = (np.linspace(-12, 12, 10_001)).astype(dtype)
    t, s = _kernel_map(M.fast_tanh)(x), _kernel_map(M.fast_sigmoid)(x)
    assert t.dtype == s.dtype == dtype
    if dtype == np.float32:
        np.testing.assert_array_equal(t, _kernel_map(M.tanh32)(x))
        np.testing.assert_array_equal(s, _kernel_map(M.sigmoid32)(x))
    else:
        np.testing.assert_array_equal(t, _map(M.tanh64, x))
        np.testing.assert_array_equal(s, 0.5 * _map(M.tanh64, 0.5 * x) + 0.5)
        np.testing.assert_allclose(s, 1.0 / (1.0 + np.exp(-x)), rtol=0, atol=3e-16)


CODES = [(M.TANH, np.tanh), (M.SIGMOID, lambda v: 1.0 / (1.0 + np.exp(-v))),
         (M.RELU, lambda v: np.maximum(v, 0.0)),
         (M.HARD_SIGMOID, lambda v: np.clip(v + 3.0, 0.0, 6.0) / 6.0)]


@njit
def _activate_rows(code, fast, a, lo, hi):
    for i in range(a.shape[0]):
        M.activate(code, fast, a[i], lo, hi)


@njit
def _activate_grad_rows(code, y, d, lo, hi):
    for i in range(d.shape[0]):
        M.activate_grad(code, y[i], d[i], lo, hi)


@pytest.mark.parametrize("code,ref", CODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "exact"])
@pytest.mark.parametrize("lo,hi", [(0, 32), (32, 64), (5, 61), (17, 18), (64, 96), (40, 40)])
def test_activate_changes_exactly_the_range_and_matches_numpy(code, ref, dtype, fast, lo, hi,
                                                              rng):
    a = (rng.standard_normal((7, 96)) * 4).astype(dtype)
    got = a.copy()
    _activate_rows(code, fast, got, lo, hi)
    np.testing.assert_array_equal(got[:, :lo], a[:, :lo])
    np.testing.assert_array_equal(got[:, hi:], a[:, hi:])
    tol = 4e-7 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(got[:, lo:hi], ref(a[:, lo:hi].astype(np.float64)), rtol=0,
                               atol=tol)


@pytest.mark.parametrize("code", [M.TANH, M.SIGMOID])
@pytest.mark.parametrize("fast", [True, False])
def test_activate_keeps_nan_and_saturates_in_vectorised_rows(code, fast, rng):
    """NaN and infinities scattered through rows long enough for the vector loops (the
    float32 tanh clamps with min/max and must give the NaN back itself)."""
    a = (rng.standard_normal((3, 80)) * 20).astype(np.float32)
    nan_at, pinf_at, ninf_at = [0, 17, 33, 79], [5, 40], [6, 63]
    a[:, nan_at], a[:, pinf_at], a[:, ninf_at] = np.nan, np.inf, -np.inf
    got = a.copy()
    _activate_rows(code, fast, got, 0, 80)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(a))
    hi, lo = (1.0, -1.0) if code == M.TANH else (1.0, 0.0)
    assert (got[:, pinf_at] == hi).all() and (got[:, ninf_at] == lo).all()
    finite = np.isfinite(a)
    ref = np.tanh(a[finite].astype(np.float64)) if code == M.TANH else \
        1.0 / (1.0 + np.exp(-a[finite].astype(np.float64)))
    np.testing.assert_allclose(got[finite], ref, rtol=0, atol=4e-7)


DERIVATIVES = [(M.TANH, lambda y: 1.0 - y * y), (M.SIGMOID, lambda y: y * (1.0 - y)),
               (M.RELU, lambda y: (y > 0).astype(float)),
               (M.HARD_SIGMOID, lambda y: ((y > 0) & (y < 1)) / 6.0)]


@pytest.mark.parametrize("code,dref", DERIVATIVES)
@pytest.mark.parametrize("lo,hi", [(0, 32), (32, 64), (5, 61), (64, 96)])
def test_activate_grad_changes_exactly_the_range_and_matches_the_derivative(code, dref, lo,
                                                                            hi, rng):
    y = rng.uniform(-0.2, 1.0, (5, 96))
    if code in (M.TANH, M.SIGMOID):
        y = rng.uniform(0.01, 0.99, (5, 96))
    d = rng.standard_normal((5, 96))
    got = d.copy()
    _activate_grad_rows(code, y, got, lo, hi)
    np.testing.assert_array_equal(got[:, :lo], d[:, :lo])
    np.testing.assert_array_equal(got[:, hi:], d[:, hi:])
    np.testing.assert_allclose(got[:, lo:hi], d[:, lo:hi] * dref(y[:, lo:hi]), rtol=1e-14,
                               atol=1e-15)
