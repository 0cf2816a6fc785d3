"""The command line's own surface: --version, help that lists every command, and a parser that
builds without importing torch or the server's and the bench's libraries (so `flatout --help`
and `flatout SUB --help` answer at once)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flatout.cli import _COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [name for name, *_ in _COMMANDS]
HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "fastapi", "uvicorn",
         "starlette", "pydantic", "httpx", "rich", "prometheus_client", "matplotlib")

_HELP_IN_A_FRESH_PROCESS = """
import contextlib, io, sys
import flatout.cli
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        flatout.cli.main(sys.argv[1:] + ["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
assert "usage: flatout" in out.getvalue(), out.getvalue()
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
assert not heavy, f"imported to build the parser: {{heavy}}"
"""


def _pyproject_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("argv", [[]] + [[name] for name in COMMANDS],
                         ids=["flatout"] + COMMANDS)
def test_help_imports_no_torch(argv: list[str]) -> None:
    code = _HELP_IN_A_FRESH_PROCESS.format(heavy=HEAVY)
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_version_is_the_pyproject_version(capsys: pytest.CaptureFixture[str]) -> None:
    import flatout

    assert flatout.__version__ == _pyproject_version()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"flatout {_pyproject_version()}\n"


def test_version_from_the_command_line() -> None:
    r = subprocess.run([sys.executable, "-m", "flatout.cli", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, f"flatout {_pyproject_version()}\n")


def test_help_lists_every_command_with_its_line(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per command
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, help_text, *_ in _COMMANDS:
        assert re.search(rf"^ +{name} +{re.escape(help_text)}$", out, re.M), (name, out)


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_dash_m_flatout_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "flatout", "--version"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d+\.\d+", done.stdout), done.stdout
    bad = subprocess.run([sys.executable, "-m", "flatout", "no-such-command"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "usage: flatout" in bad.stderr, bad.stderr
