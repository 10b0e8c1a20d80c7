"""fastcells layers under the torch Keras backend, against the built-in layers.

The Keras backend is fixed when keras is first imported, so these checks run in a process of
their own (``tests/test_torch_backend.py`` starts it); run it by hand with::

    KERAS_BACKEND=torch python tests/torch_backend_checks.py [name-substring ...]

(``FASTCELLS_CHECK_SEED=n`` draws other initial weights.)

Every check compares a fastcells layer (``engine="cpu"``) with the built-in layer holding
the same weights: outputs and states, and the gradients that ``loss.backward()`` leaves on
the inputs, the initial states and each trainable weight's ``.value`` tensor. The script
prints one line per check and the worst errors, and exits with status 1 when any check
fails (77 when torch is not importable).
"""
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

try:
    import torch  # noqa: E402
except ImportError as e:        # tests/test_torch_backend.py skips on this status
    print(f"torch is not importable: {e}")
    sys.exit(77)
import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastcells  # noqa: E402
from fastcells import bridge, config  # noqa: E402
from fastcells.bench import equivalence, relative_error, worst_of  # noqa: E402
from fastcells.bridge import torch as torch_bridge  # noqa: E402
import reference  # noqa: E402
from helpers import (LAYER_CELLS, LAYER_CONFIGS, bidirectional_pair,  # noqa: E402
                     layer_arguments, random_mask, run_backend_checks)

TOL_OUT = config.TOL_OUTPUT_F32         # absolute, float32 outputs and states
TOL_GRAD = config.TOL_GRAD_F32          # relative to the gradient's norm (relative_error)
TOL_F64 = config.TOL_F64

CELLS = LAYER_CELLS
CONFIGS = dict(LAYER_CONFIGS,
               state_mask_backwards=dict(return_state=True, return_sequences=True,
                                         use_initial_state=True, use_mask=True,
                                         go_backwards=True),
               recurrent_dropout_only=dict(recurrent_dropout=0.5, seed=5, training=True,
                                           use_mask=True),
               training_no_dropout=dict(training=True, return_sequences=True, use_mask=True))

worst = {"out_f32": 0.0, "grad_f32": 0.0, "out_f64": 0.0, "grad_f64": 0.0,
         "out_f64_vs_builtin": 0.0, "grad_f64_vs_builtin": 0.0, "fit_loss": 0.0,
         "fit_grad": 0.0}


# --------------------------------------------------------------------------- helpers
def pair(name, units, **kw):
    """(built-in layer, fastcells layer with engine='cpu'), not built yet."""
    return (getattr(keras.layers, name)(units, **kw),
            getattr(fastcells, name)(units, engine="cpu", **kw))


def outputs_and_grads(layer, x, *, mask=None, initial_state=None, training=False, seed=0,
                      retain_graph=False):
    """Outputs, the gradients that ``loss.backward()`` leaves on the inputs, every trainable
    weight's ``.value`` and the initial states, and the fixed random projections of the
    outputs that make the loss (``loss = sum(sum(o * w))``)."""
    xs = torch.tensor(x, requires_grad=True)
    states = None if initial_state is None else [torch.tensor(s, requires_grad=True)
                                                 for s in initial_state]
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = torch.tensor(mask)
    if states is not None:
        kwargs["initial_state"] = states
    out = layer(xs, training=training, **kwargs)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    rng = np.random.default_rng(seed)
    loss = 0.0
    projections = []
    for o in outs:
        w = rng.standard_normal(tuple(o.shape)).astype(str(o.dtype)[6:])
        projections.append(w)
        loss = loss + (o * torch.tensor(w)).double().sum()
    params = [v.value for v in layer.trainable_weights]
    for p in params:
        p.grad = None
    loss.backward(retain_graph=retain_graph)
    targets = [xs] + params + (states or [])
    grads = [None if t.grad is None else t.grad.detach().numpy().copy() for t in targets]
    result = ([o.detach().numpy().copy() for o in outs], grads, projections)
    if retain_graph:        # a second backward through the same graph must agree
        for t in targets:
            t.grad = None
        loss.backward()
        again = [None if t.grad is None else t.grad.detach().numpy() for t in targets]
        for k, (a, b) in enumerate(zip(grads, again)):
            assert (a is None) == (b is None), k
            if a is not None:
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-12 + 1e-6 * np.abs(a).max(),
                                           err_msg=f"second backward, gradient {k}")
    return result


