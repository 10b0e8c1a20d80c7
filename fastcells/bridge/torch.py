"""PyTorch bridge: a ``torch.autograd.Function`` around the kernels.

CPU tensors cross into NumPy and back without copies (``Tensor.numpy()`` and
``torch.from_numpy`` share memory); ``fastcells.ops`` makes arrays contiguous itself where it
needs to. CUDA tensors are handed to the ops as they are (they carry
``__cuda_array_interface__``) with ``engine="cuda"``, and the device arrays the ops return
are wrapped with ``torch.as_tensor`` on the same device, again without copies.

The forward keeps its cache on the autograd context: torch holds the context exactly as long
as the graph that may need it, so no token store is needed. The backward uses the cache
once and gives its memory back to the ops' workspace; a second backward through the same
graph (``retain_graph=True``), or the backward of an inference-mode call (which keeps no
cache), recomputes the forward from the saved inputs: slower, never wrong. The inputs are
saved with ``ctx.save_for_backward``, so modifying one in place between the forward and the
backward raises torch's usual error instead of giving a wrong gradient; the initial states
are saved as copies (a few rows each), since a stateful layer assigns its state variables
in place after every forward, before the backward of that call.

The layers use this module through ``fastcells.bridge.get("torch")``; it can also be used
directly.

Example::

    import torch
    from fastcells import bridge
    from fastcells.bridge import torch as torch_bridge

    B, T, D, H = 2, 5, 3, 4
    call = bridge.KernelCall(
        cell="lstm", x=torch.randn(B, T, D, requires_grad=True),
        kernel=torch.randn(D, 4 * H, requires_grad=True),
        recurrent_kernel=torch.randn(H, 4 * H), bias=None,
        states=[torch.zeros(B, H), torch.zeros(B, H)], mask=None, dropout_mask=None,
        recurrent_dropout_mask=None, training=True, options={}, return_sequences=True)
    assert torch_bridge.supports(call) is None
    outputs, (h, c) = torch_bridge.run(call)        # [B, T, H], [B, H], [B, H]
    outputs.sum().backward()                        # call.x.grad, call.kernel.grad
"""
import json

import numpy as np
import torch

from .. import ops
from . import BACKWARD, EXTRAS, FORWARD, HostCall, count


def engine_for(call):
    """The ops engine that runs ``call``: "cuda" for CUDA tensors, "cpu" otherwise.

    Example::

        engine_for(call)        # "cpu"
    """
    return "cuda" if call.x.device.type == "cuda" else "cpu"


def supports(call):
    """None when the call can run here, else the reason (for the layer's fallback warning).

    Example::

        supports(call)          # None, or e.g. "the inputs live on a 'mps' device; ..."
    """
    for name, t in call.named_arrays():
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a torch.Tensor"
    if torch.jit.is_tracing():
        return "the call is being traced by torch.jit (torch.compile runs the kernels)"
    device = call.x.device
    if device.type not in ("cpu", "cuda"):
        return (f"the inputs live on a '{device.type}' device; the fastcells kernels run on "
                f"the CPU and on CUDA GPUs only")
    for name, t in call.named_arrays():
        if t.device != device:
            return f"{name} is on {t.device} while the inputs are on {device}"
    if device.type == "cuda" and not ops.cuda_available():
        return ("the inputs live on a CUDA device but numba.cuda finds no usable GPU "
                "(is numba-cuda installed?)")
    return None


def run(call):
    """Run the recurrence; returns ``(outputs, [final states])`` as torch tensors on the
    device of ``call.x``, differentiable with respect to x, the weights and the initial
    states.

    Example::

        outputs, states = run(call)
    """
    if torch.compiler.is_compiling():
        return _run_compiled(call)
    spec = _Spec(call)
    diff = [call.x, call.kernel, call.recurrent_kernel, call.bias, *call.states]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in diff)
    if not needs_grad:      # no graph: run the ops directly and drop the cache at once
        fwd = spec.forward(*diff[:4], call.states, *spec.extras)
        ops.release_cache(fwd.cache)
        res = [spec.to_torch(fwd.outputs)] + [spec.to_torch(s) for s in fwd.states]
    else:
        res = _RNNFunction.apply(spec, *spec.extras, *diff)
    return res[0], list(res[1:])


