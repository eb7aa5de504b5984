"""Safety under attack: whole reaper passes against a hostile tree, on the real kernel.

The attacker is the one SECURITY.md models: it can write under /run/calico (swap any directory
there for a symlink, rename, mkdir) and mount and unmount there, from the reaper's mount
namespace or from a second one. Every case runs in a private mount namespace
(tests/support/nsutil.py) and counts two kinds of harm, both of which must be zero:

- a *wrong unmount*: a mount that is not the planned target disappears;
- a *wrong rmdir*: a directory that is not the planned, emptied mount point disappears (an
  empty directory elsewhere, or a tracing instance on tracefs).

Every case runs on both identity paths (tests/support/unique_ids.py): the 64-bit unique IDs and
the forced fallback. Each records its figures for docs/reliability.md from the same values
its assertions check.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path as FsPath

import pytest
from calico_mount_reaper import mountinfo, resolve
from calico_mount_reaper.config import Config
from calico_mount_reaper.liveness import observe
from calico_mount_reaper.model import Liveness
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.reaper import PassReport, run_pass
from calico_mount_reaper.statx import IdKind, stat_mount
from calico_mount_reaper.unmount import Result

from tests.support import node
from tests.support.figures import record
from tests.support.nsutil import HostSignals, in_namespace, mount
from tests.support.system_bus import Bus
from tests.support.unique_ids import Path, Recorder, has_unique_ids

RACE_ITERATIONS = int(os.environ.get("RELIABILITY_RACE_ITERATIONS", "1000"))
RENAME_EXCHANGE = 2
AT_FDCWD = -100
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REMOUNT, MS_RDONLY = 0x1000, 0x20, 0x1
# The unique path needs 64-bit mount IDs (Linux 6.8+); the old path runs on every kernel.
PATHS = pytest.mark.parametrize(
    "path",
    [
        pytest.param(
            Path.UNIQUE,
            marks=pytest.mark.skipif(
                not has_unique_ids(), reason="no 64-bit mount IDs on this kernel (Linux < 6.8)"
            ),
        ),
        Path.OLD,
    ],
    ids=[p.value for p in Path],
)
_libc = ctypes.CDLL(None, use_errno=True)


def _table() -> dict[int, Mount]:
    return {m.mount_id: m for m in mountinfo.read().mounts}


def _at(point: str) -> list[Mount]:
    return [m for m in mountinfo.read().mounts if m.mount_point == point]


def _umount_all(path: str) -> None:
    while _libc.umount2(os.fsencode(path), 0) == 0:
        pass


def _exchange(a: str, b: str) -> None:
    """One atomic renameat2(RENAME_EXCHANGE): ``a`` and ``b`` trade places."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _pass(rec: Recorder, path: Path, **kw: object) -> PassReport:
    """One whole reaper pass, planning from the table as ``path`` sees it."""
    return run_pass(Config(), Mode.NORMAL, liveness=Liveness(), read=lambda: rec.read(path), **kw)  # type: ignore[arg-type]


def _mount_of(name: str, dir_fd: int = AT_FDCWD) -> tuple[object, ...] | None:
    """The mount at ``name`` as exactly as this kernel names one, to count harm to victims.

    The 64-bit ID where the kernel has it (6.8+); before that the 32-bit ID and the device. No
    attack here mounts at a victim's own path, so a reused old ID there cannot hide a wrong
    unmount of it. None if the path cannot be looked at.
    """
    try:
        unique = stat_mount(os.fsencode(name), IdKind.UNIQUE, dir_fd=dir_fd)
        if unique.mount_id is not None:
            return (unique.mount_id,)
        old = stat_mount(os.fsencode(name), IdKind.OLD, dir_fd=dir_fd)
    except OSError:
        return None
    return old.mount_id, old.major_minor


def _tracefs(where: str) -> bool:
    """Mount tracefs at ``where`` (this namespace only); False if the kernel has none."""
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "tracefs" for line in f if line.strip()):
            return False
    os.makedirs(where, exist_ok=True)
    mount("nodev", where, "tracefs")
    return os.path.isdir(f"{where}/instances")


