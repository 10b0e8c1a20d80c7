"""The NumPy reference's backward pass equals finite differences of its forward pass."""
import numpy as np
import pytest

import reference as R
from helpers import make_problem, random_mask

CASES = [
    dict(),
    dict(go_backwards=True),
    dict(use_mask=True),
    dict(use_mask=True, zero_output_for_mask=True, go_backwards=True),
    dict(dropout=True, recurrent_dropout=True, use_mask=True),
    dict(bias=False),
    dict(activation="relu", recurrent_activation="hard_sigmoid"),
]


def _loss_and_grads(cell, p, opts, w_out, w_states):
    fwd = getattr(R, cell + "_forward")
    bwd = getattr(R, cell + "_backward")

    def loss():
        y, st = fwd(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"], **opts)
        return float((y * w_out).sum() + sum((s * w).sum() for s, w in zip(st, w_states)))

    g = bwd(p["x"], p["kernel"], p["recurrent_kernel"], p["bias"], *p["states"],
            d_outputs=w_out, d_states=w_states, **opts)
    return loss, g


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_rb", "simple_rnn"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_backward_matches_finite_differences(cell, case, rng):
    c = dict(CASES[case])
    reset_after = cell != "gru_rb"
    cell = "gru" if cell == "gru_rb" else cell
    B, T, D, H = 3, 4, 3, 2
    mask = random_mask(rng, B, T) if c.pop("use_mask", False) else None
    p, opts = make_problem(rng, cell, B, T, D, H, bias=c.pop("bias", True),
                           reset_after=reset_after, mask=mask,
                           dropout=c.pop("dropout", False),
                           recurrent_dropout=c.pop("recurrent_dropout", False))
    if cell == "simple_rnn":
        c.pop("recurrent_activation", None)
    opts.update(c)
    w_out = rng.standard_normal((B, T, H))
    w_states = [rng.standard_normal((B, H)) for _ in p["states"]]
    loss, g = _loss_and_grads(cell, p, opts, w_out, w_states)
    targets = [("x", p["x"], g["x"]), ("kernel", p["kernel"], g["kernel"]),
               ("recurrent_kernel", p["recurrent_kernel"], g["recurrent_kernel"])]
    if p["bias"] is not None:
        targets.append(("bias", p["bias"], g["bias"]))
    targets += [(f"state{k}", s, gs) for k, (s, gs) in enumerate(zip(p["states"], g["states"]))]
    eps = 1e-6
    for name, arr, grad in targets:
        num = np.zeros_like(arr)
        flat, nflat = arr.reshape(-1), num.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            lp = loss()
            flat[i] = old - eps
            lm = loss()
            flat[i] = old
            nflat[i] = (lp - lm) / (2 * eps)
        # relu/hard_sigmoid kinks are measure-zero for random inputs
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7, err_msg=name)
