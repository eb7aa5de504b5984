"""Which mount-table back-end the daemon really uses under its real unit (systemd 252).

systemd 252 with libseccomp 2.5.4 (bookworm's, in the container) cannot name listmount or
statmount (Linux 6.8). Measured here with `systemd-run -p SystemCallFilter=...` probes: it
refuses both under *any* SystemCallFilter=. An allow-list refuses them with
SystemCallErrorNumber= (EPERM), whether they are named (PID 1 logs "Failed to parse system
call, ignoring") or numbered, and even a pure deny-list gets ENOSYS, because systemd blocks
the syscalls it does not know. The other seccomp-based options (SystemCallArchitectures=,
MemoryDenyWriteExecute=, RestrictNamespaces=...) let them through.

So the shipped unit keeps its filter (naming the calls would make `systemd-analyze verify`
and PID 1 warn about them on every reload here); on systemd 252 the daemon falls back to
mountinfo with one DEGRADED entry, and a drop-in without the filter gets the kernel API. Both
are proven from the daemon's own STARTED entry, and both reap a stacked Calico mount.

systemd-nspawn 252 on the host puts its own seccomp filter on the whole container, with the
same ENOSYS for syscalls it does not know: SYSTEMD_SECCOMP=0 turns it off for these boots, so
that the guest's systemd is the only filter, as on a real node.
"""

from __future__ import annotations

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Boot
from tests.e2e.test_scenarios import UNIT, booted, mounts_at, reaper_events, stack_calico

pytestmark = pytest.mark.e2e

NO_FILTER = "[Service]\nSystemCallFilter=\n"


def _started(c: harness.Container) -> dict[str, str]:
    found = c.wait_for(lambda: reaper_events(c, "STARTED", _SYSTEMD_UNIT=UNIT), what="STARTED")
    return dict(found[-1])


def _reaps_a_stack(c: harness.Container) -> None:
    stack_calico(c)
    c.wait_for(lambda: not mounts_at(c, "/run/calico/cgroup"), timeout=30, what="reap")


@pytest.fixture(autouse=True)
def _no_nspawn_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SECCOMP", "0")  # read by systemd-nspawn on the host only


def test_shipped_unit_on_systemd_252_falls_back_once_and_still_reaps(boot: Boot) -> None:
    c = booted(boot, grace=0.5, kubelet=False)
    started = _started(c)
    refusals = reaper_events(c, "DEGRADED", _SYSTEMD_UNIT=UNIT, RESULT="no-listmount")
    assert started["MOUNT_API"] == "mountinfo", started
    assert len(refusals) == 1, c.journal("-u", UNIT)
    assert "SystemCallFilter" in refusals[0]["MESSAGE"], refusals
    status = c.run(["systemctl", "show", "-P", "StatusText", UNIT]).stdout
    assert "mount table: mountinfo" in status, status
    _reaps_a_stack(c)
    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active"


def test_without_the_syscall_filter_the_daemon_reads_through_the_kernel_api(boot: Boot) -> None:
    drop_in = f"/etc/systemd/system/{UNIT}.d/50-no-syscall-filter.conf"
    c = booted(boot, grace=0.5, kubelet=False, **{drop_in: NO_FILTER})
    started = _started(c)
    assert started["MOUNT_API"] == "listmount", started
    assert not reaper_events(c, "DEGRADED", _SYSTEMD_UNIT=UNIT, RESULT="no-listmount")
    status = c.run(["systemctl", "show", "-P", "StatusText", UNIT]).stdout
    assert "mount table: listmount" in status, status
    _reaps_a_stack(c)