# ---- finding 1: a swap between the unmount and the rmdir -----------------------------------------


def _rmdir_redirected(path: Path) -> dict[str, object]:
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    os.makedirs("/run/decoy/cgroup")  # an empty directory that is no target's
    os.symlink("/run/decoy", "/run/calico.swap")

    def swap_after_unmount(*_: object) -> None:
        _exchange("/run/calico", "/run/calico.swap")  # /run/calico is now the symlink

    report = _pass(rec, path, on_outcome=swap_after_unmount)
    return {
        "results": [o.result for o in report.outcomes],
        "removed": report.removed_dirs,
        "decoy_kept": os.path.isdir("/run/decoy/cgroup"),
        "real_kept": os.path.isdir("/run/calico.swap/cgroup"),
    }


@PATHS
def test_a_symlink_swapped_in_before_the_rmdir_never_redirects_it(path: Path) -> None:
    out = in_namespace(_rmdir_redirected, path)
    record(
        "adversarial",
        "/run/calico swapped for a symlink between unmount and rmdir (whole pass)",
        path=path.value,
        attempts=1,
        wrong_unmounts=None,  # no mount victim in this case
        wrong_rmdirs=int(not out["decoy_kept"]),
        detail=f"rmdir refused; removed {len(out['removed'])}",  # type: ignore[arg-type]
    )
    assert out["results"] == [Result.UNMOUNTED]
    assert out["decoy_kept"], out
    assert out["removed"] == [] and out["real_kept"]


# ---- finding 3: a mount point on tracefs --------------------------------------------------------


def _rmdir_on_tracefs(path: Path) -> dict[str, object] | None:
    if not _tracefs("/run/calico/tracing"):
        return None
    # mkdir in instances/ creates a real tracing instance (tracefs is one superblock for the
    # whole kernel): this test makes its own and removes it itself.
    instance = f"/run/calico/tracing/instances/cmr-test-{os.getpid()}"
    os.mkdir(instance)
    try:
        rec = Recorder()
        rec.mount("none", instance, "cgroup2")
        report = _pass(rec, path)
        return {
            "results": [o.result for o in report.outcomes],
            "removed": report.removed_dirs,
            "instance_kept": os.path.isdir(instance),
        }
    finally:
        _umount_all(instance)
        if os.path.isdir(instance):
            os.rmdir(instance)


@PATHS
def test_an_emptied_mount_point_on_tracefs_is_never_removed(path: Path) -> None:
    out = in_namespace(_rmdir_on_tracefs, path)
    if out is None:
        pytest.skip("this kernel has no tracefs")
    record(
        "adversarial",
        "target mounted on a tracing instance directory (tracefs): rmdir allow-list",
        path=path.value,
        attempts=1,
        wrong_unmounts=None,  # no mount victim in this case
        wrong_rmdirs=int(not out["instance_kept"]),
        detail="unmounted; instance kept (tracefs not on the allow-list)",
    )
    assert out["results"] == [Result.UNMOUNTED]
    assert out["instance_kept"] and out["removed"] == [], out


# ---- finding 2: the freed mount ID handed to a victim, plus a swap -------------------------------


def _mount_id(fstype: str, where: str) -> int:
    node.mount_at(fstype, where)
    found = stat_mount(os.fsencode(where), IdKind.OLD).mount_id
    assert found is not None
    return found


def _take_freed_id(freed: int, newcomer: Callable[[], int]) -> bool:
    """Make ``newcomer`` get the freed old mount ID, as an attacker would.

    The kernel hands out old IDs lowest-free-first, so every lower free ID is filled first
    (those fillers stay mounted). Other processes on the machine allocate from the same global
    pool, so this can lose a race: the caller retries.
    """
    for k in range(1024):
        got = _mount_id("tmpfs", f"/run/fill/{os.getpid()}-{k}-{time.monotonic_ns()}")
        if got == freed:
            _umount_all_at_id(freed)
            return newcomer() == freed
        if got > freed:
            return False
    return False


