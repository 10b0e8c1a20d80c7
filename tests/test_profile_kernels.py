"""benchmarks/profile_kernels.py: the names and groups it reads from ``perf report`` and the
perf map it writes for the JIT-compiled kernels."""
import importlib.util
import os

import numpy as np
from numba import njit

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "profile_kernels.py")
_spec = importlib.util.spec_from_file_location("profile_kernels", _path)
profile_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_kernels)

# symbols as perf reports them for a LSTM training step (Numba's mangling, OpenBLAS, NRT)
REPORT = """
# Samples: 15K of event 'cpu-clock:ppp'
#
    20.23%  [.] _ZN9fastcells3cpu5_gemm10packed_dotB4v126B86c8tJTIeFIjxB2IKSgI4CrvQCk0Z4yRYcWsC
    19.27%  [.] _ZN9fastcells3cpu5_gemm10packed_dotB3v33B86c8tJTIeFIjxB2IKSgI4CrvQCk0Z4yRYcWsCA
    19.23%  [.] _ZN9fastcells3cpu4lstm21_forward_fused_kernelB2v5B86c8tJTIeFIjxB2IKSgI4CrvSCKg1
    17.48%  [.] _ZN9fastcells3cpu4lstm22_backward_fused_kernelB3v67B86c8tJTIeFIjxB2IKSgI4CrvSC
     5.00%  [.] sgemm_kernel_SKYLAKEX
     1.00%  [.] sgemm_itcopy_SKYLAKEX
     3.64%  [.] NRT_decref
     3.57%  [.] NRT_incref
     0.64%  [.] _PyEval_EvalFrameDefault
     0.14%  [k] _raw_spin_unlock_irqrestore
"""


def test_readable_names_of_numba_symbols():
    r = profile_kernels.readable
    assert r("_ZN9fastcells3cpu4lstm21_forward_fused_kernelB2v5B86c8tJTI") == \
        "fastcells.cpu.lstm._forward_fused_kernel"
    assert r("_ZN9fastcells3cpu5_gemm10packed_dotB4v126B86c8") == "fastcells.cpu._gemm.packed_dot"
    assert r("sgemm_kernel_SKYLAKEX") == "sgemm_kernel_SKYLAKEX"


def test_report_shares_by_group():
    shares = profile_kernels.parse_report(REPORT)
    assert set(shares) == {"products", "lstm._forward_fused_kernel",
                           "lstm._backward_fused_kernel", "BLAS", "reference counts",
                           "Python and NumPy"}
    assert np.isclose(shares["products"], 0.3950)
    assert np.isclose(shares["BLAS"], 0.06)
    assert np.isclose(shares["reference counts"], 0.0721)
    assert np.isclose(shares["Python and NumPy"], 0.0078)
    assert np.isclose(sum(shares.values()), 0.9020)


def test_perf_map_lists_the_compiled_kernels(tmp_path):
    # a function compiled here (not loaded from a cache) is listed with its address
    import sys
    import types
    module = types.ModuleType("fastcells._profile_probe")

    @njit(cache=False)
    def probe(a):
        return a.sum()
    probe(np.ones(3))
    module.probe = probe
    sys.modules[module.__name__] = module
    try:
        path = tmp_path / "perf.map"
        n = profile_kernels.write_perf_map(str(path))
        lines = path.read_text().splitlines()
    finally:
        del sys.modules[module.__name__]
    assert n == len(lines) >= 1
    entries = [line.split(" ", 2) for line in lines]
    probes = [e for e in entries if "probe" in e[2]]
    assert probes, "the compiled probe is not in the map"
    starts = [int(e[0], 16) for e in entries]
    assert starts == sorted(starts) and all(int(e[1], 16) > 0 for e in entries)
    # the listed address is the function's code: a ctypes call through it gives the sum
    cres = next(iter(probe.overloads.values()))
    assert int(probes[0][0], 16) in {cres.library.get_pointer_to_function(f.name)
                                     for f in cres.library._final_module.functions
                                     if not f.is_declaration}
