"""The systemd/logind event source against a real dbus-daemon and a fake systemd on it.

The bus daemon is real (a private ``dbus-daemon`` with a system-bus-like config in a temp dir),
and pystemd talks sd-bus to it exactly as on a node. Only the peer is a stand-in
(tests/support/fake_systemd.py), because PID 1 here is not systemd; real systemd is the e2e
suite's job.
"""

from __future__ import annotations

import selectors
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from calico_mount_reaper.model import KubeletSource
from calico_mount_reaper.sources.systemd import (
    BusLost,
    BusUnavailable,
    Decommissioned,
    KubeletChanged,
    ShuttingDown,
    SystemdEvent,
    SystemdWatch,
    kubelet_from_dbus,
)

from tests.support.system_bus import Bus

pytest.importorskip("pystemd")
pytest.importorskip("dbus_next")
if shutil.which("dbus-daemon") is None:
    pytest.skip(
        "dbus-daemon is not installed (apt-get install dbus-daemon)", allow_module_level=True
    )


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    b = Bus(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def watch(bus: Bus) -> Iterator[SystemdWatch]:
    w = SystemdWatch(address=bus.address)
    w.connect()
    w.process()  # whatever connecting queued (NameAcquired and the like)
    try:
        yield w
    finally:
        w.close()


def readable(watch: SystemdWatch, timeout: float = 0.0) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(watch.fileno(), selectors.EVENT_READ)
        return bool(sel.select(timeout))


def events_until(
    watch: SystemdWatch, done: Callable[[list[SystemdEvent]], bool], timeout: float = 3.0
) -> list[SystemdEvent]:
    """Run the loop as the daemon would (select on the fd, then process) until ``done``."""
    seen: list[SystemdEvent] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(watch.fileno(), selectors.EVENT_READ)
        while not done(seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out; events so far: {seen}")
            if sel.select(left):
                seen.extend(watch.process())
    return seen


def of_type(events: list[SystemdEvent], kind: type) -> list[SystemdEvent]:
    return [e for e in events if isinstance(e, kind)]


def test_connect_reads_kubelet_and_subscribes(bus: Bus, watch: SystemdWatch) -> None:
    state = watch.kubelet()
    assert (state.active, state.source, state.load_state, state.unit_file_state) == (
        True,
        "dbus",
        "loaded",
        "enabled",
    )
    assert bus.subscribes() == 1


def test_kubelet_stopping_is_a_kubelet_changed_event(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("active kubelet.service inactive")
    events = events_until(watch, lambda seen: bool(seen))
    assert len(events) == 1 and isinstance(events[0], KubeletChanged)
    assert events[0].state.active is False
    assert not events[0].state.decommissioned
    assert "inactive" in events[0].state.detail


def test_other_units_do_not_wake_kubelet_logic(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("active containerd.service inactive")
    bus.tell("remove containerd.service")
    assert not readable(watch, 0.2) or watch.process() == []


@pytest.mark.parametrize(
    ("command", "load", "file_state"),
    [
        ("unitfile kubelet.service disabled", "loaded", "disabled"),
        ("unitfile kubelet.service masked", "masked", "masked"),
        ("remove kubelet.service", "not-found", ""),
    ],
)
def test_disable_mask_or_remove_is_decommission(
    bus: Bus, watch: SystemdWatch, command: str, load: str, file_state: str
) -> None:
    bus.tell(command)
    events = events_until(watch, lambda seen: bool(of_type(seen, Decommissioned)))
    changed = of_type(events, KubeletChanged)
    assert changed and changed[-1].state.load_state == load  # type: ignore[attr-defined]
    assert changed[-1].state.unit_file_state == file_state  # type: ignore[attr-defined]
    assert "kubelet.service" in of_type(events, Decommissioned)[0].reason  # type: ignore[attr-defined]


def test_re_enabling_is_not_decommission(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("unitfile kubelet.service enabled")
    assert not readable(watch, 1.0) or not of_type(watch.process(), Decommissioned)


def test_shutdown_job_is_shutting_down(bus: Bus, watch: SystemdWatch) -> None:
    assert watch.system_stopping() is False
    bus.tell("job multi-user.target")
    assert watch.system_stopping() is False
    bus.tell("job shutdown.target")
    events = events_until(watch, lambda seen: bool(seen))
    assert events == [ShuttingDown("systemd queued a job for shutdown.target")]
    assert watch.system_stopping() is True


def test_system_state_stopping(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("systemstate stopping")
    assert watch.system_stopping() is True


def test_prepare_for_shutdown(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("prepare false")  # a cancelled shutdown is no shutdown
    bus.tell("prepare true")
    events = events_until(watch, lambda seen: bool(seen))
    assert events == [ShuttingDown("logind announced PrepareForShutdown")]


def test_signals_queued_during_a_blocking_call_are_still_processed(bus: Bus) -> None:
    watch = SystemdWatch(address=bus.address)
    try:
        # Not drained on purpose: connecting leaves the bus daemon's NameAcquired, a message no
        # callback wants, at the head of sd-bus's queue, so one process() call alone finds nothing.
        watch.connect()
        bus.tell("active kubelet.service inactive")
        bus.tell("job reboot.target")
        # The blocking call reads both signals off the socket into sd-bus's queue while it waits
        # for its reply: the fd goes quiet though the signals are unseen. Only draining finds them.
        watch.system_stopping()
        assert not readable(watch)
        events = watch.process()
    finally:
        watch.close()
    assert ShuttingDown("systemd queued a job for reboot.target") in events
    changed = of_type(events, KubeletChanged)
    assert [e.state.active for e in changed] == [False]  # type: ignore[attr-defined]


def test_a_burst_is_drained_in_one_wake(bus: Bus, watch: SystemdWatch) -> None:
    bus.tell("burst kubelet.service 51")  # ends inactive
    assert readable(watch, 1.0)
    events = watch.process()
    assert events and events[-1] == KubeletChanged(watch.kubelet())
    assert watch.kubelet().active is False
    assert not readable(watch)
    assert watch.process() == []


def test_every_connect_subscribes_again(bus: Bus) -> None:
    watch = SystemdWatch(address=bus.address)
    try:
        for n in (1, 2, 3):
            watch.connect()
            assert bus.subscribes() == n
        bus.tell("active kubelet.service inactive")  # signals still reach the newest connection
        assert of_type(events_until(watch, lambda seen: bool(seen)), KubeletChanged)
    finally:
        watch.close()


def test_bus_daemon_dies_and_comes_back(bus: Bus, watch: SystemdWatch) -> None:
    with selectors.DefaultSelector() as sel:  # the daemon's loop, in short
        sel.register(watch, selectors.EVENT_READ)
        bus.kill_daemon()
        assert sel.select(3.0)
        events = watch.process()
        assert len(events) == 1 and isinstance(events[0], BusLost)
        assert watch.process() == []
        sel.unregister(watch)  # still possible after the loss: fileno() holds until close()
    watch.close()
    with pytest.raises(ValueError):
        watch.fileno()

    started = time.monotonic()
    with pytest.raises(BusUnavailable, match="DBUS_SYSTEM_BUS_ADDRESS"):
        watch.connect()
    assert time.monotonic() - started < 1.0

    bus.stop()
    bus.start()
    watch.connect()
    assert bus.subscribes() == 1  # the new systemd heard from us
    bus.tell("job poweroff.target")
    assert events_until(watch, lambda seen: bool(seen)) == [
        ShuttingDown("systemd queued a job for poweroff.target")
    ]


def test_fake_systemd_gone_but_bus_up_is_unavailable(bus: Bus) -> None:
    assert bus.fake is not None
    bus.fake.kill()
    bus.fake.wait()
    with pytest.raises(BusUnavailable):
        SystemdWatch(address=bus.address).connect()


def test_no_bus_at_all_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/nothing-here")
    started = time.monotonic()
    with pytest.raises(BusUnavailable, match="nothing-here"):
        SystemdWatch().connect()
    assert kubelet_from_dbus() is None
    assert time.monotonic() - started < 1.0


def test_system_bus_from_environment(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon passes no address: pystemd's DBus() honours DBUS_SYSTEM_BUS_ADDRESS.
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    watch = SystemdWatch()
    try:
        watch.connect()
        assert bus.subscribes() == 1
    finally:
        watch.close()
    state = kubelet_from_dbus()
    assert state is not None and state.source is KubeletSource.DBUS and state.active is True
    bus.tell("unitfile kubelet.service masked")
    masked = kubelet_from_dbus()
    assert masked is not None and masked.decommissioned


def test_close_is_idempotent(bus: Bus) -> None:
    watch = SystemdWatch(address=bus.address)
    watch.close()
    watch.connect()
    watch.close()
    watch.close()
    assert watch.process() == []
    with pytest.raises(BusUnavailable):
        watch.kubelet()
