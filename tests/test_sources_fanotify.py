"""fanotify mount events: the decoder against hand-built records, the watch against real mounts.

The real-kernel tests need Linux 6.15+ (FAN_REPORT_MNT) and skip with the probe's reason on
older kernels; the probe's reasons are tested on this kernel by making it refuse (a seccomp
filter, a process without CAP_SYS_ADMIN), and on 6.1 and 6.12 by the qemu kernel matrix
(tests/e2e/test_kernels.py), where the kernel itself says EINVAL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time

import pytest
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import (
    Change,
    Drained,
    MountEvent,
    MountEvents,
    Why,
    decode,
)

from tests.support.nsutil import in_namespace, mount

_libc = ctypes.CDLL(None, use_errno=True)
STATX_MNT_ID_UNIQUE = 0x4000
MS_MOVE = 0x2000
HOST_PROBE = fanotify.probe()
needs_mount_events = pytest.mark.skipif(
    not HOST_PROBE.available, reason=f"fanotify mount events: {HOST_PROBE.message}"
)


# ---- layouts, against include/uapi/linux/fanotify.h (6.15) -----------------------------------


def test_struct_layouts_match_the_uapi_header() -> None:
    # The same layouts as C would lay them out (native alignment, "@"), field by field.
    assert fanotify.METADATA.size == 24  # FAN_EVENT_METADATA_LEN
    assert struct.calcsize("@IBBH") == 8 and struct.calcsize("@IBBHQ") == 16  # mask at 8
    assert fanotify.METADATA.size == struct.calcsize("@IBBHQii")
    assert fanotify.INFO_HEADER.size == 4
    assert fanotify.INFO_MNT.size == 16 and struct.calcsize("@BBH4x") == 8  # mnt_id at 8


def event(mask: int, *records: bytes, vers: int = 3) -> bytes:
    body = b"".join(records)
    return struct.pack("<IBBHQii", 24 + len(body), vers, 0, 24, mask, -1, 0) + body


def mnt_record(mount_id: int, info_type: int = fanotify.FAN_EVENT_INFO_TYPE_MNT) -> bytes:
    return struct.pack("<BBHxxxxQ", info_type, 0, 16, mount_id)


def test_decode_attach_detach_and_a_move_in_kernel_order() -> None:
    buf = (
        event(fanotify.FAN_MNT_ATTACH, mnt_record(1 << 40))
        + event(fanotify.FAN_MNT_DETACH, mnt_record(7))
        + event(fanotify.FAN_MNT_ATTACH | fanotify.FAN_MNT_DETACH, mnt_record(9))
    )
    assert decode(buf) == Drained(
        events=(
            MountEvent(Change.ATTACHED, 1 << 40),
            MountEvent(Change.DETACHED, 7),
            MountEvent(Change.DETACHED, 9),  # a move: it left before it arrived
            MountEvent(Change.ATTACHED, 9),
        )
    )
    assert not decode(buf).relist_needed


def test_the_usual_shape_decodes_in_one_sweep_and_anything_else_falls_to_the_careful_path() -> None:
    usual = event(fanotify.FAN_MNT_ATTACH, mnt_record(5))
    odd = event(0x1, mnt_record(6))  # 40 bytes too, but FAN_ACCESS: not a mount event
    overflow = event(fanotify.FAN_Q_OVERFLOW) + event(fanotify.FAN_Q_OVERFLOW, b"\0" * 32)
    assert len(usual) == len(odd) == fanotify.MOUNT_EVENT.size and len(overflow) % 40 == 0
    got = decode(usual + odd + usual)
    assert got.events == (MountEvent(Change.ATTACHED, 5),) * 2 and got.undecodable == 1
    assert decode(usual + overflow).overflow
    assert decode(usual * 3) == Drained((MountEvent(Change.ATTACHED, 5),) * 3)


def test_decode_skips_unknown_records_before_the_mount_record() -> None:
    unknown = struct.pack("<BBH", 99, 0, 8) + b"\0" * 4
    assert decode(event(fanotify.FAN_MNT_ATTACH, unknown, mnt_record(5))).events == (
        MountEvent(Change.ATTACHED, 5),
    )


def test_decode_reports_an_overflow_and_keeps_the_events_around_it() -> None:
    buf = (
        event(fanotify.FAN_MNT_ATTACH, mnt_record(1))
        + event(fanotify.FAN_Q_OVERFLOW)
        + event(fanotify.FAN_MNT_DETACH, mnt_record(1))
    )
    got = decode(buf)
    assert got.overflow and got.relist_needed and got.undecodable == 0
    assert [e.change for e in got.events] == [Change.ATTACHED, Change.DETACHED]


@pytest.mark.parametrize(
    "buf",
    [
        event(fanotify.FAN_MNT_ATTACH),  # no record
        event(fanotify.FAN_MNT_ATTACH, mnt_record(3, info_type=6)),  # the RFC's type number
        event(fanotify.FAN_MNT_ATTACH, mnt_record(3), vers=2),  # another metadata version
        event(0x1, mnt_record(3)),  # FAN_ACCESS: not a mount event
        event(fanotify.FAN_MNT_ATTACH, mnt_record(3))[:-4],  # torn
        struct.pack("<IBBHQii", 8, 3, 0, 24, fanotify.FAN_MNT_ATTACH, -1, 0),  # lying length
    ],
    ids=["no-record", "wrong-type", "wrong-version", "not-a-mount-event", "torn", "bad-length"],
)
def test_decode_flags_what_it_cannot_explain_so_the_caller_relists(buf: bytes) -> None:
    got = decode(buf)
    assert got.undecodable == 1 and got.relist_needed and got.events == ()


# ---- the real kernel ---------------------------------------------------------------------------


def unique_id(path: str) -> int:
    buf = ctypes.create_string_buffer(256)
    assert _libc.statx(-100, os.fsencode(path), 0, STATX_MNT_ID_UNIQUE, buf) == 0
    assert int.from_bytes(buf.raw[0:4], "little") & STATX_MNT_ID_UNIQUE
    return int.from_bytes(buf.raw[144:152], "little")


def _attach_move_detach() -> list[tuple[str, list[MountEvent]]]:
    os.makedirs("/run/calico/cgroup")
    os.makedirs("/run/elsewhere")
    seen = []
    with MountEvents() as watch:
        assert watch.drain() == Drained()  # nothing before the first mount
        mount("none", "/run/calico/cgroup", "cgroup2")
        mounted = unique_id("/run/calico/cgroup")
        seen.append(("mount", list(watch.drain().events), mounted))
        assert _libc.mount(b"/run/calico/cgroup", b"/run/elsewhere", None, MS_MOVE, None) == 0
        seen.append(("move", list(watch.drain().events), mounted))
        assert _libc.umount2(b"/run/elsewhere", 0) == 0
        seen.append(("umount", list(watch.drain().events), mounted))
    return [(what, [e for e in events if e.mount_id == mid]) for what, events, mid in seen]


@needs_mount_events
def test_real_mounts_produce_attach_move_and_detach_with_the_unique_id() -> None:
    seen = dict(in_namespace(_attach_move_detach))
    assert [e.change for e in seen["mount"]] == [Change.ATTACHED], seen
    assert [e.change for e in seen["move"]] == [Change.DETACHED, Change.ATTACHED], seen
    assert [e.change for e in seen["umount"]] == [Change.DETACHED], seen


def _fill_the_queue() -> tuple[int, bool, bool]:
    with open("/proc/sys/fs/fanotify/max_queued_events") as f:
        limit = int(f.read())
    os.makedirs("/run/churn")
    with MountEvents() as watch:
        for _ in range(limit // 2 + 10):  # two events per round: past the limit
            mount("tmpfs", "/run/churn", "tmpfs")
            assert _libc.umount2(b"/run/churn", 0) == 0
        flooded = watch.drain()
        mount("tmpfs", "/run/churn", "tmpfs")
        after = watch.drain()
    return len(flooded.events) - limit, flooded.overflow, after.overflow or not after.events


@needs_mount_events
def test_a_full_queue_is_reported_as_overflow_once_and_the_watch_goes_on() -> None:
    missing_from_limit, overflow, after_broken = in_namespace(_fill_the_queue)
    assert overflow and missing_from_limit == 0
    assert not after_broken  # the next drain is a normal one again


def _other_namespace_is_silent() -> list[MountEvent]:
    os.makedirs("/run/here")
    with MountEvents() as watch:
        pid = os.fork()
        if pid == 0:
            ok = _libc.unshare(0x00020000) == 0  # CLONE_NEWNS (os.unshare is Python 3.12+)
            ok = ok and _libc.mount(b"none", b"/", None, 0x4000 | (1 << 18), None) == 0  # rprivate
            ok = ok and _libc.mount(b"tmpfs", b"/run/here", b"tmpfs", 0, None) == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0, "the sibling namespace could not mount"
        return list(watch.drain().events)


@needs_mount_events
def test_a_mount_in_another_namespace_is_not_reported() -> None:
    assert in_namespace(_other_namespace_is_silent) == []


@needs_mount_events
def test_the_fd_wakes_a_selector_and_drain_never_blocks() -> None:
    import selectors

    def wake() -> tuple[bool, bool, float]:
        os.makedirs("/run/x")
        with MountEvents() as watch, selectors.DefaultSelector() as sel:
            sel.register(watch, selectors.EVENT_READ)
            quiet = not sel.select(0)
            mount("tmpfs", "/run/x", "tmpfs")
            woke = bool(sel.select(1))
            watch.drain()
            started = time.monotonic()
            watch.drain()  # empty: must return at once
            return quiet, woke, time.monotonic() - started

    quiet, woke, empty_drain = in_namespace(wake)
    assert quiet and woke and empty_drain < 0.5


# ---- the probe's reasons -----------------------------------------------------------------------

# A seccomp filter that answers fanotify_init with ``errno``, as systemd's SystemCallFilter= does
# (x86_64 numbering; other architectures skip).
SYS_FANOTIFY_INIT = 300
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter)))


def refuse_fanotify_init(code: int) -> None:
    """Load the filter into this process (irrevocably: call it in a forked child)."""
    program = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # A = seccomp_data.nr
        SockFilter(0x15, 0, 1, SYS_FANOTIFY_INIT),  # A == fanotify_init ? next : skip one
        SockFilter(0x06, 0, 0, SECCOMP_RET_ERRNO | code),
        SockFilter(0x06, 0, 0, SECCOMP_RET_ALLOW),
    )
    prog = SockFprog(len(program), program)
    assert _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    assert _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0


def _probe_under_filter(code: int) -> tuple[str, str]:
    refuse_fanotify_init(code)
    result = fanotify.probe()
    return result.why.value, result.message


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter uses x86_64 numbers")
@pytest.mark.parametrize(
    ("code", "why"),
    [(errno.EPERM, Why.REFUSED), (errno.ENOSYS, Why.NO_FANOTIFY)],
    ids=["EPERM", "ENOSYS"],
)
def test_probe_names_a_seccomp_refusal(code: int, why: Why) -> None:
    got, message = in_namespace(_probe_under_filter, code)
    assert got == why.value, message
    assert "mountinfo instead" in message, message


def _probe_as_nobody() -> tuple[str, str]:
    os.setgid(65534)
    os.setuid(65534)  # drops every capability
    result = fanotify.probe()
    return result.why.value, result.message


@needs_mount_events
def test_probe_without_cap_sys_admin_says_refused() -> None:
    got, message = in_namespace(_probe_as_nobody)
    assert got == Why.REFUSED.value, message
    assert "CAP_SYS_ADMIN" in message


def test_probe_of_a_missing_namespace_file_says_so() -> None:
    result = fanotify.probe("/proc/self/ns/no-such-namespace")
    if not HOST_PROBE.available:  # fanotify_init refuses first on older kernels
        pytest.skip(HOST_PROBE.message)
    assert result.why is Why.NO_NAMESPACE and "no-such-namespace" in result.message


@pytest.mark.parametrize(
    ("code", "why"),
    [
        (errno.EINVAL, Why.KERNEL_TOO_OLD),
        (errno.EPERM, Why.REFUSED),
        (errno.EACCES, Why.REFUSED),
        (errno.ENOSYS, Why.NO_FANOTIFY),
        (errno.EMFILE, Why.LIMIT),
        (errno.EIO, Why.OTHER),
    ],
)
def test_explain_maps_each_errno_to_its_reason(code: int, why: Why) -> None:
    probe = fanotify.explain(OSError(code, os.strerror(code)))
    assert probe.why is why and not probe.available
    assert "mountinfo instead" in probe.message


def test_probe_on_this_kernel_matches_its_version() -> None:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) >= (6, 15):
        assert HOST_PROBE.available, HOST_PROBE.message
    else:
        assert HOST_PROBE.why is Why.KERNEL_TOO_OLD, HOST_PROBE.message
