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


def _without_owner(context, builder, typ, value):
    """The array ``value`` of type ``typ`` with no memory owner."""
    src = context.make_array(typ)(context, builder, value)
    out = context.make_array(typ)(context, builder)
    for field in ("data", "shape", "strides", "itemsize", "nitems"):
        setattr(out, field, getattr(src, field))
    out.meminfo = cgutils.get_null_value(out.meminfo.type)
    out.parent = cgutils.get_null_value(out.parent.type)
    return out._getvalue()


@intrinsic
def borrowed(typingctx, arrays):
    """``arrays`` (an array, or a tuple of arrays) without their memory owner (see the
    module docstring)::

        x, y = borrowed((x, y))
    """
    if isinstance(arrays, types.Array):
        def codegen(context, builder, signature, args):
            return _without_owner(context, builder, signature.args[0], args[0])
        return arrays(arrays), codegen
    if not (isinstance(arrays, types.BaseTuple)
            and all(isinstance(t, types.Array) for t in arrays.types)):
        return None

    def codegen(context, builder, signature, args):
        tup = args[0]
        for i, typ in enumerate(signature.args[0].types):
            item = _without_owner(context, builder, typ, builder.extract_value(tup, i))
            tup = builder.insert_value(tup, item, i)
        return tup

    return arrays(arrays), codegen


@intrinsic
def keep_alive(typingctx, arrays):
    """Uses ``arrays`` (an array or a tuple of them) and nothing else: called at the end of
    a kernel, it keeps what the kernel allocated alive until then."""
    if not isinstance(arrays, (types.Array, types.BaseTuple)):
        return None

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return types.none(arrays), codegen
