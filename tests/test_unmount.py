"""The unmount engine against the real kernel, in private mount namespaces.

Every case that identifies a mount runs on both identity paths (tests/support/unique_ids.py):
the 64-bit unique IDs, and the forced fallback (32-bit ID + device + fstype + verified path).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from calico_mount_reaper import mountinfo
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.resolve import Expected
from calico_mount_reaper.statx import IdKind, stat_mount
from calico_mount_reaper.unmount import (
    BusyPolicy,
    Outcome,
    Result,
    directory_of,
    find_blockers,
    remove_mount_point,
    unmount_planned,
)

from tests.support import node
from tests.support.nsutil import in_namespace
from tests.support.unique_ids import Path, Recorder

FAST = BusyPolicy(retries=2, backoff=0.01)
PATHS = pytest.mark.parametrize("path", list(Path), ids=[p.value for p in Path])


def _planned(rec: Recorder, point: str, path: Path) -> tuple[Mount, Expected]:
    """The top mount at ``point`` as the plan would see it, and where it must be looked up."""
    table = rec.read(path).mounts
    mount = [m for m in table if m.mount_point == point][-1]
    assert (mount.unique_id is not None) == (path is Path.UNIQUE)
    return mount, directory_of(mount, table)


def _unmount(rec: Recorder, point: str, path: Path, detach: bool = True) -> tuple[Mount, Outcome]:
    mount, directory = _planned(rec, point, path)
    return mount, unmount_planned(mount, directory, FAST, detach_allowed=detach)


def _ids() -> set[int]:
    return {m.mount_id for m in mountinfo.read().mounts}


def _cgroup2_mounts_apart() -> tuple[int | None, int, int | None]:
    node.mount_at("cgroup2", "/run/a")
    node.mount_at("cgroup2", "/run/b")
    a = stat_mount(b"/run/a", IdKind.OLD)
    b = stat_mount(b"/run/b", IdKind.OLD)
    shown = [m for m in mountinfo.read().mounts if m.mount_point == "/run/a"][-1]
    assert a.major_minor == b.major_minor == shown.major_minor  # st_dev cannot tell them apart
    return a.mount_id, shown.mount_id, b.mount_id


def test_mount_id_tells_cgroup2_mounts_apart_where_st_dev_cannot() -> None:
    a, expected, b = in_namespace(_cgroup2_mounts_apart)
    assert a == expected and a != b


def _unique_ids_are_not_the_old_ones() -> tuple[int | None, int | None]:
    node.mount_at("cgroup2", "/run/a")
    return (
        stat_mount(b"/run/a", IdKind.OLD).mount_id,
        stat_mount(b"/run/a", IdKind.UNIQUE).mount_id,
    )


def test_unique_mount_ids_are_64_bit_and_distinct_from_the_old_ones() -> None:
    old, unique = in_namespace(_unique_ids_are_not_the_old_ones)
    assert old is not None and unique is not None
    assert unique >= 1 << 31 > old  # measured on 6.18: the unique IDs start above every old one


def _stack_directory() -> tuple[Expected, int, int]:
    rec = Recorder()
    rec.mount_at("tmpfs", "/run/calico")
    below = stat_mount(b"/run/calico", IdKind.OLD).mount_id
    for fstype in ("cgroup2", "tmpfs", "cgroup2"):
        rec.mount_at(fstype, "/run/calico/cgroup")
    table = rec.read(Path.UNIQUE).mounts
    top = [m for m in table if m.mount_point == "/run/calico/cgroup"][-1]
    unique_below = stat_mount(b"/run/calico", IdKind.UNIQUE).mount_id
    assert below is not None and unique_below is not None
    return directory_of(top, table), below, unique_below


def test_a_stack_member_is_looked_up_on_the_mount_below_the_bottom_of_the_stack() -> None:
    directory, below, unique_below = in_namespace(_stack_directory)
    assert directory == Expected("/run/calico", below, unique_below)


def _symlink_swapped_in(path: Path) -> tuple[Result, str, bool, bool]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    rec.mount_at("cgroup2", "/run/other")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    other = [m for m in mountinfo.read().mounts if m.mount_point == "/run/other"][-1]
    # Between plan and act the planned mount moves away and a symlink to another cgroup2
    # mount takes its path: following it would unmount the wrong thing.
    os.makedirs("/run/moved")
    subprocess.run(["mount", "--move", "/run/calico/cgroup", "/run/moved"], check=True)
    os.rmdir("/run/calico/cgroup")
    os.symlink("/run/other", "/run/calico/cgroup")
    outcome = unmount_planned(planned, directory, FAST, detach_allowed=True)
    ids = _ids()
    return outcome.result, outcome.detail, planned.mount_id in ids, other.mount_id in ids


@PATHS
def test_a_symlink_swapped_in_is_refused_and_nothing_is_touched(path: Path) -> None:
    result, detail, planned_alive, other_alive = in_namespace(_symlink_swapped_in, path)
    assert result is Result.REFUSED, detail
    assert "not the planned" in detail
    assert planned_alive and other_alive


def _shadowed(path: Path) -> tuple[Result, str, int]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    node.mount_at("tmpfs", "/run/calico")  # hides /run/calico/cgroup from every path lookup
    before = len(mountinfo.read().mounts)
    outcome = unmount_planned(planned, directory, FAST, detach_allowed=True)
    return outcome.result, outcome.detail, len(mountinfo.read().mounts) - before


@PATHS
def test_a_target_shadowed_from_above_is_refused_and_nothing_is_touched(path: Path) -> None:
    result, detail, change = in_namespace(_shadowed, path)
    assert result is Result.REFUSED, detail
    assert "not the planned mount" in detail  # the directory is on the tmpfs now
    assert change == 0


def _already_gone(path: Path) -> Result:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    subprocess.run(["umount", "/run/calico/cgroup"], check=True)
    return unmount_planned(planned, directory, FAST, detach_allowed=True).result


@PATHS
def test_a_planned_mount_that_is_already_gone_counts_as_success(path: Path) -> None:
    assert in_namespace(_already_gone, path) is Result.ALREADY_GONE


def _busy(path: Path, detach_allowed: bool) -> tuple[Result, list[str], bool]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    holder = subprocess.Popen(["sleep", "60"], cwd="/run/calico/cgroup")
    try:
        outcome = unmount_planned(planned, directory, FAST, detach_allowed=detach_allowed)
    finally:
        holder.kill()
        holder.wait()
    blockers = [f"{b.comm}:{b.pid}:{b.how}" for b in outcome.blockers]
    return outcome.result, [*blockers, f"holder:{holder.pid}"], planned.mount_id in _ids()


@PATHS
def test_busy_mount_is_detached_when_allowed_and_the_holder_is_named(path: Path) -> None:
    result, blockers, still_there = in_namespace(_busy, path, True)
    holder_pid = blockers[-1].split(":")[1]
    assert result is Result.DETACHED
    assert f"sleep:{holder_pid}:cwd" in blockers
    assert not still_there


def test_busy_mount_is_left_when_detach_is_not_allowed() -> None:
    result, blockers, still_there = in_namespace(_busy, Path.OLD, False)
    holder_pid = blockers[-1].split(":")[1]
    assert result is Result.FAILED
    assert f"sleep:{holder_pid}:cwd" in blockers
    assert still_there


def _blocker_by_open_fd() -> list[str]:
    node.mount_at("tmpfs", "/run/calico/data")
    data = [m for m in mountinfo.read().mounts if m.mount_point == "/run/calico/data"][-1]
    holder = subprocess.Popen(["sh", "-c", "exec 3</run/calico/data; exec sleep 60"])
    try:
        for _ in range(100):  # wait until the shell has opened the directory
            if find_blockers({data.mount_id}):
                break
            subprocess.run(["sleep", "0.02"])
        return [b.how for b in find_blockers({data.mount_id})]
    finally:
        holder.kill()
        holder.wait()


def test_blockers_include_processes_with_an_open_fd_inside() -> None:
    assert in_namespace(_blocker_by_open_fd) == ["fd 3"]


def _weird_name(path: Path) -> tuple[Result, bool]:
    rec = Recorder()
    rec.mount_at("cgroup2", node.WEIRD_TARGET)
    planned, outcome = _unmount(rec, node.WEIRD_TARGET, path)
    return outcome.result, planned.mount_id in _ids()


@PATHS
def test_mount_points_with_escaped_bytes_are_unmounted_by_their_real_path(path: Path) -> None:
    assert in_namespace(_weird_name, path) == (Result.UNMOUNTED, False)


def _unknown_fstype_on_the_old_path() -> tuple[Result, str]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", Path.OLD)
    odd = Mount(**{**planned.__dict__, "fstype": "fuseblk-unknown"})
    outcome = unmount_planned(odd, directory, FAST, detach_allowed=True)
    return outcome.result, outcome.detail


def test_the_old_path_refuses_a_filesystem_type_it_cannot_verify() -> None:
    result, detail = in_namespace(_unknown_fstype_on_the_old_path)
    assert result is Result.REFUSED and "cannot verify the filesystem type" in detail


# ---- removing the emptied mount-point directory ----------------------------------------------


def _mount_point_on_cgroupfs() -> tuple[str | None, bool]:
    # A directory inside a cgroup2 mount is a real cgroup: rmdir there deletes a cgroup of
    # the host. The test makes its own cgroup for this and removes it itself.
    node.mount_at("cgroup2", "/run/cg")
    cgroup = f"/run/cg/calico-mount-reaper-test.{os.getpid()}"
    rec = Recorder()
    rec.mount_at("tmpfs", cgroup)
    _, directory = _planned(rec, cgroup, Path.OLD)
    subprocess.run(["umount", cgroup], check=True)
    try:
        return remove_mount_point(cgroup, directory), os.path.isdir(cgroup)
    finally:
        os.rmdir(cgroup)


def test_a_mount_point_directory_on_cgroupfs_is_never_removed() -> None:
    why, still_there = in_namespace(_mount_point_on_cgroupfs)
    assert still_there
    assert why is not None and "cgroup2, not an ordinary filesystem" in why


def _mount_point_still_mounted(path: Path) -> tuple[str | None, bool]:
    rec = Recorder()
    rec.mount_at("tmpfs", "/run/calico/cgroup")
    _, directory = _planned(rec, "/run/calico/cgroup", path)
    return remove_mount_point("/run/calico/cgroup", directory), os.path.isdir("/run/calico/cgroup")


@PATHS
def test_a_directory_that_is_still_a_mount_point_is_kept(path: Path) -> None:
    assert in_namespace(_mount_point_still_mounted, path) == ("still a mount point", True)


def _emptied_directory_removed(path: Path) -> tuple[Result, str | None, bool]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    outcome = unmount_planned(planned, directory, FAST, detach_allowed=True)
    why = remove_mount_point("/run/calico/cgroup", directory)
    return outcome.result, why, os.path.lexists("/run/calico/cgroup")


@PATHS
def test_the_emptied_mount_point_directory_on_tmpfs_is_removed(path: Path) -> None:
    assert in_namespace(_emptied_directory_removed, path) == (Result.UNMOUNTED, None, False)


def _directory_renamed_before_rmdir(path: Path) -> tuple[str | None, bool]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned, directory = _planned(rec, "/run/calico/cgroup", path)
    unmount_planned(planned, directory, FAST, detach_allowed=True)
    # /run/calico is moved away and a look-alike put in its place: a real directory, not a
    # symlink, so only the mount check (the look-alike is on another tmpfs) can tell.
    os.rename("/run/calico", "/run/old")
    node.mount_at("tmpfs", "/run/calico")
    os.mkdir("/run/calico/cgroup")
    return remove_mount_point("/run/calico/cgroup", directory), os.path.isdir("/run/calico/cgroup")


@PATHS
def test_a_look_alike_directory_on_another_mount_is_not_removed_from(path: Path) -> None:
    why, kept = in_namespace(_directory_renamed_before_rmdir, path)
    assert kept and why is not None and "not the planned mount" in why
