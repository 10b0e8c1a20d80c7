"""A benchmark run's JSON read back, and its tables as Markdown for the docs and README.

``python -m fastcells bench --json docs/performance.json --markdown docs/performance.md``
measures and writes both; ``python -m fastcells report docs/performance.json --markdown
docs/performance.md --markdown README.md`` writes the tables again from the JSON alone. A
Markdown file holds generated blocks between marker lines (``<!-- begin tables`` ...
``<!-- end tables -->``, the same for ``summary``); only those are rewritten, so the prose
around them stays as written.
"""
import dataclasses
import json
import math

from .engines import BASELINE, ordered_engines
from .machine import describe_cpu
from .report import ColdResult, FitResult, Report, Result, _fmt, _fmt_range
from .workloads import CELL_NAMES, CELLS, SHAPES, workload_floor

MODES = {"forward": "inference", "train": "training step"}


# --------------------------------------------------------------------------- JSON
def _build(cls, d):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("speedup_range", "shape"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return cls(**kw)


def load_json(path):
    """The :class:`Report` a ``--json`` file was written from."""
    with open(path) as f:
        data = json.load(f)
    return Report(layers=[_build(Result, d) for d in data.get("layers", ())],
                  fit=[_build(FitResult, d) for d in data.get("fit", ())],
                  cold=[_build(ColdResult, d) for d in data.get("cold", ())],
                  machine=data.get("machine") or {}, settings=data.get("settings") or {},
                  unavailable=data.get("unavailable") or {}, elapsed_s=data.get("elapsed_s"),
                  peak=data.get("peak"))


# --------------------------------------------------------------------------- tables
def _x(speedup):
    text = _fmt(speedup, ".2f")
    return text if text == "-" else text + "x"


def _ms(seconds):
    if seconds is None or math.isnan(seconds):
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _machine(report):
    m, s = report.machine, report.settings
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    worker = m.get("torch_worker") or {}
    torch = (f"; torch in a worker process of its own, {worker.get('torch_threads')} threads"
             if worker else "")
    return (f"Measured on {describe_cpu(m)}, {m.get('cores', '?')} cores, "
            f"{str(m.get('date', '?'))[:10]}; {s.get('dtype', '?')}, Keras backend "
            f"{s.get('backend', '?')}, fastcells threads "
            f"{m.get('fastcells', {}).get('num_threads', '?')}{torch}; {versions}.")


def _speedups(report, timed):
    """One row per workload and mode: each cell's engines' speed-ups over the built-in."""
    engines = [e for e in ordered_engines({r.engine for r in timed}) if e != BASELINE]
    cells = [c for c in CELLS if any(r.cell == c for r in timed)]
    header = ["workload", "mode"] + [f"{CELL_NAMES[c]} " + " / ".join(engines) for c in cells]
    rows = []
    for shape, mode in dict.fromkeys((r.shape, r.mode) for r in timed):
        row = [f"{shape} ({SHAPES[shape].describe()})" if shape in SHAPES else shape,
               MODES[mode]]
        for c in cells:
            got = {r.engine: r.speedup for r in timed
                   if (r.shape, r.cell, r.mode) == (shape, c, mode)}
            row.append(" / ".join(_x(got.get(e)) for e in engines))
        rows.append(row)
    return _table(header, rows)


def _times(report, timed):
    """Median ms per call of every engine, the floor, and the floor's share of fastcells'."""
    engines = ordered_engines({r.engine for r in timed})
    ours = next((e for e in engines if e.startswith("fastcells")), None)
    header = ["workload", "cell", "mode"] + [f"{e} ms" for e in engines] + [
        "floor ms", "floor / fastcells"]
    rows = []
    for shape, cell, mode in dict.fromkeys(r.workload for r in timed):
        got = {r.engine: r.median for r in timed if r.workload == (shape, cell, mode)}
        spec = SHAPES.get(shape)
        f = workload_floor(cell, spec, mode, report.peak) if spec else None
        floor = f["floor_s"] if f else None
        share = (f"{100 * floor / got[ours]:.0f}%" if floor and ours in got else "-")
        rows.append([shape, CELL_NAMES[cell], MODES[mode]] + [_ms(got.get(e)) for e in engines]
                    + [_ms(floor), share])
    return _table(header, rows)


def _fit(report):
    ok = [r for r in report.fit if r.times]
    if not ok:
        return []
    r0 = ok[0]
    engines = ordered_engines({r.engine for r in ok})
    header = ["cell"] + [f"{e} ms/batch" for e in engines] + ["speed-up", "middle half"]
    rows = []
    for cell in dict.fromkeys(r.cell for r in ok):
        got = {r.engine: r for r in ok if r.cell == cell}
        best = next((got[e] for e in engines if e != BASELINE and e in got), None)
        rows.append([CELL_NAMES[cell]] + [f"{got[e].ms_per_batch:.1f}" if e in got else "-"
                                          for e in engines]
                    + [_x(best and best.speedup),
                       _fmt_range(best and best.speedup_range) or "-"])
    return ([f"`train_on_batch` of Embedding(10000, 32) -> RNN(32) -> Dense(1), "
             f"B={r0.batch} T={r0.time}:", ""] + _table(header, rows))


def _cold(report):
    if not report.cold:
        return []
    B, T, D, H = report.cold[0].shape
    header = ["cell", "engine", "kernel cache", "import s", "first call s", "second call s"]
    rows = [[CELL_NAMES[r.cell], r.engine, r.cache, _fmt(r.import_s, ".2f"),
             _fmt(r.first_s, ".3f"), _fmt(r.second_s, ".3f")] for r in report.cold]
    return ([f"First forward+backward in a new process, B={B} T={T} D={D} H={H}:", ""]
            + _table(header, rows))


def _errors(timed):
    def worst(attr):
        rows = [r for r in timed if r.engine.startswith("fastcells")
                and getattr(r, attr) is not None]
        if not rows:
            return None
        r = max(rows, key=lambda r: getattr(r, attr))
        return f"{getattr(r, attr):.1e} ({r.shape} {CELL_NAMES[r.cell]}, {r.engine})"
    out, grad = worst("max_error"), worst("grad_error")
    parts = [f"outputs {out}" if out else None,
             f"gradients {grad} of the gradient's norm" if grad else None]
    if not any(parts):
        return None
    return ("fastcells' worst errors against the built-in layer: "
            + ", ".join(p for p in parts if p) + ".")


def markdown(report):
    """The tables of a :class:`Report` as Markdown lines joined into one string."""
    timed = [r for r in report.layers if r.times and r.status == "ok"]
    lines = [_machine(report), ""]
    if timed:
        lines += ["Speed-up over the built-in Keras layer (its median time over each "
                  "engine's):", ""] + _speedups(report, timed) + [""]
        lines += ["Median time per call, and the floor: the products and activations alone "
                  "at the rates this run measured"
                  + (f" ({report.peak['flops_per_s'] / 1e9:.0f} GFLOP/s, "
                     f"{report.peak['tanh_per_s'] / 1e9:.1f} G tanh/s)" if report.peak
                     else "") + ":", ""] + _times(report, timed) + [""]
        errors = _errors(timed)
        if errors:
            lines += [errors, ""]
    fit = _fit(report)
    if fit:
        lines += fit + [""]
    cold = _cold(report)
    if cold:
        lines += cold + [""]
    bad = [r for r in report.layers + report.fit if r.status != "ok"]
    if bad:
        lines += ["Not timed or out of bounds: " + "; ".join(
            f"{getattr(r, 'shape', 'model.fit')} {CELL_NAMES[r.cell]} {r.engine}: {r.status}"
            for r in bad) + ".", ""]
    return "\n".join(lines).rstrip() + "\n"


def summary(report):
    """The short table of the README, with the machine: the speed-ups of imdb's inference
    and of each workload's training step (inference where a workload has no training
    step), then of ``train_on_batch``."""
    timed = [r for r in report.layers if r.times and r.status == "ok"]
    m = report.machine
    engines = [e for e in ordered_engines({r.engine for r in timed}) if e != BASELINE]
    cells = [c for c in CELLS if any(r.cell == c for r in timed)]
    header = [f"workload ({' / '.join(engines)} over Keras)"] + [CELL_NAMES[c] for c in cells]
    rows = []
    trained = {r.shape for r in timed if r.mode == "train"}
    for shape, mode in dict.fromkeys((r.shape, r.mode) for r in timed):
        if mode == "forward" and shape in trained and shape != "imdb":
            continue
        spec = SHAPES.get(shape)
        name = f"{shape} {spec.describe().split(',')[0]}" if spec else shape
        got = {(r.cell, r.engine): r.speedup for r in timed if (r.shape, r.mode) ==
               (shape, mode)}
        rows.append([f"{name}, {MODES[mode]}"] + [
            " / ".join(_x(got.get((c, e))) for e in engines) for c in cells])
    fit = {r.cell: r.speedup for r in report.fit if r.times and r.engine != BASELINE}
    if fit:
        rows.append(["IMDB model `train_on_batch`"] + [_x(fit.get(c)) if c in fit else ""
                                                       for c in cells])
    lines = [f"One `python -m fastcells bench --heavy` run on {describe_cpu(m)}, "
             f"{m.get('cores', '?')} cores, {report.settings.get('dtype', '?')}, Keras "
             f"backend {report.settings.get('backend', '?')}:", ""]
    return "\n".join(lines + _table(header, rows)) + "\n"


BLOCKS = {"tables": markdown, "summary": summary}


def _marks(name):
    return f"<!-- begin {name}", f"<!-- end {name} -->"


def write_into(md_path, json_path, report):
    """Rewrite the generated blocks of ``md_path`` (those between ``<!-- begin tables``
    / ``<!-- end tables -->`` and the same for ``summary``) from ``report``. A file with no
    block gets the tables appended (it is made when missing). Returns the new text."""
    try:
        with open(md_path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    found = [name for name in BLOCKS if _marks(name)[0] in text]
    if not found:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + \
            "<!-- begin tables -->\n<!-- end tables -->\n"
        found = ["tables"]
    source = json_path or "RUN.json"
    for name in found:
        begin, end = _marks(name)
        start = text.index(begin)
        stop = text.index(end, start)
        head = (f"{begin}: generated by python -m fastcells report {source} --markdown "
                f"{md_path} -->")
        text = text[:start] + f"{head}\n{BLOCKS[name](report)}" + text[stop:]
    with open(md_path, "w") as f:
        f.write(text)
    return text


def block_in(md_path, name="tables"):
    """The generated block ``name`` of ``md_path`` without its marker lines (None when the
    file has none)."""
    with open(md_path) as f:
        text = f.read()
    begin, end = _marks(name)
    start = text.find(begin)
    if start < 0:
        return None
    return text[text.index("\n", start) + 1:text.index(end, start)]
