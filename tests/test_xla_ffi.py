"""The XLA FFI target that runs the kernels on the JAX backend (fastcells/bridge/_xla_ffi.py):
results written into XLA's buffers, errors carried back to JAX, and a forward's cache
rebound to its backward's operands, so that nothing reads a buffer XLA has reused.

These checks use plain ``jax`` and NumPy arrays; the layers on the JAX Keras backend are
compared with the built-in ones in tests/jax_backend_checks.py, through this target.
"""
import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("jax") is None:
    pytest.skip("jax is not installed", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fastcells import bridge, ops  # noqa: E402
from fastcells.bridge import _xla_ffi  # noqa: E402
from fastcells.bridge import jax as jax_bridge  # noqa: E402

# Only a JAX without the FFI API skips; where it has one, the target must register, and a
# failure to do so fails test_the_target_registers_where_jax_has_ffi.
pytestmark = pytest.mark.skipif(not _xla_ffi.supported(),
                                reason=f"JAX {jax.__version__} has no jax.ffi")


def test_the_target_registers_where_jax_has_ffi():
    assert _xla_ffi.available(), f"the FFI target did not register: {_xla_ffi.failure}"
    assert _xla_ffi.failure is None


def test_a_failed_registration_is_said_and_kept(monkeypatch, caplog):
    """Where registering raises, the bridge falls back to the callback, and says why."""
    def refuse(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(_xla_ffi, "_registered", None)
    monkeypatch.setattr(_xla_ffi, "failure", None)
    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    with caplog.at_level("WARNING", logger="fastcells"):
        assert _xla_ffi.available() is False
    assert _xla_ffi.failure == "RuntimeError: planted"
    assert "RuntimeError: planted" in caplog.text and "pure_callback" in caplog.text


def test_an_entry_reads_its_operands_and_fills_its_results_under_jit():
    seen = {}

    def fn(inputs, outputs):
        a, b = inputs
        seen["writeable"] = (a.flags.writeable, outputs[0].flags.writeable)
        outputs[0][...] = a * 2 + b.sum()
        outputs[1][()] = a.shape[0]

    number = _xla_ffi.add(fn)
    specs = [jax.ShapeDtypeStruct((2, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)]
    a = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    b = jnp.ones(4, jnp.float32)
    f = jax.jit(lambda a, b: _xla_ffi.call(number, specs, a, b))
    out, n = f(a, b)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(a) * 2 + 4)
    assert int(n) == 2
    assert seen["writeable"] == (False, True)       # operands are read-only views
    assert _xla_ffi.TARGET in f.lower(a, b).as_text()


def test_an_exception_in_an_entry_reaches_jax_with_its_message():
    def fn(inputs, outputs):
        raise ValueError("x has shape (2, 3); expected (2, 4)")

    number = _xla_ffi.add(fn)
    spec = [jax.ShapeDtypeStruct((2,), jnp.float32)]
    with pytest.raises(Exception, match=r"ValueError: x has shape \(2, 3\); expected \(2, 4\)"):
        jax.block_until_ready(jax.jit(lambda a: _xla_ffi.call(number, spec, a))(jnp.ones(3)))


def test_empty_operands_and_results():
    def fn(inputs, outputs):
        assert inputs[0].shape == (0, 3)
        outputs[0][...] = 7

    number = _xla_ffi.add(fn)
    (out,) = _xla_ffi.call(number, [jax.ShapeDtypeStruct((2,), jnp.float32)],
                           jnp.zeros((0, 3), jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), [7, 7])


class _Holder:
    __slots__ = ("a", "b", "c", "d", "own")


def test_rebind_moves_views_of_old_operands_and_leaves_the_rest():
    old = [np.arange(24.0).reshape(2, 3, 4), np.arange(5, dtype=np.int32)]
    new = [a.copy() + 100 for a in old]
    h = _Holder()
    h.a = old[0]                                    # the whole array
    h.b = old[0][:, ::-1].transpose(2, 0, 1)        # reversed and transposed
    h.c = (old[1][1:4], old[0][1, 2])               # in a tuple
    h.d = None
    h.own = np.ones(3)                              # not a view of an operand
    own = h.own
    _xla_ffi.rebind(h, old, new, _Holder.__slots__)
    np.testing.assert_array_equal(h.a, new[0])
    np.testing.assert_array_equal(h.b, new[0][:, ::-1].transpose(2, 0, 1))
    np.testing.assert_array_equal(h.c[0], new[1][1:4])
    np.testing.assert_array_equal(h.c[1], new[0][1, 2])
    assert isinstance(h.c, tuple) and h.d is None and h.own is own
    assert np.shares_memory(h.b, new[0]) and not np.shares_memory(h.b, old[0])


def _readonly(arrays):
    views = []
    for a in arrays:
        v = a.view()
        v.flags.writeable = False
        views.append(v)
    return views


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_a_kept_cache_reads_the_backward_operands_not_the_forward_ones(cell, rng):
    """The forward's operand buffers are overwritten before the backward (as XLA may reuse
    them); the backward gets the same values elsewhere: its gradients are those of the
    array-level ops, bit for bit."""
    G = ops.CELLS[cell].gates
    B, T, D, H = 5, 7, 3, 4
    f32 = np.float32
    x = rng.standard_normal((B, T, D)).astype(f32)
    W = rng.standard_normal((D, G * H)).astype(f32)
    U = rng.standard_normal((H, G * H)).astype(f32) * f32(0.5)
    b = rng.standard_normal(((2, G * H) if cell == "gru" else (G * H,))).astype(f32)
    states = [rng.standard_normal((B, H)).astype(f32) for _ in ops.CELLS[cell].states]
    mask = rng.random((B, T)) < 0.8
    options = {"reset_after": True} if cell == "gru" else {}
    call = bridge.KernelCall(cell=cell, x=x, kernel=W, recurrent_kernel=U, bias=b,
                             states=states, mask=mask, dropout_mask=None,
                             recurrent_dropout_mask=None, training=True, options=options,
                             return_sequences=True)
    host = bridge.HostCall(call)
    operands = host.arrays(call)
    kept = [a.copy() for a in operands]
    outs = [np.empty((B, T, H), f32)] + [np.empty((B, H), f32) for _ in states]
    outs.append(np.zeros((), np.int32))
    jax_bridge._ffi_forward(host, True, _readonly(operands), outs)
    token = outs[-1].copy()
    assert int(token) != bridge.NO_TOKEN
    for a in operands:                              # XLA reuses the forward's buffers
        a[...] = np.nan if a.dtype.kind == "f" else 0
    ups = [rng.standard_normal(o.shape).astype(f32) for o in outs[:-1]]
    grads = [np.empty(a.shape, a.dtype) for a in kept[:host.n_diff]]
    jax_bridge._ffi_backward(host, _readonly(kept) + [token] + ups, grads)
    assert int(token) not in bridge.pending and int(token) not in jax_bridge._views

    fwd = ops.CELLS[cell].forward(*kept[:3], kept[3], *kept[4:4 + len(states)],
                                  mask=kept[-1], training=True, return_sequences=True,
                                  **options)
    np.testing.assert_array_equal(outs[0], fwd.outputs)
    want = ops.CELLS[cell].backward(fwd.cache, *ups)
    want = [want.x, want.kernel, want.recurrent_kernel, want.bias, *want.states]
    for k, (g, w) in enumerate(zip(grads, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"gradient {k}")
