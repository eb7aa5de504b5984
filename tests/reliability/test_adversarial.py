"""Safety under attack: the reaper against a hostile mount table, on the real kernel.

Every case runs in a private mount namespace (tests/support/nsutil.py) and counts *wrong unmounts*:
a mount that was not a target (or a target other than the planned one) disappearing. The
figure must be zero. Each case records its attempts and wrong unmounts for docs/reliability.md.
"""

from __future__ import annotations

import ctypes
import os

from calico_mount_reaper import mountinfo
from calico_mount_reaper.config import Config
from calico_mount_reaper.model import Liveness
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.reaper import run_pass
from calico_mount_reaper.unmount import BusyPolicy, Result, unmount_planned

from tests.support import node
from tests.support.figures import record
from tests.support.nsutil import in_namespace, mount

NO_RETRY = BusyPolicy(retries=0, backoff=0)
RACE_ITERATIONS = int(os.environ.get("RELIABILITY_RACE_ITERATIONS", "1000"))
RENAME_EXCHANGE = 2
AT_FDCWD = -100
MS_BIND, MS_REMOUNT, MS_RDONLY = 0x1000, 0x20, 0x1
_libc = ctypes.CDLL(None, use_errno=True)


def _table() -> dict[int, Mount]:
    return {m.mount_id: m for m in mountinfo.read().mounts}


def _at(point: str) -> list[Mount]:
    return [m for m in mountinfo.read().mounts if m.mount_point == point]


def _umount_all(path: str) -> None:
    while _libc.umount2(os.fsencode(path), 0) == 0:
        pass


# ---- racing symlink swap ----------------------------------------------------------------------


def _racing_swap(iterations: int) -> dict[str, int]:
    """Reap /run/calico/cgroup while another process keeps exchanging /run/calico with a symlink
    to a tree that holds a different cgroup2 mount at the same relative path."""
    os.makedirs("/run/calico/cgroup")
    os.makedirs("/run/decoy/calico/cgroup")
    mount("none", "/run/decoy/calico/cgroup", "cgroup2")
    os.symlink("/run/decoy/calico", "/run/swap")
    # The real directory, whatever name it has at the moment: targets are remounted through it.
    real = os.open("/run/calico", os.O_PATH | os.O_DIRECTORY)
    again = f"/proc/self/fd/{real}/cgroup"
    flipper = os.fork()
    if flipper == 0:
        while True:  # one atomic renameat2(RENAME_EXCHANGE) per flip
            _libc.renameat2(AT_FDCWD, b"/run/calico", AT_FDCWD, b"/run/swap", RENAME_EXCHANGE)
    counts = {"attempts": 0, "wrong": 0, "unmounted": 0, "refused": 0, "flipped_paths": 0}
    try:
        while counts["attempts"] < iterations and counts["flipped_paths"] < 20 * iterations:
            mount("none", again, "cgroup2")
            table = _table()
            planned = [
                m
                for m in table.values()
                if m.mount_point == "/run/calico/cgroup" and m.fstype == "cgroup2"
            ]
            decoy = [m.mount_id for m in table.values() if m.mount_point.startswith("/run/decoy")]
            if not planned:  # the plan saw the real directory under its swapped name
                counts["flipped_paths"] += 1
                _umount_all(again)
                continue
            counts["attempts"] += 1
            outcome = unmount_planned(planned[0], NO_RETRY, detach_allowed=True)
            after = _table()
            if any(d not in after for d in decoy):
                counts["wrong"] += 1
                mount("none", "/run/decoy/calico/cgroup", "cgroup2")
            if outcome.result is Result.UNMOUNTED:
                counts["unmounted"] += 1
                assert planned[0].mount_id not in after or after[planned[0].mount_id] != planned[0]
            elif outcome.result is Result.REFUSED:
                counts["refused"] += 1
            _umount_all(again)
    finally:
        os.kill(flipper, 9)
        os.waitpid(flipper, 0)
    return counts


