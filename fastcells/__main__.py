"""Command line of fastcells.

    python -m fastcells bench             # tables: us per time step, speed-up, max error
    python -m fastcells bench --quick     # a small subset, under two minutes
    python -m fastcells bench --json out.json --plot out.png
    python -m fastcells report out.json   # the tables of a saved run (--markdown, --plot)
    python -m fastcells bench --gpu       # CUDA engines vs cuDNN and Keras on torch (no TF)
    python -m fastcells demo              # train the IMDB-style model a few batches
    python -m fastcells warmup            # compile every CPU kernel into the kernel cache

Without TensorFlow, ``bench`` runs the GPU comparison (``fastcells.bench.gpu``); the package
then starts Keras on the torch backend (see ``fastcells/_startup.py``).

The measuring is done by the :mod:`fastcells.bench` package; this module only parses flags
and prints.
"""
import argparse
import contextlib
import os
import sys
import time

# before TensorFlow is imported anywhere (fastcells imports keras, keras imports TF)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# on a GPU, TensorFlow would otherwise reserve all of it and leave the CUDA kernels nothing
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


@contextlib.contextmanager
def _quiet_stderr(enabled=True):
    """Silence file descriptor 2 (TensorFlow's C++ start-up lines ignore the log level)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_quietly(verbose):
    with _quiet_stderr(not verbose):
        import keras  # noqa: F401  (TensorFlow too, where it is Keras's backend)

        import fastcells  # noqa: F401
    if not verbose:
        import logging
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)} "
                                             f"or 'all'")
        return items
    return parse


def _each_backend(argv):
    """``bench --backend all``: the CPU comparison once per installed Keras backend, each in
    a process of its own (Keras picks its backend once per process)."""
    import subprocess

    from fastcells import _startup
    backends = [b for b in _startup.BACKENDS if _startup.module_found(b)]
    rest = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--backend":
            skip = True
        elif not a.startswith("--backend="):
            rest.append(a)
    worst = 0
    for backend in backends:
        cmd = [sys.executable, "-m", "fastcells"] + _suffixed(rest, backend)
        cmd += ["--backend", backend]
        print(f"\n=== Keras backend: {backend} ===", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        worst = max(worst, subprocess.run(cmd, env=env).returncode)
    return worst


def _suffixed(argv, backend):
    """``argv`` with the --json and --plot file names ending in ``-<backend>``."""
    out = list(argv)
    for i, a in enumerate(out):
        for flag in ("--json", "--plot", "--markdown"):     # one file per backend
            if a == flag and i + 1 < len(out):
                root, ext = os.path.splitext(out[i + 1])
                out[i + 1] = f"{root}-{backend}{ext}"
            elif a.startswith(flag + "="):
                root, ext = os.path.splitext(a.split("=", 1)[1])
                out[i] = f"{flag}={root}-{backend}{ext}"
    return out


def _parser():
    from fastcells import _startup, bench
    from fastcells.bench import engines as eng
    from fastcells.bench import gpu
    p = argparse.ArgumentParser(prog="python -m fastcells",
                                description="fastcells: benchmarks, a demo and model conversion")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time fastcells against the built-in Keras layers",
                       description="Time fastcells against the built-in Keras layers (and "
                       "PyTorch when installed) on this machine. Prints one table per "
                       "workload: microseconds per time step, speed-up over the built-in "
                       "layer, max error against it.")
    d = bench.Settings()
    default_shapes = [n for n, s in bench.SHAPES.items() if not s.heavy]
    b.add_argument("--quick", action="store_true",
                   help="imdb shape only, fewer repeats, model.fit and cold start for the "
                        "LSTM only (1-1.5 minutes on 2 cores); with --gpu: imdb and "
                        "streaming")
    b.add_argument("--shapes", type=_csv(list(bench.SHAPES)), default=None,
                   help=f"comma-separated workloads from {', '.join(bench.SHAPES)} or 'all' "
                        f"(default: {','.join(default_shapes)})")
    b.add_argument("--heavy", action="store_true",
                   help="add the heavy workloads (" + ", ".join(
                       n for n, s in bench.SHAPES.items() if s.heavy) + ")")
    b.add_argument("--cells", type=_csv(bench.CELLS), default=None,
                   help="comma-separated cells (default: all)")
    b.add_argument("--modes", type=_csv(bench.MODES), default=None,
                   help="forward (inference), train (forward+backward); default both")
    b.add_argument("--engines", type=_csv(list(eng.ENGINES)), default=None,
                   help=f"comma-separated engines from {', '.join(eng.CPU_ENGINES)} (with "
                        f"--gpu: {', '.join(eng.GPU_ENGINES)}, and on request "
                        f"{', '.join(eng.GPU_OPTIONAL_ENGINES)}) (default: every one "
                        f"available here; {bench.BASELINE} always runs; what each runs: "
                        f"docs/benchmarks.md)")
    for flag, kind, what in (
            ("repeats", int, "timed calls per case at least, median reported"),
            ("warmup", int, "untimed calls after the first one"),
            ("max_seconds", float, "time budget per case, fewer repeats when slow"),
            ("min_seconds", float, "a fast case is repeated until this much time was spent"),
            ("max_repeats", int, "most timed calls per case")):
        quick = (f", --quick {bench.quick_settings().repeats}" if flag == "repeats" else "")
        b.add_argument("--" + flag.replace("_", "-"), type=kind, default=None,
                       help=f"{what} (default {getattr(d, flag)}{quick})")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    b.add_argument("--threads", type=int, default=None,
                   help="fastcells.config.NUM_THREADS for the CPU kernels")
    b.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the PyTorch engine")
    b.add_argument("--torch-in-process", action="store_true",
                   help="run the PyTorch engine in this process, next to TensorFlow and the "
                        "kernels (default: a worker process of its own)")
    b.add_argument("--torch-denormals", action="store_true",
                   help="let PyTorch's threads compute with denormal floats (default: "
                        "flushed to zero, as TensorFlow and the kernels run; with denormals "
                        "the IMDB-shape LSTM training step of torch takes 5x longer)")
    b.add_argument("--gpu", action="store_true",
                   help="the GPU comparison: the fastcells CUDA engines against cuDNN "
                        "(torch.nn) and the built-in Keras layers on the torch backend, on "
                        "torch CUDA tensors; no TensorFlow needed (the default where "
                        "TensorFlow is not installed and a GPU is). Engines: "
                        + ", ".join(eng.GPU_ENGINES) + "; shapes by default: "
                        + ",".join(gpu.GPU_SHAPES))
    b.add_argument("--backend", choices=_startup.BACKENDS + ("all",), default=None,
                   help="the Keras backend of the CPU comparison: fastcells and the built-in "
                        "layers both run on it (default: Keras's backend, KERAS_BACKEND); "
                        "'all' runs the comparison once per installed backend, each in a "
                        "process of its own (--json/--plot files get the backend's name)")
    b.add_argument("--tf32", action="store_true",
                   help="GPU comparison: let cuDNN and torch matmuls use TF32 (default off)")
    b.add_argument("--no-fit", action="store_true", help="skip the model.fit workload")
    b.add_argument("--fit-batches", type=int, default=None,
                   help=f"timed train_on_batch calls (default {d.fit_batches})")
    b.add_argument("--no-floor", action="store_true",
                   help="skip measuring the packed product's and tanh's rates (the "
                        "'floor' row of each table, about a second)")
    b.add_argument("--no-cold-start", action="store_true",
                   help="skip the first-call measurement in a fresh process")
    b.add_argument("--cold", action="store_true",
                   help="also measure the first call with an empty numba cache (compiles "
                        "every kernel)")
    b.add_argument("--json", metavar="PATH", help="save results and machine info as JSON")
    b.add_argument("--plot", metavar="PATH", help="save a PNG bar chart (needs matplotlib)")
    b.add_argument("--markdown", metavar="PATH", action="append",
                   help="rewrite the generated Markdown blocks of PATH (its 'tables' and "
                        "'summary' marker lines; the tables are appended where it has "
                        "none); may be given more than once")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")

    m = sub.add_parser("demo", help="train the IMDB-style model on synthetic data",
                       description="Train Embedding -> fastcells.LSTM -> Dense on synthetic "
                                   "IMDB-style data for a few batches and print the loss.")
    m.add_argument("--batches", type=int, default=5)
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--seq-len", type=int, default=500)
    m.add_argument("--units", type=int, default=32)
    m.add_argument("--cell", choices=("lstm", "gru", "simple_rnn"), default="lstm")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")

    c = sub.add_parser("convert", help="turn a .keras file's recurrent layers into fastcells "
                       "layers or back into the built-in ones",
                       description="Write OUT, the .keras model IN with every LSTM, GRU and "
                       "SimpleRNN layer turned into the fastcells layer (--to fastcells) or "
                       "into the built-in Keras layer (--to keras: the file then loads where "
                       "fastcells is not installed). Weights and optimizer state are copied "
                       "unchanged.")
    c.add_argument("src", metavar="IN", help="a .keras file")
    c.add_argument("dst", metavar="OUT", help="the .keras file to write")
    c.add_argument("--to", required=True, choices=("fastcells", "keras"),
                   help="the kind of layer to convert to")
    c.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")

    r = sub.add_parser("report", help="print, chart or write as Markdown the tables of a "
                       "saved bench run",
                       description="Read the JSON of `bench --json` and print its tables; "
                       "with --markdown write them between the marker lines of a Markdown "
                       "file, with --plot draw its chart.")
    r.add_argument("json", metavar="JSON", help="a file written by bench --json")
    r.add_argument("--markdown", metavar="PATH", action="append",
                   help="a Markdown file whose generated blocks to rewrite (more than once "
                        "for several files)")
    r.add_argument("--plot", metavar="PATH", help="save a PNG bar chart (needs matplotlib)")
    r.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")

    from fastcells import warmup
    w = sub.add_parser("warmup", help="compile every CPU kernel into the kernel cache",
                       description="Compile the CPU kernels of every cell, dtype and kernel "
                       "path into Numba's on-disk cache (NUMBA_CACHE_DIR when set), so that "
                       "later processes start without compiling. Each job runs in a process "
                       "of its own, --jobs at a time.")
    w.add_argument("--cells", type=_csv(warmup.CELLS), default=list(warmup.CELLS),
                   help="comma-separated, or all (default: all)")
    w.add_argument("--dtypes", type=_csv(warmup.DTYPES), default=list(warmup.DTYPES),
                   help="comma-separated, or all (default: all)")
    w.add_argument("--jobs", type=int, default=None, help="compile processes at once "
                   "(default: the number of CPUs)")
    w.add_argument("--no-progress", action="store_true", help="no progress lines")
    w.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")
    return p


def warmup_command(args):
    """``python -m fastcells warmup``: compile every kernel into the on-disk cache."""
    from fastcells import warmup
    if args.jobs is not None and args.jobs < 1:
        print(f"python -m fastcells warmup: error: --jobs must be at least 1, got {args.jobs}",
              file=sys.stderr)
        return 2
    try:
        warmup.warmup(args.cells, args.dtypes, jobs=args.jobs, progress=not args.no_progress)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def convert_command(args):
    from fastcells import convert
    try:
        n = convert.convert_file(args.src, args.dst, args.to)
    except (ValueError, OSError) as e:
        print(f"python -m fastcells convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {n} recurrent layer(s) converted to {args.to}")
    return 0


def _settings(args):
    """The :class:`fastcells.bench.Settings` of the command line's flags."""
    from fastcells import bench, config

    if args.threads:
        config.NUM_THREADS = args.threads
    settings = bench.quick_settings() if args.quick else bench.Settings()
    for flag, field in (("repeats", "repeats"), ("warmup", "warmup"),
                        ("max_seconds", "max_seconds"), ("min_seconds", "min_seconds"),
                        ("max_repeats", "max_repeats"), ("fit_batches", "fit_batches"),
                        ("torch_threads", "torch_threads")):
        if getattr(args, flag) is not None:
            setattr(settings, field, getattr(args, flag))
    settings.seed, settings.dtype = args.seed, args.dtype
    settings.torch_isolated = not args.torch_in_process
    settings.torch_flush_denormal = not args.torch_denormals
    settings.allow_tf32 = args.tf32
    return settings


