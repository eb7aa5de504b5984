"""listmount(2) and statmount(2) (Linux 6.8+) through ctypes, and the unique mount ID of a path.

Plain syscall wrappers, nothing else: `mounttable` decides what to ask and what the answers mean.
Layouts follow include/uapi/linux/mount.h (6.8 to 6.18): the request is the 24-byte first
version of ``struct mnt_id_req`` (every 6.8+ kernel takes it; later versions only add a
namespace selector we do not need), and ``struct statmount`` is a fixed 512-byte header whose
``[str]`` fields are offsets into the string area that follows it. Fields added after 6.8 sit
in what 6.8 calls spare space; we read them only when the reply's ``mask`` says the kernel
filled them in.

Every call reports failure as an `ApiError` carrying the errno, so the caller can tell a kernel
without the call (ENOSYS), a sandbox that refuses it (EPERM) and a mount that went away between
two calls (ENOENT) apart.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from calico_mount_reaper.libc import libc
from calico_mount_reaper.statx import IdKind, stat_mount

# The syscall numbers are the same on every architecture for calls added after 5.1 (the unified
# table in include/uapi/asm-generic/unistd.h and arch/*/syscall.tbl).
SYS_STATMOUNT = 457
SYS_LISTMOUNT = 458

MNT_ID_REQ_SIZE_VER0 = 24
LSMT_ROOT = 0xFFFF_FFFF_FFFF_FFFF  # listmount: the root mount of our namespace

STATMOUNT_SB_BASIC = 0x0001  # sb_dev_major/minor, sb_magic, sb_flags
STATMOUNT_MNT_BASIC = 0x0002  # mnt_id*, mnt_parent_id*, mnt_attr, propagation, peer group
STATMOUNT_PROPAGATE_FROM = 0x0004
STATMOUNT_MNT_ROOT = 0x0008
STATMOUNT_MNT_POINT = 0x0010
STATMOUNT_FS_TYPE = 0x0020
STATMOUNT_SB_SOURCE = 0x0200  # Linux 6.13; older kernels leave it out of the reply's mask

# What a Mount record needs, all known to 6.8.
WANT = (
    STATMOUNT_SB_BASIC
    | STATMOUNT_MNT_BASIC
    | STATMOUNT_PROPAGATE_FROM
    | STATMOUNT_MNT_ROOT
    | STATMOUNT_MNT_POINT
    | STATMOUNT_FS_TYPE
)

# Where a mount is attached, and nothing else: what a fanotify mount event needs to be judged.
WHERE = STATMOUNT_MNT_BASIC | STATMOUNT_MNT_POINT

# Mount points are at most PATH_MAX; four strings of that fit with room to spare. A reply that
# still does not fit is EOVERFLOW, and the call is retried with a bigger buffer.
_STRINGS = 4 * 4096
_LIST_BATCH = 4096  # IDs per listmount call; the call is repeated from the last ID while full


class MntIdReq(ctypes.Structure):
    """``struct mnt_id_req``, first version (MNT_ID_REQ_SIZE_VER0)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("spare", ctypes.c_uint32),  # 6.18 calls it mnt_ns_fd; 0 means our own namespace
        ("mnt_id", ctypes.c_uint64),
        ("param", ctypes.c_uint64),  # statmount: the mask; listmount: the last ID seen
    ]


