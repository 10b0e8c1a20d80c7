"""Layer benchmarks: engine x cell x shape x mode, one pytest-benchmark group per workload.

Each case builds its engine with the weights and inputs of :mod:`fastcells.bench` (the same
for every engine), calls it once untimed (JIT compilation, ``tf.function`` tracing), checks it
against the built-in Keras layer (float32: outputs within 1e-5, gradients within 1e-4 of their
norm in both the Frobenius and the largest-element ratio, :func:`fastcells.bench.relative_error`;
NaN fails; ``--bench-dtype float64`` for float64 and its bounds), then times it with
``benchmark.pedantic``. ``extra_info`` holds microseconds per
time step, the speed-up over the built-in layer of the same run, the errors and, once a
fastcells-cpu case ran, the workload's compute floor (``floor_s``: its products and
activations at the rates :func:`fastcells.bench.workloads.measure_peak` measured in this
run).

    pytest benchmarks --benchmark-only                       # default grid (no heavy shapes)
    pytest benchmarks --benchmark-only -k "imdb and lstm"    # one workload
    pytest benchmarks --benchmark-only --bench-heavy         # with the large shape

Unlike ``python -m fastcells bench``, which runs PyTorch in a worker process of its own
(:class:`fastcells.bench.torch_worker.TorchWorker`), the torch cases here run in the pytest
process, next to TensorFlow and the fastcells kernels (pytest-benchmark times callables in
its own process): their threads share the cores with the threads those leave behind.
Denormals are flushed in torch's threads as in the worker
(:func:`fastcells.bench.torch_worker.flush_denormals`, called before the first torch case
starts torch's thread pool). For torch numbers measured
on their own, use ``python -m fastcells bench``.
"""
import pytest

from fastcells import bench
from fastcells.bench import cpu, engines, equivalence, report, torch_worker, workloads


def _cases():
    cpu_engines = sorted(engines.CPU_ENGINES, key=lambda e: e != bench.BASELINE)  # baseline 1st
    for shape in bench.SHAPES.values():
        marks = [pytest.mark.heavy] if shape.heavy else []
        for cell in bench.CELLS:
            for mode in shape.modes:
                for engine in cpu_engines:
                    yield pytest.param(shape.name, cell, mode, engine, marks=marks,
                                       id=f"{shape.name}-{cell}-{mode}-{engine}")


@pytest.mark.parametrize("shape_name,cell,mode,engine", list(_cases()))
def test_layer(benchmark, bench_session, bench_settings, bench_rounds, shape_name, cell, mode,
               engine):
    reason = bench.engine_unavailable(engine)
    if reason is not None:
        pytest.skip(reason)
    s = bench_settings
    shape = bench.SHAPES[shape_name]
    key = (shape_name, cell, mode)
    benchmark.group = f"{shape_name} {workloads.CELL_NAMES[cell]} {mode}: {shape.describe()}"

    if engine == "torch" and s.torch_flush_denormal:
        torch_worker.flush_denormals()            # before torch starts its threads
    case = cpu.make_case(engine, cell, shape, mode, s.seed, s.dtype, s.torch_threads)
    out = case.first_call()                       # compile + trace, outside the timing
    if engine == bench.BASELINE:
        bench_session.references[key] = out
    reference = bench_session.references.get(key)
    if reference is None:
        reference = cpu.make_case(bench.BASELINE, cell, shape, mode, s.seed,
                                  s.dtype).first_call()
        bench_session.references[key] = reference
    max_error, grad_error = bench.compare(out, reference)
    del out
    benchmark.extra_info.update(engine=engine, cell=cell, shape=shape_name, mode=mode,
                                batch=shape.batch, time_steps=shape.time,
                                features=shape.features, units=shape.units,
                                layers=shape.layers, max_error=max_error,
                                grad_error=grad_error)
    problem = equivalence.check_equivalence(engine, max_error, grad_error, s.dtype)
    assert problem is None, f"{engine} on {shape_name}/{cell}/{mode}: {problem}"
    if engine == "fastcells-cpu" and bench_session.peak is None:
        bench_session.peak = workloads.measure_peak(s.dtype)     # the rates behind the floors
    floor = workloads.workload_floor(cell, shape, mode, bench_session.peak)
    if floor is not None:
        benchmark.extra_info.update(floor_s=floor["floor_s"], product_flops=floor["flops"])

    benchmark.pedantic(case, rounds=bench_rounds(shape.rounds), iterations=1,
                       warmup_rounds=s.warmup)

    if benchmark.stats is None:                   # --benchmark-disable: ran once, untimed
        return
    times = list(benchmark.stats.stats.data)
    result = report.Result(shape_name, cell, mode, engine, shape.time, times=times,
                           max_error=max_error, grad_error=grad_error)
    bench_session.record(benchmark, key, result, bench_session.layers,
                         us_per_step=result.us_per_step)
