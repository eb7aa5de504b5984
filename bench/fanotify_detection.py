"""Detection latency of the two mount-event sources, side by side in one run (issue 12, item 3).

    sudo .venv/bin/python bench/fanotify_detection.py [--base 10000] [--samples 300]

In a private namespace with ``--base`` pod-like bind mounts, a separate mounter process makes one
cgroup2 mount at a time under /run/calico and reports when it called mount(2) and when the call
returned; the watcher blocks in a selector and takes the time once it has *decoded* the news:
- fanotify: the attach event with the mount's unique ID (sources/fanotify.py; the daemon would
  add one statmount, about 4 us at 10k mounts);
- mountinfo: the POLLPRI wake plus the re-read that finds the new path, parsing only the lines
  that can hold a target, as the daemon does (sources/mountinfo.py): what every change costs it
  today.
Both clocks are CLOCK_MONOTONIC, shared by the two processes. "From return" can be negative: the
kernel queues the event inside mount(2), so the watcher may have it before the mounter sees the
call return. This is a benchmark, not a timed test; the figures go into the report.
"""

from __future__ import annotations

import argparse
import os
import platform
import selectors
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "daemon")]

from calico_mount_reaper.config import Config  # noqa: E402
from calico_mount_reaper.sources.fanotify import Change, MountEvents  # noqa: E402
from calico_mount_reaper.sources.mountinfo import MountTableWatch  # noqa: E402
from calico_mount_reaper.targets import search_needles  # noqa: E402
from measure import Samples, fmt  # noqa: E402
from mounts import count, grow_base  # noqa: E402

from tests.support.nsutil import in_namespace, mount  # noqa: E402

STAMPS = struct.Struct("qq")  # monotonic ns before the call, after its return


def _mounter(samples: int, go: int, stamps: int) -> None:
    """Child: one cgroup2 mount per "go" byte, then its two timestamps."""
    for i in range(samples):
        os.read(go, 1)
        path = f"/run/calico/lat{i}"
        os.makedirs(path)
        before = time.monotonic_ns()
        mount("none", path, "cgroup2")
        after = time.monotonic_ns()
        os.write(stamps, STAMPS.pack(before, after))


def _noticed_by_fanotify(watch: MountEvents, sel: selectors.BaseSelector) -> int:
    while True:
        sel.select()
        if any(e.change is Change.ATTACHED for e in watch.drain().events):
            return time.monotonic_ns()


def _noticed_by_mountinfo(watch: MountTableWatch, sel: selectors.BaseSelector, path: str) -> int:
    # As the daemon reads: only the lines that can hold a target are parsed.
    needles = search_needles(Config().rules)
    while True:
        sel.select()
        if any(m.mount_point == path for m in watch.read(needles).mounts):
            return time.monotonic_ns()


def measure(base: int, samples: int) -> dict[str, list[float]]:
    """Runs inside the private namespace: both sources, alternating sample by sample."""
    for start in range(0, base, 1000):
        grow_base(start, min(base, start + 1000))
    os.makedirs("/run/calico")
    table_size = count()
    go_r, go_w = os.pipe()
    st_r, st_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            _mounter(samples, go_r, st_w)
        finally:
            os._exit(0)
    found: dict[str, list[float]] = {
        f"{source} {since}": []
        for source in ("fanotify", "mountinfo")
        for since in ("from return", "from call")
    }
    with MountEvents() as events, MountTableWatch() as table, selectors.DefaultSelector() as sel:
        for i in range(samples):
            source = "fanotify" if i % 2 == 0 else "mountinfo"
            watched = events if source == "fanotify" else table
            sel.register(watched, selectors.EVENT_READ)
            events.drain()
            table.read()
            time.sleep(0.01)  # a quiet moment, as between pod starts
            os.write(go_w, b"x")
            if source == "fanotify":
                noticed = _noticed_by_fanotify(events, sel)
            else:
                noticed = _noticed_by_mountinfo(table, sel, f"/run/calico/lat{i}")
            before, after = STAMPS.unpack(os.read(st_r, STAMPS.size))
            found[f"{source} from return"].append((noticed - after) / 1e6)
            found[f"{source} from call"].append((noticed - before) / 1e6)
            sel.unregister(watched)
    os.waitpid(child, 0)
    found["table size"] = [float(table_size)]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    found = in_namespace(measure, args.base, args.samples, timeout=1800)
    print(
        f"Linux {platform.release()}, {os.cpu_count()} CPUs; {int(found['table size'][0])} mounts "
        f"in the table; {args.samples // 2} samples per source (alternating)"
    )
    print(f"{'source, latency':<28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in found.items():
        if name == "table size":
            continue
        s = Samples("ms", values)
        print(f"{name:<28} {fmt(s.median):>8} {fmt(s.quantile(0.99)):>8} {fmt(max(values)):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
