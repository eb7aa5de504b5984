"""How the daemon hears of mount changes, and what each one does to its view: pure rules.

Two sources can wake the daemon when the mount table changes:

- ``fanotify`` (Linux 6.15+, `sources.fanotify`): each event names the mount by its unique ID,
  so one statmount tells where it is. Pod churn elsewhere on the node (container rootfs, netns,
  secrets, each a mount or several) costs one small statmount per attach and nothing per
  detach. A change under a rule prefix updates the view directly (`on_attach`, `on_detach`),
  so a new target is in the view, and journaled, two statmounts after its event.
- ``pollpri`` (`sources.mountinfo`): POLLPRI on mountinfo only says "something changed", so
  every change anywhere costs a coalesced re-read.

fanotify is used only with the kernel-API mount table: it needs statmount to place an attach,
and a node whose sandbox refuses statmount, or a forced ``mount_api = "mountinfo"``, keeps the
whole old path (`choose`).

Placing a mount without a read is only right if the read would have found it too. A read lists
from the mount each prefix lives on (`mounttable`), so it finds a mount attached below a prefix
exactly when the mount's parent is one it reached: a mount of the view, or one of the
`mounttable.Reach` anchors above the prefixes. Anything else (a mount over a prefix, a parent
the read never reached, a detach of a mount with mounts on it, which may be a move that took
them along) is not guessed at: it costs one re-read of the target subtrees, as every event did
before. So is an overflow of the queue, or an event that cannot be decoded (`sources.fanotify`).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.mounttable import Reach, covers
from calico_mount_reaper.sources.fanotify import Change, MountEvent, Probe, Why
from calico_mount_reaper.targets import is_within, normalize_path


class Via(enum.Enum):
    """What wakes the daemon on a mount change (shown in STARTED and STATUS=)."""

    FANOTIFY = "fanotify"
    POLLPRI = "pollpri"


class Use(enum.Enum):
    """Whether the kernel-API table can carry fanotify events (`choose`'s first question)."""

    KERNEL_API = "kernel-api"  # statmount works: fanotify may be tried
    MOUNTINFO = "mountinfo"  # forced, too old or refused: POLLPRI, whatever fanotify could do


@dataclass(frozen=True)
class Choice:
    via: Via
    reason: str  # for STARTED: why this source
    degraded: bool = False  # the kernel has fanotify mount events, but they were refused


def choose(table: Use, probe: Probe | None) -> Choice:
    """The source to register, given the table's back-end and fanotify's probe (None: not
    tried, because the table reads mountinfo)."""
    if table is Use.MOUNTINFO or probe is None:
        return Choice(Via.POLLPRI, "mountinfo POLLPRI (the mount table is read from mountinfo)")
    if probe.available:
        return Choice(Via.FANOTIFY, probe.message)
    # An old kernel is not degraded, just old (Debian 13's 6.12 has statmount but not this).
    old = probe.why is Why.KERNEL_TOO_OLD
    return Choice(Via.POLLPRI, f"mountinfo POLLPRI: {probe.message}", degraded=not old)


class Effect(enum.Enum):
    NONE = "none"  # nothing a pass would see has changed: the view stands
    CHANGED = "changed"  # the event says exactly how the view changed: `Step.view`
    FETCH = "fetch"  # an attach the view must take in: its whole record is needed (`placed`)
    REREAD = "reread"  # only a re-read of the target subtrees can tell: `Step.why`


@dataclass(frozen=True)
class View:
    """The daemon's mounts under the rule prefixes, as the events update them.

    ``reach`` is None when the view came from mountinfo (no unique IDs to match events by):
    then every event that can touch a target asks for a re-read.
    """

    mounts: tuple[Mount, ...]  # oldest first, as a read returns them (index: the unique ID)
    reach: Reach | None
    prefixes: tuple[str, ...]  # the rules' prefixes, normalized

    @classmethod
    def of(cls, mounts: Sequence[Mount], reach: Reach | None, prefixes: Iterable[str]) -> View:
        return cls(tuple(mounts), reach, tuple(prefixes))

    @functools.cached_property
    def held(self) -> frozenset[int]:
        """The unique IDs of the view's mounts (asked once or twice per event: kept)."""
        return frozenset(m.unique_id for m in self.mounts if m.unique_id is not None)

    def placed(self, mount: Mount) -> View:
        """The view with ``mount`` in it, in creation order."""
        mounts = sorted((*self.mounts, mount), key=lambda m: m.index)
        return View(tuple(mounts), self.reach, self.prefixes)

    def without(self, unique_id: int) -> View:
        mounts = tuple(m for m in self.mounts if m.unique_id != unique_id)
        return View(mounts, self.reach, self.prefixes)


@dataclass(frozen=True)
class Step:
    effect: Effect
    view: View | None = None  # CHANGED: the view after the event
    why: str = ""  # REREAD: why the event could not be applied, for the log


NONE = Step(Effect.NONE)
FETCH = Step(Effect.FETCH)


def settled(events: Sequence[MountEvent]) -> list[MountEvent]:
    """The events of one drain that still need a look: an attach is dropped when its mount is
    detached later in the same drain. Wherever it was, it has left that place since, and the
    later events say what became of it (gone, or moved on: a move is a detach and an attach).
    A short-lived mount, which pod churn is made of, then costs no statmount at all; a mount
    attached onto the dropped one finds its parent unknown and asks for a re-read.
    """
    last_detach = {e.mount_id: i for i, e in enumerate(events) if e.change is Change.DETACHED}
    return [
        e
        for i, e in enumerate(events)
        if e.change is Change.DETACHED or last_detach.get(e.mount_id, -1) < i
    ]


def on_attach(view: View, mount_id: int, where: tuple[str, int] | None) -> Step:
    """What an attach means for the view. ``where``: the mount point and the parent's unique ID
    statmount gives now, or None when the mount is gone again (its detach follows, and the view
    never held it). FETCH: the view must take it in; fetch its record, ask again with the
    record's own mount point and parent (it may have moved since), and add it (`View.placed`).
    """
    if where is None:
        return NONE
    mount_point, parent = where
    reach = view.reach
    spellings = view.prefixes if reach is None else reach.spellings
    if any(covers(mount_point, p) for p in spellings):
        # It hides or reveals everything below a prefix, and it can move the mount a read
        # lists from: the anchors themselves change.
        return Step(Effect.REREAD, why=f"a mount over a prefix at {mount_point}")
    # The kernel's mount points are canonical already: only /var/run needs folding.
    path = normalize_path(mount_point) if mount_point.startswith("/var/run") else mount_point
    inside = any(is_within(path, p) for p in view.prefixes)
    if reach is None:
        return Step(Effect.REREAD, why="the view holds no mount IDs") if inside else NONE
    held = view.held
    if mount_id in held:
        known = next(m for m in view.mounts if m.unique_id == mount_id)
        if (known.mount_point, known.unique_parent_id) == (mount_point, parent):
            return NONE  # an event from before the read that already found it
        return Step(Effect.REREAD, why=f"mount {mount_id} of the view moved to {mount_point}")
    if not inside:
        if parent in held:  # a mount below a target, yet outside every prefix
            return Step(Effect.REREAD, why=f"{mount_point} is on a mount of the view")
        return NONE
    if parent in held or parent in reach.anchors:
        if any(m.mount_point == mount_point and m.unique_parent_id == parent for m in view.mounts):
            # It went in under a mount the view holds (propagation tucks a copy beneath; so
            # does MOVE_MOUNT_BENEATH), and that mount now sits on it: a parent changed, and
            # no event says so.
            return Step(Effect.REREAD, why=f"a mount went in beneath another at {mount_point}")
        return FETCH
    return Step(Effect.REREAD, why=f"{mount_point} is on a mount the last read did not reach")


def on_detach(view: View, mount_id: int) -> Step:
    """What a detach means for the view: a mount it holds is gone, nothing, or a re-read."""
    reach = view.reach
    if reach is None:
        return Step(Effect.REREAD, why="the view holds no mount IDs")
    if mount_id in reach.anchors:
        return Step(Effect.REREAD, why=f"mount {mount_id} above a prefix went")
    if mount_id not in view.held:
        return NONE  # never a target, nor inside one
    if any(m.unique_parent_id == mount_id for m in view.mounts):
        # Its mounts went with it (a lazy unmount: their own events follow) or moved with it (a
        # move: their new places come in no event). Only a read tells which.
        return Step(Effect.REREAD, why=f"mount {mount_id} of the view went with mounts on it")
    return Step(Effect.CHANGED, view.without(mount_id))
