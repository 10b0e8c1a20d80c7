"""One module per Keras backend: turn backend tensors into arrays, call ``fastcells.ops``,
and register the custom gradient that calls the backward kernels.

Every bridge exposes ``run(call) -> (outputs, states)``, with ``call`` a :class:`KernelCall`
holding backend tensors, and ``supports(call)``, which returns None when the bridge can run
the call or a short reason why not. A bridge that can run more than one engine also exposes
``engine_for(call)``, the engine ("cpu" or "cuda") that ``run`` will use; without it the
engine is "cpu".

Example::

    mod = get("torch")                  # None for a backend without a bridge
    if mod is not None and mod.supports(call) is None:
        outputs, states = mod.run(call)
"""
import collections
import dataclasses
import threading
from typing import Any, Optional

from .. import ops

#: How many times each kernel ran, by "<cell>_<forward|backward>": lets tests prove the
#: kernels ran rather than a silent fallback.
kernel_calls = collections.Counter()
_lock = threading.Lock()


def count(name):
    with _lock:
        kernel_calls[name] += 1


#: The arrays of a call that take no gradient, in the order the bridges pass them.
EXTRAS = ("mask", "dropout_mask", "recurrent_dropout_mask")


@dataclasses.dataclass
class KernelCall:
    """One recurrence to run, in backend tensors (see ``fastcells.ops`` for the shapes)."""
    cell: str                       # "lstm" | "gru" | "simple_rnn"
    x: Any                          # [B, T, D]
    kernel: Any
    recurrent_kernel: Any
    bias: Optional[Any]
    states: list                    # initial states, each [B, H]
    mask: Optional[Any]             # [B, T] bool
    dropout_mask: Optional[Any]     # [B, D] or [G, B, D]
    recurrent_dropout_mask: Optional[Any]
    training: bool
    options: dict                   # go_backwards, zero_output_for_mask, activation, ...
    return_sequences: bool
    engine: str = "auto"            # what the layer asked for: "auto", "cpu" or "cuda"

    def named_arrays(self):
        """``[(argument name, array)]`` for every array of the call that is not None."""
        named = [("x", self.x), ("kernel", self.kernel),
                 ("recurrent_kernel", self.recurrent_kernel), ("bias", self.bias)]
        named += [(f"states[{k}]", s) for k, s in enumerate(self.states)]
        named += [(n, getattr(self, n)) for n in EXTRAS]
        return [(n, a) for n, a in named if a is not None]


class CacheStore:
    """Forward caches waiting for their backward pass, keyed by an integer token.

    Large caches do not cross into framework tensors (TensorFlow copies what a
    ``numpy_function`` returns: 64 MB cost 10-140 ms), so the forward keeps its cache here and
    returns only the token. The store is bounded (``config.MAX_PENDING_CACHES`` entries and
    ``config.MAX_PENDING_CACHE_BYTES``): a forward whose backward never comes (a training-mode
    call without a gradient) cannot leak, and a backward whose cache was evicted, or asked
    for twice, recomputes the forward: slower, never wrong.
    """

    def __init__(self):
        self._items = collections.OrderedDict()
        self._bytes = 0
        self._next = 1
        self._lock = threading.Lock()

    @staticmethod
    def _size(cache):
        return sum(a.nbytes for a in cache.kcache or ())

    def put(self, cache):
        from .. import config
        size = self._size(cache)
        with self._lock:
            token = self._next
            self._next += 1
            self._items[token] = cache
            self._bytes += size
            while self._items and (len(self._items) > config.MAX_PENDING_CACHES or
                                   self._bytes > config.MAX_PENDING_CACHE_BYTES):
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)
        return token

    def pop(self, token):
        """The cache of ``token`` (removed from the store), or None if it is gone."""
        with self._lock:
            cache = self._items.pop(int(token), None)
            if cache is not None:
                self._bytes -= self._size(cache)
        return cache

    def __len__(self):
        return len(self._items)

    def __contains__(self, token):
        with self._lock:
            return int(token) in self._items


#: The caches of forward passes whose backward has not run yet.
pending = CacheStore()


