"""`tests/run` on a Debian 12 whose only Python is Debian's: the project venv route, proven.

Debian's python3 has no pip and is externally managed (PEP 668), so `tests/run` must install
python3-venv with apt and put the Python side into .venv/ made from /usr/bin/python3, never into
the system. The guest is the e2e rootfs (debootstrap minbase of bookworm: Debian's python3, no
pip), booted with systemd as PID 1 and the host's network for apt and PyPI; the checkout is a
copy of what git tracks, nothing built or installed beforehand.

Narrowed to what proves the install route: apt (with its lock wait), the venv, pip's editable
install with pystemd built against libsystemd, and a run of the linters and the pure-core tests
from the venv. The mount, namespace and systemd tests need capabilities and a kernel view that
a container does not give (nspawn drops CAP_SYS_ADMIN over the host's mounts and filters
mount(2) in nested user namespaces), and the rest of this suite runs them on the host; the
decoy owners (tests/conftest.py) are left out for the same reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Boot

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SRC = "/src"
# Pure and lint tests: no mounts, no namespaces, no systemd, but the whole toolchain.
PROOF_TESTS = ("tests/test_lint.py", "tests/test_schedule.py", "tests/test_plan.py")


def host_pip_trust() -> tuple[dict[str, harness.FileSource], dict[str, str]]:
    """The CA bundle the host's pip is told to trust (PIP_CERT or pip.conf's cert), for the
    guest's pip: a network that re-signs TLS needs it, as apt needs the host's mirror."""
    cert = os.environ.get("PIP_CERT", "")
    if not cert:
        found = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.cert"],
            capture_output=True,
            text=True,
        )
        cert = found.stdout.strip() if found.returncode == 0 else ""
    if not cert or not Path(cert).is_file():
        return {}, {}
    guest = "/etc/host-pip-ca.crt"
    return {guest: Path(cert)}, {"PIP_CERT": guest}


def clean_checkout() -> dict[str, harness.FileSource]:
    """Every file git tracks, as it is in the working tree (a fresh clone's content)."""
    names = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return {f"{SRC}/{name}": REPO / name for name in names if name and (REPO / name).exists()}


def test_tests_run_installs_into_a_project_venv_from_debians_python(boot: Boot) -> None:
    trust_files, trust_env = host_pip_trust()
    files = {**clean_checkout(), **trust_files}
    c = boot(files=files, install_project=False, host_network=True, timeout=120)
    # The premise: Debian's python3 cannot take a pip install.
    assert c.run(["python3", "-c", "import pip"], check=False).returncode != 0
    assert c.run("ls /usr/lib/python3*/EXTERNALLY-MANAGED", check=False).returncode == 0
    assert c.run(["test", "-e", f"{SRC}/.venv"], check=False).returncode != 0

    started = time.monotonic()
    command = f"cd {SRC} && tests/run -m 'not e2e' -q -p no:cacheprovider " + " ".join(PROOF_TESTS)
    done = c.run(command, check=False, timeout=1200, env={"CMR_TEST_DECOYS": "0", **trust_env})
    took = time.monotonic() - started
    harness.record("fresh Debian tests/run", took)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "tests/run: creating .venv from /usr/bin/python3" in done.stdout, done.stdout[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-3000:]

    # The venv is Debian's python3, and the system python3 was left alone.
    base = c.run([f"{SRC}/.venv/bin/python", "-c", "import sys; print(sys.base_prefix)"])
    assert base.stdout.strip() == "/usr", base.stdout
    system = c.run(["python3", "-c", "import calico_mount_reaper"], check=False)
    assert system.returncode != 0, "the package leaked into the system python3"
