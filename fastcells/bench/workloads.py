"""The workloads of the benchmarks: shapes, cells and modes, the work one call does (matrix
products, activations) and the floor it gives, and the weights and inputs every engine gets.

The cell facts (gates per cell, state names) are those of :mod:`fastcells.ops`.
"""
import dataclasses
import math

import numpy as np

from .. import config
from ..ops import CELLS as _CELLS

# --------------------------------------------------------------------------- the grid
#: The cells, their layers' names and gates per cell, from ``fastcells.ops.CELLS``.
CELLS = tuple(_CELLS)
CELL_NAMES = {name: c.layer for name, c in _CELLS.items()}
GATES = {name: c.gates for name, c in _CELLS.items()}

MODES = ("forward", "train")
MODE_NAMES = {"forward": "inference (forward)",
              "train": "training (forward+backward)"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One workload: a (stack of) recurrent layer(s) over a batch of sequences.

    batch, time, features, units: B, T, D, H of the first layer (later layers take H inputs).
    layers: how many layers are stacked (all but the last return sequences).
    return_sequences: whether the last layer returns the whole sequence.
    modes: the modes timed for this workload.
    heavy: left out of the default runs (opt in with ``--heavy`` / ``--bench-heavy``).
    rounds: timed rounds in the pytest-benchmark suite.
    """
    name: str
    batch: int
    time: int
    features: int
    units: int
    layers: int = 1
    return_sequences: bool = True
    modes: tuple = MODES
    heavy: bool = False
    rounds: int = 5

    def describe(self):
        """A one-line description, e.g. ``B=128 T=500 D=32 H=32, 1 layer, last output``."""
        layers = f"{self.layers} stacked layers" if self.layers > 1 else "1 layer"
        out = "all outputs" if self.return_sequences else "last output"
        return (f"B={self.batch} T={self.time} D={self.features} H={self.units}, {layers}, "
                f"{out}")


SHAPES = {s.name: s for s in (
    # the IMDB example: Embedding(10000, 32) -> LSTM(32)
    Shape("imdb", 128, 500, 32, 32, return_sequences=False, rounds=5),
    # the stacked example: two return_sequences=True layers
    Shape("stacked", 32, 256, 256, 32, layers=2, return_sequences=True, rounds=5),
    Shape("medium", 64, 100, 256, 256, rounds=5),
    Shape("large", 32, 100, 512, 1024, heavy=True, rounds=3),
    # one sequence at a time, as a server answering requests
    Shape("streaming", 1, 100, 64, 128, modes=("forward",), rounds=50),
)}


def product_flops(cell, shape, mode):
    """Floating-point operations (2 per multiply-add) of the matrix products that one call
    of ``shape`` cannot do without: per layer and step the input and recurrent products,
    x_t @ W and h @ U; a training step adds their gradients with respect to the inputs and
    the states ([dx | dh] = dz @ [W; U]^T) and the weights ([dW; dU] = [x | h]^T dz), as
    many again twice. The bias and everything element by element are left out."""
    G, H = GATES[cell], shape.units
    total, d = 0, shape.features
    for _ in range(shape.layers):
        total += 2 * shape.batch * shape.time * (d + H) * G * H
        d = H
    return total * (3 if mode == "train" else 1)


#: tanh evaluations per unit and step: LSTM i, f, o (sigmoids), c~ and act(c); GRU z, r and
#: the candidate; SimpleRNN h. The backward takes the derivatives from the outputs.
ACTIVATIONS = {"lstm": 5, "gru": 3, "simple_rnn": 1}


def activation_count(cell, shape, mode):
    """tanh (and sigmoid) evaluations of one call of ``shape``, the same in both modes."""
    return ACTIVATIONS[cell] * shape.batch * shape.time * shape.units * shape.layers


def compute_floor(cell, shape, mode, peak):
    """Seconds one call's products and activations take at the rates of ``peak``
    (``Report.peak``, :func:`measure_peak`): a floor for the fastcells kernels, and for any
    engine whose products do not beat the core's peak (the packed product runs at one
    vector FMA per cycle). None without a peak."""
    if not peak or not peak.get("flops_per_s"):
        return None
    return (product_flops(cell, shape, mode) / peak["flops_per_s"]
            + activation_count(cell, shape, mode) / peak["tanh_per_s"])


def workload_floor(cell, shape, mode, peak):
    """The floor of one workload as the report, its JSON and the pytest-benchmark suite give
    it: ``dict(flops, tanh, floor_s)`` (:func:`product_flops`, :func:`activation_count`,
    :func:`compute_floor`), or None without a peak."""
    floor = compute_floor(cell, shape, mode, peak)
    if floor is None:
        return None
    return dict(flops=product_flops(cell, shape, mode),
                tanh=activation_count(cell, shape, mode), floor_s=floor)


def measure_peak(dtype="float32", threads=None, previous=None):
    """This machine's rates for the kernels' arithmetic, as ``Report.peak``: FLOP/s of the
    packed product and tanh evaluations per second, on every fastcells thread at once
    (``fastcells.cpu._rates``), with the dtype and thread count they were measured with.

    With ``previous`` (an earlier measurement of the same run), each rate is the better of
    the two: the runs measure at their start and end, so that a stretch in which another
    load held the cores does not set the floor."""
    from ..cpu._rates import activation_rate, product_rate
    threads = config.NUM_THREADS if threads is None else threads
    peak = dict(flops_per_s=product_rate(dtype, threads),
                tanh_per_s=activation_rate(dtype, threads),
                dtype=str(np.dtype(dtype)), threads=threads)
    if previous:
        for key in ("flops_per_s", "tanh_per_s"):
            peak[key] = max(peak[key], previous[key])
    return peak



# --------------------------------------------------------------------------- data
def make_weights(cell, shape, seed=0, dtype="float32"):
    """Weights of every layer of a workload, in the Keras layout, the same for all engines.

    Returns a list (one entry per layer) of ``[kernel, recurrent_kernel, bias]``: kernel
    [D, G*H] Glorot-uniform, recurrent_kernel [H, G*H] with orthonormal rows (as Keras's
    orthogonal initializer), bias [G*H] (GRU: [2, 3H]) small and non-zero, LSTM forget bias
    shifted by one (``unit_forget_bias``).
    """
    rng = np.random.default_rng(seed + 1)
    G, H = GATES[cell], shape.units
    weights = []
    d = shape.features
    for _ in range(shape.layers):
        lim = math.sqrt(6.0 / (d + G * H))
        W = rng.uniform(-lim, lim, (d, G * H))
        q, _ = np.linalg.qr(rng.standard_normal((G * H, H)))   # [G*H, H] orthonormal columns
        U = q.T
        if cell == "gru":
            b = rng.uniform(-0.1, 0.1, (2, 3 * H))
        else:
            b = rng.uniform(-0.1, 0.1, (G * H,))
            if cell == "lstm":
                b[H:2 * H] += 1.0
        weights.append([np.ascontiguousarray(a, dtype) for a in (W, U, b)])
        d = H
    return weights


def make_inputs(shape, seed=0, dtype="float32"):
    """Inputs [B, T, D] of a workload: standard normal."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((shape.batch, shape.time, shape.features)).astype(dtype)


