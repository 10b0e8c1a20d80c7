"""One module per Keras backend: turn backend tensors into arrays, call ``fastcells.ops``,
and register the custom gradient that calls the backward kernels.

Every bridge exposes ``run(call) -> (outputs, states)``, with ``call`` a :class:`KernelCall`
holding backend tensors, and ``supports(call)``, which returns None when the bridge can run
the call or a short reason why not.
"""
import collections
import dataclasses
import threading
from typing import Any, Optional

#: How many times each kernel ran, by "<cell>_<forward|backward>": lets tests prove the
#: kernels ran rather than a silent fallback.
kernel_calls = collections.Counter()
_lock = threading.Lock()


def count(name):
    with _lock:
        kernel_calls[name] += 1


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


def get(backend_name):
    """The bridge module of a Keras backend, or None when fastcells has none."""
    if backend_name == "tensorflow":
        from . import tensorflow as mod
        return mod
    return None
