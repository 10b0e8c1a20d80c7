"""fastcells: Numba kernels for LSTM, GRU and SimpleRNN behind drop-in Keras 3 layers.

    from fastcells import LSTM, GRU, SimpleRNN    # instead of keras.layers.LSTM / GRU / ...
    from fastcells import ops                     # the array-level kernels
    fast = fastcells.from_keras(model)            # a model's built-in layers -> fastcells
"""
import sys as _sys

__version__ = "0.1.0"

# `python -m fastcells ...` imports this package (and so Keras, through the layers) before
# __main__ runs; for the command line only, quieten TensorFlow's C++ logging and, where
# TensorFlow is missing (or for `bench --gpu`), start Keras on the torch backend.
# Users' own processes are untouched.
from . import _startup  # noqa: E402

if _startup.is_command_line(_sys.argv):
    _startup.setup_command_line(_sys.argv)

from . import ops  # noqa: E402

# The processes that only compile kernels into the cache (``fastcells._coldstart``,
# ``fastcells.warmup``) skip Keras: importing it takes longer than starting the compiler.
if not _startup.kernels_only():
    from .convert import convert_file, from_keras, to_keras  # noqa: E402
    from .layers import GRU, LSTM, SimpleRNN  # noqa: E402

__all__ = ["LSTM", "GRU", "SimpleRNN", "ops", "from_keras", "to_keras", "convert_file",
           "__version__"]
