"""Mount changes as the daemon hears them: fanotify events placed by statmount, or POLLPRI.

The shell around `mountevents`: it opens the source `mountevents.choose` picks, turns each
fanotify wake into one `Wake` (what the daemon must do), and keeps the mountinfo watch for
the fallback and for reading mountinfo when a kernel-API walk fails.
"""

from __future__ import annotations

import enum
import errno
import logging
import selectors
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from calico_mount_reaper import mountevents, mounttable
from calico_mount_reaper.journal import LOGGER_NAME
from calico_mount_reaper.mountevents import Effect, Use, Via
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import Change, MountEvents
from calico_mount_reaper.sources.mountinfo import MountTableWatch
from calico_mount_reaper.targets import Rule

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    from calico_mount_reaper.statmount import Kernel


class Do(enum.Enum):
    NOTHING = "nothing"  # no event could change what a pass sees
    REREAD = "reread"  # an event can have: re-read the target subtrees (coalesced)
    FALL_BACK = "fall-back"  # statmount was refused: mountinfo and POLLPRI from now on


@dataclass(frozen=True)
class Wake:
    do: Do
    why: str = ""  # for the log, when it is worth a line


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

    @property
    def source(self) -> MountEvents | MountTableWatch:
        return self.watch if self.events is None else self.events

    @property
    def fields(self) -> dict[str, Any]:
        """For the journal (MOUNT_EVENTS=)."""
        return {"mount_events": self.choice.via.value}

    def __str__(self) -> str:
        return f"mount events via {self.choice.via.value}: {self.choice.reason}"

    def follow(self, table: mounttable.MountTable) -> Via:
        """Register the source for ``table``'s back-end, unless already done for it."""
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

    def drain(self, held: Iterable[Mount], rules: Iterable[Rule], reread_pending: bool) -> bool:
        """Whether the queued events call for a re-read (why is logged when worth a line).
        ``held``: the mounts in the daemon's view. With a re-read already pending, that read
        sees every change before it: the events are only drained. A refused statmount asks
        for a re-read too: the read meets the refusal itself, falls back and says so."""
        wake = self._wake(held, rules, reread_pending)
        if wake.why:
            self.log.info("%s", wake.why)
        return wake.do is not Do.NOTHING

    def _wake(self, held: Iterable[Mount], rules: Iterable[Rule], reread_pending: bool) -> Wake:
        assert self.events is not None and self._kernel is not None  # registered while open
        drained = self.events.drain()
        if reread_pending:
            return Wake(Do.NOTHING)
        if drained.relist_needed:
            lost = "overflowed" if drained.overflow else f"{drained.undecodable} not understood"
            return Wake(Do.REREAD, f"fanotify mount events {lost}: re-reading the mount table")
        view = frozenset(m.unique_id for m in held if m.unique_id is not None)
        prefixes = [rule.prefix for rule in rules]
        for event in drained.events:
            try:
                where = None if event.change is Change.DETACHED else self._place(event.mount_id)
            except OSError as exc:
                if exc.errno in mounttable.REFUSED:
                    return Wake(Do.FALL_BACK, f"statmount refused ({exc})")
                return Wake(Do.REREAD, f"cannot place mount {event.mount_id}: {exc}; re-reading")
            if mountevents.effect(event, view, where, prefixes) is Effect.REREAD:
                return Wake(Do.REREAD)
        return Wake(Do.NOTHING)

    def _place(self, mount_id: int) -> str | None:
        """Where an attached mount is now (one statmount), or None if it is already gone."""
        from calico_mount_reaper.statmount import ApiError

        assert self._kernel is not None
        try:
            return self._kernel.statmount(mount_id).mount_point
        except ApiError as exc:
            if exc.errno == errno.ENOENT:
                return None  # detached again: its detach follows, and the view never held it
            raise

    def _close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events, self._kernel = None, None

    def close(self) -> None:
        self._close_events()
        self.watch.close()
