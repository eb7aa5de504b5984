"""Fault launchers for the real daemon (tests/support/daemon_harness.py's DaemonRun ``wrapper``).

A wrapper (``setpriv ...``, ``no_netlink.py``) puts the daemon process itself under a fault;
everything else (namespace, notify socket, log) is the shared harness.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
NO_NETLINK = [sys.executable, str(HERE / "no_netlink.py")]
