"""The mount-table watch against real mounts in a private mount namespace, and its pure helpers."""

from __future__ import annotations

import ctypes
import os
import selectors
import time
from dataclasses import replace

from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.schedule import Coalescer
from calico_mount_reaper.sources.mountinfo import MountTableWatch, diff
from hypothesis import given
from hypothesis import strategies as st

from tests.support.nsutil import enter_private_namespace, in_namespace, mount

_libc = ctypes.CDLL(None, use_errno=True)


def umount(path: str) -> None:
    if _libc.umount2(os.fsencode(path), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounted_at(watch: MountTableWatch, path: str) -> list[Mount]:
    return [m for m in watch.read().mounts if m.mount_point == path]


# --- real kernel ------------------------------------------------------------------------------


def _wake_after_mount() -> tuple[float, bool, int]:
    os.mkdir("/run/x")
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        assert not mounted_at(watch, "/run/x")
        mount("tmpfs", "/run/x", "tmpfs")
        start = time.monotonic()
        woke = sel.select(timeout=5)
        elapsed = time.monotonic() - start
        seen = bool(mounted_at(watch, "/run/x"))
        # Read and re-armed: with nothing new, the watch must stay quiet (no spinning on POLLIN).
        after = len(sel.select(timeout=0.2))
        return elapsed if woke else -1.0, seen, after


def test_mount_wakes_the_selector_promptly_and_read_sees_it() -> None:
    elapsed, seen, after = in_namespace(_wake_after_mount)
    assert 0 <= elapsed < 1.0
    assert seen
    assert after == 0


def _idle() -> tuple[int, int, bool]:
    fds = os.listdir("/proc/self/fd")
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        before_read = len(sel.select(timeout=0.3))
        watch.read()
        after_read = len(sel.select(timeout=0.3))
    return before_read, after_read, os.listdir("/proc/self/fd") == fds


def test_idle_table_never_wakes_and_close_leaks_nothing() -> None:
    assert in_namespace(_idle) == (0, 0, True)


def _paused() -> tuple[int, bool, int]:
    os.mkdir("/run/p")
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        watch.pause()
        mount("tmpfs", "/run/p", "tmpfs")
        while_paused = len(sel.select(timeout=0.2))
        seen = bool(mounted_at(watch, "/run/p"))  # read() re-arms and covers the change
        return while_paused, seen, len(sel.select(timeout=0.2))


def test_pause_holds_wakeups_but_the_next_read_sees_the_change() -> None:
    assert in_namespace(_paused) == (0, True, 0)


def _rearm_before_read() -> bool:
    os.mkdir("/run/r")
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        watch.pause()
        watch.read()
        mount("tmpfs", "/run/r", "tmpfs")  # after the read: must wake
        return bool(sel.select(timeout=2))


def test_change_after_a_read_still_wakes() -> None:
    assert in_namespace(_rearm_before_read)


def _other_namespace_is_invisible() -> int:
    os.mkdir("/run/o")
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        # A grandchild in yet another private namespace mounts; our table does not change.
        pid = os.fork()
        if pid == 0:
            try:
                enter_private_namespace()
                os.mkdir("/run/o")
                mount("tmpfs", "/run/o", "tmpfs")
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        return len(sel.select(timeout=0.3))


def test_mounts_in_another_namespace_do_not_wake() -> None:
    assert in_namespace(_other_namespace_is_invisible) == 0


STORM_PAIRS = 2000
STORM_INTERVAL = 0.1


def _storm() -> dict[str, float]:
    os.mkdir("/run/storm")
    done_r, done_w = os.pipe()
    with MountTableWatch() as watch, selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ, "mounts")
        sel.register(done_r, selectors.EVENT_READ, "done")
        pid = os.fork()
        if pid == 0:  # same namespace: the storm is visible to the watch
            status = 1
            try:
                os.close(done_r)
                for _ in range(STORM_PAIRS):
                    mount("tmpfs", "/run/storm", "tmpfs")
                    umount("/run/storm")
                status = 0
            finally:
                os._exit(status)
        os.close(done_w)
        sched = Coalescer(interval=STORM_INTERVAL)
        table = watch.read()
        wakes = reads = 0
        storm_over = False
        start = time.monotonic()
        # The daemon's loop in miniature: wake, pause, re-read when due, until quiet.
        while not storm_over or sched.due is not None:
            now = time.monotonic()
            timeout = None if sched.due is None else max(0.0, sched.due - now)
            for key, _ in sel.select(timeout if timeout is not None else 10):
                if key.data == "done":
                    sel.unregister(done_r)
                    storm_over = True
                else:
                    wakes += 1
                    watch.pause()
                    sched = sched.changed(time.monotonic())
            now = time.monotonic()
            if sched.due is not None and now >= sched.due:
                table = watch.read()
                reads += 1
                sched = sched.reread(now)
        duration = time.monotonic() - start
        os.waitpid(pid, 0)
        os.close(done_r)
        final_has_storm = any(m.mount_point == "/run/storm" for m in table.mounts)
        return {"wakes": wakes, "reads": reads, "duration": duration, "left": final_has_storm}


