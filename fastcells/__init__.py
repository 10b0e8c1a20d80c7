"""fastcells: Numba kernels for LSTM, GRU and SimpleRNN behind drop-in Keras 3 layers.

    from fastcells import LSTM, GRU, SimpleRNN    # instead of keras.layers.LSTM / GRU / ...
    from fastcells import ops                     # the array-level kernels
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .layers import GRU, LSTM, SimpleRNN  # noqa: E402

__all__ = ["LSTM", "GRU", "SimpleRNN", "ops", "__version__"]
