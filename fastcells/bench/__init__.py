"""The benchmarks: the fastcells layers timed against the built-in Keras layers (and PyTorch),
each result checked against the built-in layer's.

``python -m fastcells bench`` and the pytest-benchmark suite under ``benchmarks/`` build on
this package:

- :mod:`~fastcells.bench.workloads`: the shapes, cells and modes, the work of one call and
  its floor, the weights and inputs every engine gets;
- :mod:`~fastcells.bench.engines`: what each engine name runs and whether it can run here;
- :mod:`~fastcells.bench.timing`: the settings of a run, and the engines of a workload
  timed in alternation;
- :mod:`~fastcells.bench.equivalence`: the errors against the built-in layer and their bounds;
- :mod:`~fastcells.bench.cpu`: the CPU comparison (layers, ``model.fit``, cold start);
- :mod:`~fastcells.bench.gpu`: the GPU comparison (CUDA engines against cuDNN, no
  TensorFlow);
- :mod:`~fastcells.bench.torch_worker`: ``torch.nn`` with the Keras weights, and the
  worker process that runs it on its own;
- :mod:`~fastcells.bench.report`, :mod:`~fastcells.bench.machine`: the results, tables,
  JSON and chart, and what they record about the machine.

Times are ``time.perf_counter`` medians of repeated calls after a first (compiling, tracing)
call and a warm-up; the engines of a workload are timed in alternation, so that ratios are
between engines measured over the same stretch of time.

Example::

    import sys
    from fastcells import bench
    results = bench.run_layer_benchmarks(shapes=["imdb"], cells=["lstm"], modes=["forward"])
    bench.write_report(bench.Report(layers=results), sys.stdout)
"""
from .equivalence import compare, relative_error, worst_of
from .cpu import run_cold_start, run_fit_benchmarks, run_layer_benchmarks
from .engines import BASELINE, ENGINES, available_engines, engine_unavailable
from .gpu import run_gpu_benchmarks
from .machine import machine_info
from .report import Report, save_json, save_plot, write_report
from .timing import Settings, quick_settings
from .workloads import CELLS, MODES, SHAPES, Shape

__all__ = ["run_layer_benchmarks", "run_fit_benchmarks", "run_cold_start",
           "run_gpu_benchmarks", "Report", "write_report", "save_json", "save_plot",
           "Settings", "quick_settings", "Shape", "SHAPES", "CELLS", "MODES", "ENGINES",
           "BASELINE", "engine_unavailable", "available_engines", "relative_error",
           "worst_of", "compare", "machine_info"]
