"""Session-wide guard: the host's own mount table must be exactly as the tests found it.

Every real mount belongs in a private namespace (tests/support/nsutil.py). If a test leaks one
into the host's namespace, the whole run fails and names the difference.
"""

from __future__ import annotations

import sys

import pytest


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
