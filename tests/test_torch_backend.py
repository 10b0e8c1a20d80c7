"""The layers under the torch Keras backend, against the built-in layers.

The Keras backend is fixed per process, so the checks (``tests/torch_backend_checks.py``)
run in a subprocess with ``KERAS_BACKEND=torch``. torch is not imported here: importing it
into the TensorFlow test process would change the threading of the tests that follow.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP_STATUS = 77            # the script's status when torch cannot be imported


def run_checks(*selection):
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(HERE, "torch_backend_checks.py"),
                           *selection], env=env, capture_output=True, text=True, timeout=600)


def test_layers_equal_builtin_under_torch_backend():
    """Outputs and gradients of every cell and configuration (masks, go_backwards, states,
    dropout, float64, Bidirectional, stateful, mixed precision, a second backward),
    model.fit loss histories, and the bridge's device handling."""
    proc = run_checks()
    if proc.returncode == SKIP_STATUS:
        pytest.skip(proc.stdout.strip())
    print(proc.stdout)
    assert proc.returncode == 0, (f"torch backend checks failed (status {proc.returncode}):\n"
                                  f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")
    assert " 0 failed" in proc.stdout
