"""statx(2) through ctypes: which mount a path or an fd is on, and its device.

``struct statx`` is laid out as in ``include/uapi/linux/stat.h`` (the same on every
architecture: fixed-width fields only, 256 bytes). Fields after ``stx_mnt_id`` are left as
padding: nothing here reads them.

Two mount IDs exist:
- ``STATX_MNT_ID`` (0x1000, Linux 5.8): the old 32-bit ID that mountinfo shows. The kernel hands
  these out lowest-free-first, so a freed ID soon names another mount.
- ``STATX_MNT_ID_UNIQUE`` (0x4000, Linux 6.8): a 64-bit ID that is never reused while the
  system runs (measured on 6.18: values start at 1<<31, above every old ID). statmount and
  listmount take and return the same ID.

The kernel says which it filled in through ``stx_mask``: asking for a mask an older kernel does
not know is not an error, the bit just stays clear. Callers check `has`.

This module imports ctypes at import time, so import it lazily (see libc.py on why).
"""

from __future__ import annotations

import ctypes
import enum
import os
from dataclasses import dataclass

from calico_mount_reaper.libc import call

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000

STATX_TYPE = 0x1
STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000


class IdKind(enum.Enum):
    """Which mount ID to ask for."""

    OLD = STATX_MNT_ID  # 32-bit, reused; what mountinfo shows
    UNIQUE = STATX_MNT_ID_UNIQUE  # 64-bit, never reused (Linux 6.8+)


class _Timestamp(ctypes.Structure):
    _fields_ = (
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("reserved", ctypes.c_int32),
    )


class Statx(ctypes.Structure):
    """``struct statx`` up to ``stx_mnt_id`` (offset 144), padded to the kernel's 256 bytes."""

    _fields_ = (
        ("stx_mask", ctypes.c_uint32),
        ("stx_blksize", ctypes.c_uint32),
        ("stx_attributes", ctypes.c_uint64),
        ("stx_nlink", ctypes.c_uint32),
        ("stx_uid", ctypes.c_uint32),
        ("stx_gid", ctypes.c_uint32),
        ("stx_mode", ctypes.c_uint16),
        ("spare0", ctypes.c_uint16),
        ("stx_ino", ctypes.c_uint64),
        ("stx_size", ctypes.c_uint64),
        ("stx_blocks", ctypes.c_uint64),
        ("stx_attributes_mask", ctypes.c_uint64),
        ("stx_atime", _Timestamp),
        ("stx_btime", _Timestamp),
        ("stx_ctime", _Timestamp),
        ("stx_mtime", _Timestamp),
        ("stx_rdev_major", ctypes.c_uint32),
        ("stx_rdev_minor", ctypes.c_uint32),
        ("stx_dev_major", ctypes.c_uint32),
        ("stx_dev_minor", ctypes.c_uint32),
        ("stx_mnt_id", ctypes.c_uint64),
        ("spare", ctypes.c_uint8 * 104),
    )


assert ctypes.sizeof(Statx) == 256 and Statx.stx_mnt_id.offset == 144


@dataclass(frozen=True)
class MountStat:
    """What one statx call says about a path: its mount (if the kernel told) and device."""

    mount_id: int | None  # of the kind asked for; None if this kernel does not fill it in
    major_minor: str  # the filesystem's device, as mountinfo prints it
    mode: int


def stat_mount(
    path: bytes, kind: IdKind, *, dir_fd: int = AT_FDCWD, follow: bool = False
) -> MountStat:
    """statx ``path`` (relative to ``dir_fd``; b"" means ``dir_fd`` itself) for a mount ID.

    Never triggers an automount, and does not follow a final symlink unless ``follow``.
    Raises OSError with the errno (ENOSYS before Linux 4.11).
    """
    buf = Statx()
    flags = AT_NO_AUTOMOUNT | (0 if follow else AT_SYMLINK_NOFOLLOW)
    if not path:
        flags |= AT_EMPTY_PATH
    err = call("statx", dir_fd, path, flags, STATX_TYPE | kind.value, ctypes.byref(buf))
    if err:
        raise OSError(err, os.strerror(err), os.fsdecode(path))
    return MountStat(
        mount_id=buf.stx_mnt_id if buf.stx_mask & kind.value else None,
        major_minor=f"{buf.stx_dev_major}:{buf.stx_dev_minor}",
        mode=buf.stx_mode,
    )
