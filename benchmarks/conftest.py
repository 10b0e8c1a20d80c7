"""pytest-benchmark suite of fastcells (``pytest benchmarks --benchmark-only``).

- ``pytest benchmarks`` runs the grid (with or without ``--benchmark-only``); a plain
  ``pytest`` from the repository root leaves these files out, so that a test run never
  starts a benchmark run by accident; ``pytest tests`` never sees them.
- Heavy workloads (the ``large`` shape) are marked ``heavy`` and skipped unless
  ``--bench-heavy`` is given or ``FASTCELLS_BENCH_HEAVY=1`` is set.
- ``--bench-rounds N`` overrides the timed rounds of every case.
- ``--bench-dtype float64`` (or ``FASTCELLS_BENCH_DTYPE``) runs the grid in float64 (the
  default is float32), the equivalence bounds then those of float64.
- At the end a table per workload gives microseconds per time step and the speed-up over the
  built-in layer measured in the same run (the same tables as ``python -m fastcells bench``).
"""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("fastcells benchmarks")
    group.addoption("--bench-heavy", action="store_true", default=False,
                    help="also run the heavy workloads (or set FASTCELLS_BENCH_HEAVY=1)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds of every benchmark (default: per workload)")
    group.addoption("--bench-dtype", choices=("float32", "float64"),
                    default=os.environ.get("FASTCELLS_BENCH_DTYPE") or "float32",
                    help="dtype of the weights and inputs (default float32, or "
                         "FASTCELLS_BENCH_DTYPE)")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a slow workload, opt in with --bench-heavy "
                                       "or FASTCELLS_BENCH_HEAVY=1")
    config.addinivalue_line("markers", "fit: the model.fit (train_on_batch) workload")


def _explicitly_requested(config):
    """True when an argument of the command line points into benchmarks/ (or the run was
    asked to be benchmarks only)."""
    if config.getoption("benchmark_only", default=False):
        return True
    for arg in config.args:
        path = Path(str(arg).split("::", 1)[0])
        if not path.is_absolute():
            path = Path(config.invocation_params.dir) / path
        try:
            path = path.resolve()
        except OSError:
            continue
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """Leave the benchmark modules out of a run that did not ask for them."""
    if Path(str(collection_path)).resolve().parent == HERE and not _explicitly_requested(config):
        return True
    return None


def _heavy_enabled(config):
    return (config.getoption("bench_heavy", default=False)
            or os.environ.get("FASTCELLS_BENCH_HEAVY", "") not in ("", "0"))


def pytest_collection_modifyitems(config, items):
    if _heavy_enabled(config):
        return
    skip = pytest.mark.skip(reason="heavy workload: opt in with --bench-heavy or "
                                   "FASTCELLS_BENCH_HEAVY=1")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------- fixtures
class _Session:
    """What the benchmarks of one run share: reference results of the built-in layer, the
    built-in layer's medians (for same-run ratios) and the results for the final tables."""

    def __init__(self):
        self.references = {}
        self.baselines = {}
        self.layers = []
        self.fit = []
        self.peak = None        # workloads.measure_peak(), once a fastcells-cpu case ran


    def record(self, benchmark, key, result, bucket, **extra_info):
        """Keep a timed result with its ratio to the same run's built-in layer, and put the
        numbers in the benchmark's extra_info."""
        from fastcells.bench import BASELINE
        if result.engine == BASELINE:
            self.baselines[key] = result.median
        result.baseline_median = self.baselines.get(key)
        bucket.append(result)
        benchmark.extra_info.update(extra_info)
        if result.speedup is not None:
            benchmark.extra_info["speedup_vs_keras"] = result.speedup


_session = _Session()


@pytest.fixture(scope="session")
def bench_session():
    return _session


@pytest.fixture(scope="session")
def bench_settings(pytestconfig):
    from fastcells import bench
    return bench.Settings(dtype=pytestconfig.getoption("bench_dtype", default="float32"))


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig):
    """Function of a default round count: the ``--bench-rounds`` override or the default."""
    override = pytestconfig.getoption("bench_rounds", default=None)
    return lambda default: override or default


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not (_session.layers or _session.fit):
        return
    from fastcells import bench
    from fastcells.bench import workloads

    class _Writer:
        def write(self, text):
            terminalreporter.write(text)

    for results in (_session.layers, _session.fit):
        for r in results:           # the baseline may have run after (e.g. with -k or -p)
            if r.baseline_median is None:
                key = r.workload if hasattr(r, "workload") else ("model.fit", r.cell)
                r.baseline_median = _session.baselines.get(key)
    if _session.peak:               # the better of the rates at the start and the end
        _session.peak = workloads.measure_peak(_session.peak["dtype"],
                                               _session.peak["threads"], previous=_session.peak)
    terminalreporter.section("fastcells: microseconds per time step, speed-up over keras")
    bench.write_report(bench.Report(layers=_session.layers, fit=_session.fit,
                                    peak=_session.peak), _Writer())
