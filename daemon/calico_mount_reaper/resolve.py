"""Open a directory by path without following any symlink on the way, and check what we got.

Whoever can write under ``/run/calico`` can swap any component of a path there for a symlink
at any moment (one ``renameat2(RENAME_EXCHANGE)``), including mid-reap. Every directory the
reaper acts through is therefore opened here (safety rule 9):

- ``openat2(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` on Linux 5.6+: the kernel refuses
  the whole lookup with ELOOP if any component is a symlink;
- otherwise a walk from ``/``, one component at a time, each opened ``O_PATH | O_NOFOLLOW |
  O_DIRECTORY`` relative to the previous one: a symlink fails that open with ENOTDIR.

Neither stops a *rename* of a real directory during the lookup, and neither sees a mount
placed over a component (lookups enter mounts, as they must to reach a mount point at all). So
the fd is then checked against the plan (`verify`): the path the kernel reports for it now,
and the mount it is on. Only a directory that passes is acted through, and only through the fd:
from then on the directory is pinned, whatever happens to the names above it.
"""

from __future__ import annotations

import enum
import errno
import functools
import os
from dataclasses import dataclass

from calico_mount_reaper.libc import syscall

SYS_OPENAT2 = 437  # the same number on every architecture (added after the 5.1 unification)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
_OPEN_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
AT_FDCWD = -100


class Method(enum.Enum):
    """How a directory is opened; AUTO picks openat2 where the kernel has it."""

    AUTO = "auto"
    OPENAT2 = "openat2"
    WALK = "walk"


class Unsafe(OSError):
    """The path cannot be opened without following a symlink, or is not a plain absolute path."""


@dataclass(frozen=True)
class Expected:
    """The directory a plan acts through: its path and the mount it must be on.

    ``unique_mount_id`` is the 64-bit ID (Linux 6.8+) when the plan has it; the 32-bit
    ``mount_id`` is then not compared (it may have been reused), only kept for messages.
    """

    path: str
    mount_id: int
    unique_mount_id: int | None = None


def components(path: str) -> list[str]:
    """The names in an absolute, canonical path; Unsafe for anything else.

    The kernel shows mount points canonical (no ``.``, ``..``, ``//``). Anything else did not
    come from the kernel's table, and ``..`` would let a lookup climb out of a checked tree.
    """
    if not path.startswith("/"):
        raise Unsafe(errno.EINVAL, "not an absolute path", path)
    names = path.split("/")[1:]
    if names == [""]:
        return []  # "/" itself
    if any(n in ("", ".", "..") for n in names):
        raise Unsafe(errno.EINVAL, "not a canonical path (empty, '.' or '..' component)", path)
    return names


def _openat2(path: str) -> int:
    """openat2 refusing every symlink; OSError on failure (ENOSYS before Linux 5.6)."""
    import ctypes

    class OpenHow(ctypes.Structure):
        _fields_ = (
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        )

    how = OpenHow(_OPEN_DIR, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd, err = syscall(
        SYS_OPENAT2,
        ctypes.c_int(AT_FDCWD),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        if err == errno.ELOOP:
            raise Unsafe(err, "a component is a symlink (refused without following it)", path)
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk(path: str) -> int:
    """The pre-5.6 way: one O_PATH|O_NOFOLLOW|O_DIRECTORY open per component, from ``/``."""
    fd = os.open("/", _OPEN_DIR)
    try:
        for name in components(path):
            try:
                step = os.open(name, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:
                if _is_symlink(name, fd):
                    raise Unsafe(
                        errno.ELOOP,
                        f"component {name!r} is a symlink (refused without following it)",
                        path,
                    ) from None
                raise
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(name: str, dir_fd: int) -> bool:
    import stat

    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


@functools.cache
def _has_openat2() -> bool:
    """Whether openat2 works here: not on kernels before 5.6, nor under a filter that denies it."""
    try:
        os.close(_openat2("/"))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp allow-list without it
            return False
        raise
    return True


def open_directory(path: str, method: Method = Method.AUTO) -> int:
    """An ``O_PATH`` fd on the directory at ``path``, reached without following any symlink.

    Raises Unsafe when a component is a symlink (or the path is not canonical), and the usual
    OSError (ENOENT, ENOTDIR, ENAMETOOLONG, ...) otherwise. The caller owns the fd.
    """
    components(path)  # refuse "..", ".", "//" whichever way we open
    if method is Method.OPENAT2 or (method is Method.AUTO and _has_openat2()):
        return _openat2(path)
    return _walk(path)


def path_of(fd: int) -> str:
    """The path the kernel reports for ``fd`` now (``/proc/self/fd/N``), as str like mountinfo.

    A directory renamed since it was opened shows its new path; a removed one gets
    " (deleted)" appended: neither equals the planned path, so neither is acted through.
    """
    return os.readlink(f"/proc/self/fd/{fd}")


def verify(fd: int, expected: Expected) -> str | None:
    """None if ``fd`` is the planned directory; otherwise why not (for a refusal)."""
    from calico_mount_reaper.statx import IdKind, stat_mount

    try:
        now = path_of(fd)
    except OSError as exc:
        return f"cannot tell where the directory {expected.path!r} is: {exc.strerror}"
    if now != expected.path:
        return f"the directory opened as {expected.path!r} is now at {now!r} (moved or replaced)"
    kind = IdKind.OLD if expected.unique_mount_id is None else IdKind.UNIQUE
    want = expected.mount_id if expected.unique_mount_id is None else expected.unique_mount_id
    try:
        got = stat_mount(b"", kind, dir_fd=fd).mount_id
    except OSError as exc:
        return f"cannot tell which mount {expected.path!r} is on: {exc.strerror}"
    if got is None and kind is IdKind.OLD:
        got = fdinfo_mount_id(f"/proc/self/fdinfo/{fd}")
    if got is None:
        return f"this kernel does not report the {kind.name.lower()} mount ID of {expected.path!r}"
    if got != want:
        return (
            f"{expected.path!r} is on mount {got}, not the planned mount {want} "
            "(another mount over it, or a redirect)"
        )
    return None


def fdinfo_mount_id(fdinfo: str) -> int | None:
    """The old mount ID from an fdinfo file: kernels before 5.8 lack STATX_MNT_ID."""
    with open(fdinfo) as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    return None
