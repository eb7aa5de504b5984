"""Run the real daemon in private mount, PID and network namespaces and watch what it says.

The daemon is the real `calico-mount-reaper run` process. Its notify socket is a real AF_UNIX
datagram socket bound by the test; its log goes to a file (stderr with ``<N>`` prefixes, as
when there is no journal). Mounts and interfaces are made inside the namespace via nsenter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.nsutil import NamespaceShell, NsProcess


def owner_exe(directory: Path | str, name: str = "calico-node") -> str:
    """A copy of sleep under an owner's name: its comm and argv[0] are the owner's."""
    exe = os.path.join(directory, name)
    shutil.copy("/bin/sleep", exe)
    return exe


class DaemonRun:
    def __init__(
        self,
        tmp: Path,
        config: str = "grace_period = 1\n",
        env: dict[str, str] | None = None,
        net: bool = True,
        wrapper: Sequence[str] = (),
    ) -> None:
        """``wrapper`` (``setpriv ...``, a seccomp launcher) puts the daemon under a fault."""
        self.tmp = tmp
        self.wrapper = list(wrapper)
        self.config_path = tmp / "config.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / "daemon.log"
        self.notify_path = str(tmp / "notify.sock")
        self.env = env or {}
        self.shell = NamespaceShell(net=net)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[tuple[float, str]] = []
        self.proc: NsProcess | None = None

    def __enter__(self) -> DaemonRun:
        self.shell.__enter__()
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.05)
        return self

    def start(self, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env.update({"NOTIFY_SOCKET": self.notify_path, "PYTHONUNBUFFERED": "1"})
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = self.shell.popen(
                [
                    *self.wrapper,
                    sys.executable,
                    "-m",
                    "calico_mount_reaper",
                    "run",
                    "--config",
                    str(self.config_path),
                    *extra,
                ],
                stdout=log,
                stderr=log,
                env=env,
            )

    # ---- observing ----------------------------------------------------------------------------

    def collect(self, duration: float = 0.0) -> list[tuple[float, str]]:
        """Read notify messages for ``duration`` seconds (at least one poll)."""
        end = time.monotonic() + duration
        while True:
            try:
                data = self.notify.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))
                continue
            except (TimeoutError, socket.timeout):
                pass
            if time.monotonic() >= end:
                return self.messages

    def wait_notify(self, text: str, timeout: float = 10) -> float:
        """Wait for a notify message containing ``text``; returns when it arrived."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for when, msg in self.collect(0.05):
                if text in msg:
                    return when
        raise AssertionError(f"no notify message with {text!r}; got {self.messages}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log():
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"log has no {text!r}:\n{self.log()}")

    def wait_until(
        self, predicate: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return time.monotonic()
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    # ---- acting inside the namespace --------------------------------------------------------

    def sh(self, script: str) -> str:
        return self.shell.run(script).stdout

    def mount(self, fstype: str, path: str) -> None:
        self.shell.run(["mkdir", "-p", path])
        self.shell.run(["mount", "-t", fstype, "none", path])

    def mount_stack(self, path: str) -> None:
        """cgroup2 / tmpfs / cgroup2 at ``path``, as Calico and its propagated copies leave it."""
        for fstype in ("cgroup2", "tmpfs", "cgroup2"):
            self.mount(fstype, path)

    def mounted(self, path: str) -> int:
        from calico_mount_reaper.mountinfo import parse

        return sum(1 for m in parse(self.shell.mountinfo()).mounts if m.mount_point == path)

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def fd_count(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        self.shell.__exit__(*exc)
