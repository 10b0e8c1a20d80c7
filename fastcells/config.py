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
        raise ValueError(f"environment variable {name} must be a positive integer, got {value!r}") from None


# --- CPU kernels -------------------------------------------------------------------------
#: Threads that share one recurrence. Each thread owns a contiguous slice of the batch for the
#: whole sequence, so no barrier is needed between time steps. ``FASTCELLS_NUM_THREADS``.
NUM_THREADS = _env_int("FASTCELLS_NUM_THREADS", os.cpu_count() or 1)

#: Fewest batch rows a thread is given; smaller batches use fewer threads (a thread per
#: handful of rows costs more in hand-off than it saves).
MIN_ROWS_PER_THREAD = _env_int("FASTCELLS_MIN_ROWS_PER_THREAD", 8)

#: Smallest GEMM (M*N*K multiply-adds) split over the threads; smaller ones run on one.
MIN_PARALLEL_GEMM_FLOPS = _env_int("FASTCELLS_MIN_PARALLEL_GEMM_FLOPS", 1 << 20)

#: Options passed to every ``numba.njit`` kernel. ``error_model='numpy'`` drops the
#: ZeroDivisionError check on each float division, which is what lets the gate loops
#: vectorise; ``cache=True`` keeps compiled kernels on disk between processes.
NJIT_OPTIONS = dict(nogil=True, cache=True, error_model="numpy", fastmath=False)

#: Use the rational tanh/sigmoid approximation (max abs error 3.6e-7, i.e. float32
#: rounding) for float32 arrays. float64 always uses the exact functions.
FAST_FLOAT32_ACTIVATIONS = os.environ.get("FASTCELLS_EXACT_ACTIVATIONS", "0") != "1"

#: Scratch memory kept for reuse between calls (see fastcells/_workspace.py), in bytes ...
WORKSPACE_BYTES = _env_int("FASTCELLS_WORKSPACE_BYTES", 1 << 30)
#: ... for arrays of at least this size (small ones are cheap to allocate).
WORKSPACE_MIN_BYTES = _env_int("FASTCELLS_WORKSPACE_MIN_BYTES", 1 << 20)

# --- framework bridges --------------------------------------------------------------------
#: Forward caches kept for their backward pass (oldest evicted first; an evicted cache is
#: recomputed by its backward): at most this many ...
MAX_PENDING_CACHES = _env_int("FASTCELLS_MAX_PENDING_CACHES", 64)
#: ... and at most this many bytes together.
MAX_PENDING_CACHE_BYTES = _env_int("FASTCELLS_MAX_PENDING_CACHE_BYTES", 4 << 30)

# --- equivalence bounds (the contract in DESIGN.md; used by tests and `fastcells bench`) ---
TOL_OUTPUT_F32 = 1e-5      # absolute, outputs and states vs the built-in layer
TOL_GRAD_F32 = 1e-4        # relative to the gradient's norm
TOL_F64 = 1e-10            # kernels vs the float64 reference
