"""The layers under the JAX Keras backend, against the built-in layers.

The Keras backend is fixed per process, so the checks (``tests/jax_backend_checks.py``) run
in a subprocess with ``KERAS_BACKEND=jax``.
"""
import importlib.util

import pytest

from helpers import assert_backend_checks_pass

if importlib.util.find_spec("jax") is None:
    pytest.skip("jax is not installed", allow_module_level=True)


@pytest.mark.late
def test_layers_equal_builtin_under_jax_backend():
    """Outputs and gradients (jax.vjp under jit) of every cell in six configurations
    (masks, go_backwards, states, no bias, dropout) and of some cells each in the other
    configurations of the TensorFlow layer tests (masks that repeat outputs, dropout at
    inference, input dropout only, relu/hard_sigmoid), float64 against the NumPy
    reference, Bidirectional, stateful, a recomputed evicted cache, model.fit loss
    histories and the bridge's fallback reasons."""
    assert_backend_checks_pass("jax")