def test_mount_storm_gives_bounded_wakeups_and_reads() -> None:
    r = in_namespace(_storm)
    bound = r["duration"] / STORM_INTERVAL + 2
    assert r["reads"] <= bound, r
    assert r["wakes"] <= r["reads"] + 1, r
    assert r["wakes"] < STORM_PAIRS / 4, r  # never once per event
    assert not r["left"], r


def _remount_between_reads() -> tuple[list[str], list[str], bool]:
    for d in ("/run/a", "/run/b"):
        os.mkdir(d)
    with MountTableWatch() as watch:
        mount("tmpfs", "/run/a", "tmpfs")
        mount("tmpfs", "/run/b", "tmpfs")
        # Mount IDs are allocated machine-wide, lowest free first: a mount elsewhere on the
        # machine (another test, a container) can take the freed ID. Try until it is reused.
        for _ in range(50):
            old = watch.read().mounts
            umount("/run/a")
            mount("tmpfs", "/run/a", "tmpfs")
            new = watch.read().mounts
            reused = {m.mount_id for m in old if m.mount_point == "/run/a"} == {
                m.mount_id for m in new if m.mount_point == "/run/a"
            }
            if reused:
                break
    appeared, gone = diff(old, new)
    return [m.mount_point for m in appeared], [m.mount_point for m in gone], reused


def test_diff_reports_a_remount_between_two_reads() -> None:
    appeared, gone, reused = in_namespace(_remount_between_reads)
    assert appeared == ["/run/a"]
    assert gone == ["/run/a"]
    assert reused  # the case diff exists for really happens on this kernel


# --- diff, pure -------------------------------------------------------------------------------


def mk(mount_id: int, path: str, source: str = "none", parent: int = 1) -> Mount:
    return Mount(
        mount_id=mount_id,
        parent_id=parent,
        major_minor="0:42",
        root="/",
        mount_point=path,
        options="rw",
        optional_fields=(),
        fstype="cgroup2",
        source=source,
        super_options="rw",
    )


def test_diff_examples() -> None:
    a, b, x = mk(2, "/run/a"), mk(3, "/run/b"), mk(4, "/run/calico/cgroup")
    assert diff([a, b], [a, b]) == ((), ())
    assert diff([a], [a, b]) == ((b,), ())
    assert diff([a, b], [b]) == ((), (a,))
    # Options, propagation and line index change without making it another mount.
    a2 = replace(a, options="ro", optional_fields=("shared:7",), index=5)
    assert diff([a, b], [a2, b]) == ((), ())
    # x unmounted and mounted again with the same ID: listed after b now, so it is new.
    x2 = replace(x, index=1)
    assert diff([x, b], [b, x2]) == ((x2,), (x,))
    # Same, but x was already the newest: indistinguishable, and documented as such.
    assert diff([b, x], [b, x2]) == ((), ())


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Mount], list[Mount], set[int], set[int]]:
    """A table, then random mounts/unmounts as the kernel does them: lowest free ID, newest last.

    Returns (old, new, serials gone, serials appeared): the ground truth diff should find.
    Every mount carries a unique serial in ``super_options`` (not part of its identity).
    """
    paths = ["/run/a", "/run/b", "/run/calico/cgroup"]
    serial = 0
    table: list[Mount] = []
    old: list[Mount] = []

    def step(do_mount: bool, choice: int, same_source: bool) -> None:
        nonlocal serial
        if do_mount or not table:
            used = {m.mount_id for m in table}
            mount_id = next(i for i in range(10, 10 + len(table) + 1) if i not in used)
            serial += 1
            source = "none" if same_source else f"src{serial}"
            fresh = mk(mount_id, paths[choice % 3], source)
            table.append(replace(fresh, super_options=str(serial)))
        else:
            del table[choice % len(table)]

    ops = st.tuples(st.booleans(), st.integers(0, 50), st.booleans())
    for op in draw(st.lists(ops, max_size=12)):
        step(*op)
    old = list(table)
    for op in draw(st.lists(ops, max_size=12)):
        step(*op)
    new = [replace(m, index=i) for i, m in enumerate(table)]
    old_serials = {m.super_options for m in old}
    new_serials = {m.super_options for m in new}
    gone = {int(s) for s in old_serials - new_serials}
    appeared = {int(s) for s in new_serials - old_serials}
    return old, new, gone, appeared


