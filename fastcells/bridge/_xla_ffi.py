"""Host functions as XLA FFI targets on the CPU: the kernels read XLA's buffers in place.

``jax.pure_callback`` copies every operand into a new host array and every result into a
new XLA buffer; at the IMDB shape (x and dx 8 MB each) those copies, and the page faults of
the fresh allocations behind them, are a large part of a training step
(docs/performance.md, "Across Keras backends"). An FFI target hands
the handler XLA's own buffers: operands are read where they lie and results are written
straight into the buffers XLA allocated for them.

The handler is one C function pointer made by ``ctypes`` (no compiled extension), registered
once as the typed-FFI target :data:`TARGET` for the CPU. Each use in a traced computation
passes, as its first operand, the number of an entry of :data:`_entries`: the Python
function that computes it, called as ``fn(inputs, outputs)`` with NumPy views of the
operands (read-only by contract) and of the result buffers (to fill). An exception in it
becomes an XLA error carrying its message, raised by JAX where the result is used.

The structures follow XLA's stable FFI C API (``xla/ffi/api/c_api.h``): only fields that
every version since the API was published has, at the offsets it has always had; the
handler reports API version 0.1, which newer XLA runtimes accept.

Views of the operands live only during the call: a function that keeps one (a cache for a
backward pass) must copy it or rebind it to a later call's operands (:func:`rebind`).
"""
import ctypes
import itertools
import logging
import threading

import numpy as np

#: The name of the FFI target, registered for the CPU platform.
TARGET = "fastcells_host_call"

_c = ctypes


class _ExtensionBase(_c.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", _c.c_size_t), ("type", _c.c_int),
                           ("next", _c.POINTER(_ExtensionBase))]


class _Buffer(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("dtype", _c.c_int), ("data", _c.c_void_p), ("rank", _c.c_int64),
                ("dims", _c.POINTER(_c.c_int64))]


class _List(_c.Structure):               # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("size", _c.c_int64), ("types", _c.POINTER(_c.c_int)),
                ("items", _c.POINTER(_c.c_void_p))]


class _Attrs(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("size", _c.c_int64), ("types", _c.c_void_p), ("names", _c.c_void_p),
                ("attrs", _c.c_void_p)]


class _ApiVersion(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("major_version", _c.c_int), ("minor_version", _c.c_int)]


class _Metadata(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("api_version", _ApiVersion),
                ("traits", _c.c_uint32)]


class _MetadataExtension(_c.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", _c.POINTER(_Metadata))]


class _ErrorCreateArgs(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("message", _c.c_char_p), ("errc", _c.c_int)]


_ErrorCreate = _c.CFUNCTYPE(_c.c_void_p, _c.POINTER(_ErrorCreateArgs))


class _Api(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", _c.c_void_p),
                ("error_create", _ErrorCreate)]


class _CallFrame(_c.Structure):
    _fields_ = [("struct_size", _c.c_size_t), ("extension_start", _c.POINTER(_ExtensionBase)),
                ("api", _c.POINTER(_Api)), ("ctx", _c.c_void_p), ("stage", _c.c_int),
                ("args", _List), ("rets", _List), ("attrs", _Attrs), ("future", _c.c_void_p)]


_METADATA = 1                   # XLA_FFI_Extension_Metadata
_EXECUTE = 3                    # XLA_FFI_ExecutionStage_EXECUTE
_BUFFER = 1                     # XLA_FFI_ArgType_BUFFER, XLA_FFI_RetType_BUFFER
_INTERNAL = 13                  # XLA_FFI_Error_Code_INTERNAL
_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8,
           7: np.uint16, 8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32,
           12: np.float64}

_entries = {}
_numbers = itertools.count(1)
_lock = threading.Lock()


def _view(address, writeable):
    """A NumPy array over the XLA buffer at ``address`` (dense, row-major)."""
    buf = _Buffer.from_address(address)
    dtype = np.dtype(_DTYPES[buf.dtype])
    shape = tuple(buf.dims[k] for k in range(buf.rank))
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0 or not buf.data:
        return np.empty(shape, dtype)
    raw = (_c.c_char * (n * dtype.itemsize)).from_address(buf.data)
    a = np.frombuffer(raw, dtype).reshape(shape)
    a.flags.writeable = writeable
    return a


