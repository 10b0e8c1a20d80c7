"""Equivalence: the errors of an engine against the built-in layer (outputs, gradients, the
gradients of a ``model.fit`` step) and the bounds they must meet."""
import functools
import math

import numpy as np

from .. import config

#: Bound on the difference between PyTorch and the built-in layer (not a fastcells contract:
#: it only catches a wrong weight conversion).
TORCH_TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


def relative_error(got, want):
    """The difference of ``got`` from ``want`` relative to ``want``, in the two norms at once:
    ``max(||got - want|| / ||want||, max|got - want| / max|want|)`` (Frobenius, then largest
    element), in float64. Neither ratio grows with the number of elements, and the second
    sees one wrong element of a large tensor. NaN (or Inf) in either array gives NaN, which
    fails every bound; 0.0 for empty arrays."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: {got.shape} and {want.shape}")
    if want.size == 0:
        return 0.0
    e = got - want
    if not np.isfinite(e).all():
        return float("nan")
    worst = 0.0
    for err, size in ((np.linalg.norm(e), np.linalg.norm(want)),
                      (np.abs(e).max(), np.abs(want).max())):
        if err:
            worst = max(worst, float(err / size) if size else float("inf"))
    return worst


def worst_of(a, b):
    """The larger of two errors, NaN when either is NaN (``max(0.0, nan)`` is 0.0)."""
    if a is None:
        return b
    return float(np.maximum(a, b))


def compare(result, reference):
    """Differences of ``(outputs, grads)`` against the reference (the built-in layer).

    Returns ``(max_error, grad_error)``: the largest absolute difference of the outputs, and
    (training mode) the largest over the gradient tensors of :func:`relative_error` (None in
    inference mode). NaN anywhere gives NaN; gradient lists of different lengths or tensors
    of different shapes raise ``AssertionError``.
    """
    y, grads = result
    y_ref, g_ref = reference
    if y.shape != y_ref.shape:
        raise AssertionError(f"outputs have shape {y.shape}, the built-in layer's "
                             f"{y_ref.shape}")
    max_error = 0.0
    if y.size:
        e = np.abs(y.astype(np.float64) - y_ref)
        max_error = float(e.max()) if np.isfinite(e).all() else float("nan")
    grad_error = None
    if grads is not None and g_ref is not None:
        grads, g_ref = list(grads), list(g_ref)
        if len(grads) != len(g_ref):
            raise AssertionError(f"{len(grads)} gradients, the built-in layer has "
                                 f"{len(g_ref)}")
        grad_error = 0.0
        for g, r in zip(grads, g_ref):
            if g.shape != r.shape:
                raise AssertionError(f"a gradient has shape {g.shape}, the built-in layer's "
                                     f"{r.shape}")
            grad_error = worst_of(grad_error, relative_error(g, r))
    elif (grads is None) != (g_ref is None):
        raise AssertionError("gradients on one side only")
    return max_error, grad_error


def tolerances(engine, dtype="float32"):
    """``(output_tol, grad_tol)`` an engine must meet against the built-in layer."""
    if engine in ("torch", "torch-cudnn"):
        t = TORCH_TOLERANCE[dtype]
        return t, t
    if dtype == "float64":
        return config.TOL_F64, config.TOL_F64
    return config.TOL_OUTPUT_F32, config.TOL_GRAD_F32


@functools.lru_cache(maxsize=None)
def _probe_class():
    """The :func:`gradient_probe` class, made once on first use (Keras is imported then)."""
    import keras

    class GradientProbe(keras.optimizers.Optimizer):
        """One step sets every trainable variable to its gradient."""

        def __init__(self, name="gradient_probe", **kwargs):
            super().__init__(learning_rate=1.0, name=name, **kwargs)

        def update_step(self, gradient, variable, learning_rate):
            # zeros + gradient: a sparse gradient (an Embedding's) becomes dense, its
            # repeated rows summed
            dense = keras.ops.add(keras.ops.zeros(variable.shape, variable.dtype),
                                  keras.ops.cast(gradient, variable.dtype))
            self.assign(variable, dense)

    return GradientProbe


def gradient_probe():
    """A Keras optimizer whose step sets every trainable variable to its gradient.

    One ``train_on_batch`` with it leaves the step's gradients in the model's weights, as
    Keras's own train step computed them (under ``jit_compile``, a distribution strategy or
    ``torch.compile`` alike). Comparing those weights with a built-in model's compares the
    gradients themselves, which the weights after an Adam step cannot show: Adam's first
    update is about ``learning_rate * sign(gradient)`` whatever the gradient's size.

    Example::

        model.compile(optimizer=gradient_probe(), loss="mse")
        loss, grads = fit_step(model, x, y)
    """
    return _probe_class()()


def fit_step(model, x, y):
    """One ``model.train_on_batch(x, y)`` from the model's current weights: ``(loss, the
    weights after the step)``. With the model compiled with :func:`gradient_probe`, those
    weights are the step's gradients; the model's weights are put back afterwards."""
    before = model.get_weights()
    loss = float(np.asarray(model.train_on_batch(x, y)))
    after = [np.array(w) for w in model.get_weights()]
    model.set_weights(before)
    return loss, after


def gradient_step(model, x, y):
    """:func:`fit_step` with :func:`gradient_probe`: ``(loss, gradients)`` of one
    ``model.train_on_batch(x, y)`` of a compiled model, which is then compiled again with
    its own optimizer and loss, its weights unchanged.

    Example::

        loss, grads = gradient_step(model, x, y)
        loss_ref, grads_ref = gradient_step(builtin_model, x, y)
    """
    optimizer, loss = model.optimizer, model.loss
    model.compile(optimizer=gradient_probe(), loss=loss)
    try:
        return fit_step(model, x, y)
    finally:
        model.compile(optimizer=optimizer, loss=loss)


def compare_fit_step(step, reference):
    """``(loss_error, gradient_error)`` of a :func:`fit_step` against the built-in model's
    from the same weights: the absolute difference of the losses, and the largest
    :func:`relative_error` over the weights after the step (the gradients, with
    :func:`gradient_probe`; NaN anywhere gives NaN)."""
    (loss, weights), (loss_ref, weights_ref) = step, reference
    if len(weights) != len(weights_ref):
        raise AssertionError(f"{len(weights)} weights after the step, the built-in model has "
                             f"{len(weights_ref)}")
    loss_error = abs(loss - loss_ref) if math.isfinite(loss - loss_ref) else float("nan")
    step_grad_error = 0.0
    for w, r in zip(weights, weights_ref):
        step_grad_error = worst_of(step_grad_error, relative_error(w, r))
    return loss_error, step_grad_error


def check_equivalence(engine, max_error, grad_error, dtype="float32", loss_error=None,
                      step_grad_error=None):
    """None when the errors are within :func:`tolerances`, else a message saying what is off.
    The loss of a training step (``loss_error``) has the outputs' bound, its gradients
    (``step_grad_error``: the weights after a :func:`gradient_probe` step) the gradients'
    bound."""
    out_tol, grad_tol = tolerances(engine, dtype)
    problems = []
    if max_error is not None and not max_error <= out_tol:   # NaN fails too
        problems.append(f"outputs differ from the built-in layer by {max_error:.3g} "
                        f"(bound {out_tol:g})")
    if loss_error is not None and not loss_error <= out_tol:
        problems.append(f"the loss of a training step differs from the built-in model's by "
                        f"{loss_error:.3g} (bound {out_tol:g})")
    if step_grad_error is not None and not step_grad_error <= grad_tol:
        problems.append(f"the gradients of a training step differ from the built-in "
                        f"model's by {step_grad_error:.3g} of their norm (bound {grad_tol:g})")
    if grad_error is not None and not grad_error <= grad_tol:
        problems.append(f"gradients differ from the built-in layer's by {grad_error:.3g} of "
                        f"their norm (bound {grad_tol:g}; the larger of the Frobenius and "
                        f"the largest-element ratio)")
    return "; ".join(problems) or None
