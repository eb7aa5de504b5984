"""Signals as an event source: each one wakes the selector loop like any other source.

Python runs a signal handler between two bytecodes of the main thread, which could be the middle
of a reap. So the handlers do nothing, and `signal.set_wakeup_fd` writes each signal's number
into a pipe that the loop selects on: a signal is then handled in order, between two steps.
"""

from __future__ import annotations

import os
import signal

WATCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)


class Signals:
    """``fileno()`` for the selector, `install` once the loop is ready, `drain` on each wake."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read

    def install(self) -> None:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in WATCHED:
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number

    def drain(self) -> bytes:
        """The numbers of the signals that arrived since the last drain (one byte each)."""
        try:
            return os.read(self._read, 64)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._read)
        os.close(self._write)
