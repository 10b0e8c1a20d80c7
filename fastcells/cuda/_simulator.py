"""Cooperative launches under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1).

The simulator runs the blocks of a grid one after another and treats a grid barrier as a
block barrier (it supports cooperative grids of one block only), so a kernel whose blocks
exchange data at ``cuda.cg.this_grid().sync()`` would read what other blocks have not yet
written. ``launch_cooperative`` runs every thread of every block at once instead, one
Python thread each: ``syncthreads`` waits for the threads of the block, the grid barrier
for all threads of the grid, and each block has its own dynamic shared memory. It uses the
simulator's own kernel context (numba-cuda's ``numba.cuda.simulator``), so kernels see the
same ``cuda`` module they see in any simulated launch.
"""
import threading

import numpy as np
from numba.cuda.simulator import kernel as _simk
from numba.cuda.simulator import kernelapi as _api
from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray, FakeWithinKernelCUDAArray

#: Seconds a barrier waits before the launch is declared deadlocked.
BARRIER_TIMEOUT = 600.0


class _GridGroup:
    def sync(self):
        threading.current_thread().grid_barrier.wait()


class _Cg:
    def this_grid(self):
        return _GridGroup()


class _Module(_api.FakeCUDAModule):
    """The simulator's ``cuda`` module with a real grid barrier and per-block shared
    memory."""

    def __init__(self, grid_dim, block_dim, nshared):
        super().__init__(grid_dim, block_dim, nshared)
        self._cg = _Cg()

    @property
    def shared(self):
        return threading.current_thread().shared


class _Thread(threading.Thread):
    def __init__(self, fn, args, block, thread, block_barrier, grid_barrier, shared):
        super().__init__(daemon=True)
        self._fn, self._args = fn, args
        self.blockIdx = _api.Dim3(block, 0, 0)
        self.threadIdx = _api.Dim3(thread, 0, 0)
        self.thread_id = thread
        self.block_barrier = block_barrier
        self.grid_barrier = grid_barrier
        self.shared = shared
        self.error = None

    def syncthreads(self):
        self.block_barrier.wait()

    def run(self):
        try:
            self._fn(*self._args)
        except BaseException as e:          # noqa: BLE001 - re-raised by the launcher
            self.error = e
            self.block_barrier.abort()      # wake the others: they fail with BrokenBarrier
            self.grid_barrier.abort()


def _kernel_arg(a):
    if isinstance(a, FakeCUDAArray):
        return FakeWithinKernelCUDAArray(a)
    if isinstance(a, np.ndarray):
        raise TypeError("launch_cooperative takes device arrays (numba.cuda.to_device)")
    return a


def launch_cooperative(kernel, blocks, threads, nshared, args):
    """Run the simulated ``kernel`` on a 1-D grid of ``blocks`` x ``threads`` with
    ``nshared`` bytes of dynamic shared memory per block, all blocks at once."""
    module = _Module((blocks, 1, 1), (threads, 1, 1), nshared)
    grid_barrier = threading.Barrier(blocks * threads, timeout=BARRIER_TIMEOUT)
    kargs = [_kernel_arg(a) for a in args]
    pool = []
    with _simk._push_kernel_context(module), _api.swapped_cuda_module(kernel.fn, module):
        for blk in range(blocks):
            block_barrier = threading.Barrier(threads, timeout=BARRIER_TIMEOUT)
            shared = _api.FakeCUDAShared(nshared)
            for t in range(threads):
                pool.append(_Thread(kernel.fn, kargs, blk, t, block_barrier, grid_barrier,
                                    shared))
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    errors = [t.error for t in pool if t.error is not None]
    first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                 errors[0] if errors else None)
    if first is not None:
        raise first
