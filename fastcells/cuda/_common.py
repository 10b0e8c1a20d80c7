"""Pieces shared by the CUDA recurrence kernels and their drivers: the launch shape, shared
memory, kernel variants and optional arguments.

Launch shape of a recurrence (``plan``)
---------------------------------------
One launch runs a whole sequence. Without a split, block ``k`` owns batch rows
``[k*rows, (k+1)*rows)`` and every unit for all time steps, so blocks never wait for each
other; inside a block the
threads meet at ``syncthreads`` once or twice per step. A thread takes *items*: one unit j
of a group of ``R`` rows (``R`` = rows per thread, a compile-time constant so that its
accumulators live in registers), and a block's items are dealt to its threads round-robin,
the same way at every step, so each (row, unit) pair of the state belongs to one thread for
the whole sequence.

- rows per block = ceil(B / (multiprocessors * ``CUDA_BLOCKS_PER_SM``)), at most
  ``CUDA_MAX_ROWS_PER_BLOCK``: the batch is spread over the whole GPU first.
- R = the largest power of two <= min(``CUDA_ROWS_PER_THREAD``, rows per block).
- threads = min(``CUDA_THREADS_PER_BLOCK``, items rounded up to a warp), items =
  H * ceil(rows / R).
- Shared memory holds the block's state (double-buffered recurrent input h or h * r_k,
  cell state, outputs, step gradients; a few times rows * H numbers) and, when it fits
  next to it within ``CUDA_SHARED_MEMORY_BYTES``, the recurrent kernel U ([H, G*H]; its
  transpose in the backward). Otherwise U is read from global memory, where it stays in
  L2 (50 MB on an H100), and rows per block is raised to at least R so that each weight
  read serves several rows. A limit above 48 KiB makes the kernel opt in to the larger
  dynamic shared memory (up to the device's opt-in maximum, 227 KiB on an H100).

Split units (``split``; H >= ``CUDA_SPLIT_MIN_UNITS``, or a state that does not fit at one
row per block)
------------------------------------------------------------------------------------------
Blocks own (batch slice, unit slice) pairs: block k takes row block k // UB and units
[j0, j0 + Hb) with j0 = (k % UB) * Hb. Everything a thread does for an item is unchanged;
what changes is where the row vectors that every unit of a row reads (the recurrent input
h or h * r_k, GRU's q; the backward's dz) live: in a global exchange buffer of
``exchange_rows`` rows instead of shared memory, double-buffered by step parity like the
shared ones, and the barrier between the phases of a step is the grid's
(``cuda.cg.this_grid().sync()``, a cooperative launch; ``step_barrier`` picks it at compile
time, so that only split kernels are cooperative). A block's shared memory holds its
columns of U (``stage_units``: [H, G, Hb]) when they fit, and its own state [NR, Hb].

- row blocks RB = ceil(B / ``CUDA_MAX_ROWS_PER_BLOCK``), fewer if the grid would not fit
  (UB >= ceil(H / ``CUDA_SPLIT_MAX_UNITS_PER_BLOCK``) unit blocks each);
- unit blocks UB = min(H, max(that minimum, multiprocessors * ``CUDA_BLOCKS_PER_SM`` / RB)),
  Hb = ceil(H / UB) (the last block may own fewer units);
- the whole grid must be resident at once: ``launch`` checks it against
  ``max_cooperative_grid_blocks`` and raises ``ValueError`` naming the settings otherwise;
  a GPU without cooperative launches (``COOPERATIVE_LAUNCH`` attribute 0) is never given a
  split plan.

Why 512 units: at B=32, H=1024 (float32 LSTM, U = 16 MB) the unsplit plan has 8 blocks of
4 rows, each streaming all of U from L2 every step (128 MB per step on 8 of 132 SMs); split,
128 blocks each keep 128 KB of U in shared memory and read the 128 KB of h from L2. Below
a few hundred units the unsplit plan already keeps the GPU busy without a grid barrier.
This is a model, not a measurement; ``FASTCELLS_CUDA_SPLIT_MIN_UNITS`` moves the threshold.
"""
import functools
import warnings
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from .. import config

#: True under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

# numba-cuda warns at every launch of fewer than 128 blocks. A persistent recurrence kernel
# runs one block per batch slice by design (fewer blocks than that for most batches), so
# this one message is silenced once fastcells.cuda is in use.
warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU "
                        r"under-utilization")

