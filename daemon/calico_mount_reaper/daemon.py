"""The node daemon: one selector loop that wires event sources to the core.

Sources (each a thin object over a file descriptor, opened through `Sources`): the mount table
(POLLPRI on mountinfo), systemd over D-Bus, kernel uevents for dataplane interfaces, pidfds of
owner processes, and signals (through a wakeup pipe). A wake only records what happened, as a
change of the `Schedule`; the loop then runs the jobs the schedule says are due: a coalesced
re-read of the table, a liveness scan and the verdicts, the watchdog ping, the safety-net
rescan, a bus retry. Decisions are made by the pure core (plan, grace, schedule, stopping);
this module only wires them to the system.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from calico_mount_reaper import config as config_mod
from calico_mount_reaper import grace, journal, metrics
from calico_mount_reaper.config import Config, ConfigError
from calico_mount_reaper.liveness import (
    find_owners,
    kubelet_from_processes,
    scan_processes,
    system_bus_present,
)
from calico_mount_reaper.model import KubeletState, Liveness, ReapOnStop, SiteKey
from calico_mount_reaper.mountinfo import ParseResult
from calico_mount_reaper.notify import Notifier, watchdog_interval
from calico_mount_reaper.plan import Assessment, Mode, plan
from calico_mount_reaper.reaper import (
    MOUNTINFO,
    Table,
    in_host_mount_namespace,
    journal_outcome,
    journal_report,
    run_pass,
)
from calico_mount_reaper.schedule import ERROR_RETRY, Job, Schedule
from calico_mount_reaper.sources.mountinfo import MountTableWatch, diff
from calico_mount_reaper.sources.processes import OwnerExits
from calico_mount_reaper.sources.systemd import (
    BusLost,
    BusUnavailable,
    Decommissioned,
    KubeletChanged,
    ShuttingDown,
    SystemdWatch,
)
from calico_mount_reaper.sources.udev import InterfaceWatch, UdevUnavailable
from calico_mount_reaper.stopping import decide_stop
from calico_mount_reaper.targets import rule_for, search_needles
from calico_mount_reaper.unitname import mount_unit

# Repeat the same error line at most this often, so a persistent fault cannot flood the journal.
ERROR_REPEAT = 60.0
# How long a final reap at shutdown waits for PID 1 to notice the unmounts.
PID1_CATCH_UP = 2.0
# Test-only fault switches (README, "Fault switches"): never set on a real node.
FAULTS_ENV = "CALICO_MOUNT_REAPER_FAULTS"
# `run` exits with these (sysexits.h; the unit's RestartPreventExitStatus=78 keys on it).
# TODO(operator): use cli.ExitCode.CONFIG once it exists; a literal here avoids importing cli.
EXIT_CONFIG = 78


@dataclass(frozen=True)
class Sources:
    """How the daemon opens its event sources. Tests pass their own (a real source under a
    fault, a table with planted lines); the defaults are the real ones.

    ``mount_table`` is the one way the daemon reads the mount table: a back-end that reads it
    differently slots in here.
    """

    mount_table: Callable[[str], MountTableWatch] = MountTableWatch
    owner_exits: Callable[[], OwnerExits] = OwnerExits
    interfaces: Callable[[], InterfaceWatch] = InterfaceWatch
    systemd: Callable[[str], SystemdWatch] = SystemdWatch
    bus_present: Callable[[], bool] = system_bus_present


@dataclass
class State:
    """What the loop knows between wakes. Plain data: every change goes through the Daemon."""

    table: Table = field(default_factory=lambda: Table((), (), ()))
    liveness: Liveness = field(default_factory=Liveness)
    timers: grace.GraceTimers = field(default_factory=grace.GraceTimers)
    reasons: Mapping[SiteKey, str] = field(default_factory=dict)
    decommissioned: bool = False
    shutting_down: bool = False
    stop_requested: bool = False
    reload_requested: bool = False
    liveness_stale: bool = True
    rereads: int = 0
    counters: metrics.Counters = field(default_factory=metrics.Counters)


class Daemon:
    """Public surface: `start`, `turn` (one wake), `finish`, or `run` for all three."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        log: logging.Logger,
        notifier: Notifier,
        *,
        sources: Sources = Sources(),
        clock: Callable[[], float] = time.monotonic,
        mountinfo_path: str = MOUNTINFO,
    ) -> None:
        self.config, self.config_path, self.log, self.notifier = config, config_path, log, notifier
        self.sources, self.clock, self.mountinfo_path = sources, clock, mountinfo_path
        self.state = State()
        self.schedule = Schedule.start(clock(), config.rescan_interval, watchdog_interval())
        self.faults = frozenset(filter(None, os.environ.get(FAULTS_ENV, "").split(",")))
        self.selector = selectors.DefaultSelector()
        self.mount_table = sources.mount_table(mountinfo_path)
        self.selector.register(self.mount_table, selectors.EVENT_READ, self._on_mounts)
        self.owners = sources.owner_exits()
        self.selector.register(self.owners, selectors.EVENT_READ, self._on_owner_exit)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)
        self.interfaces: InterfaceWatch | None = None
        self.bus: SystemdWatch | None = None
        self._last_error, self._last_error_at = "", 0.0

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while not self.state.stop_requested:
            self.turn()
        return self.finish()

    def start(self) -> None:
        """Signals, sources and the first pass; READY=1 once the first verdicts are out."""
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number
        if in_host_mount_namespace() is False:
            self._event(
                "WRONG_NAMESPACE",
                "not in the host's mount namespace (PID 1's): unmounts here would not reach "
                "the host; check the unit for PrivateMounts= and Protect*= options",
                logging.ERROR,
                result="wrong-namespace",
            )
        now = self.clock()
        self._connect_bus(now)
        self._open_interfaces()
        self._reread(now)
        self._evaluate(now)
        self.notifier.ready()
        rules = len(self.config.rules)
        message = f"watching {rules} target rules from {self.config.source}"
        self._event("STARTED", message, result="ready")

    def turn(self, timeout: float | None = None) -> None:
        """Sleep until a source wakes us or a deadline is due (at most ``timeout``), then run
        every wake handler and every due job."""
        wait = self.schedule.timeout(self.clock())
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        for key, _ in self.selector.select(wait):
            self._survive(key.data)
        if self.state.reload_requested:
            self._survive(self._reload)
        for job in Job:  # each is checked after the one before it ran: see Job
            if self.schedule.is_due(job, self.clock()):
                self._survive(self._jobs[job])

    @property
    def _jobs(self) -> dict[Job, Callable[[float], None]]:
        return {
            Job.PING: self._ping,
            Job.BUS_RETRY: self._connect_bus,
            Job.RESCAN: self._rescan,
            Job.REREAD: self._reread,
            Job.EVALUATE: self._evaluate,
        }

    def _survive(self, step: Callable[[float], None]) -> None:
        """Run one step; an OSError from the node (EMFILE, ENOMEM, EACCES...) is logged and
        retried later instead of ending the daemon. Programming errors still crash it, and
        systemd's Restart=on-failure brings it back with a clean state."""
        now = self.clock()
        try:
            step(now)
        except OSError as exc:
            message = f"{getattr(step, '__name__', 'step')}: {exc}"
            if message != self._last_error or now - self._last_error_at > ERROR_REPEAT:
                self.log.error(
                    "carrying on after an error (retrying in %g s): %s",
                    ERROR_RETRY,
                    message,
                    exc_info=True,
                )
                self._last_error, self._last_error_at = message, now
            self.state.liveness_stale = True
            self.schedule = self.schedule.after_error(now)

    # ---- sources -----------------------------------------------------------------------------

    def _open_interfaces(self) -> None:
        try:
            self.interfaces = self.sources.interfaces()
        except UdevUnavailable as exc:
            message = f"no interface events, carrying on without them: {exc}"
            self._degraded(message, str(exc), "no-netlink")
            return
        self.selector.register(self.interfaces, selectors.EVENT_READ, self._on_uevents)

    def _connect_bus(self, now: float) -> None:
        watch = self.sources.systemd(self.config.kubelet_unit)
        socket_present = self.sources.bus_present()
        try:
            # No socket, no point loading pystemd (tens of ms at start) to be told so.
            if not socket_present:
                raise BusUnavailable(
                    f"no D-Bus system bus socket at {watch.where}; start dbus (systemctl "
                    "start dbus) or set DBUS_SYSTEM_BUS_ADDRESS. Until then kubelet is judged "
                    "by its process"
                )
            watch.connect()
            kubelet = watch.kubelet()
        except BusUnavailable as exc:
            watch.close()
            if self.schedule.bus_outage_started:  # say it once per outage, not per retry
                self._degraded(f"running degraded: {exc}", str(exc), "no-bus")
            self.schedule = self.schedule.bus_failed(now, socket_present)
            return
        self.bus, self.schedule = watch, self.schedule.bus_connected()
        self.selector.register(watch, selectors.EVENT_READ, self._on_bus)
        self._set_kubelet(kubelet, now)
        self.log.info("following systemd over D-Bus (%s: %s)", watch.where, kubelet.detail)
        self._on_bus(now)  # signals that arrived during the blocking calls

    def _drop_bus(self, now: float, reason: str) -> None:
        if self.bus is not None:
            self.selector.unregister(self.bus)
            self.bus.close()
            self.bus = None
        message = f"{reason}; judging kubelet by its process until the bus is back"
        self._degraded(message, reason, "bus-lost")
        self.schedule = self.schedule.bus_lost(now).evaluate_by(now)
        self.state.liveness_stale = True

    # ---- wake handlers: record what happened, decide nothing --------------------------------

    def _on_mounts(self, now: float) -> None:
        self.mount_table.pause()
        self.schedule = self.schedule.mounts_changed(now)

    def _on_uevents(self, now: float) -> None:
        assert self.interfaces is not None  # registered only once opened
        events = self.interfaces.drain()
        for ev in events:
            self.log.debug("interface %s: %s", ev.name or "(overflow)", ev.action)
        if events:
            self.state.liveness_stale = True
            self.schedule = self.schedule.mounts_changed(now)

    def _on_owner_exit(self, now: float) -> None:
        exited = self.owners.drain()
        if exited:
            self.log.debug("watched processes exited: %s", exited)
            self.state.liveness_stale = True
            self.schedule = self.schedule.evaluate_by(now)

    def _on_bus(self, now: float) -> None:
        assert self.bus is not None  # registered only while connected
        for ev in self.bus.process():
            if isinstance(ev, KubeletChanged):
                self._set_kubelet(ev.state, now)
                self.log.info("kubelet: %s", ev.state.detail)
            elif isinstance(ev, Decommissioned):
                self.state.decommissioned = True
                self.log.warning("node decommission: %s; reaping without grace period", ev.reason)
            elif isinstance(ev, ShuttingDown):
                self.state.shutting_down = True
                self.log.info("system is going down: %s", ev.reason)
            elif isinstance(ev, BusLost):
                self._drop_bus(now, ev.reason)
                return
        self.schedule = self.schedule.evaluate_by(now)

    def _on_signal(self, now: float) -> None:
        try:
            signums = os.read(self._signal_r, 64)
        except BlockingIOError:
            return
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.state.stop_requested = True
            elif signum == signal.SIGHUP:
                self.state.reload_requested = True
            elif signum == signal.SIGUSR2 and "freeze-on-usr2" in self.faults:
                self.log.warning("fault switch freeze-on-usr2: freezing the loop")
                while True:  # the watchdog must notice and restart us
                    time.sleep(3600)

    # ---- jobs --------------------------------------------------------------------------------

    def _ping(self, now: float) -> None:
        self.notifier.watchdog_ping()
        self.schedule = self.schedule.pinged(now)

    def _rescan(self, now: float) -> None:
        # Safety net for a change no event told us about: re-read the table, and a difference
        # schedules new verdicts (_apply). Owner exits come through pidfds and every reap
        # rescans the processes first, so /proc and the verdicts need a periodic look only
        # where pidfds are missing, or to keep the metrics' last pass fresh. Skipping them is
        # most of an idle wake's cost (bench/ scenario 5).
        self.schedule = self.schedule.rescanned(now)
        if not self.owners.supported or self.config.metrics_path:
            self.state.liveness_stale |= not self.owners.supported
            self.schedule = self.schedule.evaluate_by(now)

    def _read(self) -> ParseResult:
        """Every read of the table goes through the source: reading re-arms it."""
        parsed = self.mount_table.read(search_needles(self.config.rules))
        self.schedule = self.schedule.reread_done(self.clock())
        self.state.rereads += 1
        return parsed

    def _reread(self, now: float) -> None:
        self._apply(Table.of(self._read(), self.config), now)

    def _apply(self, table: Table, now: float) -> None:
        """Take a fresh table as the current view; journal the target mounts that changed."""
        changed = journal_table_changes(self.log, self.state.table, table, self.config)
        self.state.table = table
        if changed:
            self.state.liveness_stale = True
            self.schedule = self.schedule.evaluate_by(now)

    def _set_kubelet(self, state: KubeletState, now: float) -> None:
        self.state.liveness = replace(self.state.liveness, kubelet=state)
        if self.state.decommissioned and not state.decommissioned:
            self.state.decommissioned = False
            self.log.info("kubelet is back (%s): decommission cancelled", state.detail)
        self.schedule = self.schedule.evaluate_by(now)

    def _observe(self, now: float) -> Liveness:
        """Scan /proc for owners (and kubelet, without a bus) and watch their exits."""
        processes = list(scan_processes())
        watched = {*self.config.owner_names} | (set() if self.bus else {"kubelet"})
        found = find_owners(processes, watched)
        kubelet = self.state.liveness.kubelet if self.bus else kubelet_from_processes(processes)
        # A pidfd per live owner: its exit wakes us at once instead of at the next rescan.
        if self.owners.watch(pid for pids in found.values() for pid in pids):
            self.schedule = self.schedule.evaluate_by(now)  # one died meanwhile: look again
            self.state.liveness_stale = True
        owners = {name: pids for name, pids in found.items() if name in self.config.owner_names}
        return Liveness(owners=owners, kubelet=kubelet)

    def _mode(self) -> Mode:
        return Mode.DECOMMISSION if self.state.decommissioned else Mode.NORMAL

    def _evaluate(self, now: float) -> None:
        """Verdicts, grace timers and, when one is due, a reap."""
        st = self.state
        self.schedule = self.schedule.evaluated()
        if not st.table.sites:
            st.timers, st.reasons = grace.GraceTimers(), {}
            self.owners.watch(())
            self._publish(())
            return
        scanned = st.liveness_stale
        if scanned:
            st.liveness_stale = False
            st.liveness = self._observe(now)
        mode = self._mode()
        assessments = plan(st.table.mounts, st.liveness, mode, self.config, st.table.sites)
        immediate = mode is Mode.DECOMMISSION
        decision = grace.decide(
            st.timers, assessments.assessments, now, self.config.grace_period, immediate
        )
        if decision.due and not scanned:
            # An owner may have started since the last scan (a start sends no event): decide
            # an unmount on a fresh look at the processes, never on an old one.
            st.liveness_stale = True
            self._evaluate(now)
            return
        wait = 0.0 if immediate else self.config.grace_period
        st.reasons = journal_verdicts(self.log, st.reasons, assessments.assessments, wait)
        st.timers = decision.timers
        if decision.next_deadline is not None:
            self.schedule = self.schedule.evaluate_by(decision.next_deadline)
        if decision.due:
            self._reap(mode, {a.site.mount_point for a in decision.due}, now)
        self._publish(assessments.assessments)

    def _reap(self, mode: Mode, only: set[str] | None, now: float) -> list[str]:
        """Reap, journal and count; returns the mount points that are gone."""
        report = run_pass(
            self.config,
            mode,
            liveness=self.state.liveness,
            only=only,
            on_outcome=lambda outcome, action: journal_outcome(self.log, outcome, action),
            mountinfo_path=self.mountinfo_path,
            table=self.state.table,
            read=self._read,
        )
        tally, counters = journal_report(self.log, report), self.state.counters
        counters.reaps_total += tally.reaped
        counters.failures_total += tally.failed
        counters.refusals_total += tally.refused
        # The pass ended with a fresh read: take it as our view at once, so a mount that
        # reappears right after our unmount (same recycled ID, same place) is seen as new.
        if report.table is not None:
            self._apply(report.table, now)
        return [a.site.mount_point for a in report.reaped]

    def _publish(self, assessments: Iterable[Assessment]) -> None:
        """STATUS= line and the metrics file."""
        items = list(assessments)
        self.notifier.status(status_text(items, len(self.config.rules), self.bus is not None))
        self.state.counters.targets_mounted = len(items)
        self.state.counters.last_pass_timestamp_seconds = time.time()
        if self.config.metrics_path:
            try:
                metrics.write_textfile(self.config.metrics_path, self.state.counters)
            except OSError as exc:
                self.log.warning("cannot write metrics: %s", exc)

    def _reload(self, now: float) -> None:
        self.state.reload_requested = False
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            message = f"new config rejected, keeping the old one: {exc}"
            self._event(
                "CONFIG_REJECTED", message, logging.ERROR, reason=str(exc), result="kept-old"
            )
            return
        self.config = new
        self.state.liveness_stale = True
        # The rules may have changed, so the sites must be found again in a fresh read.
        self.schedule = self.schedule.mounts_changed(now)
        self.log.info("config reloaded from %s", new.source)

    # ---- stopping ----------------------------------------------------------------------------

    def finish(self) -> int:
        """The stop: a final reap if the policy and the system's state call for one."""
        now = self.clock()
        going_down = self.state.shutting_down or self._system_stopping()
        policy = ReapOnStop(self.config.reap_on_stop)
        decision = decide_stop(policy, going_down)
        self.notifier.stopping()
        self._event(
            "STOPPING",
            f"stopping ({decision.why}); final reap: {'yes' if decision.final_reap else 'no'} "
            f"(reap_on_stop={policy.value}); {self.state.rereads} table re-reads",
            reason=decision.why,
            result="final-reap" if decision.final_reap else "no-reap",
        )
        if decision.final_reap:
            # A busy mount may need every retry; ask systemd for the time before using it.
            retries = sum(self.config.busy_backoff * 2**i for i in range(self.config.busy_retries))
            self.notifier.extend_timeout(5 + 2 * retries)
            self.state.table = Table.of(self._read(), self.config)  # plan from the kernel's view
            reaped = self._reap(Mode.SHUTDOWN, None, now)
            if self.bus is not None:
                wait_for_pid1(self.bus, reaped, self.log, self.clock)
        self._publish(())
        self.close()
        return 0

    def _system_stopping(self) -> bool:
        if self.bus is None:
            return False
        try:
            return self.bus.system_stopping()
        except BusUnavailable as exc:
            self.log.warning("cannot tell whether the system is stopping: %s", exc)
            return False

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for source in (self.bus, self.interfaces, self.owners, self.mount_table):
            if source is not None:
                source.close()
        self.selector.close()
        os.close(self._signal_r)
        os.close(self._signal_w)

    def _degraded(self, message: str, reason: str, result: str) -> None:
        self._event("DEGRADED", message, logging.WARNING, reason=reason, result=result)

    def _event(self, name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        journal.event(self.log, name, message, level=level, stacklevel=2, **fields)


# ---- what the daemon says, as functions of what it knows ------------------------------------


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
            mount_point=a.site.mount_point,
            target=a.site.rule.name,
            mount_id=a.site.roots[0].mount_id,
            fstype=a.site.roots[0].fstype,
            reason=a.reason,
            result=result,
        )
    return now


