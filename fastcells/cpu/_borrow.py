"""Arrays without a reference count, for the loops of the kernels.

Every view a Numba kernel takes of an array (a row ``a[i]``, a slice, a reshape) adds one
to the reference count of the array's memory and takes it off again when the view is no
longer used: two calls into Numba's runtime, each an atomic read-modify-write that waits
for the stores before it. The kernels take several views per batch row and step.

``borrowed(a)`` is ``a`` without its memory owner: views of it count nothing (the runtime
returns at once for a missing owner, and LLVM drops the calls). It is for arrays that
something else keeps alive while the borrowed one is used: a kernel's arguments (held by
the caller for the whole call), and the arrays a kernel allocates, passed to
``keep_alive`` after the last use of what was borrowed from them (Numba frees an array
after the last use of its variable, not at the end of the function).
"""
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrowed(typingctx, a):
    """``a`` without a memory owner (see the module docstring)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        out = context.make_array(signature.return_type)(context, builder)
        for field in ("data", "shape", "strides", "itemsize", "nitems"):
            setattr(out, field, getattr(src, field))
        out.meminfo = cgutils.get_null_value(out.meminfo.type)
        out.parent = cgutils.get_null_value(out.parent.type)
        return out._getvalue()

    return a(a), codegen


@intrinsic
def keep_alive(typingctx, arrays):
    """Uses ``arrays`` (an array or a tuple of them) and nothing else: called at the end of
    a kernel, it keeps what the kernel allocated alive until then."""
    if not isinstance(arrays, (types.Array, types.BaseTuple)):
        return None

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(arrays), codegen
