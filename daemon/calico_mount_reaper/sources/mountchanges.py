"""Mount changes as the daemon hears them: fanotify events applied to its view, or POLLPRI.

The shell around `mountevents`: it opens the source `mountevents.choose` picks, turns each
fanotify wake into one `Wake` (what the daemon must do), and keeps the mountinfo watch for
the fallback and for reading mountinfo when a kernel-API walk fails.
"""

from __future__ import annotations

import enum
import errno
import logging
import selectors
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from calico_mount_reaper import mountevents, mounttable
from calico_mount_reaper.journal import LOGGER_NAME
from calico_mount_reaper.mountevents import FETCH, NONE, Effect, Step, Use, Via, View
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import Change, MountEvent, MountEvents
from calico_mount_reaper.sources.mountinfo import MountTableWatch
from calico_mount_reaper.targets import Rule

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    from calico_mount_reaper.statmount import Kernel


class Do(enum.Enum):
    NOTHING = "nothing"  # no event changed what a pass sees
    UPDATE = "update"  # the events said exactly what changed: `Wake.mounts` (journal it now)
    REREAD = "reread"  # an event can have changed it in ways only a re-read tells (coalesced)
    FALL_BACK = "fall-back"  # statmount was refused: mountinfo and POLLPRI from now on


@dataclass(frozen=True)
class Wake:
    do: Do
    why: str = ""  # for the log, when it is worth a line
    mounts: tuple[Mount, ...] = ()  # UPDATE: the view after the events


Handler = Callable[[float], None]


class Opener(Protocol):
    """How to open fanotify's watch and probe it (the daemon's `Sources`)."""

    @property
    def mount_events(self) -> Callable[[], MountEvents]: ...

    @property
    def fanotify_probe(self) -> Callable[[], fanotify.Probe]: ...


