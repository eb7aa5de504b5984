"""The unmount engine: umount2 and rmdir only through verified, symlink-free directories.

Every unmount goes through `unmount_planned`:
1. the directory that holds the mount point's name is opened without following any symlink
   (`resolve.open_directory`) and checked: the path the kernel reports for the fd is the
   planned one, and the fd is on the planned mount (`resolve.verify`). From then on that one
   fd is the only way in, so swapping any component above it for a symlink, or renaming it,
   cannot steer what follows;
2. the mount at the name is identified through that fd, right before each umount2:
   - with the 64-bit unique mount ID when the plan has one (Linux 6.8+, `IdKind.UNIQUE`):
     never reused, so a match is the planned mount and nothing else;
   - otherwise (`IdKind.OLD`) with the 32-bit ID, the device and the filesystem type, all
     read from one ``O_PATH`` fd on the mount. The 32-bit IDs are reused lowest-free-first
     and every cgroup2 mount shares one device number, so the ID alone, or ID and device, can
     name a newer mount; that it sits at the planned name in the verified directory is what
     ties it to the plan;
3. ``umount2("/proc/self/fd/<dir>/<name>", UMOUNT_NOFOLLOW)``: the lookup starts at the
   verified directory, and a symlink swapped in at the last component is never followed;
4. on EBUSY it retries with a doubling backoff, then detaches (``MNT_DETACH``) where allowed,
   as systemd does for API filesystems at shutdown, and names the processes that hold it.

Nothing here ever deletes inside a mount. The only removal is `remove_mount_point`: an
``unlinkat(dir, name, AT_REMOVEDIR)`` of the emptied mount-point directory, through the same
kind of verified directory, and only on an ordinary filesystem from an allow-list.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from calico_mount_reaper.libc import call
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.mountinfo import read as read_mountinfo
from calico_mount_reaper.resolve import Expected, Unsafe, fdinfo_mount_id, open_directory, verify

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
_STATFS_SIZE = 120  # sizeof(struct statfs) on 64-bit Linux; f_type (a long) comes first

# Superblock magics (include/uapi/linux/magic.h) by mountinfo's fstype name: the old identity
# path checks that the mount at the name is of the planned type (a freed device number can be
# handed to another filesystem along with a freed mount ID).
FS_MAGIC = {
    "cgroup2": 0x63677270,
    "cgroup": 0x27E0EB,
    "bpf": 0xCAFE4A11,
    "tmpfs": 0x01021994,
    "devtmpfs": 0x01021994,
    "ramfs": 0x858458F6,
    "ext2": 0xEF53,
    "ext3": 0xEF53,
    "ext4": 0xEF53,
    "xfs": 0x58465342,
    "btrfs": 0x9123683E,
    "f2fs": 0xF2F52010,
    "overlay": 0x794C7630,
    "squashfs": 0x73717368,
    "proc": 0x9FA0,
    "sysfs": 0x62656572,
    "tracefs": 0x74726163,
    "debugfs": 0x64626720,
    "securityfs": 0x73636673,
    "configfs": 0x62656570,
    "nsfs": 0x6E736673,
    "hugetlbfs": 0x958458F6,
    "mqueue": 0x19800202,
    "nfs": 0x6969,
    "nfs4": 0x6969,
    "fuse": 0x65735546,
}
_FUSE_MAGIC = FS_MAGIC["fuse"]  # every fuse.<subtype> shares it

# Where an emptied mount-point directory may be removed: filesystems on which rmdir removes a
# directory and nothing else. On cgroupfs it removes a cgroup, on tracefs a tracing instance,
# on configfs a config item: a deny-list cannot know them all, so this is an allow-list.
ORDINARY_FS_MAGIC = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
}


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


def split_mount_point(path: str) -> tuple[str, str]:
    """(the directory that holds the last component, that component)."""
    parent, name = os.path.split(path.rstrip("/"))
    return parent or "/", name


def directory_of(mount: Mount, mounts: Iterable[Mount]) -> Expected:
    """The directory a planned mount's name is looked up in, and the mount it must be on.

    That is the mount below the bottom of the stack at the mount point: in a stack such as
    cgroup2 / tmpfs / cgroup2 at one path, each member's parent is the member below it, whose
    root *is* the mount point; the dentry holding the name lives on whatever the bottom one
    was mounted on. Pure: works on the table the plan was made from.
    """
    by_id = {m.mount_id: m for m in mounts}
    bottom, seen = mount, {mount.mount_id}
    while (below := by_id.get(bottom.parent_id)) is not None and (
        below.mount_point == mount.mount_point and below.mount_id not in seen
    ):
        seen.add(below.mount_id)
        bottom = below
    unique = bottom.unique_parent_id if mount.unique_id is not None else None
    return Expected(split_mount_point(mount.mount_point)[0], bottom.parent_id, unique)


def _umount2(path: str, flags: int) -> int:
    """umount2(2); returns 0 or the errno."""
    return call("umount2", os.fsencode(path), flags | UMOUNT_NOFOLLOW)


def _via(fd: int, name: str) -> str:
    # The kernel resolves /proc/self/fd/N to the pinned directory itself, not to a path.
    return f"/proc/self/fd/{fd}/{name}"


def fs_type_of(fd: int) -> int:
    """fstatfs's f_type (superblock magic) of the filesystem ``fd`` is on."""
    import ctypes

    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    err = call("fstatfs", fd, buf)
    if err:
        raise OSError(err, os.strerror(err))
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)
    return f_type & 0xFFFFFFFF


