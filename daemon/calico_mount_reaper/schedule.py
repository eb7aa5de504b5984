"""Every deadline the daemon keeps, as one value: what is due now, and how long to sleep.

Pure: time is passed in, and each event returns a new `Schedule`. The loop asks `is_due` for
each `Job` in order and `timeout` for its sleep, so no deadline can be forgotten by the sleep
or by the error path (`after_error`), and each rule below is tested without a clock or a loop.

- **Re-read** of the mount table: coalesced (`Coalescer`), so a storm of mount events costs a
  few reads a second, never one per event.
- **Evaluate** the verdicts and grace timers: as early as any event or timer asks.
- **Ping** the watchdog: at half of WatchdogSec or every rescan interval if that is shorter.
- **Rescan**: the safety net for a change no event told about. With a watchdog it never wakes
  the loop on its own: pings come at least every rescan interval, and it rides on them, so an
  idle daemon wakes for nothing but the pings.
- **Bus retry**: from 1 s, doubling, capped at 10 s while the bus socket exists or once the
  daemon has been on the bus (a restart of dbus may remove the socket for a moment), so it is
  back on D-Bus within seconds of a `systemctl restart dbus` or a PID 1 re-exec. A node that has
  shown no bus at all (none yet at boot, or none ever) backs off to a minute; only at that cap,
  with a watchdog, does the retry ride on the pings instead of waking the loop itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

# Re-reads of the mount table are at least this far apart, however many events arrive.
REREAD_INTERVAL = 0.2
BUS_RETRY_FIRST = 1.0
BUS_RETRY_MAX_WITH_SOCKET = 10.0
BUS_RETRY_MAX_WITHOUT_SOCKET = 60.0
# After an error in a step, what was due waits this long, so a persistent fault cannot spin.
ERROR_RETRY = 1.0


class Job(enum.Enum):
    """What the loop can have to do, in the order it does them within one wake.

    The order matters: a rescan asks for a re-read, and a re-read that finds a change asks for
    an evaluation, so one wake carries a change all the way to a verdict.
    """

    PING = "ping"
    BUS_RETRY = "bus-retry"
    RESCAN = "rescan"
    REREAD = "reread"
    EVALUATE = "evaluate"


@dataclass(frozen=True)
class Coalescer:
    """When the next re-read is due, given change events.

    The first change after a quiet spell is read at once; further changes wait until
    ``interval`` has passed since the last read. So re-reads are at least ``interval`` apart
    (at most ``1 / interval`` a second) and every change is read within ``interval`` of it.
    """

    interval: float = 0.25
    last_read: float | None = None
    due: float | None = None  # when the next re-read should happen; None: nothing pending

    def changed(self, now: float) -> Coalescer:
        if self.due is not None:
            return self
        if self.last_read is None:
            return replace(self, due=now)
        return replace(self, due=max(now, self.last_read + self.interval))

    def reread(self, now: float) -> Coalescer:
        return replace(self, last_read=now, due=None)


def ping_interval(half_watchdog: float, rescan_interval: float) -> float:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, or the rescan interval if shorter.

    Pinging more often than systemd needs lets the rescan share the ping's wake instead of
    waking on its own: each wake costs milliseconds of CPU on a VM (bench/ scenario 5).
    """
    return min(half_watchdog, rescan_interval)


