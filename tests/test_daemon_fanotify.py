"""The daemon on fanotify mount events (Linux 6.15+), against its POLLPRI fallback.

The real daemon in private mount, PID and network namespaces (tests/support/daemon_harness.py),
on the host's kernel (6.18 here, which has fanotify mount events; the suite skips these tests on
a kernel without them). Re-reads are counted by the daemon's own STOPPING entry.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from calico_mount_reaper.sources import fanotify

from tests.support.daemon_harness import DaemonRun
from tests.support.fault_launchers import refusing

CGROUP = "/run/calico/cgroup"
# No safety-net rescan within a test: every re-read counted is one an event caused.
QUIET = "grace_period = 0\nrescan_interval = 3600\n"
FORCED_MOUNTINFO = {"CALICO_MOUNT_REAPER_MOUNT_API": "mountinfo"}

pytestmark = pytest.mark.skipif(
    not fanotify.probe().available, reason="this kernel has no fanotify mount events (6.15+)"
)


@pytest.fixture(autouse=True)
def _kernel_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fanotify path comes with the kernel-API table: probe for it even in the suite's
    forced-mountinfo round (tests/run); the tests of the fallback ask for it themselves."""
    monkeypatch.setenv("CALICO_MOUNT_REAPER_MOUNT_API", "auto")


# mount/umount pairs by the thousand, as pods make them: one process, no fork per mount.
CHURN = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
path, pairs = sys.argv[1].encode(), int(sys.argv[2])
os.makedirs(path, exist_ok=True)
for _ in range(pairs):
    if libc.mount(b"none", path, b"tmpfs", 0, None) or libc.umount2(path, 0):
        raise OSError(ctypes.get_errno(), "churn")