def bench_command(args, argv):
    """``python -m fastcells bench``: run, print the tables, save JSON / plot."""
    import keras

    from fastcells import _startup, bench
    from fastcells.bench import engines as eng
    from fastcells.bench import timing, torch_worker, workloads

    if args.backend == "all" and not args.gpu:
        return _each_backend(argv)
    if args.backend is not None and args.backend != keras.backend.backend():
        print(f"python -m fastcells bench: error: --backend {args.backend} but Keras already "
              f"runs on '{keras.backend.backend()}' in this process (Keras picks its backend "
              f"when it is imported: run `python -m fastcells bench --backend "
              f"{args.backend}`, or set KERAS_BACKEND={args.backend})", file=sys.stderr)
        return 2
    tf_found = _startup.module_found("tensorflow")
    # asked only where it decides: the question imports torch, which the CPU comparison
    # keeps out of this process (it runs torch.nn in a worker process)
    gpu_found = not args.gpu and not tf_found and args.backend is None and \
        eng.cuda_gpu_found()
    path, note = eng.choose_bench(args.gpu, tf_found, keras.backend.backend(), gpu_found,
                                  args.backend)
    if path == "gpu":
        return gpu_bench_command(args, note)
    settings = _settings(args)

    if args.shapes is not None:
        shapes = args.shapes
    elif args.quick:
        shapes = ["imdb"]
    else:
        shapes = [n for n, s in bench.SHAPES.items() if not s.heavy]
    if args.heavy:
        shapes += [n for n, s in bench.SHAPES.items() if s.heavy and n not in shapes]
    cells = args.cells or list(bench.CELLS)
    modes = args.modes or list(bench.MODES)
    requested = args.engines or list(eng.CPU_ENGINES)
    if bench.BASELINE not in requested:          # every ratio is taken against it
        requested = [bench.BASELINE] + requested
    gpu_only = [e for e in requested if e not in eng.CPU_ENGINES]
    requested = [e for e in requested if e in eng.CPU_ENGINES]
    engines, unavailable = bench.available_engines(requested)
    for e in gpu_only:
        unavailable[e] = "an engine of the GPU comparison (python -m fastcells bench --gpu)"
    if bench.BASELINE not in engines:
        print(f"fastcells bench: the built-in layer ({bench.BASELINE}) cannot run: "
              f"{unavailable.get(bench.BASELINE)}", file=sys.stderr)
        return 2
    fit_cells = [] if args.no_fit else (["lstm"] if args.quick else
                                        [c for c in ("lstm", "gru") if c in cells])
    cold_cells = [] if args.no_cold_start else (["lstm"] if args.quick else
                                                [c for c in cells])
    fit_engines = [e for e in engines if e != "torch"]
    n_cold = len(cold_cells) * sum(1 if e == bench.BASELINE else 1 + args.cold
                                   for e in fit_engines)
    total = (workloads.count_layer_cases(shapes, cells, modes, engines)
             + len(fit_cells) * len(fit_engines) + n_cold)
    progress = timing.Progress(total, enabled=not args.no_progress)

    start = time.perf_counter()
    report = bench.Report(machine=bench.machine_info(), unavailable=unavailable)
    report.settings = dict(vars(settings), backend=keras.backend.backend(), shapes=shapes,
                           cells=cells, modes=modes,
                           engines=engines, quick=args.quick, comparison="cpu")
    worker = torch_worker.TorchWorker(settings.subprocess_timeout,
                               flush_denormal=settings.torch_flush_denormal)
    if "fastcells-cpu" in engines and not args.no_floor:
        report.peak = workloads.measure_peak(settings.dtype)
    try:
        report.layers = bench.run_layer_benchmarks(shapes, cells, modes, engines, settings,
                                                   progress, torch_worker=worker)
        worker.close()                          # before the other workloads are timed
        if fit_cells:
            report.fit = bench.run_fit_benchmarks(fit_cells, engines, settings, progress)
        if cold_cells:
            report.cold = bench.run_cold_start(cold_cells, engines, args.cold, settings,
                                               progress)
    finally:
        worker.close()
        progress.close()
    if report.peak:
        report.peak = workloads.measure_peak(settings.dtype, previous=report.peak)
    report.elapsed_s = time.perf_counter() - start
    report.machine = bench.machine_info()       # now with the torch threads, if it ran
    if worker.info:
        report.machine["torch_worker"] = worker.info
    return _finish(args, report)