def status_text(assessments: list[Assessment], rules: int, on_bus: bool) -> str:
    held = sum(1 for a in assessments if not a.reap)
    text = f"watching {rules} target rules; {len(assessments)} mounted"
    if held:
        text += f", {held} left alone ({assessments[0].reason if held == 1 else 'see journal'})"
    return text if on_bus else text + "; degraded: no D-Bus"


def wait_for_pid1(
    bus: SystemdWatch, mount_points: list[str], log: logging.Logger, clock: Callable[[], float]
) -> None:
    """At shutdown, let PID 1 see our unmounts before our unit counts as stopped.

    systemd re-reads the mount table at most a few times a second. If our stop completes
    before it has noticed, PID 1 still thinks the path is mounted and runs its own umount
    on it ("Unmounting run-calico-cgroup.mount"), which at best fails noisily. Bounded: a
    PID 1 that does not catch up within PID1_CATCH_UP seconds is not waited for.
    """
    units = [mount_unit(p) for p in mount_points]
    deadline = clock() + PID1_CATCH_UP
    try:
        while units and clock() < deadline:
            units = [u for u in units if bus.unit_state(u).active]
            if units:
                time.sleep(0.05)
    except BusUnavailable as exc:
        log.warning("cannot tell whether systemd saw the unmounts: %s", exc)
        return
    if units:
        log.warning("systemd still lists %s as mounted after %g s", ", ".join(units), PID1_CATCH_UP)


def _without_line_number(warning: str) -> str:
    return re.sub(r"^mountinfo line \d+ ", "", warning)


def run(config_path: str | None, verbose: bool = False) -> int:
    """`calico-mount-reaper run`: load the config, then serve until stopped."""
    log = journal.setup(verbose)
    try:
        config = config_mod.load(config_path)
    except ConfigError as exc:
        journal.event(
            log,
            "CONFIG_REJECTED",
            f"cannot start: {exc}",
            level=logging.ERROR,
            reason=str(exc),
            result=f"exit-{EXIT_CONFIG}",
        )
        return EXIT_CONFIG
    return Daemon(config, config_path, log, Notifier()).run()
