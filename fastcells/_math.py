"""Activations and their derivatives, written once for every kernel, CPU and CUDA.

Each formula is a one-element ``njit`` function (``tanh32``, ``sigmoid32``, ``relu``, ...,
``d_tanh``, ...). The CPU kernels use them through ``activate``/``activate_grad``, which work
in place on ``a[lo:hi]`` of a 1-D array with the choice of activation made *outside* the
element loop so that every loop is a plain, vectorisable sweep. The CUDA kernels call the
same functions per element (numba-cuda compiles an ``njit`` function called from a kernel as
a device function), picked when the kernel is compiled by ``scalar_activation`` and
``scalar_derivative``. Derivatives are written in terms of the activation's output ``y``:
``d_tanh(y) = 1 - y*y``, ``d_sigmoid(y) = y * (1 - y)``.

float32 arrays use a rational approximation of tanh (sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5)
in plain arithmetic, because ``np.tanh`` never vectorises in Numba (no SVML in llvmlite).
Its coefficients come from a Lawson minimax iteration on
tanh(x)/x = P(x^2)/Q(x^2) over [0, 9]; relative error 6.6e-9 in exact arithmetic, 3.6e-7
absolute when evaluated in float32 (about 3 ulp of 1.0). The CPU kernels compile it with
multiply-adds fused (``config.NJIT_OPTIONS``): 2.9e-7 against 3.2e-7 unfused on every 7th
float32 of [2^-10, 9.5]. Beyond |x| = 9, tanh rounds to +-1 in float32. The coefficients
are float32 constants so that float32 arithmetic stays float32 (a float64 literal would
promote every operation).

float64 arrays use ``tanh64``: tanh|x| = -e / (e + 2) with e = expm1(-2|x|), and expm1 in
plain arithmetic (a degree-13 Taylor polynomial after reducing by k ln 2, and 2^-k built
from its exponent bits). It is within 3 ulp of ``math.tanh`` and 9 times as fast in a
vectorised loop (1.1 against 10 ns per element): ``math.tanh`` is a libm call per element,
which also keeps the loop around it scalar. ``fast_tanh`` and ``fast_sigmoid`` pick the
formula for the argument's type, so that a kernel is written once for both.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import config

# Activation codes shared by the kernels, the ops and the layers.
LINEAR, TANH, SIGMOID, RELU, HARD_SIGMOID = 0, 1, 2, 3, 4
ACTIVATIONS = {"linear": LINEAR, "tanh": TANH, "sigmoid": SIGMOID, "relu": RELU,
               "hard_sigmoid": HARD_SIGMOID}

# Coefficients as float32 constants, so that float32 arithmetic stays float32 (16 lanes).
_P0, _P1, _P2, _P3 = (np.float32(v) for v in (0.9999999933837763, 0.1308400634546222,
                                               0.0031039520427123017, 1.1154265152947508e-05))
_P4, _P5, _P6 = (np.float32(v) for v in (-2.0225053369783084e-08, 5.277866445591809e-11,
                                          -8.488501755971564e-14))
_Q0, _Q1, _Q2, _Q3 = (np.float32(v) for v in (1.0, 0.4641733344550002, 0.024495161723060124,
                                               0.000254613917789177))
_CLAMP = np.float32(9.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)

_jit = njit(inline="always", **config.NJIT_OPTIONS)


@_jit
def tanh32(x):
    """tanh(x) in plain float32 arithmetic, in [-1, 1]; max abs error 3.6e-7 (float32
    rounding)."""
    # Clamps as min/max: LLVM makes each one vmaxps and one vminps per vector, where the
    # same clamps written as if/elif comparisons become masked compare-and-move pairs on
    # the critical path (about 20% slower). min/max need not keep a NaN (numba-cuda lowers
    # them to fmaxf/fminf, which drop it), so the last line gives NaN back for a NaN
    # argument, on every target.
    x = np.float32(x)
    y = min(max(x, -_CLAMP), _CLAMP)
    s = y * y
    p = ((((((_P6 * s + _P5) * s + _P4) * s + _P3) * s + _P2) * s + _P1) * s + _P0)
    q = (((_Q3 * s + _Q2) * s + _Q1) * s + _Q0)
    # rounded in float32 the rational overshoots 1 by up to 2 ulp for |x| > 8 or so, which
    # made sigmoid32 return -6e-8 for large negative x; tanh itself never leaves [-1, 1]
    r = min(max(y * p / q, -_ONE), _ONE)
    return r if x == x else x


# expm1(r) = r + r^2/2! + ... + r^13/13! for |r| <= ln(2)/2: the first term left out is
# below 1.2e-17 of the result
_E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10, _E11, _E12, _E13 = (
    1.0 / math.factorial(n) for n in range(1, 14))
# ln 2 in two parts (Cody and Waite): k * _LN2_HI is exact for the k used here (k <= 58)
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_TWO_LOG2E = 2.0 / math.log(2.0)


@intrinsic
def _pow2(typingctx, k):
    """2.0 ** k for an int64 -1022 <= k <= 1023, from the exponent bits (a shift and no
    call, so that the loop around it stays vectorised)."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())
    return types.float64(types.int64), codegen


