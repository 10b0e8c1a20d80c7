"""CUDA kernels (numba-cuda): the mirror of ``fastcells.cpu``.

``lstm``, ``gru`` and ``simple_rnn`` hold the recurrences, one persistent kernel launch per
sequence and direction; ``_linalg`` the time-parallel work around them (layouts, the input
projection, the weight-gradient GEMMs, column sums). The drivers have the signatures of the
CPU drivers and take and return numba device arrays. Everything also runs under Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how the tests run without a GPU.
"""
