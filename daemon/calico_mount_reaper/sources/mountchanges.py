"""Mount changes as the daemon hears them: fanotify events placed by statmount, or POLLPRI.

The shell around `mountevents`: it opens the source `mountevents.choose` picks, turns each
fanotify wake into one `Wake` (what the daemon must do), and keeps the mountinfo watch for
the fallback and for reading mountinfo when a kernel-API walk fails.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from calico_mount_reaper import mountevents, mounttable
from calico_mount_reaper.mountevents import Effect, Use, Via
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import Change, MountEvents
from calico_mount_reaper.sources.mountinfo import MountTableWatch

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


class MountChanges:
    """`source` is what to register (it changes on `switch`); `drain` on each fanotify wake."""

    def __init__(
        self,
        watch: MountTableWatch,
        open_events: Callable[[], MountEvents] = MountEvents,
        probe: Callable[[], fanotify.Probe] = fanotify.probe,
    ) -> None:
        self.watch, self._open_events, self._probe = watch, open_events, probe
        self.events: MountEvents | None = None
        self._kernel: Kernel | None = None
        self.choice = mountevents.choose(Use.MOUNTINFO, None)

    @property
    def source(self) -> MountEvents | MountTableWatch:
        return self.watch if self.events is None else self.events

    def switch(self, table: mounttable.MountTable) -> mountevents.Choice:
        """Open the source for this table's back-end (unregister `source` first)."""
        self._close_events()
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
            self._kernel = table.kernel
            # The watch stays open to read mountinfo when a walk fails; left armed, every
            # mount on the node would still wake its epoll.
            self.watch.pause()
        self.choice = choice
        return choice

    def drain(self, view: frozenset[int], prefixes: Iterable[str], reread_pending: bool) -> Wake:
        """What the queued events ask for. ``view``: unique IDs of the mounts the daemon
        holds. With a re-read already pending, that read sees every change before it: the
        events are only drained."""
        assert self.events is not None and self._kernel is not None  # registered while open
        drained = self.events.drain()
        if reread_pending:
            return Wake(Do.NOTHING)
        if drained.relist_needed:
            lost = "overflowed" if drained.overflow else f"{drained.undecodable} not understood"
            return Wake(Do.REREAD, f"fanotify mount events {lost}: re-reading the mount table")
        prefixes = list(prefixes)
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