#: Cast of an index known to be >= 0: numba wraps negative signed indices around (three
#: 64-bit integer operations per access), unsigned ones it takes as they are. Used on the
#: indices of the inner loops (shared-memory reads of the dot products).
IDX = numba.uint64

#: Dynamic shared memory every kernel may use without opting in.
DEFAULT_SHARED_BYTES = 48 * 1024


def numba_type(dtype):
    """The numba scalar type of a NumPy dtype (for local and shared arrays)."""
    return numba.from_dtype(np.dtype(dtype))


def kernel_variant(factory):
    """Memoise a kernel factory: one compiled kernel family per compile-time key. Each
    kernel carries its key as ``fastcells_variant`` (module, factory, arguments, position in
    what the factory returns), so that a launch recorded under the simulator can be rebuilt
    and compiled for a real GPU (tests/ptx_compile.py)."""
    @functools.lru_cache(maxsize=None)
    @functools.wraps(factory)
    def make(*key):
        made = factory(*key)
        for i, kernel in enumerate(made if isinstance(made, tuple) else (made,)):
            if hasattr(kernel, "py_func"):
                kernel.fastcells_variant = (factory.__module__, factory.__name__, key, i)
        return made
    return make


def row_stride(n):
    """Row stride of a shared [rows, n] buffer whose rows are read by different threads of
    a warp at the same column: odd, so that they fall in different banks."""
    return n | 1


def sm_count():
    """Multiprocessors of the current device (``CUDA_DEFAULT_SM_COUNT`` where unknown)."""
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no attributes
        return config.CUDA_DEFAULT_SM_COUNT


def shared_limit():
    """Dynamic shared memory a block may use: the configured limit, clipped to what the
    device allows with opt-in."""
    limit = config.CUDA_SHARED_MEMORY_BYTES
    if SIMULATOR:
        return limit
    try:
        return min(limit, int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN))
    except Exception:  # attribute unknown: stay within what needs no opt-in
        return min(limit, DEFAULT_SHARED_BYTES)


class Plan(NamedTuple):
    rows: int           # batch rows per block
    R: int              # rows per thread (compile-time)
    threads: int        # threads per block
    blocks: int         # blocks: row blocks x unit blocks
    u_shared: bool      # U (or U^T) kept in shared memory (the block's columns of it)
    shared_bytes: int   # dynamic shared memory per block
    padded_rows: int    # ceil(rows / R) * R: rows of the shared state buffers
    split: bool         # units split over blocks, a grid barrier per step (compile-time)
    unit_blocks: int    # blocks that share a batch slice (1 unless split)
    block_units: int    # units per block (H unless split; the last block may have fewer)
    exchange_rows: int  # rows of the global exchange buffers (0 unless split)


def _rows_per_thread(rows):
    R = 1
    while R * 2 <= min(config.CUDA_ROWS_PER_THREAD, rows, 4):
        R *= 2
    return R


