"""Fault launchers for the real daemon (tests/support/daemon_harness.py's DaemonRun ``wrapper``).

A wrapper (``setpriv ...``, a seccomp refusal) puts the daemon process itself under a fault;
everything else (namespace, notify socket, log) is the shared harness.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

HERE = Path(__file__).parent


def refusing(what: str, error: int) -> list[str]:
    """Exec the daemon with the kernel refusing ``what`` with ``error`` (see refuse.py)."""
    return [sys.executable, str(HERE / "refuse.py"), what, str(error)]


# The kernel's answer to a socket family a profile does not allow.
NO_NETLINK = refusing("netlink", errno.EAFNOSUPPORT)
