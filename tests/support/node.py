"""A node-like mount table, built for real inside a private mount namespace.

Call these only from code that runs inside `nsutil.in_namespace` (or a NamespaceShell): they
make real mounts under the namespace's private tmpfs on /run.

Never run ``rm -rf`` over a cgroup2 mount made here: without a cgroup namespace it shows the
host's real cgroup tree, and a recursive delete would rmdir real, empty cgroups.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

from calico_mount_reaper import liveness, mountinfo

from tests.support.nsutil import mount

# Mount points with every byte the kernel escapes in mountinfo (space, tab, newline, backslash).
WEIRD_TARGET = "/run/calico/we ird\tname\nwith\\slash"
# Never under a cgroup2 mount: a mkdir there would create a real cgroup.
WEIRD_DECOY = "/run/calico-decoy/sp ace\nnl"

TARGETS = (
    ("cgroup2", "/run/calico/cgroup"),
    ("tmpfs", "/run/calico/cgroup"),  # stacked between two cgroup2 layers
    ("cgroup2", "/run/calico/cgroup"),
    ("bpf", "/run/calico/bpffs"),
    ("cgroup2", "/var/run/calico/felix-cgroup"),  # /var/run is /run
    ("cgroup2", "/run/cilium/cgroupv2"),
    ("cgroup2", WEIRD_TARGET),
)
DECOYS = (
    ("cgroup2", "/run/calico2"),
    ("cgroup2", WEIRD_DECOY),
    ("tmpfs", "/run/calicox"),
    ("cgroup2", "/run/other/cgroup"),
    ("bpf", "/run/cilium/bpffs"),  # Cilium's rule covers only /run/cilium/cgroupv2
    ("cgroup2", "/run/cilium/cgroupv2x"),
    ("tmpfs", "/run/k8s/secret"),
)


def mount_at(fstype: str, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    mount("none", path, fstype)


def build(
    targets: tuple[tuple[str, str], ...] = TARGETS, decoys: tuple[tuple[str, str], ...] = DECOYS
) -> None:
    """Mount decoys first and targets after, interleaved as on a real node."""
    for fstype, path in decoys:
        mount_at(fstype, path)
    for fstype, path in targets:
        mount_at(fstype, path)


def lines(path: str = "/proc/self/mountinfo") -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def points(path: str = "/proc/self/mountinfo") -> list[str]:
    return [m.mount_point for m in mountinfo.read(path).mounts]


def is_under_target(point: str) -> bool:
    norm = point.replace("/var/run/", "/run/", 1)
    return norm.startswith(("/run/calico/", "/run/cilium/cgroupv2/")) or norm in (
        "/run/calico",
        "/run/cilium/cgroupv2",
    )


@dataclass
class Owner:
    """A real process whose comm and argv[0] are an owner's name (e.g. calico-node)."""

    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, cwd: str = "/") -> Owner:
        # exec -a sets argv[0]; the comm comes from the executable, so copy sleep under the name.
        exe = f"/run/{name}"
        if not os.path.exists(exe):
            with open("/bin/sleep", "rb") as src, open(exe, "wb") as dst:
                dst.write(src.read())
            os.chmod(exe, 0o755)
        owner = cls(subprocess.Popen([exe, "600"], cwd=cwd))
        owner._wait_until_exec_done(name)
        return owner

    def _wait_until_exec_done(self, name: str) -> None:
        """Wait until the product's own /proc reader sees the new comm and argv.

        Popen returns once the close-on-exec pipe closes, but execve closes those descriptors
        before it sets comm and before the new argv is readable, so a scan right after Popen
        can still see the forked Python. CI once caught exactly that window.
        """
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = liveness.read_process(self.pid)
            if seen is None:
                break
            if seen.comm == name[:15] and seen.argv0 == name:
                return
            time.sleep(0.001)
        raise RuntimeError(f"owner {name} (pid {self.pid}) never finished its exec")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
