"""Every tunable of fastcells, in one place.

Values are read when a kernel is launched (threads, chunking) or compiled (JIT flags), so
set them before the first call, e.g. ``fastcells.config.NUM_THREADS = 1``; the environment
variables below set the defaults.
"""
import os


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, "
                         f"got {value!r}") from None


# --- CPU kernels -------------------------------------------------------------------------
#: Threads that share one recurrence. Each thread owns a contiguous slice of the batch for the
#: whole sequence, so no barrier is needed between time steps. ``FASTCELLS_NUM_THREADS``.
NUM_THREADS = _env_int("FASTCELLS_NUM_THREADS", os.cpu_count() or 1)

#: Fewest batch rows a thread is given; smaller batches use fewer threads (a thread per
#: handful of rows costs more in hand-off than it saves).
MIN_ROWS_PER_THREAD = _env_int("FASTCELLS_MIN_ROWS_PER_THREAD", 8)

#: Batch rows of one block. Threads take whole blocks (a call uses at most
#: ceil(batch / BLOCK_ROWS) threads) and every in-kernel GEMM runs per block, so a row's
#: result never depends on the thread count; the fused LSTM backward keeps each block's
#: weight-gradient sums apart and adds them in block order at the end.
BLOCK_ROWS = _env_int("FASTCELLS_BLOCK_ROWS", 16)

#: Time steps whose gate gradients a fused backward gathers before adding their part of the
#: weight gradients (one GEMM of K = BLOCK_ROWS * WINDOW_STEPS while the data is in cache).
WINDOW_STEPS = _env_int("FASTCELLS_WINDOW_STEPS", 32)

#: Bytes of batch-major input a thread copies at once into a time-major buffer of its own.
#: The rows ``x[b, t]`` of one step lie T*D floats apart, a memory page each, so reading
#: them step by step misses the TLB once per row; staged, each batch row's stretch of steps
#: is read in one go.
STAGE_BYTES = _env_int("FASTCELLS_STAGE_BYTES", 256 << 10)

#: Largest [W; U; b], in bytes, for which the fused kernels move the input projection into
#: the step: each thread multiplies its rows by these weights at every step, so they must
#: stay near the core (docs/performance.md has the measurements around the limit).
FUSED_MAX_WEIGHT_BYTES = _env_int("FASTCELLS_FUSED_MAX_WEIGHT_BYTES", 8 << 20)

#: Use the fused kernels where they apply (the input projection inside each step, the input
#: and weight gradients inside the backward). ``FASTCELLS_FUSED=0`` turns them off.
FUSED = os.environ.get("FASTCELLS_FUSED", "1") != "0"

#: Smallest GEMM (M*N*K multiply-adds) split over the threads; smaller ones run on one.
MIN_PARALLEL_GEMM_FLOPS = _env_int("FASTCELLS_MIN_PARALLEL_GEMM_FLOPS", 1 << 20)

#: Keep SciPy's OpenBLAS (what Numba's ``np.dot`` calls from compiled code) at one thread
#: from the first fastcells call on, instead of restoring its thread count after every call:
#: a restored OpenBLAS leaves a worker spinning against the next call's kernels (see
#: ``cpu/_parallel.py``). SciPy's own linear algebra then runs on one thread too.
#: ``FASTCELLS_HOLD_KERNEL_BLAS=0`` restores it after each call.
HOLD_KERNEL_BLAS = os.environ.get("FASTCELLS_HOLD_KERNEL_BLAS", "1") != "0"

#: Vector register width the packed in-step GEMM is written for (``cpu/_gemm.py``), in
#: bytes: 64, 32 or 16. Chosen from the host CPU (AVX-512, AVX/AVX2, otherwise); setting
#: ``FASTCELLS_GEMM_VECTOR_BYTES`` overrides it, for tests and tuning, and then turns the
#: on-disk kernel cache off, since Numba's cache would not know the kernels changed.
GEMM_VECTOR_BYTES = (_env_int("FASTCELLS_GEMM_VECTOR_BYTES", 0)
                     if os.environ.get("FASTCELLS_GEMM_VECTOR_BYTES") else None)