class StatmountHeader(ctypes.Structure):
    """``struct statmount``'s fixed part. String fields are offsets after the header."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("mnt_opts", ctypes.c_uint32),  # 6.10; __spare1 on 6.8
        ("mask", ctypes.c_uint64),
        ("sb_dev_major", ctypes.c_uint32),
        ("sb_dev_minor", ctypes.c_uint32),
        ("sb_magic", ctypes.c_uint64),
        ("sb_flags", ctypes.c_uint32),
        ("fs_type", ctypes.c_uint32),
        ("mnt_id", ctypes.c_uint64),
        ("mnt_parent_id", ctypes.c_uint64),
        ("mnt_id_old", ctypes.c_uint32),
        ("mnt_parent_id_old", ctypes.c_uint32),
        ("mnt_attr", ctypes.c_uint64),
        ("mnt_propagation", ctypes.c_uint64),
        ("mnt_peer_group", ctypes.c_uint64),
        ("mnt_master", ctypes.c_uint64),
        ("propagate_from", ctypes.c_uint64),
        ("mnt_root", ctypes.c_uint32),
        ("mnt_point", ctypes.c_uint32),
        ("mnt_ns_id", ctypes.c_uint64),  # 6.11
        ("fs_subtype", ctypes.c_uint32),  # 6.13
        ("sb_source", ctypes.c_uint32),  # 6.13
        ("_spare", ctypes.c_uint64 * 48),  # later fields we do not read
    ]


assert ctypes.sizeof(MntIdReq) == MNT_ID_REQ_SIZE_VER0
assert ctypes.sizeof(StatmountHeader) == 512
assert StatmountHeader.mnt_id_old.offset == 56 and StatmountHeader.mnt_point.offset == 108
assert StatmountHeader.sb_source.offset == 124


# syscall(2) is variadic: pass every argument at its full 64-bit width, never as a C int.
_STATMOUNT, _LISTMOUNT = ctypes.c_long(SYS_STATMOUNT), ctypes.c_long(SYS_LISTMOUNT)
_NO_FLAGS = ctypes.c_uint(0)


class ApiError(OSError):
    """A listmount/statmount/statx call failed; ``errno`` says why."""


@dataclass(frozen=True)
class MountRecord:
    """What statmount says about one mount, as plain values (strings decoded as paths are)."""

    unique_id: int
    unique_parent_id: int
    mount_id: int  # the 32-bit ID mountinfo shows
    parent_id: int
    dev_major: int
    dev_minor: int
    attr: int  # MOUNT_ATTR_* bits
    propagation: int  # MS_SHARED / MS_SLAVE / MS_PRIVATE / MS_UNBINDABLE bits
    peer_group: int
    master: int
    propagate_from: int
    root: str
    mount_point: str
    fstype: str
    source: str | None  # None before Linux 6.13, which has no sb_source


def _raise(call: str, err: int, what: object) -> ApiError:
    return ApiError(err, f"{call}({what}): {os.strerror(err)}")


class Kernel:
    """Reusable request and reply buffers for a run of calls (one pass or one daemon).

    Not thread-safe: one instance per thread of calls.
    """

    def __init__(self, batch: int = _LIST_BATCH) -> None:
        self._syscall = libc().syscall
        self._batch = batch
        self._req = MntIdReq(size=MNT_ID_REQ_SIZE_VER0)
        self._req_ref = ctypes.byref(self._req)
        self._ids = (ctypes.c_uint64 * batch)()
        self._grow(ctypes.sizeof(StatmountHeader) + _STRINGS)
        self._want = WANT | STATMOUNT_SB_SOURCE

    def listmount(self, mnt_id: int) -> list[int]:
        """Unique IDs the kernel lists from mount ``mnt_id``, in increasing order.

        Which mounts that is depends on the kernel: 6.8 lists the direct children; later
        kernels (6.18 here) list every mount below it. `mounttable` copes with both.
        """
        req, ids = self._req, self._ids
        req.mnt_id, req.param = mnt_id, 0
        found: list[int] = []
        while True:
            batch = ctypes.c_size_t(self._batch)
            n = int(self._syscall(_LISTMOUNT, self._req_ref, ids, batch, _NO_FLAGS))
            if n < 0:
                raise _raise("listmount", ctypes.get_errno(), mnt_id)
            found.extend(ids[:n])
            if n < self._batch:
                return found
            req.param = found[-1]  # the kernel resumes after this ID

    def statmount(self, mnt_id: int) -> MountRecord:
        """statmount of one mount by unique ID; ENOENT once it is gone."""
        err = self._call(mnt_id, full=True)
        if err:
            raise _raise("statmount", err, mnt_id)
        head = self._head
        raw = ctypes.string_at(self._reply, head.size)  # the header and the strings used
        base = ctypes.sizeof(StatmountHeader)

        def text(offset: int) -> str:
            start = base + offset
            return raw[start : raw.index(b"\0", start)].decode("utf-8", "surrogateescape")

        return MountRecord(
            unique_id=head.mnt_id,
            unique_parent_id=head.mnt_parent_id,
            mount_id=head.mnt_id_old,
            parent_id=head.mnt_parent_id_old,
            dev_major=head.sb_dev_major,
            dev_minor=head.sb_dev_minor,
            attr=head.mnt_attr,
            propagation=head.mnt_propagation,
            peer_group=head.mnt_peer_group,
            master=head.mnt_master,
            propagate_from=head.propagate_from,
            root=text(head.mnt_root),
            mount_point=text(head.mnt_point),
            fstype=text(head.fs_type),
            source=text(head.sb_source) if head.mask & STATMOUNT_SB_SOURCE else None,
        )

    def locate(self, mnt_id: int) -> tuple[str, int] | None:
        """Where mount ``mnt_id`` is attached: its mount point and its parent's unique ID, or
        None once it is gone (ENOENT). The question a mount event asks, in one statmount with
        the smallest mask; the daemon asks it for every mount attached anywhere on the node."""
        err = self._call(mnt_id, full=False)
        if err:
            if err == errno.ENOENT:
                return None
            raise _raise("statmount", err, mnt_id)
        head = self._head
        point = ctypes.string_at(self._strings + head.mnt_point)
        return point.decode("utf-8", "surrogateescape"), int(head.mnt_parent_id)

    def _call(self, mnt_id: int, *, full: bool) -> int:
        """One statmount into the reply buffer: 0, or the errno it failed with."""
        req = self._req
        req.mnt_id = mnt_id
        while True:
            req.param = self._want if full else WHERE
            size = ctypes.c_size_t(self._reply_size)
            result = int(self._syscall(_STATMOUNT, self._req_ref, self._reply, size, _NO_FLAGS))
            if result == 0:
                return 0
            err = ctypes.get_errno()
            if err == errno.EOVERFLOW:  # a string longer than the room we left: grow once more
                self._grow(self._reply_size * 2)
            elif err == errno.EINVAL and full and self._want & STATMOUNT_SB_SOURCE:
                # A kernel that refuses mask bits it does not know: ask for what 6.8 has.
                self._want = WANT
            else:
                return err

    def _grow(self, size: int) -> None:
        self._reply_size = size
        self._reply = ctypes.create_string_buffer(size)
        self._head = StatmountHeader.from_buffer(self._reply)
        self._strings = ctypes.addressof(self._reply) + ctypes.sizeof(StatmountHeader)

    def unique_mount_id(self, path: str) -> int:
        """The unique ID of the mount ``path`` itself is on (the last component not followed).

        ENOTSUP when the kernel leaves STATX_MNT_ID_UNIQUE out of the reply (before 6.8).
        """
        try:
            found = stat_mount(os.fsencode(path), IdKind.UNIQUE).mount_id
        except OSError as exc:
            raise ApiError(exc.errno, f"statx({path}): {exc.strerror}") from None
        if found is None:
            raise _raise("statx", errno.ENOTSUP, path)
        return found
