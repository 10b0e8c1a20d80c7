"""CUDA kernels (numba-cuda): the mirror of ``fastcells.cpu``.

``lstm``, ``gru`` and ``simple_rnn`` hold the recurrences, one persistent kernel launch per
sequence and direction; ``_linalg`` the time-parallel work around them (layouts, the input
projection, the weight-gradient GEMMs, column sums). The drivers have the signatures of the
CPU drivers and take and return numba device arrays. Everything also runs under Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how the tests run without a GPU.

The framework bridges use the array helpers below (importing this package imports
numba.cuda, so they import it where a GPU call needs it): ``to_device``, ``to_host``,
``copy`` (a new device allocation, 256-byte aligned), ``c_contiguous`` and ``SIMULATOR``.
"""
from ._common import SIMULATOR
from ._linalg import _c_contiguous as c_contiguous
from ._linalg import copy, to_device, to_host

__all__ = ["SIMULATOR", "c_contiguous", "copy", "to_device", "to_host"]
