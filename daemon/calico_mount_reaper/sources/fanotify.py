"""Mount events from the kernel (fanotify, Linux 6.15+): which mount came or went, by unique ID.

The mountinfo watch (sources/mountinfo.py) only says "something changed", so every wake costs a
re-read of the whole table: about 31 ms at 10 000 mounts. fanotify's mount events name the
mount instead: an attach or detach carries its 64-bit unique mount ID (never reused; the ID
statmount takes and ``STATX_MNT_ID_UNIQUE`` returns), so the caller can update its view with one
statmount per event. An overflow, or an event this module cannot decode, is reported as such:
the caller must then re-list the whole table once, as nothing tells what was missed.

The watch covers one mount namespace, named by a namespace fd (``/proc/self/ns/mnt``), and
needs CAP_SYS_ADMIN in the user namespace that owns it. Older kernels refuse ``FAN_REPORT_MNT``
with EINVAL (Debian 13's 6.12 included); a seccomp filter (systemd's ``SystemCallFilter=``)
refuses with EPERM, or whichever errno it was told to return. `probe` turns each refusal into a
`Why` and a message for the journal, so the daemon can say why it stays on mountinfo.

Constants and layouts are those of include/uapi/linux/fanotify.h as of Linux 6.15 (x86_64 and
every other architecture alike: the structs use fixed-width fields with natural alignment).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# fanotify_init(2) flags.
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_CLASS_NOTIF = 0x00000000
FAN_REPORT_MNT = 0x00004000  # 6.15: events carry a FAN_EVENT_INFO_TYPE_MNT record

# fanotify_mark(2) flags and the events this source asks for.
FAN_MARK_ADD = 0x00000001
FAN_MARK_MNTNS = 0x00000110  # 6.15: the object is a mount namespace, given as an nsfd
FAN_MNT_ATTACH = 0x01000000
FAN_MNT_DETACH = 0x02000000
FAN_Q_OVERFLOW = 0x00004000  # the queue was full: events were dropped

FANOTIFY_METADATA_VERSION = 3
FAN_EVENT_INFO_TYPE_MNT = 7  # 6.15 (FAN_EVENT_INFO_TYPE_RANGE took 6 in 6.14)

# One read returns whole events only, and fails with EINVAL if the buffer holds none; a mount
# event is 40 bytes (24 of metadata + 16 of record), so this takes about 1600 at a time.
READ_SIZE = 64 * 1024
# A read that left more room than this stopped because the queue was empty, not because the next
# event did not fit (mount events are 40 bytes; no fanotify event comes near 4 KiB): the drain
# ends there instead of paying for one more read that fails with EAGAIN.
ROOM_LEFT_WHEN_EMPTY = 4096

# The layouts, in the kernel's byte order (struct's "=": standard sizes, no padding added; the
# kernel's structs have none either). struct.unpack_from is several times cheaper per event
# than a ctypes Structure, and a node under pod churn decodes one or two events a wake.
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask (an
# __aligned_u64 at offset 8), fd, pid.
METADATA = struct.Struct("=IBBHQii")
# struct fanotify_event_info_header: info_type, pad, len.
INFO_HEADER = struct.Struct("=BBH")
# struct fanotify_event_info_mnt: the header, 4 bytes of padding, the 64-bit mount ID.
INFO_MNT = struct.Struct("=BBH4xQ")
# The one shape every mount event has on 6.15-6.18: the metadata, then the mount record alone.
MOUNT_EVENT = struct.Struct(METADATA.format + INFO_MNT.format[1:])


class Change(enum.Enum):
    ATTACHED = "attached"
    DETACHED = "detached"


@dataclass(frozen=True)
class MountEvent:
    """A mount attached to or detached from the namespace's tree (a move is a detach of its
    old place followed by an attach at the new one, with the same ID)."""

    change: Change
    mount_id: int  # the 64-bit unique mount ID


@dataclass(frozen=True)
class Drained:
    """What one drain found, in the kernel's order.

    ``overflow``: the kernel dropped events (FAN_Q_OVERFLOW). ``undecodable``: events that did
    not have the layout this module knows. Either way, ``events`` is incomplete and the caller
    must re-list the whole table once (`relist_needed`).
    """

    events: tuple[MountEvent, ...] = ()
    overflow: bool = False
    undecodable: int = 0

    @property
    def relist_needed(self) -> bool:
        return self.overflow or self.undecodable > 0


_USUAL = (
    MOUNT_EVENT.size,
    FANOTIFY_METADATA_VERSION,
    METADATA.size,
    FAN_EVENT_INFO_TYPE_MNT,
    INFO_MNT.size,
)


def decode(buf: bytes | bytearray | memoryview) -> Drained:
    """The events in one read's bytes: pure, so every layout case can be tested without a kernel.

    Within one event, a detach is listed before an attach: the kernel reports a move as one event
    with both bits, and the mount left its old place before it reached the new one.
    """
    if len(buf) % MOUNT_EVENT.size == 0:
        usual = _decode_usual(buf)
        if usual is not None:
            return usual
    events: list[MountEvent] = []
    overflow = False
    undecodable = 0
    offset = 0
    head = METADATA.size
    size = len(buf)
    while offset + head <= size:
        event_len, vers, _, metadata_len, mask, _, _ = METADATA.unpack_from(buf, offset)
        if event_len < head or offset + event_len > size:
            undecodable += 1  # a length that cannot be trusted: nothing after it can be either
            break
        if vers != FANOTIFY_METADATA_VERSION or metadata_len < head:
            undecodable += 1
        elif mask & FAN_Q_OVERFLOW:
            overflow = True
        else:
            mount_id = _mount_id(buf, offset + metadata_len, offset + event_len)
            if mount_id is None or not mask & (FAN_MNT_DETACH | FAN_MNT_ATTACH):
                undecodable += 1
            else:
                if mask & FAN_MNT_DETACH:
                    events.append(MountEvent(Change.DETACHED, mount_id))
                if mask & FAN_MNT_ATTACH:
                    events.append(MountEvent(Change.ATTACHED, mount_id))
        offset += event_len
    if offset != size:
        undecodable += 0 if undecodable else 1  # a torn tail: never returned by a whole read
    return Drained(tuple(events), overflow, undecodable)


def _decode_usual(buf: bytes | bytearray | memoryview) -> Drained | None:
    """`decode` for a read of mount events of the usual shape only, in one C-level sweep (None
    if any event has another shape): the daemon decodes every wake, mostly one or two events."""
    events: list[MountEvent] = []
    for (
        event_len,
        vers,
        _,
        metadata_len,
        mask,
        _,
        _,
        info_type,
        _,
        length,
        mount_id,
    ) in MOUNT_EVENT.iter_unpack(buf):
        if (event_len, vers, metadata_len, info_type, length) != _USUAL or mask & FAN_Q_OVERFLOW:
            return None
        if not mask & (FAN_MNT_DETACH | FAN_MNT_ATTACH):
            return None
        if mask & FAN_MNT_DETACH:
            events.append(MountEvent(Change.DETACHED, mount_id))
        if mask & FAN_MNT_ATTACH:
            events.append(MountEvent(Change.ATTACHED, mount_id))
    return Drained(tuple(events))


def _mount_id(buf: bytes | bytearray | memoryview, start: int, end: int) -> int | None:
    """The mount ID from the event's info records (other record types are skipped)."""
    if end - start == INFO_MNT.size:  # the usual shape: the mount record alone
        info_type, _, length, mount_id = INFO_MNT.unpack_from(buf, start)
        if info_type == FAN_EVENT_INFO_TYPE_MNT and length == INFO_MNT.size:
            return int(mount_id)
    for info_type, offset, length in _records(buf, start, end):
        if info_type == FAN_EVENT_INFO_TYPE_MNT and length >= INFO_MNT.size:
            return int(INFO_MNT.unpack_from(buf, offset)[3])
    return None


