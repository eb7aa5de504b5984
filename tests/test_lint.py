"""The linters as tests, so that `tests/run` (and CI, which runs it) fails on a violation.

- ``ruff check`` and ``ruff format --check`` over the repository;
- ``mypy --strict`` on the package at the oldest Python it supports (``requires-python``) and at
  the newest, since the package runs on both and each has code only the other sees (``tomli``
  below 3.11, for one);
- ``shellcheck`` on every shell script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "daemon" / "calico_mount_reaper"
# The newest Python release at the time of writing; raise it as new ones come out.
NEWEST_PYTHON = "3.14"
SHELL_SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")


def oldest_python() -> str:
    """The version ``requires-python`` names (``>=3.9``): the oldest the package supports."""
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'^requires-python\s*=\s*">=\s*(\d+\.\d+)"', text, re.M)
    assert found, 'pyproject.toml has no requires-python = ">=X.Y"'
    return found.group(1)


def tool(name: str) -> list[str]:
    """The tool as installed beside this interpreter (the project venv), as a module run."""
    return [sys.executable, "-m", name]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_check() -> None:
    out = run([*tool("ruff"), "check", "."])
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = run([*tool("ruff"), "format", "--check", "."])
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout + out.stderr


@pytest.mark.parametrize("version", [oldest_python(), NEWEST_PYTHON])
def test_mypy_strict(version: str) -> None:
    out = run([*tool("mypy"), "--strict", "--python-version", version, str(PACKAGE)])
    assert out.returncode == 0, out.stdout + out.stderr


def shell_scripts() -> list[Path]:
    """Every tracked file that starts with a shell shebang (they have no common suffix)."""
    try:
        listed = run(["git", "ls-files", "-z"])
    except FileNotFoundError:  # no git on this machine
        listed = subprocess.CompletedProcess([], returncode=127)
    if listed.returncode != 0:  # not a git checkout (a copy, a release tarball): walk the tree
        paths = [p for p in REPO.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    else:
        paths = [REPO / name for name in listed.stdout.split("\0") if name]
    scripts = []
    for path in paths:
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if SHELL_SHEBANG.match(f.readline()):
                    scripts.append(path)
    return sorted(scripts)


def test_shellcheck_on_every_shell_script() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail(
            "shellcheck is not installed (tests/run installs it: apt-get install shellcheck)"
        )
    scripts = shell_scripts()
    assert REPO / "tests" / "run" in scripts, scripts  # the finder itself must work
    out = run(["shellcheck", *map(str, scripts)])
    assert out.returncode == 0, out.stdout + out.stderr
