"""fastcells: Numba kernels for LSTM, GRU and SimpleRNN behind drop-in Keras 3 layers.

    from fastcells import LSTM, GRU, SimpleRNN    # instead of keras.layers.LSTM / GRU / ...
    from fastcells import ops                     # the array-level kernels
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# `python -m fastcells ...` imports this package (and so TensorFlow, through the layers)
# before __main__ runs; quieten TensorFlow's C++ logging for the command line only (runpy
# sets argv[0] to "-m" while it imports the package). Users' own processes are untouched.
if _sys.argv[:1] == ["-m"]:
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from . import ops  # noqa: E402
from .layers import GRU, LSTM, SimpleRNN  # noqa: E402

__all__ = ["LSTM", "GRU", "SimpleRNN", "ops", "__version__"]
