"""One reaper pass: read, plan, execute, verify, report. Shared by the CLI and the daemon.

Like systemd's shutdown umount loop, a pass repeats "read the table, plan, unmount" until a
round changes nothing: an unmount can reveal a propagated copy, or another party can race
us, and the only honest view is a fresh read of the kernel's table. The final report is that
fresh read, never what we hoped happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from calico_mount_reaper import mountinfo, mounttable
from calico_mount_reaper.config import Config
from calico_mount_reaper.liveness import observe
from calico_mount_reaper.model import Liveness
from calico_mount_reaper.mounttable import MountApi, MountTable
from calico_mount_reaper.plan import Action, Assessment, Mode, Site, find_sites, plan
from calico_mount_reaper.resolve import Expected
from calico_mount_reaper.unmount import (
    BusyPolicy,
    Outcome,
    Result,
    directory_of,
    remove_mount_point,
    unmount_planned,
)

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:  # logging costs a `status` run more than parsing 10k mountinfo lines
    import logging

MOUNTINFO = "/proc/self/mountinfo"
# A stack deeper than this many rounds of surprises is not converging; stop and report.
MAX_ROUNDS = 8


@dataclass
class PassReport:
    mode: Mode
    dry_run: bool
    assessments: tuple[Assessment, ...] = ()  # as first seen, before anything was done
    outcomes: list[Outcome] = field(default_factory=list)
    remaining: tuple[Site, ...] = ()  # sites still mounted at the end (fresh read)
    removed_dirs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    liveness: Liveness | None = None
    table: Table | None = None  # the last read: after the last unmount unless dry_run
    mount_api: MountApi = MountApi.MOUNTINFO  # the back-end the last read went through

    @property
    def reaped(self) -> tuple[Assessment, ...]:
        """Sites this pass was allowed to reap that are gone.

        Gone means the final read shows no site at the mount point, or every member of the site
        was unmounted by this pass, each checked against the exact planned mount first. The
        final read alone would miss a reap when a target is mounted anew at the same path
        before that read: the new mount is another site, and must not hide the one we reaped.
        """
        done = {(o.mount.mount_id, o.mount.unique_id) for o in self.outcomes if o.result.ok}
        still = {s.mount_point for s in self.remaining}
        return tuple(
            a
            for a in self.assessments
            if a.reap
            and (
                a.site.mount_point not in still
                or all((m.mount_id, m.unique_id) in done for m in a.site.members)
            )
        )

    @property
    def unreaped(self) -> tuple[Site, ...]:
        """Sites still mounted that this pass was allowed to reap: the exit code's business."""
        allowed = {a.site.mount_point for a in self.assessments if a.reap}
        return tuple(s for s in self.remaining if s.mount_point in allowed)