def _finish(args, report):
    """Print the report, save JSON / plot; the exit status (1 when a result is out of the
    equivalence bounds)."""
    from fastcells import bench

    bench.write_report(report, sys.stdout)
    if args.json:
        bench.save_json(args.json, report)
        print(f"saved {args.json}")
    _save_views(args, report)
    bad = report.mismatches()
    if bad:
        print(f"\n{len(bad)} result(s) out of the equivalence bounds:", file=sys.stderr)
        for r in bad:
            print(f"  {getattr(r, 'shape', 'model.fit')} {r.cell} "
                  f"{getattr(r, 'mode', 'train')} {r.engine}: {r.status}", file=sys.stderr)
        return 1
    return 0


def _save_views(args, report):
    """The chart (--plot) and the Markdown tables (--markdown) of a report."""
    from fastcells import bench
    from fastcells.bench import markdown

    if args.json and args.markdown:
        # the tables of the saved file (its times rounded to 4 digits), which is what
        # ``report`` writes from it later
        report = markdown.load_json(args.json)
    if args.plot:
        problem = bench.save_plot(args.plot, report)
        print(f"plot: {problem}" if problem else f"saved {args.plot}")
    for path in args.markdown or ():
        markdown.write_into(path, args.json, report)
        print(f"wrote the tables into {path}")