def _magic_for(fstype: str) -> int | None:
    return _FUSE_MAGIC if fstype.startswith("fuse.") else FS_MAGIC.get(fstype)


def identify(dir_fd: int, name: str, mount: Mount) -> str | None:
    """None if ``name`` in the verified ``dir_fd`` is exactly ``mount`` now; else what it is.

    Raises FileNotFoundError when there is nothing at the name.
    """
    from calico_mount_reaper.statx import IdKind, stat_mount

    if mount.unique_id is not None:
        found = stat_mount(os.fsencode(name), IdKind.UNIQUE, dir_fd=dir_fd).mount_id
        if found is None:
            return "this kernel does not report unique mount IDs, but the plan has them"
        if found != mount.unique_id:
            return f"the path now refers to mount {found}, not the planned {mount.unique_id}"
        return None
    expected_magic = _magic_for(mount.fstype)
    if expected_magic is None:
        return (
            f"cannot verify the filesystem type {mount.fstype!r} without unique mount IDs "
            "(Linux 6.8+)"
        )
    # One fd on the mount itself, so ID, device and type all describe the same object. It is
    # closed again before umount2: an open fd would make the mount busy.
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = stat_mount(b"", IdKind.OLD, dir_fd=fd)
        found_id = (
            st.mount_id if st.mount_id is not None else fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
        )
        magic = fs_type_of(fd)
    finally:
        os.close(fd)
    if found_id != mount.mount_id:
        return f"the path now refers to mount {found_id}, not the planned {mount.mount_id}"
    if st.major_minor != mount.major_minor or magic != expected_magic:
        return (
            f"mount ID {found_id} now names another filesystem (device {st.major_minor}, "
            f"type 0x{magic:x}; planned {mount.major_minor}, {mount.fstype}): ID reused"
        )
    return None


def _fdinfo_mount_id_at(dir_fd: int, name: str) -> int | None:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)


def mount_exists(mount: Mount, mountinfo_path: str = "/proc/self/mountinfo") -> bool:
    """Whether the table still lists a mount that may be ``mount`` (same old ID and device).

    Only used to tell "already gone" from "refused". The path is not compared: a mount moved
    elsewhere is not gone. Erring towards "exists" means refused, never a wrong success.
    """
    return any(
        m.mount_id == mount.mount_id and m.major_minor == mount.major_minor
        for m in read_mountinfo(mountinfo_path).mounts
    )


def _held_mounts(pid: str, proc_root: str) -> Iterator[tuple[str, int | None]]:
    """(how, mount ID) for a process's cwd, root and every open fd; silent on races with exit."""
    from calico_mount_reaper.statx import IdKind, stat_mount

    for how in ("cwd", "root"):
        try:
            # Following the magic link lands on the exact mount the process sees, which is
            # more precise than comparing paths (those are relative to each process's root).
            link = os.fsencode(f"{proc_root}/{pid}/{how}")
            mnt = stat_mount(link, IdKind.OLD, follow=True).mount_id
        except OSError:
            continue
        yield how, mnt
    try:
        fds = os.listdir(f"{proc_root}/{pid}/fdinfo")
    except OSError:
        return
    for fd in fds:
        try:
            mnt = fdinfo_mount_id(f"{proc_root}/{pid}/fdinfo/{fd}")
        except OSError:
            continue  # closed meanwhile
        yield f"fd {fd}", mnt


def find_blockers(mount_ids: Collection[int], proc_root: str = "/proc") -> tuple[Blocker, ...]:
    """Processes whose cwd, root or an open file lies on one of ``mount_ids`` (32-bit IDs)."""
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


def _open_verified(directory: Expected) -> int | str:
    """The verified directory's fd, or why it cannot be used. ENOENT propagates."""
    try:
        fd = open_directory(directory.path)
    except Unsafe as exc:
        return f"{directory.path!r}: {exc.strerror}"
    except FileNotFoundError:
        raise  # the caller tells "already gone" from "refused"
    except OSError as exc:
        return f"cannot open the directory {directory.path!r}: {exc.strerror}"
    problem = verify(fd, directory)
    if problem is not None:
        os.close(fd)
        return problem
    return fd


