"""`mountevents`: which fanotify events change the daemon's view and how, which source is used.

The pure rules against hand-made views, then the whole path (`mountchanges.apply_events`:
fanotify events, statmount, the rules) against the real kernel: after every step of each
scenario, the view the events built must equal a full kernel-API read of the table, mount for
mount, and the steps that should be placed without a read must have been.
"""

from __future__ import annotations

import ctypes
import os
import random
from collections.abc import Callable

import pytest
from calico_mount_reaper.mountevents import (
    Effect,
    Step,
    Use,
    Via,
    View,
    choose,
    on_attach,
    on_detach,
    settled,
)
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.mounttable import KernelTable, Reach
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import Change, MountEvent, MountEvents, Probe, Why
from calico_mount_reaper.sources.mountchanges import apply_events
from calico_mount_reaper.targets import BUILTIN_RULES, Rule

from tests.support.nsutil import in_namespace, mount

CUSTOM = Rule("custom", "/run/custom/deep", frozenset({"cgroup2"}), ("x",))
# Outside /run, which the built-in rules' read lists whole: see "hidden" below. /media is empty
# on Debian, and only this namespace's tmpfs over it is ever written to.
LAB = Rule("lab", "/media/lab/p/calico", frozenset({"cgroup2"}), ("x",))
RULES = (*BUILTIN_RULES, CUSTOM, LAB)
PREFIXES = tuple(rule.prefix for rule in RULES)
RUN = 1000  # the anchor: the mount /run/calico lives on
REACH = Reach(frozenset({RUN}), PREFIXES)


def mnt(unique_id: int, parent: int, point: str, fstype: str = "cgroup2") -> Mount:
    return Mount(
        mount_id=unique_id % 997,
        parent_id=parent % 997,
        major_minor="0:30",
        root="/",
        mount_point=point,
        options="rw",
        optional_fields=(),
        fstype=fstype,
        source="none",
        super_options="",
        index=unique_id,
        unique_id=unique_id,
        unique_parent_id=parent,
    )


CGROUP = mnt(2000, RUN, "/run/calico/cgroup")
STACKED = mnt(2001, 2000, "/run/calico/cgroup", "tmpfs")
BPF = mnt(2002, RUN, "/run/calico/bpffs", "bpf")
VIEW = View.of((CGROUP, STACKED, BPF), REACH, PREFIXES)


# ---- the pure rules ----------------------------------------------------------------------------


def test_an_attach_outside_every_prefix_costs_nothing_unless_it_sits_on_the_view() -> None:
    assert on_attach(VIEW, 3000, ("/run/netns/cni-1", RUN)).effect is Effect.NONE
    assert on_attach(VIEW, 3000, ("/run/calico2", RUN)).effect is Effect.NONE  # components
    assert on_attach(VIEW, 3000, ("/var/lib/kubelet/pods/x", 7)).effect is Effect.NONE
    assert on_attach(VIEW, 3000, None).effect is Effect.NONE  # gone again: its detach follows
    # Below a target, yet outside every prefix: nothing explains it.
    assert on_attach(VIEW, 3000, ("/elsewhere", CGROUP.unique_id)).effect is Effect.REREAD


def test_an_attach_below_a_prefix_is_placed_when_its_parent_is_one_the_read_reached() -> None:
    assert on_attach(VIEW, 3000, ("/run/calico/new", RUN)).effect is Effect.FETCH
    assert on_attach(VIEW, 3000, ("/run/calico/cgroup", STACKED.unique_id)).effect is Effect.FETCH
    assert on_attach(VIEW, 3000, ("/run/calico/bpffs/x", BPF.unique_id)).effect is Effect.FETCH
    # A parent the read never reached (a mount hidden under an over-mount of /run, say).
    unreached = on_attach(VIEW, 3000, ("/run/calico/x", 5))
    assert unreached.effect is Effect.REREAD and "did not reach" in unreached.why


def test_an_attach_over_a_prefix_rereads() -> None:
    for point in ("/run", "/", "/run/cilium", "/run/custom"):
        assert on_attach(VIEW, 3000, (point, RUN)).effect is Effect.REREAD, point
    # At a prefix is below it, not over it: a tmpfs at /run/calico is placed.
    assert on_attach(VIEW, 3000, ("/run/calico", RUN)).effect is Effect.FETCH


