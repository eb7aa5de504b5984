"""The mount table behind one interface, read through one of two back-ends.

- ``listmount``: ask the kernel (listmount/statmount, Linux 6.8+). Only the subtrees that can
  hold a target are read, and every mount comes with its 64-bit unique ID, which is never
  reused: the unmount path verifies by it (DESIGN rule 2).
- ``mountinfo``: parse /proc/self/mountinfo, the fallback for older kernels and for sandboxes
  that refuse the new calls. It has only the 32-bit IDs the kernel reuses.

Which one runs is decided once, by probing the kernel (`choose`). The switch ``mount_api =
"mountinfo"`` (config key) or ``CALICO_MOUNT_REAPER_MOUNT_API=mountinfo`` (environment,
applied by `config.load`, where it wins over the file) forces the fallback and with it the
old identity path, so both can be run and tested on a new kernel.

Both back-ends return a `ParseResult` holding at least every mount at or below a rule's
prefix, with ``index`` increasing from older to newer mounts: the line number for mountinfo,
the unique ID (handed out in creation order) for listmount. The planner only compares indexes,
so both give the same sites, stacks and unmount order.

Subtree reads on the kernel API, per rule prefix:

1. the nearest existing ancestor of the prefix, found without following a symlink (a symlink
   planted at ``/run/calico`` must not move the read elsewhere);
2. the mount that directory is on (statx ``STATX_MNT_ID_UNIQUE``), then up the tree while the
   mount sits at or inside the prefix, and down to the bottom of a stack at the point where
   that stops: a mount hidden under an over-mount at ``/run/calico`` is a child of the mount
   below it, so listing from the over-mount would miss it;
3. listmount from there, statmount each listed mount, keep those at or below the prefix
   (component-wise, as `targets.is_within`).

Each read also keeps its `Reach`: the mounts above the prefixes it listed from. With it, the
daemon places a mount that fanotify reports attached without reading again (`mountevents`).

Kernels differ in what listmount returns: every mount below the one asked about (6.18 here),
or only its direct children (the first version, 6.8). `_Walk` handles both: it goes down
into a listed mount that can hold a target unless the kernel has already shown it lists whole
subtrees.

Listing whole subtrees has a cost: every mount below ``/run`` is stat'ed (about 4 µs each),
though most (containerd's, netns) can never hold a target. Once `PRUNE_AFTER` mounts below one
such mount have been stat'ed, one listmount of it names the rest, and they are skipped. A
prune costs one listmount (0.15 ms at 10k mounts) and only happens after at least that much
was spent on the subtree, so it never costs more than it can save.

Limit: a target hidden under an over-mount of a directory *above* the mount found in step 2
(someone mounted over ``/run`` itself after Calico mounted below it) is not seen: finding it
means listing the whole table. The mountinfo back-end reports such a target, and neither can
unmount it: the path leads to the over-mount, which the identity check refuses.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from calico_mount_reaper import mountinfo
from calico_mount_reaper.config import MOUNT_API_ENV, Config
from calico_mount_reaper.mountinfo import Mount, ParseResult
from calico_mount_reaper.targets import Rule, is_within, normalize_path, search_needles

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    from typing import Any

    from calico_mount_reaper.sources.mountinfo import MountTableWatch
    from calico_mount_reaper.statmount import Kernel, MountRecord

MOUNTINFO = "/proc/self/mountinfo"


class MountApi(enum.Enum):
    """The back-end a table was read through (shown in status --json as "mount_api")."""

    LISTMOUNT = "listmount"
    MOUNTINFO = "mountinfo"


class Switch(enum.Enum):
    """The ``mount_api`` setting: let the probe decide, or force the fallback."""

    AUTO = "auto"
    MOUNTINFO = "mountinfo"


# errnos that mean "this kernel or sandbox does not let us make the call", as opposed to a
# mount that went away between two calls (ENOENT) or a bug in the request (EINVAL, EFAULT).
REFUSED = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOTSUP})


# Fresh walks after a mount or directory vanished mid-walk, before the caller is told.
RACE_RETRIES = 2


@dataclass(frozen=True)
class Reach:
    """What a kernel-API read reached besides the mounts it returned: enough for the daemon to
    place a mount that fanotify reports attached without reading again (`mountevents`).

    ``anchors``: the mounts above every prefix that the read listed from or through (the mount
    a prefix lives on, a stack under it), whose mount point covers a prefix. A mount attached
    below a prefix onto one of them, or onto a mount the read returned, is one the same read
    would find now; one attached anywhere else may lie where the read does not reach.
    ``spellings``: the prefixes as read, the ``/var/run`` ones included.
    """

    anchors: frozenset[int]
    spellings: tuple[str, ...]


class MountTable:
    """What a pass reads the table through. `read` gives the mounts the rules can care about."""

    api: MountApi
    reach: Reach | None = None  # of the last read, where the back-end can tell (kernel API)

    def read(self, rules: Sequence[Rule]) -> ParseResult:
        raise NotImplementedError


class MountinfoTable(MountTable):
    """/proc/self/mountinfo, parsing only the lines that can belong to a target."""

    api = MountApi.MOUNTINFO

    def __init__(self, path: str = MOUNTINFO) -> None:
        self.path = path

    def read(self, rules: Sequence[Rule]) -> ParseResult:
        return mountinfo.read(self.path, search_needles(rules))


class KernelTable(MountTable):
    """listmount/statmount from the mounts the rule prefixes live on.

    A call the kernel or a sandbox refuses raises `statmount.ApiError`: the caller falls back
    to `MountinfoTable` (see `Daemon`); `choose` has already probed for the common cases.
    """

    api = MountApi.LISTMOUNT

    def __init__(self, kernel: Kernel | None = None) -> None:
        if kernel is None:
            from calico_mount_reaper.statmount import Kernel

            kernel = Kernel()
        self.kernel = kernel
        self._subtrees: bool | None = None  # does listmount list whole subtrees? (learnt)

    def read(self, rules: Sequence[Rule]) -> ParseResult:
        from calico_mount_reaper.statmount import ApiError

        prefixes = outermost({rule.prefix for rule in rules})
        spellings = [*prefixes, *var_run_spellings(prefixes)]
        for attempt in range(RACE_RETRIES + 1):
            walk = _Walk(self.kernel, spellings, self._subtrees)
            try:
                for prefix in spellings:
                    walk.read_below(prefix)
            except ApiError as exc:
                # A directory or mount went away between two calls of the walk: read again.
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR) or attempt == RACE_RETRIES:
                    raise
                continue
            break
        self._subtrees = walk.subtrees
        mounts = to_mounts(walk.records.values(), prefixes)
        self.reach = walk.reach({m.unique_id for m in mounts})
        return ParseResult(mounts)


def switch_for(configured: str, environ: Mapping[str, str] = os.environ) -> Switch:
    """The switch in force: CALICO_MOUNT_REAPER_MOUNT_API wins over the config's ``mount_api``
    wherever the table is opened, so that it reaches every pass (`config.load` has already
    refused a bad value, with the variable's name)."""
    return Switch(environ.get(MOUNT_API_ENV) or configured)


@dataclass(frozen=True)
class Choice:
    """The back-end picked, and why (for the journal and `status`)."""

    table: MountTable
    reason: str
    refused: bool = False  # this kernel (6.8+) has the calls, but they failed: say so loudly


def choose(
    switch: Switch,
    *,
    path: str = MOUNTINFO,
    probe: Callable[[], Kernel] | None = None,
    kernel_release: str | None = None,
) -> Choice:
    """The back-end for this process: listmount when the kernel and the sandbox allow it.

    ``path`` other than /proc/self/mountinfo (a test's table) forces the mountinfo back-end:
    the kernel API can only read the live table.
    """
    if switch is Switch.MOUNTINFO:
        forced = f'forced by mount_api = "mountinfo" (config file or {MOUNT_API_ENV})'
        return Choice(MountinfoTable(path), forced)
    if path != MOUNTINFO:
        return Choice(MountinfoTable(path), f"reading a table from {path}")
    from calico_mount_reaper.statmount import ApiError

    try:
        kernel = (probe or _probe)()
    except ApiError as exc:
        # Any failure falls back: reading mountinfo is always possible, a crash never helps.
        release = kernel_release if kernel_release is not None else os.uname().release
        if not _at_least(release, (6, 8)):
            return Choice(MountinfoTable(path), f"Linux {release} has no listmount/statmount")
        if exc.errno in REFUSED:
            why = (
                f"the kernel API is refused ({exc}): by the unit's SystemCallFilter= (systemd "
                "with libseccomp < 2.6 cannot allow listmount/statmount; a drop-in with an "
                "empty SystemCallFilter= can) or by a container's seccomp profile"
            )
        else:
            why = f"the kernel API failed its probe ({exc})"
        return Choice(MountinfoTable(path), why, refused=True)
    return Choice(KernelTable(kernel), "listmount/statmount (Linux 6.8+)")


class WatchedTable:
    """The daemon's mount table: its change watch (POLLPRI on mountinfo) and the back-end its
    reads go through, behind one `read`.

    Every read re-arms the watch first, so no change slips between. A refusal of the kernel API
    (at the probe or later) switches to mountinfo for good, reported once through ``degraded``
    (message, reason, result: the daemon's DEGRADED entry); a table that kept changing under the
    walk is read from mountinfo that once, with a warning. A reload that changes ``mount_api``
    takes effect at the next read.
    """

    choice: Choice
    _switch: str
    _unreported: bool  # a refusal found by the probe, not yet reported

    def __init__(
        self, watch: MountTableWatch, config: Config, degraded: Callable[[str, str, str], None]
    ) -> None:
        self.watch, self.degraded = watch, degraded
        # The last read's `Reach`: None unless it went through the kernel API and completed.
        self.reach: Reach | None = None
        self._choose(config.mount_api)

    @property
    def api(self) -> MountApi:
        return self.choice.table.api

    @property
    def fields(self) -> dict[str, Any]:
        """For the journal (MOUNT_API=)."""
        return {"mount_api": self.api.value}

    def __str__(self) -> str:
        return f"mount table via {self.api.value}: {self.choice.reason}"

    def read(self, config: Config) -> ParseResult:
        if config.mount_api != self._switch:
            self._choose(config.mount_api)
        if self._unreported:
            self._unreported = False
            self._fall_back(self.choice.reason)
        warnings: tuple[str, ...] = ()
        self.reach = None
        if self.api is MountApi.LISTMOUNT:
            self.watch.rearm()
            table = self.choice.table
            try:
                parsed = table.read(config.rules)
                self.reach = table.reach
                return parsed
            except OSError as exc:
                if exc.errno in REFUSED:
                    self._fall_back(f"listmount/statmount refused ({exc})")
                else:
                    warnings = (f"the mount table kept changing, read from mountinfo once: {exc}",)
        parsed = self.watch.read(search_needles(config.rules))
        return ParseResult(parsed.mounts, (*parsed.warnings, *warnings))

    def _choose(self, configured: str) -> None:
        self._switch = configured
        self.choice = choose(switch_for(configured), path=self.watch.path)
        self._unreported = self.choice.refused

    def _fall_back(self, reason: str) -> None:
        self.choice = Choice(MountinfoTable(self.watch.path), reason)
        self.degraded(f"reading the mount table from mountinfo: {reason}", reason, "no-listmount")


def _probe() -> Kernel:
    """One statx and one statmount of the root: both calls exist and are allowed, with
    unique IDs. listmount is tried on a mount that cannot exist: any answer but a refusal
    shows it is allowed, without listing anything."""
    from calico_mount_reaper.statmount import ApiError, Kernel

    kernel = Kernel()
    kernel.statmount(kernel.unique_mount_id("/"))
    try:
        kernel.listmount(1)  # unique IDs start above 2**31: 1 is never a mount
    except ApiError as exc:
        if exc.errno in REFUSED:
            raise
    return kernel


def _at_least(release: str, version: tuple[int, int]) -> bool:
    """ "6.18.44-fc" >= (6, 8)? An unparsable release counts as new: refusals are then loud."""
    parts = release.split(".", 2)
    try:
        return (int(parts[0]), int("".join(c for c in parts[1][:3] if c.isdigit()))) >= version
    except (IndexError, ValueError):
        return True


def outermost(prefixes: Iterable[str]) -> list[str]:
    """The prefixes no other one covers: reading below ``/run/calico`` reads ``/run/calico/x``."""
    ordered = sorted(prefixes, key=lambda p: (p.count("/"), p))
    kept: list[str] = []
    for p in ordered:
        if not any(is_within(p, k) for k in kept):
            kept.append(p)
    return kept


def var_run_spellings(
    prefixes: Iterable[str], lstat: Callable[[str], os.stat_result] = os.lstat
) -> list[str]:
    """``/var/run/...`` for each ``/run/...`` prefix, when /var/run is a real directory.

    Rules fold /var/run into /run (`targets.normalize_path`), and mountinfo shows a mount made
    below a real /var/run directory as /var/run/...: a different tree, which a walk from /run
    never sees. Where /var/run is the usual symlink to /run, there is nothing more to read
    (and walking it would start from the mount /var is on: most of the table).
    """
    try:
        real = stat.S_ISDIR(lstat("/var/run").st_mode)
    except OSError:
        return []
    return ["/var" + p for p in prefixes if real and (p == "/run" or p.startswith("/run/"))]


def covers(mount_point: str, prefix: str) -> bool:
    """Is ``mount_point`` strictly above ``prefix`` (a mount there can hide all of it)?"""
    return mount_point != prefix and is_within(prefix, mount_point)


def nearest_existing(prefix: str, lstat: Callable[[str], os.stat_result] = os.lstat) -> str:
    """The longest leading part of ``prefix`` that is a real directory, reached without following
    a symlink: a component that is missing, a symlink or not a directory ends the walk."""
    found = "/"
    for part in prefix.strip("/").split("/"):
        candidate = found.rstrip("/") + "/" + part
        try:
            if not stat.S_ISDIR(lstat(candidate).st_mode):
                break
        except OSError:
            break
        found = candidate
    return found


# Mounts stat'ed below one mount that cannot hold a target before the rest are skipped.
PRUNE_AFTER = 64


class _Walk:
    """One read: the subtrees below some prefixes, each mount stat'ed once."""

    def __init__(self, kernel: Kernel, prefixes: Sequence[str], subtrees: bool | None) -> None:
        self.kernel = kernel
        self.prefixes = prefixes
        self.records: dict[int, MountRecord] = {}
        self.subtrees = subtrees  # None until a listing shows which kind of kernel this is
        self._listed: set[int] = set()
        # The mounts the read listed from, and every one it stat'ed from a listing: the base
        # and its descendants. Not the base's parent, stat'ed only to stop the walk up.
        self._reached: set[int] = set()

    def stat(self, unique_id: int) -> MountRecord | None:
        record = self.records.get(unique_id)
        if record is None:
            from calico_mount_reaper.statmount import ApiError

            try:
                record = self.kernel.statmount(unique_id)
            except ApiError as exc:
                if exc.errno == errno.ENOENT:
                    return None  # unmounted since it was listed
                raise
            self.records[unique_id] = record
        return record

    def base(self, prefix: str) -> MountRecord:
        """The mount to list from: see the module docstring, step 2."""
        start = self.kernel.unique_mount_id(nearest_existing(prefix))
        record = self.stat(start)
        while record is not None and record.unique_parent_id != record.unique_id:
            parent = self.stat(record.unique_parent_id)
            if parent is None:
                break
            inside = is_within(record.mount_point, prefix)  # as spelt: prefix may be /var/run
            if not (inside or parent.mount_point == record.mount_point):
                break
            record = parent
        if record is None:  # the mount went away under us: a fresh read will see why
            from calico_mount_reaper.statmount import ApiError

            raise ApiError(errno.ENOENT, f"the mount below {prefix} went away during the read")
        return record

    def read_below(self, prefix: str) -> None:
        pending = [self.base(prefix).unique_id]
        self._reached.update(pending)
        while pending:
            listed_from = pending.pop()
            if listed_from not in self._listed:
                self._listed.add(listed_from)
                pending.extend(self._list(listed_from))

    def _list(self, listed_from: int) -> list[int]:
        """Stat what listmount names below ``listed_from``; the listed mounts to go down into
        next (on kernels that list direct children only)."""
        deeper: list[int] = []
        skip: set[int] = set()
        outer: dict[int, int] = {}  # a mount that cannot hold a target -> the outermost such
        stated_below: dict[int, int] = {}  # outermost such mount -> mounts stat'ed below it
        for unique_id in self.kernel.listmount(listed_from):
            if unique_id in skip:
                continue
            record = self.stat(unique_id)
            if record is None:
                continue
            self._reached.add(unique_id)
            if record.unique_parent_id != listed_from:
                self.subtrees = True  # a grandchild: this kernel lists whole subtrees
            top = outer.get(record.unique_parent_id)
            if top is not None:
                outer[unique_id] = top
                stated_below[top] += 1
                if stated_below[top] == PRUNE_AFTER:
                    skip.update(self.kernel.listmount(top))
            elif not self._may_hold(record.mount_point):
                outer[unique_id], stated_below[unique_id] = unique_id, 0
            elif self.subtrees is not True:
                deeper.append(unique_id)
        return deeper

    def reach(self, returned: set[int | None]) -> Reach:
        """The read's `Reach`, given the IDs of the mounts it ``returned``."""
        anchors = frozenset(
            unique_id
            for unique_id in self._reached
            if unique_id not in returned
            and any(covers(self.records[unique_id].mount_point, p) for p in self.prefixes)
        )
        return Reach(anchors, tuple(self.prefixes))

    def _may_hold(self, mount_point: str) -> bool:
        """Can mounts below this one be at or below a prefix (as spelt, /var/run included)?"""
        return any(is_within(mount_point, p) or is_within(p, mount_point) for p in self.prefixes)


# MOUNT_ATTR_* bits and how mountinfo's per-mount options field spells them, in its order.
_ATTR_WORDS = ((0x2, "nosuid"), (0x4, "nodev"), (0x8, "noexec"))
_ATIME_WORDS = {0x00: "relatime", 0x10: "noatime", 0x20: ""}  # strictatime: mountinfo says nothing
_MS_UNBINDABLE, _MS_SLAVE, _MS_SHARED = 1 << 17, 1 << 19, 1 << 20


def options(attr: int) -> str:
    """The per-mount options as mountinfo writes them (``rw,nosuid,relatime``)."""
    words = ["ro" if attr & 0x1 else "rw"]
    words += [word for bit, word in _ATTR_WORDS if attr & bit]
    if attr & 0x80:
        words.append("nodiratime")
    atime = _ATIME_WORDS.get(attr & 0x70, "")
    words += [atime] if atime else []
    if attr & 0x200000:
        words.append("nosymfollow")
    return ",".join(words)


def optional_fields(record: MountRecord) -> tuple[str, ...]:
    """mountinfo's optional fields (``shared:N master:N propagate_from:N unbindable``)."""
    fields: list[str] = []
    if record.propagation & _MS_SHARED:
        fields.append(f"shared:{record.peer_group}")
    if record.propagation & _MS_SLAVE:
        fields.append(f"master:{record.master}")
        if record.propagate_from and record.propagate_from != record.master:
            fields.append(f"propagate_from:{record.propagate_from}")
    if record.propagation & _MS_UNBINDABLE:
        fields.append("unbindable")
    return tuple(fields)


def to_mount(record: MountRecord) -> Mount:
    """A statmount record as a Mount. ``index`` is the unique ID: the kernel hands those out
    in creation order, so a higher one is a newer mount, as a later mountinfo line is."""
    return Mount(
        mount_id=record.mount_id,
        parent_id=record.parent_id,
        major_minor=f"{record.dev_major}:{record.dev_minor}",
        root=record.root,
        mount_point=record.mount_point,
        options=options(record.attr),
        optional_fields=optional_fields(record),
        fstype=record.fstype,
        # Linux 6.8-6.12 do not report the source; mountinfo would show it. Nothing decides
        # by it: it is only shown in status --json.
        source="" if record.source is None else record.source,
        super_options="",
        index=record.unique_id,
        unique_id=record.unique_id,
        unique_parent_id=record.unique_parent_id,
    )


def to_mounts(records: Iterable[MountRecord], prefixes: Sequence[str]) -> tuple[Mount, ...]:
    """The records at or below a prefix, and every mount on or inside one of those whatever its
    path says, oldest first, as Mounts: the pure half of a read."""
    ordered = sorted(records, key=lambda r: r.unique_id)
    kept = {
        r.unique_id
        for r in ordered
        if any(is_within(normalize_path(r.mount_point), p) for p in prefixes)
    }
    grew = True
    while grew:  # parents come first in ID order, so this settles in one round, or two
        grew = False
        for r in ordered:
            if r.unique_id not in kept and r.unique_parent_id in kept:
                kept.add(r.unique_id)
                grew = True
    return tuple(to_mount(r) for r in ordered if r.unique_id in kept)