"""


def churn(run: DaemonRun, path: str, pairs: int) -> None:
    run.shell.run([sys.executable, "-c", CHURN, path, str(pairs)])


def rereads(log: str) -> int:
    found = re.search(r"(\d+) table re-reads", log)
    assert found, log[-2000:]
    return int(found.group(1))


def reap_and_stop(run: DaemonRun, what: str) -> str:
    """Mount a target, wait for the daemon to reap it, stop the daemon cleanly: its log."""
    run.mount("cgroup2", CGROUP)
    run.wait_until(lambda: run.mounted(CGROUP) == 0, what=what)
    assert run.stop() == 0
    return run.log()


def started(log: str) -> str:
    line = next((x for x in log.splitlines() if "mount events via" in x), None)
    assert line is not None, log[-2000:]
    return line


def test_a_target_mount_is_noticed_through_fanotify_and_reaped(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config=QUIET) as run:
        run.start()
        run.wait_notify("READY=1")
        assert "mount events via fanotify" in started(run.log())
        assert any("events: fanotify" in m for _, m in run.messages), run.messages
        log = reap_and_stop(run, "reap of a mount fanotify named")
    assert "calico target /run/calico/cgroup (cgroup2) appeared" in log
    assert "DEGRADED" not in log


def test_pod_churn_outside_every_target_costs_no_reread(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config=QUIET) as run:
        run.start()
        run.wait_notify("READY=1")
        churn(run, "/run/netns/cni-pod", 300)
        churn(run, "/var/lib/kubelet/pods/p/volumes/kubernetes.io~projected/token", 300)
        churn(run, "/run/calico2", 100)  # a neighbour of the prefix, not under it
        run.collect(0.5)
        assert run.stop() == 0
        log = run.log()
    assert rereads(log) == 1, log[-2000:]  # the first pass's only


def test_the_same_churn_on_pollpri_costs_rereads(tmp_path: Path) -> None:
    # The control for the test above: the fallback re-reads on every wake, so the count there
    # is the one fanotify saves.
    with DaemonRun(tmp_path, config=QUIET, env=FORCED_MOUNTINFO) as run:
        run.start()
        run.wait_notify("READY=1")
        churn(run, "/run/netns/cni-pod", 300)
        run.collect(0.5)
        assert run.stop() == 0
        log = run.log()
    assert rereads(log) > 1, log[-2000:]


def test_changes_under_a_prefix_update_the_view_without_a_reread(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config="grace_period = 100\nrescan_interval = 3600\n") as run:
        run.mount("cgroup2", CGROUP)
        run.start()
        run.wait_notify("READY=1")
        run.mount("tmpfs", "/run/calico/other")  # not a target's type: placed, judged, kept
        run.mount_stack("/run/calico/stack")  # a new site of three
        run.wait_log("calico target /run/calico/stack (cgroup2) appeared")
        run.wait_notify("2 mounted")
        run.sh("umount /run/calico/other; umount /run/calico/stack")  # the top of the stack
        run.sh("umount /run/calico/stack; umount /run/calico/stack")
        run.wait_log("calico target /run/calico/stack (cgroup2) is gone")
        run.wait_notify("1 mounted")
        assert run.stop() == 0
        log = run.log()
    assert rereads(log) == 1, log[-2000:]  # the first pass's only


def test_a_new_target_is_journaled_before_its_verdict_and_without_a_reread(
    tmp_path: Path,
) -> None:
    with DaemonRun(tmp_path, config=QUIET) as run:
        run.start()
        run.wait_notify("READY=1")
        log = reap_and_stop(run, "reap of the placed target")
    appeared = log.index("calico target /run/calico/cgroup (cgroup2) appeared")
    assert appeared < log.index("reaped /run/calico/cgroup"), log[-2000:]
    # The first pass, and the reap's read after its unmount: none for the attach itself.
    assert rereads(log) == 2, log[-2000:]


def test_a_storm_of_short_lived_mounts_hides_no_target(tmp_path: Path) -> None:
    # Stopped while the storm runs, so one drain holds it all: the attaches of mounts gone
    # again in the same drain are dropped unlooked-at, and no target may go with them.
    with DaemonRun(tmp_path, config="grace_period = 100\nrescan_interval = 3600\n") as run:
        run.start()
        run.wait_notify("READY=1")
        assert run.proc is not None
        run.signal(signal.SIGSTOP)
        try:
            churn(run, "/run/netns/cni-pod", 1000)
            run.mount("cgroup2", "/run/calico/brief")  # comes and goes: nothing to see
            run.sh("umount /run/calico/brief")
            run.mount("cgroup2", "/run/elsewhere/cg")  # made outside, then moved in
            run.sh("mkdir -p /run/calico/moved && mount --move /run/elsewhere/cg /run/calico/moved")
            churn(run, "/run/calico/cgroup-churn", 200)  # tmpfs under the prefix, come and gone
            run.mount("cgroup2", CGROUP)
            churn(run, "/run/netns/cni-pod", 1000)
        finally:
            run.signal(signal.SIGCONT)
            os.kill(run.proc.nsenter.pid, signal.SIGCONT)  # see the overflow test below
        run.wait_notify("2 mounted")
        assert run.stop() == 0
        log = run.log()
    assert "calico target /run/calico/moved (cgroup2) appeared" in log
    assert "calico target /run/calico/cgroup (cgroup2) appeared" in log
    assert "/run/calico/brief" not in log
    assert "overflowed" not in log and rereads(log) == 1, log[-2000:]


def test_an_overflowed_queue_relists_and_finds_the_target_it_lost(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config=QUIET) as run:
        run.start()
        run.wait_notify("READY=1")
        assert run.proc is not None
        run.signal(signal.SIGSTOP)  # let the queue fill: 16384 events by default
        try:
            churn(run, "/run/netns/cni-pod", 9000)  # 18000 events
            run.mount("cgroup2", CGROUP)  # its event is dropped: only the overflow tells
        finally:
            run.signal(signal.SIGCONT)
            # nsenter stops itself when its child stops, and only wakes on its own SIGCONT.
            os.kill(run.proc.nsenter.pid, signal.SIGCONT)
        run.wait_until(lambda: run.mounted(CGROUP) == 0, what="reap after an overflow")
        assert run.stop() == 0
        log = run.log()
    assert "fanotify mount events overflowed: re-reading the mount table" in log


def test_forced_mountinfo_keeps_pollpri_and_still_reaps(tmp_path: Path) -> None:
    with DaemonRun(tmp_path, config=QUIET, env=FORCED_MOUNTINFO) as run:
        run.start()
        run.wait_notify("READY=1")
        assert "mount events via pollpri" in started(run.log())
        assert any("mount table: mountinfo, events: pollpri" in m for _, m in run.messages)
        assert "DEGRADED" not in reap_and_stop(run, "reap on the POLLPRI path")


def test_a_refused_fanotify_says_so_once_and_falls_back_to_pollpri(tmp_path: Path) -> None:
    wrapper = refusing("fanotify", errno.EPERM)  # as SystemCallErrorNumber=EPERM gives
    with DaemonRun(tmp_path, config=QUIET, wrapper=wrapper) as run:
        run.start()
        run.wait_notify("READY=1")
        log = reap_and_stop(run, "reap on the POLLPRI path")
    assert "mount table via listmount" in started(log)  # statmount is still allowed
    assert "mount events via pollpri" in started(log)
    degraded = [x for x in log.splitlines() if "fanotify_init" in x and "refused" in x]
    assert len(degraded) == 2, log[-3000:]  # the DEGRADED entry, and STARTED's reason
