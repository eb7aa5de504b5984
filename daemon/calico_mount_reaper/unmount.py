"""The unmount engine: umount2 and statx through ctypes, behind an exact mount-ID check.

Every unmount goes through `unmount_planned`, which
1. pins the parent directory with an ``O_PATH`` fd, asks the kernel which mount the last
   component refers to *right now* (statx ``STATX_MNT_ID`` with ``AT_SYMLINK_NOFOLLOW``
   relative to that fd; fdinfo on an ``O_PATH|O_NOFOLLOW`` fd on kernels before 5.8) and
   refuses unless it is exactly the mount that was planned. ``st_dev`` would not do: every
   cgroup2 mount shares one device number;
2. calls ``umount2("/proc/self/fd/<parent>/<name>", UMOUNT_NOFOLLOW)``: the lookup starts at
   the very directory that was checked, so swapping a directory on the way for a symlink
   (``/run/calico`` -> a tree holding another cgroup2 mount) after the check cannot redirect
   the unmount, and a symlink swapped in at the last component is never followed;
3. on EBUSY retries with a doubling backoff, then detaches (``MNT_DETACH``) where allowed, as
   systemd does for API filesystems at shutdown, and names the processes that hold it.

Nothing here ever deletes inside a mount: the only removal is `remove_mount_point`, an rmdir
of the emptied mount-point directory on an ordinary filesystem.
"""

from __future__ import annotations

import enum
import errno
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from calico_mount_reaper.libc import call
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.mountinfo import read as read_mountinfo

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
STATX_MNT_ID = 0x1000
_STATX_SIZE = 256
_STATX_DEV_OFFSET = 136  # struct statx: stx_dev_major, stx_dev_minor (u32 each)
_STATX_MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id follows the dev/rdev numbers

# Filesystems we must never delete anything in (safety rule 3).
_SPECIAL_FS_MAGIC = frozenset(
    {
        0x63677270,  # CGROUP2_SUPER_MAGIC
        0x27E0EB,  # CGROUP_SUPER_MAGIC
        0xCAFE4A11,  # BPF_FS_MAGIC
        0x62656572,  # SYSFS_MAGIC
        0x9FA0,  # PROC_SUPER_MAGIC
    }
)

_STATFS_SIZE = 120  # sizeof(struct statfs) on 64-bit Linux; f_type (a long) comes first


class Result(enum.Enum):
    UNMOUNTED = "unmounted"
    DETACHED = "detached"
    ALREADY_GONE = "already-gone"
    REFUSED = "refused"  # a safety check said no; nothing was touched
    FAILED = "failed"  # the kernel said no
    DRY_RUN = "dry-run"

    @property
    def ok(self) -> bool:
        return self in (Result.UNMOUNTED, Result.DETACHED, Result.ALREADY_GONE)


@dataclass(frozen=True)
class Blocker:
    pid: int
    comm: str
    how: str  # "cwd", "root" or "fd 7"

    def __str__(self) -> str:
        return f"{self.comm} (pid {self.pid}, {self.how})"


@dataclass(frozen=True)
class Outcome:
    mount: Mount
    result: Result
    detail: str
    blockers: tuple[Blocker, ...] = ()


@dataclass(frozen=True)
class BusyPolicy:
    retries: int = 4
    backoff: float = 0.05  # seconds before the first retry; doubles each time
    detach: bool = True


class MountIdUnavailable(OSError):
    """Neither statx nor fdinfo could tell which mount a path is on."""


def _statx_mount_id(path: bytes, follow: bool = False, dir_fd: int = AT_FDCWD) -> int | None:
    """statx's mount ID for ``path``; None on kernels that do not fill it in (< 5.8)."""
    return _statx_identity(path, follow, dir_fd)[0]


def _statx_identity(
    path: bytes, follow: bool = False, dir_fd: int = AT_FDCWD
) -> tuple[int | None, str]:
    """(mount ID or None before 5.8, "major:minor" of the filesystem) from one statx call."""
    import ctypes

    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = AT_NO_AUTOMOUNT | (0 if follow else AT_SYMLINK_NOFOLLOW)
    err = call("statx", dir_fd, path, flags, STATX_MNT_ID, buf)
    if err:
        if err == errno.ENOSYS:
            return None, ""
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    raw = buf.raw
    major = int.from_bytes(raw[_STATX_DEV_OFFSET : _STATX_DEV_OFFSET + 4], "little")
    minor = int.from_bytes(raw[_STATX_DEV_OFFSET + 4 : _STATX_DEV_OFFSET + 8], "little")
    dev = f"{major}:{minor}"
    if not int.from_bytes(raw[0:4], "little") & STATX_MNT_ID:
        return None, dev
    return int.from_bytes(raw[_STATX_MNT_ID_OFFSET : _STATX_MNT_ID_OFFSET + 8], "little"), dev