def _refused_or_gone(mount: Mount, mountinfo_path: str, why: str) -> Outcome:
    if not mount_exists(mount, mountinfo_path):
        return Outcome(mount, Result.ALREADY_GONE, "unmounted by someone else (or by propagation)")
    return Outcome(mount, Result.REFUSED, f"{why}; nothing was touched")


def unmount_planned(
    mount: Mount,
    directory: Expected,
    policy: BusyPolicy,
    detach_allowed: bool,
    *,
    site_ids: Collection[int] = (),
    mountinfo_path: str = "/proc/self/mountinfo",
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Unmount exactly ``mount`` through the verified ``directory`` (see `directory_of`)."""
    try:
        opened = _open_verified(directory)
    except FileNotFoundError:
        return _refused_or_gone(mount, mountinfo_path, "the path no longer exists")
    if isinstance(opened, str):
        return _refused_or_gone(mount, mountinfo_path, opened)
    try:
        return _unmount_pinned(
            mount, directory, policy, detach_allowed, site_ids, mountinfo_path, sleep, opened
        )
    finally:
        os.close(opened)


def _check(mount: Mount, directory: Expected, dir_fd: int, mountinfo_path: str) -> Outcome | None:
    """None if the pinned directory and the mount at the name are still as planned."""
    problem = verify(dir_fd, directory)  # again: the directory may have been renamed meanwhile
    if problem is None:
        try:
            problem = identify(dir_fd, split_mount_point(mount.mount_point)[1], mount)
        except FileNotFoundError:
            problem = "the path no longer exists"
        except OSError as exc:
            return Outcome(mount, Result.REFUSED, f"cannot tell which mount the path is on: {exc}")
    if problem is None:
        return None
    return _refused_or_gone(mount, mountinfo_path, problem)


def _unmount_pinned(
    mount: Mount,
    directory: Expected,
    policy: BusyPolicy,
    detach_allowed: bool,
    site_ids: Collection[int],
    mountinfo_path: str,
    sleep: Callable[[float], None],
    dir_fd: int,
) -> Outcome:
    name = split_mount_point(mount.mount_point)[1]
    delay = policy.backoff
    for attempt in range(policy.retries + 1):
        refused = _check(mount, directory, dir_fd, mountinfo_path)
        if refused is not None:
            return refused
        err = _umount2(_via(dir_fd, name), 0)
        if err == 0:
            return Outcome(mount, Result.UNMOUNTED, f"unmounted after {attempt + 1} attempt(s)")
        if err in (errno.EINVAL, errno.ENOENT):
            # Gone between the check and the call: a planned mount that vanished is a success.
            # Anything still listed was refused for another reason (e.g. a locked mount).
            if not mount_exists(mount, mountinfo_path):
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
    refused = _check(mount, directory, dir_fd, mountinfo_path)
    if refused is not None:
        return refused
    err = _umount2(_via(dir_fd, name), MNT_DETACH)
    if err == 0:
        return Outcome(mount, Result.DETACHED, "busy; detached (MNT_DETACH)", blockers)
    return Outcome(mount, Result.FAILED, f"busy; detach failed: {os.strerror(err)}", blockers)


def remove_mount_point(mount_point: str, directory: Expected) -> str | None:
    """rmdir the emptied mount-point directory; None once removed, else why it was kept.

    Only through the verified ``directory`` (the one the reaped mount was looked up in), only
    if the name is a directory that is no longer a mount point, and only when that directory
    sits on an ordinary filesystem (`ORDINARY_FS_MAGIC`). Never recursive: a non-empty
    directory stays (ENOTEMPTY).
    """
    from calico_mount_reaper.statx import IdKind, stat_mount

    try:
        opened = _open_verified(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    if isinstance(opened, str):
        return opened
    name = split_mount_point(mount_point)[1]
    try:
        kind = IdKind.OLD if directory.unique_mount_id is None else IdKind.UNIQUE
        here = (
            directory.mount_id if directory.unique_mount_id is None else directory.unique_mount_id
        )
        st = stat_mount(os.fsencode(name), kind, dir_fd=opened)
        if not stat.S_ISDIR(st.mode):
            return "not a directory (replaced meanwhile)"
        found = st.mount_id if st.mount_id is not None else _fdinfo_mount_id_at(opened, name)
        if found != here:
            return "still a mount point"
        magic = fs_type_of(opened)
        if magic not in ORDINARY_FS_MAGIC:
            names = [n for n, m in FS_MAGIC.items() if m == magic]
            what = names[0] if names else f"0x{magic:x}"
            return (
                f"it sits on {what}, not an ordinary filesystem (rmdir there may remove a "
                "kernel object, such as a cgroup or a tracing instance)"
            )
        os.rmdir(name, dir_fd=opened)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(opened)
    return None
