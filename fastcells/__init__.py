"""fastcells: Numba kernels for LSTM, GRU and SimpleRNN behind drop-in Keras 3 layers."""
__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
