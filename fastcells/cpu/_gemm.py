"""Small matrix products inside the recurrences, against weights packed once per call.

Every time step multiplies a few batch rows (a block of 8 to 64) by a weight matrix that does
not change during the call: ``h @ U``, ``[x | h | 1] @ [W; U; b]``, ``dz @ [W; U]^T``. BLAS
is poor at this shape because it re-packs the weight matrix at every call: on one thread
of an AVX-512 core OpenBLAS runs 16x1024 @ 1024x4096 at 30 GFLOP/s and 32x256 @ 256x1024
at 61 GFLOP/s, where the loop below runs at 79 and 109 GFLOP/s (the core's
peak, one 16-lane FMA per cycle, is about 114: ``_rates.product_rate``). This is what MKL's
packed GEMM and oneDNN's RNN primitive do for PyTorch.

``pack(V)`` lays the weights out once per call as column strips, ``[S, K, NR]`` (strip s holds
columns s*NR .. s*NR+NR-1, zero-padded past the last column), so that one step of the
summed dimension reads NR contiguous values. ``packed_dot(a, P, out)`` computes
``out = a @ V``: for each strip (it stays in the core's L2 cache), MR rows of ``a`` at a
time are multiplied into MR x NR accumulators held in vector registers, written in LLVM IR
(``_tile``) since Numba has no vector types and LLVM does not turn the scalar form into
this register blocking by itself (the scalar form runs at about 6 GFLOP/s).

Each output element is one fused multiply-add chain over k in order, whatever the number of
rows and threads: a row's result never depends on how the batch was split, so the kernels
that use this need no per-block GEMMs for determinism.

The register tile follows the host's vector width (AVX-512: 16 floats per register, 8 rows x
2 registers of accumulators; AVX2: 8 floats, 6 rows; otherwise 4 floats, 4 rows).
Numba's on-disk cache keys compiled kernels on the CPU's features, so a cache made on one
kind of CPU is not reused on another.
"""
import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from ._jit import called, kernel


def _host_vector_bytes():
    try:
        features = _llvm.get_host_cpu_features()
    except RuntimeError:            # no feature list on this host: assume plain SSE/NEON
        return 16
    if features.get("avx512f", False):
        return 64
    if features.get("avx2", False) or features.get("avx", False):
        return 32
    return 16


#: Bytes of one vector register; accumulator rows of a tile and vectors per strip.
VECTOR_BYTES = config.GEMM_VECTOR_BYTES or _host_vector_bytes()
if VECTOR_BYTES not in (16, 32, 64):
    raise ValueError(f"FASTCELLS_GEMM_VECTOR_BYTES must be 16, 32 or 64, got {VECTOR_BYTES}")
TILE_ROWS = {64: 8, 32: 6, 16: 4}[VECTOR_BYTES]
STRIP_VECTORS = 2


def strip_width(dtype):
    """NR: columns of one packed strip for this dtype."""
    return STRIP_VECTORS * VECTOR_BYTES // np.dtype(dtype).itemsize