def _fdinfo_identity(path: str, dir_fd: int | None = None) -> tuple[int, str]:
    """The fallback for kernels before 5.8: fdinfo and fstat of one O_PATH|O_NOFOLLOW fd."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        found = _fdinfo_mnt_id(f"/proc/self/fdinfo/{fd}")
        st_dev = os.fstat(fd).st_dev
    finally:
        os.close(fd)
    if found is None:
        raise MountIdUnavailable(errno.ENOTSUP, "no mnt_id in fdinfo", path)
    return found, f"{os.major(st_dev)}:{os.minor(st_dev)}"


def mount_id_of(path: str, dir_fd: int | None = None) -> int:
    """The ID of the mount ``path`` refers to now, without following a final symlink."""
    return mount_identity(path, dir_fd)[0]


def mount_identity(path: str, dir_fd: int | None = None) -> tuple[int, str]:
    """(mount ID, "major:minor") of what ``path`` refers to now, final symlink not followed.

    The old 32-bit mount IDs that mountinfo shows are reused lowest-free-first, so an ID alone
    may name a newer mount at the same path; the device number tells another filesystem apart.
    """
    at = AT_FDCWD if dir_fd is None else dir_fd
    found, dev = _statx_identity(os.fsencode(path), dir_fd=at)
    return (found, dev) if found is not None else _fdinfo_identity(path, dir_fd)


def _umount2(path: str, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    return call("umount2", os.fsencode(path), flags | UMOUNT_NOFOLLOW)


def _open_parent(path: str) -> tuple[int, str]:
    """An O_PATH fd on the directory that holds ``path``'s last component, and that name.

    Every later step (the mount-ID check, umount2, rmdir) goes through this one fd, so they all
    see the same directory even if a component on the way is swapped for a symlink meanwhile.
    """
    parent, name = os.path.split(path.rstrip("/"))
    fd = os.open(parent or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return fd, name


def _via(fd: int, name: str) -> str:
    # The kernel resolves /proc/self/fd/N to the pinned directory itself, not to a path.
    return f"/proc/self/fd/{fd}/{name}"


def mount_exists(mount_id: int, mountinfo_path: str = "/proc/self/mountinfo") -> bool:
    return any(m.mount_id == mount_id for m in read_mountinfo(mountinfo_path).mounts)


def _fdinfo_mnt_id(path: str) -> int | None:
    with open(path) as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None


def _held_mounts(pid: str, proc_root: str) -> Iterator[tuple[str, int | None]]:
    """(how, mount ID) for a process's cwd, root and every open fd; silent on races with exit."""
    for how in ("cwd", "root"):
        try:
            # Following the magic link lands on the exact mount the process sees, which is
            # more precise than comparing paths (those are relative to each process's root).
            mnt = _statx_mount_id(os.fsencode(f"{proc_root}/{pid}/{how}"), follow=True)
        except OSError:
            continue
        yield how, mnt
    try:
        fds = os.listdir(f"{proc_root}/{pid}/fdinfo")
    except OSError:
        return
    for fd in fds:
        try:
            mnt = _fdinfo_mnt_id(f"{proc_root}/{pid}/fdinfo/{fd}")
        except OSError:
            continue  # closed meanwhile
        yield f"fd {fd}", mnt