def _umount_all_at_id(mount_id: int) -> None:
    m = _table()[mount_id]
    assert _libc.umount2(os.fsencode(m.mount_point), 0) == 0


def _reuse_attack(
    path: Path, shape: str, stalled_systemd: int | None, host: HostSignals | None = None
) -> dict[str, object]:
    """Plan, then (in the window) unmount the target and give its old ID to a victim.

    ``shape``: "swap" puts the victim at an unrelated path and swaps /run/calico for a symlink
    to its parent (finding 2); "tmpfs" or "cgroup2" mounts the newcomer at the target's own path.
    ``stalled_systemd`` None runs the attack in the liveness hook (between plan and act, in
    process); otherwise it is the fake systemd's PID: it is stopped, the pass gets stuck asking
    it for kubelet's state, and another process attacks meanwhile, then lets systemd go on.
    """
    rec = Recorder()
    rec.mount_at("cgroup2", "/run/calico/cgroup")
    planned = _at("/run/calico/cgroup")[-1]
    victim = "/run/victim/cgroup" if shape == "swap" else "/run/calico/cgroup"
    os.makedirs("/run/victim/cgroup")

    def attack() -> dict[str, object]:
        _umount_all("/run/calico/cgroup")
        reused = _take_freed_id(
            planned.mount_id, lambda: _mount_id("tmpfs" if shape == "tmpfs" else "cgroup2", victim)
        )
        if shape == "swap":
            os.symlink("/run/victim", "/run/calico.swap")
            _exchange("/run/calico", "/run/calico.swap")
        return {"reused": reused, "victim_mount": _mount_of(victim)}

    seen: dict[str, object] = {}
    if stalled_systemd is None:

        def hook(names: object, unit: str) -> Liveness:
            seen.update(attack())
            return Liveness()

        report = run_pass(Config(), Mode.NORMAL, observe_liveness=hook, read=lambda: rec.read(path))  # type: ignore[arg-type]
    else:
        read_fd, write_fd = os.pipe()
        # The fake systemd runs on the host, out of sight of this PID namespace.
        assert host is not None
        host.kill(stalled_systemd, signal.SIGSTOP)
        attacker = os.fork()
        if attacker == 0:  # give the pass time to read, plan and get stuck on the bus
            time.sleep(1.0)
            result = attack()
            host.kill(stalled_systemd, signal.SIGCONT)
            os.write(write_fd, repr(result).encode())
            os._exit(0)
        os.close(write_fd)
        # FORCE: the verdict must not hang on owner processes other tests on this machine
        # may be running (liveness sees every PID namespace); the pass still asks the stalled
        # bus for kubelet's state before it acts, which is the window this case needs.
        report = run_pass(
            Config(), Mode.FORCE, observe_liveness=observe, read=lambda: rec.read(path)
        )
        os.waitpid(attacker, 0)
        seen.update(eval(os.read(read_fd, 4096).decode()))
    return {
        **seen,
        "results": [o.result for o in report.outcomes if o.mount.mount_id == planned.mount_id],
        "details": [o.detail for o in report.outcomes],
        "victim_alive": _mount_of(victim) == seen["victim_mount"],
    }


def _until_reused(
    fn: Callable[..., dict[str, object]], *args: object, tries: int = 12
) -> dict[str, object]:
    """Rerun until the attack really happened: the victim got the freed ID, and the pass had
    planned the target before it (so it acted on the stale plan). Else it tested nothing."""
    for _ in range(tries):
        out = in_namespace(fn, *args, timeout=120)
        if out["reused"] and out["results"]:
            return out
    raise AssertionError(f"the attack never got in between plan and act: {out}")