def _records(
    buf: bytes | bytearray | memoryview, start: int, end: int
) -> Iterator[tuple[int, int, int]]:
    offset = start
    while offset + INFO_HEADER.size <= end:
        info_type, _, length = INFO_HEADER.unpack_from(buf, offset)
        if length < INFO_HEADER.size or offset + length > end:
            return
        yield info_type, offset, length
        offset += length


@functools.cache
def _calls() -> tuple[Callable[..., int], Callable[..., int]]:
    """glibc's wrappers with their real prototypes: fanotify_mark's mask is 64 bits wide, which
    an untyped ctypes call would pass as a 32-bit int."""
    libc = ctypes.CDLL(None, use_errno=True)
    init = libc.fanotify_init
    init.argtypes = (ctypes.c_uint, ctypes.c_uint)
    init.restype = ctypes.c_int
    mark = libc.fanotify_mark
    mark.argtypes = (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p)
    mark.restype = ctypes.c_int
    return init, mark


class MountEvents:
    """A fanotify group watching one mount namespace; `fileno()` is readable when events wait.

    Register ``fileno()`` with EVENT_READ (a plain readable fd: no POLLPRI quirk), and call
    `drain()` on every wake; it never blocks. Raises OSError from the kernel's refusal, with the
    call that refused it in the message; `probe` explains those.
    """

    def __init__(self, namespace: str = "/proc/self/ns/mnt") -> None:
        init, mark = _calls()
        fd = init(FAN_CLASS_NOTIF | FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"fanotify_init(FAN_REPORT_MNT): {os.strerror(code)}")
        self._fd: int = int(fd)
        self._buffer = bytearray(READ_SIZE)
        self._buffers = [self._buffer]
        self._view = memoryview(self._buffer)
        try:
            ns = os.open(namespace, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if mark(
                    fd, FAN_MARK_ADD | FAN_MARK_MNTNS, FAN_MNT_ATTACH | FAN_MNT_DETACH, ns, None
                ):
                    code = ctypes.get_errno()
                    raise OSError(
                        code, f"fanotify_mark(FAN_MARK_MNTNS, {namespace}): {os.strerror(code)}"
                    )
            finally:
                os.close(ns)
        except BaseException:
            os.close(fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> Drained:
        """Every event queued now, decoded; empty when there are none.

        Reads into one buffer allocated with the watch: a fresh 64 KiB object per read, and
        the EAGAIN exception of a read past the end, were most of a quiet wake's cost.
        """
        events: tuple[MountEvent, ...] = ()
        overflow = False
        undecodable = 0
        view = self._view
        while True:
            try:
                got = os.readv(self._fd, self._buffers)
            except BlockingIOError:
                break
            if not got:
                break
            batch = decode(view[:got])
            events += batch.events
            overflow = overflow or batch.overflow
            undecodable += batch.undecodable
            if len(self._buffer) - got > ROOM_LEFT_WHEN_EMPTY:
                break  # the queue was empty; a later event wakes the selector again
        return Drained(events, overflow, undecodable)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> MountEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Why(enum.Enum):
    """Why fanotify mount events cannot be used here (AVAILABLE when they can)."""

    AVAILABLE = "available"
    KERNEL_TOO_OLD = "kernel-too-old"  # EINVAL: no FAN_REPORT_MNT / FAN_MARK_MNTNS (< 6.15)
    REFUSED = "refused"  # EPERM/EACCES: a seccomp filter, or no CAP_SYS_ADMIN over the namespace
    NO_FANOTIFY = "no-fanotify"  # ENOSYS: built without fanotify, or a filter answering ENOSYS
    LIMIT = "limit"  # EMFILE/ENFILE/ENOMEM: too many fanotify groups or open files
    NO_NAMESPACE = "no-namespace"  # the namespace file could not be opened
    OTHER = "other"


@dataclass(frozen=True)
class Probe:
    why: Why
    message: str  # for the journal: what happened and what it means for the daemon

    @property
    def available(self) -> bool:
        return self.why is Why.AVAILABLE


_FALLBACK = "mount events come from mountinfo instead (a full re-read per change)"


def probe(namespace: str = "/proc/self/ns/mnt") -> Probe:
    """Try to open a watch, and say why it cannot be used if it cannot."""
    try:
        MountEvents(namespace).close()
    except FileNotFoundError as exc:
        return Probe(Why.NO_NAMESPACE, f"{exc}; {_FALLBACK}")
    except OSError as exc:
        return explain(exc)
    return Probe(Why.AVAILABLE, "fanotify mount events (FAN_REPORT_MNT, Linux 6.15+)")


def explain(exc: OSError) -> Probe:
    """The `Probe` for a refusal from `MountEvents` (pure: the errno decides)."""
    code = exc.errno
    if code == errno.EINVAL:
        return Probe(
            Why.KERNEL_TOO_OLD,
            f"{exc.strerror}: this kernel ({os.uname().release}) has no fanotify mount events "
            f"(Linux 6.15+); {_FALLBACK}",
        )
    if code in (errno.EPERM, errno.EACCES):
        return Probe(
            Why.REFUSED,
            f"{exc.strerror}: refused by a seccomp filter (the unit's SystemCallFilter= must "
            f"allow fanotify_init and fanotify_mark) or for lack of CAP_SYS_ADMIN; {_FALLBACK}",
        )
    if code == errno.ENOSYS:
        return Probe(
            Why.NO_FANOTIFY,
            f"{exc.strerror}: the kernel has no fanotify, or a filter hides it; {_FALLBACK}",
        )
    if code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return Probe(
            Why.LIMIT,
            f"{exc.strerror}: too many fanotify groups or open files (fs.fanotify."
            f"max_user_groups); {_FALLBACK}",
        )
    return Probe(Why.OTHER, f"{exc}; {_FALLBACK}")
