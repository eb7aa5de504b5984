"""The unmount engine against the real kernel, in private mount namespaces."""

from __future__ import annotations

import os
import subprocess

from calico_mount_reaper import mountinfo
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.unmount import (
    BusyPolicy,
    Result,
    find_blockers,
    mount_id_of,
    remove_mount_point,
    unmount_planned,
)

from tests.support import node
from tests.support.nsutil import in_namespace

FAST = BusyPolicy(retries=2, backoff=0.01)


def _mount_record(point: str) -> Mount:
    """The newest mountinfo record at ``point`` (the top of its stack)."""
    return [m for m in mountinfo.read().mounts if m.mount_point == point][-1]


def _ids() -> set[int]:
    return {m.mount_id for m in mountinfo.read().mounts}


def _mount_id_matches_mountinfo() -> tuple[int, int, int]:
    node.mount_at("cgroup2", "/run/a")
    node.mount_at("cgroup2", "/run/b")
    return mount_id_of("/run/a"), _mount_record("/run/a").mount_id, mount_id_of("/run/b")


def test_mount_id_tells_cgroup2_mounts_apart_where_st_dev_cannot() -> None:
    a, expected, b = in_namespace(_mount_id_matches_mountinfo)
    assert a == expected and a != b


def _symlink_swapped_in() -> tuple[Result, str, bool, bool]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    node.mount_at("cgroup2", "/run/other")
    planned = _mount_record("/run/calico/cgroup")
    # Between plan and act the planned mount moves away and a symlink to another cgroup2
    # mount takes its path: following it would unmount the wrong thing.
    os.makedirs("/run/moved")
    subprocess.run(["mount", "--move", "/run/calico/cgroup", "/run/moved"], check=True)
    os.rmdir("/run/calico/cgroup")
    os.symlink("/run/other", "/run/calico/cgroup")
    outcome = unmount_planned(planned, FAST, detach_allowed=True)
    ids = _ids()
    return (
        outcome.result,
        outcome.detail,
        planned.mount_id in ids,
        (_mount_record("/run/other").mount_id in ids),
    )


def test_a_symlink_swapped_in_is_refused_and_nothing_is_touched() -> None:
    result, detail, planned_alive, other_alive = in_namespace(_symlink_swapped_in)
    assert result is Result.REFUSED, detail
    assert "not the planned mount" in detail
    assert planned_alive and other_alive


def _shadowed() -> tuple[Result, str, int]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    planned = _mount_record("/run/calico/cgroup")
    node.mount_at("tmpfs", "/run/calico")  # hides /run/calico/cgroup from every path lookup
    before = len(mountinfo.read().mounts)
    outcome = unmount_planned(planned, FAST, detach_allowed=True)
    return outcome.result, outcome.detail, len(mountinfo.read().mounts) - before


def test_a_target_shadowed_from_above_is_refused_and_nothing_is_touched() -> None:
    result, detail, change = in_namespace(_shadowed)
    assert result is Result.REFUSED, detail
    assert change == 0


def _already_gone() -> Result:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    planned = _mount_record("/run/calico/cgroup")
    subprocess.run(["umount", "/run/calico/cgroup"], check=True)
    return unmount_planned(planned, FAST, detach_allowed=True).result


def test_a_planned_mount_that_is_already_gone_counts_as_success() -> None:
    assert in_namespace(_already_gone) is Result.ALREADY_GONE


def _busy(detach_allowed: bool) -> tuple[Result, list[str], bool]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    planned = _mount_record("/run/calico/cgroup")
    holder = subprocess.Popen(["sleep", "60"], cwd="/run/calico/cgroup")
    try:
        outcome = unmount_planned(planned, FAST, detach_allowed=detach_allowed)
    finally:
        holder.kill()
        holder.wait()
    blockers = [f"{b.comm}:{b.pid}:{b.how}" for b in outcome.blockers]
    return outcome.result, [*blockers, f"holder:{holder.pid}"], planned.mount_id in _ids()


def test_busy_mount_is_detached_when_allowed_and_the_holder_is_named() -> None:
    result, blockers, still_there = in_namespace(_busy, True)
    holder_pid = blockers[-1].split(":")[1]
    assert result is Result.DETACHED
    assert f"sleep:{holder_pid}:cwd" in blockers
    assert not still_there


def test_busy_mount_is_left_when_detach_is_not_allowed() -> None:
    result, blockers, still_there = in_namespace(_busy, False)
    holder_pid = blockers[-1].split(":")[1]
    assert result is Result.FAILED
    assert f"sleep:{holder_pid}:cwd" in blockers
    assert still_there


def _blocker_by_open_fd() -> list[str]:
    node.mount_at("tmpfs", "/run/calico/data")
    holder = subprocess.Popen(["sh", "-c", "exec 3</run/calico/data; exec sleep 60"])
    try:
        for _ in range(100):  # wait until the shell has opened the directory
            if find_blockers({_mount_record("/run/calico/data").mount_id}):
                break
            subprocess.run(["sleep", "0.02"])
        return [b.how for b in find_blockers({_mount_record("/run/calico/data").mount_id})]
    finally:
        holder.kill()
        holder.wait()


def test_blockers_include_processes_with_an_open_fd_inside() -> None:
    assert in_namespace(_blocker_by_open_fd) == ["fd 3"]


def _weird_name() -> tuple[Result, bool]:
    node.mount_at("cgroup2", node.WEIRD_TARGET)
    planned = _mount_record(node.WEIRD_TARGET)
    outcome = unmount_planned(planned, FAST, detach_allowed=True)
    return outcome.result, planned.mount_id in _ids()


def test_mount_points_with_escaped_bytes_are_unmounted_by_their_real_path() -> None:
    assert in_namespace(_weird_name) == (Result.UNMOUNTED, False)


def _mount_point_on_cgroupfs() -> tuple[str | None, bool]:
    # A directory inside a cgroup2 mount is a real cgroup: rmdir there deletes a cgroup of
    # the host. The test makes its own cgroup for this and removes it itself.
    node.mount_at("cgroup2", "/run/cg")
    cgroup = f"/run/cg/calico-mount-reaper-test.{os.getpid()}"
    node.mount_at("tmpfs", cgroup)
    subprocess.run(["umount", cgroup], check=True)
    try:
        return remove_mount_point(cgroup), os.path.isdir(cgroup)
    finally:
        os.rmdir(cgroup)


def test_a_mount_point_directory_on_cgroupfs_is_never_removed() -> None:
    why, still_there = in_namespace(_mount_point_on_cgroupfs)
    assert still_there
    assert why is not None and "cgroup" in why


def _mount_point_still_mounted() -> tuple[str | None, bool]:
    node.mount_at("tmpfs", "/run/calico/cgroup")
    return remove_mount_point("/run/calico/cgroup"), os.path.isdir("/run/calico/cgroup")


def test_a_directory_that_is_still_a_mount_point_is_kept() -> None:
    assert in_namespace(_mount_point_still_mounted) == ("still a mount point", True)
