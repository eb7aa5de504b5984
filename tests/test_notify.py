"""notify.py against real AF_UNIX datagram sockets that the tests bind and read."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from calico_mount_reaper.notify import Notifier, ascii_line, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def _nothing_queued(sock: socket.socket) -> bool:
    sock.settimeout(0.1)
    try:
        sock.recv(4096)
    except socket.timeout:
        return True
    return False


def test_messages_arrive_as_sd_notify_datagrams(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready("watching 2 targets; 1 mounted, held by kubelet")
    notifier.status("reaping /run/calico/cgroup")
    notifier.watchdog_ping()
    notifier.extend_timeout(2.5)
    notifier.stopping("final reap")
    got = [notify_socket.recv(4096) for _ in range(5)]
    assert got == [
        b"READY=1\nSTATUS=watching 2 targets; 1 mounted, held by kubelet",
        b"STATUS=reaping /run/calico/cgroup",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=2500000",
        b"STOPPING=1\nSTATUS=final reap",
    ]
    notifier.close()


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"calico-mount-reaper-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        Notifier().ready()
        assert sock.recv(4096) == b"READY=1"


def test_status_is_one_ascii_line(notify_socket: socket.socket) -> None:
    Notifier().status("mount /run/calico/a\nb caf\u00e9\x00 \U0001f600\tdone")
    assert notify_socket.recv(4096) == b"STATUS=mount /run/calico/a b caf?? ? done"
    assert ascii_line(os.fsdecode(b"/run/\xff")) == "/run/?"


def test_no_notify_socket_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch, notify_log: ListHandler
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert notifier.enabled is False
    notifier.ready("x")
    notifier.watchdog_ping()
    notifier.stopping()
    assert notify_log.records == []


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def notify_log() -> Iterator[ListHandler]:
    """Records of the notify logger itself, whatever the package logger's propagation."""
    handler, logger = ListHandler(), logging.getLogger("calico_mount_reaper.notify")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_lost_socket_is_reported_once_and_reconnected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notify_log: ListHandler
) -> None:
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    notifier.ready()  # the socket does not exist yet
    notifier.watchdog_ping()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        notifier.status("back")
        assert sock.recv(4096) == b"STATUS=back"
    os.unlink(path)  # the manager went away after we had connected
    notifier.watchdog_ping()
    notifier.watchdog_ping()
    warnings = [r.getMessage() for r in notify_log.records]
    assert len(warnings) == 2, warnings
    assert all(r.levelno == logging.WARNING for r in notify_log.records)
    assert all(w.startswith(f"cannot notify the service manager at {path}: ") for w in warnings)
    assert "No such file or directory" in warnings[0]
    assert "Connection refused" in warnings[1]


def test_extend_timeout_needs_a_positive_duration(notify_socket: socket.socket) -> None:
    with pytest.raises(ValueError):
        Notifier().extend_timeout(0)
    assert _nothing_queued(notify_socket)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=4242) == expected


def test_watchdog_interval_defaults_to_our_own_pid() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ) == 0.5


def test_a_manager_that_stops_reading_never_blocks_the_daemon(
    notify_socket: socket.socket, notify_log: ListHandler
) -> None:
    # The test's socket is never read: its queue fills, and a blocking sendto would hang here.
    # A full queue is PID 1 being busy, not an outage: nothing is logged as a warning.
    notifier = Notifier(sleep=_no_sleep)
    for _ in range(5000):
        notifier.watchdog_ping()
    assert [r for r in notify_log.records if r.levelno >= logging.WARNING] == []


def _no_sleep(seconds: float) -> None:
    pass


def _fill(sock_path: str) -> socket.socket:
    """A sender whose datagrams to ``sock_path`` no longer fit: the next sendto is EAGAIN."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"FILL=1", sock_path)
    except BlockingIOError:
        return filler


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.settimeout(0.1)
    try:
        while True:
            got.append(sock.recv(4096))
    except socket.timeout:
        return [g for g in got if g != b"FILL=1"]


def test_status_is_sent_only_when_its_text_changes(notify_socket: socket.socket) -> None:
    notifier = Notifier()
    notifier.ready("watching 1 target")
    notifier.status("watching 1 target")  # unchanged: PID 1 already shows it
    notifier.watchdog_ping()
    notifier.status("watching 1\ttarget")  # the same line once made ASCII
    notifier.status("reaping /run/calico/cgroup")
    notifier.stopping("reaping /run/calico/cgroup")
    assert _drain(notify_socket) == [
        b"READY=1\nSTATUS=watching 1 target",
        b"WATCHDOG=1",
        b"STATUS=reaping /run/calico/cgroup",
        b"STOPPING=1",
    ]


def test_a_full_queue_keeps_the_message_for_the_next_send(
    notify_socket: socket.socket, tmp_path: Path, notify_log: ListHandler
) -> None:
    notifier = Notifier(sleep=_no_sleep)
    notifier.status("first")
    assert _drain(notify_socket) == [b"STATUS=first"]
    filler = _fill(str(tmp_path / "notify"))
    notifier.status("second")  # EAGAIN: kept
    notifier.watchdog_ping()  # EAGAIN: merged
    _drain(notify_socket)  # PID 1 catches up
    notifier.status("third")
    # One message with everything still worth saying; "second" was overtaken by "third".
    assert _drain(notify_socket) == [b"STATUS=third\nWATCHDOG=1"]
    assert [r for r in notify_log.records if r.levelno >= logging.WARNING] == []
    filler.close()


def test_ready_is_retried_until_the_busy_manager_reads(
    notify_socket: socket.socket, tmp_path: Path, notify_log: ListHandler
) -> None:
    waits: list[float] = []

    def manager_catches_up(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            _drain(notify_socket)

    notifier = Notifier(sleep=manager_catches_up)
    filler = _fill(str(tmp_path / "notify"))
    notifier.ready("watching")
    # READY=1 is not left for a later message that may never come before TimeoutStartSec.
    assert _drain(notify_socket) == [b"READY=1\nSTATUS=watching"]
    assert len(waits) == 2
    assert [r for r in notify_log.records if r.levelno >= logging.WARNING] == []
    filler.close()
