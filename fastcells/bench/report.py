"""Results and reports: the result rows, the tables, the JSON and the chart."""
import dataclasses
import json
import math

import numpy as np

from .engines import BASELINE, ordered_engines
from .machine import describe_cpu
from .timing import median as _median
from .workloads import CELL_NAMES, MODE_NAMES, SHAPES, workload_floor


@dataclasses.dataclass
class Result:
    """Timing of one engine on one workload (cell x shape x mode)."""
    shape: str
    cell: str
    mode: str
    engine: str
    steps: int
    times: list = dataclasses.field(default_factory=list)
    max_error: float = None
    grad_error: float = None
    status: str = "ok"            # "ok", "skipped: ...", "error: ...", "mismatch: ..."
    baseline_median: float = None  # the built-in layer's median in the same run
    speedup_range: tuple = None    # middle half of the speed-ups paired round by round

    @property
    def median(self):
        """Median seconds per call."""
        return _median(self.times)

    @property
    def us_per_step(self):
        """Median microseconds per time step."""
        return self.median / self.steps * 1e6 if self.times else float("nan")

    @property
    def speedup(self):
        """The built-in layer's median over this engine's (> 1: faster than built-in)."""
        if self.baseline_median is None or not self.times:
            return None
        return self.baseline_median / self.median

    @property
    def workload(self):
        return (self.shape, self.cell, self.mode)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.update(median_s=self.median if self.times else None,
                 us_per_step=self.us_per_step if self.times else None,
                 speedup_vs_keras=self.speedup)
        return d


@dataclasses.dataclass
class FitResult:
    """``train_on_batch`` of the IMDB-style model with one recurrent layer."""
    cell: str
    engine: str
    batch: int
    time: int
    times: list = dataclasses.field(default_factory=list)
    max_error: float = None       # predictions before training vs the built-in layer's
    loss_error: float = None      # the first train_on_batch's loss vs the built-in model's
    grad_error: float = None      # its gradients vs the built-in model's (relative)
    status: str = "ok"
    baseline_median: float = None
    speedup_range: tuple = None

    @property
    def median(self):
        return _median(self.times)

    @property
    def ms_per_batch(self):
        return self.median * 1e3 if self.times else float("nan")

    @property
    def speedup(self):
        if self.baseline_median is None or not self.times:
            return None
        return self.baseline_median / self.median

    def to_dict(self):
        d = dataclasses.asdict(self)
        d.update(ms_per_batch=self.ms_per_batch if self.times else None,
                 speedup_vs_keras=self.speedup)
        return d


@dataclasses.dataclass
class ColdResult:
    """First forward+backward call in a fresh Python process."""
    cell: str
    engine: str
    cache: str                     # "warm" or "cold" (numba on-disk cache), "-" for keras
    shape: tuple
    import_s: float = None         # import numpy, tensorflow, keras, fastcells
    first_s: float = None          # first call: build, trace, JIT (or cache load), run
    second_s: float = None         # the same call again
    status: str = "ok"

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """Everything a benchmark run measured."""
    layers: list = dataclasses.field(default_factory=list)
    fit: list = dataclasses.field(default_factory=list)
    cold: list = dataclasses.field(default_factory=list)
    machine: dict = dataclasses.field(default_factory=dict)
    settings: dict = dataclasses.field(default_factory=dict)
    unavailable: dict = dataclasses.field(default_factory=dict)
    elapsed_s: float = None
    peak: dict = None             # measure_peak(): the rates behind the floor rows

    def mismatches(self):
        """Results whose equivalence check failed."""
        return [r for r in self.layers + self.fit if r.status.startswith("mismatch")]