def test_racing_symlink_swap_of_the_parent_never_unmounts_the_other_cgroup2_mount() -> None:
    counts = in_namespace(_racing_swap, RACE_ITERATIONS, timeout=600)
    record(
        "adversarial",
        "racing swap: /run/calico <-> symlink to a tree with another cgroup2",
        attempts=counts["attempts"],
        wrong_unmounts=counts["wrong"],
        detail=f"{counts['unmounted']} unmounted, {counts['refused']} refused",
    )
    assert counts["wrong"] == 0, counts
    # The race must really have been run: every attempt made, and both outcomes seen.
    assert counts["attempts"] >= RACE_ITERATIONS, counts
    assert counts["unmounted"] > 0 and counts["refused"] > 0, counts


# ---- mount-ID reuse ------------------------------------------------------------------------


def _id_reuse(same_path: bool) -> dict[str, object]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    planned = _at("/run/calico/cgroup")[-1]
    # Someone else unmounts the planned mount and mounts something else, which gets the freed
    # ID: the kernel hands out the old 32-bit mount IDs lowest-free-first.
    _umount_all("/run/calico/cgroup")
    newcomer = "/run/calico/cgroup" if same_path else "/run/elsewhere"
    node.mount_at("tmpfs", newcomer)
    reused = _at(newcomer)[-1]
    outcome = unmount_planned(planned, NO_RETRY, detach_allowed=True)
    return {
        "reused": reused.mount_id == planned.mount_id,
        "result": outcome.result,
        "detail": outcome.detail,
        "newcomer_alive": reused.mount_id in _table(),
    }


def test_mount_id_reused_at_the_same_path_by_another_filesystem_is_refused() -> None:
    out = in_namespace(_id_reuse, True)
    record(
        "adversarial",
        "mount ID reused at the same path (tmpfs gets the planned ID)",
        attempts=1,
        wrong_unmounts=int(not out["newcomer_alive"]),
        detail=out["result"].value,
    )  # type: ignore[attr-defined]
    assert out["reused"], "the kernel did not reuse the ID: the case tests nothing"
    assert out["result"] is Result.REFUSED, out
    assert out["newcomer_alive"]


def test_mount_id_reused_elsewhere_is_refused() -> None:
    out = in_namespace(_id_reuse, False)
    record(
        "adversarial",
        "mount ID reused elsewhere (tmpfs at another path)",
        attempts=1,
        wrong_unmounts=int(not out["newcomer_alive"]),
        detail=out["result"].value,
    )  # type: ignore[attr-defined]
    assert out["reused"], "the kernel did not reuse the ID: the case tests nothing"
    assert out["result"] in (Result.REFUSED, Result.ALREADY_GONE), out
    assert out["newcomer_alive"]


# ---- bind of the host's cgroup2 hierarchy onto the target path -------------------------------


def _host_cgroup2() -> str:
    """The host's cgroup2 hierarchy; on a cgroup v1 host (like this CI machine) a cgroup2
    mount made to stand in for it, which is the same superblock a v2 host would have."""
    for m in mountinfo.read().mounts:
        if m.fstype == "cgroup2" and m.mount_point.startswith("/sys/fs/cgroup"):
            return m.mount_point
    node.mount_at("cgroup2", "/run/host/sys/fs/cgroup")
    return "/run/host/sys/fs/cgroup"


def _bind_of_host_cgroup() -> dict[str, object]:
    source = _host_cgroup2()
    host = _at(source)[-1]
    os.makedirs("/run/calico/cgroup")
    mount(source, "/run/calico/cgroup", "", MS_BIND)
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    table = _table()
    return {
        "host_alive": table.get(host.mount_id) == host,
        "bind_left": len(_at("/run/calico/cgroup")),
        "results": [o.result for o in report.outcomes],
    }


def test_a_bind_of_the_host_cgroup2_hierarchy_goes_and_the_source_stays() -> None:
    out = in_namespace(_bind_of_host_cgroup)
    record(
        "adversarial",
        "bind of the host cgroup2 hierarchy onto /run/calico/cgroup",
        attempts=1,
        wrong_unmounts=int(not out["host_alive"]),
        detail="bind reaped, source intact",
    )
    assert out["host_alive"]
    assert out["bind_left"] == 0
    assert out["results"] == [Result.UNMOUNTED]


# ---- a non-target mount shadowing a target ------------------------------------------------------


