"""Faults a node throws at the daemon: each case is a test and a row in docs/reliability.md.

The daemon is the real `calico-mount-reaper run` process in a private mount+net namespace
(tests/support/daemon_harness.py). Faults that other suites already prove are not repeated here; the
table in docs/reliability.md names the test that covers them (run by tests/reliability/run):
no CAP_SYS_ADMIN (tests/test_daemon.py), garbage mountinfo lines (tests/test_daemon.py), config
trust and validation for the loader (tests/test_config.py).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon_harness import DaemonRun, owner_exe
from tests.support.fault_launchers import NO_NETLINK
from tests.support.figures import record

ROW = "faults"
# A rule of our own, with an owner name nothing else on the machine uses: other test runs on the
# same host may have calico-node processes alive, and owners count in any PID namespace.
CGROUP = "/run/reltest/cgroup"
RULE = (
    '[[target]]\nname = "reltest"\nprefix = "/run/reltest"\nfstypes = ["cgroup2"]\n'
    'owners = ["reltest-owner"]\n'
)


def conf(extra: str = "grace_period = 0.2\n") -> str:
    return extra + RULE


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonRun]:
    with DaemonRun(tmp_path, config=conf()) as run:
        yield run


# ---- SIGKILL in the middle of a reap, then a restart ------------------------------------------


def test_sigkill_mid_reap_then_restart_converges(tmp_path: Path) -> None:
    config = conf("grace_period = 0.2\nbusy_retries = 8\nbusy_backoff = 0.2\n")
    with DaemonRun(tmp_path, config=config) as d:
        d.mount("cgroup2", CGROUP)
        # A holder inside the bottom layer keeps it busy: the pass unmounts the two layers on
        # top and then sits in its EBUSY backoff, the middle of a reap.
        holder = d.shell.popen(["sh", "-c", f"cd {CGROUP} && exec sleep 600"])
        try:
            d.mount("tmpfs", CGROUP)
            d.mount("cgroup2", CGROUP)
            d.mount("cgroup2", "/run/reltest2")  # a decoy
            d.start()
            d.wait_until(lambda: d.mounted(CGROUP) == 1, what="top layers gone, bottom busy")
            assert d.proc is not None and d.proc.poll() is None
            d.signal(signal.SIGKILL)
            d.proc.wait(5)
        finally:
            holder.kill()
            holder.wait()
        d.config_path.write_text(conf())
        d.start()
        d.wait_until(lambda: d.mounted(CGROUP) == 0, what="the restart finishing the reap")
        assert d.mounted("/run/reltest2") == 1
        assert d.stop() == 0
    record(
        ROW,
        "SIGKILL in the middle of a reap (EBUSY backoff), then restart",
        expected="restart finishes the reap; nothing else touched",
        observed="converged: 3/3 layers gone, decoy intact",
    )


# ---- the D-Bus daemon going away and coming back -----------------------------------------------


def test_bus_outage_with_a_kubelet_stop_during_it_is_not_missed(tmp_path: Path) -> None:
    pytest.importorskip("dbus_next")
    from tests.support.system_bus import Bus

    bus = Bus(tmp_path)
    bus.start()
    bus.tell("unitfile kubelet.service enabled")
    bus.tell("active kubelet.service active")
    try:
        with DaemonRun(tmp_path, config=conf(), env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address}) as d:
            # A kubelet process keeps the target held while the bus is away (degraded mode
            # judges kubelet by its process); only the bus can tell that the unit stopped.
            kubelet = d.shell.popen([owner_exe(tmp_path, "kubelet"), "600"])
            try:
                d.start()
                d.wait_notify("READY=1")
                d.mount("cgroup2", CGROUP)
                d.wait_log("left alone, held: kubelet is active")
                bus.stop()
                d.wait_notify("degraded: no D-Bus")
                time.sleep(1.0)
                assert d.mounted(CGROUP) == 1  # still held by the kubelet process
                # kubelet.service stopped while nobody was listening: the bus comes back with
                # the unit inactive and no signal about the change will ever be sent.
                bus.start()
                bus.tell("unitfile kubelet.service enabled")
                bus.tell("active kubelet.service inactive")
                back = time.monotonic()
                d.wait_until(lambda: d.mounted(CGROUP) == 0, timeout=70, what="reap after bus")
                took = time.monotonic() - back
                assert bus.subscribes() == 1
                assert d.proc is not None and d.proc.poll() is None
            finally:
                kubelet.kill()
                kubelet.wait()
    finally:
        bus.stop()
    record(
        ROW,
        "D-Bus daemon gone, kubelet.service stopped during the outage, bus back",
        expected="reconnect, Subscribe again, read state, reap",
        observed=f"re-subscribed once; reaped {took:.1f} s after the bus came back",
    )


# ---- no netlink, no journal socket, no /proc/1 -------------------------------------------------


def test_no_netlink_degrades_and_still_reaps(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, wrapper=NO_NETLINK, config=conf()) as d:
        d.start()
        d.wait_notify("READY=1")
        d.wait_log("no interface events")
        d.mount("cgroup2", CGROUP)
        d.wait_until(lambda: d.mounted(CGROUP) == 0, what="reap without netlink")
        assert d.stop() == 0
    record(
        ROW,
        "no netlink (seccomp: socket(AF_NETLINK) -> EAFNOSUPPORT)",
        expected="DEGRADED entry, mount watching and reaping go on",
        observed="degraded entry logged; target reaped; clean exit",
    )


def test_no_journal_socket_logs_to_stderr_and_still_reaps(daemon: DaemonRun) -> None:
    # The namespace has a fresh tmpfs on /run: no /run/systemd/journal/socket at all.
    assert daemon.sh("test -e /run/systemd/journal/socket || echo absent").strip() == "absent"
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.mount("cgroup2", CGROUP)
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap")
    daemon.wait_log(f"reaped {CGROUP}")
    assert "<5>" in daemon.log() or "<6>" in daemon.log()  # stderr with syslog priorities
    record(
        ROW,
        "no journal socket",
        expected="entries on stderr with <N> prefixes, no loss",
        observed="reap entry on stderr; daemon unaffected",
    )


def test_no_proc_1_access(daemon: DaemonRun) -> None:
    daemon.sh("mount -t tmpfs -o ro none /proc/1")  # /proc/1/ns/mnt is gone in here
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.mount("cgroup2", CGROUP)
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap")
    # It cannot tell whether it shares PID 1's namespace, so it must not claim that it doesn't.
    assert "not in the host's mount namespace" not in daemon.log()
    assert daemon.stop() == 0
    record(
        ROW,
        "no /proc/1 access (empty tmpfs over /proc/1)",
        expected="namespace check skipped (cannot tell), no crash, reaps",
        observed="started, reaped, clean exit; no false namespace alarm",
    )


# ---- EBUSY holders that never let go ------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False])
def test_ebusy_forever_bounded_retries_then_detach_or_refusal(tmp_path: Path, detach: bool) -> None:
    rule = (
        ""
        if detach
        else (
            '[[target]]\nname = "nodetach"\nprefix = "/run/held"\nfstypes = ["cgroup2"]\n'
            'owners = ["nobody-owns-this"]\ndetach_on_busy = false\n'
        )
    )
    point = CGROUP if detach else "/run/held/cgroup"
    config = conf(f"grace_period = 0.2\nbusy_retries = 3\nbusy_backoff = 0.05\n{rule}")
    with DaemonRun(tmp_path, config=config) as d:
        d.mount("cgroup2", point)
        holder = d.shell.popen(
            ["sh", "-c", f"cd {point} && exec {owner_exe(tmp_path, 'stubborn')} 600"]
        )
        try:
            d.start()
            d.wait_notify("READY=1")
            started = time.monotonic()
            d.wait_log("is busy: held by stubborn", timeout=10)
            took = time.monotonic() - started
            if detach:
                d.wait_until(lambda: d.mounted(point) == 0, what="detach")
            else:
                d.wait_log("failed to unmount")
                time.sleep(1.0)
                assert d.mounted(point) == 1
            assert d.proc is not None and d.proc.poll() is None
        finally:
            holder.kill()
            holder.wait()
    assert took < 5  # 3 retries with 0.05 s doubling backoff: well under a second of waiting
    how = "detach allowed" if detach else "detach_on_busy = false"
    record(
        ROW,
        f"EBUSY holder that never lets go ({how})",
        expected="bounded retries, blockers named, " + ("MNT_DETACH" if detach else "refused"),
        observed=f"blocker named after {took:.2f} s; "
        + ("detached" if detach else "left mounted, REAP_FAILED logged"),
    )


# ---- read-only /run ----------------------------------------------------------------------------


def test_read_only_run(daemon: DaemonRun) -> None:
    daemon.mount("cgroup2", CGROUP)
    daemon.sh("mount -o remount,ro /run")
    daemon.start()
    daemon.wait_notify("READY=1")
    daemon.wait_until(lambda: daemon.mounted(CGROUP) == 0, what="reap on a read-only /run")
    assert daemon.sh(f"test -d {CGROUP} && echo kept").strip() == "kept"  # rmdir: EROFS
    assert daemon.stop() == 0
    record(
        ROW,
        "read-only /run",
        expected="unmount works (needs no write); directory kept",
        observed="reaped; mount-point directory kept; clean exit",
    )


# ---- config refused ------------------------------------------------------------------------------


def _bad_config(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "good.toml"
    good.write_text("grace_period = 1\n")
    if kind == "invalid":
        good.write_text("grace_period = -1\n")
    elif kind == "world-writable":
        good.chmod(0o666)
    elif kind == "not root-owned":
        os.chown(good, 65534, 65534)
    elif kind == "symlink":
        link = tmp_path / "link.toml"
        link.symlink_to(good)
        return link
    return good


@pytest.mark.parametrize("kind", ["invalid", "world-writable", "not root-owned", "symlink"])
def test_untrusted_or_invalid_config_is_refused_with_exit_78(tmp_path: Path, kind: str) -> None:
    path = _bad_config(tmp_path, kind)
    with DaemonRun(tmp_path) as d:
        d.mount("cgroup2", CGROUP)
        d.start("--config", str(path))  # the later --config wins
        assert d.proc is not None
        code = d.proc.wait(20)
        assert d.mounted(CGROUP) == 1  # nothing unmounted on a refused config
    assert code == 78, d.log()
    assert str(path) in d.log()
    record(
        ROW,
        f"config {kind}",
        expected="refused, file named, exit 78 (no restart loop)",
        observed=f"exit {code}; message names {path.name}",
    )


# ---- a 100k-mount table --------------------------------------------------------------------------

BIG = int(os.environ.get("RELIABILITY_BIG_TABLE", "20000"))
_MAKE_MOUNTS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/run/big", exist_ok=True)
for i in range(int(sys.argv[1])):
    path = b"/run/big/d%d" % i
    os.mkdir(path)
    if libc.mount(b"none", path, b"tmpfs", 0, None) != 0:
        sys.exit(os.strerror(ctypes.get_errno()))
"""