def case_arrays(cell, shape, mode, seed=0, dtype="float32"):
    """``(weights, x)`` of a case, after checking ``cell`` and ``mode``: what every engine
    of a workload gets (:func:`make_weights`, :func:`make_inputs`)."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return make_weights(cell, shape, seed, dtype), make_inputs(shape, seed, dtype)


# --------------------------------------------------------------------------- cases
class Case:
    """One engine running one workload in one mode.

    Calling the case runs it once (this is what is timed). :meth:`first_call` runs it the
    first time (JIT compilation, graph tracing) and returns its results as NumPy arrays in the
    Keras layout: ``(outputs, grads)`` with grads ``[dx, dW1, dU1, db1, dW2, ...]`` in
    training mode and None in inference mode.
    """

    def __init__(self, engine, cell, shape, mode, run, fetch, check=None):
        self.engine, self.cell, self.shape, self.mode = engine, cell, shape, mode
        self._run = run
        self._fetch = fetch
        self._check = check

    def __call__(self):
        return self._run()

    def first_call(self):
        """Run once (compiling and tracing) and return ``(outputs, grads)`` as arrays."""
        result = self._fetch(self._run())
        if self._check is not None:
            self._check()
        return result

    @property
    def steps(self):
        """Time steps per call (the unit of "microseconds per time step")."""
        return self.shape.time


def iter_workloads(shapes, cells, modes):
    """The (shape, cell, mode) workloads of a grid; ``shapes`` are names or :class:`Shape`."""
    for name in shapes:
        shape = SHAPES[name] if isinstance(name, str) else name
        for cell in cells:
            for mode in modes:
                if mode in shape.modes:
                    yield shape, cell, mode



def count_layer_cases(shapes, cells, modes, engines):
    """How many (workload, engine) cases a layer runner will time."""
    return sum(1 for _ in iter_workloads(shapes, cells, modes)) * len(engines)



def imdb_batch(batch=128, time_steps=500, vocab=10000, seed=0):
    """A synthetic IMDB-style batch: int32 tokens [B, T] and 0/1 labels [B, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab, (batch, time_steps)).astype("int32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    return x, y
