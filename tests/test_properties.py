"""Property-based tests: random cell, shape and options, kernels against the reference.

Also drawn: the activations (tanh or relu; sigmoid or hard_sigmoid for the gates), upstream
gradients of the final states, the thread count, the batch block and window sizes of the
fused kernels, fused or unfused paths, and chunked recomputation (checkpoint_steps).

A bounded number of examples in CI; set FASTCELLS_HYPOTHESIS_EXAMPLES for more.
"""
import os
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import reference as R
from fastcells import config, ops
from fastcells.bench import relative_error
from helpers import make_problem

EXAMPLES = int(os.environ.get("FASTCELLS_HYPOTHESIS_EXAMPLES", "40"))


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(["lstm", "gru", "simple_rnn"]))
    B = draw(st.integers(1, 9))
    T = draw(st.integers(1, 12))
    D = draw(st.integers(1, 7))
    H = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    opts = dict(
        bias=draw(st.booleans()),
        reset_after=draw(st.booleans()),
        use_mask=draw(st.booleans()),
        dropout=draw(st.booleans()),
        recurrent_dropout=draw(st.booleans()),
        per_gate=draw(st.booleans()),
        go_backwards=draw(st.booleans()),
        zero_output_for_mask=draw(st.booleans()),
        return_sequences=draw(st.booleans()),
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        threads=draw(st.integers(1, 3)),
        block_rows=draw(st.integers(1, 5)),
        window=draw(st.integers(1, 4)),
        stage_bytes=draw(st.integers(1, 2000)),     # input staged 1 .. T steps at a time
        fused=draw(st.booleans()),
        checkpoint=draw(st.one_of(st.none(), st.integers(1, 5))),
        activation=draw(st.sampled_from(["tanh", "relu"])),
        recurrent_activation=draw(st.sampled_from(["sigmoid", "hard_sigmoid"])),
        state_grads=draw(st.booleans()),
    )
    return cell, (B, T, D, H), seed, opts


#: relu outputs that grow to about 90 in float32: a bound of 1e-5 not scaled by the size
#: would be 2 ulps there
GROWING_RELU = ("simple_rnn", (4, 12, 3, 5), 1, dict(
    bias=False, reset_after=False, use_mask=False, dropout=False, recurrent_dropout=False,
    per_gate=False, go_backwards=False, zero_output_for_mask=False, return_sequences=False,
    dtype=np.float32, threads=1, block_rows=1, window=1, stage_bytes=1, fused=False,
    checkpoint=None, activation="relu", recurrent_activation="sigmoid", state_grads=False))


#: The ulps of error allowed in each value the kernels keep in the problem's dtype (see
#: ulp_sensitivity; the kernels stay within about 3 of them where the sensitivity decides)
ULPS = 8