def compare(ro, rg, fo, fg, tol_out, tol_grad, kind):
    assert len(ro) == len(fo), (len(ro), len(fo))
    for k, (a, b) in enumerate(zip(ro, fo)):
        assert a.shape == b.shape, ("output", k, a.shape, b.shape)
        assert a.dtype == b.dtype, ("output", k, a.dtype, b.dtype)
        err = float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
        assert err <= tol_out, f"output {k}: max abs error {err:.3e}"      # NaN fails too
        worst["out_" + kind] = worst_of(worst["out_" + kind], err)
    assert len(rg) == len(fg)
    for k, (a, b) in enumerate(zip(rg, fg)):
        assert (a is None) == (b is None), ("gradient", k, a is None, b is None)
        if a is None:
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, ("gradient", k, a.shape, b.shape,
                                                           a.dtype, b.dtype)
        err = relative_error(b, a)
        assert err <= tol_grad, f"gradient {k}: error relative to the norm {err:.3e}"
        worst["grad_" + kind] = worst_of(worst["grad_" + kind], err)


def assert_same(ref, fc, x, *, inner=None, **kw):
    """Build both layers, copy the built-in weights, compare outputs and gradients."""
    tol_out, tol_grad, kind = TOL_OUT, TOL_GRAD, "f32"
    ro, rg, _ = outputs_and_grads(ref, x, **kw)
    if not fc.built:
        fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    before = dict(bridge.kernel_calls)
    fo, fg, _ = outputs_and_grads(fc, x, **kw)
    for layer in inner or [fc]:
        assert layer.last_engine == "cpu", f"the kernels did not run ({layer.last_engine})"
    cell = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "simple_rnn"}[
        type(inner[0] if inner else fc).__name__]
    for what in ("forward", "backward"):
        key = f"{cell}_{what}"
        assert bridge.kernel_calls[key] > before.get(key, 0), f"{key} did not run"
    compare(ro, rg, fo, fg, tol_out, tol_grad, kind)


# --------------------------------------------------------------------------- checks
def layer_case(cell, config):
    name, kw, units, x, call = layer_arguments(cell, config, np.random.default_rng(1234),
                                               configs=CONFIGS)
    ref, fc = pair(name, units, **kw)
    assert_same(ref, fc, x, **call)


def float64_case(cell):
    """float64 against the NumPy reference (tests/reference.py) to TOL_F64. The built-in
    layers under torch are no float64 reference: Keras 3.15's torch ``ops.matmul`` computes
    float64 products in float32 (``dtypes.result_type(torch.float64, torch.float64)`` is
    "float32"), so against them float64 agrees only to float32 precision."""
    name, kw = CELLS[cell]
    rng = np.random.default_rng(7)
    B, T, D, H = 4, 12, 3, 5
    x = rng.standard_normal((B, T, D))
    mask = random_mask(rng, B, T)
    states = [rng.standard_normal((B, H)) for _ in range(2 if name == "LSTM" else 1)]
    for backwards in (False, True):
        ref, fc = pair(name, H, return_sequences=True, return_state=True,
                       go_backwards=backwards, dtype="float64", **kw)
        ro, rg, _ = outputs_and_grads(ref, x, mask=mask, initial_state=states)
        fc.build(x.shape)
        fc.set_weights(ref.get_weights())
        fo, fg, ws = outputs_and_grads(fc, x, mask=mask, initial_state=states)
        assert fc.last_engine == "cpu"
        compare(ro, rg, fo, fg, TOL_OUT, TOL_GRAD, "f64_vs_builtin")
        weights = fc.get_weights()
        if len(weights) == 2:
            weights.append(None)
        opts = dict(mask=mask, go_backwards=backwards, reset_after=kw.get("reset_after", True))
        forward = getattr(reference, f"{cell.replace('_reset_before', '')}_forward")
        backward = getattr(reference, f"{cell.replace('_reset_before', '')}_backward")
        y, final = forward(x, *weights, *states, **opts)
        g = backward(x, *weights, *states, d_outputs=ws[0], d_states=ws[1:], **opts)
        want_grads = [g["x"], g["kernel"], g["recurrent_kernel"]]
        want_grads += [] if g["bias"] is None else [g["bias"]]
        compare([y, *final], want_grads + list(g["states"]), fo, fg, TOL_F64, TOL_F64, "f64")


