"""JAX bridge: the CPU kernels as an XLA FFI target (``_xla_ffi``), ``jax.custom_vjp`` for
the backward pass.

Keras on the JAX backend runs layers eagerly and under ``jax.jit`` (``model.fit``,
``predict``); the FFI target runs the kernels on XLA's own host buffers in both, and a
``jax.pure_callback`` (which copies operands and results) where ``config.JAX_FFI`` is off
or this JAX cannot register the target. The function has
two forward rules: the plain one (no gradient asked) keeps no cache; the one that
``jax.grad`` uses keeps its cache in ``fastcells.bridge.pending`` and returns an integer
token, a residual of the backward rule, which pops the cache by it (or recomputes the
forward when it is gone: an evicted cache, or XLA running the backward twice). The masks
are inputs without a gradient.

Under a Keras distribution that shards the batch (``keras.distribution.DataParallel``, or a
``ModelParallel`` with a batch dimension) the kernels run inside ``jax.shard_map``: each
device runs the kernels on its shard of the batch, with the weights replicated, and the
weight gradients are summed over the devices by ``shard_map``'s own transpose. A call
over the whole sharded batch would have to gather it on one device, which XLA's sharding
propagation refuses.

Arrays on a JAX GPU fall back to the built-in implementation: the CUDA kernels are bridged
for TensorFlow and torch tensors only.

Example::

    import os; os.environ["KERAS_BACKEND"] = "jax"
    import fastcells, keras
    layer = fastcells.LSTM(32, return_sequences=True)     # runs the CPU kernels under jit
"""
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from .. import config
from .._recurrence import Cache
from . import NO_TOKEN, HostCall, _xla_ffi, pending


def _platform(a):
    """The platform ("cpu", "gpu", ...) an array lives on; under a trace, the default one."""
    try:
        return next(iter(a.devices())).platform
    except Exception:  # a tracer: XLA places the computation on the default backend
        return jax.default_backend()


def _batch_sharding():
    """``(mesh, axis name)`` of the batch dimension when the Keras distribution shards the
    batch over more than one device, else None."""
    import keras
    dist = keras.distribution.distribution()
    axis = getattr(dist, "batch_dim_name", None)
    if dist is None or axis is None:
        return None
    mesh = dist.device_mesh.backend_mesh
    if mesh.shape.get(axis, 1) <= 1:
        return None
    return mesh, axis


def supports(call):
    """None when the call can run here, else the reason (for the layer's fallback warning).

    Example::

        supports(call)          # None, or e.g. "the inputs live on a JAX 'gpu' device; ..."
    """
    for name, a in call.named_arrays():
        if not isinstance(a, jax.Array):         # tracers are jax.Array too
            return f"{name} is a {type(a).__name__}, not a JAX array"
    platform = _platform(call.x)
    if platform != "cpu":
        return (f"the inputs live on a JAX '{platform}' device; the fastcells JAX bridge runs "
                f"the CPU kernels only")
    sharded = _batch_sharding()
    if sharded is not None:
        mesh, axis = sharded
        n = mesh.shape[axis]
        if call.x.shape[0] % n:
            return (f"the batch of {call.x.shape[0]} (inputs of shape {tuple(call.x.shape)}) "
                    f"does not split evenly over the {n} devices of the mesh axis '{axis}'")
    return None


def run(call):
    """Run the recurrence; returns ``(outputs, [final states])`` as JAX arrays,
    differentiable (``jax.grad``, ``jax.vjp``) with respect to x, the weights and the
    initial states.

    Example::

        outputs, states = run(call)
    """
    host = HostCall(call)
    arrays = host.arrays(call)
    diff, extras = tuple(arrays[:host.n_diff]), tuple(arrays[host.n_diff:])

    def rnn(diff, extras):
        return _recurrence(host, diff, extras)

    sharded = _batch_sharding()
    if sharded is not None:
        mesh, axis = sharded
        batch, whole = PartitionSpec(axis), PartitionSpec()
        diff_specs = (batch, whole, whole) + (whole,) * host.has_bias
        diff_specs += (batch,) * host.nstates
        # masks [B, T] and [B, n] split on their first axis; per-gate masks [G, B, n] on
        # their second
        extra_specs = tuple(PartitionSpec(None, axis) if e.ndim == 3 else batch
                            for e in extras)
        rnn = jax.shard_map(rnn, mesh=mesh, in_specs=(diff_specs, extra_specs),
                            out_specs=(batch,) * (1 + host.nstates), check_vma=False)
    res = rnn(diff, extras)
    return res[0], list(res[1:])


