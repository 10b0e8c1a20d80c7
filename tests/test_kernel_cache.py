"""A corrupt or truncated on-disk kernel cache never breaks an import or a call."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np
from fastcells import ops
x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
W = np.full((4, 8), 0.1, np.float32); U = np.full((2, 8), 0.2, np.float32)
f = ops.lstm_forward(x, W, U, None)
g = ops.lstm_backward(f.cache, f.outputs)
print("RESULT", repr(float(f.outputs.sum())), repr(float(g.kernel.sum())))
"""


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stdout
    return line[0], out.stderr


@pytest.mark.early
def test_damaged_cache_is_rebuilt(tmp_path):
    """Both kinds of damage in one cache (each rebuild compiles the kernels again, 30 s):
    index and data files overwritten with garbage or truncated to nothing, alternately."""
    clean, _ = _run(tmp_path)                       # compiles and fills the cache
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