def long_sequence_case(cell):
    """500 steps with a mask: float32 outputs stay within TOL_OUT of the built-in."""
    name, kw = CELLS[cell]
    rng = np.random.default_rng(500)
    x = rng.standard_normal((3, 500, 8)).astype("float32")
    ref, fc = pair(name, 16, return_sequences=True, **kw)
    assert_same(ref, fc, x, mask=random_mask(rng, 3, 500, p_keep=0.9))


def stateful_case(name):
    """stateful=True: the outputs and the states carried between calls are the built-in
    ones, and the gradients of the inputs and weights (through the carried states, by
    ``loss.backward()`` after the call updated them) are those of the built-in layer called
    from the same states. The built-in reference for the gradients is a twin without
    ``stateful`` given the carried states as initial states: Keras 3.15's own stateful LSTM
    and GRU cannot be differentiated under torch (they update their states in place, on
    tensors their backward saved)."""
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((3, 5, 2)).astype("float32") for _ in range(3)]
    ref, fc = pair(name, 4, stateful=True, return_sequences=True)
    twin = getattr(keras.layers, name)(4, return_sequences=True)
    for layer in (ref, fc, twin):
        layer.build(xs[0].shape)
    fc.set_weights(ref.get_weights())
    twin.set_weights(ref.get_weights())
    for x in xs:
        carried = [np.asarray(s).copy() for s in ref.states]
        to, tg, _ = outputs_and_grads(twin, x, initial_state=carried)
        with torch.no_grad():
            want = ref(torch.tensor(x)).numpy()             # the states move on
        fo, fg, _ = outputs_and_grads(fc, x)
        compare([want], tg[:len(fg)], fo, fg, TOL_OUT, TOL_GRAD, "f32")
        compare(to, [], fo, [], TOL_OUT, TOL_GRAD, "f32")
        for a, b in zip(ref.states, fc.states):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=TOL_OUT)
    assert fc.last_engine == "cpu"


def mixed_precision_case(name):
    """mixed_float16: the kernels run in float32, outputs come back as float16."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 6, 3)).astype("float32")
    ref, fc = pair(name, 5, return_sequences=True, dtype="mixed_float16")
    ro, rg, _ = outputs_and_grads(ref, x)
    fc.build(x.shape)
    fc.set_weights(ref.get_weights())
    fo, fg, _ = outputs_and_grads(fc, x)
    assert fc.last_engine == "cpu"
    assert ro[0].dtype == fo[0].dtype == np.float16
    np.testing.assert_allclose(fo[0], ro[0], rtol=0, atol=5e-3)
    assert len(rg) == len(fg)
    for a, b in zip(rg, fg):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert relative_error(b, a) <= 1e-2


def awkward_shapes_case(name):
    rng = np.random.default_rng(3)
    for B, T, D, H in [(1, 1, 1, 1), (1, 7, 3, 13), (11, 1, 5, 3)]:
        x = rng.standard_normal((B, T, D)).astype("float32")
        ref, fc = pair(name, H, return_sequences=True, return_state=True)
        assert_same(ref, fc, x)


def bidirectional_case(name):
    ref, fc, x, mask = bidirectional_pair(name)
    fc.build(x.shape)
    assert_same(ref, fc, x, mask=mask, inner=[fc.forward_layer, fc.backward_layer])


def second_backward_case(name):
    """retain_graph=True: the second backward recomputes the released cache."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 3)).astype("float32")
    ref, fc = pair(name, 5, return_sequences=True, return_state=True)
    assert_same(ref, fc, x, training=True, mask=random_mask(rng, 4, 6), retain_graph=True)


def no_grad_case(name):
    """Inference without a graph (as model.predict runs) gives the same outputs; the
    default engine="auto" picks the kernels without a fallback warning."""
    rng = np.random.default_rng(9)
    x = torch.tensor(rng.standard_normal((3, 8, 4)).astype("float32"))
    ref = getattr(keras.layers, name)(5, return_sequences=True)
    fc = getattr(fastcells, name)(5, return_sequences=True)
    ref.build(tuple(x.shape))
    fc.build(tuple(x.shape))
    fc.set_weights(ref.get_weights())
    with torch.no_grad():
        want, got = ref(x), fc(x)
    assert fc.last_engine == "cpu"
    assert not got.requires_grad
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=TOL_OUT)


