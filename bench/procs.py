"""The processes a scenario watches: the real daemon and `findmnt --poll`, with every line
they print and every sd_notify message timestamped the moment it can be read.

One selector in the scenario's own thread reads them all, so a timestamp is taken as soon as
the kernel hands over the bytes: no reader threads competing for the GIL with the measurement.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from measure import Samples


def reaper_command() -> list[str]:
    """The console script as installed (``pip install -e .``), as an operator runs it.

    Not the pyenv shim on PATH (a shell script that execs pyenv first: +40 ms that are not
    ours) and not ``python -m``, whose startup differs.
    """
    script = Path(sysconfig.get_path("scripts")) / "calico-mount-reaper"
    if script.exists():
        return [str(script)]
    found = shutil.which("calico-mount-reaper")
    return [found] if found else [sys.executable, "-m", "calico_mount_reaper"]


class Lines:
    """A pipe read into timestamped lines."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.lines: list[tuple[float, str]] = []
        self._partial = b""
        self.eof = False

    def fileno(self) -> int:
        return self.fd

    def pump(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            *whole, self._partial = (self._partial + data).split(b"\n")
            self.lines.extend((now, line.decode("utf-8", "replace")) for line in whole)


class Datagrams:
    """A non-blocking datagram socket, drained on each wake of a selector: every message with
    the time of the wake it arrived by."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> Iterator[tuple[float, bytes]]:
        now = time.monotonic()
        while True:
            try:
                yield now, self.sock.recv(1 << 16)
            except BlockingIOError:
                return


class Notifications(Datagrams):
    """The notify socket: each sd_notify message with its arrival time."""

    def __init__(self, path: str) -> None:
        super().__init__(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK))
        self.sock.bind(path)
        self.lines: list[tuple[float, str]] = []

    def pump(self) -> None:
        self.lines.extend((now, message.decode()) for now, message in self.drain())


class Source(Protocol):
    """Anything `Watch` can wait on: an fd, and a way to read what arrived, timestamped."""

    def fileno(self) -> int: ...

    def pump(self) -> None: ...


class Watch:
    """Wait on several line sources at once."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def add(self, source: Source) -> None:
        self.selector.register(source, selectors.EVENT_READ)

    def remove(self, source: Source) -> None:
        self.selector.unregister(source)

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            key.fileobj.pump()  # type: ignore[union-attr]

    def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            self.poll(min(left, 0.5))

    def sleep(self, seconds: float) -> None:
        """Sleep, but keep reading (a full pipe would stall the process that writes it)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.poll(left)


def first(source: Lines | Notifications, text: str, since: int = 0) -> float | None:
    """Arrival time of the first line from index ``since`` on that contains ``text``."""
    for when, line in source.lines[since:]:
        if text in line:
            return when
    return None


class DaemonProc:
    """`calico-mount-reaper run` in the current (private) namespace."""

    def __init__(
        self, workdir: str, config: str, watch: Watch, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.config_path = os.path.join(workdir, "config.toml")
        with open(self.config_path, "w") as f:
            f.write(config)
        notify_path = os.path.join(workdir, "notify.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        self.notify = Notifications(notify_path)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_", "WATCHDOG_", "DBUS_", "JOURNAL_"))
        }
        self.env.update({"NOTIFY_SOCKET": notify_path, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.watch = watch
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: Lines | None = None
        self.started_at = 0.0
        self.cpu_at_exit = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [*reaper_command(), "run", "--config", self.config_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        assert self.proc.stderr is not None
        self.stderr = Lines(self.proc.stderr.fileno())
        self.watch.add(self.stderr)
        self.watch.add(self.notify)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_notify(self, text: str, timeout: float = 10) -> float:
        self.watch.until(lambda: first(self.notify, text) is not None, timeout, text)
        when = first(self.notify, text)
        assert when is not None
        return when

    def wait_log(self, text: str, since: int = 0, timeout: float = 10) -> float:
        assert self.stderr is not None
        err = self.stderr
        try:
            self.watch.until(lambda: first(err, text, since) is not None, timeout, text)
        except TimeoutError:
            raise TimeoutError(f"daemon never logged {text!r}:\n{self.log()}") from None
        when = first(err, text, since)
        assert when is not None
        return when

    def log(self) -> str:
        return "\n".join(line for _, line in self.stderr.lines) if self.stderr else ""

    def stop(self, timeout: float = 30) -> tuple[float, int]:
        """SIGTERM; returns (seconds to exit, exit code). `cpu_at_exit` is then the CPU
        seconds (user + sys) the daemon used in its whole life, from wait4."""
        assert self.proc is not None and self.stderr is not None
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        deadline = sent + timeout
        while (status := os.wait4(self.proc.pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            time.sleep(0.001)
        took = time.monotonic() - sent
        _, code_status, usage = status
        code = self.proc.returncode = os.waitstatus_to_exitcode(code_status)
        self.cpu_at_exit = usage.ru_utime + usage.ru_stime
        self.stderr.pump()
        self.watch.remove(self.stderr)
        self.watch.remove(self.notify)
        self.notify.sock.close()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return took, code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class FindmntPoll:
    """`findmnt --poll`: libmount re-reads and diffs the table on every change, and prints it."""

    def __init__(self, watch: Watch) -> None:
        self.proc = subprocess.Popen(
            ["findmnt", "--poll", "-n", "-o", "ACTION,TARGET"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout.fileno())
        watch.add(self.out)
        self.watch = watch

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.watch.remove(self.out)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def run_quiet(
    argv: Sequence[str], cpu: Samples | None = None, env: Mapping[str, str] | None = None
) -> float:
    """Wall milliseconds of one process run to completion, output discarded; its CPU time
    (user + sys, from wait4) goes into ``cpu``: on a busy machine wall time includes the wait
    for a free CPU, CPU time does not."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = (time.perf_counter() - start) * 1000
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    if cpu is not None:
        cpu.add((usage.ru_utime + usage.ru_stime) * 1000)
    return wall