@_jit
def tanh64(x):
    """tanh(x) in float64 within 3 ulp of ``math.tanh``, in plain arithmetic so that a loop
    of it vectorises. tanh|x| = -e / (e + 2) with e = expm1(-2|x|) in (-1, 0]: no
    cancellation near 0; beyond |x| = 20, tanh rounds to 1."""
    a = min(abs(x), 20.0)
    k = np.int64(a * _TWO_LOG2E + 0.5)                  # round(2a / ln 2), 0 <= k <= 58
    r = (-2.0 * a + k * _LN2_HI) + k * _LN2_LO          # -2a = r - k ln 2, |r| <= ln(2)/2
    p = r * (_E1 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * (
        _E7 + r * (_E8 + r * (_E9 + r * (_E10 + r * (_E11 + r * (_E12 + r * _E13))))))))))))
    s = _pow2(-k)
    e = s * p + (s - 1.0)                   # expm1(-2a) = 2^-k expm1(r) + 2^-k - 1
    t = math.copysign((0.0 - e) / (e + 2.0), x)         # 0.0 - e: tanh(0) is +0, not -0
    return t if x == x else x


def fast_tanh(x):
    """tanh in plain arithmetic for compiled code: ``tanh32`` for a float32 argument,
    ``tanh64`` for a float64 one."""
    return math.tanh(x)


def fast_sigmoid(x):
    """sigmoid(x) = 0.5 * fast_tanh(0.5 x) + 0.5 (``sigmoid32`` for float32)."""
    return 0.5 * math.tanh(0.5 * x) + 0.5


# The overloads compile with the flags of the kernel that calls them (multiply-adds fused),
# so that fast_tanh gives the bits tanh32 gives inlined into the same kernel. Not
# inline="always": Numba's IR inliner then warned about the phi of tanh64's NaN test.
@overload(fast_tanh)
def _fast_tanh(x):
    if x == types.float64:
        return lambda x: tanh64(x)
    return lambda x: tanh32(x)


@overload(fast_sigmoid)
def _fast_sigmoid(x):
    if x == types.float64:
        return lambda x: 0.5 * tanh64(0.5 * x) + 0.5
    return lambda x: sigmoid32(x)


# --- one element: the formulas, written once ---------------------------------------------
# Plain scalar functions, inlined into the CPU loops below and compiled as device functions
# when a CUDA kernel calls them (numba-cuda turns an ``njit`` dispatcher called from a kernel
# into a device function of the same Python source).
@_jit
def sigmoid32(x):
    """sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5 with the float32 tanh above."""
    return _HALF * tanh32(_HALF * x) + _HALF


# ``math`` rather than ``np`` functions: the same machine code on the CPU (checked bit for
# bit), and numba-cuda has no scalar NumPy exp/tanh on the device.
@_jit
def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@_jit
def exact_tanh(x):
    return math.tanh(x)


@_jit
def relu(x):
    return 0.0 if x < 0.0 else x          # NaN stays NaN


@_jit
def hard_sigmoid(x):
    # Keras 3: relu6(x + 3) / 6
    v = x + 3.0
    v = 0.0 if v < 0.0 else (6.0 if v > 6.0 else v)   # NaN stays NaN
    return v / 6.0


@_jit
def linear(x):
    return x


