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


class EventMetadata(ctypes.Structure):
    """struct fanotify_event_metadata (24 bytes; ``mask`` is __aligned_u64)."""

    _fields_ = (
        ("event_len", ctypes.c_uint32),
        ("vers", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("metadata_len", ctypes.c_uint16),
        ("mask", ctypes.c_uint64),
        ("fd", ctypes.c_int32),
        ("pid", ctypes.c_int32),
    )


class InfoHeader(ctypes.Structure):
    """struct fanotify_event_info_header: the head of every info record after the metadata."""

    _fields_ = (
        ("info_type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("len", ctypes.c_uint16),
    )


class InfoMount(ctypes.Structure):
    """struct fanotify_event_info_mnt (16 bytes: the header, 4 bytes of padding, the ID)."""

    _fields_ = (
        ("hdr", InfoHeader),
        ("mnt_id", ctypes.c_uint64),
    )


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


def decode(buf: bytes) -> Drained:
    """The events in one read's bytes: pure, so every layout case can be tested without a kernel.

    Within one event, a detach is listed before an attach: the kernel reports a move as one event
    with both bits, and the mount left its old place before it reached the new one.
    """
    events: list[MountEvent] = []
    overflow = False
    undecodable = 0
    offset = 0
    head = ctypes.sizeof(EventMetadata)
    while offset + head <= len(buf):
        meta = EventMetadata.from_buffer_copy(buf, offset)
        if meta.event_len < head or offset + meta.event_len > len(buf):
            undecodable += 1  # a length that cannot be trusted: nothing after it can be either
            break
        if meta.vers != FANOTIFY_METADATA_VERSION or meta.metadata_len < head:
            undecodable += 1
        elif meta.mask & FAN_Q_OVERFLOW:
            overflow = True
        else:
            mount_id = _mount_id(buf, offset + meta.metadata_len, offset + meta.event_len)
            changes = [
                change
                for bit, change in (
                    (FAN_MNT_DETACH, Change.DETACHED),
                    (FAN_MNT_ATTACH, Change.ATTACHED),
                )
                if meta.mask & bit
            ]
            if mount_id is None or not changes:
                undecodable += 1
            else:
                events.extend(MountEvent(change, mount_id) for change in changes)
        offset += meta.event_len
    if offset != len(buf):
        undecodable += 0 if undecodable else 1  # a torn tail: never returned by a whole read
    return Drained(tuple(events), overflow, undecodable)


def _mount_id(buf: bytes, start: int, end: int) -> int | None:
    """The mount ID from the event's info records (other record types are skipped)."""
    for info_type, offset, length in _records(buf, start, end):
        if info_type == FAN_EVENT_INFO_TYPE_MNT and length >= ctypes.sizeof(InfoMount):
            return int(InfoMount.from_buffer_copy(buf, offset).mnt_id)
    return None


def _records(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    offset = start
    while offset + ctypes.sizeof(InfoHeader) <= end:
        header = InfoHeader.from_buffer_copy(buf, offset)
        if header.len < ctypes.sizeof(InfoHeader) or offset + header.len > end:
            return
        yield header.info_type, offset, header.len
        offset += header.len


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
        """Every event queued now, decoded; empty when there are none."""
        events: list[MountEvent] = []
        overflow = False
        undecodable = 0
        while True:
            try:
                chunk = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                break
            got = decode(chunk)
            events.extend(got.events)
            overflow = overflow or got.overflow
            undecodable += got.undecodable
        return Drained(tuple(events), overflow, undecodable)

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