def in_host_mount_namespace() -> bool | None:
    """False when our mount namespace differs from PID 1's: unmounts would not reach the host."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return None  # no access to /proc/1: cannot tell


@dataclass(frozen=True)
class Table:
    """One read of the mount table and the target sites found in it.

    ``mounts`` holds at least every target and every mount stacked on or inside one (all a
    site can be made of); reads through `read_table` skip the rest of the table unparsed.
    """

    mounts: tuple[mountinfo.Mount, ...]
    sites: tuple[Site, ...]
    warnings: tuple[str, ...]

    @classmethod
    def of(cls, parsed: mountinfo.ParseResult, config: Config) -> Table:
        return cls(parsed.mounts, tuple(find_sites(parsed.mounts, config.rules)), parsed.warnings)


def read_table(config: Config, mounts: MountTable | None = None) -> Table:
    """The table as far as the targets go: only mounts that can belong to a site are read."""
    if mounts is None:
        mounts = open_table(config)
    return Table.of(mounts.read(config.rules), config)


def open_table(config: Config, path: str = MOUNTINFO) -> MountTable:
    """The back-end ``config.mount_api`` and a probe of the kernel allow (`mounttable.choose`)."""
    return mounttable.choose(mounttable.switch_for(config.mount_api), path=path).table


def _execute(action: Action, config: Config, dry_run: bool, path: str, table: Table) -> Outcome:
    if dry_run:
        return Outcome(action.mount, Result.DRY_RUN, f"would unmount: {action.reason}")
    policy = BusyPolicy(config.busy_retries, config.busy_backoff, detach=True)
    return unmount_planned(
        action.mount,
        directory_of(action.mount, table.mounts),
        policy,
        action.detach_allowed,
        site_ids=action.site.mount_ids,
        mountinfo_path=path,
    )


def run_pass(
    config: Config,
    mode: Mode,
    *,
    dry_run: bool = False,
    liveness: Liveness | None = None,
    observe_liveness: Callable[[Iterable[str], str], Liveness] = observe,
    on_outcome: Callable[[Outcome, Action], None] | None = None,
    only: Collection[str] | None = None,
    mountinfo_path: str = MOUNTINFO,
    table: Table | None = None,
    read: Callable[[], mountinfo.ParseResult] | None = None,
    mounts: MountTable | None = None,
) -> PassReport:
    """Reap what ``mode`` allows, limited to the mount points in ``only`` if given.

    ``liveness`` is observed lazily: only when a target exists. A caller that already holds a
    recent ``table`` (the daemon) saves the first read: planning from a slightly old view is
    safe, because every unmount is checked against the kernel's view of the exact mount first.
    ``mounts`` is the back-end to read through (default: `open_table`); ``read`` replaces
    it altogether (the daemon reads through its watch, which re-arms it).
    """
    report = PassReport(mode, dry_run)
    if mounts is None and read is None:
        mounts = open_table(config, mountinfo_path)

    def fresh() -> Table:
        nonlocal mounts
        if read is not None:
            return Table.of(read(), config)
        assert mounts is not None
        try:
            parsed = mounts.read(config.rules)
        except OSError as exc:  # statmount.ApiError: refused, or the tree changed mid-read
            if mounts.api is MountApi.MOUNTINFO:
                raise
            report.warnings.append(f"reading the mount table from mountinfo instead: {exc}")
            mounts = mounttable.MountinfoTable(mountinfo_path)
            parsed = mounts.read(config.rules)
        report.mount_api = mounts.api
        return Table.of(parsed, config)

    if table is None:
        table = fresh()
    report.warnings.extend(table.warnings)
    # Where each site's mount-point directory must be, as first planned: the rmdir at the end
    # goes only through that directory (safety rule 3).
    directories: dict[str, Expected] = {}
    first_seen: frozenset[tuple[object, ...]] = frozenset()
    stale = False
    for round_ in range(MAX_ROUNDS):
        if not table.sites:
            break
        if liveness is None:
            liveness = observe_liveness(config.owner_names, config.kubelet_unit)
        current = plan(table.mounts, liveness, mode, config, table.sites)
        actions = [a for a in current.actions if only is None or a.site.mount_point in only]
        if round_ > 0:
            # Later rounds finish what the first read showed (layers of a stack, propagated
            # copies) and nothing else: a target mounted while this pass ran is new, and gets
            # its own verdict, grace period and look at the owners, not this pass's old ones.
            actions = [a for a in actions if _identity(a.mount) in first_seen]
        else:
            first_seen = frozenset(_identity(m) for m in table.mounts)
            report.assessments = tuple(
                a for a in current.assessments if only is None or a.site.mount_point in only
            )
            directories = {
                a.site.mount_point: directory_of(a.site.roots[0], table.mounts)
                for a in report.assessments
            }
        progress = False
        stale = bool(actions)
        for action in actions:
            outcome = _execute(action, config, dry_run, mountinfo_path, table)
            report.outcomes.append(outcome)
            progress |= outcome.result in (Result.UNMOUNTED, Result.DETACHED)
            if on_outcome is not None:
                on_outcome(outcome, action)
        if dry_run or not progress:
            break
        table, stale = fresh(), False
    report.liveness = liveness
    if stale and not dry_run:
        table = fresh()  # the truth, not what we hoped happened
    report.table = table
    report.remaining = table.sites
    if not dry_run and config.remove_mount_point:
        _remove_emptied_dirs(report, directories)
    return report


def _identity(mount: mountinfo.Mount) -> tuple[object, ...]:
    """What tells one mount from a later one in two reads of the table.

    The unique ID does on Linux 6.8+; a reused 32-bit ID at the same path on the same
    filesystem is the fallback's documented blind spot (SECURITY.md).
    """
    return mount.mount_id, mount.unique_id, mount.major_minor, mount.mount_point


def _remove_emptied_dirs(report: PassReport, directories: Mapping[str, Expected]) -> None:
    for point in sorted({a.site.mount_point for a in report.reaped}, reverse=True):
        if remove_mount_point(point, directories[point]) is None:
            report.removed_dirs.append(point)


@dataclass(frozen=True)
class Tally:
    reaped: int  # sites gone completely
    failed: int  # sites this pass was allowed to reap that are still mounted
    refused: int  # unmounts a safety check refused


def journal_outcome(log: logging.Logger, outcome: Outcome, action: Action) -> None:
    """One journal entry per unmount attempt that did not simply succeed."""
    import logging

    from calico_mount_reaper import journal

    m = outcome.mount
    fields: dict[str, object] = dict(
        mount_point=m.mount_point,
        mount_id=m.mount_id,
        fstype=m.fstype,
        target=action.site.rule.name,
        reason=outcome.detail,
        result=outcome.result.value,
    )
    if outcome.blockers:
        fields["blockers"] = ", ".join(str(b) for b in outcome.blockers)
        journal.event(
            log,
            "BUSY",
            f"{m.mount_point} is busy: held by {fields['blockers']}",
            level=logging.WARNING,
            stacklevel=2,
            **fields,
        )
    if outcome.result is Result.REFUSED:
        journal.event(
            log,
            "REAP_REFUSED",
            f"refused to unmount {m.mount_point}: {outcome.detail}",
            level=logging.WARNING,
            stacklevel=2,
            **fields,
        )
    elif outcome.result is Result.FAILED:
        journal.event(
            log,
            "REAP_FAILED",
            f"failed to unmount {m.mount_point}: {outcome.detail}",
            level=logging.ERROR,
            stacklevel=2,
            **fields,
        )
    else:
        log.info(
            "%s %s (mount %d, %s): %s",
            outcome.result.value,
            m.mount_point,
            m.mount_id,
            m.fstype,
            outcome.detail,
        )


def journal_report(log: logging.Logger, report: PassReport) -> Tally:
    """A REAPED entry for every site that is gone, judged by the fresh read at the end."""
    from calico_mount_reaper import journal

    for a in report.reaped:
        journal.event(
            log,
            "REAPED",
            f"reaped {a.site.mount_point}: {len(a.site.members)} mount(s) "
            f"gone ({report.mode.value}; {a.reason})",
            stacklevel=2,
            **a.journal_fields(),
            result="reaped",
        )
    refused = sum(1 for o in report.outcomes if o.result is Result.REFUSED)
    return Tally(len(report.reaped), len(report.unreaped), refused)