@dataclass(frozen=True)
class Schedule:
    rescan_every: float
    rescan_at: float
    ping_every: float | None = None  # None: no watchdog
    ping_at: float | None = None
    reread: Coalescer = Coalescer(REREAD_INTERVAL)
    evaluate_at: float | None = None
    bus_retry_at: float | None = None  # None: on the bus (or not tried yet)
    bus_backoff: float = BUS_RETRY_FIRST
    bus_seen: bool = False  # was on the bus once: a missing socket is a restart, not a rule
    bus_wakes: bool = True  # whether the pending retry wakes the loop (else: the next ping)

    @classmethod
    def start(cls, now: float, rescan_every: float, half_watchdog: float | None) -> Schedule:
        every = None if half_watchdog is None else ping_interval(half_watchdog, rescan_every)
        return cls(
            rescan_every=rescan_every,
            rescan_at=now + rescan_every,
            ping_every=every,
            ping_at=None if every is None else now + every,
        )

    # ---- asking ------------------------------------------------------------------------------

    def deadline(self, job: Job) -> float | None:
        # Compared by identity, not looked up in a dict built per call: the loop asks this for
        # every job on every wake (an Enum's hash is a Python-level call).
        if job is Job.PING:
            return self.ping_at
        if job is Job.BUS_RETRY:
            return self.bus_retry_at
        if job is Job.RESCAN:
            return self.rescan_at
        if job is Job.REREAD:
            return self.reread.due
        assert job is Job.EVALUATE
        return self.evaluate_at

    def is_due(self, job: Job, now: float) -> bool:
        when = self.deadline(job)
        return when is not None and now >= when

    def timeout(self, now: float) -> float | None:
        """How long the loop may sleep: until the earliest deadline that wakes it."""
        waking = [self.ping_at, self.reread.due, self.evaluate_at]
        if self.ping_at is None:
            waking.append(self.rescan_at)
        if self.bus_wakes or self.ping_at is None:
            waking.append(self.bus_retry_at)
        deadlines = [d for d in waking if d is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def any_due(self, now: float) -> bool:
        """Whether any job is due: a wake for an event that changed nothing asks only this."""
        deadlines = (self.ping_at, self.bus_retry_at, self.rescan_at, self.reread.due)
        return any(d is not None and now >= d for d in (*deadlines, self.evaluate_at))

    @property
    def reread_pending(self) -> bool:
        """A re-read is due (now or soon): it will see every change made before it."""
        return self.reread.due is not None

    @property
    def bus_outage_started(self) -> bool:
        """No retry pending yet: a failure now is the first of an outage (say it once)."""
        return self.bus_retry_at is None

    # ---- events ------------------------------------------------------------------------------

    def mounts_changed(self, now: float) -> Schedule:
        return replace(self, reread=self.reread.changed(now))

    def reread_done(self, now: float) -> Schedule:
        return replace(self, reread=self.reread.reread(now))

    def evaluate_by(self, when: float) -> Schedule:
        """Look at the verdicts again no later than ``when``."""
        current = self.evaluate_at
        return replace(self, evaluate_at=when if current is None else min(current, when))

    def evaluated(self) -> Schedule:
        return replace(self, evaluate_at=None)

    def pinged(self, now: float) -> Schedule:
        return replace(self, ping_at=None if self.ping_every is None else now + self.ping_every)

    def rescanned(self, now: float) -> Schedule:
        """The safety net ran: its re-read is due now, the next one a full interval later."""
        return replace(self, rescan_at=now + self.rescan_every, reread=self.reread.changed(now))

    def bus_connected(self) -> Schedule:
        return replace(
            self, bus_retry_at=None, bus_backoff=BUS_RETRY_FIRST, bus_seen=True, bus_wakes=True
        )

    def bus_failed(self, now: float, socket_present: bool) -> Schedule:
        """A connection attempt failed: try again after the backoff, and back off further."""
        expected = socket_present or self.bus_seen
        cap = BUS_RETRY_MAX_WITH_SOCKET if expected else BUS_RETRY_MAX_WITHOUT_SOCKET
        wait = min(self.bus_backoff, cap)
        return replace(
            self,
            bus_retry_at=now + wait,
            bus_backoff=min(wait * 2, cap),
            bus_wakes=expected or wait < cap,
        )

    def bus_lost(self, now: float) -> Schedule:
        """An established connection broke: the first retry comes after the shortest backoff."""
        return replace(self, bus_backoff=BUS_RETRY_FIRST, bus_seen=True).bus_failed(now, False)

    def after_error(self, now: float) -> Schedule:
        """A step failed: push back what is due, or the loop would spin on the same error."""
        later = now + ERROR_RETRY
        due = self.reread.due
        return replace(
            self,
            reread=self.reread if due is None else replace(self.reread, due=max(due, later)),
            bus_retry_at=None if self.bus_retry_at is None else max(self.bus_retry_at, later),
            evaluate_at=later,
        )
