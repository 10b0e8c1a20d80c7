"""Where a layer is traced: for an exported artifact, under TensorFlow's XLA, or for a model
whose ``jit_compile=True`` was asked for explicitly.

An exported artifact (``model.export``, ``keras.export.ExportArchive``,
``tf.saved_model.save``) is loaded and served by processes that may never import
fastcells, and a SavedModel cannot carry the Python callbacks that run the kernels, so the
layers trace the built-in recurrence for it. Keras's export traces its endpoints before it
reaches ``tf.saved_model.save``, so an export is recognised by the frames of the call
stack: those of Keras's export entry points, or TensorFlow's save context; under torch,
by ``torch.compiler.is_exporting``.
"""
import sys

#: Why a layer traced under TensorFlow's XLA runs the built-in recurrence.
XLA_REASON = ("TensorFlow's XLA compiler (jit_compile=True) cannot hold the fastcells "
              "kernels, which TensorFlow runs as Python ops, so XLA compiles the built-in "
              "recurrence instead; compile the model with jit_compile=False (the default on "
              "a CPU) to run the kernels")

_export_codes = None
_MAX_DEPTH = 200


def _export_entry_codes():
    """The code objects of Keras's export entry points that are present in this Keras."""
    global _export_codes
    if _export_codes is None:
        codes = set()
        candidates = [("keras.src.models.model", "Model", "export"),
                      ("keras.src.export.saved_model", "ExportArchive", "write_out"),
                      ("keras.src.export.saved_model_export_archive",
                       "SavedModelExportArchive", "write_out"),
                      ("keras.src.export.saved_model", None, "export_saved_model")]
        for module, cls, name in candidates:
            obj = sys.modules.get(module)
            if obj is None:
                try:
                    obj = __import__(module, fromlist=["_"])
                except Exception:       # not in this Keras version
                    continue
            obj = getattr(obj, cls, None) if cls else obj
            fn = getattr(obj, name, None)
            code = getattr(fn, "__code__", None)
            if code is not None:
                codes.add(code)
        _export_codes = frozenset(codes)
    return _export_codes


def exporting():
    """Whether the current trace is for an exported artifact."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():
        # torch.compile or torch.export (ONNX export goes through the latter); the frames
        # of a dynamo trace cannot be walked
        return bool(torch.compiler.is_exporting())
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        from tensorflow.python.saved_model import save_context
        if save_context.in_save_context():
            return True
    codes = _export_entry_codes()
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return False
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def in_tf_xla():
    """Whether the current trace is a TensorFlow function compiled by XLA."""
    import keras
    tf = sys.modules.get("tensorflow")
    if keras.backend.backend() != "tensorflow" or tf is None or tf.executing_eagerly():
        return False
    from tensorflow.python.ops import control_flow_util
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def explicit_jit_request():
    """Whether Keras is asking, for a ``jit_compile=True`` given explicitly, if the model can
    be compiled (the ``jit_compile`` setter of ``Trainer``), rather than resolving
    ``jit_compile="auto"``."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        name = frame.f_code.co_name
        if name == "_resolve_auto_jit_compile":
            return False
        if name == "jit_compile":
            return True
        frame = frame.f_back
    return False
