"""The packed in-step matrix product (fastcells/cpu/_gemm.py) against NumPy in float64."""
import os
import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from fastcells.cpu import _gemm


@njit(cache=False)
def _dot(a, P, out):
    _gemm.packed_dot(a, P, out)


def _operands(rng, M, K, N, dtype):
    # rows of ``a`` and ``out`` a stride apart (views into wider arrays), as in the kernels
    a = rng.standard_normal((M + 2, K + 3)).astype(dtype)[1:M + 1, 2:K + 2]
    V = rng.standard_normal((K, N)).astype(dtype)
    out = np.full((M + 1, N + 5), 7.0, dtype)[:, 1:N + 1]
    return a, V, out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("N", [1, 7, 16, 31, 32, 33, 70])
@pytest.mark.parametrize("K", [1, 5, 40])
def test_packed_dot_matches_numpy(dtype, M, K, N):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    a, V, out = _operands(rng, M, K, N, dtype)
    _dot(a, _gemm.pack(V), out)
    ref = a.astype(np.float64) @ V.astype(np.float64)
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert np.abs(out[:M] - ref).max() <= tol * np.sqrt(K) * np.abs(ref).max()
    assert (out[M] == 7.0).all(), "a row past the rows of `a` was written"
    base = out.base
    assert (base[:, 0] == 7.0).all() and (base[:, N + 1:] == 7.0).all(), \
        "a column outside `out` was written"


@njit(cache=False)
def _dot_strips(a, V, out):
    _gemm.packed_dot(a, _gemm.strip_view(V), out)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("N", [1, 31, 32, 33, 96, 128])
@pytest.mark.parametrize("K", [1, 40, 512])
def test_strip_view_reads_an_unpacked_matrix_in_place(dtype, K, N):
    """``packed_dot`` through ``strip_view`` of V widened to whole strips (the extra
    columns zero, as the fused backwards allocate their window gradients) gives the bits
    of the packed copy, stores only the N columns of ``out``, and is right."""
    rng = np.random.default_rng(K + N)
    M = 17
    a = rng.standard_normal((K, M)).astype(dtype).T        # s^T, as in the window products
    V = rng.standard_normal((K, N)).astype(dtype)
    width = _gemm.strip_columns(N, V)
    assert width % _gemm.strip_width(dtype) == 0 and N <= width < N + _gemm.strip_width(dtype)
    wide = np.zeros((K, width), dtype)
    wide[:, :N] = V
    out = np.full((M, N + 1), 7.0, dtype)[:, :N]
    packed = np.empty((M, N), dtype)
    _dot_strips(a, wide, out)
    _dot(a, _gemm.pack(V), packed)
    assert np.array_equal(out, packed)
    assert (out.base[:, N] == 7.0).all(), "a column outside `out` was written"
    ref = a.astype(np.float64) @ V.astype(np.float64)
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert np.abs(out - ref).max() <= tol * np.sqrt(K) * np.abs(ref).max()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("view", ["transposed", "every_other_column"])
def test_any_view_of_a_gives_the_bits_of_a_contiguous_copy(dtype, view):
    """``a`` whose consecutive k are not adjacent (a transposed view, a column step) is read
    through its strides: the same bits as its contiguous copy, and right."""
    rng = np.random.default_rng(5)
    M, K, N = 11, 37, 45
    if view == "transposed":
        a = rng.standard_normal((K, M)).astype(dtype).T
    else:
        a = rng.standard_normal((M, 2 * K)).astype(dtype)[:, ::2]
    V = rng.standard_normal((K, N)).astype(dtype)
    P = _gemm.pack(V)
    out, out_c = np.empty((M, N), dtype), np.empty((M, N), dtype)
    _dot(a, P, out)
    _dot(np.ascontiguousarray(a), P, out_c)
    assert np.array_equal(out, out_c)
    ref = a.astype(np.float64) @ V.astype(np.float64)
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert np.abs(out - ref).max() <= tol * np.sqrt(K) * np.abs(ref).max()