def _recurrence(host, diff, extras):
    """The differentiable recurrence on (a shard of) the arrays."""
    x, U = diff[0], diff[2]
    B, T, H = x.shape[0], x.shape[1], U.shape[0]
    dtype = x.dtype
    out_specs = [jax.ShapeDtypeStruct((B, T, H) if host.return_sequences else (B, H), dtype)]
    out_specs += [jax.ShapeDtypeStruct((B, H), dtype) for _ in range(host.nstates)]
    token_spec = jax.ShapeDtypeStruct((), np.int32)
    grad_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in diff]

    def forward(*arrays, keep):
        outputs, states, token = host.forward([np.asarray(a) for a in arrays], keep)
        outs = [np.asarray(outputs, dtype)] + [np.asarray(s, dtype) for s in states]
        return (*outs, np.int32(token))

    def backward(*arrays):
        n_in = host.n_in
        grads = host.backward([np.asarray(a) for a in arrays[:n_in]], arrays[n_in],
                              [np.asarray(a) for a in arrays[n_in + 1:]])
        return tuple(np.asarray(g, s.dtype) for g, s in zip(grads, grad_specs))

    if config.JAX_FFI and _xla_ffi.available():
        def call_forward(diff_args, extra_args, keep):
            return _xla_ffi.call(_entry(host, "forward", keep), out_specs + [token_spec],
                                 *diff_args, *extra_args)

        def call_backward(*operands):
            return _xla_ffi.call(_entry(host, "backward"), grad_specs, *operands)
    else:
        def call_forward(diff_args, extra_args, keep):
            return jax.pure_callback(lambda *a: forward(*a, keep=keep),
                                     out_specs + [token_spec], *diff_args, *extra_args)

        def call_backward(*operands):
            return jax.pure_callback(backward, grad_specs, *operands)

    @jax.custom_vjp
    def rnn(diff_args, extra_args):
        return tuple(call_forward(diff_args, extra_args, False)[:-1])

    def rnn_fwd(diff_args, extra_args):
        outs = call_forward(diff_args, extra_args, True)
        return tuple(outs[:-1]), (diff_args, extra_args, outs[-1])

    def rnn_bwd(residuals, cotangents):
        diff_args, extra_args, token = residuals
        ups = [jnp.zeros(s.shape, s.dtype) if g is None else g
               for g, s in zip(cotangents, out_specs)]
        grads = call_backward(*diff_args, *extra_args, token, *ups)
        return tuple(grads), tuple(None for _ in extra_args)

    rnn.defvjp(rnn_fwd, rnn_bwd)
    return rnn(diff, extras)


# --- the kernels as an XLA FFI target -----------------------------------------------------

_entries = {}           # (what the host call computes, "forward"/"backward", keep) -> entry
_views = {}             # token -> the operand views its forward's cache was made over
_lock = threading.Lock()


def _entry(host, kind, keep=False):
    """The FFI entry running ``host``'s forward (keeping its cache when ``keep``) or
    backward: one per kind of call, shared by every trace of it."""
    key = (host.cell, host.nstates, host.has_bias, tuple(host.extra_names), host.training,
           host.return_sequences, repr(sorted(host.options.items())), kind, keep)
    with _lock:
        number = _entries.get(key)
        if number is None:
            if kind == "forward":
                def fn(inputs, outputs):
                    _ffi_forward(host, keep, inputs, outputs)
            else:
                def fn(inputs, outputs):
                    _ffi_backward(host, inputs, outputs)
            number = _entries[key] = _xla_ffi.add(fn)
    return number


def _ffi_forward(host, keep, inputs, outputs):
    """Outputs, final states and the cache's token written into XLA's result buffers. The
    kept cache views this call's operands: its backward rebinds it to its own."""
    result, states, token = host.forward(list(inputs), keep)
    for out, value in zip(outputs, [result, *states]):
        np.copyto(out, value)
    outputs[-1][()] = token
    if token != NO_TOKEN:
        with _lock:
            for old in [t for t in _views if t not in pending]:     # evicted caches
                del _views[old]
            _views[token] = list(inputs)


def _ffi_backward(host, inputs, outputs):
    """The gradients written into XLA's result buffers, from the forward's cache rebound to
    this call's operands (or from a recomputed forward when no cache is kept)."""
    n_in = host.n_in
    arrays, token = list(inputs[:n_in]), int(inputs[n_in])
    with _lock:
        old = _views.pop(token, None)
    if old is None:             # no cache kept, or it is gone: the backward recomputes it
        token = NO_TOKEN

    def found(cache):
        _xla_ffi.rebind(cache, old, arrays, Cache.__slots__)

    grads = host.backward(arrays, token, list(inputs[n_in + 1:]), found=found)
    for out, value in zip(outputs, grads):
        np.copyto(out, value)
