import ctypes.util
import importlib.util
import os
import subprocess
import sys

import skips     # tests/skips.py: the accepted skips (imports nothing of numba or fastcells)


def _has_gpu_driver():
    """An NVIDIA driver is installed (device nodes or the driver library)."""
    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None


def _gpu_usable():
    """numba-cuda finds a GPU it can use (asked in a process of its own: numba reads
    NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported)."""
    probe = "import sys; from numba import cuda; sys.exit(0 if cuda.is_available() else 1)"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, timeout=120,
                              capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ``FASTCELLS_TEST_CUDA=0`` opts out of the CUDA tests (they then skip, and the skips are
# accepted as opted out). Otherwise, where numba-cuda is installed, the CUDA tests run on a
# GPU where numba-cuda can use one, else under Numba's CUDA simulator; with neither they
# fail (tests/test_suite.py), never skip unseen. The simulator must be chosen before anything
# imports numba.cuda (numba reads the variable once); NUMBA_ENABLE_CUDASIM set by hand (=1
# to force it on a GPU machine) is kept.
if (not skips.CUDA_OPTED_OUT and "NUMBA_ENABLE_CUDASIM" not in os.environ
        and importlib.util.find_spec("numba_cuda") is not None):
    if not (_has_gpu_driver() and _gpu_usable()):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

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
    if not hasattr(config, "workerinput"):          # the controller (or a run without -n)
        config.pluginmanager.register(skips.Skips(), "fastcells-skips")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.get_closest_marker("early"):
            return 0
        return 2 if item.get_closest_marker("late") else 1
    items.sort(key=rank)            # stable: the file order stays within each rank
