"""Flush denormals to zero inside the kernels (x86 MXCSR FTZ and DAZ bits).

A gradient that enters only at the last step of a long sequence decays through the
recurrence into denormal numbers, and arithmetic on denormals is about 100 times slower
(an LSTM backward at B=128 T=500 H=32 runs about 10 times as long with them). TensorFlow runs
its own ops with denormals flushed; the kernels do the same for the thread that runs them
and restore the caller's mode on exit. The GEMMs around the kernels need the same (a
gradient GEMM over decayed values is several times slower): the pool's threads flush
denormals for their whole life, and the calling thread for the duration of an op
(``flushing_denormals``). On other processors this is a no-op.
"""
import platform
import threading

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import config
from ._jit import kernel

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FTZ_DAZ = 0x8040          # MXCSR bit 15 (flush to zero) | bit 6 (denormals are zero)


@intrinsic
def _read_mxcsr(typingctx):
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.stmxcsr")
        builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return builder.load(slot)
    return types.uint32(), codegen


@intrinsic
def _write_mxcsr(typingctx, value):
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, ir.IntType(32))
        builder.store(args[0], slot)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse.ldmxcsr")
        builder.call(fn, [builder.bitcast(slot, ir.IntType(8).as_pointer())])
        return context.get_dummy_value()
    return types.none(types.uint32), codegen


if _X86:
    @njit(inline="always", **config.NJIT_OPTIONS)
    def flush_denormals():
        """Set FTZ/DAZ for this thread; returns the previous mode for ``restore``."""
        old = _read_mxcsr()
        _write_mxcsr(old | _FTZ_DAZ)
        return old

    @njit(inline="always", **config.NJIT_OPTIONS)
    def restore(old):
        _write_mxcsr(old)
else:
    @njit(inline="always", **config.NJIT_OPTIONS)
    def flush_denormals():
        return 0

    @njit(inline="always", **config.NJIT_OPTIONS)
    def restore(old):
        return None


# Python-callable forms, for the threads that run the GEMMs around the kernels.
@kernel
def _enter():
    return flush_denormals()


@kernel
def _leave(old):
    restore(old)


class _FlushDenormals:
    """Context: this thread flushes denormals (restored on exit; nesting is fine)."""

    def __init__(self):
        self._local = threading.local()

    def __enter__(self):
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(_enter())

    def __exit__(self, *exc):
        _leave(self._local.stack.pop())


flushing_denormals = _FlushDenormals()


def init_worker_thread():
    """For the pool's own threads: flush denormals for the thread's whole life."""
    _enter()
