"""The real daemon (tests/daemon_harness.py), optionally started behind a wrapper command.

A wrapper (``setpriv ...``, ``no_netlink.py``) puts the daemon process itself under a fault;
everything else (namespace, notify socket, log) is the shared harness.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from daemon_harness import DaemonRun

HERE = Path(__file__).parent
NO_NETLINK = [sys.executable, str(HERE / "no_netlink.py")]


class WrappedDaemon(DaemonRun):
    def __init__(self, tmp: Path, wrapper: list[str] | None = None, **kw: Any) -> None:
        super().__init__(tmp, **kw)
        self.wrapper = wrapper or []

    def start(self, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env.update({"NOTIFY_SOCKET": self.notify_path, "PYTHONUNBUFFERED": "1"})
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = self.shell.popen(
                [*self.wrapper, sys.executable, "-m", "calico_mount_reaper", "run", "--config",
                 str(self.config_path), *extra],
                stdout=log, stderr=log, env=env,
            )

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def fd_count(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