def test_an_attach_beneath_a_mount_of_the_view_rereads() -> None:
    # Same place, same parent as CGROUP: it went in under CGROUP, which now sits on it.
    tucked = on_attach(VIEW, 3000, ("/run/calico/cgroup", RUN))
    assert tucked.effect is Effect.REREAD and "beneath" in tucked.why


def test_an_attach_the_view_already_holds_is_nothing_unless_it_moved() -> None:
    assert on_attach(VIEW, 2002, ("/run/calico/bpffs", RUN)).effect is Effect.NONE
    assert on_attach(VIEW, 2002, ("/run/calico/moved", RUN)).effect is Effect.REREAD


def test_a_detach_drops_a_leaf_of_the_view_and_rereads_for_anything_it_cannot_see() -> None:
    assert on_detach(VIEW, 4000).effect is Effect.NONE  # never a target, nor inside one
    dropped = on_detach(VIEW, STACKED.unique_id)
    assert dropped.effect is Effect.CHANGED and dropped.view is not None
    assert dropped.view.mounts == (CGROUP, BPF)
    # Mounts sit on it: they went with it, or moved with it.
    assert on_detach(VIEW, CGROUP.unique_id).effect is Effect.REREAD
    assert on_detach(VIEW, RUN).effect is Effect.REREAD  # the mount the read lists from


def test_a_view_read_from_mountinfo_rereads_for_anything_near_a_prefix() -> None:
    blind = View.of((CGROUP,), None, PREFIXES)
    assert on_attach(blind, 3000, ("/run/calico/new", RUN)).effect is Effect.REREAD
    assert on_attach(blind, 3000, ("/run/netns/x", RUN)).effect is Effect.NONE
    assert on_detach(blind, 3000).effect is Effect.REREAD


def test_placing_keeps_creation_order() -> None:
    older = mnt(1500, RUN, "/run/calico/old")  # made long ago, moved in just now
    assert VIEW.placed(older).mounts == (older, CGROUP, STACKED, BPF)


def test_an_attach_whose_mount_leaves_in_the_same_drain_is_dropped() -> None:
    a, d = Change.ATTACHED, Change.DETACHED
    events = [MountEvent(a, 1), MountEvent(a, 2), MountEvent(d, 1), MountEvent(a, 3)]
    assert settled(events) == [MountEvent(a, 2), MountEvent(d, 1), MountEvent(a, 3)]
    # A move (a detach, then an attach) keeps the attach that ends it.
    move = [MountEvent(a, 1), MountEvent(d, 1), MountEvent(a, 1)]
    assert settled(move) == [MountEvent(d, 1), MountEvent(a, 1)]


def test_fanotify_only_on_the_kernel_api_and_only_an_old_kernel_is_not_degraded() -> None:
    ok = Probe(Why.AVAILABLE, "fanotify")
    assert choose(Use.KERNEL_API, ok).via is Via.FANOTIFY
    assert choose(Use.MOUNTINFO, None).via is Via.POLLPRI
    old = choose(Use.KERNEL_API, Probe(Why.KERNEL_TOO_OLD, "6.12"))
    assert (old.via, old.degraded) == (Via.POLLPRI, False)
    refused = choose(Use.KERNEL_API, Probe(Why.REFUSED, "seccomp"))
    assert (refused.via, refused.degraded) == (Via.POLLPRI, True)
    assert "seccomp" in refused.reason


# ---- against the real kernel -------------------------------------------------------------------

needs_mount_events = pytest.mark.skipif(
    not fanotify.probe().available, reason="this kernel has no fanotify mount events (6.15+)"
)
_libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_MOVE, MNT_DETACH = 0x1000, 0x2000, 2
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # the same on every architecture (unified table)
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_BENEATH = 1, 0x4, 0x200
AT_FDCWD = -100