def ulp_sensitivity(cell, args, d_outputs, d_states, opts, dtype):
    """How finely the problem's dtype resolves each reference gradient (x, kernel,
    recurrent_kernel, [bias], states): the largest relative_error of the gradients when
    every value moves by one ulp of ``dtype``, in three probes: the tanh and sigmoid
    outputs away from zero, then also each argument and upstream gradient one way at random,
    with the outputs away from zero and towards it. The kernels take the derivatives from
    the activations' outputs (1 - y^2, y (1 - y)), so where a path saturates (a gradient
    decayed through many steps, or one that flows through a single saturated unit), or where
    a gradient is a sum that cancels, one ulp moves it by much more than an ulp; elsewhere
    the sensitivity is a few ulps and the plain bound decides."""
    inf = np.array(np.inf, dtype)

    def moved(f, direction):
        def g(z):
            y = np.asarray(f(z), dtype)
            return np.nextafter(y, direction * np.copysign(inf, y)).astype(np.float64)
        return g

    want = getattr(R, cell + "_backward")(*args, d_outputs=d_outputs, d_states=d_states,
                                          **opts)
    worst = None
    for seed, direction in ((None, 1), (0, 1), (1, -1)):
        rng = np.random.default_rng(seed)

        def move(a):
            if a is None or seed is None:
                return a
            a = np.asarray(a, dtype)
            return np.where(a == 0, a, np.nextafter(a, np.where(rng.random(a.shape) < 0.5,
                                                                -inf, inf)))
        acts = {k: (moved(R.ACTS[k][0], direction), R.ACTS[k][1]) for k in ("tanh", "sigmoid")}
        with mock.patch.dict(R.ACTS, acts):
            got = getattr(R, cell + "_backward")(
                *[move(a) for a in args], d_outputs=move(d_outputs),
                d_states=None if d_states is None else [move(d) for d in d_states], **opts)
        errs = [relative_error(got[k], want[k]) for k in ("x", "kernel", "recurrent_kernel")]
        errs += [] if want["bias"] is None else [relative_error(got["bias"], want["bias"])]
        errs += [relative_error(a, b) for a, b in zip(got["states"], want["states"])]
        worst = errs if worst is None else [max(a, b) for a, b in zip(worst, errs)]
    return worst


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
@example(GROWING_RELU)
def test_kernels_equal_reference(problem):
    cell, (B, T, D, H), seed, o = problem
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7 if o["use_mask"] else None
    p, opts = make_problem(rng, cell, B, T, D, H, bias=o["bias"], reset_after=o["reset_after"],
                           mask=mask, dropout=o["dropout"],
                           recurrent_dropout=o["recurrent_dropout"],
                           per_gate=o["per_gate"], dtype=o["dtype"])
    opts.update(go_backwards=o["go_backwards"], zero_output_for_mask=o["zero_output_for_mask"],
                activation=o["activation"])
    if cell != "simple_rnn":
        opts["recurrent_activation"] = o["recurrent_activation"]
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    names = ("NUM_THREADS", "MIN_ROWS_PER_THREAD", "BLOCK_ROWS", "WINDOW_STEPS", "FUSED",
             "STAGE_BYTES")
    old = [getattr(config, n) for n in names]
    for n, v in zip(names, (o["threads"], 1, o["block_rows"], o["window"], o["fused"],
                            o["stage_bytes"])):
        setattr(config, n, v)
    try:
        f = getattr(ops, cell + "_forward")(*args, return_sequences=o["return_sequences"],
                                            checkpoint_steps=o["checkpoint"], **opts)
        yr, sr = getattr(R, cell + "_forward")(*args, **opts)
        dy = rng.standard_normal(yr.shape)
        # upstream gradients of the final states (h, and c for the LSTM), or none
        ds = [rng.standard_normal(s.shape) for s in sr] if o["state_grads"] else None
        d_states = [] if ds is None else [d.astype(o["dtype"]) for d in ds]
        if not o["return_sequences"]:
            yr, dy_last = yr[:, -1], dy[:, -1]
            dy = np.zeros_like(dy)
            dy[:, -1] = dy_last
            g = getattr(ops, cell + "_backward")(f.cache, dy_last.astype(o["dtype"]),
                                                 *d_states)
        else:
            g = getattr(ops, cell + "_backward")(f.cache, dy.astype(o["dtype"]), *d_states)
    finally:
        for n, v in zip(names, old):
            setattr(config, n, v)
    gr = getattr(R, cell + "_backward")(*args, d_outputs=dy, d_states=ds, **opts)
    f64 = o["dtype"] == np.float64
    tol_out = 1e-10 if f64 else 1e-5       # absolute below 1, relative to the largest above
    for a, b in [(f.outputs, yr)] + list(zip(f.states, sr)):
        np.testing.assert_allclose(a, b, atol=tol_out * max(1.0, np.abs(b).max(initial=0)),
                                   rtol=0)
    pairs = [(g.x, gr["x"]), (g.kernel, gr["kernel"]),
             (g.recurrent_kernel, gr["recurrent_kernel"])]
    if p["bias"] is not None:
        pairs.append((g.bias, gr["bias"]))
    pairs += list(zip(g.states, gr["states"]))
    # relative to the gradient's size whatever it is (no absolute floor below norm 1), or
    # within ULPS ulps of every value where the dtype resolves the gradient less finely
    tol_grad = config.TOL_F64 if f64 else config.TOL_GRAD_F32
    tiny = np.finfo(o["dtype"]).tiny        # the kernels flush subnormal numbers to zero
    sensitivity = None
    for k, (a, b) in enumerate(pairs):
        err = relative_error(a, np.where(np.abs(b) < tiny, 0.0, b))
        if not err <= tol_grad:
            if sensitivity is None:
                sensitivity = ulp_sensitivity(cell, args, dy, ds, opts, o["dtype"])
            assert err <= ULPS * sensitivity[k], (k, err, sensitivity[k], np.linalg.norm(b))