def pack(V, out=None):
    """``V`` [K, N] -> column strips ``[ceil(N / NR), K, NR]``, zero past column N."""
    V = np.asarray(V)
    K, N = V.shape
    NR = strip_width(V.dtype)
    S = -(-N // NR)
    if out is None:
        out = np.empty((S, K, NR), V.dtype)
    _pack(V, out)
    return out


@kernel
def _pack(V, P):
    """P [S, K, NR] = the column strips of V [K, N], zero past column N."""
    K, N = V.shape
    S, _, NR = P.shape
    for k in range(K):              # rows of V in order: V may be a transposed view
        row = V[k]
        for s in range(S):
            c0 = s * NR
            w = min(NR, N - c0)
            ps = P[s, k]
            for j in range(w):
                ps[j] = row[c0 + j]
            pad = ps[w:]            # a view from 0: see _math.activate
            for j in range(pad.shape[0]):
                pad[j] = 0.0


def _row_pointer(builder, data, row, stride_bytes, itemsize):
    """Pointer to element [row, 0] of a 2-D array whose rows are ``stride_bytes`` apart."""
    i64 = ir.IntType(64)
    stride = builder.sdiv(stride_bytes, ir.Constant(i64, itemsize))
    return builder.gep(data, [builder.mul(row, stride)])


def _make_tile(MR):
    """An intrinsic ``tile(a, r0, P, s, out)``: out[r0:r0+MR, s*NR:(s+1)*NR] = a[r0:r0+MR] @
    strip s of P, with MR x NR accumulators in vector registers (columns past the end of
    ``out`` are not stored; the caller keeps r0 + MR <= rows of ``a``)."""

    @intrinsic
    def tile(typingctx, a, r0, P, s, out):
        if not (isinstance(a, types.Array) and isinstance(P, types.Array)
                and isinstance(out, types.Array)):
            return None
        if not (a.dtype == P.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
            return None
        if not (a.ndim == 2 and P.ndim == 3 and out.ndim == 2):
            return None
        sig = types.void(a, types.intp, P, types.intp, out)
        double = a.dtype == types.float64
        itemsize = 8 if double else 4
        lanes = VECTOR_BYTES // itemsize
        NV = STRIP_VECTORS
        a_unit_k = a.layout == "C"

        def codegen(context, builder, signature, args):
            a_v, r0_v, P_v, s_v, out_v = args
            fty = ir.DoubleType() if double else ir.FloatType()
            vty = ir.VectorType(fty, lanes)
            i32, i64 = ir.IntType(32), ir.IntType(64)
            A = context.make_array(signature.args[0])(context, builder, a_v)
            Pa = context.make_array(signature.args[2])(context, builder, P_v)
            O = context.make_array(signature.args[4])(context, builder, out_v)
            a_stride, a_kstride = cgutils.unpack_tuple(builder, A.strides, 2)
            if a_unit_k:        # C-contiguous a: consecutive k are adjacent
                ks = None
            else:               # any view, e.g. a transposed one: step over a's k stride
                ks = builder.sdiv(a_kstride, ir.Constant(i64, itemsize))
            _, K, NR = cgutils.unpack_tuple(builder, Pa.shape, 3)
            # strips and their rows are found through P's strides: a packed copy, or the
            # strip view of an unpacked matrix (strip_view)
            p_sstride, p_kstride, _ = cgutils.unpack_tuple(builder, Pa.strides, 3)
            p_ss = builder.sdiv(p_sstride, ir.Constant(i64, itemsize))
            p_ks = builder.sdiv(p_kstride, ir.Constant(i64, itemsize))
            N = cgutils.unpack_tuple(builder, O.shape, 2)[1]
            o_stride = cgutils.unpack_tuple(builder, O.strides, 2)[0]
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                f"llvm.fma.v{lanes}{'f64' if double else 'f32'}")
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vty, None))
                    for _ in range(NV)] for _ in range(MR)]
            rows = [_row_pointer(builder, A.data, builder.add(r0_v, ir.Constant(i64, r)),
                                 a_stride, itemsize) for r in range(MR)]
            strip = builder.gep(Pa.data, [builder.mul(s_v, p_ss)])
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            with cgutils.for_range(builder, K) as loop:
                k = loop.index
                ka = k if ks is None else builder.mul(k, ks)
                pk = builder.gep(strip, [builder.mul(k, p_ks)])
                w = [builder.load(builder.bitcast(
                    builder.gep(pk, [ir.Constant(i64, v * lanes)]), vty.as_pointer()),
                    align=itemsize) for v in range(NV)]
                for r in range(MR):
                    x = builder.load(builder.gep(rows[r], [ka]))
                    xb = builder.shuffle_vector(
                        builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                    for v in range(NV):
                        builder.store(builder.call(fma, [xb, w[v], builder.load(acc[r][v])]),
                                      acc[r][v])
            c0 = builder.mul(s_v, NR)
            full = builder.icmp_signed("<=", builder.add(c0, NR), N)
            spill = cgutils.alloca_once(builder, fty, size=NV * lanes)
            for r in range(MR):
                row = builder.add(r0_v, ir.Constant(i64, r))
                base = builder.gep(_row_pointer(builder, O.data, row, o_stride, itemsize), [c0])
                with builder.if_else(full) as (whole, tail):
                    with whole:
                        for v in range(NV):
                            ptr = builder.bitcast(
                                builder.gep(base, [ir.Constant(i64, v * lanes)]),
                                vty.as_pointer())
                            builder.store(builder.load(acc[r][v]), ptr, align=itemsize)
                    with tail:      # the last strip: its row through a buffer, up to column N
                        for v in range(NV):
                            ptr = builder.bitcast(
                                builder.gep(spill, [ir.Constant(i64, v * lanes)]),
                                vty.as_pointer())
                            builder.store(builder.load(acc[r][v]), ptr, align=itemsize)
                        # a loop, not a test per lane: unrolled, the tests of every tile
                        # made thousands of blocks that LLVM took tens of seconds to compile
                        with cgutils.for_range(builder, builder.sub(N, c0)) as col:
                            builder.store(builder.load(builder.gep(spill, [col.index])),
                                          builder.gep(base, [col.index]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


# Full tiles, then tiles of 4, 2 and 1 rows for the rest: no work on rows that are not there
# (one row, as in streaming inference, costs an eighth of a full tile). Every tile size
# runs the same multiply-add chain per element, so the results are the same bits.
_tile_full = _make_tile(TILE_ROWS)
_tile_4 = _make_tile(4)
_tile_2 = _make_tile(2)
_tile_1 = _make_tile(1)


# Called, not inlined (see _jit.called): inlined at each of its call sites, it made the
# LSTM's backward kernel take twice as long to compile.
@called
def packed_dot(a, P, out):
    """out[:M] = a @ V for ``P = pack(V)``: a [M, K] (any strides), out [>=M, N]
    with N <= the packed width. Every element is one multiply-add chain over k in order."""
    M = a.shape[0]
    for s in range(P.shape[0]):
        r0 = 0
        while r0 + TILE_ROWS <= M:
            _tile_full(a, r0, P, s, out)
            r0 += TILE_ROWS
        while r0 + 4 <= M:
            _tile_4(a, r0, P, s, out)
            r0 += 4
        while r0 + 2 <= M:
            _tile_2(a, r0, P, s, out)
            r0 += 2
        if r0 < M:
            _tile_1(a, r0, P, s, out)


_STRIP_BYTES = STRIP_VECTORS * VECTOR_BYTES


@njit(inline="always", **config.NJIT_OPTIONS)
def strip_columns(N, dtype_of):
    """N rounded up to whole strips (``dtype_of``'s dtype): the width to give a matrix that
    ``strip_view`` will read, with the extra columns zero."""
    NR = _STRIP_BYTES // dtype_of.itemsize
    return -(-N // NR) * NR


@njit(inline="always", **config.NJIT_OPTIONS)
def strip_view(V):
    """The strips ``[S, K, NR]`` of a C-contiguous V [K, S * NR] as a view, no copy:
    ``packed_dot(a, strip_view(V), out)`` = ``a @ V``, reading each strip's row k (NR
    contiguous values) a row of V apart. For operands made during a call, as the gate
    gradients of a window of steps in the weight-gradient products: copying them into
    packed strips takes as long as the product itself."""
    K, N = V.shape
    NR = _STRIP_BYTES // V.itemsize
    sk, sn = V.strides
    # as_strided, not reshape().transpose(axes): Numba's transpose checks its axes with a
    # set and a slice assignment whose error message formatting alone takes seconds to
    # compile
    return np.lib.stride_tricks.as_strided(V, shape=(N // NR, K, NR),
                                           strides=(NR * sn, sk, sn))


def pack_stack(Vs):
    """``pack`` of each matrix of a stack [G, K, N] -> [G, S, K, NR]."""
    Vs = np.asarray(Vs)
    K, N = Vs.shape[1:]
    NR = strip_width(Vs.dtype)
    out = np.empty((Vs.shape[0], -(-N // NR), K, NR), Vs.dtype)
    for g in range(Vs.shape[0]):
        _pack(Vs[g], out[g])
    return out
