"""README.md's install steps, as an operator runs them, on Debian 12 and Debian 13.

Each test boots that release's systemd (252 on bookworm, 257 on trixie) and follows the README:
- the package: `apt install ./calico-mount-reaper_*_all.deb`, then lintian of that release;
- pip in a venv: `python3 -m venv`, `pip install`, `install-units`, `systemctl enable --now`,
  and back out with `uninstall-units`.

The guest has no network, so pip is given the same packages from a local directory (downloaded
here from PyPI for the guest's Python: ``--no-index --find-links``), the one departure from the
README's commands. pystemd still builds from source in the guest, with the build dependencies
the README names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.conftest import unavailable
from tests.e2e.operator_env import SUITES, lower_for
from tests.test_packaging import DEB_VERSION, VERSION, build_packages

pytestmark = pytest.mark.e2e

UNIT = "calico-mount-reaper.service"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
GUEST_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
VENV = "/opt/calico-mount-reaper"
REPO = harness.REPO_ROOT
SOURCES = "pystemd,pyudev,sdnotify"  # built in the guest, as on a node


def boot(lower: Path, run_dir: Path, files: dict[str, harness.FileSource]) -> harness.Container:
    """A booted node with kubelet installed (not running): nothing holds a mount."""
    kubelet = {"/etc/systemd/system/kubelet.service": harness.DUMMY_KUBELET_UNIT}
    return harness.boot(lower, run_dir, files={**kubelet, **files}, timeout=120)


def service_is_up(c: harness.Container) -> None:
    assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
    c.wait_for(
        lambda: c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active",
        timeout=30,
        what=f"{UNIT} to be active",
    )


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_readme_package_install_enables_the_service_and_is_lintian_clean(
    suite: str,
    operator_rootfs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    lower = lower_for(suite, operator_rootfs, tmp_path_factory)
    deb = build_packages(tmp_path_factory) / f"calico-mount-reaper_{DEB_VERSION}_all.deb"
    guest_deb = f"/root/{deb.name}"
    with boot(lower, tmp_path / "run", {guest_deb: deb}) as c:
        c.run(["systemctl", "enable", "kubelet.service"])
        # README: sudo apt install ./calico-mount-reaper_<version>_all.deb
        done = c.run(["apt-get", "install", "-y", guest_deb], env=APT_ENV, timeout=180)
        assert "Setting up calico-mount-reaper" in done.stdout, done.stdout
        service_is_up(c)
        assert c.run(["calico-mount-reaper", "--version"]).stdout == (
            f"calico-mount-reaper {VERSION}\n"
        )
        status = json.loads(c.run(["calico-mount-reaper", "status", "--json"]).stdout)
        assert status["error"] is None and status["exit_code"] == 0
        # This release's lintian on the package built on the host (Debian 12).
        lint = c.run(
            ["lintian", "--fail-on", "error,warning", "--pedantic", guest_deb],
            check=False,
            timeout=300,
        )
        findings = [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")]
        assert lint.returncode == 0 and not findings, lint.stdout + lint.stderr
        c.run(["apt-get", "purge", "-y", "calico-mount-reaper"], env=APT_ENV, timeout=180)
        assert c.run(["systemctl", "show", "-P", "LoadState", UNIT]).stdout.strip() == "not-found"


def wheelhouse(dest: Path, python: str) -> Path:
    """What `pip install` fetches from PyPI, for the guest's Python, so the guest needs no net.

    The reaper's dependencies as sources (they build in the guest, as they would on a node),
    and the build tools and pystemd's binary dependencies as wheels for that Python.
    """
    pip = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(dest)]
    try:
        subprocess.run(
            # Only these as sources: ":all:" would extend to their build tools (Cython from
            # source takes many minutes).
            [*pip, "--no-deps", "--no-binary", SOURCES, *SOURCES.split(",")],
            check=True,
            timeout=300,
        )
        subprocess.run(
            [
                *pip,
                "--only-binary",
                ":all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "setuptools>=61",
                "wheel",
                "cython",
                "lxml",
                "psutil",
                "six",  # pyudev's dependency on the older releases
            ],
            check=True,
            timeout=300,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        unavailable(f"cannot download the guest's packages from PyPI: {exc}")
    return dest


def source_tree(dest: Path) -> Path:
    shutil.copytree(
        REPO,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv*", "tests", "dist", "build", "*.egg-info"),
    )
    return dest


def usr_local(c: harness.Container) -> str:
    """/usr/local as a listing of paths, modes and checksums: what uninstall must restore."""
    return c.run(
        "cd /usr/local && find . -printf '%p %m %y\\n' | sort && "
        "find . -type f -exec sha256sum {} + | sort"
    ).stdout


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_readme_pip_venv_install_then_uninstall_units(
    suite: str,
    operator_rootfs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    lower = lower_for(suite, operator_rootfs, tmp_path_factory)
    wheels = wheelhouse(tmp_path / "wheelhouse", GUEST_PYTHON[suite])
    src = source_tree(tmp_path / "src")
    files: dict[str, harness.FileSource] = {
        "/root/wheelhouse": wheels,
        "/root/calico-mount-reaper": src,
    }
    with boot(lower, tmp_path / "run", files) as c:
        before = usr_local(c)
        pip = f"{VENV}/bin/pip"
        c.run(["python3", "-m", "venv", VENV])
        c.run(
            [
                pip,
                "install",
                "--no-index",
                "--find-links",
                "/root/wheelhouse",
                "/root/calico-mount-reaper",
            ],
            timeout=600,
        )
        command = f"{VENV}/bin/calico-mount-reaper"
        assert c.run([command, "--version"]).stdout == f"calico-mount-reaper {VERSION}\n"
        installed = c.run([command, "install-units"]).stdout
        assert "Now run: systemctl daemon-reload" in installed, installed
        c.run("systemctl daemon-reload && systemctl enable --now calico-mount-reaper")
        service_is_up(c)
        main_pid = c.run(["systemctl", "show", "-P", "MainPID", UNIT]).stdout.strip()
        cmdline = c.run(["cat", f"/proc/{main_pid}/cmdline"]).stdout.split("\0")
        assert cmdline[1:3] == [command, "run"], cmdline
        docs = c.run(["systemctl", "show", "-P", "Documentation", UNIT]).stdout.strip()
        assert docs.strip('"') == "man:calico-mount-reaper(8)", docs  # a quoted list

        # Enabled, uninstall-units refuses: it would leave systemctl's links dangling.
        refused = c.run([command, "uninstall-units", "--json"], check=False)
        assert refused.returncode == 77, refused.stdout
        assert "systemctl disable --now" in json.loads(refused.stdout)["error"]
        c.run("systemctl disable --now calico-mount-reaper")
        c.run([command, "uninstall-units"])
        c.run("systemctl daemon-reload")
        assert c.run(["systemctl", "show", "-P", "LoadState", UNIT]).stdout.strip() == "not-found"
        assert usr_local(c) == before
