"""Owner exits through pidfds, with real processes named like Calico's."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from calico_mount_reaper.liveness import find_owners, read_process, scan_processes
from calico_mount_reaper.sources.processes import OwnerExits

Spawn = Callable[[str], "subprocess.Popen[bytes]"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``sleep`` under another name (comm and argv[0]), e.g. ``calico-node``."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        link = tmp_path / name
        if not link.exists():
            link.symlink_to("/bin/sleep")
        proc = subprocess.Popen([str(link), "30"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def wait_readable(exits: OwnerExits, timeout: float) -> float | None:
    with selectors.DefaultSelector() as sel:
        sel.register(exits, selectors.EVENT_READ)
        start = time.monotonic()
        return time.monotonic() - start if sel.select(timeout) else None


def test_pidfds_are_supported_here() -> None:
    with OwnerExits() as exits:
        assert exits.supported


def test_owner_exit_is_seen_promptly(spawn: Spawn) -> None:
    node = spawn("calico-node")
    time.sleep(0.05)  # let exec finish so that comm is the new name
    # Other calico-node processes may live on the machine (other tests): ours must be among them.
    assert node.pid in find_owners(scan_processes(), ["calico-node"])["calico-node"]
    with OwnerExits() as exits:
        assert exits.watch([node.pid]) == []
        assert exits.watched == {node.pid}
        assert wait_readable(exits, 0.2) is None  # alive: no wakeup
        assert exits.drain() == []
        node.kill()
        latency = wait_readable(exits, 2)
        assert latency is not None and latency < 1.0
        assert exits.drain() == [node.pid]  # seen as a zombie already, before any wait()
        assert exits.watched == frozenset()
        assert wait_readable(exits, 0.1) is None  # drained: quiet again


def test_already_gone_is_reported_at_once(spawn: Spawn) -> None:
    proc = spawn("calico-felix")
    proc.kill()
    proc.wait()  # reaped: the PID no longer exists
    with OwnerExits() as exits:
        assert exits.watch([proc.pid]) == [proc.pid]
        assert exits.watched == frozenset()


def test_zombie_counts_as_exited(spawn: Spawn) -> None:
    proc = spawn("cilium-agent")
    proc.send_signal(signal.SIGKILL)
    time.sleep(0.1)  # a zombie now: pidfd_open succeeds, the pidfd is readable at once
    with OwnerExits() as exits:
        assert exits.watch([proc.pid]) == []
        assert exits.drain() == [proc.pid]


def test_watch_follows_the_wanted_set_and_leaks_no_fd(spawn: Spawn) -> None:
    a, b, c = spawn("calico-node"), spawn("calico-felix"), spawn("cilium-agent")
    before = open_fds()
    exits = OwnerExits()
    assert exits.watch([a.pid, b.pid]) == []
    assert len(open_fds() - before) == 3  # epoll + two pidfds
    assert exits.watch([b.pid, c.pid]) == []  # a's pidfd closed, c's opened
    assert exits.watched == {b.pid, c.pid}
    assert len(open_fds() - before) == 3
    a.kill()
    assert wait_readable(exits, 0.2) is None  # a is no longer watched
    b.kill()
    c.kill()
    assert wait_readable(exits, 2) is not None
    time.sleep(0.1)
    assert exits.drain() == sorted([b.pid, c.pid])
    assert len(open_fds() - before) == 1  # only the epoll fd left
    exits.close()
    assert open_fds() == before


def test_recycled_pid_that_fails_verification_counts_as_gone(spawn: Spawn) -> None:
    other = spawn("sleep-not-owner")

    def is_owner(pid: int) -> bool:
        p = read_process(pid)
        return p is not None and p.is_named("calico-node")

    before = open_fds()
    with OwnerExits() as exits:
        assert exits.watch([other.pid], verify=is_owner) == [other.pid]
        assert exits.watched == frozenset()
        assert len(open_fds() - before) == 1


def test_without_pidfd_it_watches_nothing(monkeypatch: pytest.MonkeyPatch, spawn: Spawn) -> None:
    # A kernel or Python without pidfd_open cannot be had here: take the function away.
    monkeypatch.delattr(os, "pidfd_open")
    node = spawn("calico-node")
    with OwnerExits() as exits:
        assert not exits.supported
        assert exits.watch([node.pid]) == []
        node.kill()
        assert wait_readable(exits, 0.2) is None  # still a valid, quiet fd for the loop