def _shadowed_pass() -> dict[str, object]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    node.mount_at("tmpfs", "/run/calico")  # the operator's tmpfs hides the target from paths
    before = node.lines()
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    return {
        "unchanged": node.lines() == before,
        "results": [o.result for o in report.outcomes],
        "remaining": [s.mount_point for s in report.remaining],
    }


def test_a_target_shadowed_by_a_non_target_is_reported_and_nothing_is_touched() -> None:
    out = in_namespace(_shadowed_pass)
    record(
        "adversarial",
        "non-target tmpfs over /run/calico shadows the target",
        attempts=1,
        wrong_unmounts=int(not out["unchanged"]),
        detail="refused, reported as remaining",
    )
    assert out["unchanged"]
    assert out["results"] and set(out["results"]) == {Result.REFUSED}  # type: ignore[arg-type]
    assert out["remaining"] == ["/run/calico/cgroup"]


# ---- escapable bytes and PATH_MAX ---------------------------------------------------------------

# Every byte a file name may hold (all but NUL and '/'), split so each name fits NAME_MAX.
_ALL_BYTES = bytes(b for b in range(1, 256) if b != ord("/"))
_NAMES = (os.fsdecode(_ALL_BYTES[:127]), os.fsdecode(_ALL_BYTES[127:]))


def _raw_lines() -> list[str]:
    # Non-UTF-8 bytes in mount points: read as the parser does, surrogate-escaped.
    with open("/proc/self/mountinfo", "rb") as f:
        return f.read().decode("utf-8", "surrogateescape").splitlines()


def _every_byte() -> dict[str, object]:
    targets = [f"/run/calico/{_NAMES[0]}", f"/run/calico/{_NAMES[1]}"]
    decoys = [f"/run/calico-decoy/{_NAMES[0]}", f"/run/calico-decoy/{_NAMES[1]}"]
    for p in targets + decoys:
        node.mount_at("cgroup2", p)
    decoy_lines = [line for line in _raw_lines() if "/run/calico-decoy/" in line]
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    return {
        "parsed": sorted(
            m.mount_point
            for m in mountinfo.read().mounts
            if m.mount_point.startswith("/run/calico-decoy/")
        )
        == sorted(decoys),
        "decoys_kept": [line for line in _raw_lines() if "/run/calico-decoy/" in line]
        == decoy_lines,
        "targets_left": [p for p in targets if _at(p)],
        "results": [o.result for o in report.outcomes],
    }


def test_mount_points_with_every_byte_are_reaped_by_their_real_path() -> None:
    out = in_namespace(_every_byte)
    record(
        "adversarial",
        "mount points holding every byte 0x01-0xff (but '/')",
        attempts=2,
        wrong_unmounts=int(not out["decoys_kept"]),
        detail="both reaped, decoys intact",
    )
    assert out["parsed"] and out["decoys_kept"]
    assert out["targets_left"] == []
    assert out["results"] == [Result.UNMOUNTED, Result.UNMOUNTED]


def _deep_path(length: int) -> str:
    """/run/calico/aaa.../aaa... of exactly ``length`` characters."""
    path = "/run/calico"
    while len(path) < length:
        path += "/" + "a" * min(200, length - len(path) - 1)
    return path


def _near_path_max() -> dict[str, object]:
    near = _deep_path(4095)  # PATH_MAX is 4096 with the NUL
    node.mount_at("cgroup2", near)
    # Beyond PATH_MAX: reachable only step by step (chdir), as a hostile tree would be made.
    os.chdir(os.path.dirname(near))
    os.makedirs("b" * 200 + "/c")
    mount("none", "b" * 200 + "/c", "cgroup2")
    os.chdir("/")
    decoy = _deep_path(4095).replace("/run/calico", "/run/calicx", 1)
    node.mount_at("cgroup2", decoy)
    before = {m.mount_id for m in mountinfo.read().mounts if m.mount_point == decoy}
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    return {
        "near_gone": not _at(near),
        "too_long": [
            (len(o.mount.mount_point), o.result, o.detail)
            for o in report.outcomes
            if len(o.mount.mount_point) >= 4096
        ],
        "decoy_kept": before
        == {m.mount_id for m in mountinfo.read().mounts if m.mount_point == decoy},
    }