def report_command(args):
    """``python -m fastcells report RUN.json``: the tables of a saved run again."""
    from fastcells import bench
    from fastcells.bench import markdown

    try:
        report = markdown.load_json(args.json)
    except (OSError, ValueError, TypeError) as e:
        print(f"report: cannot read {args.json}: {e}", file=sys.stderr)
        return 2
    if not (args.markdown or args.plot):
        bench.write_report(report, sys.stdout)
    _save_views(args, report)
    return 0


def gpu_bench_command(args, note=None):
    """``python -m fastcells bench --gpu`` (or ``bench`` without TensorFlow): the CUDA
    engines against cuDNN and the built-in Keras layers on the torch backend."""
    from fastcells import bench
    from fastcells.bench import engines as eng
    from fastcells.bench import gpu, timing, workloads

    if note:
        print(f"fastcells bench: {note}")
    settings = _settings(args)
    report = bench.Report(machine=bench.machine_info())
    report.settings = dict(vars(settings), quick=args.quick, comparison="gpu")
    reason = eng.no_gpu_reason()
    if reason is not None:
        print(f"fastcells bench (GPU comparison): skipped: {reason}")
        report.unavailable = {e: reason for e in eng.GPU_ENGINES}
        report.settings["skipped"] = reason
        if args.json:
            bench.save_json(args.json, report)
            print(f"saved {args.json}")
        return 0

    if args.shapes is not None:
        shapes = args.shapes
    else:
        shapes = list(gpu.QUICK_GPU_SHAPES if args.quick else gpu.GPU_SHAPES)
    cells = args.cells or list(bench.CELLS)
    modes = args.modes or list(bench.MODES)
    requested = ["torch-cudnn" if e == "torch" else e
                 for e in (args.engines or list(eng.GPU_ENGINES))]
    if bench.BASELINE not in requested:
        requested = [bench.BASELINE] + requested
    gpu_engines = eng.GPU_ENGINES + eng.GPU_OPTIONAL_ENGINES
    unavailable = {e: "a CPU engine; the GPU comparison runs "
                      + ", ".join(gpu_engines)
                   for e in requested if e not in gpu_engines}
    requested = [e for e in requested if e in gpu_engines]
    engines, missing = bench.available_engines(requested, "gpu")
    unavailable.update(missing)
    report.unavailable = unavailable             # printed with the tables ("not run: ...")
    if not [e for e in engines if e != bench.BASELINE]:
        print("fastcells bench (GPU comparison): no GPU engine to compare can run here")
    total = workloads.count_layer_cases(shapes, cells, modes, engines)
    progress = timing.Progress(total, enabled=not args.no_progress)
    report.settings.update(shapes=shapes, cells=cells, modes=modes, engines=engines)
    start = time.perf_counter()
    try:
        report.layers = bench.run_gpu_benchmarks(shapes, cells, modes, engines, settings,
                                                 progress)
    finally:
        progress.close()
    report.elapsed_s = time.perf_counter() - start
    report.machine = bench.machine_info()
    report.machine["gpu"] = gpu.gpu_info()
    print(f"\nGPU comparison on {report.machine['gpu']['name']}: {gpu.LEGEND}")
    return _finish(args, report)


