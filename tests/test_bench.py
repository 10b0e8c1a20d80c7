"""The benchmark machinery, not its timings: which comparison runs where, skip messages, the
torch worker process and its replies, the GPU runner's bookkeeping (with stand-in cases on
machines without a GPU; the real GPU cases on tiny shapes where torch sees one)."""
import importlib.metadata
import json
import os
import sys

import numpy as np
import pytest

from fastcells import _startup, bench
from fastcells.bench import cpu, engines, equivalence, gpu, timing, workloads
from fastcells.bench import report as reporting
from fastcells.bench import torch_worker
from fastcells import __main__ as cli

TINY = bench.Shape("tiny", 3, 4, 2, 5)


def _has_torch():
    return _startup.module_found("torch")


def _gpu():
    return engines.no_gpu_reason() is None


# --------------------------------------------------------------------------- which run
@pytest.mark.parametrize("gpu_flag,tf_found,backend,gpu_found,flag,path,note", [
    (False, True, "tensorflow", False, None, "cpu", None),
    (True, True, "tensorflow", False, None, "gpu", None),
    (True, False, "torch", True, None, "gpu", None),
    (False, False, "torch", True, None, "gpu", "TensorFlow is not installed"),
    (False, False, "torch", True, "torch", "cpu", None),        # --backend torch asked
    (False, False, "torch", False, None, "cpu", None),          # no GPU: the CPU one
    (False, True, "torch", False, None, "cpu", None),
    (False, True, "jax", True, None, "cpu", None),
    (False, True, "numpy", False, None, "gpu", "'numpy' backend"),
])
def test_choose_bench(gpu_flag, tf_found, backend, gpu_found, flag, path, note):
    got_path, got_note = engines.choose_bench(gpu_flag, tf_found, backend, gpu_found, flag)
    assert got_path == path
    if note is None:
        assert got_note is None
    else:
        assert note in got_note


@pytest.mark.parametrize("argv,environ,installed,want", [
    (["-m", "bench"], {}, {"tensorflow", "torch"}, None),             # TF: Keras's default
    (["-m", "bench", "--gpu"], {}, {"tensorflow", "torch"}, "torch"),
    (["-m", "bench", "--gpu"], {"KERAS_BACKEND": "jax"}, {"torch"}, None),   # user's choice
    (["-m", "bench"], {}, {"torch", "jax"}, "torch"),                 # no TF
    (["-m", "bench"], {}, {"jax"}, "jax"),
    (["-m", "bench"], {}, set(), None),
    (["-m", "bench", "--gpu"], {}, {"tensorflow"}, None),             # no torch: no change
])
def test_command_line_backend(argv, environ, installed, want):
    assert _startup.command_line_backend(argv, environ, installed.__contains__) == want


def test_is_command_line():
    assert _startup.is_command_line(["-m", "bench"])
    assert _startup.is_command_line(["/venv/bin/fastcells", "bench"])
    assert not _startup.is_command_line(["/usr/bin/pytest", "-m", "bench"])
    assert not _startup.is_command_line([])


@pytest.mark.parametrize("argv,environ,want", [
    (["-m", "bench", "--backend", "jax"], {"KERAS_BACKEND": "torch"}, "jax"),  # flag wins
    (["-m", "bench", "--backend=torch"], {}, "torch"),
    (["-m", "bench", "--backend", "all"], {"KERAS_BACKEND": "jax"}, None),
])
def test_backend_flag_chooses_the_keras_backend(argv, environ, want):
    assert _startup.command_line_backend(argv, environ, lambda name: True) == want


def test_backend_all_names_each_backends_files():
    from fastcells.__main__ import _suffixed
    assert _suffixed(["bench", "--json", "r.json", "--plot=p.png", "--quick"], "jax") == [
        "bench", "--json", "r-jax.json", "--plot=p-jax.png", "--quick"]


