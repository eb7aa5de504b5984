"""Give planned Mounts their 64-bit unique IDs in tests, until the table read supplies them.

mountinfo does not show the unique IDs (Linux 6.8+), and the listmount/statmount read that
will fill ``Mount.unique_id``/``unique_parent_id`` is built elsewhere. Until then a test that
wants the unique identity path makes its mounts through `Recorder.mount`, which statx'es the
path right before (the parent: whatever the path is on then) and right after mounting (the new
mount: it is on top). Both happen in the test's own process with nothing racing it, so the IDs
are exact. `Recorder.fill` then puts them into a parsed table, keyed by the old ID, the device
and the mount point, so a mount that reused a freed old ID is never given a stale unique ID.
"""

from __future__ import annotations

import dataclasses
import enum
import os

from calico_mount_reaper import mountinfo
from calico_mount_reaper.mountinfo import Mount, ParseResult
from calico_mount_reaper.statx import IdKind, stat_mount

from tests.support.nsutil import mount


def has_unique_ids() -> bool:
    """Whether this kernel has 64-bit unique mount IDs (STATX_MNT_ID_UNIQUE, Linux 6.8+)."""
    return stat_mount(b"/", IdKind.UNIQUE).mount_id is not None


class Path(enum.Enum):
    """The two identity paths every adversarial case runs on."""

    UNIQUE = "unique"  # plan carries 64-bit IDs (STATX_MNT_ID_UNIQUE / statmount)
    OLD = "old"  # the forced fallback: 32-bit ID + device + fstype + verified path


Key = tuple[int, str, str]  # (old mount ID, major:minor, mount point)


class Recorder:
    """``match_path=False`` keys by old ID and device only: for a namespace where only the test
    mounts, and a racing rename changes the path mountinfo shows for a recorded mount."""

    def __init__(self, match_path: bool = True) -> None:
        self.ids: dict[Key, tuple[int, int]] = {}
        self.match_path = match_path

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, shown: str = "") -> int:
        """mount(2) and record the new mount's unique ID and its parent's; returns the old ID.

        ``shown`` is the mount point as mountinfo will show it, when ``target`` is another
        spelling (``/proc/self/fd/N/name``).
        """
        path = os.fsencode(target)
        parent = stat_mount(path, IdKind.UNIQUE).mount_id
        mount(source, target, fstype, flags)
        old = stat_mount(path, IdKind.OLD)
        unique = stat_mount(path, IdKind.UNIQUE).mount_id
        assert old.mount_id is not None
        if parent is not None and unique is not None:  # None before Linux 6.8: nothing to record
            where = (shown or target) if self.match_path else ""
            self.ids[(old.mount_id, old.major_minor, where)] = (unique, parent)
        return old.mount_id

    def mount_at(self, fstype: str, path: str) -> int:
        os.makedirs(path, exist_ok=True)
        return self.mount("none", path, fstype)

    def fill(self, parsed: ParseResult) -> ParseResult:
        return ParseResult(tuple(self.with_ids(m) for m in parsed.mounts), parsed.warnings)

    def with_ids(self, m: Mount) -> Mount:
        where = m.mount_point if self.match_path else ""
        known = self.ids.get((m.mount_id, m.major_minor, where))
        if known is None:
            return m
        return dataclasses.replace(m, unique_id=known[0], unique_parent_id=known[1])

    def read(self, path: Path) -> ParseResult:
        """The table as the plan sees it on ``path``: with unique IDs, or without (fallback)."""
        parsed = mountinfo.read()
        return self.fill(parsed) if path is Path.UNIQUE else parsed
