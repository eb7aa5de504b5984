"""One reaper pass: read, plan, execute, verify, report. Shared by the CLI and the daemon.

Like systemd's shutdown umount loop, a pass repeats "read the table, plan, unmount" until a
round changes nothing: an unmount can reveal a propagated copy, or another party can race
us, and the only honest view is a fresh read of the kernel's table. The final report is that
fresh read, never what we hoped happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from calico_mount_reaper import mountinfo
from calico_mount_reaper.config import Config
from calico_mount_reaper.liveness import Liveness, observe
from calico_mount_reaper.plan import Action, Assessment, Mode, Site, find_sites, plan
from calico_mount_reaper.unmount import (
    BusyPolicy,
    Outcome,
    Result,
    remove_mount_point,
    unmount_planned,
)

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
    """One read of the mount table and the target sites found in it."""

    mounts: tuple[mountinfo.Mount, ...]
    sites: tuple[Site, ...]
    warnings: tuple[str, ...]


def read_table(config: Config, path: str = MOUNTINFO) -> Table:
    parsed = mountinfo.read(path)
    return Table(parsed.mounts, tuple(find_sites(parsed.mounts, config.rules)), parsed.warnings)


def _execute(action: Action, config: Config, dry_run: bool, path: str) -> Outcome:
    if dry_run:
        return Outcome(action.mount, Result.DRY_RUN, f"would unmount: {action.reason}")
    policy = BusyPolicy(config.busy_retries, config.busy_backoff, detach=True)
    return unmount_planned(
        action.mount,
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
) -> PassReport:
    """Reap what ``mode`` allows, limited to the mount points in ``only`` if given.

    ``liveness`` is observed lazily: only when a target exists.
    """
    report = PassReport(mode, dry_run)
    table = read_table(config, mountinfo_path)
    report.warnings.extend(table.warnings)
    stale = False
    for round_ in range(MAX_ROUNDS):
        if not table.sites:
            break
        if liveness is None:
            liveness = observe_liveness(config.owner_names, config.kubelet_unit)
        current = plan(table.mounts, liveness, mode, config)
        actions = [a for a in current.actions if only is None or a.site.mount_point in only]
        if round_ == 0:
            report.assessments = tuple(
                a for a in current.assessments if only is None or a.site.mount_point in only
            )
        progress = False
        stale = bool(actions)
        for action in actions:
            outcome = _execute(action, config, dry_run, mountinfo_path)
            report.outcomes.append(outcome)
            progress |= outcome.result in (Result.UNMOUNTED, Result.DETACHED)
            if on_outcome is not None:
                on_outcome(outcome, action)
        if dry_run or not progress:
            break
        table, stale = read_table(config, mountinfo_path), False
    report.liveness = liveness
    if stale and not dry_run:
        table = read_table(config, mountinfo_path)  # the truth, not what we hoped happened
    report.remaining = table.sites
    if not dry_run and config.remove_mount_point:
        _remove_emptied_dirs(report)
    return report


def _remove_emptied_dirs(report: PassReport) -> None:
    still = {s.mount_point for s in report.remaining}
    gone = {a.site.mount_point for a in report.assessments if a.reap} - still
    for point in sorted(gone, reverse=True):
        if remove_mount_point(point) is None:
            report.removed_dirs.append(point)
