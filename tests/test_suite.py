"""The suite's own guards: what can run here does run, and a skip that nothing accounts for
fails the run (tests/skips.py)."""
import importlib.util
import os
from types import SimpleNamespace

import pytest

import skips
from fastcells import ops


def test_the_cuda_tests_run_where_numba_cuda_is_installed():
    """With numba-cuda installed, the CUDA tests run on a GPU or under the simulator
    (tests/conftest.py chooses); they never all skip because neither was found."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed")
    if skips.CUDA_OPTED_OUT:
        pytest.skip("opted out: FASTCELLS_TEST_CUDA=0")
    assert ops.cuda_available(), (
        "numba-cuda is installed but runs neither on a GPU nor under its simulator "
        f"(NUMBA_ENABLE_CUDASIM={os.environ.get('NUMBA_ENABLE_CUDASIM')!r}); the CUDA tests "
        "would all skip. FASTCELLS_TEST_CUDA=0 opts out explicitly")


# --------------------------------------------------------------------------- skips
TABLE = [("tests/test_a.py::test_gpu*", "no GPU", "needs a GPU"),
         ("tests/test_a.py::test_both", "no GPU", "needs a GPU"),
         ("tests/test_a.py::test_both", "no torch", "needs torch")]


def _allowed(nodeid, reason="skipped", gpu=False, torch=True, opted_out=False):
    conditions = {"no GPU": lambda: not gpu, "no torch": lambda: not torch}
    return skips.allowed(nodeid, reason, opted_out, TABLE, conditions)


def test_a_listed_skip_is_accepted_only_while_its_condition_holds():
    assert _allowed("tests/test_a.py::test_gpu_run[lstm]") is None
    assert "'no GPU'" in _allowed("tests/test_a.py::test_gpu_run[lstm]", gpu=True)
    assert _allowed("tests/test_a.py::test_both", gpu=True, torch=False) is None
    assert _allowed("tests/test_a.py::test_both", gpu=True, torch=True) is not None
    assert _allowed("tests/test_a.py::test_other") == "not listed in tests/skips.py"
    assert _allowed("tests/test_a.py::test_other", "opted out: X=0", opted_out=True) is None
    assert _allowed("tests/test_a.py::test_other", "opted out: X=0") is not None
    assert _allowed("tests/test_a.py") is None                  # the module, at collection
    assert _allowed("tests/test_b.py") is not None


def test_every_allowed_skip_names_a_known_condition_and_a_reason():
    for pattern, condition, why in skips.ALLOWED:
        assert pattern.startswith("tests/") and "::" in pattern, pattern
        assert condition in skips.CONDITIONS, (pattern, condition)
        assert why, pattern


def _report(nodeid, reason, when="setup", xfail=False):
    r = SimpleNamespace(skipped=True, nodeid=nodeid, when=when,
                        longrepr=("f.py", 1, f"Skipped: {reason}"))
    if xfail:
        r.wasxfail = "xfail"
    return r


def test_the_plugin_fails_a_run_with_a_skip_it_does_not_accept(monkeypatch):
    monkeypatch.delenv("FASTCELLS_TEST_ALLOW_SKIPS", raising=False)
    plugin = skips.Skips()
    plugin.pytest_runtest_logreport(SimpleNamespace(skipped=False))
    plugin.pytest_runtest_logreport(_report("tests/test_x.py::test_y", "flaky", xfail=True))
    session = SimpleNamespace(exitstatus=0)
    plugin.pytest_sessionfinish(session, 0)
    assert session.exitstatus == 0 and plugin.refused == []

    plugin.pytest_runtest_logreport(_report("tests/test_x.py::test_y", "this JAX has no ffi"))
    assert plugin.refused == [("tests/test_x.py::test_y", "this JAX has no ffi",
                               "not listed in tests/skips.py")]
    plugin.pytest_sessionfinish(session, 0)
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    lines = []
    plugin.pytest_terminal_summary(SimpleNamespace(section=lambda *a, **k: None,
                                                   line=lines.append))
    assert "tests/test_x.py::test_y: this JAX has no ffi" in lines[0]
    assert "1 skipped tests not accepted" in lines[-1]

    monkeypatch.setenv("FASTCELLS_TEST_ALLOW_SKIPS", "1")   # reported, not failed
    session = SimpleNamespace(exitstatus=0)
    plugin.pytest_sessionfinish(session, 0)
    assert session.exitstatus == 0
