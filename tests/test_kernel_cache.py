"""A corrupt or truncated on-disk kernel cache never breaks an import or a call."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np
from fastcells import ops
x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
W = np.full((4, 2), 0.1, np.float32); U = np.full((2, 2), 0.2, np.float32)
f = ops.simple_rnn_forward(x, W, U, None)       # the cell that compiles fastest
g = ops.simple_rnn_backward(f.cache, f.outputs)
print("RESULT", repr(float(f.outputs.sum())), repr(float(g.kernel.sum())))
"""


def _run(cache_dir):
    # the numpy backend: the script needs no framework, and TensorFlow takes seconds to load
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), KERAS_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stdout
    return line[0], out.stderr


@pytest.mark.early
def test_damaged_cache_is_rebuilt(tmp_path):
    """Both kinds of damage in one cache (each rebuild compiles the kernels again):
    index and data files overwritten with garbage or truncated to nothing, alternately."""
    clean, err = _run(tmp_path)                     # compiles and fills the cache
    assert err.count("compiling CPU kernels that are not in the kernel cache") == 1, err
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    index = sorted(f for f in files if f.endswith(".nbi"))
    data = sorted(f for f in files if f.endswith(".nbc"))
    assert len(index) >= 2 and data, f"numba wrote too few cache files: {files}"
    for group in (index, data):                     # each kind of damage hits both kinds
        for i, path in enumerate(group):
            with open(path, "wb") as fh:
                fh.write(os.urandom(40) if i % 2 else b"")
    result, err = _run(tmp_path)
    assert result == clean
    assert "could not be used" in err             # it said so, once per kernel
    again, err = _run(tmp_path)                     # and the rebuilt cache is clean
    assert again == clean and "could not be used" not in err
    assert "compiling CPU kernels" not in err       # nothing left to compile: no notice


USE_AFTER_WARMUP = """
import numpy as np
from numba.core import event
from fastcells import ops
compiled = []
class Seen(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__module__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Seen())
rng = np.random.default_rng(1)
B, T, D, H = 7, 9, 3, 4           # other sizes than the warm-up's
x = rng.standard_normal((B, T, D)).astype(np.float32)
W = rng.standard_normal((D, H)).astype(np.float32)
U = rng.standard_normal((H, H)).astype(np.float32)
b = np.zeros(H, np.float32)
mask = rng.random((B, T)) > 0.3
for kw in ({}, dict(mask=mask, go_backwards=True), dict(return_sequences=True),
           dict(dropout_mask=np.full((B, D), 2.0, np.float32),
                recurrent_dropout_mask=np.full((B, H), 2.0, np.float32)),
           dict(activation="relu")):
    f = ops.simple_rnn_forward(x, W, U, b, training=True, **kw)
    ops.simple_rnn_backward(f.cache, np.ones_like(f.outputs))
    ops.simple_rnn_forward(x, W, U, b, training=False, **{k: v for k, v in kw.items()
                                                          if "dropout" not in k})
print("COMPILED", sorted(m for m in compiled if m.startswith("fastcells")))
"""


@pytest.mark.early
def test_warmup_compiles_what_later_processes_use(tmp_path):
    """`python -m fastcells warmup` for one cell and dtype fills an empty cache; a later
    process then runs that cell's training and inference calls (masks, dropout, other
    activations, other sizes) without compiling anything of fastcells, and says nothing
    about compiling."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", "fastcells", "warmup", "--cells",
                          "simple_rnn", "--dtypes", "float32", "--jobs", "2"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2/2 simple_rnn float32" in out.stderr and str(tmp_path) in out.stderr
    use = subprocess.run([sys.executable, "-c", USE_AFTER_WARMUP],
                         env=dict(env, KERAS_BACKEND="numpy"),
                         capture_output=True, text=True, timeout=600)
    assert use.returncode == 0, use.stderr[-3000:]
    assert "COMPILED []" in use.stdout, use.stdout
    assert "compiling CPU kernels" not in use.stderr


def test_warmup_rejects_bad_arguments():
    from fastcells import warmup
    with pytest.raises(ValueError, match="cells: unknown \\['lstmm'\\]"):
        warmup.jobs_for(["lstmm"], ["float32"])
    with pytest.raises(ValueError, match="dtypes: unknown \\['float16'\\]"):
        warmup.jobs_for(["lstm"], ["float16"])
    assert warmup.jobs_for(["simple_rnn", "lstm"], ["float32"]) == [
        ("lstm", "float32", "fused"), ("lstm", "float32", "unfused"),
        ("simple_rnn", "float32", "fused"), ("simple_rnn", "float32", "unfused")]


TANH_SCRIPT = """
import numpy as np
from fastcells.cpu import _rates
x = np.linspace(-3, 3, 37).astype(np.float32)
out = np.empty_like(x)
_rates._repeat_tanh(x, out, 1)          # a small kernel that inlines _math.fast_tanh
d = _rates._repeat_tanh.dispatcher
print("STATS", sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()),
      d.stats.cache_path)
"""


@pytest.mark.early
def test_an_edit_to_an_inlined_module_invalidates_the_cached_kernels(tmp_path):
    """Numba stamps a cached kernel with its own file only; a kernel that inlines
    ``_math.py`` must be compiled again when ``_math.py`` changes, not loaded from the
    cache (fastcells/cpu/_cache.py). A copy of the package, with its own cache, is edited
    between runs."""
    import shutil

    import fastcells
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.dirname(fastcells.__file__), pkg / "fastcells",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(pkg),
               FASTCELLS_KERNELS_ONLY="1")

    def run():
        out = subprocess.run([sys.executable, "-c", TANH_SCRIPT], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        hits, misses, path = out.stdout.split("STATS ")[1].split()
        assert path.startswith(str(tmp_path / "cache")), path     # the copy's own cache
        return int(hits), int(misses)

    assert run() == (0, 1)                          # compiled and cached
    assert run() == (1, 0)                          # loaded from the cache
    with open(pkg / "fastcells" / "_math.py", "a") as f:
        f.write("\n# an edit\n")
    assert run() == (0, 1)                          # compiled again
    assert run() == (1, 0)