def _call(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def at(fstype: str, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    mount(fstype if fstype != "cgroup2" else "none", path, fstype)


def umount(path: str, flags: int = 0) -> None:
    _call(_libc.umount2(os.fsencode(path), flags), f"umount {path}")


def bind(source: str, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    _call(_libc.mount(os.fsencode(source), os.fsencode(path), None, MS_BIND, None), "bind")


def move(source: str, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    _call(_libc.mount(os.fsencode(source), os.fsencode(path), None, MS_MOVE, None), "move")


def beneath(source: str, path: str) -> None:
    """A copy of ``source`` mounted beneath the top mount at ``path`` (MOVE_MOUNT_BENEATH)."""
    syscall = _libc.syscall
    fd = syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | os.O_CLOEXEC)
    _call(fd, "open_tree")
    try:
        flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_BENEATH
        _call(syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(path), flags), "beneath")
    finally:
        os.close(fd)


HIDDEN: dict[str, int] = {}


def over_mount_keeping_a_way_below(lower: str) -> None:
    """A tmpfs over ``lower``, with an fd kept on the directory it hides."""
    os.makedirs(lower, exist_ok=True)
    HIDDEN[lower] = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    at("tmpfs", lower)


def mount_below_the_over_mount(lower: str, child: str) -> None:
    """A cgroup2 at ``lower/child`` in the hidden directory: its parent is the mount ``lower``
    lives on, above the mount a read lists from, so no read finds it (mounttable's limit)."""
    os.makedirs(f"/proc/self/fd/{HIDDEN[lower]}/{child}")
    mount("none", f"/proc/self/fd/{HIDDEN[lower]}/{child}", "cgroup2")


def churn(path: str = "/run/netns/cni-1", pairs: int = 3) -> None:
    for _ in range(pairs):
        at("tmpfs", path)
        umount(path)


class Follower:
    """The daemon's way of keeping its view, with a re-read whenever an event asks for one."""

    def __init__(self) -> None:
        self.events = MountEvents()  # opened first: events from before the read come too
        self.table, self.truth = KernelTable(), KernelTable()
        self.view = View((), None, ())
        self.reread()

    def reread(self) -> None:
        self.view = View.of(self.table.read(RULES).mounts, self.table.reach, PREFIXES)

    def sync(self) -> Step:
        drained = self.events.drain()
        if drained.relist_needed:
            step = Step(Effect.REREAD, why="overflow")
        else:
            step = apply_events(self.view, drained.events, self.table.kernel)
        if step.effect is Effect.REREAD:
            self.reread()
        elif step.view is not None:
            self.view = step.view
        return step

    def matches_a_full_read(self) -> tuple[bool, str]:
        full = self.truth.read(RULES).mounts
        shown = [(m.unique_id, m.mount_point, m.fstype) for m in full]
        held = [(m.unique_id, m.mount_point, m.fstype) for m in self.view.mounts]
        return self.view.mounts == full, f"view {held} != read {shown}"


Op = Callable[[], None]
PLACED, REREAD, NOTHING = Effect.CHANGED, Effect.REREAD, Effect.NONE

# Each scenario: (what to do, how the events must be taken) step by step. Every step is checked
# against a full read; PLACED steps must have been applied without one.
SCENARIOS: dict[str, list[tuple[Op, Effect]]] = {
    "a target under a missing prefix": [
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: umount("/run/calico/cgroup"), PLACED),
    ],
    "a stack of three at one point, torn down top first": [
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: at("tmpfs", "/run/calico/cgroup"), PLACED),
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: at("bpf", "/run/calico/bpffs"), PLACED),
        (lambda: umount("/run/calico/cgroup"), PLACED),
        (lambda: umount("/run/calico/cgroup"), PLACED),
        (lambda: umount("/run/calico/cgroup"), PLACED),
    ],
    "a tmpfs over the prefix shadows a target, and one goes on top": [
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: at("tmpfs", "/run/calico"), PLACED),  # hides the cgroup2: still in the read
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: umount("/run/calico", MNT_DETACH), REREAD),  # it took a mount with it
    ],
    "nested and custom prefixes": [
        (lambda: at("tmpfs", "/run/custom"), REREAD),  # over /run/custom/deep
        (lambda: at("cgroup2", "/run/custom/deep/x"), PLACED),
        (lambda: at("tmpfs", "/run/cilium"), REREAD),  # over /run/cilium/cgroupv2
        (lambda: at("cgroup2", "/run/cilium/cgroupv2"), PLACED),
        (lambda: at("cgroup2", "/run/cilium/cgroupv2x"), NOTHING),  # a neighbour, not below
    ],
    "moves in, out and within": [
        (lambda: at("cgroup2", "/run/elsewhere/cg"), NOTHING),
        (lambda: move("/run/elsewhere/cg", "/run/calico/cgroup"), PLACED),
        (lambda: move("/run/calico/cgroup", "/run/calico/moved"), PLACED),
        (lambda: move("/run/calico/moved", "/run/elsewhere/back"), PLACED),
    ],
    "a bind copy of a target and a mount over /run": [
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: bind("/run/calico/cgroup", "/run/calico/copy"), PLACED),
        (lambda: bind("/run/calico/cgroup", "/run/netns/copy"), NOTHING),
        (lambda: at("tmpfs", "/run"), REREAD),  # hides everything: the read still sees below
        (lambda: at("cgroup2", "/run/calico/late"), PLACED),
    ],
    "a mount beneath a target (no event for the one reparented)": [
        (lambda: at("cgroup2", "/run/calico/cgroup"), PLACED),
        (lambda: at("tmpfs", "/run/elsewhere/src"), NOTHING),
        (lambda: beneath("/run/elsewhere/src", "/run/calico/cgroup"), REREAD),
    ],
    "a mount hidden where no read reaches": [
        (lambda: at("tmpfs", "/media"), REREAD),
        (lambda: over_mount_keeping_a_way_below("/media/lab/p"), REREAD),
        (lambda: mount_below_the_over_mount("/media/lab/p", "calico/cg"), REREAD),
        (lambda: at("cgroup2", "/media/lab/p/calico/seen"), PLACED),
    ],
    "pod churn outside every target, between target changes": [
        (lambda: churn(), NOTHING),
        (lambda: (churn(), at("cgroup2", "/run/calico/cgroup"), churn()), PLACED),
        (lambda: (at("tmpfs", "/run/netns/long"), churn("/run/netns/long/x")), NOTHING),
    ],
}