def test_pack_pads_strips_with_zeros():
    V = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    P = _gemm.pack(V)
    NR = _gemm.strip_width(np.float32)
    assert P.shape == (1, 3, NR)
    assert np.array_equal(P[0, :, :5], V) and not P[0, :, 5:].any()
    stack = _gemm.pack_stack(np.stack([V, 2 * V]))
    assert np.array_equal(stack[1], _gemm.pack(2 * V))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_row_does_not_depend_on_the_other_rows(dtype):
    """Thread-count determinism rests on this: each row is computed the same way whether it
    is alone, first, or in the middle of a partial tile."""
    rng = np.random.default_rng(3)
    a, V, out = _operands(rng, 13, 65, 128, dtype)
    P = _gemm.pack(V)
    _dot(a, P, out)
    for r in range(13):
        one = np.empty((1, 128), dtype)
        _dot(a[r:r + 1], P, one)
        assert np.array_equal(one[0], out[r])


def test_nan_propagates():
    a = np.ones((4, 3), np.float32)
    V = np.ones((3, 20), np.float32)
    V[1, 7] = np.nan
    out = np.empty((4, 20), np.float32)
    _dot(a, _gemm.pack(V), out)
    assert np.isnan(out[:, 7]).all() and np.isfinite(np.delete(out, 7, axis=1)).all()


_OTHER_WIDTH = r"""
import sys
import numpy as np
from numba import njit
from fastcells import ops
from fastcells.cpu import _gemm
assert sys.argv[1] == "host" or _gemm.VECTOR_BYTES == int(sys.argv[1])

@njit
def dot(a, P, out):
    _gemm.packed_dot(a, P, out)

rng = np.random.default_rng(0)
res = {}
for M, K, N in [(1, 3, 5), (7, 33, 70), (13, 65, 128)]:
    a = rng.standard_normal((M, K)).astype(np.float32)
    V = rng.standard_normal((K, N)).astype(np.float32)
    out = np.empty((M, N), np.float32)
    dot(a, _gemm.pack(V), out)
    res[f"dot{M}"] = out
for cell in sys.argv[3].split(","):
    G = {"lstm": 4, "gru": 3, "simple_rnn": 1}[cell]
    x = rng.standard_normal((5, 6, 3)).astype(np.float32)
    W = rng.standard_normal((3, G * 4)).astype(np.float32)
    U = rng.standard_normal((4, G * 4)).astype(np.float32)
    f = getattr(ops, cell + "_forward")(x, W, U, None, training=True)
    g = getattr(ops, cell + "_backward")(f.cache, np.ones_like(f.outputs))
    res[cell + "_y"], res[cell + "_dx"], res[cell + "_dU"] = f.outputs, g.x, g.recurrent_kernel
np.savez(sys.argv[2], vector_bytes=_gemm.VECTOR_BYTES, **res)
"""


@pytest.mark.early
@pytest.mark.parametrize("width,cells", [(32, "gru,simple_rnn"), (16, "lstm")])
def test_other_vector_widths_give_the_same_bits(tmp_path, width, cells):
    """The AVX2 (32-byte) and SSE/NEON (16-byte) forms of the tile, compiled here with the
    kernel cache off: each lane runs the same multiply-add chain as a scalar would, so the
    products and whole forward/backward passes equal this machine's own, bit for bit. Where
    the host's own form is the one asked for, the AVX-512 (64-byte) form stands in for it
    (LLVM splits its vectors on a narrower host), so the two runs never share a width."""
    if width == _gemm._host_vector_bytes():
        width = 64
    here = tmp_path / "here.npz"
    there = tmp_path / "there.npz"
    script = tmp_path / "run.py"
    script.write_text(_OTHER_WIDTH)
    env = dict(os.environ)
    env.pop("FASTCELLS_GEMM_VECTOR_BYTES", None)
    subprocess.run([sys.executable, str(script), "host", str(here), cells], check=True,
                   env=env, timeout=600)
    env["FASTCELLS_GEMM_VECTOR_BYTES"] = str(width)
    out = subprocess.run([sys.executable, str(script), str(width), str(there), cells],
                         env=env, timeout=600, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = np.load(here), np.load(there)
    assert int(b["vector_bytes"]) == width != int(a["vector_bytes"]), (a["vector_bytes"], width)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        if k != "vector_bytes":
            assert np.array_equal(a[k], b[k]), k
