"""The node daemon: one selector loop that wires event sources to the core.

Sources (each a thin object over a file descriptor, opened through `Sources`): mount changes
(fanotify mount events where the kernel has them, else POLLPRI on mountinfo: `mountevents`),
systemd over D-Bus, kernel uevents for dataplane interfaces, pidfds of
owner processes, and signals (through a wakeup pipe). A wake only records what happened, in
the `Judge` (what is known) and the `Schedule` (what is due); the loop then runs the jobs the
schedule says are due: the watchdog ping, a bus retry, the safety-net rescan, a coalesced
re-read of the table, the verdicts. Decisions are made by the pure core (plan, grace,
schedule, stopping); this module only wires them to the system.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from calico_mount_reaper import config as config_mod
from calico_mount_reaper import journal
from calico_mount_reaper.config import Config, ConfigError
from calico_mount_reaper.exitcode import ExitCode
from calico_mount_reaper.judge import Judge
from calico_mount_reaper.liveness import system_bus_present
from calico_mount_reaper.model import KubeletState, ReapOnStop
from calico_mount_reaper.mountinfo import ParseResult
from calico_mount_reaper.mounttable import WatchedTable
from calico_mount_reaper.notify import Notifier, watchdog_interval
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.reaper import MOUNTINFO, in_host_mount_namespace
from calico_mount_reaper.schedule import ERROR_RETRY, Job, Schedule
from calico_mount_reaper.sources import fanotify
from calico_mount_reaper.sources.fanotify import MountEvents
from calico_mount_reaper.sources.mountchanges import Do, MountChanges
from calico_mount_reaper.sources.mountinfo import MountTableWatch
from calico_mount_reaper.sources.processes import OwnerExits
from calico_mount_reaper.sources.signals import Signals
from calico_mount_reaper.sources.systemd import (
    BusLost,
    BusUnavailable,
    Decommissioned,
    KubeletChanged,
    ShuttingDown,
    SystemdWatch,
)
from calico_mount_reaper.sources.udev import InterfaceWatch, UdevUnavailable
from calico_mount_reaper.stopping import StopDecision, decide_stop
from calico_mount_reaper.unitname import mount_unit

# Repeat the same error line at most this often, so a persistent fault cannot flood the journal.
ERROR_REPEAT = 60.0
# How long a final reap at shutdown waits for PID 1 to notice the unmounts.
PID1_CATCH_UP = 2.0
# Test-only fault switches (README, "Fault switches"): never set on a real node.
FAULTS_ENV = "CALICO_MOUNT_REAPER_FAULTS"


@dataclass(frozen=True)
class Sources:
    """How the daemon opens its event sources. Tests pass their own (a real source under a
    fault, a table with planted lines); the defaults are the real ones.

    ``mount_table`` is the one way the daemon reads mountinfo: a back-end that reads it
    differently slots in here. ``mount_events`` is fanotify's watch, used after
    ``fanotify_probe`` says it works.
    """

    mount_table: Callable[[str], MountTableWatch] = MountTableWatch
    mount_events: Callable[[], MountEvents] = MountEvents
    fanotify_probe: Callable[[], fanotify.Probe] = fanotify.probe
    owner_exits: Callable[[], OwnerExits] = OwnerExits
    interfaces: Callable[[], InterfaceWatch] = InterfaceWatch
    systemd: Callable[[str], SystemdWatch] = SystemdWatch
    bus_present: Callable[[], bool] = system_bus_present


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
        self.sources, self.clock = sources, clock
        self.schedule = Schedule.start(clock(), config.rescan_interval, watchdog_interval())
        self.faults = frozenset(filter(None, os.environ.get(FAULTS_ENV, "").split(",")))
        self.selector = selectors.DefaultSelector()
        self.mount_table = sources.mount_table(mountinfo_path)
        self.selector.register(self.mount_table, selectors.EVENT_READ, self._on_mounts)
        self.owners = sources.owner_exits()
        self.selector.register(self.owners, selectors.EVENT_READ, self._on_owner_exit)
        self.signals = Signals()
        self.selector.register(self.signals, selectors.EVENT_READ, self._on_signal)
        self.judge = Judge(config, log, notifier, self.owners, self._read, mountinfo_path)
        self.mounts = self.judge.mounts = WatchedTable(self.mount_table, config, self._degraded)
        wakes = (self._on_mounts, self._on_mount_events)
        self.changes = MountChanges(self.mount_table, self.selector, wakes, self._degraded, sources)
        self.judge.mount_events = self.changes.follow(self.mounts, config.rules).value
        self.interfaces: InterfaceWatch | None = None
        self.bus: SystemdWatch | None = None
        self.errors = ErrorLog(log)
        self.rereads = 0
        self.stop_requested = self.reload_requested = self.shutting_down = False

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        while not self.stop_requested:
            self.turn()
        return self.finish()

    def start(self) -> None:
        """Signals, sources and the first pass; READY=1 once the first verdicts are out."""
        self.signals.install()
        warn_unless_in_host_mount_namespace(self.log)
        now = self.clock()
        self._connect_bus(now)
        self._open_interfaces()
        self._reread(now)
        self._evaluate(now)
        self.notifier.ready()
        message = f"watching {len(self.config.rules)} target rules from {self.config.source}"
        message += f"; {self.mounts}; {self.changes}"
        self._event("STARTED", message, result="ready", **self.mounts.fields, **self.changes.fields)

    def turn(self, timeout: float | None = None) -> None:
        """Sleep until a wake or a deadline (at most ``timeout``), then handle what is due."""
        wait = self.schedule.timeout(self.clock())
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        for key, _ in self.selector.select(wait):
            self._survive(key.data)
        if self.reload_requested:
            self._survive(self._reload)
        jobs = (  # pairs, not a dict: an Enum's hash is a Python call
            (Job.PING, self._ping),
            (Job.BUS_RETRY, self._connect_bus),
            (Job.RESCAN, self._rescan),
            (Job.REREAD, self._reread),
            (Job.EVALUATE, self._evaluate),
        )
        for job, step in jobs if self.schedule.any_due(self.clock()) else ():
            if self.schedule.is_due(job, self.clock()):  # after the one before it ran: see Job
                self._survive(step)

    def _survive(self, step: Callable[[float], None]) -> None:
        """Run one step; an OSError from the node (EMFILE, ENOMEM, EACCES...) is logged and
        retried later instead of ending the daemon. Programming errors still crash it, and
        systemd's Restart=on-failure brings it back with a clean state."""
        now = self.clock()
        try:
            step(now)
        except OSError as exc:
            self.errors.report(f"{getattr(step, '__name__', 'step')}: {exc}", now)
            self.judge.stale = True
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
        try:
            watch, kubelet = connect_systemd(self.sources, self.config.kubelet_unit)
        except BusUnavailable as exc:
            if self.schedule.bus_outage_started:  # say it once per outage, not per retry
                self._degraded(f"running degraded: {exc}", str(exc), "no-bus")
            self.schedule = self.schedule.bus_failed(now, self.sources.bus_present())
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
        self._set_kubelet(None, now)
        self.schedule = self.schedule.bus_lost(now)

    # ---- wake handlers: record what happened, decide nothing --------------------------------

    def _on_mounts(self, now: float) -> None:
        self.mount_table.pause()
        self.schedule = self.schedule.mounts_changed(now)

    def _on_mount_events(self, now: float) -> None:
        wake = self.changes.drain(self.judge.table.mounts, self.schedule.reread_pending)
        if wake.do is Do.UPDATE and self.judge.take_mounts(wake.mounts):  # journaled at once
            self.schedule = self.schedule.evaluate_by(now)
        elif wake.do in (Do.REREAD, Do.FALL_BACK):
            self.schedule = self.schedule.mounts_changed(now)

    def _on_uevents(self, now: float) -> None:
        assert self.interfaces is not None  # registered only once opened
        events = self.interfaces.drain()
        for ev in events:
            self.log.debug("interface %s: %s", ev.name or "(overflow)", ev.action)
        if events:
            self.judge.stale = True
            self.schedule = self.schedule.mounts_changed(now)

    def _on_owner_exit(self, now: float) -> None:
        exited = self.owners.drain()
        if exited:
            self.log.debug("watched processes exited: %s", exited)
            self.judge.stale = True
            self.schedule = self.schedule.evaluate_by(now)

    def _on_bus(self, now: float) -> None:
        assert self.bus is not None  # registered only while connected
        for ev in self.bus.process():
            if isinstance(ev, KubeletChanged):
                self._set_kubelet(ev.state, now)
                self.log.info("kubelet: %s", ev.state.detail)
            elif isinstance(ev, Decommissioned):
                self.judge.decommissioned = True
                self.log.warning("node decommission: %s; reaping without grace period", ev.reason)
            elif isinstance(ev, ShuttingDown):
                self.shutting_down = True
                self.log.info("system is going down: %s", ev.reason)
            elif isinstance(ev, BusLost):
                self._drop_bus(now, ev.reason)
                return
        self.schedule = self.schedule.evaluate_by(now)

    def _on_signal(self, now: float) -> None:
        for signum in self.signals.drain():
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_requested = True
            elif signum == signal.SIGHUP:
                self.reload_requested = True
            elif signum == signal.SIGUSR2 and "freeze-on-usr2" in self.faults:
                self.log.warning("fault switch freeze-on-usr2: freezing the loop")
                while True:  # the watchdog must notice and restart us
                    time.sleep(3600)

    def _set_kubelet(self, state: KubeletState | None, now: float) -> None:
        self.judge.set_kubelet(state)
        self.schedule = self.schedule.evaluate_by(now)

    # ---- jobs --------------------------------------------------------------------------------

    def _ping(self, now: float) -> None:
        self.notifier.watchdog_ping()
        self.schedule = self.schedule.pinged(now)

    def _rescan(self, now: float) -> None:
        # Safety net: re-read the table. /proc and the verdicts only without pidfds or for the
        # metrics: skipping them is most of an idle wake's cost (bench/ scenario 5).
        self.schedule = self.schedule.rescanned(now)
        if not self.owners.supported or self.config.metrics_path:
            self.judge.stale |= not self.owners.supported
            self.schedule = self.schedule.evaluate_by(now)

    def _read(self) -> ParseResult:
        """Every read of the table goes through the source: reading re-arms it."""
        parsed = self.mounts.read(self.config)
        # A reload or a refusal may have changed the back-end, and with it the source.
        self.judge.mount_events = self.changes.follow(self.mounts, self.config.rules).value
        self.schedule = self.schedule.reread_done(self.clock())
        self.rereads += 1
        return parsed

    def _reread(self, now: float) -> None:
        if self.judge.take_read():
            self.schedule = self.schedule.evaluate_by(now)

    def _evaluate(self, now: float) -> None:
        self.schedule = self.schedule.evaluated()
        again = self.judge.evaluate(now)
        if again is not None:
            self.schedule = self.schedule.evaluate_by(again)

    def _reload(self, now: float) -> None:
        self.reload_requested = False
        new = reload_config(self.config_path, self.log)
        if new is None:
            return
        self.config = self.judge.config = new
        self.judge.stale = True
        # The rules may have changed, so the sites must be found again in a fresh read.
        self.schedule = self.schedule.mounts_changed(now)
        self.log.info("config reloaded from %s", new.source)

    # ---- stopping ----------------------------------------------------------------------------

    def finish(self) -> int:
        """The stop: a final reap if the policy and the system's state call for one."""
        going_down = self.shutting_down or system_stopping(self.bus, self.log)
        policy = ReapOnStop(self.config.reap_on_stop)
        decision = decide_stop(policy, going_down)
        self.notifier.stopping()
        journal_stopping(self.log, decision, policy, self.rereads)
        if decision.final_reap:
            self.notifier.extend_timeout(final_reap_budget(self.config))
            self.judge.take_read()  # plan from the kernel's view
            reaped = self.judge.reap(Mode.SHUTDOWN, None)
            if self.bus is not None:
                wait_for_pid1(self.bus, reaped, self.log, self.clock)
        self.judge.publish(())
        self.close()
        return 0

    def close(self) -> None:
        for source in (self.bus, self.interfaces, self.owners, self.changes, self.signals):
            if source is not None:
                source.close()
        self.selector.close()

    def _degraded(self, message: str, reason: str, result: str) -> None:
        self._event("DEGRADED", message, logging.WARNING, reason=reason, result=result)

    def _event(self, name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        journal.event(self.log, name, message, level=level, stacklevel=2, **fields)


def warn_unless_in_host_mount_namespace(log: logging.Logger) -> None:
    if in_host_mount_namespace() is False:
        journal.event(
            log,
            "WRONG_NAMESPACE",
            "not in the host's mount namespace (PID 1's): unmounts here would not reach the "
            "host; check the unit for PrivateMounts= and Protect*= options",
            level=logging.ERROR,
            result="wrong-namespace",
        )


def reload_config(path: str | None, log: logging.Logger) -> Config | None:
    """The config file again (SIGHUP), or None, journaled, if it is bad: the old one stays."""
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        journal.event(
            log,
            "CONFIG_REJECTED",
            f"new config rejected, keeping the old one: {exc}",
            level=logging.ERROR,
            reason=str(exc),
            result="kept-old",
        )
        return None


def journal_stopping(
    log: logging.Logger, decision: StopDecision, policy: ReapOnStop, rereads: int
) -> None:
    final = "yes" if decision.final_reap else "no"
    journal.event(
        log,
        "STOPPING",
        f"stopping ({decision.why}); final reap: {final} (reap_on_stop={policy.value}); "
        f"{rereads} table re-reads",
        reason=decision.why,
        result="final-reap" if decision.final_reap else "no-reap",
    )


def system_stopping(bus: SystemdWatch | None, log: logging.Logger) -> bool:
    """Whether systemd is taking the system down (False when it cannot be asked)."""
    if bus is None:
        return False
    try:
        return bus.system_stopping()
    except BusUnavailable as exc:
        log.warning("cannot tell whether the system is stopping: %s", exc)
        return False


def connect_systemd(sources: Sources, kubelet_unit: str) -> tuple[SystemdWatch, KubeletState]:
    """A connected watch and kubelet's state; raises BusUnavailable (the watch closed)."""
    watch = sources.systemd(kubelet_unit)
    try:
        # No socket, no point loading pystemd (tens of ms at start) to be told so.
        if not sources.bus_present():
            raise BusUnavailable(
                f"no D-Bus system bus socket at {watch.where}; start dbus (systemctl start "
                "dbus) or set DBUS_SYSTEM_BUS_ADDRESS. Until then kubelet is judged by its process"
            )
        watch.connect()
        return watch, watch.kubelet()
    except BusUnavailable:
        watch.close()
        raise


def final_reap_budget(config: Config) -> float:
    """Seconds to ask systemd for before a final reap: a busy mount may need every retry."""
    retries = sum(config.busy_backoff * (1 << i) for i in range(config.busy_retries))
    return 5 + 2 * retries


class ErrorLog:
    """Logs a step's error, but the same one at most every ERROR_REPEAT seconds, so a
    persistent fault cannot flood the journal."""

    def __init__(self, log: logging.Logger) -> None:
        self.log, self.last, self.last_at = log, "", 0.0

    def report(self, message: str, now: float) -> None:
        if message != self.last or now - self.last_at > ERROR_REPEAT:
            retry = f"carrying on after an error (retrying in {ERROR_RETRY:g} s)"
            self.log.error("%s: %s", retry, message, exc_info=True)
            self.last, self.last_at = message, now


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
            result=f"exit-{int(ExitCode.CONFIG)}",
        )
        return ExitCode.CONFIG
    return Daemon(config, config_path, log, Notifier()).run()