def test_paths_near_and_beyond_path_max() -> None:
    out = in_namespace(_near_path_max)
    record(
        "adversarial",
        "mount points of 4095 bytes and beyond PATH_MAX",
        attempts=2,
        wrong_unmounts=int(not out["decoy_kept"]),
        detail="4095: reaped; >4096: refused with ENAMETOOLONG, nothing touched",
    )
    assert out["decoy_kept"]
    # The longer mount sits inside the 4095-byte one; the pass cannot reach it by path: it says
    # so (refused, naming the error) and then cannot unmount its parent either (busy/refused).
    too_long = out["too_long"]
    assert isinstance(too_long, list) and too_long
    assert all(r is Result.REFUSED and "too long" in d for _, r, d in too_long), too_long


# ---- /var/run: symlink or real directory -------------------------------------------------------


def _var_run(real_dir: bool) -> dict[str, object]:
    if real_dir:
        mount("tmpfs", "/var", "tmpfs")  # only in this namespace: /var/run a real directory
        os.makedirs("/var/run")
    elif not os.path.islink("/var/run"):
        mount("tmpfs", "/var", "tmpfs")
        os.symlink("/run", "/var/run")
    node.mount_at("cgroup2", "/var/run/calico/cgroup")
    node.mount_at("cgroup2", "/var/run/calico2")
    decoy = _at("/var/run/calico2" if real_dir else "/run/calico2")[-1]
    shown = [m.mount_point for m in mountinfo.read().mounts if "calico/cgroup" in m.mount_point]
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    return {
        "shown": shown,
        "results": [o.result for o in report.outcomes],
        "decoy_alive": decoy.mount_id in _table(),
        "left": [
            m.mount_point for m in mountinfo.read().mounts if "calico/cgroup" in m.mount_point
        ],
    }


def test_var_run_as_a_symlink() -> None:
    out = in_namespace(_var_run, False)
    record(
        "adversarial",
        "/var/run a symlink to /run",
        attempts=1,
        wrong_unmounts=int(not out["decoy_alive"]),
        detail="reaped as /run/calico/cgroup",
    )
    assert out["shown"] == ["/run/calico/cgroup"]
    assert out["results"] == [Result.UNMOUNTED] and out["left"] == []
    assert out["decoy_alive"]


def test_var_run_as_a_real_directory() -> None:
    out = in_namespace(_var_run, True)
    record(
        "adversarial",
        "/var/run a real directory",
        attempts=1,
        wrong_unmounts=int(not out["decoy_alive"]),
        detail="reaped as /var/run/calico/cgroup",
    )
    assert out["shown"] == ["/var/run/calico/cgroup"]
    assert out["results"] == [Result.UNMOUNTED] and out["left"] == []
    assert out["decoy_alive"]


# ---- a target under a read-only parent -----------------------------------------------------------


def _read_only_parent() -> dict[str, object]:
    node.mount_at("tmpfs", "/run/calico")
    node.mount_at("cgroup2", "/run/calico/cgroup")
    mount("none", "/run/calico", "", MS_REMOUNT | MS_BIND | MS_RDONLY)
    parent = _at("/run/calico")[-1]
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    return {
        "results": [o.result for o in report.outcomes],
        "left": len(_at("/run/calico/cgroup")),
        "parent_alive": parent.mount_id in _table(),
        "dir_kept": os.path.isdir("/run/calico/cgroup"),
        "removed": report.removed_dirs,
        "ro": "ro" in parent.options.split(","),
    }


def test_a_target_under_a_read_only_parent_is_unmounted_and_its_directory_kept() -> None:
    out = in_namespace(_read_only_parent)
    record(
        "adversarial",
        "target under a read-only parent",
        attempts=1,
        wrong_unmounts=int(not out["parent_alive"]),
        detail="unmounted; mount-point directory kept (EROFS)",
    )
    assert out["ro"]
    assert out["results"][0] is Result.UNMOUNTED and out["left"] == 0  # type: ignore[index]
    assert out["parent_alive"] and out["dir_kept"] and out["removed"] == []