@given(histories())
def test_diff_is_consistent(h: tuple[list[Mount], list[Mount], set[int], set[int]]) -> None:
    old, new, _, _ = h
    appeared, gone = diff(old, new)
    assert set(appeared) <= set(new) and set(gone) <= set(old)
    # What is neither gone nor appeared is the same mounts, in the same order.
    survivors_old = [m.mount_id for m in old if m not in gone]
    survivors_new = [m.mount_id for m in new if m not in appeared]
    assert survivors_old == survivors_new
    # A mount ID that is only on one side is always reported.
    assert {m.mount_id for m in new} - {m.mount_id for m in old} <= {m.mount_id for m in appeared}
    assert {m.mount_id for m in old} - {m.mount_id for m in new} <= {m.mount_id for m in gone}
    assert diff(old, old) == ((), ())


@given(histories())
def test_diff_matches_ground_truth_when_mounts_can_be_told_apart(
    h: tuple[list[Mount], list[Mount], set[int], set[int]],
) -> None:
    old, new, true_gone, true_appeared = h
    appeared, gone = diff(old, new)
    found_gone = {int(m.super_options) for m in gone}
    found_appeared = {int(m.super_options) for m in appeared}
    distinguishable = all(m.source != "none" for m in [*old, *new])
    if distinguishable:
        assert (found_gone, found_appeared) == (true_gone, true_appeared)
    else:
        # Identical re-creations may hide, but diff never invents a change that did not happen.
        assert found_gone <= true_gone and found_appeared <= true_appeared
        assert len(true_gone) - len(found_gone) == len(true_appeared) - len(found_appeared)


# --- Coalescer, pure --------------------------------------------------------------------------


def simulate(events: list[float], interval: float) -> list[float]:
    """Drive Coalescer the way the daemon does: events wake it, a read happens when due."""
    sched = Coalescer(interval=interval)
    reads: list[float] = []
    pending = sorted(events)
    while pending or sched.due is not None:
        if sched.due is not None and (not pending or sched.due <= pending[0]):
            reads.append(sched.due)
            sched = sched.reread(sched.due)
        else:
            sched = sched.changed(pending.pop(0))
    return reads


event_times = st.lists(st.floats(0, 10, allow_nan=False), max_size=300)
intervals = st.floats(0.01, 2.0)


@given(event_times, intervals)
def test_rereads_are_spaced_by_the_interval(events: list[float], interval: float) -> None:
    reads = simulate(events, interval)
    assert all(b - a >= interval - 1e-9 for a, b in zip(reads, reads[1:]))
    span = (max(events) - min(events)) if events else 0.0
    assert len(reads) <= span / interval + 2


@given(event_times, intervals)
def test_every_event_is_read_within_the_interval(events: list[float], interval: float) -> None:
    reads = simulate(events, interval)
    for t in events:
        assert any(t <= r <= t + interval + 1e-9 for r in reads)


def test_first_event_after_quiet_is_read_at_once_and_a_burst_once_more() -> None:
    assert simulate([5.0], 0.25) == [5.0]
    assert simulate([5.0 + i / 1000 for i in range(1000)], 0.25) == [5.0, 5.25, 5.5, 5.75, 6.0]
