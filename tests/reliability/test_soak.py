"""Soak: the real daemon under a mixed load, watched for leaks and missed reaps.

Load, round after round for RELIABILITY_SOAK_SECONDS (60 in CI; `tests/reliability/run --soak`
runs 600): a mount storm (40 tmpfs mounts and unmounts), a target mounted while its owner runs
and then orphaned by the owner's exit, a bare orphaned target, a Calico veth pair added and
removed, and a SIGHUP reload every fifth round.

Pass: RSS growth under 1 MB and the same open-fd count from after the warm-up to the end, every
orphaned target reaped (none missed), and every target decision in the log.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.support.daemon_harness import DaemonRun
from tests.support.figures import record

SECONDS = float(os.environ.get("RELIABILITY_SOAK_SECONDS", "60"))
CGROUP = "/run/soak/cgroup"
CONFIG = (
    'grace_period = 0.2\n[[target]]\nname = "soak"\nprefix = "/run/soak"\n'
    'fstypes = ["cgroup2"]\nowners = ["soak-owner"]\n'
)
_STORM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
paths = [b"/run/storm/m%d" % i for i in range(40)]
for p in paths:
    os.makedirs(p, exist_ok=True)
    assert libc.mount(b"none", p, b"tmpfs", 0, None) == 0
for p in paths:
    assert libc.umount2(p, 0) == 0
"""


def _mount_target(d: DaemonRun) -> None:
    # The daemon removes the emptied directory after a reap, possibly between our mkdir and
    # mount: make both again until the mount lands.
    d.sh(
        f"for i in 1 2 3 4 5 6 7 8; do mkdir -p {CGROUP} && "
        f"mount -t cgroup2 none {CGROUP} 2>/dev/null && exit 0; sleep 0.05; done; exit 1"
    )


def test_soak(tmp_path: Path) -> None:
    owner_exe = tmp_path / "soak-owner"
    shutil.copy("/bin/sleep", owner_exe)
    with DaemonRun(tmp_path, config=CONFIG) as d:
        d.start()
        d.wait_notify("READY=1")
        rounds = held_ok = 0
        reaps: list[bool] = []  # True for a reap seen in time, False for a miss
        misses: list[str] = []  # the log's tail at each miss, for the failure message

        def expect_reap() -> None:
            try:
                d.wait_until(lambda: d.mounted(CGROUP) == 0, timeout=5, what="reap")
                reaps.append(True)
            except AssertionError:
                reaps.append(False)
                misses.append(d.log()[-1500:])
                d.sh(f"umount -R {CGROUP} || true")

        baseline: tuple[int, int] | None = None
        start = time.monotonic()
        warmup = start + min(10.0, SECONDS / 6)
        while time.monotonic() - start < SECONDS:
            rounds += 1
            # Read the notify socket as systemd would: a full queue blocks the daemon's sendto.
            d.collect(0)
            d.messages.clear()
            d.shell.run([sys.executable, "-c", _STORM])
            d.sh(f"ip link add cali{rounds} type veth peer name soakpeer{rounds}")
            # Owned: mounted while the owner lives, left alone; reaped once it exits.
            owner = d.shell.popen([str(owner_exe), "600"])
            _mount_target(d)
            time.sleep(0.4)
            held_ok += d.mounted(CGROUP) == 1
            owner.kill()
            owner.wait()
            expect_reap()
            # Orphaned from the start.
            _mount_target(d)
            expect_reap()
            d.sh(f"ip link del cali{rounds}")
            if rounds % 5 == 0:
                d.signal(signal.SIGHUP)
            if baseline is None and time.monotonic() >= warmup:
                time.sleep(0.5)
                baseline = (d.rss_kb(), d.fd_count())
        time.sleep(0.5)
        assert baseline is not None
        end = (d.rss_kb(), d.fd_count())
        assert d.proc is not None and d.proc.poll() is None
        t = time.monotonic()
        code = d.stop(60)
        stop_took = time.monotonic() - t
        log = d.log()
        assert code == 0, log[-3000:]
    logged_reaps = log.count(f"reaped {CGROUP}")
    logged_in_use = log.count(f"{CGROUP}: left alone, in use by soak-owner")
    growth = end[0] - baseline[0]
    missed = reaps.count(False)
    record(
        "soak",
        f"{SECONDS:.0f} s mixed load",
        rounds=rounds,
        reaps=reaps.count(True),
        missed=missed,
        rss_growth_kb=growth,
        fds=f"{baseline[1]} -> {end[1]}",
        logged=f"{logged_reaps} reaps, {logged_in_use} in-use decisions",
        stop=f"{stop_took:.1f} s",
    )
    assert missed == 0 and len(reaps) == 2 * rounds, (missed, len(reaps), rounds, misses)
    assert held_ok == rounds  # the owner's mount was never reaped while it lived
    assert logged_reaps == len(reaps), log[-3000:]
    assert logged_in_use >= rounds, log[-3000:]
    assert growth < 1024, (baseline, end)
    assert end[1] == baseline[1], (baseline, end)
    assert stop_took < 5, log[-3000:]
