"""listmount/statmount/statx through ctypes, against the kernel's own mountinfo.

Every call here is real (Linux 6.8+; the tests are skipped on older kernels), made inside a
private mount namespace. What statmount says about a mount must match the mountinfo line the
same kernel writes for it, field by field: that is what proves the struct layouts.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from calico_mount_reaper import mountinfo
from calico_mount_reaper.mounttable import optional_fields, options
from calico_mount_reaper.statmount import (
    LSMT_ROOT,
    ApiError,
    Kernel,
    MntIdReq,
    StatmountHeader,
)

from tests.support.nsutil import in_namespace, mount


def _kernel_api_present() -> bool:
    try:
        Kernel().statmount(Kernel().unique_mount_id("/"))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _kernel_api_present(), reason="needs Linux 6.8+")

MS_BIND, MS_SHARED, MS_SLAVE, MS_RDONLY, MS_NOSUID, MS_REMOUNT = 4096, 1 << 20, 1 << 19, 1, 2, 32


def test_struct_layouts_match_the_uapi_header() -> None:
    # include/uapi/linux/mount.h: MNT_ID_REQ_SIZE_VER0 and the 512-byte fixed statmount header.
    assert ctypes.sizeof(MntIdReq) == 24
    assert ctypes.sizeof(StatmountHeader) == 512
    offsets = {name: getattr(StatmountHeader, name).offset for name, *_ in StatmountHeader._fields_}
    assert offsets["mask"] == 8 and offsets["fs_type"] == 36 and offsets["mnt_id"] == 40
    assert offsets["mnt_id_old"] == 56 and offsets["mnt_attr"] == 64
    assert offsets["propagate_from"] == 96 and offsets["mnt_root"] == 104
    assert offsets["mnt_point"] == 108 and offsets["mnt_ns_id"] == 112


def _compare_with_mountinfo() -> list[tuple[object, object]]:
    os.makedirs("/run/calico/we ird\nname", exist_ok=True)
    mount("none", "/run/calico/we ird\nname", "cgroup2")
    os.makedirs("/run/shared/peer", exist_ok=True)
    mount("t", "/run/shared", "tmpfs")
    mount("none", "/run/shared", "", MS_SHARED)
    os.makedirs("/run/slave", exist_ok=True)
    mount("/run/shared", "/run/slave", "", MS_BIND)
    mount("none", "/run/slave", "", MS_SLAVE)
    mount("/run/slave", "/run/slave", "", MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    kernel = Kernel()
    by_old_id = {m.mount_id: m for m in mountinfo.read().mounts}
    pairs: list[tuple[object, object]] = []
    for unique_id in kernel.listmount(kernel.unique_mount_id("/run")):
        r = kernel.statmount(unique_id)
        m = by_old_id[r.mount_id]
        got = (
            r.parent_id,
            f"{r.dev_major}:{r.dev_minor}",
            r.root,
            r.mount_point,
            r.fstype,
            r.source,
            options(r.attr),
            optional_fields(r),
        )
        want = (m.parent_id, m.major_minor, m.root, m.mount_point, m.fstype, m.source, m.options)
        pairs.append((got, (*want, m.optional_fields)))
    return pairs


def test_statmount_says_what_mountinfo_says_for_every_mount_below_run() -> None:
    pairs = in_namespace(_compare_with_mountinfo)
    assert len(pairs) == 3
    for got, want in pairs:
        assert isinstance(got, tuple) and isinstance(want, tuple)
        source = got[5]
        # sb_source is Linux 6.13+: before that the kernel leaves it out, and we say None.
        assert got[:5] == want[:5] and got[6:] == want[6:]
        assert source in (None, want[5])
    shown = {got[3]: got for got, _ in pairs}  # type: ignore[index]
    assert shown["/run/slave"][6] == "ro,nosuid,relatime"
    assert any(f.startswith("master:") for f in shown["/run/slave"][7])
    assert "/run/calico/we ird\nname" in shown  # raw bytes, no octal escapes


def _located() -> tuple[object, ...]:
    name = "/run/calico/we ird\nname"  # raw bytes, as statmount says them
    os.makedirs(name)
    mount("none", name, "cgroup2")
    kernel = Kernel()
    unique = kernel.unique_mount_id(name)
    where = kernel.locate(unique)
    full = kernel.statmount(unique)  # the small ask leaves the reply buffer fit for a big one
    assert ctypes.CDLL(None).umount2(os.fsencode(name), 0) == 0
    return where, (full.mount_point, full.unique_parent_id, full.fstype), kernel.locate(unique)


def test_locate_names_the_mount_point_and_parent_and_none_once_gone() -> None:
    where, full, gone = in_namespace(_located)
    assert isinstance(where, tuple) and isinstance(full, tuple)
    assert where == full[:2] and where[0] == "/run/calico/we ird\nname" and full[2] == "cgroup2"
    assert gone is None  # ENOENT is an answer here, not an error


def _paged_listing() -> tuple[list[int], list[int]]:
    for i in range(7):
        os.makedirs(f"/run/m{i}", exist_ok=True)
        mount("t", f"/run/m{i}", "tmpfs")
    run = Kernel().unique_mount_id("/run")
    return Kernel(batch=3).listmount(run), Kernel().listmount(run)


def test_listmount_pages_through_a_listing_bigger_than_its_buffer() -> None:
    paged, whole = in_namespace(_paged_listing)
    assert paged == whole and len(whole) == 7
    assert whole == sorted(whole)  # the kernel lists in unique-ID order: creation order


def _identities() -> dict[str, object]:
    os.makedirs("/run/real/sub", exist_ok=True)
    mount("t", "/run/real", "tmpfs")
    os.symlink("/run/real", "/run/link")
    kernel = Kernel()
    real, run = kernel.unique_mount_id("/run/real"), kernel.unique_mount_id("/run")
    out: dict[str, object] = {
        "real": real,
        "link": kernel.unique_mount_id("/run/link"),  # the symlink itself lives on /run
        "run": run,
        "old_id_of_real": kernel.statmount(real).mount_id,
        "mountinfo_id_of_real": next(
            m.mount_id for m in mountinfo.read().mounts if m.mount_point == "/run/real"
        ),
    }
    for name, call in (
        ("old_id", lambda: kernel.statmount(out["old_id_of_real"])),
        ("gone", lambda: kernel.statmount(real + 10_000)),
    ):
        try:
            call()
            out[name] = 0
        except ApiError as exc:
            out[name] = exc.errno
    return out


def test_unique_ids_never_follow_a_symlink_and_old_ids_are_refused() -> None:
    out = in_namespace(_identities)
    assert out["link"] == out["run"] != out["real"]
    assert isinstance(out["real"], int) and out["real"] >= 1 << 31  # unique IDs start above 2^31
    assert out["old_id_of_real"] == out["mountinfo_id_of_real"]
    assert out["old_id"] in (errno.EINVAL, errno.ENOENT)  # never mistaken for a unique ID
    assert out["gone"] == errno.ENOENT


def test_listing_from_the_root_sees_this_namespaces_mounts() -> None:
    kernel = Kernel()
    listed = set(kernel.listmount(LSMT_ROOT))
    assert kernel.unique_mount_id("/proc") in listed


def _listing_shape() -> tuple[set[int], set[int], set[int]]:
    for path in ("/run/a", "/run/a/b", "/run/a/b/c", "/run/d"):
        os.makedirs(path, exist_ok=True)
        mount("t", path, "tmpfs")
    kernel = Kernel()
    run = kernel.unique_mount_id("/run")
    listed = set(kernel.listmount(run))
    table = {i: kernel.statmount(i) for i in kernel.listmount(LSMT_ROOT)}
    children = {i for i, r in table.items() if r.unique_parent_id == run}
    below, frontier = set(), set(children)
    while frontier:
        below |= frontier
        frontier = {i for i, r in table.items() if r.unique_parent_id in frontier} - below
    return listed, children, below


def test_listmount_lists_the_direct_children_or_the_whole_subtree_nothing_else() -> None:
    # 6.18 lists the whole subtree; the first version may list direct children only. Both are
    # handled (mounttable._Walk); anything else would break it.
    listed, children, below = in_namespace(_listing_shape)
    assert len(children) == 2 and len(below) == 4
    assert listed in (children, below)
    shape = "the whole subtree" if listed == below else "direct children"
    print(f"listmount on Linux {os.uname().release}: {shape}")
