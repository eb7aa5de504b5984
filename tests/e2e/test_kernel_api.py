"""Which mount-table back-end and mount-event source the daemon really uses under its real unit.

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

Debian 13's systemd 257 (libseccomp 2.6) names them, so there the shipped unit, unchanged,
gets the kernel API; and on this host's kernel (6.18) the fanotify_init/fanotify_mark the unit
allows back give it mount events too: the one tier where the daemon runs under its real unit
with everything the kernel offers.

systemd-nspawn 252 on the host puts its own seccomp filter on the whole container, with the
same ENOSYS for syscalls it does not know: SYSTEMD_SECCOMP=0 turns it off for these boots, so
that the guest's systemd is the only filter, as on a real node.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from calico_mount_reaper import install

from tests.e2e import harness
from tests.e2e.conftest import Boot
from tests.e2e.operator_env import lower_for
from tests.e2e.test_scenarios import (
    CALICO,
    UNIT,
    active,
    booted,
    config,
    mounts_at,
    reaper_events,
    stack_calico,
    units,
)

pytestmark = pytest.mark.e2e

NO_FILTER = "[Service]\nSystemCallFilter=\n"


def _started(c: harness.Container) -> dict[str, str]:
    found = c.wait_for(lambda: reaper_events(c, "STARTED", _SYSTEMD_UNIT=UNIT), what="STARTED")
    return dict(found[-1])


def _reaps_a_stack(c: harness.Container) -> None:
    stack_calico(c)
    c.wait_for(lambda: not mounts_at(c, "/run/calico/cgroup"), timeout=30, what="reap")


def _on_the_kernel_api_with_fanotify(c: harness.Container) -> None:
    """The daemon's own word: listmount for the table, fanotify for events, nothing degraded
    (no-listmount, no-fanotify, nor anything else missing), in the journal and in STATUS=."""
    started = _started(c)
    assert started["MOUNT_API"] == "listmount", started
    assert started["MOUNT_EVENTS"] == "fanotify", started
    assert not reaper_events(c, "DEGRADED", _SYSTEMD_UNIT=UNIT), c.journal("-u", UNIT)
    status = c.run(["systemctl", "show", "-P", "StatusText", UNIT]).stdout
    assert "mount table: listmount, events: fanotify" in status, status


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
    # fanotify is allowed now, but it is used only with the kernel-API table: on mountinfo the
    # daemon wakes on POLLPRI without trying it, so there is nothing more to complain about.
    assert started["MOUNT_EVENTS"] == "pollpri", started
    assert len(reaper_events(c, "DEGRADED", _SYSTEMD_UNIT=UNIT)) == 1, c.journal("-u", UNIT)
    status = c.run(["systemctl", "show", "-P", "StatusText", UNIT]).stdout
    assert "mount table: mountinfo, events: pollpri" in status, status
    _reaps_a_stack(c)
    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active"


def test_without_the_syscall_filter_the_daemon_reads_through_the_kernel_api(boot: Boot) -> None:
    drop_in = f"/etc/systemd/system/{UNIT}.d/50-no-syscall-filter.conf"
    c = booted(boot, grace=0.5, kubelet=False, **{drop_in: NO_FILTER})
    _on_the_kernel_api_with_fanotify(c)
    _reaps_a_stack(c)


# --------------------------------------------------------------------------- systemd 257

TRIXIE_PYTHON = "python3.13"


@pytest.fixture(scope="module")
def trixie_payload(e2e_machine: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout for trixie's Python, laid over /usr/local as for bookworm's."""
    return harness.build_payload(tmp_path_factory.mktemp("payload-trixie"), python=TRIXIE_PYTHON)


def test_shipped_unit_on_systemd_257_gets_the_kernel_api_and_fanotify_mount_events(
    operator_rootfs: dict[str, Path],
    trixie_payload: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    # The operator's trixie rootfs (systemd 257, libseccomp 2.6, Python 3.13) holds everything
    # harness.PACKAGES does: no rootfs of its own for one test.
    lower = lower_for("trixie", operator_rootfs, tmp_path_factory)
    files = units(config(0.5))
    # Without kubelet's ExecStopPost= drop-in, the reap after kubelet stops is the daemon's own.
    del files[f"/{install.UNIT_DIR}/{install.KUBELET_DROPIN}"]
    unit_path = f"/{install.UNIT_DIR}/{UNIT}"
    shipped = (harness.REPO_ROOT / "systemd" / UNIT).read_text()
    assert but_exec_start(files[unit_path]) == but_exec_start(shipped), "the unit as shipped"
    files["/etc/systemd/system/kubelet.service"] = harness.DUMMY_KUBELET_UNIT
    enable = [UNIT, "kubelet.service"]
    with harness.boot(
        lower, tmp_path / "run", trixie_payload, files, enable=enable, timeout=120
    ) as c:
        assert c.run(["systemctl", "--version"]).stdout.startswith("systemd 257"), "not trixie"
        for unit in enable:
            assert active(c, unit) == "active", c.journal("-u", unit)
        # 257 knows every name in the filter: no warning to ignore, unlike listmount on 252.
        verify = c.run(["systemd-analyze", "verify", "--man=no", unit_path], check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

        # The daemon's own word, under the filter (Seccomp: 2) of the unit as shipped.
        _on_the_kernel_api_with_fanotify(c)
        pid = c.run(["systemctl", "show", "-P", "MainPID", UNIT]).stdout.strip()
        assert "\nSeccomp:\t2\n" in c.run(["cat", f"/proc/{pid}/status"]).stdout
        # And the watch is really open: a fanotify group among the daemon's descriptors.
        fds = c.run(f"readlink /proc/{pid}/fd/*", check=False).stdout.split()
        assert "anon_inode:[fanotify]" in fds, fds

        # A mount made while it runs is noticed at once (the safety-net rescan is a minute
        # away), held while kubelet runs, and reaped by the daemon once kubelet stops.
        stack_calico(c)
        c.wait_for(
            lambda: reaper_events(c, "TARGET_APPEARED", _SYSTEMD_UNIT=UNIT, MOUNT_POINT=CALICO),
            timeout=10,
            what="the daemon to notice the new mount",
        )
        c.wait_for(
            lambda: [
                e
                for e in reaper_events(c, "VERDICT", MOUNT_POINT=CALICO, RESULT="refused")
                if e["REASON"].startswith("held: kubelet is active")
            ],
            what="a 'held' verdict",
        )
        assert len(mounts_at(c, CALICO)) == 3, c.mountinfo()
        c.run(["systemctl", "stop", "kubelet.service"])
        c.wait_for(lambda: not mounts_at(c, CALICO), timeout=30, what="the daemon's reap")
        reaped = reaper_events(c, "REAPED", MOUNT_POINT=CALICO)
        assert reaped and all(e["_SYSTEMD_UNIT"] == UNIT for e in reaped), reaped
        assert active(c, UNIT) == "active", c.journal("-u", UNIT)


def but_exec_start(unit: str) -> list[str]:
    """The unit's lines but ExecStart=, the one line install-units renders for a pip install."""
    return [line for line in unit.splitlines() if not line.startswith("ExecStart=")]
