"""Scenario 5: the daemon idle as on a node, on a real system bus, quiet and then with uevents.

The daemon runs with the packaged unit's WatchdogSec, one target in use by its owner, and a
real ``dbus-daemon`` listening where the daemon looks by default (/run/dbus/system_bus_socket,
under this namespace's private /run), with a fake systemd on it (tests/support/fake_systemd.py:
PID 1 here is not systemd) that says kubelet is active. First a quiet spell: the only wake-ups
should be the watchdog's. Then the same spell with veth pairs made and deleted every few
seconds in the daemon's network namespace (this kernel has no dummy links), as pod churn does:
each one sends uevents the daemon's monitor hears.

Every wake-up is attributed: the daemon's voluntary context switches (each a sleep it chose,
so one wake) are sampled every SAMPLE seconds, and each increase is put down to a watchdog
ping or a uevent up to SETTLE seconds before it, or else "other".
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from measure import context_switches, fmt, rss_mb, thread_cpu_ns
from model import Row, Size
from mounts import grow_base, mount_target
from procs import DaemonProc, Datagrams, Watch

from tests.support.daemon_harness import owner_exe
from tests.support.system_bus import Bus

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "calico-mount-reaper.service"
NETLINK_KOBJECT_UEVENT = 15
# How often the daemon's wake counter is read: the resolution of the attribution.
SAMPLE = 0.05
# How long after a ping or a uevent the daemon's wakes are put down to it: a uevent's re-read
# at once, a coalesced one REREAD_INTERVAL (0.2 s) later, then the verdicts; a ping's rescan.
SETTLE = 1.0


def unit_watchdog_seconds(unit: Path = UNIT) -> float:
    """WatchdogSec= of the packaged unit, in the forms it may use (``30s``, ``3min``)."""
    found = re.search(r"^WatchdogSec=(\d+)(s|min)$", unit.read_text(), re.M)
    if found is None:
        raise ValueError(f"{unit}: no WatchdogSec=<n>s or <n>min")
    return int(found.group(1)) * (60 if found.group(2) == "min" else 1)


class Uevents(Datagrams):
    """Every kernel uevent this network namespace hears, timestamped on arrival: the same
    stream the daemon's monitor gets (net devices of this namespace; other subsystems from
    the whole machine, which are not scoped to a namespace)."""

    def __init__(self) -> None:
        super().__init__(
            socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT
            )
        )
        self.sock.bind((0, 1))  # the kernel's multicast group
        self.heard: list[tuple[float, str]] = []  # (arrival, subsystem)

    def pump(self) -> None:
        for now, message in self.drain():
            fields = dict(part.split(b"=", 1) for part in message.split(b"\0")[1:] if b"=" in part)
            self.heard.append((now, fields.get(b"SUBSYSTEM", b"?").decode()))

    def since(self, start: float) -> list[tuple[float, str]]:
        return [(t, s) for t, s in self.heard if t >= start]

    def close(self) -> None:
        self.sock.close()


@dataclass
class WakeSplit:
    """A spell's wake-ups by cause; ``other_at`` says when the unexplained ones came."""

    watchdog: int = 0
    uevent: int = 0
    other: int = 0
    other_at: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.watchdog + self.uevent + self.other


def split_wakes(
    counts: Sequence[tuple[float, int]], pings: Sequence[float], uevents: Sequence[float]
) -> WakeSplit:
    """Attribute each increase of the wake counter between two samples to what came up to
    SETTLE before it: a watchdog ping first (the ping's wake also runs the rescan, whose
    work may sleep again), else a uevent, else nothing known ("other")."""

    def near(times: Sequence[float], t0: float, t1: float) -> bool:
        return any(t0 - SETTLE - SAMPLE < t <= t1 + SAMPLE for t in times)

    split = WakeSplit()
    start = counts[0][0]
    for (t0, c0), (t1, c1) in zip(counts, counts[1:]):
        woke = c1 - c0
        if not woke:
            continue
        if near(pings, t0, t1):
            split.watchdog += woke
        elif near(uevents, t0, t1):
            split.uevent += woke
        else:
            split.other += woke
            split.other_at.append(t1 - start)
    return split