#: The forward and backward ops of each cell (from ``ops.CELLS``).
FORWARD = {name: c.forward for name, c in ops.CELLS.items()}
BACKWARD = {name: c.backward for name, c in ops.CELLS.items()}
#: The token of a forward that kept no cache.
NO_TOKEN = 0


class HostCall:
    """The static part of a :class:`KernelCall` and the array-level forward and backward
    that a bridge runs inside its framework's callback.

    The arrays travel as one flat list, in the order ``x, kernel, recurrent_kernel, [bias],
    *states, *extras`` (the extras that are not None, in the order of ``EXTRAS``): the
    first ``n_diff`` take a gradient. The forward keeps its cache in :data:`pending` and
    returns its token; the backward pops the cache by that token, or recomputes the forward
    when it is gone (evicted, popped by an earlier backward, or never kept).

    Example::

        host = HostCall(call)
        outputs, states, token = host.forward(host.arrays(call), keep=True)
        grads = host.backward(host.arrays(call), token, [d_outputs, *d_states])
    """

    def __init__(self, call, engine=None):
        self.cell = call.cell
        self.nstates = len(call.states)
        self.has_bias = call.bias is not None
        self.extra_names = [n for n in EXTRAS if getattr(call, n) is not None]
        self.training = bool(call.training)
        self.return_sequences = bool(call.return_sequences)
        self.options = dict(call.options)
        if engine == "cuda":
            self.options["engine"] = "cuda"
        self.n_diff = 3 + self.has_bias + self.nstates
        self.n_in = self.n_diff + len(self.extra_names)

    def arrays(self, call):
        """The arrays of ``call`` in the flat order."""
        out = [call.x, call.kernel, call.recurrent_kernel]
        out += [call.bias] if self.has_bias else []
        return out + list(call.states) + [getattr(call, n) for n in self.extra_names]

    def _split(self, arrays):
        x, W, U = arrays[:3]
        i = 3 + self.has_bias
        b = arrays[3] if self.has_bias else None
        states = list(arrays[i:i + self.nstates])
        kw = dict(zip(self.extra_names, arrays[i + self.nstates:self.n_in]))
        kw.update(self.options, training=self.training,
                  return_sequences=self.return_sequences)
        return (x, W, U, b, *states), kw

    def forward(self, arrays, keep):
        """``(outputs, [final states], token)``; the cache is kept (and its token returned)
        only when ``keep`` and the call is in training mode."""
        args, kw = self._split(arrays)
        count(self.cell + "_forward")
        fwd = FORWARD[self.cell](*args, **kw)
        if keep and self.training:
            token = pending.put(fwd.cache)
        else:
            token = NO_TOKEN
            ops.release_cache(fwd.cache)
        return fwd.outputs, list(fwd.states), token

    def backward(self, arrays, token, upstream, found=None):
        """The gradients of the ``n_diff`` differentiable arrays, in their order.
        ``found(cache)``, when given, is applied to a cache popped from the store before
        the backward uses it."""
        count(self.cell + "_backward")
        token = int(token)
        cache = pending.pop(token) if token != NO_TOKEN else None
        if cache is not None and found is not None:
            found(cache)
        if cache is None:
            args, kw = self._split(arrays)
            cache = ops.rebuild_cache(self.cell, None, *args, **kw)
        try:
            g = BACKWARD[self.cell](cache, *upstream)
        finally:
            ops.release_cache(cache)        # popped from the store: nothing else can use it
        out = [g.x, g.kernel, g.recurrent_kernel] + ([g.bias] if self.has_bias else [])
        return out + list(g.states)


def get(backend_name):
    """The bridge module of a Keras backend, or None when fastcells has none (imported on
    first use, so a backend's framework is imported only when that backend runs).

    Example::

        get("tensorflow").supports(call)    # None when the call can run
    """
    if backend_name == "tensorflow":
        from . import tensorflow as mod
        return mod
    if backend_name == "torch":
        from . import torch as mod
        return mod
    if backend_name == "jax":
        from . import jax as mod
        return mod
    return None


def engine_for(mod, call):
    """The engine ("cpu" or "cuda") that bridge module ``mod`` runs ``call`` on."""
    pick = getattr(mod, "engine_for", None)
    return "cpu" if pick is None else pick(call)
