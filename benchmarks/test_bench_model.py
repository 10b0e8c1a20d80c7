"""model.fit benchmark: ``train_on_batch`` of the IMDB-style model (Embedding(10000, 32) ->
LSTM(32) or GRU(32) -> Dense(1, sigmoid)), B=128, T=500, synthetic tokens; fastcells against
the built-in layer with the same initial weights. Before the timing, the predictions and the
loss and gradients of one training step (:func:`fastcells.bench.equivalence.gradient_step`)
are checked against the built-in model's."""
import numpy as np
import pytest

from fastcells import bench
from fastcells.bench import cpu, equivalence, report, workloads

BATCH, TIME_STEPS = 128, 500


def _cases():
    for cell in ("lstm", "gru"):
        for engine in (bench.BASELINE, "fastcells-cpu"):
            yield pytest.param(cell, engine, id=f"imdb-{cell}-{engine}")


@pytest.mark.fit
@pytest.mark.parametrize("cell,engine", list(_cases()))
def test_model_fit(benchmark, bench_session, bench_settings, bench_rounds, cell, engine):
    import keras

    reason = bench.engine_unavailable(engine)
    if reason is not None:
        pytest.skip(reason)
    s = bench_settings
    benchmark.group = (f"model.fit imdb {workloads.CELL_NAMES[cell]}: B={BATCH} T={TIME_STEPS}, "
                       f"train_on_batch")
    x, y = workloads.imdb_batch(BATCH, TIME_STEPS, seed=s.seed)
    key = ("model.fit", cell)
    if key not in bench_session.references:
        keras.utils.set_random_seed(s.seed)
        ref_model = cpu.build_imdb_model(bench.BASELINE, cell, TIME_STEPS, dtype=s.dtype)
        weights = ref_model.get_weights()
        pred = np.asarray(ref_model(x, training=False))
        bench_session.references[key] = (weights, pred,
                                          equivalence.gradient_step(ref_model, x, y))
        del ref_model
    weights, reference, ref_step = bench_session.references[key]

    model = cpu.build_imdb_model(engine, cell, TIME_STEPS, dtype=s.dtype)
    model.set_weights(weights)
    max_error, _ = bench.compare((np.asarray(model(x, training=False)), None), (reference, None))
    step = equivalence.gradient_step(model, x, y)
    if engine != bench.BASELINE:
        assert model.layers[1].last_engine == engine.split("-", 1)[1], "the kernels did not run"
    loss_error, grad_error = equivalence.compare_fit_step(step, ref_step)
    del step
    benchmark.extra_info.update(engine=engine, cell=cell, batch=BATCH, time_steps=TIME_STEPS,
                                max_error=max_error, loss_error=loss_error,
                                grad_error=grad_error)
    problem = equivalence.check_equivalence(engine, max_error, None, s.dtype, loss_error,
                                            grad_error)
    assert problem is None, f"{engine} model.fit {cell}: {problem}"
    for _ in range(s.fit_warmup):
        model.train_on_batch(x, y)

    benchmark.pedantic(model.train_on_batch, args=(x, y), rounds=bench_rounds(s.fit_batches),
                       iterations=1, warmup_rounds=0)

    if benchmark.stats is None:
        return
    result = report.FitResult(cell, engine, BATCH, TIME_STEPS,
                             times=list(benchmark.stats.stats.data), max_error=max_error,
                             loss_error=loss_error, grad_error=grad_error)
    bench_session.record(benchmark, key, result, bench_session.fit,
                         ms_per_batch=result.ms_per_batch)