@dataclass
class Spell:
    """What one idle spell measured."""

    seconds: float
    cpu_ns: int
    wakes: WakeSplit
    uevents: list[tuple[float, str]]
    pings: int
    links: int  # veth adds and deletes made in it
    links_every: float | None
    rss: list[float]


def _pings(daemon: DaemonProc, since: float) -> list[float]:
    return [t for t, m in daemon.notify.lines if "WATCHDOG=1" in m and t >= since]


def spell(
    daemon: DaemonProc, watch: Watch, uevents: Uevents, seconds: float, links_every: float | None
) -> Spell:
    """Idle for ``seconds``; every ``links_every`` seconds add or delete a veth pair."""
    start = time.monotonic()
    cpu0 = thread_cpu_ns(daemon.pid)
    counts = [(start, context_switches(daemon.pid)[0])]
    rss = [rss_mb(daemon.pid)]
    next_link, links, next_rss = start + (links_every or 0) / 2, 0, start + 5.0
    while (now := time.monotonic()) < start + seconds:
        if links_every is not None and now >= next_link:
            # A Calico workload interface's name: the daemon treats it as a dataplane hint.
            name = f"cali{links // 2:011x}"
            verb = f"add {name} type veth peer name eth{links // 2}" if links % 2 == 0 else ""
            subprocess.run(["ip", "link", *(verb or f"del {name}").split()], check=True)
            links += 1
            next_link += links_every
        if now >= next_rss:
            rss.append(rss_mb(daemon.pid))
            next_rss += 5.0
        watch.sleep(SAMPLE)
        counts.append((time.monotonic(), context_switches(daemon.pid)[0]))
    cpu = thread_cpu_ns(daemon.pid) - cpu0
    heard, pings = uevents.since(start), _pings(daemon, start)
    wakes = split_wakes(counts, pings, [t for t, _ in heard])
    rss.append(rss_mb(daemon.pid))
    return Spell(seconds, cpu, wakes, heard, len(pings), links, links_every, rss)


def _uevent_count(heard: list[tuple[float, str]]) -> str:
    net = sum(1 for _, s in heard if s == "net")
    return f"{len(heard)} uevents ({net} net)"


def idle(size: Size) -> list[Row]:
    from calico_mount_reaper.config import Config
    from calico_mount_reaper.schedule import ping_interval

    grow_base(0, size.base)
    workdir = tempfile.mkdtemp(dir="/run")
    os.makedirs("/run/dbus")
    bus = Bus(Path("/run/dbus"))  # the socket where the daemon looks by default
    bus.start()
    owner = subprocess.Popen([owner_exe(workdir), "3600"])
    mount_target("/run/calico/cgroup")
    watch = Watch()
    uevents = Uevents()
    watch.add(uevents)
    watchdog = unit_watchdog_seconds()
    every = ping_interval(watchdog / 2, Config().rescan_interval)
    daemon = DaemonProc(workdir, "", watch, {"WATCHDOG_USEC": str(round(watchdog * 1_000_000))})
    daemon.start()
    peer: subprocess.Popen[bytes] | None = None
    try:
        daemon.wait_notify("READY=1", timeout=30)
        daemon.wait_log("left alone, in use by calico-node")
        assert "following systemd over D-Bus" in daemon.log(), daemon.log()
        # The peer: a bare Python loop waking as often as the daemon pings, so the cost this
        # machine charges a Python process per wake-up is measured side by side.
        peer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import select\nep = select.epoll()\nwhile True: ep.poll({every:g})",
            ]
        )
        watch.sleep(1.0)
        peer_cpu0, (peer_vol0, _) = thread_cpu_ns(peer.pid), context_switches(peer.pid)
        quiet = spell(daemon, watch, uevents, size.idle_seconds, None)
        peer_cpu = thread_cpu_ns(peer.pid) - peer_cpu0
        peer_wakes = context_switches(peer.pid)[0] - peer_vol0
        peer_rss = rss_mb(peer.pid)
        peer.kill()
        busy = spell(daemon, watch, uevents, size.idle_seconds, size.uevent_every)
    finally:
        daemon.stop()
        owner.kill()
        owner.wait()
        if peer is not None:
            peer.kill()
            peer.wait()
        bus.stop()
        uevents.close()
    return idle_rows(quiet, busy, watchdog, every, (peer_cpu, peer_wakes, peer_rss))


