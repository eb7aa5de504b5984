"""The daemon as systemd would run it, in a private mount+network namespace, no systemd needed.

Real mounts, a real notify socket, real owner processes and real veth links. There is no
system bus here, so these runs are also the "degraded mode" tests; the D-Bus path is covered
by tests/test_sources_systemd.py against a private dbus-daemon, and by the e2e suite.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_harness import DaemonRun, owner_exe
from tests.support.system_bus import Bus

CGROUP = "/run/calico/cgroup"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonRun]:
    with DaemonRun(tmp_path) as run:
        yield run


def test_ready_after_the_first_pass_with_a_status_line(daemon: DaemonRun) -> None:
    daemon.mount("cgroup2", "/run/calico2")  # a decoy only
    daemon.start()
    daemon.wait_notify("READY=1")
    status = daemon.wait_notify("STATUS=")
    assert status
    assert any("degraded: no D-Bus" in m for _, m in daemon.messages)
    assert "running degraded" in daemon.log()
    assert daemon.stop() == 0
    assert any("STOPPING=1" in m for _, m in daemon.collect(0.1))


def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, env={"WATCHDOG_USEC": "400000"}) as run:
        run.start()
        start = run.wait_notify("READY=1")
        run.collect(2.0)
        pings = [t for t, m in run.messages if "WATCHDOG=1" in m and t >= start]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 8 <= len(pings) <= 12, pings
        assert all(0.15 <= g <= 0.3 for g in gaps), gaps


def _after_ready(run: DaemonRun, text: str) -> list[str]:
    messages = [m for _, m in run.messages]
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    return [m for m in messages[ready + 1 :] if text in m]


def _rereads(log: str) -> int:
    found = re.search(r"(\d+) table re-reads", log)
    assert found, log[-2000:]
    return int(found.group(1))


def test_the_safety_net_rescan_rereads_but_decides_nothing_when_nothing_changed(
    tmp_path: Path,
) -> None:
    # A target waiting out a long grace period: there are verdicts that a pass would publish.
    with DaemonRun(tmp_path, config="grace_period = 100\nrescan_interval = 1\n") as run:
        run.mount("cgroup2", CGROUP)
        run.start()
        run.wait_notify("READY=1")
        run.collect(3.5)
        assert run.stop() == 0
        log = run.log()
    assert _rereads(log) >= 4  # the first read, then one a second without any event
    # Same table, owners watched by pidfd: no new verdicts, so no STATUS= (a pass publishes one).
    assert _after_ready(run, "STATUS=") == [], run.messages


def test_with_metrics_every_rescan_is_a_pass_that_refreshes_the_last_pass_time(
    tmp_path: Path,
) -> None:
    prom = tmp_path / "reaper.prom"
    config = f'grace_period = 100\nrescan_interval = 1\nmetrics_path = "{prom}"\n'

    def last_pass() -> float:
        found = re.search(
            r"^calico_mount_reaper_last_pass_timestamp_seconds (\S+)$", prom.read_text(), re.M
        )
        assert found, prom.read_text()
        return float(found.group(1))

    with DaemonRun(tmp_path, config=config) as run:
        run.mount("cgroup2", CGROUP)
        run.start()
        run.wait_notify("READY=1")
        first = last_pass()
        run.collect(2.5)
        assert last_pass() >= first + 1.5  # refreshed by the rescans alone: nothing changed
        # Each pass publishes its status, but PID 1 is told only when the text changes.
        assert _after_ready(run, "STATUS=") == [], run.messages
        assert run.stop() == 0


def test_pings_come_every_rescan_interval_when_that_is_shorter(tmp_path: Path) -> None:
    # WatchdogSec=20s asks for a ping every 10 s; the 1 s safety-net rescan shares the ping's
    # wake instead of waking the loop on its own.
    with DaemonRun(
        tmp_path, config="rescan_interval = 1\n", env={"WATCHDOG_USEC": "20000000"}
    ) as run:
        run.start()
        start = run.wait_notify("READY=1")
        run.collect(3.5)
        pings = [t for t, m in run.messages if "WATCHDOG=1" in m and t >= start]
        assert run.stop() == 0
        log = run.log()
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert 3 <= len(pings) <= 4 and all(0.8 <= g <= 1.3 for g in gaps), pings
    assert _rereads(log) >= 4  # the first read and one rescan per ping


def test_watchdog_for_another_pid_is_ignored(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) as run:
        run.start()
        run.wait_notify("READY=1")
        run.collect(0.6)
        assert not [m for _, m in run.messages if "WATCHDOG=1" in m]


def test_orphaned_mount_is_reaped_after_the_grace_period_not_before(daemon: DaemonRun) -> None:
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.mount("cgroup2", CGROUP)
    mounted_at = time.monotonic()
    daemon.wait_log("calico target /run/calico/cgroup (cgroup2) appeared")
    gone_at = daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap")
    assert 1.0 <= gone_at - mounted_at <= 2.5, gone_at - mounted_at
    daemon.wait_log("is gone")
    log = daemon.log()
    assert "reaping in 1 s" in log and "reaped /run/calico/cgroup" in log


def test_in_use_mount_is_left_alone_until_the_owner_exits(
    daemon: DaemonRun, tmp_path: Path
) -> None:
    owner = daemon.shell.popen([owner_exe(tmp_path), "600"])
    try:
        daemon.start()
        daemon.wait_notify("READY=1")
        daemon.mount("cgroup2", CGROUP)
        daemon.mount("tmpfs", CGROUP)
        daemon.mount("cgroup2", CGROUP)
        daemon.wait_log("left alone, in use by calico-node (pid")
        time.sleep(1.5)  # longer than the grace period
        assert daemon.mounted(CGROUP) == 3
    finally:
        owner.kill()
        owner.wait()
    exited = time.monotonic()
    gone = daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap after owner exit")
    # Seen at once through the pidfd, then the grace period: not a periodic rescan later.
    assert 1.0 <= gone - exited <= 2.5, gone - exited


def test_held_by_a_kubelet_process_without_a_bus(daemon: DaemonRun, tmp_path: Path) -> None:
    kubelet = daemon.shell.popen([owner_exe(tmp_path, "kubelet"), "600"])
    try:
        daemon.start()
        daemon.wait_notify("READY=1")
        daemon.mount("cgroup2", CGROUP)
        daemon.wait_log("left alone, held: kubelet is active")
        time.sleep(1.5)
        assert daemon.mounted(CGROUP) == 1
    finally:
        kubelet.kill()
        kubelet.wait()
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap after kubelet exit")


def test_a_mount_storm_ends_in_the_right_state_with_bounded_rereads(daemon: DaemonRun) -> None:
    daemon.start()
    daemon.wait_notify("READY=1")
    started = time.monotonic()
    daemon.sh(
        "mkdir -p /run/storm && for i in $(seq 1000); do mount -t tmpfs none /run/storm; "
        "umount /run/storm; done"
    )
    daemon.mount("cgroup2", CGROUP)
    elapsed = time.monotonic() - started
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap after the storm")
    assert daemon.stop() == 0
    rereads = int(re.search(r"(\d+) table re-reads", daemon.log()).group(1))  # type: ignore[union-attr]
    # At most 5 re-reads a second (REREAD_INTERVAL 0.2 s) plus a handful around each reap.
    print(f"storm: 1000 mount/umount pairs in {elapsed:.2f} s, {rereads} re-reads")
    assert rereads <= 5 * (elapsed + 3) + 10, (rereads, elapsed)
    assert "appeared" in daemon.log()


def test_sighup_with_a_bad_config_keeps_the_old_one(daemon: DaemonRun) -> None:
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.config_path.write_text("grace_period = -5\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("new config rejected, keeping the old one")
    assert "grace_period" in daemon.log()
    daemon.mount("cgroup2", CGROUP)
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap with the old config")


def test_sighup_with_a_good_config_applies_it(daemon: DaemonRun) -> None:
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.config_path.write_text("grace_period = 0\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("config reloaded")
    daemon.mount("cgroup2", CGROUP)
    daemon.wait_log("reaping in 0 s")


def test_sigterm_with_reap_on_stop_always_reaps_even_in_use(tmp_path: Path) -> None:
    config = 'grace_period = 100\nreap_on_stop = "always"\n'
    with DaemonRun(tmp_path, config=config) as run:
        owner = run.shell.popen([owner_exe(tmp_path), "600"])
        try:
            run.start()
            run.wait_notify("READY=1")
            run.mount_stack(CGROUP)
            run.wait_log("in use by calico-node")
            assert run.stop() == 0
            assert run.mounted(CGROUP) == 0
            assert "final reap: yes" in run.log()
            assert any("STOPPING=1" in m for _, m in run.collect(0.1))
        finally:
            owner.kill()
            owner.wait()


def test_plain_stop_with_the_system_up_does_not_reap(daemon: DaemonRun) -> None:
    daemon.config_path.write_text("grace_period = 100\n")
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.mount("cgroup2", CGROUP)
    daemon.wait_log("reaping in 100 s")
    assert daemon.stop() == 0
    assert daemon.mounted(CGROUP) == 1
    assert "final reap: no" in daemon.log()


def test_removed_calico_interface_triggers_a_recheck(daemon: DaemonRun) -> None:
    daemon.start("--verbose")
    daemon.wait_notify("READY=1")
    daemon.sh("ip link add cali1234abcd type veth peer name eth-peer0")
    daemon.sh("ip link del cali1234abcd")
    daemon.wait_log("interface cali1234abcd: remove")
    assert "eth-peer0" not in daemon.log()


def test_a_bad_config_at_start_exits_78(daemon: DaemonRun) -> None:
    daemon.config_path.write_text("nonsense = 1\n")
    daemon.start()
    assert daemon.proc is not None
    assert daemon.proc.wait(10) == 78
    assert "nonsense" in daemon.log() and "config.toml" in daemon.log()


def test_without_cap_sys_admin_it_exits_77_and_says_why(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            sys.executable,
            "-m",
            "calico_mount_reaper",
            "run",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 77
    assert "CAP_SYS_ADMIN" in out.stderr


# ---- with systemd on a bus: a real dbus-daemon and a fake systemd/logind ------------------------
# (tests/support/system_bus.py)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Bus]:
    pytest.importorskip("dbus_next")
    b = Bus(tmp_path)
    b.start()
    b.tell("unitfile kubelet.service enabled")
    b.tell("active kubelet.service active")
    yield b
    b.stop()


@pytest.fixture
def bus_daemon(tmp_path: Path, bus: Bus) -> Iterator[DaemonRun]:
    with DaemonRun(tmp_path, env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address}) as run:
        yield run


def test_kubelet_stop_over_dbus_releases_the_hold(bus: Bus, bus_daemon: DaemonRun) -> None:
    bus_daemon.start()
    bus_daemon.wait_notify("READY=1")
    assert "following systemd over D-Bus" in bus_daemon.log()
    bus_daemon.mount("cgroup2", CGROUP)
    bus_daemon.wait_log("left alone, held: kubelet is active")
    time.sleep(1.3)
    assert bus_daemon.mounted(CGROUP) == 1
    bus.tell("active kubelet.service inactive")
    stopped = time.monotonic()
    gone = bus_daemon.wait_until(lambda: bus_daemon.mounted(CGROUP) == 0, what="reap")
    assert 1.0 <= gone - stopped <= 2.5, gone - stopped


def test_decommission_reaps_without_grace(bus: Bus, bus_daemon: DaemonRun) -> None:
    bus_daemon.config_path.write_text("grace_period = 100\n")
    bus_daemon.start()
    bus_daemon.wait_notify("READY=1")
    bus_daemon.mount("cgroup2", CGROUP)
    bus_daemon.wait_log("left alone, held: kubelet is active")
    bus.tell("unitfile kubelet.service disabled")
    bus_daemon.wait_until(lambda: bus_daemon.mounted(CGROUP) == 0, timeout=5, what="reap")
    assert "node decommission" in bus_daemon.log()


def test_sigterm_while_the_system_goes_down_reaps_everything(
    bus: Bus, bus_daemon: DaemonRun, tmp_path: Path
) -> None:
    owner = bus_daemon.shell.popen([owner_exe(tmp_path), "600"])
    try:
        bus_daemon.start()
        bus_daemon.wait_notify("READY=1")
        bus_daemon.mount_stack(CGROUP)
        bus_daemon.wait_log("in use by calico-node")
        bus.tell("job shutdown.target")
        bus_daemon.wait_log("system is going down")
        assert bus_daemon.stop() == 0
        assert bus_daemon.mounted(CGROUP) == 0  # owner still alive: the node is going down
        assert "final reap: yes" in bus_daemon.log()
        assert any("STOPPING=1" in m for _, m in bus_daemon.collect(0.1))
    finally:
        owner.kill()
        owner.wait()


def test_bus_loss_degrades_then_reconnects_and_resubscribes(
    bus: Bus, bus_daemon: DaemonRun
) -> None:
    bus_daemon.start()
    bus_daemon.wait_notify("READY=1")
    assert bus.subscribes() == 1
    bus.stop()
    bus_daemon.wait_log("judging kubelet by its process")
    bus_daemon.wait_notify("degraded: no D-Bus")
    bus.start()
    bus.tell("unitfile kubelet.service enabled")
    bus.tell("active kubelet.service active")
    bus_daemon.wait_until(lambda: bus.subscribes() == 1, timeout=10, what="re-Subscribe")
    bus_daemon.mount("cgroup2", CGROUP)
    bus_daemon.wait_log("left alone, held: kubelet is active")


def test_back_on_a_restarted_bus_within_10_s_even_between_rare_pings(
    bus: Bus, tmp_path: Path
) -> None:
    # WatchdogSec=4min as shipped-like: pings (and the safety-net rescan) a minute apart. The
    # bus retry must wake the loop by itself, not wait for a ping.
    env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address, "WATCHDOG_USEC": "240000000"}
    with DaemonRun(tmp_path, env=env) as run:
        run.start()
        run.wait_notify("READY=1")
        assert bus.subscribes() == 1
        bus.stop()
        run.wait_log("judging kubelet by its process")
        time.sleep(3)  # a few retries fail meanwhile: the backoff grows
        bus.start()
        back = time.monotonic()
        bus.tell("unitfile kubelet.service enabled")
        bus.tell("active kubelet.service active")
        resubscribed = run.wait_until(
            lambda: bus.subscribes() == 1, timeout=15, what="re-Subscribe"
        )
        assert resubscribed - back < 10, resubscribed - back
        run.mount("cgroup2", CGROUP)
        run.wait_log("left alone, held: kubelet is active")
        assert run.stop() == 0


def _garbage_lines_in_the_table() -> tuple[str, int]:
    import io
    import logging

    from calico_mount_reaper import journal, mountinfo
    from calico_mount_reaper.config import Config
    from calico_mount_reaper.daemon import Daemon, Sources
    from calico_mount_reaper.notify import Notifier
    from calico_mount_reaper.sources.mountinfo import MountTableWatch

    from tests.support import node

    class GarbledWatch(MountTableWatch):
        """Stands in for a kernel that writes malformed lines (a real one never does): the real
        table, real wakes, three planted lines."""

        def read(self, needles: object = None) -> mountinfo.ParseResult:
            real = super().read()
            text = "\n".join(node.lines()) + "\nnot a mountinfo line\n42 x\n\x00\xff - -\n"
            garbled = mountinfo.parse(text)
            assert len(garbled.mounts) == len(real.mounts)
            return garbled

    out = io.StringIO()
    log = journal.setup(stream=out)
    # The garbled lines come through mountinfo: force that back-end (the kernel API has no lines).
    daemon = Daemon(
        Config(grace_period=0, mount_api="mountinfo"),
        None,
        log,
        Notifier(),
        sources=Sources(mount_table=GarbledWatch),
    )
    daemon.start()
    node.mount_at("cgroup2", CGROUP)
    deadline = time.monotonic() + 10
    while CGROUP in node.points() and time.monotonic() < deadline:
        daemon.turn(timeout=0.1)
    for _ in range(3):  # more wakes and re-reads: the warnings must not come again
        node.mount_at("tmpfs", "/run/other")
        daemon.turn(timeout=0.3)
    daemon.finish()
    logging.getLogger(journal.LOGGER_NAME).handlers.clear()
    return out.getvalue(), node.points().count(CGROUP)


def test_malformed_mountinfo_lines_are_skipped_with_a_warning_and_the_loop_goes_on() -> None:
    from tests.support.nsutil import in_namespace

    log, still_mounted = in_namespace(_garbage_lines_in_the_table)
    assert log.count("skipped") == 3, log
    assert "reaped /run/calico/cgroup" in log
    assert still_mounted == 0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _zombie_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        c
        for c in map(int, children)
        if Path(f"/proc/{c}/stat").read_text().split(") ")[1][0] == "Z"
    ]


def test_an_exited_owner_that_is_not_collected_yet_is_gone_and_costs_one_wake(
    tmp_path: Path,
) -> None:
    # The owner exits after 1 s, and its parent collects it only 6 s later, as a slow container
    # shim would. Until then /proc still lists it (state Z) under its old comm.
    exe = owner_exe(tmp_path)
    slow_parent = (
        "import subprocess, sys, time; owner = subprocess.Popen([sys.argv[1], '1']); "
        "time.sleep(7); owner.wait()"
    )
    with DaemonRun(tmp_path, config="grace_period = 100\n") as run:
        run.mount("cgroup2", CGROUP)
        parent = run.shell.popen([sys.executable, "-c", slow_parent, exe])
        try:
            run.start()
            run.wait_notify("READY=1")
            run.wait_log("left alone, in use by calico-node")
            run.wait_until(lambda: bool(_zombie_children(parent.pid)), what="owner is a zombie")
            # Seen as gone while still uncollected: the verdict changes without a collection.
            run.wait_log("orphaned: no calico-node/calico-felix running", timeout=3)
            assert _zombie_children(parent.pid), "collected already: the test proves nothing"
            assert run.proc is not None
            cpu, sent = _cpu_seconds(run.proc.pid), len(run.collect())
            time.sleep(3)
            assert _zombie_children(parent.pid), "collected already: the test proves nothing"
            cpu_used, notified = _cpu_seconds(run.proc.pid) - cpu, len(run.collect()) - sent
        finally:
            parent.kill()
            parent.wait()
        assert run.stop() == 0
    # A spinning loop burns a whole core and sends thousands of STATUS= lines meanwhile.
    assert cpu_used < 0.3, f"{cpu_used:.2f} s of CPU in 3 s with a zombie owner"
    assert notified <= 2, f"{notified} notify messages in 3 s with a zombie owner"