def _run_scenario(name: str) -> list[tuple[int, str, str, bool, str]]:
    os.makedirs("/run/elsewhere")
    follower = Follower()
    seen = []
    for number, (op, _) in enumerate(SCENARIOS[name]):
        op()
        step = follower.sync()
        same, shown = follower.matches_a_full_read()
        seen.append((number, step.effect.value, step.why, same, shown))
    return seen


@needs_mount_events
@pytest.mark.parametrize("name", SCENARIOS)
def test_the_view_events_build_equals_a_full_read_at_every_step(name: str) -> None:
    for number, effect, why, same, shown in in_namespace(_run_scenario, name):
        expected = SCENARIOS[name][number][1]
        assert same, f"step {number}: {shown}"
        assert effect == expected.value, f"step {number}: {effect} ({why}), not {expected}"


# A random walk over the same kinds of change, several at a time between drains (so attaches
# and detaches of one mount share a drain), checked against a full read after every drain.
POINTS = ("/run/calico/cgroup", "/run/calico", "/run/calico/cgroup/sub", "/run/calico/bpffs")
ELSEWHERE = ("/run/elsewhere/a", "/run/netns/cni-1", "/run/custom/deep/x")


def _random_change(rng: random.Random) -> None:
    point = rng.choice(POINTS + ELSEWHERE)
    kind = rng.randrange(10)
    try:
        if kind < 4:
            at(rng.choice(("cgroup2", "tmpfs", "bpf")), point)
        elif kind < 7:
            umount(point, rng.choice((0, MNT_DETACH)))
        elif kind == 7:
            move(point, rng.choice(POINTS + ELSEWHERE))
        elif kind == 8:
            bind(point, rng.choice(POINTS + ELSEWHERE))
        else:
            churn(pairs=rng.randrange(1, 4))
    except OSError:
        pass  # EBUSY, EINVAL, ENOENT, a move into itself: the table stays as it was


def _random_walk(seed: int, drains: int) -> tuple[int, list[str]]:
    os.makedirs("/run/elsewhere")
    rng = random.Random(seed)
    follower = Follower()
    placed, wrong = 0, []
    for i in range(drains):
        for _ in range(rng.randrange(1, 4)):
            _random_change(rng)
        placed += follower.sync().effect is Effect.CHANGED
        same, shown = follower.matches_a_full_read()
        if not same:
            wrong.append(f"seed {seed}, drain {i}: {shown}")
            follower.reread()
    return placed, wrong


@needs_mount_events
@pytest.mark.parametrize("seed", range(4))
def test_a_random_walk_of_changes_keeps_the_view_equal_to_a_full_read(seed: int) -> None:
    placed, wrong = in_namespace(_random_walk, seed, 150)
    assert not wrong, "\n".join(wrong[:5])
    assert placed > 20  # most drains were placed without a read: the test compared something
