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


# ------------------------------------------------------------ per-gate masks, as Keras
@pytest.mark.parametrize("name,kw", [("LSTM", {}), ("GRU", {}), ("GRU", dict(reset_after=False)),
                                     ("SimpleRNN", {})],
                         ids=["lstm", "gru", "gru_reset_before", "simple_rnn"])
def test_dropout_masks_per_gate_as_the_builtin_layers(name, kw):
    """The reference's dropout semantics held against Keras's own layers (float64): the
    masks one built-in layer draws in its first training call (one per gate for LSTM and
    GRU, as Keras 3.15 draws them with recurrent_dropout, one each for SimpleRNN), read from
    a twin layer with the same seed, give the reference the built-in outputs, final states
    and gradients."""
    import keras

    from fastcells import config
    from fastcells.bench import relative_error
    from layer_helpers import outputs_and_grads
    rng = np.random.default_rng(5)
    B, T, D, H = 4, 7, 3, 5
    x = rng.standard_normal((B, T, D))
    mask = random_mask(rng, B, T)
    n = 2 if name == "LSTM" else 1
    states = [rng.standard_normal((B, H)) for _ in range(n)]

    def layer():
        return getattr(keras.layers, name)(H, dropout=0.3, recurrent_dropout=0.4, seed=11,
                                           return_sequences=True, return_state=True,
                                           dtype="float64", **kw)
    ref, twin = layer(), layer()
    ref.build(x.shape)
    twin.build(x.shape)
    masks = [twin.cell.get_dropout_mask(x[:, 0]), twin.cell.get_recurrent_dropout_mask(states[0])]
    masks = [np.stack([np.asarray(k) for k in m]) if isinstance(m, list) else np.asarray(m)
             for m in masks]
    G = {"LSTM": 4, "GRU": 3}.get(name)
    assert masks[0].shape == ((G, B, D) if G else (B, D))
    assert masks[1].shape == ((G, B, H) if G else (B, H))
    outs, grads, _ = outputs_and_grads(ref, x, mask=mask, initial_state=states, training=True)
    weights = ref.get_weights()                     # kernel, recurrent kernel, bias
    opts = dict(mask=mask, dropout_mask=masks[0], recurrent_dropout_mask=masks[1],
                reset_after=kw.get("reset_after", True))
    cell = name.lower().replace("simplernn", "simple_rnn")
    y, final = getattr(R, cell + "_forward")(x, *weights, *states, **opts)
    projections = np.random.default_rng(0)          # the loss of outputs_and_grads
    w = [projections.standard_normal(o.shape) for o in outs]
    g = getattr(R, cell + "_backward")(x, *weights, *states, d_outputs=w[0], d_states=w[1:],
                                       **opts)
    assert len(outs) == 1 + len(final)
    for k, (got, want) in enumerate(zip([y, *final], outs)):
        err = np.abs(got - want).max()
        assert err <= config.TOL_F64, f"output {k}: max abs error {err:.3e}"
    want_grads = [g["x"], g["kernel"], g["recurrent_kernel"], g["bias"], *g["states"]]
    assert len(grads) == len(want_grads)
    for k, (got, want) in enumerate(zip(want_grads, grads)):
        err = relative_error(got, want)
        assert err <= config.TOL_F64, f"gradient {k}: error relative to the norm {err:.3e}"