#: Options passed to every ``numba.njit`` kernel. ``error_model='numpy'`` drops the
#: ZeroDivisionError check on each float division, which is what lets the gate loops
#: vectorise; ``cache=True`` keeps compiled kernels on disk between processes.
#: ``fastmath={'contract'}`` lets LLVM fuse a multiply and the add that follows it into one
#: FMA (one rounding instead of two) and nothing else: no reassociation, no assumptions
#: about NaN, infinities or signed zeros, so every sum keeps its order and NaN still
#: propagates.
NJIT_OPTIONS = dict(nogil=True, cache=GEMM_VECTOR_BYTES is None, error_model="numpy",
                    fastmath={"contract"})

#: Say once per process, on the "fastcells" logger, when the kernels are being compiled
#: (the first use on a machine, before they are in the on-disk cache).
#: ``FASTCELLS_COMPILE_NOTICE=0`` turns it off.
COMPILE_NOTICE = os.environ.get("FASTCELLS_COMPILE_NOTICE", "1") != "0"

#: When a CPU training call compiles its forward kernel, compile its backward kernels at the
#: same time in a second process (see fastcells/_coldstart.py).
#: ``FASTCELLS_BACKGROUND_COMPILE=0`` turns it off.
BACKGROUND_COMPILE = os.environ.get("FASTCELLS_BACKGROUND_COMPILE", "1") != "0"

#: Use the rational tanh/sigmoid approximation (max abs error 3.6e-7, i.e. float32
#: rounding) for float32 arrays.
FAST_FLOAT32_ACTIVATIONS = os.environ.get("FASTCELLS_EXACT_ACTIVATIONS", "0") != "1"
#: Use tanh/sigmoid in plain arithmetic (``_math.tanh64``, within 3 ulp) for float64 arrays
#: in the CPU kernels, instead of a libm call per element (9 times as slow, and it keeps
#: the gate loops scalar). The CUDA kernels call the device's own tanh and exp.
FAST_FLOAT64_ACTIVATIONS = FAST_FLOAT32_ACTIVATIONS

#: Scratch memory kept for reuse between calls (see fastcells/_workspace.py), in bytes ...
WORKSPACE_BYTES = _env_int("FASTCELLS_WORKSPACE_BYTES", 1 << 30)
#: ... for arrays of at least this size (small ones are cheap to allocate).
WORKSPACE_MIN_BYTES = _env_int("FASTCELLS_WORKSPACE_MIN_BYTES", 1 << 20)

# --- CUDA kernels (fastcells/cuda; see the module docstrings for how they are used) ---------
#: Most threads in one block of a recurrence kernel. A block owns a slice of the batch and
#: every unit for the whole sequence; its threads take (row group, unit) items in turn, so
#: fewer threads than items is correct, only slower. A multiple of 32 on a GPU; above 256
#: it is clipped to what the compiled kernel's register use allows (up to ~150 registers).
CUDA_THREADS_PER_BLOCK = _env_int("FASTCELLS_CUDA_THREADS_PER_BLOCK", 256)

#: Most batch rows one thread of a recurrence carries through a step (register blocking:
#: each recurrent weight read from shared memory or L2 serves that many rows). 1, 2 or 4;
#: a kernel is compiled for each value used.
CUDA_ROWS_PER_THREAD = _env_int("FASTCELLS_CUDA_ROWS_PER_THREAD", 4)

#: Most batch rows one block of a recurrence owns. Rows per block are otherwise chosen to
#: spread the batch over ``CUDA_BLOCKS_PER_SM`` blocks per multiprocessor.
CUDA_MAX_ROWS_PER_BLOCK = _env_int("FASTCELLS_CUDA_MAX_ROWS_PER_BLOCK", 32)

#: Blocks per multiprocessor a recurrence aims for (more blocks: fewer rows each).
CUDA_BLOCKS_PER_SM = _env_int("FASTCELLS_CUDA_BLOCKS_PER_SM", 1)

#: Multiprocessors assumed when the device does not report them (the CUDA simulator).
CUDA_DEFAULT_SM_COUNT = _env_int("FASTCELLS_CUDA_DEFAULT_SM_COUNT", 1)

#: Dynamic shared memory one recurrence block may use, in bytes. The recurrent kernel U is
#: kept in shared memory when it fits next to the block's state, and read from global
#: memory (L2-resident) otherwise. 48 KiB is what every kernel may use without asking;
#: above that the kernel opts in (cudaFuncAttributeMaxDynamicSharedMemorySize; up to
#: 227 KiB on an H100, 99 KiB on consumer GPUs) and falls back to 48 KiB if that fails.
CUDA_SHARED_MEMORY_BYTES = _env_int("FASTCELLS_CUDA_SHARED_MEMORY_BYTES", 48 * 1024)

