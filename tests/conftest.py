import ctypes.util
import os
import sys


def _has_gpu():
    """An NVIDIA driver is installed (device nodes or the driver library)."""
    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None


# Without a GPU the CUDA kernels run under Numba's CUDA simulator. This must happen before
# anything imports numba.cuda (numba reads the variable once); set NUMBA_ENABLE_CUDASIM=0
# to keep it off, =1 to force it on a GPU machine.
if not _has_gpu():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# On a GPU TensorFlow would reserve the whole device at start-up and leave the CUDA kernels
# nothing (the layers then fall back to the built-in implementation): grow on demand.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
sys.path.insert(0, os.path.dirname(__file__))   # tests import reference.py directly

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# Run order, for the parallel run of CI (``pytest -n 2``: each worker takes the next test as
# it frees up). Tests marked ``early`` do their work in processes of their own, mostly on
# kernels the rest never compiles (PTX for a GPU, a private kernel cache, other vector
# widths), so they start first and overlap everything else. Tests marked ``late`` run the
# layers under another Keras backend in a subprocess that loads the kernels the rest of the
# suite compiled and cached, so they start last; run first, they would compile the same
# kernels at the same time as the other worker.
def pytest_configure(config):
    config.addinivalue_line("markers", "early: started first (works in processes of its own)")
    config.addinivalue_line("markers", "late: started last (reuses the kernel cache)")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.get_closest_marker("early"):
            return 0
        return 2 if item.get_closest_marker("late") else 1
    items.sort(key=rank)            # stable: the file order stays within each rank