def fit_case(name):
    """An Embedding + RNN + Dense model has the built-in gradients in a training step
    (their size, with the gradient probe) and trains to the built-in loss history."""
    vocab, T, B = 200, 20, 16
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, (4 * B, T)).astype("int32")
    y = (x[:, :5].mean(1) > vocab / 2).astype("float32")
    histories, steps, ref_weights = [], [], None
    for module in (keras.layers, fastcells):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(vocab, 8, mask_zero=name == "GRU"),
            getattr(module, name)(8),
            keras.layers.Dense(1, activation="sigmoid"),
        ])
        if ref_weights is None:
            ref_weights = model.get_weights()
        else:
            model.set_weights(ref_weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        steps.append(equivalence.gradient_step(model, x, y))   # one step's gradients
        before = dict(bridge.kernel_calls)
        h = model.fit(x, y, batch_size=B, epochs=3, shuffle=False, verbose=0)
        histories.append(np.array(h.history["loss"]))
        if module is fastcells:
            assert model.layers[1].last_engine == "cpu"
            key = name.lower() + "_backward"
            assert bridge.kernel_calls[key] >= before.get(key, 0) + 12, "kernels did not run"
            pr = model.predict(x, batch_size=B, verbose=0)
            assert pr.shape == (len(x), 1) and np.isfinite(pr).all()
    loss_error, grad_error = equivalence.compare_fit_step(steps[1], steps[0])
    worst["fit_grad"] = max(worst["fit_grad"], grad_error)
    assert loss_error <= TOL_OUT and grad_error <= TOL_GRAD, (loss_error, grad_error)
    err = float(np.abs(histories[0] - histories[1]).max())
    worst["fit_loss"] = max(worst["fit_loss"], err)
    assert err <= 1e-4, f"loss histories differ by {err:.3e}: {histories}"
    assert histories[1][-1] < histories[1][0], "it did not learn"


class _FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on CUDA (for supports() on a CPU-only build)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _call(**kw):
    B, T, D, H = 2, 3, 4, 5
    args = dict(cell="simple_rnn", x=torch.zeros(B, T, D), kernel=torch.zeros(D, H),
                recurrent_kernel=torch.zeros(H, H), bias=None, states=[torch.zeros(B, H)],
                mask=None, dropout_mask=None, recurrent_dropout_mask=None, training=False,
                options={}, return_sequences=True)
    args.update(kw)
    return bridge.KernelCall(**args)


def supports_case():
    """Which devices the bridge takes, and the engine it picks."""
    assert bridge.get("torch") is torch_bridge
    cpu = _call()
    assert torch_bridge.supports(cpu) is None and torch_bridge.engine_for(cpu) == "cpu"
    meta = _call(x=torch.zeros(2, 3, 4, device="meta"))
    reason = torch_bridge.supports(meta)
    assert reason and "'meta' device" in reason, reason
    mixed = _call(kernel=torch.zeros(4, 5, device="meta"))
    reason = torch_bridge.supports(mixed)
    assert reason and "kernel is on meta" in reason, reason
    numpy_x = _call(x=np.zeros((2, 3, 4), "float32"))
    assert "not a torch.Tensor" in torch_bridge.supports(numpy_x)

    def fake(t):
        return t.as_subclass(_FakeCudaTensor)
    c = _call()
    cuda = _call(x=fake(c.x), kernel=fake(c.kernel), recurrent_kernel=fake(c.recurrent_kernel),
                 states=[fake(c.states[0])])
    assert torch_bridge.engine_for(cuda) == "cuda"
    available = fastcells.ops.cuda_available
    try:
        fastcells.ops.cuda_available = lambda: False
        reason = torch_bridge.supports(cuda)
        assert reason and "CUDA" in reason, reason
        fastcells.ops.cuda_available = lambda: True
        assert torch_bridge.supports(cuda) is None
    finally:
        fastcells.ops.cuda_available = available


def cuda_wiring_case():
    """CUDA tensors reach the ops as tensors with engine="cuda", forward and backward (the
    ops are stubbed: this CPU-only check covers the bridge's plumbing, not the kernels)."""
    seen = []

    def fake(t):
        return t.as_subclass(_FakeCudaTensor)

    def forward(x, W, U, b, h0, **kw):
        seen.append(("forward", kw.get("engine"), x, W, U, h0, kw.get("mask")))
        y = torch.zeros(x.shape[0], x.shape[1], U.shape[0], dtype=x.dtype)
        return fastcells.ops.Forward(y, (y[:, -1].clone(),), "device-cache")

    def backward(cache, d_outputs, d_h):
        seen.append(("backward", cache, d_outputs, d_h))
        return fastcells.ops.Gradients(
            torch.ones(c.x.shape), torch.ones(c.kernel.shape),
            torch.ones(c.recurrent_kernel.shape), None, (torch.ones(c.states[0].shape),))

    c = _call(training=True, mask=torch.ones(2, 3, dtype=torch.bool))
    leaves = [fake(t).requires_grad_(True) for t in (c.x, c.kernel, c.recurrent_kernel)]
    h0 = fake(c.states[0])
    call = _call(x=leaves[0], kernel=leaves[1], recurrent_kernel=leaves[2], states=[h0],
                 mask=fake(c.mask), training=True)
    saved = dict(bridge.FORWARD), dict(bridge.BACKWARD)
    try:
        bridge.FORWARD["simple_rnn"] = forward
        bridge.BACKWARD["simple_rnn"] = backward
        y, (h,) = torch_bridge.run(call)
        y.sum().backward()
    finally:
        bridge.FORWARD.update(saved[0])
        bridge.BACKWARD.update(saved[1])
    (_, engine, *tensors), (_, cache, dy, dh) = seen
    assert engine == "cuda"
    assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in tensors)
    assert cache == "device-cache" and isinstance(dy, torch.Tensor) and dh is None
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


