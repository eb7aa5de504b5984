"""The .deb as a node operator meets it: apt installs it on a real systemd, and it just works.

The package is the one packaging/build makes (built once per session by test_packaging). It is
installed with apt inside the booted container, with no network at all (the harness gives the
guest a private network namespace): every dependency must come from the distribution packages
already in the rootfs, i.e. Debian 12's python3-pystemd 0.11, python3-pyudev 0.24.0 and
python3-sdnotify 0.3.1, the oldest versions the reaper supports.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from calico_mount_reaper.journal import MESSAGE_IDS

from tests.e2e import harness
from tests.e2e.conftest import Boot
from tests.test_packaging import DEB_VERSION, build_packages

pytestmark = pytest.mark.e2e

UNIT = "calico-mount-reaper.service"
CALICO = "/run/calico/cgroup"
GRACE = 10.0  # the packaged config's default
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def mounts_at(c: harness.Container, path: str) -> list[str]:
    return [line for line in c.mountinfo().splitlines() if line.split()[4] == path]


def reaped_entries(c: harness.Container) -> list[dict[str, Any]]:
    lines = c.journal("-o", "json", f"MESSAGE_ID={MESSAGE_IDS['REAPED']}").splitlines()
    return [e for e in map(json.loads, filter(None, lines)) if e.get("MOUNT_POINT") == CALICO]


def test_deb_installs_enabled_reaps_an_orphaned_stack_and_removes_cleanly(
    boot: Boot, tmp_path_factory: pytest.TempPathFactory
) -> None:
    deb = build_packages(tmp_path_factory) / f"calico-mount-reaper_{DEB_VERSION}_all.deb"
    guest_deb = f"/root/{deb.name}"
    c = boot(
        files={guest_deb: deb, "/etc/systemd/system/kubelet.service": harness.DUMMY_KUBELET_UNIT},
        install_project=False,
    )
    # A node whose kubelet is installed and enabled but not running: nothing holds the mounts,
    # and it is no decommission either, so the grace period applies.
    c.run(["systemctl", "enable", "kubelet.service"])

    installed = c.run(
        ["apt-get", "install", "-y", "--no-install-recommends", guest_deb], env=APT_ENV, timeout=120
    )
    assert "Setting up calico-mount-reaper" in installed.stdout, installed.stdout

    # dh_installsystemd enabled and started it: no further step.
    assert c.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled"
    assert c.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active"
    main_pid = c.run(["systemctl", "show", "-P", "MainPID", UNIT]).stdout.strip()
    cmdline = c.run(["cat", f"/proc/{main_pid}/cmdline"]).stdout.split("\0")
    assert cmdline[:3] == ["/usr/bin/python3", "/usr/bin/calico-mount-reaper", "run"], cmdline
    deps = c.run(
        [
            "python3",
            "-c",
            "import calico_mount_reaper, pystemd, pyudev, sdnotify as s; "
            "print(calico_mount_reaper.__file__, pystemd.__file__, pyudev.__file__, "
            "s.__file__)",
        ]
    ).stdout.split()
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in deps), deps
    # The postinst's daemon-reload made systemd read the kubelet drop-in.
    dropins = c.run(["systemctl", "show", "-P", "DropInPaths", "kubelet.service"]).stdout
    assert "/lib/systemd/system/kubelet.service.d/50-calico-mount-reaper.conf" in dropins, dropins
    # ... and the reap it runs when kubelet stops journals under the reaper's own name, never as
    # the `timeout` wrapper in kubelet's journal.
    c.run(["systemctl", "start", "kubelet.service"])
    c.run(["systemctl", "stop", "kubelet.service"])
    by_name = c.journal("-o", "json", "-u", "kubelet.service").splitlines()
    names = {json.loads(e).get("SYSLOG_IDENTIFIER") for e in by_name if e}
    assert "timeout" not in names, names

    # A stacked Calico mount (cgroup2 / tmpfs / cgroup2) with no owner and kubelet inactive.
    started = time.monotonic()
    c.run(
        f"mkdir -p {CALICO} && mount -t cgroup2 none {CALICO} && "
        f"mount -t tmpfs tmpfs {CALICO} && mount -t cgroup2 none {CALICO}"
    )
    assert len(mounts_at(c, CALICO)) == 3, c.mountinfo()
    c.wait_for(
        lambda: not mounts_at(c, CALICO),
        timeout=GRACE + 20,
        interval=0.2,
        what=f"the reaper to unmount the stack at {CALICO}",
    )
    elapsed = time.monotonic() - started
    assert elapsed >= GRACE - 0.5, f"reaped after {elapsed:.1f}s, before the grace period"
    # One REAPED entry for the site, naming the whole stack.
    (reaped,) = reaped_entries(c)
    assert "3 mount(s) gone" in reaped["MESSAGE"], reaped

    # What the operator reads: the unit's journal, and with -x the catalog text, which the
    # systemd package's dpkg trigger registered (journalctl --update-catalog) at install.
    plain = c.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    assert CALICO in plain, plain
    explained = c.run(["journalctl", "--no-pager", "-x", "-u", UNIT]).stdout
    assert f"Subject: Orphaned target unmounted: {CALICO}" in explained, explained
    assert "Nothing inside the" in explained, explained

    # apt-get remove stops the unit cleanly (a plain stop reaps nothing) and unloads the drop-in.
    removed = c.run(["apt-get", "remove", "-y", "calico-mount-reaper"], env=APT_ENV, timeout=120)
    assert "Removing calico-mount-reaper" in removed.stdout, removed.stdout
    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
    assert c.run(["systemctl", "show", "-P", "LoadState", UNIT]).stdout.strip() == "not-found"
    unit_log = c.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    assert f"{UNIT}: Deactivated successfully." in unit_log, unit_log
    assert "Failed with result" not in unit_log and "code=killed" not in unit_log, unit_log
    stopping = c.journal("-o", "json", f"MESSAGE_ID={MESSAGE_IDS['STOPPING']}").splitlines()
    assert json.loads(stopping[-1]).get("RESULT") == "no-reap", stopping
    assert c.run(["systemctl", "show", "-P", "DropInPaths", "kubelet.service"]).stdout.strip() == ""
    assert c.run(["test", "-e", "/usr/bin/calico-mount-reaper"], check=False).returncode != 0

    # The conffile outlives remove, as Debian promises; purge takes it.
    c.run(["test", "-f", "/etc/calico-mount-reaper/config.toml"])
    c.run(["apt-get", "purge", "-y", "calico-mount-reaper"], env=APT_ENV, timeout=120)
    assert c.run(["test", "-e", "/etc/calico-mount-reaper"], check=False).returncode != 0
