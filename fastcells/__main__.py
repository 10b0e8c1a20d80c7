"""Command line of fastcells.

    python -m fastcells bench             # tables: us per time step, speed-up, max error
    python -m fastcells bench --quick     # a small subset, under two minutes
    python -m fastcells bench --json out.json --plot out.png
    python -m fastcells demo              # train the IMDB-style model a few batches

The measuring is done by :mod:`fastcells.bench`; this module only parses flags and prints.
"""
import argparse
import contextlib
import os
import sys
import time

# before TensorFlow is imported anywhere (fastcells imports keras, keras imports TF)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
        import tensorflow  # noqa: F401
        import keras  # noqa: F401

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


def _parser():
    from fastcells import bench
    p = argparse.ArgumentParser(prog="python -m fastcells",
                                description="fastcells: benchmarks and a demo")
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
                        "LSTM only (under a minute on 2 cores)")
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
    b.add_argument("--engines", type=_csv(bench.ENGINES), default=None,
                   help=f"comma-separated engines from {', '.join(bench.ENGINES)} (default: "
                        f"every one available here; {bench.BASELINE} always runs)")
    b.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls per case at least, median reported (default "
                        f"{d.repeats}, --quick {bench.quick_settings().repeats})")
    b.add_argument("--warmup", type=int, default=None,
                   help=f"untimed calls after the first one (default {d.warmup})")
    b.add_argument("--max-seconds", type=float, default=None,
                   help=f"time budget per case, fewer repeats when slow (default "
                        f"{d.max_seconds})")
    b.add_argument("--min-seconds", type=float, default=None,
                   help=f"a fast case is repeated until this much time was spent (default "
                        f"{d.min_seconds})")
    b.add_argument("--max-repeats", type=int, default=None,
                   help=f"most timed calls per case (default {d.max_repeats})")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    b.add_argument("--threads", type=int, default=None,
                   help="fastcells.config.NUM_THREADS for the CPU kernels")
    b.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the PyTorch engine")
    b.add_argument("--no-fit", action="store_true", help="skip the model.fit workload")
    b.add_argument("--fit-batches", type=int, default=None,
                   help=f"timed train_on_batch calls (default {d.fit_batches})")
    b.add_argument("--no-cold-start", action="store_true",
                   help="skip the first-call measurement in a fresh process")
    b.add_argument("--cold", action="store_true",
                   help="also measure the first call with an empty numba cache (compiles "
                        "every kernel)")
    b.add_argument("--json", metavar="PATH", help="save results and machine info as JSON")
    b.add_argument("--plot", metavar="PATH", help="save a PNG bar chart (needs matplotlib)")
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
    return p


def bench_command(args):
    """``python -m fastcells bench``: run, print the tables, save JSON / plot."""
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
    requested = args.engines or list(bench.ENGINES)
    if bench.BASELINE not in requested:          # every ratio is taken against it
        requested = [bench.BASELINE] + requested
    engines, unavailable = bench.available_engines(requested)
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
    total = (bench.count_layer_cases(shapes, cells, modes, engines)
             + len(fit_cells) * len(fit_engines) + n_cold)
    progress = bench.Progress(total, enabled=not args.no_progress)

    start = time.perf_counter()
    report = bench.Report(machine=bench.machine_info(), unavailable=unavailable)
    report.settings = dict(vars(settings), shapes=shapes, cells=cells, modes=modes,
                           engines=engines, quick=args.quick)
    try:
        report.layers = bench.run_layer_benchmarks(shapes, cells, modes, engines, settings,
                                                   progress)
        if fit_cells:
            report.fit = bench.run_fit_benchmarks(fit_cells, engines, settings, progress)
        if cold_cells:
            report.cold = bench.run_cold_start(cold_cells, engines, args.cold, settings,
                                               progress)
    finally:
        progress.close()
    report.elapsed_s = time.perf_counter() - start
    report.machine = bench.machine_info()       # now with the torch threads, if it ran

    bench.write_report(report, sys.stdout)
    if args.json:
        bench.save_json(args.json, report)
        print(f"saved {args.json}")
    if args.plot:
        problem = bench.save_plot(args.plot, report)
        print(f"plot: {problem}" if problem else f"saved {args.plot}")
    bad = report.mismatches()
    if bad:
        print(f"\n{len(bad)} result(s) out of the equivalence bounds:", file=sys.stderr)
        for r in bad:
            print(f"  {getattr(r, 'shape', 'model.fit')} {r.cell} "
                  f"{getattr(r, 'mode', 'train')} {r.engine}: {r.status}", file=sys.stderr)
        return 1
    return 0


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
        return bench_command(args)
    return demo_command(args)


if __name__ == "__main__":
    sys.exit(main())
