"""Random problems shared by the kernel tests: one place that knows each cell's shapes."""
import numpy as np

GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
NSTATES = {"lstm": 2, "gru": 1, "simple_rnn": 1}

#: Launch tunables of the CUDA tests small enough that tiny problems take several blocks and
#: round-robin items (the simulator runs every thread as a Python thread and spins at each
#: barrier: GEMM tiles of 8 keep the K loop short; the GEMM test itself uses tiles of 4 by 2).
CUDA_SMALL_TUNABLES = dict(CUDA_THREADS_PER_BLOCK=4, CUDA_MAX_ROWS_PER_BLOCK=2,
                           CUDA_ROWS_PER_THREAD=2, CUDA_BLOCKS_PER_SM=1, CUDA_GEMM_BLOCK_M=8,
                           CUDA_GEMM_BLOCK_N=8, CUDA_GEMM_BLOCK_K=8, CUDA_GEMM_THREAD_M=4,
                           CUDA_GEMM_THREAD_N=4, CUDA_ELEMENTWISE_THREADS=16,
                           CUDA_REDUCE_ROWS=3)


def make_problem(rng, cell, B, T, D, H, *, bias=True, reset_after=True, mask=None,
                 dropout=False, recurrent_dropout=False, per_gate=True, dtype=np.float64,
                 scale=0.5):
    """Inputs, weights, states and options for one call, in the given dtype."""
    G = GATES[cell]
    p = dict(x=rng.standard_normal((B, T, D)),
             kernel=rng.standard_normal((D, G * H)) * scale,
             recurrent_kernel=rng.standard_normal((H, G * H)) * scale)
    bshape = (2, 3 * H) if (cell == "gru" and reset_after) else (G * H,)
    p["bias"] = rng.standard_normal(bshape) * scale if bias else None
    p["states"] = [rng.standard_normal((B, H)) * scale for _ in range(NSTATES[cell])]
    opts = {}
    if cell == "gru":
        opts["reset_after"] = reset_after
    if mask is not None:
        opts["mask"] = mask
    gg = G if (per_gate and cell != "simple_rnn") else None
    if dropout:
        shape = (gg, B, D) if gg else (B, D)
        opts["dropout_mask"] = (rng.random(shape) > 0.3) / 0.7
    if recurrent_dropout:
        shape = (gg, B, H) if gg else (B, H)
        opts["recurrent_dropout_mask"] = (rng.random(shape) > 0.3) / 0.7
    for k in ("x", "kernel", "recurrent_kernel", "bias"):
        if p[k] is not None:
            p[k] = p[k].astype(dtype)
    p["states"] = [s.astype(dtype) for s in p["states"]]
    for k in ("dropout_mask", "recurrent_dropout_mask"):
        if k in opts:
            opts[k] = opts[k].astype(dtype)
    return p, opts


def random_mask(rng, B, T, p_keep=0.6):
    """Any pattern, not only right padding: holes, fully masked rows, masked first steps."""
    m = rng.random((B, T)) < p_keep
    if B > 2:
        m[1] = False            # a fully masked sequence
    if B > 1 and T > 1:
        m[0, 0] = False         # the first step masked
    return m
