"""Smoke scenarios proving the harness itself: a real systemd boots, is driven, powers off.

If these fail, every other e2e result is meaningless, so they check each thing the scenarios
rely on: the boot state, mounts made inside show in PID 1's table (and not the host's), the
journal survives poweroff, and the project from the checkout imports with Debian's deps.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e import harness
from tests.e2e.conftest import Boot


def test_parse_mirror_prefers_the_suite_over_the_security_archive() -> None:
    security = "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n"
    main = "Types: deb\nURIs: http://main.example/debian/\nSuites: bookworm bookworm-updates\n"
    assert harness.parse_mirror([security + "\n" + main], "") == "http://main.example/debian"
    listed = "# old\ndeb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n"
    assert harness.parse_mirror([], listed) == "http://list.example/debian"
    assert harness.parse_mirror([], "deb-src http://x.example/debian bookworm main\n") is None


@pytest.mark.e2e
def test_boot_drive_poweroff_and_read_the_journal(boot: Boot) -> None:
    host_before = harness.host_mount_table()
    with boot(install_project=False) as c:
        state = c.run(["systemctl", "is-system-running", "--wait"], check=False).stdout.strip()
        failed = c.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
        assert state in ("running", "degraded"), f"state {state!r}; failed units:\n{failed}"
        assert c.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"

        c.run("mkdir -p /run/calico/cgroup && mount -t cgroup2 none /run/calico/cgroup")
        inside = [line for line in c.mountinfo().splitlines() if " /run/calico/cgroup " in line]
        assert len(inside) == 1 and " - cgroup2 " in inside[0], c.mountinfo()
        assert not any(row.startswith("/run/calico/cgroup ") for row in harness.host_mount_table())

        assert c.poweroff(timeout=60) == 0, c.console_log[-2000:]
        assert not c.running()

    # The journal outlives the container: that is where shutdown ordering gets asserted.
    journal = c.journal("-o", "short-monotonic")
    assert "Reached target multi-user.target" in journal, journal[-3000:]
    assert "Reached target poweroff.target" in journal, journal[-3000:]
    assert not (c.run_dir / "upper").exists(), "overlay left behind"
    assert not any(os.path.isdir(cg) for cg in c.cgroups), c.cgroups
    assert harness.host_mount_table() == host_before


@pytest.mark.e2e
def test_project_from_the_checkout_imports_with_distro_deps(boot: Boot) -> None:
    c = boot()
    where = c.run(["python3", "-c", "import calico_mount_reaper as m; print(m.__file__)"])
    assert where.stdout.startswith("/usr/local/lib/python3.11/dist-packages/calico_mount_reaper/")
    # The bindings must be Debian's (the oldest versions the reaper supports), not pip's.
    deps = c.run(
        [
            "python3",
            "-c",
            "import pystemd, pyudev, sdnotify; "
            "print(pystemd.__file__, pyudev.__file__, sdnotify.__file__)",
        ]
    ).stdout.split()
    assert all(path.startswith("/usr/lib/python3/dist-packages/") for path in deps), deps
    entry = c.run(["head", "-1", "/usr/local/bin/calico-mount-reaper"]).stdout
    assert entry.strip() == "#!/usr/bin/python3"


@pytest.mark.e2e
def test_files_and_enabled_units_reach_the_guest(boot: Boot) -> None:
    c = boot(
        files={"/etc/systemd/system/kubelet.service": harness.DUMMY_KUBELET_UNIT},
        enable=["kubelet.service"],
        install_project=False,
    )
    assert c.run(["systemctl", "is-active", "kubelet.service"]).stdout.strip() == "active"
    c.run(["systemctl", "stop", "kubelet.service"])
    c.wait_for(lambda: "Stopped" in c.journal("-u", "kubelet.service"), what="'Stopped' entry")


@pytest.mark.e2e
def test_udev_runs_only_when_asked_and_links_stay_in_the_container(boot: Boot) -> None:
    # Without a writable /sys the unit's condition skips udevd, as on most container hosts.
    plain = boot(install_project=False)
    udevd = ["systemctl", "is-active", "systemd-udevd.service"]
    assert plain.run(udevd, check=False).stdout.strip() != "active"
    plain.close()

    c = boot(install_project=False, udev=True)
    assert c.run(udevd).stdout.strip() == "active"
    c.run(["ip", "link", "add", "e2e0", "type", "veth", "peer", "name", "e2e1"])
    c.run(["udevadm", "settle", "--timeout=10"])
    # USEC_INITIALIZED is written by udevd itself: the kernel's uevent alone would not have it.
    info = c.run(["udevadm", "info", "/sys/class/net/e2e0"]).stdout
    assert "USEC_INITIALIZED=" in info, info
    assert not os.path.exists("/sys/class/net/e2e0"), "a link made in the container hit the host"
