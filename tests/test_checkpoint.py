"""Chunked recomputation (``checkpoint_steps``): the same gradients as the full cache, and a
cache that no longer grows with the sequence length."""
import numpy as np
import pytest

import reference as R
from fastcells import config, ops
from fastcells.bench import relative_error
from helpers import NSTATES, make_problem, random_mask

CASES = [
    ("lstm", dict()),
    ("lstm", dict(use_mask=True, go_backwards=True)),
    ("lstm", dict(use_mask=True, return_sequences=False, dropout=True, recurrent_dropout=True)),
    ("gru", dict(use_mask=True, zero_output_for_mask=True)),
    ("gru", dict(use_mask=True, go_backwards=True, dropout=True, recurrent_dropout=True)),
    ("gru_rb", dict(use_mask=True, return_sequences=False)),
    ("gru_rb", dict(dropout=True, per_gate=False, go_backwards=True)),
    ("simple_rnn", dict(use_mask=True, go_backwards=True, dropout=True,
                        recurrent_dropout=True, per_gate=False)),
    ("simple_rnn", dict(use_mask=True, zero_output_for_mask=True, return_sequences=False)),
]


@pytest.fixture(autouse=True)
def several_threads(monkeypatch):
    monkeypatch.setattr(config, "MIN_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(config, "NUM_THREADS", 2)
    monkeypatch.setattr(config, "BLOCK_ROWS", 2)
    monkeypatch.setattr(config, "WINDOW_STEPS", 2)
    monkeypatch.setattr(config, "STAGE_BYTES", 150)


def _problem(rng, name, o, B, T, D, H, dtype):
    cell, reset_after = ("gru", False) if name == "gru_rb" else (name, True)
    o = dict(o)
    mask = random_mask(rng, B, T) if o.pop("use_mask", False) else None
    if mask is not None:
        mask[:, T // 2:T // 2 + 3] = False      # a masked stretch across a chunk boundary
    p, opts = make_problem(rng, cell, B, T, D, H, reset_after=reset_after, mask=mask,
                           dropout=o.pop("dropout", False),
                           recurrent_dropout=o.pop("recurrent_dropout", False),
                           per_gate=o.pop("per_gate", True), dtype=dtype)
    opts["return_sequences"] = o.pop("return_sequences", True)
    opts.update(o)
    return cell, p, opts


def _run(cell, p, opts, dy, ds, **extra):
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    f = getattr(ops, cell + "_forward")(*args, **opts, **extra)
    g = getattr(ops, cell + "_backward")(f.cache, dy, *ds)
    return f, g


def _flat(f, g):
    out = [f.outputs, *f.states, g.x, g.kernel, g.recurrent_kernel, *g.states]
    return out + ([g.bias] if g.bias is not None else [])


@pytest.mark.parametrize("K", [1, 3, 7, 12])
@pytest.mark.parametrize("name,o", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_checkpointed_gradients_equal_the_full_cache(name, o, K):
    rng = np.random.default_rng(K * 100 + CASES.index((name, o)))
    B, T, D, H = 5, 13, 3, 4
    cell, p, opts = _problem(rng, name, o, B, T, D, H, np.float64)
    shape = (B, T, H) if opts["return_sequences"] else (B, H)
    dy = rng.standard_normal(shape)
    ds = [rng.standard_normal((B, H)) for _ in range(NSTATES[cell])]
    full = _flat(*_run(cell, p, opts, dy, ds))
    chunked = _flat(*_run(cell, p, opts, dy, ds, checkpoint_steps=K))
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)


def test_checkpointed_float32_long_sequence_matches_the_reference():
    rng = np.random.default_rng(7)
    B, T, D, H = 3, 2000, 2, 3
    cell, p, opts = _problem(rng, "lstm", dict(use_mask=True), B, T, D, H, np.float32)
    dy = rng.standard_normal((B, T, H)).astype(np.float32)
    f, g = _run(cell, p, opts, dy, [], checkpoint_steps=64)
    args = [p[k].astype(np.float64) for k in ("x", "kernel", "recurrent_kernel", "bias")]
    states = [s.astype(np.float64) for s in p["states"]]
    gr = R.lstm_backward(*args, *states, d_outputs=dy.astype(np.float64),
                         d_states=[np.zeros((B, H))] * 2, mask=opts["mask"])
    for got, want in [(g.x, gr["x"]), (g.kernel, gr["kernel"]),
                      (g.recurrent_kernel, gr["recurrent_kernel"]), (g.bias, gr["bias"])]:
        err = relative_error(got, want)
        assert err < config.TOL_GRAD_F32, err


def test_checkpoints_bound_the_cache():
    rng = np.random.default_rng(3)
    B, T, D, H = 4, 4000, 2, 8
    cell, p, opts = _problem(rng, "lstm", dict(), B, T, D, H, np.float32)
    args = (p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"])
    full = ops.cache_nbytes(ops.lstm_forward(*args).cache)
    K = 64
    part = ops.cache_nbytes(ops.lstm_forward(*args, checkpoint_steps=K).cache)
    # full: gates (4H) + h, c, a(c) (3H) per step, plus the time-major input (D)
    assert full >= 4 * B * T * (7 * H + D)
    # checkpointed: the time-major input plus h, c and the output per chunk
    assert part <= 4 * B * (T * D + 3 * H * (T // K + 1))
    assert part * 10 < full


def test_checkpoint_steps_is_validated():
    rng = np.random.default_rng(0)
    cell, p, opts = _problem(rng, "gru", dict(), 2, 5, 3, 4, np.float64)
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(ValueError, match="checkpoint_steps"):
            ops.gru_forward(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"],
                            checkpoint_steps=bad)