#: Hidden sizes from which a recurrence splits its units over blocks: blocks then own
#: (batch slice, unit slice) pairs, keep their columns of U in shared memory, pass each
#: step's h (or dz) through global memory and meet at a grid barrier (a cooperative launch)
#: every step. Below it a block owns all units of its rows; sizes whose state does not fit
#: in a block that way are split whatever this says. The default is set from a model of
#: L2 traffic, not a measurement (see fastcells/cuda/_common.py).
CUDA_SPLIT_MIN_UNITS = _env_int("FASTCELLS_CUDA_SPLIT_MIN_UNITS", 512)

#: Most units one block of a split recurrence owns. Units are otherwise spread over the
#: multiprocessors first (CUDA_BLOCKS_PER_SM blocks on each, all resident at once).
CUDA_SPLIT_MAX_UNITS_PER_BLOCK = _env_int("FASTCELLS_CUDA_SPLIT_MAX_UNITS_PER_BLOCK", 64)

#: Tiles of the GEMM kernel: a block computes BLOCK_M x BLOCK_N outputs, stepping through
#: the summed dimension BLOCK_K at a time through shared memory; each thread computes
#: THREAD_M x THREAD_N outputs in registers, so a block has
#: (BLOCK_M / THREAD_M) * (BLOCK_N / THREAD_N) threads (256 by default).
CUDA_GEMM_BLOCK_M = _env_int("FASTCELLS_CUDA_GEMM_BLOCK_M", 64)
CUDA_GEMM_BLOCK_N = _env_int("FASTCELLS_CUDA_GEMM_BLOCK_N", 64)
CUDA_GEMM_BLOCK_K = _env_int("FASTCELLS_CUDA_GEMM_BLOCK_K", 16)
CUDA_GEMM_THREAD_M = _env_int("FASTCELLS_CUDA_GEMM_THREAD_M", 4)
CUDA_GEMM_THREAD_N = _env_int("FASTCELLS_CUDA_GEMM_THREAD_N", 4)

#: Threads per block of the element-wise kernels (copies, layouts, masks, fills).
CUDA_ELEMENTWISE_THREADS = _env_int("FASTCELLS_CUDA_ELEMENTWISE_THREADS", 256)

#: Rows one thread sums in the first pass of a column sum (the second pass sums the
#: partial sums; both in a fixed order, so the result is deterministic).
CUDA_REDUCE_ROWS = _env_int("FASTCELLS_CUDA_REDUCE_ROWS", 256)

# --- framework bridges --------------------------------------------------------------------
#: Let ``engine="auto"`` run the CUDA kernels for inputs on a GPU. Off by default: until a
#: GPU run has checked their results and speed, "auto" keeps the built-in implementation
#: (cuDNN) there and says so once on the "fastcells" logger; ``engine="cuda"`` runs them
#: whatever this says. ``FASTCELLS_AUTO_CUDA=1`` turns it on.
AUTO_CUDA = os.environ.get("FASTCELLS_AUTO_CUDA", "0") == "1"

#: Forward caches kept for their backward pass (oldest evicted first; an evicted cache is
#: recomputed by its backward): at most this many ...
MAX_PENDING_CACHES = _env_int("FASTCELLS_MAX_PENDING_CACHES", 64)
#: ... and at most this many bytes together.
MAX_PENDING_CACHE_BYTES = _env_int("FASTCELLS_MAX_PENDING_CACHE_BYTES", 4 << 30)
#: On the JAX backend, run the kernels as an XLA FFI target that reads and writes XLA's
#: buffers in place (fastcells/bridge/_xla_ffi.py) rather than in a ``jax.pure_callback``,
#: which copies every operand and result. ``FASTCELLS_JAX_FFI=0`` uses the callback.
JAX_FFI = os.environ.get("FASTCELLS_JAX_FFI", "1") != "0"

# --- equivalence bounds against the built-in layers (used by tests and `fastcells bench`) ---
TOL_OUTPUT_F32 = 1e-5      # absolute, outputs and states vs the built-in layer
TOL_GRAD_F32 = 1e-4        # relative to the gradient's norm
TOL_F64 = 1e-10            # kernels vs the float64 reference
