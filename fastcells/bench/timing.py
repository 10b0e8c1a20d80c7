"""Timing: the engines of a workload in alternation, medians, the settings of a run and a
progress bar.

This module imports NumPy and the standard library only (its relative imports are inside
functions): the torch worker (:mod:`fastcells.bench.torch_worker`, run as a script without
fastcells on its path) loads it by file name and times torch with this very code.
"""
import dataclasses
import sys
import time

import numpy as np


# --------------------------------------------------------------------------- timing
def timed(fn, clock=time.perf_counter):
    """A timer (see :func:`time_interleaved`) of the callable ``fn``: ``timer(k)`` calls it
    k times and returns the k durations in seconds."""
    def timer(k):
        times = []
        for _ in range(k):
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return times
    return timer


def time_calls(fn, repeats=7, warmup=1, max_seconds=None, min_repeats=3, min_seconds=0.0,
               max_repeats=500):
    """Call ``fn`` ``warmup`` times untimed, then time it: :func:`time_interleaved` with one
    engine. Returns the list of durations in seconds (``time.perf_counter``). A GPU engine's
    ``fn`` synchronises the device before it returns, so that the whole call is timed."""
    return time_interleaved([timed(fn)], repeats, warmup, max_seconds, min_repeats,
                            min_seconds, max_repeats)[0]


def time_interleaved(timers, repeats=7, warmup=1, max_seconds=None, min_repeats=3,
                     min_seconds=0.0, max_repeats=500, on_error=None, most_per_round=64,
                     rounds=None):
    """Time several engines in alternation, so that each one's calls spread over the same
    stretch of time.

    ``timers[i](k)`` makes k calls of engine i and returns their k durations (see
    :func:`timed`; the torch worker's timer runs them in its own process). Each engine first
    makes ``warmup`` untimed calls; then rounds follow, and in each round every engine makes
    about as many calls as fill the time of one call of the slowest (at most
    ``most_per_round``), from its median so far, the engines' order turning by one each round.

    Why: on a shared machine the speed of a core comes and goes in stretches of about a
    second (on the 2-core development machine, stretches where two threads ran a kernel at
    the speed of one, 64-67 ms against 35-37 ms a call). Timed one after the other, a
    stretch falls on one engine's calls and its ratio to the others is off by up to 2x;
    timed in alternation, it falls on every engine alike.

    Rounds go on until every engine has made at least ``repeats`` timed calls and spent
    ``min_seconds`` (so that a short call is repeated enough for a stable median); they stop
    early once an engine has made ``max_repeats`` calls, or once the slowest engine has spent
    ``max_seconds`` and every engine has made ``min(min_repeats, repeats)`` calls (so that
    a slow case does not take forever).

    A timer that raises is dropped from the rounds: ``on_error(i, exc)`` is called, or the
    exception propagates when ``on_error`` is None. Returns one list of durations per timer
    (empty for a dropped one). ``rounds``, a list, gets one dict per round: timer index ->
    the durations of that round (for ratios paired round by round).
    """
    n = len(timers)
    times = [[] for _ in range(n)]
    warm = [[] for _ in range(n)]
    live = list(range(n))

    def call(i, k):
        try:
            return timers[i](k)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(i, exc)
            live.remove(i)
            return None

    for i in list(live):
        if warmup > 0:
            warm[i] = call(i, warmup) or []
    first = max(1, repeats)
    r = 0
    while live:
        typical = {i: float(np.median(times[i] or warm[i])) if times[i] or warm[i]
                   else None for i in live}
        slowest = max((v for v in typical.values() if v is not None), default=None)
        order = live[r % len(live):] + live[:r % len(live)]
        this_round = {}
        for i in order:
            k = 1
            if slowest is not None and typical[i]:
                k = int(min(most_per_round, max(1, slowest / typical[i])))
            k = max(1, min(k, max_repeats - len(times[i])))
            got = call(i, k)
            if got is not None:
                this_round[i] = [float(t) for t in got]
                times[i] += this_round[i]
        if rounds is not None:
            rounds.append(this_round)
        r += 1
        if not live:
            break
        counts = [len(times[i]) for i in live]
        totals = [sum(times[i]) for i in live]
        if all(c >= first and t >= min_seconds for c, t in zip(counts, totals)):
            break
        if max(counts) >= max_repeats:
            break
        if (max_seconds is not None and max(totals) >= max_seconds
                and min(counts) >= min(min_repeats, first)):
            break
    return times



