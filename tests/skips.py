"""The skips the test suite accepts, and the pytest plugin that fails a run with any other.

A skipped test looks like a passed one in a green run: a route that silently stops working
(the JAX FFI target, the CUDA kernels, the PTX compile) would turn its tests into skips and
nothing would say so. Every skip a run may have is listed in :data:`ALLOWED`, with the fact
about the machine that makes it right; a skip that is not listed, or whose condition does
not hold on this machine, fails the run (exit status 1) and is named at the end of it.

``FASTCELLS_TEST_ALLOW_SKIPS=1`` reports such skips without failing (for a machine that
lacks what ``.ci/run`` installs); ``FASTCELLS_TEST_CUDA=0`` opts out of the CUDA tests,
whose skips then say "opted out" and are accepted.
"""
import fnmatch
import importlib.util
import os

import pytest


#: ``FASTCELLS_TEST_CUDA=0``: the run opts out of the CUDA tests.
CUDA_OPTED_OUT = os.environ.get("FASTCELLS_TEST_CUDA", "1") == "0"


def _real_gpu():
    """A GPU the CUDA kernels run on (not the simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1":
        return False
    from fastcells import ops
    return ops.cuda_available()


def _missing(module):
    return lambda: importlib.util.find_spec(module) is None


#: When each condition holds.
CONDITIONS = {
    "no GPU": lambda: not _real_gpu(),
    "a GPU": _real_gpu,
    "no torch": _missing("torch"),
    "no jax": _missing("jax"),
    "no numba-cuda": _missing("numba_cuda"),
    "CUDA opted out": lambda: CUDA_OPTED_OUT,
}

#: ``(node id pattern, condition, why)``: a skip of a test whose node id matches the
#: pattern (``fnmatch``) is accepted while the condition holds.
ALLOWED = [
    ("tests/test_bench.py::test_gpu_cases_on_a_gpu", "no GPU",
     "the GPU benchmark's real cases need a GPU that torch sees"),
    ("tests/test_bench.py::test_gpu_command_skips_without_gpu", "a GPU",
     "checks the message a machine without a GPU gives"),
    ("tests/test_bench.py::test_bench_without_tensorflow_runs_the_gpu_comparison", "a GPU",
     "checks the message a machine without a GPU gives"),
    ("tests/test_bench.py::test_gpu_engines_unavailable_without_gpu", "a GPU",
     "checks the engines a machine without a GPU refuses"),
    ("tests/test_cuda.py::test_every_kernel_compiles_to_ptx_for_a_gpu", "a GPU",
     "on a GPU every CUDA test compiles the kernels it runs"),
    ("tests/test_cuda_ops.py::test_a_training_step_fills_zeros_once_per_phase*", "a GPU",
     "counts the simulator's launches"),
    ("tests/test_torch_backend.py::*", "no torch", "the torch Keras backend needs torch"),
    ("tests/test_bench.py::test_torch_*", "no torch", "the torch contender needs torch"),
    ("tests/test_bench.py::test_worker_timeout_is_an_error", "no torch",
     "the torch worker needs torch"),
    ("tests/test_deploy.py::*torch*", "no torch", "torch.compile needs torch"),
    ("tests/test_jax_backend.py::*", "no jax", "the JAX Keras backend needs jax"),
    ("tests/test_xla_ffi.py::*", "no jax", "the FFI target is a JAX one"),
    ("tests/test_deploy.py::*jax*", "no jax", "jax.jit and DataParallel need jax"),
    ("tests/test_bench.py::test_cpu_comparison_on_another_backend[[]torch]", "no torch",
     "the comparison on the torch backend needs torch"),
    ("tests/test_bench.py::test_cpu_comparison_on_another_backend[[]jax]", "no jax",
     "the comparison on the JAX backend needs jax"),
    ("tests/test_cuda*.py::*", "no numba-cuda", "the CUDA kernels need numba-cuda"),
    ("tests/test_tf_gpu_bridge.py::*", "no numba-cuda", "the CUDA kernels need numba-cuda"),
    ("tests/test_suite.py::test_the_cuda_tests_run_where_numba_cuda_is_installed",
     "no numba-cuda", "nothing to run without numba-cuda"),
    ("tests/test_cuda*.py::*", "CUDA opted out", "FASTCELLS_TEST_CUDA=0"),
    ("tests/test_tf_gpu_bridge.py::*", "CUDA opted out", "FASTCELLS_TEST_CUDA=0"),
]


def _matches(nodeid, pattern):
    """``nodeid`` matches ``pattern``; a module's node id (a skip at collection) matches the
    patterns of its tests."""
    if "::" not in nodeid:
        return fnmatch.fnmatch(nodeid, pattern.split("::")[0])
    return fnmatch.fnmatch(nodeid, pattern)


def allowed(nodeid, reason, cuda_opted_out=False, table=ALLOWED, conditions=CONDITIONS):
    """None when a skip of ``nodeid`` is accepted on this machine, else why it is not."""
    if cuda_opted_out and reason.startswith("opted out"):
        return None
    matched = [(cond, why) for pattern, cond, why in table if _matches(nodeid, pattern)]
    if not matched:
        return "not listed in tests/skips.py"
    if any(conditions[cond]() for cond, _ in matched):
        return None
    listed = " or ".join(f"'{cond}'" for cond, _ in matched)
    return f"listed for {listed}, which is not so here"


def _reason(report):
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class Skips:
    """The pytest plugin (registered by tests/conftest.py on the controller process): notes
    every skip, and at the end of the run names those that :func:`allowed` refuses and
    sets the exit status to 1."""

    def __init__(self, cuda_opted_out=CUDA_OPTED_OUT):
        self.cuda_opted_out = cuda_opted_out
        self.refused = []

    def pytest_collectreport(self, report):
        self.pytest_runtest_logreport(report)       # a whole module skipped

    def pytest_runtest_logreport(self, report):
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        reason = _reason(report)
        why = allowed(report.nodeid, reason, self.cuda_opted_out)
        if why is not None:
            self.refused.append((report.nodeid, reason, why))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.refused and exitstatus == 0 and os.environ.get(
                "FASTCELLS_TEST_ALLOW_SKIPS") != "1":
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.refused:
            return
        tr = terminalreporter
        tr.section("skips that tests/skips.py does not accept", sep="=", red=True)
        for nodeid, reason, why in self.refused:
            tr.line(f"{nodeid}: {reason} ({why})")
        tr.line(f"{len(self.refused)} skipped tests not accepted"
                + (": reported only (FASTCELLS_TEST_ALLOW_SKIPS=1)"
                   if os.environ.get("FASTCELLS_TEST_ALLOW_SKIPS") == "1" else
                   ": the run fails (install what .ci/run installs, list the skip in "
                   "tests/skips.py with its condition, or set FASTCELLS_TEST_ALLOW_SKIPS=1)"))