def bridge_direct_case():
    """run() on plain torch tensors: grads only where asked, right shapes and dtypes."""
    rng = np.random.default_rng(2)
    B, T, D, H = 3, 5, 2, 4
    t = {k: torch.tensor(rng.standard_normal(s).astype("float64"))
         for k, s in dict(x=(B, T, D), W=(D, 3 * H), U=(H, 3 * H), b=(2, 3 * H),
                          h0=(B, H)).items()}
    t["W"].requires_grad_(True)
    t["b"].requires_grad_(True)
    call = bridge.KernelCall(cell="gru", x=t["x"], kernel=t["W"], recurrent_kernel=t["U"],
                             bias=t["b"], states=[t["h0"]], mask=None, dropout_mask=None,
                             recurrent_dropout_mask=None, training=False,
                             options=dict(reset_after=True), return_sequences=False)
    y, (h,) = torch_bridge.run(call)
    assert y.shape == (B, H) and h.shape == (B, H) and y.dtype == torch.float64
    h.sum().backward()          # only a state gradient: d_outputs arrives as None
    assert t["x"].grad is None and t["U"].grad is None
    assert t["W"].grad.shape == (D, 3 * H) and t["W"].grad.dtype == torch.float64
    assert t["b"].grad.shape == (2, 3 * H)
    # the same through torch's own differentiation of a numerical reference
    x, W, U, b, h0 = (t[k].detach().clone().requires_grad_(True)
                      for k in ("x", "W", "U", "b", "h0"))
    ok = torch.autograd.gradcheck(
        lambda x, W, U, b, h0: torch_bridge.run(bridge.KernelCall(
            cell="gru", x=x, kernel=W, recurrent_kernel=U, bias=b, states=[h0], mask=None,
            dropout_mask=None, recurrent_dropout_mask=None, training=True,
            options=dict(reset_after=True), return_sequences=True))[0],
        (x, W, U, b, h0), eps=1e-6, atol=1e-7)
    assert ok


def cases():
    for cell in CELLS:
        for name in CONFIGS:
            yield f"layer/{cell}/{name}", lambda c=cell, k=name: layer_case(c, k)
    for cell in CELLS:
        yield f"float64/{cell}", lambda c=cell: float64_case(c)
        yield f"long_sequence/{cell}", lambda c=cell: long_sequence_case(c)
    for name in ("LSTM", "GRU", "SimpleRNN"):
        yield f"awkward_shapes/{name}", lambda n=name: awkward_shapes_case(n)
        yield f"bidirectional/{name}", lambda n=name: bidirectional_case(n)
        yield f"second_backward/{name}", lambda n=name: second_backward_case(n)
        yield f"no_grad/{name}", lambda n=name: no_grad_case(n)
        yield f"stateful/{name}", lambda n=name: stateful_case(n)
        yield f"mixed_precision/{name}", lambda n=name: mixed_precision_case(n)
    for name in ("LSTM", "GRU"):
        yield f"fit/{name}", lambda n=name: fit_case(n)
    yield "bridge/supports", supports_case
    yield "bridge/direct", bridge_direct_case
    yield "bridge/cuda_wiring", cuda_wiring_case


def main(argv):
    return run_backend_checks("torch", cases, argv, worst)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