@dataclasses.dataclass
class Settings:
    """Every tunable of a benchmark run (the command line sets them from its flags).

    repeats: timed calls per case; the median is reported.
    warmup: untimed calls after the first (compiling, tracing) call.
    max_seconds: time budget of the timed calls of one case: a slow case stops after
        ``min_repeats`` calls once the budget is spent.
    min_repeats: fewest timed calls of a case.
    min_seconds: a fast case is repeated (beyond ``repeats``) until this much time was spent.
    max_repeats: most timed calls of a case.
    seed: seed of the weights and inputs.
    dtype: "float32" or "float64".
    fit_batches: timed ``train_on_batch`` calls of the model.fit workload.
    fit_warmup: untimed ``train_on_batch`` calls before those, after the first one (which
        traces the step and is checked against the built-in model's).
    torch_threads: ``torch.set_num_threads`` for the PyTorch engine (None: its default).
    torch_isolated: run the PyTorch engine in a worker process of its own (see
        :class:`fastcells.bench.torch_worker.TorchWorker`); False runs it in this
        process, next to the Keras backend.
    torch_flush_denormal: torch's threads flush denormals to zero, as TensorFlow's and the
        fastcells kernels' threads do (in this process too with ``torch_isolated=False``:
        then this thread flushes them from then on, and torch's threads only if it had not
        started them yet).
    allow_tf32: let cuDNN and torch matmuls use TF32 in the GPU comparison (off by default:
        every engine then computes in float32, as the fastcells kernels do).
    cold_shape: (B, T, D, H) of the cold-start measurement.
    subprocess_timeout: seconds allowed to one cold-start subprocess.
    """
    repeats: int = 7
    warmup: int = 1
    max_seconds: float = 10.0
    min_repeats: int = 3
    min_seconds: float = 1.0
    max_repeats: int = 500
    seed: int = 0
    dtype: str = "float32"
    fit_batches: int = 9
    fit_warmup: int = 2
    torch_threads: int = None
    torch_isolated: bool = True
    torch_flush_denormal: bool = True
    allow_tf32: bool = False
    cold_shape: tuple = (16, 50, 16, 32)
    subprocess_timeout: float = 300.0


def quick_settings():
    """The settings of ``bench --quick``: fewer repeats, a tighter budget per case."""
    return Settings(repeats=5, warmup=1, max_seconds=3.0, min_repeats=3, min_seconds=0.25,
                    fit_batches=5, fit_warmup=1)



def timing_kwargs(settings):
    """The keyword arguments of :func:`time_calls` that ``settings`` set."""
    return dict(repeats=settings.repeats, warmup=settings.warmup,
                max_seconds=settings.max_seconds, min_repeats=settings.min_repeats,
                min_seconds=settings.min_seconds, max_repeats=settings.max_repeats)



def median(times):
    """The median of ``times``, NaN for none."""
    return float(np.median(times)) if times else float("nan")



class Progress:
    """A text progress bar on a stream (stderr), one line redrawn in place on a terminal and
    one line per item otherwise.

    Example::

        bar = Progress(10)
        for i in range(10):
            bar.step(f"item {i}")
            ...
        bar.close()
    """

    def __init__(self, total, stream=None, enabled=True, width=24):
        self.total = max(1, int(total))
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0

    def step(self, label):
        """Announce the next item (``label``) and redraw the bar."""
        if not self.enabled:
            return
        self.count += 1
        done = min(self.count - 1, self.total)
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        line = f"[{bar}] {self.count}/{self.total} {elapsed:5.0f}s  {label}"
        if self._tty:
            pad = max(0, self._last_len - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        """Finish the bar (clears the line on a terminal)."""
        if self.enabled and self._tty:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()


class NoProgress(Progress):
    """A progress bar that shows nothing."""

    def __init__(self):
        super().__init__(1, enabled=False)



def time_together(rows, timed, settings_kwargs):
    """Time the ``(row, timer)`` pairs of ``timed`` in alternation with
    :func:`time_interleaved` (keyword arguments ``settings_kwargs``) and fill in their
    ``times``; then set every row's ``baseline_median`` (``rows``: all :class:`Result` or
    :class:`FitResult` of one workload, timed or failed) and each timed row's
    ``speedup_range``: the 25th to 75th percentile of the speed-ups over the built-in layer
    paired round by round (its calls and the engine's in the same round, a fraction of a
    second apart), how far the single ratio could move within the run. A timer that fails
    gives its row status ``"error: ..."``."""
    from .engines import BASELINE

    def failed(i, exc):
        timed[i][0].status = error_status(exc)

    rounds = []
    times = time_interleaved([timer for _, timer in timed], **settings_kwargs,
                             on_error=failed, rounds=rounds)
    for (res, _), t in zip(timed, times):
        res.times = t
    baseline = next((r.median for r in rows if r.engine == BASELINE and r.times), None)
    for res in rows:
        res.baseline_median = baseline
    base = next((i for i, (r, _) in enumerate(timed) if r.engine == BASELINE and r.times),
                None)
    if base is None:
        return
    for i, (res, _) in enumerate(timed):
        paired = [float(np.median(rd[base]) / np.median(rd[i])) for rd in rounds
                  if base in rd and i in rd]
        if i != base and len(paired) >= 2:
            lo, hi = np.percentile(paired, [25, 75])
            res.speedup_range = (float(lo), float(hi))


def error_status(exc):
    """The status of a result whose engine raised ``exc``."""
    return f"error: {type(exc).__name__}: {exc}"