def demo_command(args):
    """``python -m fastcells demo``: train the IMDB-style model a few batches."""
    import keras
    import numpy as np

    import fastcells

    keras.utils.set_random_seed(args.seed)
    layer = {"lstm": fastcells.LSTM, "gru": fastcells.GRU,
             "simple_rnn": fastcells.SimpleRNN}[args.cell](args.units)
    model = keras.Sequential([
        keras.Input((args.seq_len,), dtype="int32"),
        keras.layers.Embedding(10000, 32),
        layer,                                    # instead of keras.layers.LSTM(32)
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(args.seed)
    # synthetic reviews: the label is whether the last token is in the "positive" half
    x = rng.integers(1, 10000, (args.batch_size, args.seq_len)).astype("int32")
    y = (x[:, -1:] >= 5000).astype("float32")
    print(f"fastcells {fastcells.__version__} demo: Embedding(10000, 32) -> "
          f"fastcells.{type(layer).__name__}({args.units}) -> Dense(1), "
          f"batch {args.batch_size} x {args.seq_len} tokens")
    for i in range(args.batches):
        t0 = time.perf_counter()
        loss, acc = model.train_on_batch(x, y)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"batch {i + 1}/{args.batches}: loss {float(loss):.4f}  accuracy "
              f"{float(acc):.3f}  ({ms:.0f} ms{', includes tracing' if i == 0 else ''})")
    print(f"the recurrence ran on: {layer.last_engine}")
    return 0


def main(argv=None):
    """Entry point of ``python -m fastcells`` and the ``fastcells`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    _import_quietly("--verbose" in argv)
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return bench_command(args, argv)
    if args.command == "convert":
        return convert_command(args)
    if args.command == "warmup":
        return warmup_command(args)
    if args.command == "report":
        return report_command(args)
    return demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