def test_backend_other_than_this_process_is_refused(capsys):
    import keras
    other = "jax" if keras.backend.backend() != "jax" else "torch"
    assert cli.main(["bench", "--backend", other, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--backend {other}" in err and "picks its backend when it is imported" in err


_BACKEND_RUN = """
import keras, sys
from fastcells import bench
from fastcells.bench import workloads
res = bench.run_layer_benchmarks([workloads.Shape("tiny", 3, 4, 2, 5)], ["gru"], ["train"],
                                 ["keras", "fastcells-cpu"], bench.quick_settings())
report = bench.Report(layers=res, settings=dict(backend=keras.backend.backend()))
bench.write_report(report, sys.stdout)
for r in res:
    print("ROW", r.engine, r.status, r.max_error, r.grad_error, len(r.times))
"""


@pytest.mark.late
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cpu_comparison_on_another_backend(backend):
    """The CPU comparison on the JAX and torch backends: the built-in layer of that backend
    is the reference, fastcells runs its kernels there (a fallback would fail the kernel
    check) and agrees within the bounds; the report names the backend."""
    pytest.importorskip(backend)
    import subprocess
    env = dict(os.environ, KERAS_BACKEND=backend)
    out = subprocess.run([sys.executable, "-c", _BACKEND_RUN], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"Keras backend: {backend}" in out.stdout
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("ROW")]
    assert [r[1:3] for r in rows] == [["keras", "ok"], ["fastcells-cpu", "ok"]], out.stdout
    assert float(rows[1][3]) < 1e-5 and float(rows[1][4]) < 1e-4 and int(rows[1][5]) > 0


def test_setup_command_line_sets_backend_only_when_chosen():
    env = {}
    _startup.setup_command_line(["-m", "bench"], env)
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert env.get("KERAS_BACKEND") == _startup.command_line_backend(["-m", "bench"], {})


# --------------------------------------------------------------------------- skip messages
@pytest.mark.skipif(_gpu(), reason="torch sees a CUDA GPU here")
def test_gpu_command_skips_without_gpu(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert cli.main(["bench", "--gpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped: no CUDA GPU" in out
    data = json.loads(path.read_text())
    assert "no CUDA GPU" in data["settings"]["skipped"]
    assert set(data["unavailable"]) == set(engines.GPU_ENGINES)


@pytest.mark.skipif(_gpu(), reason="torch sees a CUDA GPU here")
def test_bench_without_tensorflow_runs_the_gpu_comparison(monkeypatch, capsys):
    """Without TensorFlow, on a machine with a GPU (as the command line sees it), bench
    runs the GPU comparison; here it then finds no GPU to run on and says so."""
    found = _startup.module_found
    monkeypatch.setattr(_startup, "module_found", lambda name: name != "tensorflow"
                        and found(name))
    monkeypatch.setattr(engines, "cuda_gpu_found", lambda: True)
    assert cli.main(["bench", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "TensorFlow is not installed" in out
    assert "skipped: no CUDA GPU" in out


@pytest.mark.skipif(_gpu(), reason="torch sees a CUDA GPU here")
def test_gpu_engines_unavailable_without_gpu(monkeypatch):
    monkeypatch.setattr(engines, "_unavailable_cache", {})
    ok, missing = bench.available_engines(comparison="gpu")
    assert ok == []
    assert all("no CUDA GPU" in why for why in missing.values())


def test_gpu_engine_reasons(monkeypatch):
    monkeypatch.setattr(engines, "_unavailable_cache", {})
    monkeypatch.setattr(engines, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(engines, "_numba_cuda_reason", lambda: "numba says no")
    monkeypatch.setattr(engines, "_probe", lambda engine, comparison: None)
    import keras
    if keras.backend.backend() != "torch":
        assert "KERAS_BACKEND=torch" in bench.engine_unavailable("keras", "gpu")
        assert "KERAS_BACKEND=torch" in bench.engine_unavailable("fastcells-cuda", "gpu")
    assert bench.engine_unavailable("fastcells-cuda-ops", "gpu") == "numba says no"
    with pytest.raises(ValueError, match="engine must be one of"):
        bench.engine_unavailable("fastcells-cpu", "gpu")


# --------------------------------------------------------------------------- GPU runner
def _fake_case(engine, cell, shape, mode, offset=0.0, fail=False):
    def run():
        if fail:
            raise RuntimeError("kernel exploded")
        y = np.full((shape.batch, shape.units), 1.0 + offset, "float32")
        grads = [np.ones((2, 2), "float32")] if mode == "train" else ()
        return y, grads

    def fetch(out):
        y, grads = out
        return y, (list(grads) if mode == "train" else None)

    return workloads.Case(engine, cell, shape, mode, run, fetch)


def _patch_gpu_runner(monkeypatch, behaviour):
    built = []

    def make(engine, cell, shape, mode, seed=0, dtype="float32"):
        built.append(engine)
        return _fake_case(engine, cell, shape, mode, **behaviour.get(engine, {}))

    monkeypatch.setattr(gpu, "make_gpu_case", make)
    monkeypatch.setattr(gpu, "configure", lambda settings: None)
    monkeypatch.setattr(gpu, "_free_gpu_memory", lambda: None)
    return built


def _quick():
    s = bench.quick_settings()
    s.repeats, s.warmup, s.min_seconds = 2, 0, 0.0
    return s


def test_gpu_runner_bookkeeping(monkeypatch):
    _patch_gpu_runner(monkeypatch, {"fastcells-cuda": dict(fail=True),
                                    "torch-cudnn": dict(offset=0.5)})
    results = bench.run_gpu_benchmarks(
        [TINY], ["lstm"], ["train"],
        ["torch-cudnn", "fastcells-cuda", "fastcells-cuda-ops", "keras"], _quick())
    by = {r.engine: r for r in results}
    assert [r.engine for r in results] == list(engines.GPU_ENGINES)    # baseline first
    assert by["keras"].status == "ok" and by["keras"].speedup == pytest.approx(1.0)
    assert by["fastcells-cuda-ops"].status == "ok"
    assert by["fastcells-cuda-ops"].max_error == 0.0
    assert by["fastcells-cuda-ops"].speedup is not None
    assert by["fastcells-cuda"].status.startswith("error: RuntimeError: kernel")
    assert by["torch-cudnn"].status.startswith("mismatch: outputs differ from keras")
    assert len(by["fastcells-cuda-ops"].times) >= 2


def test_gpu_runner_without_keras_compares_with_cudnn(monkeypatch):
    built = _patch_gpu_runner(monkeypatch, {})
    results = bench.run_gpu_benchmarks([TINY], ["gru"], ["forward"],
                                       ["fastcells-cuda-ops", "torch-cudnn"], _quick())
    assert built[0] == "torch-cudnn"              # the reference, built first
    for r in results:
        assert r.status == "ok" and r.max_error == 0.0
        assert r.speedup is None                  # no built-in layer: no ratio


def test_unsplit_engine_runs_on_request_after_fastcells_cuda(monkeypatch):
    """``fastcells-cuda-ops-unsplit`` is not in the default grid, runs when asked for, is
    ordered after the default engines, and lifts the split threshold only while it runs."""
    from fastcells import config
    assert "fastcells-cuda-ops-unsplit" not in engines.GPU_ENGINES
    _patch_gpu_runner(monkeypatch, {})
    results = bench.run_gpu_benchmarks(
        [TINY], ["lstm"], ["forward"],
        ["fastcells-cuda-ops-unsplit", "fastcells-cuda-ops", "keras"], _quick())
    assert [r.engine for r in results] == ["keras", "fastcells-cuda-ops",
                                           "fastcells-cuda-ops-unsplit"]
    before = config.CUDA_SPLIT_MIN_UNITS
    with gpu._unsplit("fastcells-cuda-ops-unsplit"):
        assert config.CUDA_SPLIT_MIN_UNITS > 1 << 40
    with gpu._unsplit("fastcells-cuda-ops"):
        assert config.CUDA_SPLIT_MIN_UNITS == before
    assert config.CUDA_SPLIT_MIN_UNITS == before
    assert cli._parser().parse_args(
        ["bench", "--gpu", "--engines", "fastcells-cuda-ops-unsplit"]).engines == [
        "fastcells-cuda-ops-unsplit"]


@pytest.mark.skipif(not _gpu(), reason="no CUDA GPU")
def test_gpu_cases_on_a_gpu(monkeypatch):
    monkeypatch.setattr(engines, "_unavailable_cache", {})
    ok, missing = bench.available_engines(comparison="gpu")
    results = bench.run_gpu_benchmarks([TINY, bench.Shape("tiny2", 2, 3, 4, 3, layers=2)],
                                       list(bench.CELLS), list(bench.MODES), ok, _quick())
    bad = [(r.workload, r.engine, r.status) for r in results if r.status != "ok"]
    assert not bad, (bad, missing)


# --------------------------------------------------------------------------- torch worker
def test_parse_reply():
    assert torch_worker.parse_reply("some warning from torch\n") is None
    reply = torch_worker.parse_reply(torch_worker.REPLY_PREFIX + '{"ok": true, "times": [1]}')
    assert reply == {"ok": True, "times": [1]}
    with pytest.raises(ValueError, match="malformed"):
        torch_worker.parse_reply(torch_worker.REPLY_PREFIX + "[1, 2]")


def test_worker_reply_to_results(tmp_path):
    path = str(tmp_path / "out.npz")
    np.savez(path, y=np.ones((2, 3)), g0=np.zeros(2), g1=np.ones(4))
    worker = torch_worker.TorchWorker()
    (y, grads), times = worker.parse(
        {"ok": True, "times": [0.5, 0.25], "n_grads": 2, "info": {"torch_threads": 7}}, path)
    assert times == [0.5, 0.25] and y.shape == (2, 3)
    assert [g.shape for g in grads] == [(2,), (4,)]
    assert worker.info == {"torch_threads": 7}
    (y, grads), _ = worker.parse({"ok": True, "times": [1.0], "n_grads": 0}, path)
    assert grads is None
    with pytest.raises(RuntimeError, match="in the torch worker: ValueError: bad"):
        worker.parse({"ok": False, "error": "ValueError: bad"}, path)


def test_inputs_round_trip(tmp_path):
    weights = workloads.make_weights("gru", bench.Shape("s", 2, 3, 4, 5, layers=2))
    x = workloads.make_inputs(TINY)
    path = str(tmp_path / "in.npz")
    torch_worker.save_inputs(path, weights, x)
    w2, x2 = torch_worker.load_inputs(path)
    np.testing.assert_array_equal(x2, x)
    assert len(w2) == 2
    for a, b in zip(sum(weights, []), sum(w2, [])):
        np.testing.assert_array_equal(a, b)


def test_worker_loop_in_process(tmp_path):
    """The worker's request loop, fed in memory (errors come back as replies)."""
    import io
    lines = io.StringIO(json.dumps({"op": "case", "cell": "nope"}) + "\n\n"
                        + json.dumps({"op": "exit"}) + "\n" + "never read\n")
    out = io.StringIO()
    assert torch_worker.main(lines, out) == 0
    replies = [torch_worker.parse_reply(ln) for ln in out.getvalue().splitlines()]
    assert len(replies) == 1 and replies[0]["ok"] is False


@pytest.mark.skipif(not _has_torch(), reason="PyTorch is not installed")
def test_torch_engine_runs_in_a_worker_process():
    settings = _quick()
    with torch_worker.TorchWorker(timeout=120) as worker:
        results = bench.run_layer_benchmarks([TINY], ["lstm"], ["train"], ["keras", "torch"],
                                             settings, torch_worker=worker)
        pid = worker.info["pid"]
        assert pid != os.getpid()
        assert worker.info["flush_denormal"] is True        # as TensorFlow's threads run
        by = {r.engine: r for r in results}
        assert by["torch"].status == "ok", by["torch"].status
        assert len(by["torch"].times) >= 2 and by["torch"].speedup is not None
        assert by["torch"].grad_error < equivalence.TORCH_TOLERANCE["float32"]
        half = _quick()
        half.dtype = "float16"                    # torch_case takes float32/64 only
        with pytest.raises(RuntimeError, match="in the torch worker: KeyError"):   # reported
            worker.run("lstm", TINY, "forward", half)
        (y, grads), _ = worker.run("gru", TINY, "forward", settings)       # ... and alive
        assert y.shape == (3, 4, 5) and grads is None
        assert worker.info["pid"] == pid
    assert worker._proc is None and worker._tmp is None


@pytest.mark.skipif(not _has_torch(), reason="PyTorch is not installed")
def test_worker_timeout_is_an_error():
    worker = torch_worker.TorchWorker(timeout=0.01)
    with pytest.raises(RuntimeError, match="torch worker took more than"):
        worker.run("lstm", TINY, "forward", _quick())
    assert worker._proc is None


def test_report_says_where_torch_ran():
    import io
    stream = io.StringIO()
    machine = dict(cpu="cpu", cores=2, versions={}, torch_worker={"torch_threads": 2},
                   gpu={"name": "H100"})
    bench.write_report(bench.Report(machine=machine), stream)
    text = stream.getvalue()
    assert "torch ran in a worker process of its own, 2 threads" in text
    assert "GPU: {'name': 'H100'}" in text or "H100" in text


def test_nvtx_range_marks_the_block_only_where_torch_sees_a_gpu(monkeypatch):
    """With a torch that sees no GPU the range is a no-op around the block; with one that
    sees a GPU, the block runs between a push of the range's name and a pop (after one probe
    range), the pop also when the block raises. (A stand-in torch: this runs without one.)"""
    import types
    calls = []
    nvtx = types.SimpleNamespace(range_push=lambda name: calls.append(("push", name)),
                                 range_pop=lambda: calls.append("pop"))
    cuda = types.SimpleNamespace(is_available=lambda: False, nvtx=nvtx)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(torch_worker, "_nvtx", None)
    with torch_worker.nvtx_range("fastcells-cuda"):
        calls.append("block")
    assert calls == ["block"]
    assert torch_worker._nvtx_functions() is torch_worker._NO_NVTX

    calls.clear()
    cuda.is_available = lambda: True
    monkeypatch.setattr(torch_worker, "_nvtx", None)
    with pytest.raises(KeyError):
        with torch_worker.nvtx_range("fastcells-cuda"):
            calls.append("block")
            raise KeyError("inside the range")
    assert calls == [("push", "fastcells-nvtx-probe"), "pop", ("push", "fastcells-cuda"),
                     "block", "pop"]


def test_cli_flags_reach_settings():
    args = cli._parser().parse_args(["bench", "--torch-in-process", "--tf32", "--repeats",
                                     "2", "--engines", "fastcells-cuda,torch-cudnn"])
    s = cli._settings(args)
    assert s.torch_isolated is False and s.allow_tf32 is True and s.repeats == 2
    assert s.torch_flush_denormal is True
    assert cli._settings(cli._parser().parse_args(
        ["bench", "--torch-denormals"])).torch_flush_denormal is False
    assert args.engines == ["fastcells-cuda", "torch-cudnn"]
    assert cli._settings(cli._parser().parse_args(["bench"])).torch_isolated is True


def test_cpu_comparison_never_imports_torch(monkeypatch):
    """machine_info and the torch engine's availability check find torch without importing
    it: the CPU comparison's process must not load torch next to TensorFlow."""
    import builtins
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise AssertionError("torch imported in the benchmark process")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)
    monkeypatch.setattr(engines, "_unavailable_cache", {})
    info = bench.machine_info()
    assert info["versions"]["torch"] == (importlib.metadata.version("torch")
                                         if _has_torch() else None)
    assert (bench.engine_unavailable("torch") is None) == _has_torch()


# --------------------------------------------------------------------------- timing
class _SharedMachine:
    """A simulated clock with engines of fixed cost that all run twice as slowly during
    one stretch of time: a core lost to another tenant, as on the shared machines."""

    def __init__(self, slow_from, slow_to):
        self.now = 0.0
        self.slow = (slow_from, slow_to)
        self.log = []

    def engine(self, name, cost):
        def timer(k):
            times = []
            for _ in range(k):
                factor = 2.0 if self.slow[0] <= self.now < self.slow[1] else 1.0
                self.now += cost * factor
                times.append(cost * factor)
                self.log.append(name)
            return times
        return timer


def test_interleaved_timing_puts_a_slow_stretch_on_every_engine():
    """Timed one after the other, a stretch of slow machine falls on one engine and its
    ratio is off by 2x; timed in alternation, the ratio of medians stays the true one."""
    def ratio(interleave):
        m = _SharedMachine(slow_from=0.6, slow_to=1.4)   # during the second engine's turn
        slow, fast = m.engine("slow", 0.010), m.engine("fast", 0.004)
        kw = dict(repeats=7, warmup=1, max_seconds=None, min_seconds=0.6)
        if interleave:
            t_slow, t_fast = timing.time_interleaved([slow, fast], **kw)
        else:
            t_slow = timing.time_interleaved([slow], **kw)[0]
            t_fast = timing.time_interleaved([fast], **kw)[0]
        return np.median(t_slow) / np.median(t_fast), m.log

    sequential, _ = ratio(False)
    assert sequential == pytest.approx(1.25)            # 2.5 / 2: the stretch hit "fast"
    interleaved, log = ratio(True)
    assert interleaved == pytest.approx(2.5)
    # 2 calls of "fast" per call of "slow" in every round (the rounds' order turns, so
    # runs of up to 4), from the first round on
    calls = "".join("s" if name == "slow" else "f" for name in log[2:])
    assert "sss" not in calls and "fffff" not in calls
    assert calls.count("f") == 2 * calls.count("s")


def test_interleaved_timing_stops_and_errors():
    m = _SharedMachine(0.0, 0.0)
    a, b = m.engine("a", 0.001), m.engine("b", 0.003)
    ta, tb = timing.time_interleaved([a, b], repeats=5, warmup=0, min_seconds=0.0)
    assert len(ta) >= 5 and len(tb) >= 5
    # max_seconds: stops once the slowest engine spent it, with min_repeats calls each
    ta, tb = timing.time_interleaved([a, b], repeats=100, warmup=0, max_seconds=0.03,
                                    min_repeats=3)
    assert 0.03 <= sum(tb) < 0.03 + 0.003 * 2 and len(tb) < 100
    # max_repeats bounds every engine
    ta, tb = timing.time_interleaved([a, b], repeats=50, warmup=0, max_repeats=20)
    assert len(ta) <= 20 and len(tb) <= 20 and max(len(ta), len(tb)) == 20
    # a timer that fails is dropped and reported; the others go on
    calls = []

    def broken(k):
        calls.append(k)
        if len(calls) > 2:
            raise RuntimeError("device lost")
        return [0.002] * k

    seen = []
    ta, tbroken = timing.time_interleaved([a, broken], repeats=20, warmup=1,
                                         on_error=lambda i, exc: seen.append((i, str(exc))))
    assert seen == [(1, "device lost")] and len(ta) >= 20 and len(tbroken) == 1
    with pytest.raises(RuntimeError, match="device lost"):
        timing.time_interleaved([broken], repeats=3, warmup=0)
    # one engine: one call per round, as time_calls has always timed
    counter = []
    assert len(timing.time_calls(lambda: counter.append(1), repeats=4, warmup=2)) == 4
    assert len(counter) == 6


def test_worker_keeps_a_case_open_for_interleaved_timing(tmp_path):
    """The worker protocol's open / time / close, fed in memory (``torch_case`` stubbed, so
    no torch needed)."""
    import io
    made = []

    def fake_case(cell, shape, mode, weights, x, threads):
        made.append(cell)
        return (lambda: made.append("call")), (lambda out: (np.zeros((2, 3)), None))

    inputs, outputs = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
    torch_worker.save_inputs(inputs, workloads.make_weights("lstm", TINY),
                             workloads.make_inputs(TINY))
    shape = dict(batch=3, time=4, features=2, units=5, layers=1, return_sequences=True)
    case = dict(cell="lstm", mode="forward", inputs=inputs, outputs=outputs, shape=shape)
    requests = [dict(op="time", calls=2), dict(op="open", **case), dict(op="time", calls=3),
                dict(op="close"), dict(op="time", calls=1), dict(op="nope")]
    lines = io.StringIO("".join(json.dumps(r) + "\n" for r in requests))
    out = io.StringIO()
    real = torch_worker.torch_case
    torch_worker.torch_case = fake_case
    try:
        torch_worker.main(lines, out)
    finally:
        torch_worker.torch_case = real
    replies = [torch_worker.parse_reply(ln) for ln in out.getvalue().splitlines()]
    assert [r["ok"] for r in replies] == [False, True, True, True, False, False]
    assert "no open case" in replies[0]["error"] and "no open case" in replies[4]["error"]
    assert replies[1]["times"] == [] and replies[1]["n_grads"] == 0
    assert len(replies[2]["times"]) == 3
    assert made == ["lstm", "call", "call", "call", "call"]      # first call, then 3 timed
    assert "unknown op" in replies[5]["error"]


def test_layer_and_fit_benchmarks_time_their_engines_together(monkeypatch):
    """The CPU comparison times all engines of a workload (and both IMDB models) in one
    interleaved run, each still checked against the built-in layer."""
    seen = []
    real = timing.time_interleaved

    def spy(timers, *args, **kwargs):
        seen.append(len(timers))
        return real(timers, *args, **kwargs)

    monkeypatch.setattr(timing, "time_interleaved", spy)
    settings = _quick()
    results = bench.run_layer_benchmarks([TINY], ["gru"], ["train"],
                                         ["keras", "fastcells-cpu"], settings)
    assert seen == [2]
    by = {r.engine: r for r in results}
    assert all(r.status == "ok" and len(r.times) >= settings.repeats for r in results)
    assert by["fastcells-cpu"].baseline_median == by["keras"].median
    assert by["fastcells-cpu"].grad_error < 1e-5

    seen.clear()
    fit = bench.run_fit_benchmarks(["lstm"], ["keras", "fastcells-cpu"], settings,
                                   batch=4, time_steps=6)
    assert seen == [2]
    assert [r.status for r in fit] == ["ok", "ok"]
    assert all(len(r.times) >= settings.fit_batches for r in fit)
    # a training step is compared too: its loss and its gradients
    assert fit[0].loss_error == fit[0].grad_error == 0.0
    assert fit[1].loss_error <= 1e-5 and 0.0 < fit[1].grad_error <= 1e-4
    assert fit[1].speedup == pytest.approx(fit[0].median / fit[1].median)


def test_fit_benchmark_and_report_follow_the_run_dtype():
    """``--dtype float64`` builds the IMDB models in float64 (the built-in and the fastcells
    one then agree to float64 rounding, checked against float64's bound) and the report says
    which dtype it measured."""
    import io
    settings = _quick()
    settings.dtype = "float64"
    model = cpu.build_imdb_model("fastcells-cpu", "gru", 6, vocab=50, dtype="float64")
    assert {w.dtype for w in model.get_weights()} == {np.dtype(np.float64)}
    fit = bench.run_fit_benchmarks(["gru"], ["keras", "fastcells-cpu"], settings, batch=4,
                                   time_steps=6)
    assert [r.status for r in fit] == ["ok", "ok"]
    assert fit[1].max_error <= 1e-13
    assert fit[1].loss_error <= 1e-13 and fit[1].grad_error <= 1e-13
    stream = io.StringIO()
    bench.write_report(bench.Report(machine=dict(cpu="cpu", cores=2, versions={}),
                                    settings=dict(dtype="float64")), stream)
    assert "cores; float64; fastcells threads" in stream.getvalue()


def test_speedup_spread_pairs_the_engines_round_by_round():
    """Each round's calls are paired: a machine that slows down for a stretch moves both
    engines' times in that stretch, and the paired speed-ups stay at the true ratio, while
    either engine's own times spread over 2x."""
    m = _SharedMachine(slow_from=0.3, slow_to=0.6)
    results = [reporting.Result("s", "lstm", "train", "keras", 10),
               reporting.Result("s", "lstm", "train", "fastcells-cpu", 10)]
    timing.time_together(results, list(zip(results, [m.engine("keras", 0.010),
                                                    m.engine("fast", 0.004)])),
                        dict(repeats=7, warmup=1, min_seconds=0.6))
    keras, fast = results
    assert max(fast.times) == pytest.approx(2 * min(fast.times))      # the slow stretch
    assert keras.speedup_range is None and keras.baseline_median == keras.median
    lo, hi = fast.speedup_range
    assert lo <= fast.speedup <= hi
    assert lo == pytest.approx(2.5, rel=0.05) and hi == pytest.approx(2.5, rel=0.05)
    # the rounds record every timed call once
    m = _SharedMachine(0.0, 0.0)
    rounds = []
    times = timing.time_interleaved([m.engine("a", 0.01), m.engine("b", 0.003)], repeats=5,
                                   warmup=1, rounds=rounds)
    assert all(set(rd) == {0, 1} for rd in rounds)
    for i in (0, 1):
        assert sum((rd[i] for rd in rounds), []) == times[i]


def test_report_shows_the_spread_of_the_speedup():
    import io
    rows = [reporting.Result("imdb", "gru", "forward", "keras", 500, times=[0.02]),
            reporting.Result("imdb", "gru", "forward", "fastcells-cpu", 500, times=[0.008],
                         baseline_median=0.02, speedup_range=(2.31, 2.74))]
    rows[0].baseline_median = 0.02
    stream = io.StringIO()
    bench.write_report(bench.Report(layers=rows), stream)
    text = stream.getvalue()
    assert "middle half" in text and "2.31-2.74x" in text and "2.50x" in text


@pytest.mark.parametrize("cell", bench.CELLS)
@pytest.mark.parametrize("shape", ["imdb", "stacked"])
def test_product_flops_are_two_per_weight_per_row_and_step(cell, shape):
    """The floor's products, counted from the weights every engine gets: each step multiplies
    every row by every weight of W and U once (a multiply-add, 2 FLOP) in the forward, and
    the backward does it twice more (the input and state gradients, the weight gradients)."""
    s = bench.SHAPES[shape]
    weights = workloads.make_weights(cell, s)
    per_step = sum(W.size + U.size for W, U, _ in weights)
    assert workloads.product_flops(cell, s, "forward") == 2 * s.batch * s.time * per_step
    assert workloads.product_flops(cell, s, "train") == 3 * 2 * s.batch * s.time * per_step


@pytest.mark.parametrize("cell", bench.CELLS)
def test_activation_count_is_what_the_reference_evaluates(cell, monkeypatch):
    """The floor's activations, counted where the NumPy reference evaluates tanh and sigmoid
    (its backward takes the derivatives from the outputs and evaluates none)."""
    import reference
    count = [0]

    def counting(f):
        def g(x):
            count[0] += np.size(x)
            return f(x)
        return g
    for name in ("tanh", "sigmoid"):
        f, df = reference.ACTS[name]
        monkeypatch.setitem(reference.ACTS, name, (counting(f), df))
    s = bench.Shape("probe", 3, 5, 4, 6)
    rng = np.random.default_rng(0)
    (W, U, b), = workloads.make_weights(cell, s, dtype="float64")
    x = rng.standard_normal((s.batch, s.time, s.features))
    states = [np.zeros((s.batch, s.units))] * (2 if cell == "lstm" else 1)
    getattr(reference, f"{cell}_forward")(x, W, U, b, *states)
    assert count[0] == workloads.activation_count(cell, s, "forward")
    count[0] = 0
    getattr(reference, f"{cell}_backward")(x, W, U, b, *states,
                                           d_outputs=np.ones((s.batch, s.time, s.units)))
    assert count[0] == workloads.activation_count(cell, s, "train")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_measured_rates_are_rates_of_correct_results(dtype):
    """The peak behind the floor: the packed product and tanh measured on every thread,
    each checked against NumPy before its rate is believed."""
    from fastcells.cpu import _rates
    for threads in (1, 2):
        flops = _rates.product_rate(dtype, threads, seconds=0.002, rounds=1)
        tanh = _rates.activation_rate(dtype, threads, seconds=0.002, rounds=1)
        # a rate, not a speed to meet (timing never lives in a test): finite and positive
        assert np.isfinite(flops) and flops > 0 and np.isfinite(tanh) and tanh > 0
    with pytest.raises(ValueError, match="threads"):
        _rates.product_rate(dtype, 0)


def test_report_and_json_give_the_floor_of_each_workload(tmp_path):
    """With a measured peak, each table ends with the floor (its time, the speed-up over the
    built-in layer it would give, the work behind it) and the JSON keeps it."""
    import io
    s = bench.SHAPES["imdb"]
    peak = dict(flops_per_s=2e11, tanh_per_s=5e9, dtype="float32", threads=2)
    rows = [reporting.Result("imdb", "lstm", "train", "keras", s.time, times=[0.08]),
            reporting.Result("imdb", "lstm", "train", "fastcells-cpu", s.time, times=[0.03],
                         baseline_median=0.08)]
    floor = workloads.product_flops("lstm", s, "train") / 2e11 + 5 * 128 * 500 * 32 / 5e9
    assert workloads.compute_floor("lstm", s, "train", peak) == pytest.approx(floor)
    assert workloads.compute_floor("lstm", s, "train", None) is None
    report = bench.Report(layers=rows, peak=peak)
    stream = io.StringIO()
    bench.write_report(report, stream)
    text = stream.getvalue()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("floor "))
    assert f"{floor * 1e3:.2f}" in line and f"{0.08 / floor:.2f}x" in line
    assert "3.15 GFLOP + 10.2 M tanh" in line
    assert "200 GFLOP/s (the packed product), 5.0 G tanh/s" in text
    path = tmp_path / "r.json"
    bench.save_json(path, report)
    data = json.loads(path.read_text())
    assert data["peak"] == peak
    assert data["floors"] == [dict(shape="imdb", cell="lstm", mode="train",
                                   flops=workloads.product_flops("lstm", s, "train"),
                                   tanh=5 * 128 * 500 * 32, floor_s=pytest.approx(floor))]
    # no peak, no floor row
    stream = io.StringIO()
    bench.write_report(bench.Report(layers=rows), stream)
    assert "floor" not in stream.getvalue()


def test_the_peak_keeps_the_better_rate_of_a_run(monkeypatch):
    """Measured at the start and the end of a run, each rate is the better of the two: a
    stretch of other load on the cores must not lower the floor."""
    from fastcells.cpu import _rates
    monkeypatch.setattr(_rates, "product_rate", lambda dtype, threads: 1e11)
    monkeypatch.setattr(_rates, "activation_rate", lambda dtype, threads: 4e9)
    first = workloads.measure_peak("float64", 2)
    assert first == dict(flops_per_s=1e11, tanh_per_s=4e9, dtype="float64", threads=2)
    earlier = dict(first, flops_per_s=2e11, tanh_per_s=1e9)
    assert workloads.measure_peak("float64", 2, previous=earlier) == dict(
        first, flops_per_s=2e11, tanh_per_s=4e9)


@pytest.mark.parametrize("no_floor", [False, True])
def test_cpu_bench_command_reports_the_floor(tmp_path, capsys, no_floor):
    """``python -m fastcells bench`` end to end on the smallest workload: the table ends with
    the floor and the JSON keeps the rates behind it, unless ``--no-floor``."""
    path = tmp_path / "cpu.json"
    argv = ["bench", "--shapes", "streaming", "--cells", "simple_rnn", "--engines",
            "keras,fastcells-cpu", "--no-fit", "--no-cold-start", "--no-progress",
            "--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--json", str(path)]
    assert cli.main(argv + (["--no-floor"] if no_floor else [])) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert [r["status"] for r in data["layers"]] == ["ok", "ok"]
    if no_floor:
        assert data["peak"] is None and data["floors"] == [] and "floor" not in out
        return
    assert data["peak"]["flops_per_s"] > 0 and data["peak"]["tanh_per_s"] > 0
    floor, = data["floors"]
    # B=1 T=100 D=64 H=128: 2 FLOP x (64 + 128) x 128 weights a step, one tanh a unit a step
    flops, tanh = 2 * 100 * (64 + 128) * 128, 100 * 128
    assert (floor["flops"], floor["tanh"]) == (flops, tanh)
    assert floor["floor_s"] == pytest.approx(flops / data["peak"]["flops_per_s"]
                                             + tanh / data["peak"]["tanh_per_s"])
    assert "  floor " in out and "G tanh/s" in out


# --------------------------------------------------------------------------- Markdown
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_report():
    rows = [reporting.Result("imdb", "lstm", "train", "keras", 500, times=[0.081, 0.0795],
                             max_error=0.0, grad_error=0.0),
            reporting.Result("imdb", "lstm", "train", "fastcells-cpu", 500,
                             times=[0.0301234567, 0.029], max_error=2e-7, grad_error=3e-7,
                             speedup_range=(2.5, 2.9)),
            reporting.Result("imdb", "gru", "train", "keras", 500, times=[0.09]),
            reporting.Result("imdb", "gru", "train", "fastcells-cpu", 500, times=[0.03],
                             status="mismatch: outputs 1e-3 > 1e-5")]
    for r in rows:
        r.baseline_median = rows[0 if r.cell == "lstm" else 2].median
    fit = [reporting.FitResult("lstm", "keras", 128, 500, times=[0.2]),
           reporting.FitResult("lstm", "fastcells-cpu", 128, 500, times=[0.08],
                               baseline_median=0.2)]
    cold = [reporting.ColdResult("lstm", "fastcells-cpu", "warm", (16, 50, 16, 32), 7.1,
                                 0.9, 0.01)]
    return reporting.Report(layers=rows, fit=fit, cold=cold,
                            machine=dict(cpu="Some CPU", cores=2, date="2026-01-02T03:04"),
                            settings=dict(dtype="float32", backend="tensorflow"),
                            peak=dict(threads=2, dtype="float32", flops_per_s=1e11,
                                      tanh_per_s=3e9))


def test_json_reads_back_into_the_same_tables(tmp_path):
    from fastcells.bench import markdown
    report = _small_report()
    path = tmp_path / "run.json"
    bench.save_json(path, report)
    back = markdown.load_json(path)
    assert back.layers[1].times == [0.03012, 0.029]         # 4 significant digits kept
    assert back.layers[1].speedup_range == (2.5, 2.9) and back.cold[0].shape == (16, 50, 16, 32)
    assert markdown.markdown(back) == markdown.markdown(report)
    text = markdown.markdown(back)
    assert "Some CPU, 2 cores, 2026-01-02" in text
    assert "| imdb (B=128 T=500 D=32 H=32, 1 layer, last output) | training step | " \
           "2.71x |" in text                    # 0.08025 / 0.0296; the GRU is a mismatch
    assert "mismatch: outputs 1e-3" in text and "2.50x" in text


def test_markdown_blocks_are_rewritten_in_place(tmp_path):
    from fastcells.bench import markdown
    md = tmp_path / "perf.md"
    md.write_text("# Title\n\nprose before\n")
    markdown.write_into(str(md), "run.json", _small_report())
    first = md.read_text()
    assert first.startswith("# Title\n\nprose before\n\n<!-- begin tables")
    assert markdown.block_in(str(md)) == markdown.markdown(_small_report())
    md.write_text(first.replace("<!-- end tables -->", "<!-- end tables -->\nprose after\n")
                  + "<!-- begin summary -->\nstale\n<!-- end summary -->\n")
    markdown.write_into(str(md), "run.json", _small_report())
    again = md.read_text()
    assert "prose after" in again and "stale" not in again and again.count("begin tables") == 1
    assert markdown.block_in(str(md), "summary") == markdown.summary(_small_report())


def test_the_docs_tables_are_those_of_the_committed_run():
    """docs/performance.md and the README carry the tables of docs/performance.json; after a
    new run, `python -m fastcells report docs/performance.json --markdown docs/performance.md
    --markdown README.md` writes them again."""
    from fastcells.bench import markdown
    report = markdown.load_json(os.path.join(REPO, "docs", "performance.json"))
    assert report.layers and all(r.times for r in report.layers)
    for md, name in (("docs/performance.md", "tables"), ("README.md", "summary")):
        got = markdown.block_in(os.path.join(REPO, md), name)
        assert got == markdown.BLOCKS[name](report), f"{md} differs from the JSON's {name}"
    assert report.machine["cpu"] in markdown.block_in(os.path.join(REPO, "README.md"),
                                                      "summary")


def test_bench_writes_the_tables_of_the_json_it_saves(tmp_path):
    """`bench --json F --markdown M` writes into M the tables that `report F` writes: those
    of the times as saved (4 digits), which the docs test compares with."""
    import argparse

    from fastcells.bench import markdown
    report = _small_report()
    report.layers[1].times = [0.026350965]     # 0.02635 once saved: another last digit
    path, md = tmp_path / "run.json", tmp_path / "perf.md"
    bench.save_json(path, report)
    cli._save_views(argparse.Namespace(json=str(path), markdown=[str(md)], plot=None), report)
    assert markdown.block_in(str(md)) == markdown.markdown(markdown.load_json(path))
    assert markdown.markdown(markdown.load_json(path)) != markdown.markdown(report)


def test_report_command(tmp_path, capsys):
    bench.save_json(tmp_path / "run.json", _small_report())
    assert cli.main(["report", str(tmp_path / "run.json")]) == 0
    assert "imdb · LSTM · training" in capsys.readouterr().out
    md = tmp_path / "out.md"
    assert cli.main(["report", str(tmp_path / "run.json"), "--markdown", str(md)]) == 0
    assert "<!-- end tables -->" in md.read_text()
    assert cli.main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------- the machine
def _cpuinfo_file(tmp_path, vendor, family, model, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
                    f"model\t\t: {model}\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nvendor_id\t: other\n")
    return str(path)


@pytest.mark.parametrize("vendor,family,model,flags,core,isa", [
    ("AuthenticAMD", 25, 1, "fma avx avx2", "Zen 3", "AVX2 + FMA"),
    ("AuthenticAMD", 25, 17, "fma avx avx2 avx512f", "Zen 4", "AVX-512"),
    ("AuthenticAMD", 26, 2, "fma avx avx2 avx512f", "Zen 5", "AVX-512"),
    ("GenuineIntel", 6, 143, "avx2 avx512f amx_tile", None, "AVX-512 + AMX"),
    ("GenuineIntel", 6, 60, "avx", None, "AVX"),
])
def test_the_report_names_the_cpu_by_family_model_core_and_isa(tmp_path, vendor, family,
                                                                model, flags, core, isa):
    from fastcells.bench import machine
    fields = machine._cpuinfo(_cpuinfo_file(tmp_path, vendor, family, model, flags))
    ident = machine.cpu_identity(fields)
    assert ident == dict(vendor=vendor, family=family, model=model, core=core, isa=isa)
    text = machine.describe_cpu(dict(cpu="Some CPU", cpu_identity=ident))
    assert text.startswith(f"Some CPU (family {family} model {model}, ") and isa in text
    assert (core in text) if core else "Zen" not in text
    assert machine.describe_cpu(dict(cpu="Some CPU")) == "Some CPU"   # an older JSON
