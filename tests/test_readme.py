"""The README and docs/ stay true: every Python block of the README runs, every shell command
in them names existing options, every relative link resolves, and none speaks of how the
project was developed.

- ```python blocks of README.md run one by one, each in a fresh namespace, in a temporary
  directory (the IMDB example saves a file). They are written to run in seconds as they are.
- ```bash blocks (README.md and docs/*.md) are not run (a benchmark takes minutes): each
  command is checked instead. ``python -m fastcells ...`` is parsed by the real command
  line parser, ``pip install -e ".[extra]"`` needs the extras in setup.py, the test command
  must be the one .ci/run runs, ``pytest benchmarks ...`` options must be those
  benchmarks/conftest.py adds.
- ```text blocks are prose laid out as code and are neither run nor checked.
"""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEST_COMMAND = "python -m pytest tests -q -n 2 -rs"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(path, lang):
    return [body for kind, body in _FENCE.findall(path.read_text()) if kind == lang]


def _commands(body):
    """The shell commands of a block: continuation lines joined, comments dropped, ``&&``
    chains split."""
    text = body.replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield from (part.strip() for part in line.split("&&"))


# ------------------------------------------------------------------------- Python blocks
PY_BLOCKS = _blocks(README, "python")


def test_readme_has_python_blocks():
    assert len(PY_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(PY_BLOCKS[index], f"README.md python block {index}", "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {"__name__": "__readme__"})


# -------------------------------------------------------------------------- shell blocks
def _shell_commands():
    found = []
    for path in [README] + DOCS:
        for body in _blocks(path, "bash"):
            found += [(path.relative_to(ROOT).as_posix(), c) for c in _commands(body)]
    return found


SHELL = _shell_commands()


def _check_fastcells_cli(argv):
    from fastcells import __main__ as cli

    parser = cli._parser()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"python -m fastcells {' '.join(argv)}: {out.getvalue()}"


def _extras():
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


def _benchmark_options():
    text = (ROOT / "benchmarks" / "conftest.py").read_text()
    return set(re.findall(r'addoption\("(--[\w-]+)"', text))


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_COMMAND in ci           # a line of its own: the same options, no more
    assert any(c == TEST_COMMAND for where, c in SHELL if where == "README.md")
    assert any(c.startswith("python -m fastcells bench") for where, c in SHELL
               if where == "README.md")


@pytest.mark.parametrize("where,command", SHELL, ids=[f"{w}: {c[:60]}" for w, c in SHELL])
def test_shell_command_names_existing_options(where, command):
    argv = shlex.split(command)
    if argv[:2] == ["pip", "install"]:
        assert argv[2:3] == ["-e"], command
        spec = argv[3]
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
        assert extras, f"{where}: {command}"
        if extras.group(1):
            assert set(extras.group(1).split(",")) <= _extras(), f"{where}: {command}"
        return
    if command.startswith("python -m pytest"):
        assert command == TEST_COMMAND, f"{where}: {command}"
        return
    if argv[:2] == ["pytest", "benchmarks"]:
        options = {a for a in argv[2:] if a.startswith("--bench-")}
        assert options <= _benchmark_options(), f"{where}: {command}"
        return
    if argv[0] in ("ncu", "nsys"):          # a profiler around a fastcells command
        assert "python" in argv, f"{where}: {command}"
        argv = argv[argv.index("python"):]
    assert argv[:3] == ["python", "-m", "fastcells"], f"{where}: unchecked command {command}"
    _check_fastcells_cli(argv[3:])


# --------------------------------------------------------------------------------- links
def _slug(heading):
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def _anchors(path):
    text = _FENCE.sub("", path.read_text())
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    text = _FENCE.sub("", path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.is_relative_to(ROOT), f"{path.name}: {target} leaves the repository"
        assert dest.exists(), f"{path.name}: {target}"
        if anchor:
            assert anchor in _anchors(dest), f"{path.name}: {target}"


def test_readme_links_to_docs():
    text = README.read_text()
    for doc in ("design", "performance", "benchmarks", "configuration", "deployment"):
        assert f"(docs/{doc}.md)" in text


# ----------------------------------------------------------------------------- wording
_DEVELOPMENT = re.compile(r"\bsessions?\b|\blent\b|\bissue [0-9]+|\btoday\b|\.\./shared", re.I)


@pytest.mark.parametrize("path", [README] + DOCS, ids=lambda p: p.name)
def test_docs_do_not_speak_of_development(path):
    hits = [line for line in path.read_text().splitlines() if _DEVELOPMENT.search(line)]
    assert not hits, f"{path.name}: {hits}"


def test_readme_length():
    assert len(README.read_text().splitlines()) <= 250
