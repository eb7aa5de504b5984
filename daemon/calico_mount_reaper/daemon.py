"""The node daemon: one selector loop that wires event sources to the core.

Sources (each a thin object over a file descriptor): the mount table (POLLPRI on mountinfo),
systemd over D-Bus, kernel uevents for dataplane interfaces, pidfds of owner processes, and
signals (through a wakeup pipe). Every wake only records what happened; `_tick` then decides
what work is due: a coalesced re-read of the table, a liveness scan, grace timers, a reap.
Decisions themselves are made by the pure core (plan, grace); this module only schedules.

Idle, the loop sleeps until the next deadline, and the only regular deadline is the watchdog
ping, sent at half of WatchdogSec or every rescan_interval if that is shorter: the safety-net
rescan and the bus retries ride on those wakes, so an idle daemon wakes once a minute.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from calico_mount_reaper import config as config_mod
from calico_mount_reaper import grace, journal, liveness, metrics
from calico_mount_reaper.config import Config, ConfigError
from calico_mount_reaper.exitcode import ExitCode
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
from calico_mount_reaper.sources.mountinfo import Coalescer, MountTableWatch, diff
from calico_mount_reaper.sources.processes import OwnerExits
from calico_mount_reaper.targets import rule_for, search_needles

# Re-reads of the mount table are at least this far apart, however many events arrive.
REREAD_INTERVAL = 0.2
BUS_RETRY_FIRST, BUS_RETRY_MAX = 1.0, 60.0
# After an OSError in a step: retry this much later, and repeat the same log line at most this
# often, so a persistent fault neither spins the loop nor floods the journal.
ERROR_RETRY, ERROR_REPEAT = 1.0, 60.0
# How long a final reap at shutdown waits for PID 1 to notice the unmounts.
PID1_CATCH_UP = 2.0
# Test-only fault switches (README, "Fault switches"): never set on a real node.
FAULTS_ENV = "CALICO_MOUNT_REAPER_FAULTS"


@dataclass
class State:
    """What the loop knows between wakes. Plain data: every change goes through the Daemon."""

    table: Table = field(default_factory=lambda: Table((), (), ()))
    liveness: liveness.Liveness = field(default_factory=liveness.Liveness)
    timers: grace.GraceTimers = field(default_factory=grace.GraceTimers)
    reasons: dict[tuple[str, tuple[int, ...]], str] = field(default_factory=dict)
    decommissioned: bool = False
    shutting_down: bool = False
    stop_requested: bool = False
    reload_requested: bool = False
    liveness_stale: bool = True
    evaluate_at: float | None = 0.0  # when the verdicts must be looked at again
    rereads: int = 0
    counters: metrics.Counters = field(default_factory=metrics.Counters)


class Daemon:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        log: logging.Logger,
        notifier: Notifier,
        *,
        clock: Callable[[], float] = time.monotonic,
        mountinfo_path: str = MOUNTINFO,
    ) -> None:
        self.config, self.config_path, self.log, self.notifier = config, config_path, log, notifier
        self.clock = clock
        self.mountinfo_path = mountinfo_path
        self.state = State()
        self.selector = selectors.DefaultSelector()
        self.faults = frozenset(filter(None, os.environ.get(FAULTS_ENV, "").split(",")))

        self.mount_watch = MountTableWatch(mountinfo_path)
        self.coalescer = Coalescer(REREAD_INTERVAL)
        self.selector.register(self.mount_watch, selectors.EVENT_READ, self._on_mounts)
        self.owners = OwnerExits()
        self.selector.register(self.owners, selectors.EVENT_READ, self._on_owner_exit)
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._on_signal)

        self.udev: Any = None
        self.bus: Any = None
        self.bus_retry_at: float | None = None
        self.bus_backoff = BUS_RETRY_FIRST
        self._last_error, self._last_error_at = "", 0.0
        self.watchdog = watchdog_interval()
        now = clock()
        self.next_ping = self._next_ping(now)
        self.next_rescan = now + config.rescan_interval

    # ---- sources ----------------------------------------------------------------------------

    def _open_udev(self) -> None:
        from calico_mount_reaper.sources.udev import InterfaceWatch, UdevUnavailable

        try:
            self.udev = InterfaceWatch()
        except UdevUnavailable as exc:
            self._event(
                "DEGRADED",
                f"no interface events, carrying on without them: {exc}",
                logging.WARNING,
                reason=str(exc),
                result="no-netlink",
            )
            return
        self.selector.register(self.udev, selectors.EVENT_READ, self._on_uevents)

    def _connect_bus(self, now: float) -> None:
        from calico_mount_reaper.sources.systemd import BusUnavailable, SystemdWatch

        watch = SystemdWatch(self.config.kubelet_unit)
        try:
            # No socket, no point loading pystemd (tens of ms at start) to be told so.
            if not liveness.system_bus_present():
                raise BusUnavailable(
                    f"no D-Bus system bus socket at {watch.where}; start dbus (systemctl "
                    "start dbus) or set DBUS_SYSTEM_BUS_ADDRESS. Until then kubelet is judged "
                    "by its process"
                )
            watch.connect()
            kubelet = watch.kubelet()
        except BusUnavailable as exc:
            watch.close()
            self.bus_retry_at = now + self.bus_backoff
            if self.bus_backoff == BUS_RETRY_FIRST:  # say it once per outage, not per retry
                self._event(
                    "DEGRADED",
                    f"running degraded: {exc}",
                    logging.WARNING,
                    reason=str(exc),
                    result="no-bus",
                )
            self.bus_backoff = min(self.bus_backoff * 2, BUS_RETRY_MAX)
            return
        self.bus, self.bus_retry_at, self.bus_backoff = watch, None, BUS_RETRY_FIRST
        self.selector.register(watch, selectors.EVENT_READ, self._on_bus)
        self._set_kubelet(kubelet)
        self.log.info("following systemd over D-Bus (%s: %s)", watch.where, kubelet.detail)
        self._on_bus(now)  # signals that arrived during the blocking calls

    def _drop_bus(self, now: float, reason: str) -> None:
        if self.bus is not None:
            self.selector.unregister(self.bus)
            self.bus.close()
            self.bus = None
        self._event(
            "DEGRADED",
            f"{reason}; judging kubelet by its process until the bus is back",
            logging.WARNING,
            reason=reason,
            result="bus-lost",
        )
        self.bus_backoff = BUS_RETRY_FIRST * 2  # the loss was just logged: no second entry
        self.bus_retry_at = now + BUS_RETRY_FIRST
        self.state.liveness_stale = True
        self._schedule(now)

    # ---- wake handlers: record what happened, decide nothing -----------------------------------

    def _on_mounts(self, now: float) -> None:
        self.mount_watch.pause()
        self.coalescer = self.coalescer.changed(now)

    def _on_uevents(self, now: float) -> None:
        events = self.udev.drain()
        for ev in events:
            self.log.debug("interface %s: %s", ev.name or "(overflow)", ev.action)
        if events:
            self.state.liveness_stale = True
            self.coalescer = self.coalescer.changed(now)

    def _on_owner_exit(self, now: float) -> None:
        exited = self.owners.drain()
        if exited:
            self.log.debug("watched processes exited: %s", exited)
            self.state.liveness_stale = True
            self._schedule(now)

    def _on_bus(self, now: float) -> None:
        from calico_mount_reaper.sources.systemd import (
            BusLost,
            Decommissioned,
            KubeletChanged,
            ShuttingDown,
        )

        for ev in self.bus.process():
            if isinstance(ev, KubeletChanged):
                self._set_kubelet(ev.state)
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
        self._schedule(now)

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

    # ---- decisions -------------------------------------------------------------------------

    def _set_kubelet(self, state: liveness.KubeletState) -> None:
        self.state.liveness = replace(self.state.liveness, kubelet=state)
        if self.state.decommissioned and not state.decommissioned:
            self.state.decommissioned = False
            self.log.info("kubelet is back (%s): decommission cancelled", state.detail)
        self._schedule(self.clock())

    def _schedule(self, when: float) -> None:
        """Look at the verdicts again no later than ``when``."""
        current = self.state.evaluate_at
        self.state.evaluate_at = when if current is None else min(current, when)

    def _read(self) -> ParseResult:
        """Every read of the table goes through the watch: reading re-arms it."""
        parsed = self.mount_watch.read(search_needles(self.config.rules))
        self.coalescer = self.coalescer.reread(self.clock())
        self.state.rereads += 1
        return parsed

    def _reread(self, now: float) -> None:
        self._apply(Table.of(self._read(), self.config), now)

    def _apply(self, table: Table, now: float) -> None:
        """Take a fresh table as the current view and journal the target mounts that changed."""
        # A malformed line stays malformed on every re-read: say so once, not once per read.
        # Its line number shifts as other mounts come and go, so it is not part of the key.
        seen = {_without_line_number(w) for w in self.state.table.warnings}
        for warning in table.warnings:
            if _without_line_number(warning) not in seen:
                self.log.warning("%s", warning)
        appeared, gone = diff(self.state.table.mounts, table.mounts)
        self.state.table = table
        for m, name, verb in [(m, "TARGET_APPEARED", "appeared") for m in appeared] + [
            (m, "TARGET_GONE", "is gone") for m in gone
        ]:
            rule = rule_for(m, self.config.rules)
            if rule is not None:
                self._event(
                    name,
                    f"{rule.name} target {m.mount_point} ({m.fstype}) {verb}",
                    mount_point=m.mount_point,
                    mount_id=m.mount_id,
                    fstype=m.fstype,
                    target=rule.name,
                )
        if appeared or gone:
            self.state.liveness_stale = True
            self._schedule(now)

    def _observe(self, now: float) -> liveness.Liveness:
        """Scan /proc for owners (and kubelet, without a bus) and watch their exits."""
        processes = list(liveness.scan_processes())
        watched = {*self.config.owner_names} | (set() if self.bus else {"kubelet"})
        found = liveness.find_owners(processes, watched)
        kubelet = (
            self.state.liveness.kubelet if self.bus else liveness.kubelet_from_processes(processes)
        )
        # A pidfd per live owner: its exit wakes us at once instead of at the next rescan.
        if self.owners.watch(pid for pids in found.values() for pid in pids):
            self._schedule(now)  # one died between the scan and the watch: look again
            self.state.liveness_stale = True
        owners = {name: pids for name, pids in found.items() if name in self.config.owner_names}
        return liveness.Liveness(owners=owners, kubelet=kubelet)

    def _mode(self) -> Mode:
        return Mode.DECOMMISSION if self.state.decommissioned else Mode.NORMAL

    def _evaluate(self, now: float) -> None:
        """Verdicts, grace timers and, when one is due, a reap."""
        st = self.state
        st.evaluate_at = None
        sites = st.table.sites
        if not sites:
            st.timers, st.reasons = grace.GraceTimers(), {}
            self.owners.watch(())
            self._publish(now, ())
            return
        scanned = st.liveness_stale
        if scanned:
            st.liveness_stale = False
            st.liveness = self._observe(now)
        assessments = plan(
            st.table.mounts, st.liveness, self._mode(), self.config, sites
        ).assessments
        decision = grace.decide(
            st.timers,
            assessments,
            now,
            self.config.grace_period,
            immediate=self._mode() is Mode.DECOMMISSION,
        )
        if decision.due and not scanned:
            # An owner may have started since the last scan (a start sends no event): decide
            # an unmount on a fresh look at the processes, never on an old one.
            st.liveness_stale = True
            self._evaluate(now)
            return
        self._log_verdicts(assessments)
        st.timers = decision.timers
        if decision.next_deadline is not None:
            self._schedule(decision.next_deadline)
        if decision.due:
            self._reap(self._mode(), {a.site.mount_point for a in decision.due}, now)
        self._publish(now, assessments)

    def _log_verdicts(self, assessments: Iterable[Assessment]) -> None:
        """One entry per change of a site's verdict, so the journal says why it waits."""
        seen = {}
        for a in assessments:
            key = grace.site_key(a.site)
            seen[key] = a.reason
            if self.state.reasons.get(key) == a.reason:
                continue
            if a.reap:
                wait = 0.0 if self._mode() is Mode.DECOMMISSION else self.config.grace_period
                message = f"{a.site.mount_point}: {a.reason}; reaping in {wait:g} s"
                result = "scheduled"
            else:
                message, result = f"{a.site.mount_point}: left alone, {a.reason}", "refused"
            self._event(
                "VERDICT",
                message,
                mount_point=a.site.mount_point,
                target=a.site.rule.name,
                mount_id=a.site.roots[0].mount_id,
                fstype=a.site.roots[0].fstype,
                reason=a.reason,
                result=result,
            )
        self.state.reasons = seen

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
        tally = journal_report(self.log, report)
        counters = self.state.counters
        counters.reaps_total += tally.reaped
        counters.failures_total += tally.failed
        counters.refusals_total += tally.refused
        # The pass ended with a fresh read: take it as our view at once, so a mount that
        # reappears right after our unmount (same recycled ID, same place) is seen as new.
        if report.table is not None:
            self._apply(report.table, now)
        return [a.site.mount_point for a in report.reaped]

    def _wait_for_pid1(self, mount_points: list[str]) -> None:
        """At shutdown, let PID 1 see our unmounts before our unit counts as stopped.

        systemd re-reads the mount table at most a few times a second. If our stop completes
        before it has noticed, PID 1 still thinks the path is mounted and runs its own umount
        on it ("Unmounting run-calico-cgroup.mount"), which at best fails noisily. Bounded: a
        PID 1 that does not catch up within PID1_CATCH_UP seconds is not waited for.
        """
        if self.bus is None or not mount_points:
            return
        from calico_mount_reaper.install import mount_unit
        from calico_mount_reaper.sources.systemd import BusUnavailable

        units = [mount_unit(p) for p in mount_points]
        deadline = self.clock() + PID1_CATCH_UP
        try:
            while units and self.clock() < deadline:
                units = [u for u in units if self.bus.unit_state(u).active]
                if units:
                    time.sleep(0.05)
        except BusUnavailable as exc:
            self.log.warning("cannot tell whether systemd saw the unmounts: %s", exc)
            return
        if units:
            self.log.warning(
                "systemd still lists %s as mounted after %g s", ", ".join(units), PID1_CATCH_UP
            )

    def _publish(self, now: float, assessments: Iterable[Assessment]) -> None:
        """STATUS= line and the metrics file."""
        items = list(assessments)
        held = sum(1 for a in items if not a.reap)
        text = f"watching {len(self.config.rules)} target rules; {len(items)} mounted"
        if held:
            text += f", {held} left alone ({items[0].reason if held == 1 else 'see journal'})"
        if self.bus is None:
            text += "; degraded: no D-Bus"
        self.notifier.status(text)
        self.state.counters.targets_mounted = len(items)
        self.state.counters.last_pass_timestamp_seconds = time.time()
        if self.config.metrics_path:
            try:
                metrics.write_textfile(self.config.metrics_path, self.state.counters)
            except OSError as exc:
                self.log.warning("cannot write metrics: %s", exc)

    def _reload(self) -> None:
        self.state.reload_requested = False
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            self._event(
                "CONFIG_REJECTED",
                f"new config rejected, keeping the old one: {exc}",
                logging.ERROR,
                reason=str(exc),
                result="kept-old",
            )
            return
        self.config = new
        self.state.liveness_stale = True
        # The rules may have changed, so the sites must be found again in a fresh read.
        self.coalescer = self.coalescer.changed(self.clock())
        self.log.info("config reloaded from %s", new.source)

    # ---- the loop --------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        st = self.state
        if st.reload_requested:
            self._reload()
        if self.next_ping is not None and now >= self.next_ping:
            self.notifier.watchdog_ping()
            self.next_ping = self._next_ping(now)
        if self.bus_retry_at is not None and now >= self.bus_retry_at:
            self._connect_bus(now)
        if now >= self.next_rescan:
            # Safety net for a change no event told us about: re-read the table, and a
            # difference schedules new verdicts (_apply). Owner exits come through pidfds and
            # every reap rescans the processes first, so /proc and the verdicts need a periodic
            # look only where pidfds are missing, or to keep the metrics' last pass fresh.
            # Skipping them is most of an idle wake's cost: touching cold code and data after
            # a long sleep costs milliseconds on a VM (bench/ scenario 5).
            self.next_rescan = now + self.config.rescan_interval
            self.coalescer = self.coalescer.changed(now)
            if not self.owners.supported or self.config.metrics_path:
                st.liveness_stale = st.liveness_stale or not self.owners.supported
                self._schedule(now)
        if self.coalescer.due is not None and now >= self.coalescer.due:
            self._reread(now)
        if st.evaluate_at is not None and now >= st.evaluate_at:
            self._evaluate(now)

    def _next_ping(self, now: float) -> float | None:
        if not self.watchdog:
            return None
        return now + ping_interval(self.watchdog, self.config.rescan_interval)

    def _timeout(self, now: float) -> float | None:
        deadlines = [
            d for d in (self.next_ping, self.coalescer.due, self.state.evaluate_at) if d is not None
        ]
        # With a watchdog, the safety-net rescan and the bus retry never wake the loop on their
        # own: they run at the first ping after they are due (the rescan at once, as pings come
        # at least every rescan_interval), and an idle daemon wakes for nothing but the pings.
        if self.next_ping is None:
            deadlines += [d for d in (self.next_rescan, self.bus_retry_at) if d is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number

    def run(self) -> int:
        self._install_signals()
        if in_host_mount_namespace() is False:
            self._event(
                "WRONG_NAMESPACE",
                "not in the host's mount namespace (PID 1's): unmounts "
                "here would not reach the host; check the unit for PrivateMounts= and "
                "Protect*= options",
                logging.ERROR,
                result="wrong-namespace",
            )
        now = self.clock()
        self._connect_bus(now)
        self._open_udev()
        self._reread(now)
        self._evaluate(now)
        self.notifier.ready()
        self._event(
            "STARTED",
            f"watching {len(self.config.rules)} target rules from {self.config.source}",
            result="ready",
        )
        while not self.state.stop_requested:
            now = self.clock()
            for key, _ in self.selector.select(self._timeout(now)):
                self._survive(key.data)
            self._survive(self._tick)
        return self._stop()

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
            # Push every deadline that is due back, or the loop would spin on the same error.
            later = now + ERROR_RETRY
            if self.coalescer.due is not None:
                self.coalescer = replace(self.coalescer, due=max(self.coalescer.due, later))
            if self.bus_retry_at is not None:
                self.bus_retry_at = max(self.bus_retry_at, later)
            self.state.liveness_stale = True
            self.state.evaluate_at = later

    def _stop(self) -> int:
        now = self.clock()
        going_down = self.state.shutting_down or self._system_stopping()
        policy = self.config.reap_on_stop
        final = policy == "always" or (policy == "shutdown" and going_down)
        why = "the system is going down" if going_down else "the service is stopping"
        self.notifier.stopping()
        self._event(
            "STOPPING",
            f"stopping ({why}); final reap: {'yes' if final else 'no'} "
            f"(reap_on_stop={policy}); {self.state.rereads} table re-reads",
            reason=why,
            result="final-reap" if final else "no-reap",
        )
        if final:
            # A busy mount may need every retry; ask systemd for the time before using it.
            retries = sum(self.config.busy_backoff * 2**i for i in range(self.config.busy_retries))
            self.notifier.extend_timeout(5 + 2 * retries)
            self.state.table = Table.of(self._read(), self.config)  # plan from the kernel's view
            reaped = self._reap(Mode.SHUTDOWN, None, now)
            self._wait_for_pid1(reaped)
        self._publish(now, ())
        self._close()
        return 0

    def _system_stopping(self) -> bool:
        if self.bus is None:
            return False
        from calico_mount_reaper.sources.systemd import BusUnavailable

        try:
            return bool(self.bus.system_stopping())
        except BusUnavailable as exc:
            self.log.warning("cannot tell whether the system is stopping: %s", exc)
            return False

    def _close(self) -> None:
        signal.set_wakeup_fd(-1)
        for source in (self.bus, self.udev):
            if source is not None and hasattr(source, "close"):
                source.close()
        self.owners.close()
        self.mount_watch.close()
        self.selector.close()
        os.close(self._signal_r)
        os.close(self._signal_w)

    def _event(self, name: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        journal.event(self.log, name, message, level=level, stacklevel=2, **fields)


def ping_interval(half_watchdog: float, rescan_interval: float) -> float:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, or the rescan interval if shorter.

    Pinging more often than systemd needs lets the rescan share the ping's wake instead of
    waking on its own: each wake costs milliseconds of CPU on a VM (bench/ scenario 5).
    """
    return min(half_watchdog, rescan_interval)


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
            result="exit-78",
        )
        return ExitCode.CONFIG
    return Daemon(config, config_path, log, Notifier()).run()