@PATHS
def test_a_freed_id_given_to_a_victim_elsewhere_plus_a_swap_is_refused(path: Path) -> None:
    out = _until_reused(_reuse_attack, path, "swap", None)
    record(
        "adversarial",
        "mid-reap: target unmounted, its old ID given to a cgroup2 elsewhere, /run/calico "
        "swapped for a symlink to it (whole pass)",
        path=path.value,
        attempts=1,
        wrong_unmounts=int(not out["victim_alive"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
        detail=f"{out['results'][0].value}",  # type: ignore[index]
    )
    assert out["victim_alive"], out
    assert out["results"] in ([Result.REFUSED], [Result.ALREADY_GONE]), out


@PATHS
def test_a_freed_id_given_to_another_filesystem_at_the_same_path_is_refused(path: Path) -> None:
    out = _until_reused(_reuse_attack, path, "tmpfs", None)
    record(
        "adversarial",
        "mid-reap: target unmounted, a tmpfs at the same path gets its old ID (whole pass)",
        path=path.value,
        attempts=1,
        wrong_unmounts=int(not out["victim_alive"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
        detail=f"{out['results'][0].value}",  # type: ignore[index]
    )
    assert out["victim_alive"], out
    # The planned mount is gone and the newcomer was left alone: either word is true.
    assert out["results"] in ([Result.REFUSED], [Result.ALREADY_GONE]), out


@PATHS
def test_a_freed_id_given_to_a_new_cgroup2_at_the_same_path(path: Path) -> None:
    """The one case the two paths decide differently, and why the fallback's is acceptable.

    The newcomer is a cgroup2 at a target path: a target by rule (safety rule 1 holds either
    way). The unique ID tells it from the planned mount and refuses; the fallback cannot (same
    ID, same device: every cgroup2 shares one, same type, same path) and reaps it.
    """
    out = _until_reused(_reuse_attack, path, "cgroup2", None)
    expected = Result.REFUSED if path is Path.UNIQUE else Result.UNMOUNTED
    record(
        "adversarial",
        "mid-reap: target unmounted, a new cgroup2 at the same path gets its old ID",
        path=path.value,
        attempts=1,
        wrong_unmounts=None,  # the newcomer is a target by rule: see the detail
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
        detail=(
            "refused (unique ID differs)"
            if path is Path.UNIQUE
            else "unmounted: indistinguishable, and a target by rule"
        ),
    )
    assert out["results"] == [expected], out
    assert out["victim_alive"] is (path is Path.UNIQUE)


@PATHS
def test_the_id_reuse_and_swap_attack_from_another_process_during_a_stalled_bus(
    path: Path, tmp_path: FsPath
) -> None:
    bus = Bus(tmp_path)
    bus.start()
    try:
        bus.tell("active kubelet.service inactive")
        assert bus.fake is not None
        fake = bus.fake.pid
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        try:
            with HostSignals() as host:
                out = _until_reused(_reuse_attack, path, "swap", fake, host)
        finally:
            os.kill(fake, signal.SIGCONT)
            del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]
    finally:
        bus.stop()
    record(
        "adversarial",
        "the same attack from another process while systemd is stalled (SIGSTOP), whole pass",
        path=path.value,
        attempts=1,
        wrong_unmounts=int(not out["victim_alive"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
        detail=f"{out['results'][0].value if out['results'] else 'not planned'}",  # type: ignore[index]
    )
    assert out["victim_alive"], out
    # The pass planned the target before the attack (else this tested nothing) and refused.
    assert out["results"] in ([Result.REFUSED], [Result.ALREADY_GONE]), out


# ---- racing swaps of every directory on the path -----------------------------------------------


class _Victims:
    """Things a redirected reap could harm, each checked through an fd pinned at setup."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mounts: list[tuple[int, tuple[object, ...]]] = []  # (parent dir fd, `_mount_of`)
        self.dirs: list[int] = []  # parent dir fds of empty directories (and tracing instances)

    def add_mount(self, parent: str) -> None:
        node.mount_at("cgroup2", f"{parent}/{self.name}")
        fd = os.open(parent, os.O_PATH | os.O_DIRECTORY)
        victim = _mount_of(self.name, fd)
        assert victim is not None
        self.mounts.append((fd, victim))

    def add_dir(self, parent: str) -> None:
        os.makedirs(f"{parent}/{self.name}", exist_ok=True)
        self.dirs.append(os.open(parent, os.O_PATH | os.O_DIRECTORY))

    def harmed(self) -> tuple[int, int]:
        """(wrong unmounts, wrong rmdirs) since the last call; puts every victim back."""
        unmounted = removed = 0
        for fd, victim in list(self.mounts):
            if _mount_of(self.name, fd) != victim:
                unmounted += 1
                self.mounts.remove((fd, victim))
                mount("none", f"/proc/self/fd/{fd}/{self.name}", "cgroup2")
                new = _mount_of(self.name, fd)
                assert new is not None
                self.mounts.append((fd, new))
        for fd in self.dirs:
            try:
                os.stat(self.name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                removed += 1
                os.mkdir(self.name, dir_fd=fd)
        return unmounted, removed


def _flip_forever(pairs: list[tuple[str, str]], second_namespace: bool) -> None:
    """The attacker: swap a random directory on the target's path for a symlink and back."""
    if second_namespace:
        assert _libc.unshare(CLONE_NEWNS) == 0
    rng = random.Random(os.getpid())
    while True:
        real, link = rng.choice(pairs)
        _exchange(real, link)
        for _ in range(rng.randrange(300)):  # hold the swapped state for a random moment
            pass
        _exchange(real, link)
        for _ in range(rng.randrange(300)):
            pass


def _racing_swaps(path: Path, variant: str, iterations: int) -> dict[str, int]:
    """Reap /run/calico/a/b/<name> in whole passes while an attacker swaps /run/calico, a or b
    for a symlink into a look-alike tree. Each look-alike holds a victim at the place the
    target would be: a cgroup2 mount, an empty directory, or (b only) a tracing instance.

    ``variant``: "same-ns", "second-ns" (the attacker in a mount namespace of its own), or
    "walk" (same-ns, with directories opened by the component walk that kernels before 5.6
    need: openat2 is made to look absent, the one thing mocked here).
    """
    second_namespace = variant == "second-ns"
    if variant == "walk":
        resolve._has_openat2 = lambda: False  # type: ignore[method-assign]
    # Tracing instances are one set for the whole machine, and in its own PID namespace every
    # run of this test has the same PID: the name must not collide with a concurrent run's.
    name = f"cmr-race-{os.urandom(6).hex()}"
    victims = _Victims(name)
    components = ["/run/calico", "/run/calico/a", "/run/calico/a/b"]
    os.makedirs(f"{components[-1]}/{name}")
    pairs = []
    for depth, real in enumerate(components):
        rest = "/".join(["a", "b"][depth:])
        for kind, add in (("mount", victims.add_mount), ("dir", victims.add_dir)):
            tree = f"/run/decoy-{kind}-{depth}"
            add(f"{tree}/{rest}".rstrip("/"))
            os.symlink(tree, f"{real}.{kind}")
            pairs.append((real, f"{real}.{kind}"))
    instances = -1
    if _tracefs("/run/tracing"):
        os.mkdir(f"/run/tracing/instances/{name}")  # a real tracing instance; removed below
        victims.dirs.append(os.open("/run/tracing/instances", os.O_PATH | os.O_DIRECTORY))
        instances = victims.dirs[-1]
        os.symlink("/run/tracing/instances", f"{components[-1]}.tracing")
        pairs.append((components[-1], f"{components[-1]}.tracing"))
    real_b = os.open(components[-1], os.O_PATH | os.O_DIRECTORY)
    b_mount = stat_mount(b"", IdKind.OLD, dir_fd=real_b).mount_id
    rec = Recorder(match_path=False)
    counts = dict.fromkeys(
        ["attempts", "wrong_unmounts", "wrong_rmdirs", "unmounted", "refused", "removed"], 0
    )
    counts["victims"] = len(victims.mounts) + len(victims.dirs)
    flipper = os.fork()
    if flipper == 0:
        try:
            _flip_forever(pairs, second_namespace)
        finally:
            os._exit(1)
    try:
        for _ in range(20 * iterations):
            if counts["attempts"] >= iterations:
                break
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=real_b)
            if stat_mount(os.fsencode(name), IdKind.OLD, dir_fd=real_b).mount_id == b_mount:
                rec.mount("none", f"/proc/self/fd/{real_b}/{name}", "cgroup2")
            report = _pass(rec, path)
            mine = [o for o in report.outcomes if o.mount.mount_point.endswith(f"/b/{name}")]
            counts["attempts"] += bool(mine)
            counts["unmounted"] += sum(o.result is Result.UNMOUNTED for o in mine)
            counts["refused"] += sum(o.result is Result.REFUSED for o in mine)
            counts["removed"] += len(report.removed_dirs)
            unmounted, removed = victims.harmed()
            counts["wrong_unmounts"] += unmounted
            counts["wrong_rmdirs"] += removed
    finally:
        os.kill(flipper, signal.SIGKILL)
        os.waitpid(flipper, 0)
        if instances >= 0:
            _umount_all(f"/proc/self/fd/{instances}/{name}")
            os.rmdir(name, dir_fd=instances)
    return counts


VARIANTS = {
    "same-ns": "from the reaper's namespace",
    "second-ns": "from a second mount namespace",
    "walk": "from the reaper's namespace, directories opened by the pre-5.6 component walk",
}


@PATHS
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_racing_swaps_of_any_directory_on_the_path_never_redirect_a_reap(
    path: Path, variant: str
) -> None:
    counts = in_namespace(
        _racing_swaps, path, variant, RACE_ITERATIONS, timeout=max(600, RACE_ITERATIONS)
    )
    where = VARIANTS[variant]
    record(
        "adversarial",
        f"racing swaps of /run/calico, a or b for symlinks to look-alike trees, {where}; "
        f"{counts['victims']} victims (cgroup2 mounts, empty dirs, a tracing instance)",
        path=path.value,
        attempts=counts["attempts"],
        wrong_unmounts=counts["wrong_unmounts"],
        wrong_rmdirs=counts["wrong_rmdirs"],
        detail=(
            f"{counts['unmounted']} unmounted, {counts['refused']} refused, "
            f"{counts['removed']} mount-point dirs removed"
        ),
    )
    assert counts["wrong_unmounts"] == 0 and counts["wrong_rmdirs"] == 0, counts
    # The race really ran: every attempt made, and the swaps really got in the way sometimes.
    assert counts["attempts"] >= RACE_ITERATIONS, counts
    assert counts["unmounted"] > 0 and counts["refused"] > 0 and counts["removed"] > 0, counts


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
        path="old",
        attempts=1,
        wrong_unmounts=int(not out["host_alive"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
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
        path="old",
        attempts=1,
        wrong_unmounts=int(not out["unchanged"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
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
        path="old",
        attempts=2,
        wrong_unmounts=int(not out["decoys_kept"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
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
        path="old",
        attempts=2,
        wrong_unmounts=int(not out["decoy_kept"]),
        wrong_rmdirs=None,  # not measured here: no directory victim in this case
        detail=(
            f"4095 bytes: {'reaped' if out['near_gone'] else 'NOT reaped'}; "
            f"beyond PATH_MAX: {[r.value for _, r, _ in out['too_long']]}"  # type: ignore[union-attr]
        ),
    )
    assert out["near_gone"]
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
        "edge",
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
        "edge",
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
        "edge",
        "target under a read-only parent",
        attempts=1,
        wrong_unmounts=int(not out["parent_alive"]),
        detail="unmounted; mount-point directory kept (EROFS)",
    )
    assert out["ro"]
    assert out["results"][0] is Result.UNMOUNTED and out["left"] == 0  # type: ignore[index]
    assert out["parent_alive"] and out["dir_kept"] and out["removed"] == []