class _Spec:
    """What the autograd function needs besides the tensors: cell, options, engine."""

    def __init__(self, call):
        self.cell = call.cell
        self.engine = engine_for(call)
        self.device = call.x.device
        self.nstates = len(call.states)
        self.has_bias = call.bias is not None
        self.training = bool(call.training)
        self.return_sequences = bool(call.return_sequences)
        self.options = dict(call.options)
        self.extras = [getattr(call, n) for n in EXTRAS]

    # ---------------------------------------------------------------- conversions
    def to_engine(self, t):
        """A tensor as the ops take it: a NumPy view on the CPU, the tensor on CUDA."""
        if t is None:
            return None
        t = t.detach()
        if self.engine == "cuda":
            return t
        return t.resolve_conj().resolve_neg().numpy()

    def to_torch(self, a):
        """An ops result as a tensor on our device, sharing its memory."""
        if a is None or isinstance(a, torch.Tensor):
            return a
        if self.engine == "cuda":
            return torch.as_tensor(a, device=self.device)
        a = np.asarray(a)
        if any(s < 0 for s in a.strides):       # torch.from_numpy needs positive strides
            a = np.ascontiguousarray(a)
        return torch.from_numpy(a)

    # ---------------------------------------------------------------- ops calls
    def _kwargs(self, extras):
        kw = {n: self.to_engine(v) for n, v in zip(EXTRAS, extras) if v is not None}
        kw.update(self.options)
        kw.update(training=self.training, return_sequences=self.return_sequences)
        if self.engine == "cuda":
            kw["engine"] = "cuda"
        return kw

    def forward(self, x, W, U, b, states, mask, dmask, rmask):
        count(self.cell + "_forward")
        args = [self.to_engine(t) for t in (x, W, U, b, *states)]
        return FORWARD[self.cell](*args, **self._kwargs((mask, dmask, rmask)))

    def rebuild(self, x, W, U, b, states, mask, dmask, rmask):
        args = [self.to_engine(t) for t in (x, W, U, b, *states)]
        return ops.rebuild_cache(self.cell, None, *args, **self._kwargs((mask, dmask, rmask)))


class _RNNFunction(torch.autograd.Function):
    """Inputs: spec, mask, dropout_mask, recurrent_dropout_mask, x, kernel, recurrent_kernel,
    bias, *states. Outputs: outputs, *final states."""

    @staticmethod
    def forward(ctx, spec, mask, dmask, rmask, x, W, U, b, *states):
        ctx.set_materialize_grads(False)
        fwd = spec.forward(x, W, U, b, states, mask, dmask, rmask)
        ctx.spec = spec
        ctx.cache = fwd.cache           # None for an inference-mode call
        ctx.save_for_backward(mask, dmask, rmask, x, W, U, b, *(s.clone() for s in states))
        return (spec.to_torch(fwd.outputs), *(spec.to_torch(s) for s in fwd.states))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_outputs, *d_states):
        spec = ctx.spec
        mask, dmask, rmask, x, W, U, b, *states = ctx.saved_tensors
        cache, ctx.cache = ctx.cache, None          # a cache serves one backward only
        if cache is None:       # an inference-mode forward, or a second backward
            cache = spec.rebuild(x, W, U, b, states, mask, dmask, rmask)
        count(spec.cell + "_backward")
        try:
            g = BACKWARD[spec.cell](cache, spec.to_engine(d_outputs),
                                     *(spec.to_engine(d) for d in d_states))
        finally:
            ops.release_cache(cache)
        needs = ctx.needs_input_grad[4:]
        targets = [x, W, U, b, *states]
        grads = [g.x, g.kernel, g.recurrent_kernel, g.bias, *g.states]
        out = []
        for need, t, gr in zip(needs, targets, grads):
            if not need or t is None or gr is None:
                out.append(None)
            else:
                out.append(spec.to_torch(gr).to(t.dtype))
        return (None, None, None, None, *out)


# ---------------------------------------------------------------- under torch.compile
# torch.compile cannot trace into the kernels, and an autograd.Function holding NumPy arrays
# on its context is not something it can capture, so a compiled graph calls the kernels
# through two opaque custom ops: the forward returns its outputs, final states and the
# token of its cache in ``fastcells.bridge.pending``; the backward pops the cache by the
# token (or recomputes the forward). The static part of the call travels as a JSON string,
# a constant of the graph.

