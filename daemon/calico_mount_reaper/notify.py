"""sd_notify(3) for the daemon: READY, STATUS, STOPPING, EXTEND_TIMEOUT_USEC and the watchdog.

A thin layer over the ``sdnotify`` package (0.3.1 and 0.3.2 have the same code). What it adds:
- sdnotify reads NOTIFY_SOCKET in its constructor and, without ``debug=True``, swallows every
  error (a bare ``except``), so a wrong socket would go unnoticed. We build it with
  ``debug=True`` only when NOTIFY_SOCKET is set, catch OSError ourselves, log the first failure
  of an outage and reconnect on the next message. With NOTIFY_SOCKET unset everything is a no-op.
- sdnotify encodes Latin-1 and raises on anything else; STATUS= is meant as one ASCII line, so
  status texts (which may quote odd mount point names) are sanitized here.
- ``@name`` addresses (abstract namespace) are translated by sdnotify itself.
- STATUS= goes out only when its text changes: the daemon sets it after every event, and PID 1
  has to parse every message, including while it is busy with a daemon-reload.
- A full socket queue (EAGAIN: PID 1 busy, typically during a package upgrade's daemon-reload)
  is not an outage. The message is kept and merged into the next one; READY=1 and STOPPING=1,
  which PID 1 must not miss, are also retried for a short while before returning. None of this
  is logged as a warning: it is normal, and it passes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"[\t\n\r\v\f]+")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# Waits before each retry of a message PID 1 must see (READY=1, STOPPING=1) on a full queue:
# 0.75 s in all, well inside TimeoutStartSec/TimeoutStopSec.
URGENT_RETRY_DELAYS = (0.01, 0.04, 0.2, 0.5)
_URGENT = ("READY", "STOPPING")


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

    def __init__(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier: SystemdNotifier | None = None
        self._failing = False
        self._sleep = sleep
        self._sent_status: str | None = None  # the STATUS= text PID 1 has
        # Not yet delivered (queue full): variable -> value, in order, merged with what follows.
        self._pending: dict[str, str] = {}

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
        if assignment:
            name, _, value = assignment.partition("=")
            self._pending[name] = value
        if status is not None:
            line = ascii_line(status)
            if line != self._sent_status:
                self._pending["STATUS"] = line
            else:
                self._pending.pop("STATUS", None)  # PID 1 already shows it
        if not self._pending:
            return
        urgent = any(name in self._pending for name in _URGENT)
        for delay in (*URGENT_RETRY_DELAYS, None) if urgent else (None,):
            try:
                self._deliver()
                return
            except BlockingIOError:
                if delay is None:
                    log.debug("service manager busy (notify queue full); sending with the next")
                    return
                self._sleep(delay)
            except OSError as exc:
                self._outage(exc)
                return

    def _deliver(self) -> None:
        if self._notifier is None:
            self._notifier = SystemdNotifier(debug=True)
            # A service manager that does not read its socket must not freeze our loop: a
            # full queue makes sendto fail with EAGAIN (kept for later) instead.
            self._notifier.socket.setblocking(False)
        self._notifier.notify("\n".join(f"{k}={v}" for k, v in self._pending.items()))
        self._sent_status = self._pending.get("STATUS", self._sent_status)
        self._pending.clear()
        self._failing = False

    def _outage(self, exc: OSError) -> None:
        """The socket is gone or refuses: warn once per outage, and reconnect next time."""
        self._drop()
        self._pending.clear()  # a new manager (or none) will not want the old messages
        self._sent_status = None  # nor does it know our status
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot notify the service manager at %s: %s",
                os.environ.get("NOTIFY_SOCKET"),
                exc,
            )

    def _drop(self) -> None:
        """Forget the connection so the next message connects again (the socket may come back)."""
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None

    def close(self) -> None:
        self._drop()