# d * act'(x) from the activation's output y = act(x)
@_jit
def d_tanh(d, y):
    return d - d * y * y


@_jit
def d_sigmoid(d, y):
    return d * (y - y * y)


@_jit
def d_relu(d, y):
    return d if y > 0.0 else 0.0


@_jit
def d_hard_sigmoid(d, y):
    return d / 6.0 if 0.0 < y < 1.0 else 0.0


@_jit
def d_linear(d, y):
    return d


def scalar_activation(code, fast):
    """The one-element function of an activation code (``fast``: the float32 tanh), for
    kernels that fix the activation when they are compiled (the CUDA kernels)."""
    if code == TANH:
        return tanh32 if fast else exact_tanh
    if code == SIGMOID:
        return sigmoid32 if fast else sigmoid
    return {RELU: relu, HARD_SIGMOID: hard_sigmoid, LINEAR: linear}[code]


def scalar_derivative(code):
    """``d(d, y) = d * act'(x)`` for an activation code, y = act(x)."""
    return {TANH: d_tanh, SIGMOID: d_sigmoid, RELU: d_relu, HARD_SIGMOID: d_hard_sigmoid,
            LINEAR: d_linear}[code]


# --- a range of a 1-D array: the CPU kernels' loops ---------------------------------------
@_jit
def activate(code, fast, a, lo, hi):
    """a[lo:hi] = act(a[lo:hi]) in place. ``fast``: ``fast_tanh``/``fast_sigmoid``. The
    choice is made outside the element loops so that every loop is a plain sweep.

    Every loop runs over a view from index 0: a loop ``for j in range(lo, hi)`` with a
    runtime ``lo`` does not vectorise (Numba's negative-index wraparound on ``a[j]``), which
    makes the tanh of 32 floats per row and step 8 times as slow."""
    v = a[lo:hi]
    n = v.shape[0]
    if code == TANH:
        if fast:
            for j in range(n):
                v[j] = fast_tanh(v[j])
        else:
            for j in range(n):
                v[j] = exact_tanh(v[j])
    elif code == SIGMOID:
        if fast:
            for j in range(n):
                v[j] = fast_sigmoid(v[j])
        else:
            for j in range(n):
                v[j] = sigmoid(v[j])
    elif code == RELU:
        for j in range(n):
            v[j] = relu(v[j])
    elif code == HARD_SIGMOID:
        for j in range(n):
            v[j] = hard_sigmoid(v[j])


@_jit
def activate_grad(code, y, d, lo, hi):
    """d[lo:hi] *= act'(x) where y[lo:hi] = act(x); both 1-D. Written without float64
    constants so that float32 stays float32; loops from 0 over views (see ``activate``)."""
    yv = y[lo:hi]
    dv = d[lo:hi]
    n = dv.shape[0]
    if code == TANH:
        for j in range(n):
            dv[j] = d_tanh(dv[j], yv[j])
    elif code == SIGMOID:
        for j in range(n):
            dv[j] = d_sigmoid(dv[j], yv[j])
    elif code == RELU:
        for j in range(n):
            dv[j] = d_relu(dv[j], yv[j])
    elif code == HARD_SIGMOID:
        for j in range(n):
            dv[j] = d_hard_sigmoid(dv[j], yv[j])


def gate_coefficients(codes, units, dtype):
    """Per-column coefficients [3, G*H] (a, s, o) with act(x) = tanh(a x) * s + o for gates
    that are tanh or sigmoid (sigmoid(x) = 0.5 tanh(0.5 x) + 0.5), so that all gates of a
    row are one vectorised loop. None when a gate uses another activation."""
    table = {TANH: (1.0, 1.0, 0.0), SIGMOID: (0.5, 0.5, 0.5)}
    if any(c not in table for c in codes):
        return None
    coef = np.empty((3, len(codes) * units), dtype)
    for k, c in enumerate(codes):
        coef[:, k * units:(k + 1) * units] = np.array(table[c], dtype)[:, None]
    return coef


def activation_code(activation):
    """Map a Keras activation (name, function or None) to a kernel code, or None if the
    kernels do not cover it."""
    if activation is None:
        return LINEAR
    name = activation if isinstance(activation, str) else getattr(activation, "__name__", None)
    return ACTIVATIONS.get(name)