def idle_rows(
    quiet: Spell,
    busy: Spell,
    watchdog: float,
    every: float,
    peer: tuple[int, int, float],
) -> list[Row]:
    peer_cpu, peer_wakes, peer_rss = peer
    seconds = quiet.seconds
    share = quiet.cpu_ns / 1e9 / seconds * 100
    peer_share = peer_cpu / 1e9 / seconds * 100
    where = "real dbus-daemon (fake systemd on it: kubelet active), one target in use"
    per_wake = quiet.cpu_ns / 1e6 / max(quiet.wakes.total, 1)

    def wakes_row(name: str, spell: Spell, goal: str) -> Row:
        split = spell.wakes
        unexplained = ", ".join(f"+{t:.1f} s" for t in split.other_at)
        return Row(
            name,
            f"wake-ups (voluntary context switches), {where}, {_uevent_count(spell.uevents)}",
            f"watchdog {split.watchdog} (with its rescan), uevent-caused {split.uevent}, "
            f"other {split.other}",
            "watchdog pings sent",
            str(spell.pings),
            goal=goal,
            met=split.other == 0,
            bound=f"{split.other} wake-ups came more than {SETTLE:g} s after any ping or uevent "
            f"(at {unexplained} into the spell): a bus message or a timer of the daemon's own",
        )

    busy_share = busy.cpu_ns / 1e9 / busy.seconds * 100
    ops = max(busy.links, 1)
    rss = quiet.rss + busy.rss
    return [
        Row(
            "5 idle",
            f"CPU over {seconds:g} s, quiet (the unit's WatchdogSec={watchdog:g}s: a ping every "
            f"{every:g} s, the rescan on the same wake; {where}; "
            f"{_uevent_count(quiet.uevents)})",
            f"{share:.4f}% of a core ({quiet.cpu_ns / 1e6:.1f} ms)",
            f"bare Python epoll loop waking every {every:g} s ({peer_wakes} wake-ups)",
            f"{peer_share:.4f}% ({peer_cpu / 1e6:.1f} ms)",
            ratio=share / peer_share if peer_share else None,
            goal="<= 0.05%",
            met=share <= 0.05,
            bound=f"the daemon spent {fmt(per_wake)} ms of CPU per wake-up "
            f"({quiet.wakes.total} wake-ups); the bare Python loop "
            f"{fmt(peer_cpu / 1e6 / max(peer_wakes, 1))} ms per wake-up on this machine",
        ),
        wakes_row("5 idle", quiet, "other = 0"),
        Row(
            "5 idle, uevents",
            f"CPU over {busy.seconds:g} s, {where}, a veth pair added or deleted every "
            f"{busy.links_every:g} s ({busy.links} times): {_uevent_count(busy.uevents)}",
            f"{busy_share:.4f}% of a core ({busy.cpu_ns / 1e6:.1f} ms)",
            note=f"{busy.cpu_ns / 1e6 / ops:.1f} ms per veth add or delete",
        ),
        wakes_row("5 idle, uevents", busy, "other = 0"),
        Row(
            "5 idle",
            "RSS, both spells",
            f"{min(rss):.1f} .. {max(rss):.1f} MB",
            goal="<= 30 MB, flat",
            met=max(rss) <= 30 and max(rss) - min(rss) <= 1.0,
            note=f"{len(rss)} samples",
            bound=f"a bare Python interpreter (the peer loop) holds {peer_rss:.1f} MB here",
        ),
    ]
