"""A private system-like bus: a real dbus-daemon plus the fake systemd/logind on it.

Shared by the systemd source tests and the daemon tests. The bus daemon is real; only the peer
is a stand-in (tests/support/fake_systemd.py), because PID 1 here is not systemd.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

# No <servicedir>: a session-bus config would try to *activate* org.freedesktop.systemd1 when the
# fake is down, which hangs or fails in confusing ways. Everyone may own and talk, as in a test.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""


class Bus:
    """A private dbus-daemon plus the fake systemd/logind on it; both restartable."""

    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.config = tmp / "bus.conf"
        self.config.write_text(BUS_CONFIG.format(socket=self.socket))
        self.daemon: subprocess.Popen[str] | None = None
        self.fake: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.daemon = subprocess.Popen(
            ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # it complains it may not raise its fd limit; harmless
            text=True,
        )
        assert self.daemon.stdout is not None
        assert self.daemon.stdout.readline().startswith(self.address)
        self.fake = subprocess.Popen(
            [sys.executable, str(HERE / "fake_systemd.py"), self.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.fake.stdout is not None
        assert self.fake.stdout.readline().strip() == "READY"

    def tell(self, command: str) -> str:
        """One command to the fake; returns after the signals it emits have left the fake."""
        assert self.fake is not None and self.fake.stdin and self.fake.stdout
        self.fake.stdin.write(command + "\n")
        self.fake.stdin.flush()
        reply = self.fake.stdout.readline().strip()
        assert reply.startswith("OK"), reply
        return reply

    def subscribes(self) -> int:
        return int(self.tell("subscribes").split()[-1])

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.daemon.wait()

    def stop(self) -> None:
        for proc in (self.fake, self.daemon):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()
                for stream in (proc.stdin, proc.stdout):
                    if stream is not None:
                        stream.close()
        self.fake = self.daemon = None