def test_a_huge_mount_table(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config=conf("grace_period = 0\n")) as d:
        with open("/proc/sys/fs/mount-max") as f:
            room = int(f.read()) - len(d.shell.mountinfo().splitlines()) - 16
        n = min(BIG, room)
        # The decoys: n tmpfs mounts side by side, as a node with many pod volumes has.
        t = time.monotonic()
        d.shell.run([sys.executable, "-c", _MAKE_MOUNTS, str(n)])
        made = time.monotonic() - t
        rows = len(d.shell.mountinfo().splitlines())
        assert rows >= n
        t0 = time.monotonic()
        d.start()
        d.wait_notify("READY=1", timeout=300)
        ready = time.monotonic() - t0
        d.mount("cgroup2", CGROUP)
        t1 = time.monotonic()
        d.wait_until(lambda: d.mounted(CGROUP) == 0, timeout=300, what="reap in a huge table")
        reap = time.monotonic() - t1
        assert d.proc is not None and d.proc.poll() is None
        rss = d.rss_kb()
        assert d.stop(60) == 0
    record(
        ROW,
        f"{rows}-mount table",
        expected="works, bounded latency",
        observed=f"{n} mounts made in {made:.1f} s; READY after {ready:.1f} s; target "
        f"reaped {reap:.1f} s after mount; RSS {rss // 1024} MiB",
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
