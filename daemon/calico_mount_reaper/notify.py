"""sd_notify(3) for the daemon: READY, STATUS, STOPPING, EXTEND_TIMEOUT_USEC and the watchdog.

A thin layer over the ``sdnotify`` package (0.3.1 and 0.3.2 have the same code). What it adds:
- sdnotify reads NOTIFY_SOCKET in its constructor and, without ``debug=True``, swallows every
  error (a bare ``except``), so a wrong socket would go unnoticed. We build it with
  ``debug=True`` only when NOTIFY_SOCKET is set, catch OSError ourselves, log the first failure
  of an outage and reconnect on the next message. With NOTIFY_SOCKET unset everything is a no-op.
- sdnotify encodes Latin-1 and raises on anything else; STATUS= is meant as one ASCII line, so
  status texts (which may quote odd mount point names) are sanitized here.
- ``@name`` addresses (abstract namespace) are translated by sdnotify itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"[\t\n\r\v\f]+")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")


def ascii_line(text: str) -> str:
    """One line of printable ASCII: line breaks and tabs become spaces, anything else ``?``."""
    return _NOT_PRINTABLE_ASCII.sub("?", _WHITESPACE.sub(" ", text))


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if none are wanted.

    As sd_watchdog_enabled(3): WATCHDOG_PID, when set, must be our PID, otherwise the variables
    were inherited from a parent and are not meant for us.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        owner = environ.get("WATCHDOG_PID")
        if owner is not None and int(owner) != (os.getpid() if pid is None else pid):
            return None
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends notifications to the service manager named by NOTIFY_SOCKET, if any."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier: SystemdNotifier | None = None
        self._failing = False

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        self._send(None, text)

    def stopping(self, status: str | None = None) -> None:
        self._send("STOPPING=1", status)

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the start/stop timeout fires (e.g. a long final reap)."""
        if seconds <= 0:
            raise ValueError(f"extend_timeout needs a positive duration, got {seconds}")
        self._send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}", None)

    def watchdog_ping(self) -> None:
        self._send("WATCHDOG=1", None)

    def _send(self, assignment: str | None, status: str | None) -> None:
        if not self.enabled:
            return
        lines = [assignment] if assignment else []
        if status is not None:
            lines.append(f"STATUS={ascii_line(status)}")
        try:
            if self._notifier is None:
                self._notifier = SystemdNotifier(debug=True)
                # A service manager that does not read its socket must not freeze our loop:
                # a full queue makes sendto fail with EAGAIN (logged, dropped) instead.
                self._notifier.socket.setblocking(False)
            self._notifier.notify("\n".join(lines))
        except OSError as exc:
            self._drop()
            if not self._failing:
                self._failing = True
                log.warning(
                    "cannot notify the service manager at %s: %s",
                    os.environ.get("NOTIFY_SOCKET"),
                    exc,
                )
            return
        self._failing = False

    def _drop(self) -> None:
        """Forget the connection so the next message connects again (the socket may come back)."""
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None

    def close(self) -> None:
        self._drop()