def _error(frame, message):
    args = _ErrorCreateArgs(_c.sizeof(_ErrorCreateArgs), None, message.encode("utf-8", "replace"),
                            _INTERNAL)
    return frame.api.contents.error_create(_c.byref(args))


def _handle(frame_ptr):
    frame = frame_ptr.contents
    ext = frame.extension_start
    while ext:                                  # XLA asks for the handler's metadata first
        if ext.contents.type == _METADATA:
            md = _c.cast(ext, _c.POINTER(_MetadataExtension)).contents.metadata.contents
            md.api_version.major_version = 0
            md.api_version.minor_version = 1
            md.traits = 0
            return None
        ext = ext.contents.next
    if frame.stage != _EXECUTE:
        return None
    try:
        args = [_view(frame.args.items[k], False) for k in range(frame.args.size)]
        rets = [_view(frame.rets.items[k], True) for k in range(frame.rets.size)]
        fn = _entries[int(args[0])]
        fn(args[1:], rets)
        return None
    except BaseException as exc:                # noqa: BLE001  (every error goes back to XLA)
        return _error(frame, f"fastcells: {type(exc).__name__}: {exc}")


_handler = _c.CFUNCTYPE(_c.c_void_p, _c.POINTER(_CallFrame))(_handle)
_registered = None
#: Why the target could not be registered on a JAX that has ``jax.ffi`` (None otherwise).
failure = None


def supported():
    """True when this JAX has the FFI API the target needs (``jax.ffi`` with
    ``register_ffi_target``, ``pycapsule`` and ``ffi_call``); False on an older JAX, where
    the bridge uses ``jax.pure_callback``."""
    try:
        import jax.ffi as ffi
    except ImportError:
        return False
    return all(hasattr(ffi, n) for n in ("register_ffi_target", "pycapsule", "ffi_call"))


def available():
    """True when the FFI target is registered (done on first use). False on a JAX without
    the FFI API (:func:`supported`), and where registering it failed: then the error is
    kept in :data:`failure` and logged once on the "fastcells" logger, and the bridge uses
    ``jax.pure_callback``."""
    global _registered, failure
    with _lock:
        if _registered is None:
            _registered = False
            if supported():
                try:
                    import jax
                    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(_handler),
                                                platform="cpu", api_version=1)
                    _registered = True
                except Exception as exc:        # noqa: BLE001  (said, and kept in failure)
                    failure = f"{type(exc).__name__}: {exc}"
                    logging.getLogger("fastcells").warning(
                        "fastcells: the XLA FFI target could not be registered (%s); the "
                        "JAX bridge runs the kernels in jax.pure_callback, which copies "
                        "every operand and result", failure)
        return _registered


def add(fn):
    """Register ``fn(inputs, outputs)`` and return its entry number, the first operand of
    :func:`call`."""
    with _lock:
        number = next(_numbers)
        _entries[number] = fn
    return number


def call(number, result_specs, *operands):
    """Run entry ``number`` on ``operands`` inside the traced computation; returns a list
    of JAX arrays shaped as ``result_specs``."""
    import jax
    import jax.numpy as jnp
    out = jax.ffi.ffi_call(TARGET, list(result_specs))(jnp.int32(number), *operands)
    return list(out)


def rebind(obj, old, new, names):
    """Point the array attributes ``names`` of ``obj`` that view one of the arrays ``old``
    at the same elements of the matching array of ``new`` (same shapes and dtypes): a cache
    made over one call's operands, used in a later call over the same values."""
    spans = [(a.ctypes.data, a.ctypes.data + a.nbytes, a, b) for a, b in zip(old, new)
             if a.nbytes]
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, (list, tuple)):
            setattr(obj, name, type(value)(_moved(v, spans) for v in value))
        else:
            setattr(obj, name, _moved(value, spans))


def _moved(a, spans):
    if not isinstance(a, np.ndarray) or a.nbytes == 0:
        return a
    start = a.ctypes.data
    for lo, hi, old, new in spans:
        if lo <= start < hi:
            base = new.reshape(-1).view(np.uint8)
            return np.lib.stride_tricks.as_strided(base[start - lo:].view(a.dtype), a.shape,
                                                   a.strides, writeable=False)
    return a