class MountChanges:
    """Keeps the right source registered in the daemon's selector (`follow` after each read
    of the table), and turns each fanotify wake into one `Wake` (`drain`).

    ``on_wake`` is the daemon's handler for (POLLPRI, fanotify); ``degraded`` its DEGRADED
    entry (message, reason, result), said once per switch that refused fanotify.
    """

    def __init__(
        self,
        watch: MountTableWatch,
        selector: selectors.BaseSelector,
        on_wake: tuple[Handler, Handler],
        degraded: Callable[[str, str, str], None],
        sources: Opener,
    ) -> None:
        self.watch, self.selector, self.on_wake, self.degraded = watch, selector, on_wake, degraded
        self.log = logging.getLogger(LOGGER_NAME)
        self._open_events, self._probe = sources.mount_events, sources.fanotify_probe
        self.events: MountEvents | None = None
        self.table: mounttable.MountTable | None = None  # the back-end `switch` was given
        self._kernel: Kernel | None = None
        self.choice = mountevents.choose(Use.MOUNTINFO, None)
        self._reach: mounttable.Reach | None = None  # of the read the daemon's view came from
        self._prefixes: tuple[str, ...] = ()  # of the rules that read was made with
        self._view = View((), None, ())  # the last view events were applied to

    @property
    def source(self) -> MountEvents | MountTableWatch:
        return self.watch if self.events is None else self.events

    @property
    def fields(self) -> dict[str, Any]:
        """For the journal (MOUNT_EVENTS=)."""
        return {"mount_events": self.choice.via.value}

    def __str__(self) -> str:
        return f"mount events via {self.choice.via.value}: {self.choice.reason}"

    def follow(self, mounts: mounttable.WatchedTable, rules: Sequence[Rule]) -> Via:
        """After each read of ``mounts`` (with ``rules``): register the source for its back-end,
        unless already done for it, and apply later events to the view that read gave."""
        self._reach, self._prefixes = mounts.reach, tuple(rule.prefix for rule in rules)
        table = mounts.choice.table
        if table is not self.table:
            self.selector.unregister(self.source)
            choice = self.switch(table)
            on_wake = self.on_wake[0] if choice.via is Via.POLLPRI else self.on_wake[1]
            self.selector.register(self.source, selectors.EVENT_READ, on_wake)
            if choice.degraded:
                self.degraded(choice.reason, choice.reason, "no-fanotify")
        if self.events is not None:
            self.watch.pause()  # a read of the table re-arms POLLPRI, which fanotify replaces
        return self.choice.via

    def switch(self, table: mounttable.MountTable) -> mountevents.Choice:
        """Open the source for this table's back-end (unregister `source` first)."""
        self._close_events()
        self.table = table
        kernel_api = isinstance(table, mounttable.KernelTable)
        use = Use.KERNEL_API if kernel_api else Use.MOUNTINFO
        choice = mountevents.choose(use, self._probe() if kernel_api else None)
        if choice.via is Via.FANOTIFY:
            try:
                self.events = self._open_events()
            except OSError as exc:  # refused between the probe and now (a group limit)
                choice = mountevents.choose(use, fanotify.explain(exc))
        if self.events is not None:
            assert isinstance(table, mounttable.KernelTable)
            # The watch stays open to read mountinfo when a walk fails; left armed, every
            # mount on the node would still wake its epoll.
            self._kernel = table.kernel
            self.watch.pause()
        self.choice = choice
        return choice

    def drain(self, view: Sequence[Mount], reread_pending: bool) -> Wake:
        """What the queued events mean for ``view`` (the mounts the daemon holds, as the last
        read or the last UPDATE gave them); why is logged when worth a line. With a re-read
        already pending, that read sees every change before it: the events are only drained.
        A refused statmount asks for a re-read too: the read meets the refusal itself, falls
        back and says so."""
        assert self.events is not None and self._kernel is not None  # registered while open
        drained = self.events.drain()
        if reread_pending:
            return Wake(Do.NOTHING)
        if drained.relist_needed:
            lost = "overflowed" if drained.overflow else f"{drained.undecodable} not understood"
            wake = Wake(Do.REREAD, f"fanotify mount events {lost}: re-reading the mount table")
        elif drained.events:
            wake = self._apply(self._view_of(view), drained.events)
        else:
            return Wake(Do.NOTHING)
        if wake.why:
            self.log.info("%s", wake.why)
        return wake

    def _view_of(self, mounts: Sequence[Mount]) -> View:
        """The `View` of the daemon's mounts, built again only when they or the read changed."""
        if self._view.mounts is not mounts or self._view.reach is not self._reach:
            self._view = View.of(mounts, self._reach, self._prefixes)
        return self._view

    def _apply(self, view: View, events: Sequence[MountEvent]) -> Wake:
        assert self._kernel is not None
        try:
            step = apply_events(view, events, self._kernel)
        except OSError as exc:
            if exc.errno in mounttable.REFUSED:
                return Wake(Do.FALL_BACK, f"statmount refused ({exc})")
            return Wake(Do.REREAD, f"cannot place an attached mount ({exc}); re-reading")
        if step.effect is Effect.REREAD:
            # Routine (a mount over a prefix, say): a line for whoever debugs, not the journal.
            self.log.debug("%s: re-reading the target subtrees", step.why)
            return Wake(Do.REREAD)
        if step.view is None:
            return Wake(Do.NOTHING)
        self._view = step.view
        return Wake(Do.UPDATE, mounts=step.view.mounts)

    def _close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events, self._kernel = None, None

    def close(self) -> None:
        self._close_events()
        self.watch.close()


def apply_events(view: View, events: Sequence[MountEvent], kernel: Kernel) -> Step:
    """One drain's events applied to ``view`` in order: the view after them (CHANGED), NONE,
    or the first REREAD. Raises the kernel's OSError (`statmount.ApiError`) for the caller."""
    start = view
    for event in mountevents.settled(events):
        step = apply_event(view, event, kernel)
        if step.effect is Effect.REREAD:
            return step
        if step.view is not None:
            view = step.view
    return NONE if view is start else Step(Effect.CHANGED, view)


def apply_event(view: View, event: MountEvent, kernel: Kernel) -> Step:
    """One event applied to ``view``: at most two statmounts, the second only for a mount
    the view takes in."""
    if event.change is Change.DETACHED:
        return mountevents.on_detach(view, event.mount_id)
    step = mountevents.on_attach(view, event.mount_id, kernel.locate(event.mount_id))
    if step is not FETCH:
        return step
    from calico_mount_reaper.statmount import ApiError

    try:
        record = kernel.statmount(event.mount_id)
    except ApiError as exc:
        if exc.errno == errno.ENOENT:
            return NONE  # gone since it was located: its detach follows
        raise
    # Judged again where its record says it is: it may have moved since it was located.
    where = (record.mount_point, record.unique_parent_id)
    step = mountevents.on_attach(view, event.mount_id, where)
    return Step(Effect.CHANGED, view.placed(mounttable.to_mount(record))) if step is FETCH else step
