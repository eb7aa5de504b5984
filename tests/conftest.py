"""Session-wide guards.

- The host's own mount table must be exactly as the tests found it. Every real mount belongs in
  a private namespace (tests/support/nsutil.py). If a test leaks one into the host's namespace,
  the whole run fails and names the difference.
- The suite must pass on a real Kubernetes node, where owner processes run outside the tests'
  control. So for the whole session, decoy ``calico-node``, ``calico-felix``, ``cilium-agent``
  and ``kubelet`` processes run on the host and in an unrelated container (another PID
  namespace). A test that sees them has escaped its PID namespace: its verdicts turn "in use"
  or "held" and it fails. CMR_TEST_DECOYS=0 leaves them out, for debugging only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

DECOY_NAMES = ("calico-node", "calico-felix", "cilium-agent", "kubelet")
DECOYS_ENV = "CMR_TEST_DECOYS"


def _host_mounts() -> set[str]:
    # Compare on (mount point, fstype, source): mount IDs and options can shift innocently.
    with open("/proc/self/mountinfo") as f:
        rows = set()
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            rows.add(f"{fields[4]} {fields[sep + 1]} {fields[sep + 2]}")
        return rows


_BEFORE: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE.update(_host_mounts())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    after = _host_mounts()
    added, removed = sorted(after - _BEFORE), sorted(_BEFORE - after)
    if added or removed:
        sys.stderr.write(
            "\nHOST MOUNT TABLE CHANGED during the tests (a test escaped its namespace):\n"
            + "".join(f"  + {r}\n" for r in added)
            + "".join(f"  - {r}\n" for r in removed)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def decoy_owners() -> Iterator[list[int]]:
    """Owner-named processes on the host and in another PID namespace; yields their host PIDs."""
    if os.environ.get(DECOYS_ENV, "1") == "0":
        yield []
        return
    with tempfile.TemporaryDirectory(prefix="cmr-decoys-") as bin_dir:
        for name in DECOY_NAMES:  # a copy of sleep: comm and argv[0] are the owner's name
            shutil.copy("/bin/sleep", os.path.join(bin_dir, name))
        host = [subprocess.Popen([os.path.join(bin_dir, n), "infinity"]) for n in DECOY_NAMES]
        start_all = "".join(f'"{bin_dir}/{n}" infinity & ' for n in DECOY_NAMES)
        pid_namespace = ["unshare", "-p", "--fork", "--kill-child", "--mount-proc", "-m"]
        container = subprocess.Popen(
            [*pid_namespace, "sh", "-c", f"{start_all}echo ready; wait"], stdout=subprocess.PIPE
        )
        try:
            assert container.stdout is not None
            if container.stdout.readline().strip() != b"ready":
                raise RuntimeError("could not start the decoys in their own PID namespace")
            pids = _decoy_pids(bin_dir)
            # Both sets must be there and named as owners: else the guard proves nothing.
            assert len(pids) == 2 * len(DECOY_NAMES), pids
            yield pids
        finally:
            container.kill()  # --kill-child: the namespace's processes go with it
            container.wait()
            for proc in host:
                proc.kill()
                proc.wait()


def _decoy_pids(bin_dir: str) -> list[int]:
    """Host PIDs of the decoys, found as the product finds owners (name), waiting for exec."""
    from calico_mount_reaper.liveness import find_owners, scan_processes

    deadline = time.monotonic() + 10
    while True:
        found = find_owners(scan_processes(), DECOY_NAMES)
        pids = sorted(pid for pids in found.values() for pid in pids)
        mine = [p for p in pids if _exe_dir(p) == bin_dir]
        if len(mine) == 2 * len(DECOY_NAMES) or time.monotonic() > deadline:
            return mine
        time.sleep(0.01)


def _exe_dir(pid: int) -> str:
    try:
        return os.path.dirname(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""
