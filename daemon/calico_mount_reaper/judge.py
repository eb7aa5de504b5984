"""The judge: the daemon's current view of the node, its verdicts and grace timers, and reaps.

It keeps what the loop has learnt (the mount table, who is alive, kubelet's state) and, when
asked, judges every site (`plan`), runs the grace timers (`grace`), reaps what is due
(`reaper.run_pass`), journals each change of verdict once, and publishes the STATUS= line and
the metrics. It never sleeps and never waits on a source: the daemon tells it what happened
and asks it when to look again.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from calico_mount_reaper import grace, journal, metrics
from calico_mount_reaper.config import Config
from calico_mount_reaper.liveness import find_owners, kubelet_from_processes, scan_processes
from calico_mount_reaper.model import KubeletState, Liveness, SiteKey
from calico_mount_reaper.mountinfo import ParseResult
from calico_mount_reaper.mounttable import WatchedTable
from calico_mount_reaper.notify import Notifier
from calico_mount_reaper.plan import Assessment, Mode, plan
from calico_mount_reaper.reaper import Table, Tally, journal_outcome, journal_report, run_pass
from calico_mount_reaper.sources.mountinfo import diff
from calico_mount_reaper.sources.processes import OwnerExits
from calico_mount_reaper.targets import rule_for


class Judge:
    """``read`` reads the mount table (the daemon's one way to, which re-arms its watch)."""

    def __init__(
        self,
        config: Config,
        log: logging.Logger,
        notifier: Notifier,
        owners: OwnerExits,
        read: Callable[[], ParseResult],
        mountinfo_path: str,
    ) -> None:
        self.config, self.log, self.notifier, self.owners = config, log, notifier, owners
        self.read, self.mountinfo_path = read, mountinfo_path
        self.table = Table((), (), ())
        self.liveness = Liveness()
        self.bus_kubelet: KubeletState | None = None  # systemd's answer, while on the bus
        self.mounts: WatchedTable | None = None  # the daemon's table: its back-end goes in STATUS=
        self.mount_events = "pollpri"  # what wakes the daemon on a mount change (for STATUS=)
        self.timers = grace.GraceTimers()
        self.reasons: Mapping[SiteKey, str] = {}
        self.decommissioned = False
        self.stale = True  # the processes must be scanned before the next verdict
        self.counters = metrics.Counters()

    @property
    def mode(self) -> Mode:
        return Mode.DECOMMISSION if self.decommissioned else Mode.NORMAL

    def take(self, table: Table) -> bool:
        """Take a fresh table as the current view; True if a target mount came or went."""
        changed = journal_table_changes(self.log, self.table, table, self.config)
        self.table = table
        self.stale |= changed
        return changed

    def take_read(self) -> bool:
        return self.take(Table.of(self.read(), self.config))

    def set_kubelet(self, state: KubeletState | None) -> None:
        """systemd's view of kubelet, or None when the bus is gone (then: its process)."""
        self.bus_kubelet = state
        if state is None:
            self.stale = True
            return
        self.liveness = replace(self.liveness, kubelet=state)
        if self.decommissioned and not state.decommissioned:
            self.decommissioned = False
            self.log.info("kubelet is back (%s): decommission cancelled", state.detail)

    def evaluate(self, now: float) -> float | None:
        """Verdicts, grace timers and, when one is due, a reap; returns when to look again
        (None: not before something happens)."""
        if not self.table.sites:
            self.timers, self.reasons = grace.GraceTimers(), {}
            self.owners.watch(())
            self.publish(())
            return None
        scanned, again = self.stale, []
        if scanned:
            self.liveness, raced = observe(self.config, self.owners, self.bus_kubelet)
            self.stale = raced  # an owner died between the scan and its pidfd: look again
            again += [now] if raced else []
        mode = self.mode
        assessments = plan(
            self.table.mounts, self.liveness, mode, self.config, self.table.sites
        ).assessments
        immediate = mode is Mode.DECOMMISSION
        decision = grace.decide(self.timers, assessments, now, self.config.grace_period, immediate)
        if decision.due and not scanned:
            # An owner may have started since the last scan (a start sends no event): decide
            # an unmount on a fresh look at the processes, never on an old one.
            self.stale = True
            return self.evaluate(now)
        wait = 0.0 if immediate else self.config.grace_period
        self.reasons = journal_verdicts(self.log, self.reasons, assessments, wait)
        self.timers = decision.timers
        again += [] if decision.next_deadline is None else [decision.next_deadline]
        if decision.due:
            self.reap(mode, {a.site.mount_point for a in decision.due})
            again += [now] if self.stale else []  # the reap's fresh read changed the view
        self.publish(assessments)
        return min(again, default=None)

    def reap(self, mode: Mode, only: set[str] | None) -> list[str]:
        """Reap, journal and count; returns the mount points that are gone."""
        report = run_pass(
            self.config,
            mode,
            liveness=self.liveness,
            only=only,
            on_outcome=lambda outcome, action: journal_outcome(self.log, outcome, action),
            mountinfo_path=self.mountinfo_path,
            table=self.table,
            read=self.read,
        )
        count(self.counters, journal_report(self.log, report))
        # The pass ended with a fresh read: take it as our view at once, so a mount that
        # reappears right after our unmount (same recycled ID, same place) is seen as new.
        if report.table is not None:
            self.take(report.table)
        return [a.site.mount_point for a in report.reaped]

    def publish(self, assessments: Iterable[Assessment]) -> None:
        """The STATUS= line and the metrics file, after every pass."""
        items = list(assessments)
        on_bus = self.bus_kubelet is not None
        api = "mountinfo" if self.mounts is None else self.mounts.api.value
        api += f", events: {self.mount_events}"
        self.notifier.status(status_text(items, len(self.config.rules), on_bus, api))
        self.counters.targets_mounted = len(items)
        self.counters.last_pass_timestamp_seconds = time.time()
        if self.config.metrics_path:
            try:
                metrics.write_textfile(self.config.metrics_path, self.counters)
            except OSError as exc:
                self.log.warning("cannot write metrics: %s", exc)


def observe(
    config: Config, owners: OwnerExits, bus_kubelet: KubeletState | None
) -> tuple[Liveness, bool]:
    """Scan /proc for owners (and for kubelet, with no bus to ask) and watch their exits.

    A pidfd per live owner: its exit wakes the loop at once instead of at the next rescan.
    The flag says one died between the scan and its pidfd: the scan is already stale.
    """
    processes = list(scan_processes())
    watched = {*config.owner_names} | (set() if bus_kubelet else {"kubelet"})
    found = find_owners(processes, watched)
    raced = bool(owners.watch(pid for pids in found.values() for pid in pids))
    kubelet = bus_kubelet or kubelet_from_processes(processes)
    live = {name: pids for name, pids in found.items() if name in config.owner_names}
    return Liveness(owners=live, kubelet=kubelet), raced


def count(counters: metrics.Counters, tally: Tally) -> None:
    counters.reaps_total += tally.reaped
    counters.failures_total += tally.failed
    counters.refusals_total += tally.refused


def journal_table_changes(log: logging.Logger, old: Table, new: Table, config: Config) -> bool:
    """Journal new malformed lines and the target mounts that appeared or went; True if any
    mount did (the verdicts must then be looked at again)."""
    # A malformed line stays malformed on every re-read: say so once, not once per read.
    # Its line number shifts as other mounts come and go, so it is not part of the key.
    seen = {_without_line_number(w) for w in old.warnings}
    for warning in new.warnings:
        if _without_line_number(warning) not in seen:
            log.warning("%s", warning)
    appeared, gone = diff(old.mounts, new.mounts)
    changes = [(m, "TARGET_APPEARED", "appeared") for m in appeared]
    changes += [(m, "TARGET_GONE", "is gone") for m in gone]
    for m, name, verb in changes:
        rule = rule_for(m, config.rules)
        if rule is not None:
            journal.event(
                log,
                name,
                f"{rule.name} target {m.mount_point} ({m.fstype}) {verb}",
                mount_point=m.mount_point,
                mount_id=m.mount_id,
                fstype=m.fstype,
                target=rule.name,
            )
    return bool(appeared or gone)


def journal_verdicts(
    log: logging.Logger,
    before: Mapping[SiteKey, str],
    assessments: Iterable[Assessment],
    wait: float,
) -> dict[SiteKey, str]:
    """One entry per change of a site's verdict, so the journal says why it waits; returns
    the reasons now in force."""
    now: dict[SiteKey, str] = {}
    for a in assessments:
        key = grace.site_key(a.site)
        now[key] = a.reason
        if before.get(key) == a.reason:
            continue
        if a.reap:
            message = f"{a.site.mount_point}: {a.reason}; reaping in {wait:g} s"
            result = "scheduled"
        else:
            message, result = f"{a.site.mount_point}: left alone, {a.reason}", "refused"
        journal.event(
            log,
            "VERDICT",
            message,
            **a.journal_fields(),
            result=result,
        )
    return now


def status_text(assessments: list[Assessment], rules: int, on_bus: bool, mount_api: str) -> str:
    held = sum(1 for a in assessments if not a.reap)
    text = f"watching {rules} target rules; {len(assessments)} mounted"
    if held:
        text += f", {held} left alone ({assessments[0].reason if held == 1 else 'see journal'})"
    text += f"; mount table: {mount_api}"
    return text if on_bus else text + "; degraded: no D-Bus"


def _without_line_number(warning: str) -> str:
    return re.sub(r"^mountinfo line \d+ ", "", warning)