def find_blockers(mount_ids: Collection[int], proc_root: str = "/proc") -> tuple[Blocker, ...]:
    """Processes whose cwd, root or an open file lies on one of ``mount_ids``."""
    found = []
    for pid in os.listdir(proc_root):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        for how, mnt in _held_mounts(pid, proc_root):
            if mnt in mount_ids:
                try:
                    with open(f"{proc_root}/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(Blocker(int(pid), comm, how))
    return tuple(found)


def _check_planned(mount: Mount, mountinfo_path: str, dir_fd: int, name: str) -> Outcome | None:
    """None if ``name`` in ``dir_fd`` is still the planned mount; otherwise what to report."""
    try:
        current: int | None
        current, dev = mount_identity(name, dir_fd)
    except FileNotFoundError:
        current, dev = None, ""  # gone, or hidden under a mount that lacks the path
    except OSError as exc:
        return Outcome(mount, Result.REFUSED, f"cannot tell which mount the path is on: {exc}")
    if current == mount.mount_id and dev == mount.major_minor:
        return None
    if current == mount.mount_id:
        # The ID was freed and handed to a newer mount of another filesystem (or, on btrfs,
        # st_dev names a subvolume): either way not provably the planned mount.
        return Outcome(
            mount,
            Result.REFUSED,
            f"mount ID {current} now names a filesystem with device "
            f"{dev}, not the planned {mount.major_minor} (ID reused); nothing was touched",
        )
    if not mount_exists(mount.mount_id, mountinfo_path):
        return Outcome(mount, Result.ALREADY_GONE, "unmounted by someone else (or by propagation)")
    now = "no longer exists" if current is None else f"now refers to mount {current}"
    return Outcome(
        mount,
        Result.REFUSED,
        f"the path {now}, not the planned mount {mount.mount_id} (shadowed by another mount, "
        "moved, or a symlink swapped in); nothing was touched",
    )


def unmount_planned(
    mount: Mount,
    policy: BusyPolicy,
    detach_allowed: bool,
    *,
    site_ids: Collection[int] = (),
    mountinfo_path: str = "/proc/self/mountinfo",
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Unmount exactly ``mount`` (by its path), or say why not."""
    try:
        dir_fd, name = _open_parent(mount.mount_point)
    except FileNotFoundError:
        if not mount_exists(mount.mount_id, mountinfo_path):
            return Outcome(mount, Result.ALREADY_GONE, "unmounted by someone else")
        return Outcome(mount, Result.REFUSED, "the path no longer exists; nothing was touched")
    except OSError as exc:
        return Outcome(mount, Result.REFUSED, f"cannot open the mount point's directory: {exc}")
    try:
        return _unmount_pinned(
            mount, policy, detach_allowed, site_ids, mountinfo_path, sleep, dir_fd, name
        )
    finally:
        os.close(dir_fd)


def _unmount_pinned(
    mount: Mount,
    policy: BusyPolicy,
    detach_allowed: bool,
    site_ids: Collection[int],
    mountinfo_path: str,
    sleep: Callable[[float], None],
    dir_fd: int,
    name: str,
) -> Outcome:
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        refused = _check_planned(mount, mountinfo_path, dir_fd, name)
        if refused is not None:
            return refused
        err = _umount2(_via(dir_fd, name), 0)
        if err == 0:
            return Outcome(mount, Result.UNMOUNTED, f"unmounted after {attempt + 1} attempt(s)")
        if err in (errno.EINVAL, errno.ENOENT):
            # Gone between the check and the call: a planned mount that vanished is a success.
            # Anything still listed was refused for another reason (e.g. a locked mount).
            if not mount_exists(mount.mount_id, mountinfo_path):
                return Outcome(mount, Result.ALREADY_GONE, "gone before umount2 reached it")
            return Outcome(mount, Result.FAILED, f"umount2: {os.strerror(err)} (locked mount?)")
        if err == errno.EPERM:
            return Outcome(mount, Result.FAILED, "permission denied: run as root (CAP_SYS_ADMIN)")
        if err != errno.EBUSY:
            return Outcome(mount, Result.FAILED, f"umount2: {os.strerror(err)}")
        if attempt < policy.retries:
            sleep(delay)
            delay *= 2
    blockers = find_blockers(set(site_ids) | {mount.mount_id})
    if not (policy.detach and detach_allowed):
        return Outcome(mount, Result.FAILED, "busy; detaching is not allowed for it", blockers)
    refused = _check_planned(mount, mountinfo_path, dir_fd, name)
    if refused is not None:
        return refused
    err = _umount2(_via(dir_fd, name), MNT_DETACH)
    if err == 0:
        return Outcome(mount, Result.DETACHED, "busy; detached (MNT_DETACH)", blockers)
    return Outcome(mount, Result.FAILED, f"busy; detach failed: {os.strerror(err)}", blockers)


def remove_mount_point(path: str) -> str | None:
    """rmdir the emptied mount-point directory if it sits on an ordinary filesystem.

    Returns why it was kept, or None once removed. Never recursive: a non-empty directory
    stays (ENOTEMPTY), and a directory on cgroupfs/bpffs/sysfs/procfs is never touched,
    because an rmdir there removes a real cgroup or pinned object rather than a directory.
    """
    try:
        dir_fd, name = _open_parent(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        # All three steps go through the one pinned parent: a directory on the way swapped for
        # a symlink into /sys/fs/cgroup after the checks cannot turn the rmdir into a cgroup's.
        if mount_id_of(name, dir_fd) != mount_id_of(".", dir_fd):
            return "still a mount point"
        if _statfs_type(f"/proc/self/fd/{dir_fd}") in _SPECIAL_FS_MAGIC:
            return "it sits on a cgroup/bpf/sysfs/proc filesystem"
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(dir_fd)
    return None


def _statfs_type(path: str) -> int:
    import ctypes

    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    err = call("statfs", os.fsencode(path), buf)
    if err:
        raise OSError(err, os.strerror(err), path)
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)
    return f_type & 0xFFFFFFFF
