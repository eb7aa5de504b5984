"""The oldest dependencies the package claims to work with, on the oldest Python it supports.

pyproject.toml's floors (``pystemd>=0.11``, ``pyudev>=0.22``...) are promises to distributions:
RHEL 9 ships pyudev 0.22, Debian 12 pystemd 0.11 and sdnotify 0.3.1. This test installs exactly
those floor versions with pip into a virtualenv of the oldest supported Python (built once, kept
in .venv-floor/), and runs the tests that exercise each dependency there.

It needs a Python 3.9 interpreter: $CMR_FLOOR_PYTHON, else python3.9 on PATH, else pyenv's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OLDEST = PROJECT["requires-python"].removeprefix(">=")  # "3.9"
VENV = REPO / ".venv-floor"
# The tests that drive each dependency: pystemd (D-Bus), pyudev (netlink), sdnotify, tomli (the
# config on < 3.11) and the CLI as a whole.
TESTS = (
    "tests/test_sources_systemd.py",
    "tests/test_sources_udev.py",
    "tests/test_notify.py",
    "tests/test_config.py",
    "tests/test_cli.py",
)


def floor_pins() -> list[str]:
    """Every runtime dependency pinned to its floor: "pyudev>=0.22" -> "pyudev==0.22"."""
    pins = []
    for spec in PROJECT["dependencies"]:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)\s*(;.*)?", spec)
        assert found, f"{spec}: every dependency needs a >= floor"
        pins.append(f"{found.group(1)}=={found.group(2)}")
    return pins


def oldest_python() -> str | None:
    wanted = f"python{OLDEST}"
    candidates = [os.environ.get("CMR_FLOOR_PYTHON"), shutil.which(wanted)]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(f"{root}/versions/{OLDEST}.*/bin/{wanted}"), reverse=True)
    for candidate in filter(None, candidates):
        done = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0 and done.stdout.strip() == OLDEST:
            return candidate
    return None


def floor_venv(python: str) -> Path:
    """.venv-floor with the floor pins, rebuilt when the pins change."""
    pins = floor_pins()
    stamp = VENV / "floor-pins.txt"
    wanted = "\n".join(pins) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        return VENV
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # pystemd builds from source here: libsystemd-dev, pkg-config, gcc and python3-dev (tests/run).
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([*pip, "pytest", "hypothesis", "dbus-next"], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True)
    stamp.write_text(wanted)
    return VENV


def test_floor_pins_are_read_from_pyproject() -> None:
    pins = floor_pins()
    assert "pyudev==0.22" in pins  # RHEL 9's python3-pyudev
    assert "pystemd==0.11" in pins and "sdnotify==0.3.1" in pins  # Debian 12's


def test_the_floor_versions_pass_on_the_oldest_python() -> None:
    python = oldest_python()
    if python is None:
        pytest.skip(f"no Python {OLDEST} here (set CMR_FLOOR_PYTHON, or install it with pyenv)")
    venv = floor_venv(python)
    installed = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    for pin in floor_pins():
        name, version = pin.lower().split("==")
        assert re.search(rf"(?m)^{re.escape(name)}=={re.escape(version)}(\.0)*$", installed), pin
    done = subprocess.run(
        [str(venv / "bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
