"""The daemon's deadlines as data (schedule.py) and the stop decision (stopping.py): pure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from calico_mount_reaper.model import ReapOnStop
from calico_mount_reaper.schedule import (
    BUS_RETRY_FIRST,
    BUS_RETRY_MAX_WITH_SOCKET,
    BUS_RETRY_MAX_WITHOUT_SOCKET,
    ERROR_RETRY,
    REREAD_INTERVAL,
    Job,
    Schedule,
    ping_interval,
)
from calico_mount_reaper.stopping import GOING_DOWN, SERVICE_STOPPING, decide_stop
from hypothesis import given
from hypothesis import strategies as st


def due(s: Schedule, now: float) -> list[Job]:
    return [job for job in Job if s.is_due(job, now)]


def test_a_fresh_schedule_waits_for_the_ping_or_the_rescan() -> None:
    with_watchdog = Schedule.start(100.0, rescan_every=60.0, half_watchdog=90.0)
    assert with_watchdog.ping_at == 160.0  # the rescan interval is the shorter
    assert with_watchdog.timeout(100.0) == 60.0 and due(with_watchdog, 100.0) == []
    assert due(with_watchdog, 160.0) == [Job.PING, Job.RESCAN]
    without = Schedule.start(100.0, rescan_every=60.0, half_watchdog=None)
    assert without.ping_at is None and without.timeout(100.0) == 60.0
    assert ping_interval(5.0, 60.0) == 5.0


def test_jobs_run_in_the_order_that_carries_a_change_to_a_verdict() -> None:
    assert list(Job) == [Job.PING, Job.BUS_RETRY, Job.RESCAN, Job.REREAD, Job.EVALUATE]
    s = Schedule.start(0.0, 60.0, None).rescanned(60.0)
    assert s.is_due(Job.REREAD, 60.0) and s.rescan_at == 120.0  # the rescan asks for a re-read


def test_with_a_watchdog_the_rescan_rides_on_the_ping() -> None:
    s = Schedule.start(0.0, rescan_every=60.0, half_watchdog=90.0)
    s = s.pinged(59.0)  # a ping just before the rescan is due
    assert s.rescan_at == 60.0 and s.ping_at == 119.0
    assert s.timeout(59.0) == 60.0  # sleeps to the next ping, not to the rescan
    assert due(s, 119.0) == [Job.PING, Job.RESCAN]


def test_re_reads_are_coalesced_and_an_evaluation_comes_at_the_earliest_asked() -> None:
    s = Schedule.start(0.0, 60.0, None).mounts_changed(1.0)
    assert s.timeout(1.0) == 0.0
    s = s.reread_done(1.0).mounts_changed(1.01).mounts_changed(1.02)
    assert s.reread.due == pytest.approx(1.0 + REREAD_INTERVAL)
    s = s.evaluate_by(30.0).evaluate_by(5.0).evaluate_by(9.0)
    assert s.evaluate_at == 5.0
    assert s.evaluated().evaluate_at is None


def test_bus_retry_backs_off_from_1_s_to_10_s_while_the_socket_exists() -> None:
    s = Schedule.start(0.0, 60.0, half_watchdog=90.0)
    assert s.bus_outage_started
    waits, now = [], 0.0
    for _ in range(7):
        s = s.bus_failed(now, socket_present=True)
        waits.append(s.bus_retry_at - now)  # type: ignore[operator]
        assert not s.bus_outage_started
        now = s.bus_retry_at  # type: ignore[assignment]
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    # With the socket there, a retry wakes the loop itself, however far the next ping is.
    s = s.pinged(now).bus_failed(now, socket_present=True)
    assert s.timeout(now) == BUS_RETRY_MAX_WITH_SOCKET
    s = s.bus_connected()
    assert s.bus_retry_at is None and s.bus_backoff == BUS_RETRY_FIRST and s.bus_outage_started


def test_a_node_that_never_had_a_bus_socket_backs_off_to_a_minute_then_rides_the_pings() -> None:
    s = Schedule.start(0.0, rescan_every=600.0, half_watchdog=900.0)  # pings every 600 s
    waits = []
    for _ in range(8):
        before = s.bus_retry_at or 0.0
        s = s.bus_failed(before, socket_present=False)
        waits.append(s.bus_retry_at - before)  # type: ignore[operator]
        if waits[-1] < BUS_RETRY_MAX_WITHOUT_SOCKET:  # early at boot: dbus may be on its way
            assert s.timeout(before) == waits[-1]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert s.timeout(0.0) == 600.0  # the ping's deadline: an idle node wakes for pings only
    no_watchdog = Schedule.start(0.0, 600.0, None)
    for _ in range(8):
        no_watchdog = no_watchdog.bus_failed(0.0, socket_present=False)
    assert no_watchdog.timeout(0.0) == 60.0  # no pings to ride on: it wakes by itself


def test_once_on_the_bus_a_missing_socket_is_a_restart_retried_within_10_s() -> None:
    s = Schedule.start(0.0, rescan_every=600.0, half_watchdog=900.0).bus_connected()
    s = s.bus_lost(0.0)
    assert s.bus_retry_at == 1.0 and s.timeout(0.0) == 1.0
    for _ in range(8):
        s = s.bus_failed(s.bus_retry_at or 0.0, socket_present=False)  # dbus restarting
    assert s.bus_backoff == BUS_RETRY_MAX_WITH_SOCKET
    now = s.bus_retry_at - BUS_RETRY_MAX_WITH_SOCKET  # type: ignore[operator]
    assert s.timeout(now) == BUS_RETRY_MAX_WITH_SOCKET


def test_a_lost_bus_is_retried_after_1_s_even_after_a_long_outage_before() -> None:
    s = Schedule.start(0.0, 60.0, None)
    for _ in range(8):
        s = s.bus_failed(0.0, socket_present=False)
    s = s.bus_connected().bus_lost(100.0)
    assert s.bus_retry_at == 101.0 and not s.bus_outage_started
    assert s.bus_failed(101.0, True).bus_retry_at == 103.0


def test_after_an_error_everything_due_waits_but_nothing_is_dropped() -> None:
    s = Schedule.start(0.0, 60.0, None).mounts_changed(5.0).bus_failed(4.0, True)
    s = s.after_error(5.0)
    assert s.reread.due == 5.0 + ERROR_RETRY
    assert s.bus_retry_at == 5.0 + ERROR_RETRY
    assert s.evaluate_at == 5.0 + ERROR_RETRY
    assert due(s, 5.5) == [] and s.timeout(5.5) == pytest.approx(ERROR_RETRY - 0.5)


events = st.lists(
    st.tuples(
        st.sampled_from(["mounts", "reread", "evaluate", "ping", "bus-fail", "bus-ok", "error"]),
        st.floats(0, 5),
        st.booleans(),
    ),
    max_size=30,
)


def apply(s: Schedule, kind: str, now: float, dt: float, flag: bool) -> Schedule:
    if kind == "mounts":
        return s.mounts_changed(now)
    if kind == "reread":
        return s.reread_done(now)
    if kind == "evaluate":
        return s.evaluate_by(now + dt)
    if kind == "ping":
        return s.pinged(now)
    if kind == "bus-fail":
        return s.bus_failed(now, flag)
    if kind == "bus-ok":
        return s.bus_connected()
    return s.after_error(now)


def walk(
    steps: list[tuple[str, float, bool]], half_watchdog: float | None
) -> Iterator[tuple[float, Schedule]]:
    """The schedule after each of ``steps``, with the time it was taken at."""
    now = 0.0
    s = Schedule.start(now, rescan_every=2.0, half_watchdog=half_watchdog)
    for kind, dt, flag in steps:
        now += dt
        s = apply(s, kind, now, dt, flag)
        yield now, s


@given(events, st.sampled_from([None, 0.5, 30.0]))
def test_the_loop_never_sleeps_past_a_deadline_that_wakes_it(
    steps: list[tuple[str, float, bool]], half_watchdog: float | None
) -> None:
    for now, s in walk(steps, half_watchdog):
        wait = s.timeout(now)
        assert wait is None or wait >= 0.0
        for job in (Job.PING, Job.REREAD, Job.EVALUATE):
            when = s.deadline(job)
            if when is not None:
                assert wait is not None and now + wait <= max(when, now)


@given(events, st.sampled_from([None, 0.5, 30.0]), st.floats(0, 5))
def test_any_due_says_whether_the_loop_has_a_job_to_look_at(
    steps: list[tuple[str, float, bool]], half_watchdog: float | None, later: float
) -> None:
    for now, s in walk(steps, half_watchdog):
        for when in (now, now + later):
            assert s.any_due(when) == bool(due(s, when))


@pytest.mark.parametrize(
    ("policy", "going_down", "final"),
    [
        (ReapOnStop.SHUTDOWN, True, True),
        (ReapOnStop.SHUTDOWN, False, False),
        (ReapOnStop.ALWAYS, False, True),
        (ReapOnStop.ALWAYS, True, True),
        (ReapOnStop.NEVER, True, False),
        (ReapOnStop.NEVER, False, False),
    ],
)
def test_stop_decision(policy: ReapOnStop, going_down: bool, final: bool) -> None:
    decision = decide_stop(policy, going_down)
    assert decision.final_reap is final
    assert decision.why == (GOING_DOWN if going_down else SERVICE_STOPPING)


def test_reap_on_stop_reads_the_config_spelling() -> None:
    assert ReapOnStop("always") is ReapOnStop.ALWAYS
    with pytest.raises(ValueError):
        ReapOnStop("sometimes")