def padded(rows, R):
    return -(-rows // R) * R


def _threads(items):
    return max(1, min(config.CUDA_THREADS_PER_BLOCK, -(-items // 32) * 32))


def plan(B, H, dtype, u_per_unit, state_elems):
    """The launch shape of a recurrence over B rows and H units (see the module docstring).

    ``u_per_unit``: elements of the recurrent weights that one unit's outputs need (its
    column of every gate: G * H); ``state_elems(NR, Hb, split)``: elements of the shared
    state buffers of a block with NR rows and Hb units."""
    if H < config.CUDA_SPLIT_MIN_UNITS or not cooperative_launch():
        try:
            return _row_plan(B, H, dtype, u_per_unit, state_elems)
        except ValueError as e:
            if not cooperative_launch():
                raise ValueError(f"{e}; splitting the units over blocks would need a "
                                 f"cooperative launch, which this GPU does not offer") from None
            # the state of one row does not fit: split the units
    return _split_plan(B, H, dtype, u_per_unit, state_elems)


def cooperative_launch():
    """The device runs cooperative launches (a grid barrier); the simulator emulates them
    (``fastcells.cuda._simulator``)."""
    if SIMULATOR:
        return True
    try:
        return bool(cuda.get_current_device().COOPERATIVE_LAUNCH)
    except Exception:       # an older driver without the attribute: do not rely on it
        return False


def _row_plan(B, H, dtype, u_per_unit, state_elems):
    """Blocks own batch slices and every unit (no barrier between blocks)."""
    itemsize = np.dtype(dtype).itemsize
    limit = shared_limit()
    u_elems = u_per_unit * H
    state_of = lambda rows, R: state_elems(padded(rows, R), H, False)   # noqa: E731
    target = max(1, sm_count() * config.CUDA_BLOCKS_PER_SM)
    rows = max(1, min(-(-B // target), config.CUDA_MAX_ROWS_PER_BLOCK, B))
    R = _rows_per_thread(rows)
    u_shared = (u_elems + state_of(rows, R)) * itemsize <= limit
    if not u_shared:
        rows = max(1, min(max(rows, config.CUDA_ROWS_PER_THREAD),
                          config.CUDA_MAX_ROWS_PER_BLOCK, B))
        R = _rows_per_thread(rows)
    while state_of(rows, R) * itemsize > limit and rows > 1:
        rows = (rows + 1) // 2
        R = _rows_per_thread(rows)
    state = state_of(rows, R) * itemsize
    if state > limit:
        raise ValueError(f"fastcells.cuda: {H} units need {state} bytes of shared memory per "
                         f"block for the recurrent state, more than the {limit} allowed "
                         f"(config.CUDA_SHARED_MEMORY_BYTES, clipped to the device's limit)")
    NR = padded(rows, R)
    nbytes = state + (u_elems * itemsize if u_shared else 0)
    return Plan(rows, R, _threads(H * (NR // R)), -(-B // rows), u_shared, nbytes, NR, False,
                1, H, 0)


def _split_plan(B, H, dtype, u_per_unit, state_elems):
    """Blocks own (batch slice, unit slice) pairs and meet at a grid barrier every step."""
    itemsize = np.dtype(dtype).itemsize
    limit = shared_limit()
    target = max(1, sm_count() * config.CUDA_BLOCKS_PER_SM)
    ub_min = -(-H // config.CUDA_SPLIT_MAX_UNITS_PER_BLOCK)
    rb = max(1, min(-(-B // config.CUDA_MAX_ROWS_PER_BLOCK), target // ub_min))
    rows = -(-B // rb)
    rb = -(-B // rows)
    ub = min(H, max(ub_min, target // rb))
    Hb = -(-H // ub)
    ub = -(-H // Hb)
    R = _rows_per_thread(rows)
    NR = padded(rows, R)
    state = state_elems(NR, Hb, True) * itemsize
    if state > limit:
        raise ValueError(f"fastcells.cuda: a block of {rows} batch rows and {Hb} of the {H} "
                         f"units needs {state} bytes of shared memory, more than the {limit} "
                         f"allowed (config.CUDA_SHARED_MEMORY_BYTES, clipped to the device's "
                         f"limit; config.CUDA_SPLIT_MAX_UNITS_PER_BLOCK)")
    u_shared = state + u_per_unit * Hb * itemsize <= limit
    nbytes = state + (u_per_unit * Hb * itemsize if u_shared else 0)
    return Plan(rows, R, _threads(Hb * (NR // R)), rb * ub, u_shared, nbytes, NR, True, ub,
                Hb, (rb - 1) * rows + NR)


def kernel_constants(dtype, split):
    """``DT, NPT, zero, barrier`` of a recurrence kernel factory: the numba and NumPy scalar
    types of ``dtype``, its zero and the step barrier (``step_barrier``)."""
    NPT = np.dtype(dtype).type
    return numba_type(dtype), NPT, NPT(0), step_barrier(split)


def step_barrier(split):
    """The barrier between the phases of a step: ``syncthreads`` when a block owns all the
    units of its rows, the grid-wide barrier (cooperative launch) when they are split over
    blocks. A device function picked at compile time, so that only split kernels are
    cooperative."""
    return _grid_sync if split else _block_sync


def _compiled(dispatcher, args):
    """The compiled kernel a launch with ``args`` runs (compiling it if needed)."""
    return dispatcher.compile(tuple(dispatcher.typeof_pyval(a) for a in args))


def _allow_shared(kernel, nbytes):
    """Opt a compiled kernel in to more than 48 KiB of dynamic shared memory."""
    from numba.cuda.cudadrv import driver as drv
    cufunc = kernel._codelibrary.get_cufunc()
    attr = drv.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    drv.driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)


def launch(kernel, p, *args):
    """Launch a recurrence kernel with the shape of plan ``p``. More than 256 threads are
    clipped to what the compiled kernel allows (its register use bounds them; the kernels
    are correct for any thread count); more than 48 KiB of shared memory is opted in to. A
    split plan's kernel is cooperative: its grid must fit on the GPU at once."""
    threads = p.threads
    if SIMULATOR:
        if p.split:
            from ._simulator import launch_cooperative
            return launch_cooperative(kernel, p.blocks, threads, p.shared_bytes, args)
    elif threads > 256 or p.shared_bytes > DEFAULT_SHARED_BYTES or p.split:
        compiled = _compiled(kernel, args)
        if threads > 256:
            threads = max(32, min(threads, compiled.max_threads_per_block) // 32 * 32)
        if p.shared_bytes > DEFAULT_SHARED_BYTES:
            _allow_shared(compiled, p.shared_bytes)
        if p.split:
            most = compiled.max_cooperative_grid_blocks(threads, p.shared_bytes)
            if p.blocks > most:
                raise ValueError(f"fastcells.cuda: the units of this recurrence are split over "
                                 f"{p.blocks} blocks of {threads} threads and "
                                 f"{p.shared_bytes} bytes of shared memory, but this GPU runs "
                                 f"at most {most} such blocks at once (a grid barrier needs "
                                 f"them all); raise config.CUDA_SPLIT_MAX_UNITS_PER_BLOCK or "
                                 f"lower config.CUDA_MAX_ROWS_PER_BLOCK")
    kernel[p.blocks, threads, 0, p.shared_bytes](*args)


def run_recurrence(factory, key, B, H, dtype, u_per_unit, state_elems, exchange_elems, inputs,
                   results):
    """Plan and launch a recurrence over B (> 0) rows and H units: the kernel
    ``factory(dtype, R, u_shared, *key, split)`` of the plan (``plan(B, H, dtype,
    u_per_unit, state_elems)``), launched with the arguments ``inputs``, then those of the
    plan (rows, NR, UB, Hb, the exchange buffer of ``exchange_elems`` elements per row and
    its rows XR), then ``results``."""
    p = plan(B, H, dtype, u_per_unit, state_elems)
    kernel = factory(np.dtype(dtype).str, p.R, p.u_shared, *key, p.split)
    xg = exchange_buffer(p, exchange_elems, dtype)
    launch(kernel, p, *inputs, p.rows, p.padded_rows, p.unit_blocks, p.block_units, xg,
           p.exchange_rows, *results)


def exchange_buffer(p, elems_per_row, dtype):
    """The global buffer through which the blocks of a split plan pass a step's row vectors
    (zeros: rows past the batch are read, never written); an empty stand-in otherwise."""
    from . import _linalg
    if not p.split:
        return empty_stand_in(1, dtype)
    return _linalg.zeros((p.exchange_rows * elems_per_row,), dtype)


# --------------------------------------------------------------------------- arguments
_EMPTY = {}


def empty_stand_in(ndim, dtype):
    """A zero-size device array: kernels take arrays, not None."""
    key = (ndim, np.dtype(dtype).str)
    a = _EMPTY.get(key)
    if a is None:
        a = _EMPTY[key] = cuda.device_array((0,) * ndim, dtype)
    return a


def optional(array, ndim, dtype):
    """``(array or an empty stand-in, present?)``; a host array is copied to the device."""
    if array is None:
        return empty_stand_in(ndim, dtype), False
    from . import _linalg
    return _linalg.to_device(array), True


def initial_output(out0, B, H, dtype):
    """The output before the first step, [B, H]: ``out0``, or for zeros a zero-size stand-in
    that the forward kernels read as zeros (a fill would be one more launch per call)."""
    from . import _linalg
    return empty_stand_in(2, dtype) if out0 is None else _linalg.to_device(out0)


def pending_carry(carry, B, H, dtype):
    """The in/out pending output gradient of a backward, [B, H]: ``carry`` or zeros."""
    from . import _linalg
    return _linalg.zeros((B, H), dtype) if carry is None else carry


def cache_arrays(keep, T, B, widths, dtype):
    """Forward cache arrays [T, B, w] for each width in ``widths`` (empty ones when ``keep``
    is False: the kernels take arrays, not None)."""
    from . import _linalg
    return tuple(_linalg.empty((T, B, w) if keep else (0, 0, 0), dtype) for w in widths)


def outputs(T, B, H, dtype, return_sequences, n_states):
    """A forward's outputs ``y`` [T or 1, B, H] (processing order) and ``n_states`` final
    states [B, H]."""
    from . import _linalg
    y = _linalg.empty((T if return_sequences else 1, B, H), dtype)
    return (y,) + tuple(_linalg.empty((B, H), dtype) for _ in range(n_states))


def masks(rmask, rmask_ndim, mask, dtype):
    """``rm, use_rmask, m, use_mask``: the recurrent dropout mask and the step mask of a
    recurrence, as ``optional`` gives them."""
    rm, use_rmask = optional(rmask, rmask_ndim, dtype)
    m, use_mask = optional(mask, 2, np.bool_)
    return rm, use_rmask, m, use_mask


# --------------------------------------------------------------------------- device helpers
def inline_device(f):
    """A device function inlined into its callers (NVVM ``alwaysinline``; the simulator has
    no such option and calls it as Python): the helpers below run inside the step loops."""
    if SIMULATOR:
        return cuda.jit(device=True)(f)
    return cuda.jit(device=True, forceinline=True)(f)


@inline_device
def _block_sync():
    cuda.syncthreads()


@inline_device
def _grid_sync():
    cuda.cg.this_grid().sync()


@inline_device
def stage_units(sm, M, groups, width, j0, Hb, nu, tid, nt):
    """The block's columns of M at sm[0:] (block-cooperative): for each of the ``groups``
    column groups of M (``width`` apart), the ``nu`` columns from j0, as
    sm[l * groups * Hb + k * Hb + jl] = M[l, k * width + j0 + jl]."""
    per_row = groups * nu
    for e in range(tid, M.shape[0] * per_row, nt):
        l = e // per_row
        k = (e % per_row) // nu
        jl = e % nu
        sm[l * groups * Hb + k * Hb + jl] = M[l, k * width + j0 + jl]


@inline_device
def zero_range(sm, lo, hi, zero, tid, nt):
    """sm[lo:hi] = 0 (block-cooperative)."""
    for e in range(lo + tid, hi, nt):
        sm[e] = zero


@inline_device
def begin_block(sm, M, u_shared, groups, width, xg, split, lo, n_shared, row_elems, zero, rows,
                NR, R, B, UB, Hb, H):
    """The prologue of a recurrence kernel (block-cooperative, no barrier):

    - the block's columns of M (U or U^T, see ``stage_units``) staged at sm[0:] when
      ``u_shared``;
    - where the row vectors passed between units live: without a split, ``n_shared``
      elements of shared memory from ``lo``, zeroed here; with one, the global exchange
      buffer ``xg`` (rows of ``row_elems`` elements, the block's from its row b0);
    - this thread's view of the launch (see the module docstring); block k owns row block
      k // UB and unit block k % UB.

    Returns ``tid, nt, b0, n, j0, nu, items, xs, base``: thread, threads, first batch row of
    the block and its rows, first unit and its units, its (unit, R-row group) items, and
    the exchange array with the offset of the block's first row vector in it."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b0 = (cuda.blockIdx.x // UB) * rows
    j0 = (cuda.blockIdx.x % UB) * Hb
    nu = min(Hb, H - j0)
    if u_shared:
        stage_units(sm, M, groups, width, j0, Hb, nu, tid, nt)
    items = nu * (NR // R)
    if split:
        return tid, nt, b0, min(rows, B - b0), j0, nu, items, xg, b0 * row_elems
    zero_range(sm, lo, lo + n_shared, zero, tid, nt)
    return tid, nt, b0, min(rows, B - b0), j0, nu, items, sm, lo


@inline_device
def block_element(e, nu, b0, j0, Hb):
    """Element e of the block's rows and units, row-major over its nu units: ``i, b, j, p``,
    its row in the block and in the batch, its unit, and its index in the block's [NR, Hb]
    state buffers."""
    i = e // nu
    jl = e % nu
    return i, b0 + i, j0 + jl, i * Hb + jl


@inline_device
def load_rows(sm, off, src, b0, n, j0, nu, Hb, tid, nt):
    """sm[off + i * Hb + jl] = src[b0 + i, j0 + jl] for the block's n rows and nu units
    (block-cooperative)."""
    for e in range(tid, n * nu, nt):
        _, b, j, p = block_element(e, nu, b0, j0, Hb)
        sm[off + p] = src[b, j]


@inline_device
def store_rows(dst, sm, off, b0, n, j0, nu, Hb, tid, nt):
    """dst[b0 + i, j0 + jl] = sm[off + i * Hb + jl] for the block's n rows and nu units
    (block-cooperative)."""
    for e in range(tid, n * nu, nt):
        _, b, j, p = block_element(e, nu, b0, j0, Hb)
        dst[b, j] = sm[off + p]


@inline_device
def put_recurrent_input(xs, base, plane, HS, i, j, h, rmask, use_rmask, b, NG):
    """The recurrent input of (row i, unit j) into the [NG, rows, HS] buffer at ``base`` of
    ``xs`` (shared memory, or the global exchange buffer of a split plan): h * r_k in plane
    k of each of the NG gates with recurrent dropout ([NG, B, H] mask), h in plane 0
    without."""
    if use_rmask:
        for k in range(NG):
            xs[base + k * plane + i * HS + j] = h * rmask[k, b, j]
    else:
        xs[base + i * HS + j] = h


@inline_device
def load_initial_state(sm, own, outs, xs, hb, plane, HS, h0, out0, rmask, use_rmask, NG, b0,
                       n, j0, nu, Hb, tid, nt, zero):
    """The forward's starting state of the block's rows and units: h0 at ``own``, out0 at
    ``outs`` (both [NR, Hb]; a zero-size out0 stands for zeros, see ``initial_output``) and
    the first recurrent input (``put_recurrent_input``) in the buffer at ``hb`` of ``xs``."""
    for e in range(tid, n * nu, nt):
        i, b, j, p = block_element(e, nu, b0, j0, Hb)
        h = h0[b, j]
        sm[own + p] = h
        sm[outs + p] = out0[b, j] if out0.shape[0] else zero
        put_recurrent_input(xs, hb, plane, HS, i, j, h, rmask, use_rmask, b, NG)


@inline_device
def output_grad(sm, car, e, dy, full, s, T, b, j):
    """The output gradient reaching (row b, unit j) at processing step s of a backward: the
    pending carry sm[car + e] plus dy of the step (of the last step only when ``dy`` holds
    the last output's gradient alone)."""
    cr = sm[car + e]
    if full:
        cr += dy[s, b, j]
    elif s == T - 1:
        cr += dy[0, b, j]
    return cr


@inline_device
def recurrence_dims(x, s0, y, split, XR, NR):
    """``T, B, H, HS, XN, full`` of a recurrence kernel: the steps of the time-aligned ``x``
    [T, B, ...], batch and units of the state-shaped ``s0`` [B, H], the row stride of an
    [rows, H] row-vector buffer (``row_stride`` in shared memory, H in the exchange buffer),
    the rows XN of those buffers (exchange rows XR with a split, NR without), and whether
    ``y`` (y, or dy in a backward) holds every step or the last one alone."""
    T = x.shape[0]
    H = s0.shape[1]
    if split:
        return T, s0.shape[0], H, H, XR, y.shape[0] == T
    return T, s0.shape[0], H, H | 1, NR, y.shape[0] == T


@inline_device
def state_offsets(u_elems, u_shared, NR, Hb):
    """The offsets in shared memory of a block's first five [NR, Hb] state buffers, which
    follow its ``u_elems`` elements of U (or U^T) when ``u_shared``."""
    base = u_elems if u_shared else 0
    S = NR * Hb
    return base, base + S, base + 2 * S, base + 3 * S, base + 4 * S


@inline_device
def load_backward_state(sm, dhs, dh_in, car, carry_io, b0, n, j0, nu, Hb, tid, nt):
    """The starting state of a backward: the gradient dh_in reaching the final state at
    ``dhs`` and the pending output gradient carry_io at ``car`` (block-cooperative)."""
    load_rows(sm, dhs, dh_in, b0, n, j0, nu, Hb, tid, nt)
    load_rows(sm, car, carry_io, b0, n, j0, nu, Hb, tid, nt)


@inline_device
def item(it, nu, j0, R):
    """Item ``it`` of a block (see the module docstring): ``jl, j, r0``, its unit in the
    block and in the layer, and the first of its R rows."""
    jl = it % nu
    return jl, j0 + jl, (it // nu) * R


@inline_device
def item_row(r0, r, b0, Hb, jl):
    """Row r of an item from row r0 (see ``item``): ``i, b, e``, the row in the block and in
    the batch, and the index of (row, unit) in the block's [NR, Hb] state buffers."""
    i = r0 + r
    return i, b0 + i, i * Hb + jl


@inline_device
def step_buffers(s, T, go_backwards, base, buf):
    """Processing step s: ``t, cur, nxt``, the input time it reads, and the buffers (``buf``
    elements from ``base``, double-buffered by step parity) it reads and writes."""
    t = T - 1 - s if go_backwards else s
    return t, base + (s % 2) * buf, base + ((s + 1) % 2) * buf


@inline_device
def gate_sums(acc, G, k0, K, xs, base, HS, plane, per_gate, sm, u_shared, U, Hb, H, jl, j, R,
              r0, u, zero):
    """The recurrent terms of a forward step for the R rows of an item and K gates from gate
    k0: acc[r * G + k] = sum over l, in order, of x_k[r0 + r, l] * U[l, (k0 + k) * H + j].

    x_k is the [rows, HS] buffer at ``base`` of ``xs``: plane k of it (``plane`` elements
    apart, h * r_k) when ``per_gate``, the one plane h for every gate otherwise. U is read
    from the block's columns in shared memory (``stage_units``, G groups) when ``u_shared``,
    from global memory otherwise; ``u`` is a local array of K that holds the weights of one
    l, each loaded once for the R rows."""
    for r in range(R):
        for k in range(K):
            acc[r * G + k] = zero
    GHb = G * Hb
    for l in range(H):
        for k in range(K):
            if u_shared:
                u[k] = sm[IDX(l * GHb + (k0 + k) * Hb + jl)]
            else:
                u[k] = U[IDX(l), IDX((k0 + k) * H + j)]
        if per_gate:
            for r in range(R):
                p = base + (r0 + r) * HS + l
                for k in range(K):
                    acc[r * G + k] += xs[IDX(p + k * plane)] * u[k]
        else:
            for r in range(R):
                hv = xs[IDX(base + (r0 + r) * HS + l)]
                for k in range(K):
                    acc[r * G + k] += hv * u[k]


@inline_device
def transposed_sums(acc, G, A, w, c0, xs, base, ZS, sm, u_shared, UT, Hb, jl, j, R, r0, zero):
    """The recurrent terms of a backward step for the R rows of an item, A sums of width w:
    acc[r * G + a] = sum over l < w, in order, of
    dz[r0 + r, a * w + l] * UT[c0 + a * w + l, j], dz the [rows, ZS] buffer at ``base`` of
    ``xs``. U^T is read from the block's columns in shared memory (``stage_units``, one
    group) when ``u_shared``, from global memory otherwise."""
    for r in range(R):
        for a in range(A):
            acc[r * G + a] = zero
    for a in range(A):
        for l in range(w):
            col = c0 + a * w + l
            u = sm[IDX(col * Hb + jl)] if u_shared else UT[IDX(col), IDX(j)]
            for r in range(R):
                acc[r * G + a] += xs[IDX(base + (r0 + r) * ZS + a * w + l)] * u


@inline_device
def put_step_output(sm, own, outs, e, live, h, zero_output, zero, xs, nxt, plane, HS, i, j,
                    rmask, use_rmask, b, NG, full, y, s):
    """The end of a forward step for (row i, unit j), e = its index in the block's state: a
    live step stores the new state h as state and output; a masked one keeps both (h is the
    state it keeps) or zeroes the output with ``zero_output``. Then the next recurrent input
    (``put_recurrent_input``, into the buffer at ``nxt``) and, for a full sequence, the
    output of processing step s into y."""
    if live:
        sm[own + e] = h
        sm[outs + e] = h
    elif zero_output:
        sm[outs + e] = zero
    put_recurrent_input(xs, nxt, plane, HS, i, j, h, rmask, use_rmask, b, NG)
    if full:
        y[s, b, j] = sm[outs + e]


@inline_device
def masked_step_grad(dz, t, b, j, H, NG, xs, x0, NX, sm, car, e, cr, zero_output, zero):
    """A masked step of a backward at (row b, unit j): no gradient reaches its NG gate
    pre-activations (dz[t, b, k * H + j]) nor the NX row vectors at x0 of ``xs``
    (xs[x0 + k * H + j]); the pending output gradient ``cr`` passes to the previous output,
    or stops with ``zero_output``."""
    for k in range(NG):
        dz[t, b, k * H + j] = zero
    for k in range(NX):
        xs[x0 + k * H + j] = zero
    sm[car + e] = zero if zero_output else cr
