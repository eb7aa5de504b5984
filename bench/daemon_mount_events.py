"""The daemon on each mount-event source, side by side in one run (issue 12, item 6).

    sudo .venv/bin/python bench/daemon_mount_events.py [--base 10000] [--samples 40]
        [--churn-seconds 60] [--slope 1000,50000]

The real daemon process (`calico-mount-reaper run`, no bus, no watchdog) in a private namespace
with ``--base`` pod-like bind mounts, once on fanotify and once forced onto mountinfo/POLLPRI
(CALICO_MOUNT_REAPER_MOUNT_API=mountinfo). Three measures:

- detection: this process makes one cgroup2 mount under /run/calico at a time and stamps the
  clock before mount(2) and after it returns; a reader thread stamps the daemon's
  "... appeared" line as it arrives on the daemon's stderr. So the figure includes the daemon's
  whole way to a new view (wake, statmount or re-read, diff) plus one pipe hop.
- churn: 50 pod-like tmpfs mount/unmount pairs a second outside every target; the daemon's CPU
  (utime+stime from /proc) over the run, as a share of one core.
- slope: the daemon's CPU per churn event on fanotify at the smallest and largest --slope sizes;
  their ratio is the growth the issue asks to stay flat (<= 1.5).

A benchmark, not a test: medians, on whatever the machine is doing at the time.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "daemon")]

from measure import Samples, fmt  # noqa: E402
from mounts import count, detach, grow_base  # noqa: E402

from tests.support.nsutil import in_namespace, mount  # noqa: E402

SOURCES = {"fanotify": {}, "pollpri": {"CALICO_MOUNT_REAPER_MOUNT_API": "mountinfo"}}
CHURN_RATE = 50  # pairs a second
TICKS = os.sysconf("SC_CLK_TCK")


class DaemonProcess:
    """The daemon as a child process; `lines` are its stderr lines with their arrival time."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="cmr-bench-")
        config = Path(self.dir) / "config.toml"
        config.write_text("grace_period = 3600\nrescan_interval = 3600\n")
        full = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        full.update(env, PYTHONPATH=str(HERE.parent / "daemon"), PYTHONUNBUFFERED="1")
        full.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        cmd = [sys.executable, "-m", "calico_mount_reaper", "run", "--config", str(config)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=full, text=True)
        self.lines: list[tuple[int, str]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append((time.monotonic_ns(), line))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> int:
        """Arrival time (ns) of the first line holding ``text``."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for when, line in self.lines:
                    if text in line:
                        return when
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"daemon never said {text!r}: {self.lines[-5:]}")
                self.cond.wait(left)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(60)
        return "".join(line for _, line in self.lines)


def _detection(daemon: DaemonProcess, samples: int, tag: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"from return": [], "from call": []}
    for i in range(samples):
        path = f"/run/calico/{tag}{i}"
        os.makedirs(path)
        time.sleep(0.3)  # quiet for longer than the re-read coalescing (REREAD_INTERVAL)
        before = time.monotonic_ns()
        mount("none", path, "cgroup2")
        after = time.monotonic_ns()
        noticed = daemon.wait_for(f"target {path} (cgroup2) appeared")
        out["from return"].append((noticed - after) / 1e6)
        out["from call"].append((noticed - before) / 1e6)
    return out


def _churn(daemon: DaemonProcess, seconds: float) -> tuple[float, int]:
    """CPU share of one core the daemon spent while pods churned; and the events made."""
    path = "/run/netns/cni-churn"
    os.makedirs(path, exist_ok=True)
    cpu0, start = daemon.cpu_seconds(), time.monotonic()
    pairs = 0
    while (elapsed := time.monotonic() - start) < seconds:
        mount("none", path, "tmpfs")
        detach(path)
        pairs += 1
        time.sleep(max(0.0, pairs / CHURN_RATE - (time.monotonic() - start)))
    time.sleep(0.5)  # let it drain the last events
    return (daemon.cpu_seconds() - cpu0) / elapsed, 2 * pairs


def measure(base: int, samples: int, churn_seconds: float) -> dict[str, float | list[float]]:
    for start in range(0, base, 1000):
        grow_base(start, min(base, start + 1000))
    os.makedirs("/run/calico")
    found: dict[str, float | list[float]] = {"table size": float(count())}
    for source, env in SOURCES.items():
        daemon = DaemonProcess(env)
        try:
            daemon.wait_for("mount events via")
            for since, values in _detection(daemon, samples, source).items():
                found[f"{source} detection {since}"] = values
            share, events = _churn(daemon, churn_seconds) if churn_seconds else (0.0, 0)
            found[f"{source} churn cpu"] = share
            found[f"{source} churn events"] = float(events)
        finally:
            log = daemon.stop()
        if f"mount events via {source}" not in log:
            raise RuntimeError(f"the daemon did not use {source}:\n{log[-2000:]}")
        rereads = log.rsplit(" table re-reads", 1)[0].rsplit(" ", 1)[-1]
        found[f"{source} re-reads"] = float(rereads)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--churn-seconds", type=float, default=60)
    parser.add_argument("--slope", default="", help="e.g. 1000,50000: per-event cost at each")
    args = parser.parse_args()
    print(f"Linux {platform.release()}, {os.cpu_count()} CPUs, no D-Bus, load {os.getloadavg()}")
    found = in_namespace(measure, args.base, args.samples, args.churn_seconds, timeout=3600)
    print(f"{int(found['table size'])} mounts in the table; {args.samples} samples per source")
    print(f"{'measure':<36} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in found.items():
        if isinstance(values, list):
            s = Samples("ms", values)
            print(f"{name:<36} {fmt(s.median):>8} {fmt(s.quantile(0.99)):>8} {fmt(max(values)):>8}")
    for source in SOURCES:
        share = found[f"{source} churn cpu"]
        assert isinstance(share, float)
        print(
            f"{source}: churn {args.churn_seconds:g} s, {int(found[f'{source} churn events'])} "
            f"events: daemon CPU {share * 100:.2f}% of a core; "
            f"{int(found[f'{source} re-reads'])} table re-reads in the whole run"
        )
    if args.slope:
        per_event = {}
        for size in (int(x) for x in args.slope.split(",")):
            at = in_namespace(measure, size, 1, args.churn_seconds, timeout=3600)
            cpu, events = at["fanotify churn cpu"], at["fanotify churn events"]
            assert isinstance(cpu, float) and isinstance(events, float)
            per_event[size] = cpu * args.churn_seconds / events * 1e6
            print(
                f"fanotify per churn event at {int(at['table size'])} mounts: "
                f"{per_event[size]:.1f} us of daemon CPU"
            )
        low, high = min(per_event), max(per_event)
        print(f"slope ratio {high} vs {low} mounts: {per_event[high] / per_event[low]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