# --------------------------------------------------------------------------- reporting
def _fmt(value, spec, missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _si(count, unit, sep=""):
    """``count`` with a metric prefix: 3150000000 -> "3.15 GFLOP", 25600 -> "25.6 k tanh"."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g} {prefix}{sep}{unit}"
    return f"{count:.3g} {unit}"


def _fmt_error(value):
    """An error for the tables: NaN shows as "nan" (a missing one as "-")."""
    return "nan" if isinstance(value, float) and math.isnan(value) else _fmt(value, ".1e")


def _fmt_range(span):
    """``(lo, hi)`` of :attr:`Result.speedup_range` as ``"lo-hi x"``, or "" without one."""
    return "" if span is None else f"{span[0]:.2f}-{span[1]:.2f}x"


def _table(header, rows, stream):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        stream.write("  " + "  ".join(cells).rstrip() + "\n")


def _status_note(status):
    return "" if status == "ok" else status


def write_report(report, stream):
    """Write the tables of a :class:`Report` to ``stream``: one per workload with
    microseconds per time step, the speed-up over the built-in layer and the errors against
    it; then model.fit and cold start."""
    backend = (report.settings or {}).get("backend")
    if backend:
        stream.write(f"Keras backend: {backend} (the built-in layers and fastcells both run "
                     f"on it)\n")
    groups = {}
    for r in report.layers:
        groups.setdefault(r.workload, []).append(r)
    for (shape_name, cell, mode), rows in groups.items():
        shape = SHAPES.get(shape_name)
        desc = shape.describe() if shape else ""
        stream.write(f"\n{shape_name} · {CELL_NAMES[cell]} · {MODE_NAMES[mode]}   {desc}\n")
        header = ["engine", "us/step", "ms/call", "vs keras", "middle half", "max|err|",
                  "grad err", "n", ""]
        table = []
        for r in rows:
            table.append([r.engine, _fmt(r.us_per_step, ".1f"), _fmt(r.median * 1e3, ".2f"),
                          _fmt(r.speedup, ".2f", "-") + ("x" if r.speedup else ""),
                          _fmt_range(r.speedup_range),
                          _fmt_error(r.max_error), _fmt_error(r.grad_error),
                          len(r.times) or "-", _status_note(r.status)])
        f = workload_floor(cell, shape, mode, report.peak) if shape else None
        if f is not None:
            floor = f["floor_s"]
            base = next((r.median for r in rows if r.engine == BASELINE and r.times), None)
            table.append(["floor", _fmt(floor / shape.time * 1e6, ".1f"),
                          _fmt(floor * 1e3, ".2f"),
                          "" if base is None else f"{base / floor:.2f}x", "", "", "", "",
                          f"{_si(f['flops'], 'FLOP')} + {_si(f['tanh'], 'tanh', ' ')}"])
        _table(header, table, stream)
    if report.fit:
        r0 = report.fit[0]
        stream.write(f"\nmodel.fit · IMDB-style model (Embedding(10000, 32) -> RNN(32) -> "
                     f"Dense(1)), train_on_batch, B={r0.batch} T={r0.time}\n")
        header = ["cell", "engine", "ms/batch", "vs keras", "middle half", "max|err|",
                  "loss err", "grad err", "n", ""]
        table = [[CELL_NAMES[r.cell], r.engine, _fmt(r.ms_per_batch, ".1f"),
                  _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""),
                  _fmt_range(r.speedup_range),
                  _fmt_error(r.max_error), _fmt_error(r.loss_error),
                  _fmt_error(r.grad_error), len(r.times) or "-", _status_note(r.status)]
                 for r in report.fit]
        _table(header, table, stream)
    if report.cold:
        B, T, D, H = report.cold[0].shape
        stream.write(f"\ncold start · first forward+backward in a fresh process, "
                     f"B={B} T={T} D={D} H={H}\n")
        header = ["cell", "engine", "numba cache", "import s", "first call s",
                  "second call s", ""]
        table = [[CELL_NAMES[r.cell], r.engine, r.cache, _fmt(r.import_s, ".2f"),
                  _fmt(r.first_s, ".3f"), _fmt(r.second_s, ".3f"), _status_note(r.status)]
                 for r in report.cold]
        _table(header, table, stream)
    if report.unavailable:
        stream.write("\nnot run: " + "; ".join(f"{e} ({why})" for e, why in
                                               report.unavailable.items()) + "\n")
    m = report.machine
    if m:
        v = m.get("versions", {})
        dtype = report.settings.get("dtype")
        stream.write(f"\nmachine: {describe_cpu(m)}, {m.get('cores')} cores; "
                     + (f"{dtype}; " if dtype else "")
                     + f"fastcells threads {m.get('fastcells', {}).get('num_threads')}; "
                     + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "\n")
        worker = m.get("torch_worker")
        if worker:
            flush = ", denormals flushed" if worker.get("flush_denormal") else ""
            stream.write(f"torch ran in a worker process of its own, "
                         f"{worker.get('torch_threads')} threads{flush}\n")
        elif m.get("torch_threads"):
            stream.write(f"torch ran in this process, {m['torch_threads']} threads\n")
        if m.get("gpu"):
            stream.write(f"GPU: {m['gpu']}\n")
    if report.peak:
        p = report.peak
        stream.write(f"floor: the products and activations alone, at the best rates of "
                     f"this run on {p['threads']} thread(s) in {p['dtype']}: "
                     f"{p['flops_per_s'] / 1e9:.0f} GFLOP/s (the packed product), "
                     f"{p['tanh_per_s'] / 1e9:.1f} G tanh/s; the element-wise updates, "
                     f"copies and the call around the kernels come on top\n")
    if report.elapsed_s is not None:
        stream.write(f"total time {report.elapsed_s:.0f} s\n")


def _floors(report):
    """The compute floor of each workload of the report, for its JSON."""
    floors = {}
    for r in report.layers:
        shape = SHAPES.get(r.shape)
        f = None if shape is None else workload_floor(r.cell, shape, r.mode, report.peak)
        if f is not None and r.workload not in floors:
            floors[r.workload] = dict(shape=r.shape, cell=r.cell, mode=r.mode, **f)
    return list(floors.values())


def save_json(path, report):
    """Save a :class:`Report` as JSON (results, settings, machine information)."""
    data = dict(machine=report.machine, settings=report.settings,
                unavailable=report.unavailable, elapsed_s=report.elapsed_s,
                layers=[r.to_dict() for r in report.layers],
                fit=[r.to_dict() for r in report.fit],
                cold=[r.to_dict() for r in report.cold],
                peak=report.peak, floors=_floors(report))
    for rows in (data["layers"], data["fit"]):
        for d in rows:      # 4 digits are well below the spread of the calls
            d["times"] = [float(f"{t:.4g}") for t in d["times"]]
    with open(path, "w") as f:       # one line per key and per result, for short diffs
        f.write("{\n")
        for i, (key, value) in enumerate(data.items()):
            end = "\n" if i == len(data) - 1 else ",\n"
            if isinstance(value, list) and value:
                items = ",\n  ".join(json.dumps(v, default=str) for v in value)
                f.write(f"{json.dumps(key)}: [\n  {items}\n]{end}")
            else:
                f.write(f"{json.dumps(key)}: {json.dumps(value, default=str)}{end}")
        f.write("}\n")


def save_plot(path, report):
    """Write a PNG bar chart of the layer results (microseconds per step and speed-up).

    Returns None on success, or a message saying why no plot was written (matplotlib
    missing, nothing to plot).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, no plot written "
                "(pip install matplotlib, or pip install fastcells[plot])")
    timed = [r for r in report.layers if r.times]
    if not timed:
        return "no timed results to plot"
    workloads = list(dict.fromkeys(r.workload for r in timed))
    engines = ordered_engines({r.engine for r in timed})
    by_key = {(r.workload, r.engine): r for r in timed}
    labels = [f"{s}\n{CELL_NAMES[c]}\n{'fwd' if m == 'forward' else 'fwd+bwd'}"
              for s, c, m in workloads]
    n = len(engines)
    width = 0.8 / n
    xs = np.arange(len(workloads))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(workloads) + 2), 7), sharex=True)
    for k, engine in enumerate(engines):
        us = [by_key[(w, engine)].us_per_step if (w, engine) in by_key else np.nan
              for w in workloads]
        sp = [(by_key[(w, engine)].speedup or np.nan) if (w, engine) in by_key else np.nan
              for w in workloads]
        axes[0].bar(xs + (k - (n - 1) / 2) * width, us, width, label=engine)
        axes[1].bar(xs + (k - (n - 1) / 2) * width, sp, width, label=engine)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("microseconds per time step")
    axes[0].legend(fontsize="small")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylabel("speed-up over keras")
    axes[1].set_xticks(xs)
    axes[1].set_xticklabels(labels, fontsize="small")
    cpu = describe_cpu(report.machine)
    axes[0].set_title(f"fastcells benchmark, {cpu}, {report.machine.get('cores', '?')} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
