"""Building node-like mount tables fast, inside the private namespace a scenario runs in.

Base mounts imitate what kubelet leaves on a busy node: one bind mount per pod volume, with the
long pod paths real tables have (line length drives the cost of reading mountinfo). Bind mounts
of one directory are the cheapest mounts the kernel makes (no new superblock); the table still
gets one line per mount. Call these only from inside `nsutil.in_namespace`.
"""

from __future__ import annotations

import ctypes
import os

from tests.support.nsutil import mount

MS_BIND = 4096
MNT_DETACH = 2
BASE = "/run/bench"
_libc = ctypes.CDLL(None, use_errno=True)


def pod_path(i: int, base: str = BASE) -> str:
    return (
        f"{base}/pods/{i:08x}-5f1c-4c1e-9d2a-{i:012x}/volumes/"
        f"kubernetes.io~projected/kube-api-access-{i % 99991:05d}"
    )


def grow_base(start: int, stop: int, base: str = BASE) -> None:
    """Add pod bind mounts number ``start`` .. ``stop - 1`` (the first call sets up ``base``)."""
    if start == 0:
        os.makedirs(base, exist_ok=True)
        mount("tmpfs", base, "tmpfs", 0, "mode=755")
        os.makedirs(f"{base}/src")
    src = f"{base}/src".encode()
    for i in range(start, stop):
        path = pod_path(i, base)
        os.makedirs(path)
        if _libc.mount(src, path.encode(), None, MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bind mount {path}: {os.strerror(err)}")


def mount_target(path: str, fstype: str = "cgroup2") -> None:
    os.makedirs(path, exist_ok=True)
    mount("none", path, fstype)


def stack(path: str, layers: int) -> None:
    """``layers`` mounts at one path, cgroup2 and tmpfs in turn (the kernel refuses the same
    cgroup2 directly on itself, not with a tmpfs between)."""
    os.makedirs(path, exist_ok=True)
    for i in range(layers):
        if i % 2:
            mount("tmpfs", path, "tmpfs", 0, "size=4k")
        else:
            mount("none", path, "cgroup2")


def detach(path: str) -> None:
    """umount2(MNT_DETACH): drop a whole subtree at once (lazy; the kernel frees it later)."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"detach {path}: {os.strerror(err)}")


def count(path: str = "/proc/self/mountinfo") -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def mounts_at(path: str) -> int:
    """How many mounts have exactly this mount point (escaping ignored: bench paths are plain)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split(b" ", 5)[4] == path.encode())
