"""The layers under the torch Keras backend, against the built-in layers.

The Keras backend is fixed per process, so the checks (``tests/torch_backend_checks.py``)
run in a subprocess with ``KERAS_BACKEND=torch``. torch is not imported here: importing it
into the TensorFlow test process would change the threading of the tests that follow.
"""
import importlib.util

import pytest

from helpers import assert_backend_checks_pass

if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed", allow_module_level=True)


@pytest.mark.late
def test_layers_equal_builtin_under_torch_backend():
    """Outputs and gradients of every cell and configuration (masks, go_backwards, states,
    dropout, float64, Bidirectional, stateful, mixed precision, a second backward),
    model.fit loss histories, and the bridge's device handling."""
    assert_backend_checks_pass("torch")