def _host(spec):
    """The :class:`HostCall` that a spec string describes."""
    host = HostCall.__new__(HostCall)
    host.__dict__.update(json.loads(spec))
    return host


@torch.compiler.assume_constant_result
def _spec_string(fields):
    """The spec string of a HostCall's fields (a constant for dynamo, which cannot trace the
    JSON encoder)."""
    d = dict(fields)
    d["options"] = dict(d["options"])
    return json.dumps(d, sort_keys=True)


def _engine_arrays(host, arrays):
    cuda = host.options.get("engine") == "cuda"
    return [a.detach() if cuda else a.detach().resolve_conj().resolve_neg().numpy()
            for a in arrays]


def _as_tensor(a, like):
    if isinstance(a, torch.Tensor):
        return a
    if like.device.type == "cuda":
        return torch.as_tensor(a, device=like.device)
    return torch.from_numpy(np.ascontiguousarray(a))


@torch.library.custom_op("fastcells::rnn_forward", mutates_args=())
def _compiled_forward(spec: str, arrays: list[torch.Tensor], keep: bool) -> list[torch.Tensor]:
    host = _host(spec)
    outputs, states, token = host.forward(_engine_arrays(host, arrays), keep)
    x = arrays[0]
    res = [_as_tensor(outputs, x).to(x.dtype)] + [_as_tensor(s, x).to(x.dtype)
                                                   for s in states]
    return res + [torch.tensor(token, dtype=torch.int64)]


@_compiled_forward.register_fake
def _(spec, arrays, keep):
    host = _host(spec)
    x, U = arrays[0], arrays[2]
    B, T, H = x.shape[0], x.shape[1], U.shape[0]
    out = x.new_empty((B, T, H) if host.return_sequences else (B, H))
    return ([out] + [x.new_empty((B, H)) for _ in range(host.nstates)]
            + [torch.empty((), dtype=torch.int64)])


@torch.library.custom_op("fastcells::rnn_backward", mutates_args=())
def _compiled_backward(spec: str, arrays: list[torch.Tensor], token: torch.Tensor,
                       upstream: list[torch.Tensor]) -> list[torch.Tensor]:
    host = _host(spec)
    grads = host.backward(_engine_arrays(host, arrays), int(token),
                          _engine_arrays(host, upstream))
    return [_as_tensor(g, a).to(a.dtype) if g is not None else torch.zeros_like(a)
            for g, a in zip(grads, arrays)]


@_compiled_backward.register_fake
def _(spec, arrays, token, upstream):
    host = _host(spec)
    return [torch.empty_like(a) for a in arrays[:host.n_diff]]


def _setup_context(ctx, inputs, output):
    spec, arrays, _ = inputs
    ctx.spec = spec
    ctx.n = len(arrays)
    host = _host(spec)
    first = 3 + host.has_bias                   # the initial states, saved as copies
    saved = list(arrays)
    saved[first:first + host.nstates] = [s.clone() for s in saved[first:first + host.nstates]]
    ctx.save_for_backward(*saved, output[-1])


def _backward(ctx, grads):
    *arrays, token = ctx.saved_tensors
    host = _host(ctx.spec)
    B, T, H = arrays[0].shape[0], arrays[0].shape[1], arrays[2].shape[0]
    shapes = [(B, T, H) if host.return_sequences else (B, H)] + [(B, H)] * host.nstates
    upstream = [g if g is not None else arrays[0].new_zeros(shape)      # unused outputs
                for g, shape in zip(grads, shapes)]
    dgrads = _compiled_backward(ctx.spec, arrays, token, upstream)
    return None, list(dgrads) + [None] * (ctx.n - host.n_diff), None


_compiled_forward.register_autograd(_backward, setup_context=_setup_context)


def _run_compiled(call):
    host = HostCall(call, engine=engine_for(call))
    fields = dict(vars(host), options=tuple(sorted(host.options.items())),
                  extra_names=tuple(host.extra_names))
    spec = _spec_string(tuple(sorted(fields.items())))
    arrays = host.arrays(call)
    keep = torch.is_grad_enabled() and any(a.requires_grad for a in arrays[:host.n_diff])
    res = _compiled_forward(spec, arrays, bool(keep and host.training))
    return res[0], list(res[1:-1])
