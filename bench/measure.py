"""Samples, summaries and per-process counters: the arithmetic of the benchmark, no mounts."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Samples:
    """Repeated measurements of one quantity, in ``unit``."""

    unit: str
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (p99 of 100 samples is the 99th smallest)."""
        ordered = sorted(self.values)
        rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
        return ordered[rank - 1]

    def summary(self) -> str:
        """``min / median / max unit`` (one value is shown alone)."""
        if len(self.values) == 1:
            return f"{fmt(self.values[0])} {self.unit}"
        return (
            f"{fmt(min(self.values))} / {fmt(self.median)} / {fmt(max(self.values))} "
            f"{self.unit} (n={len(self.values)})"
        )


def fmt(value: float) -> str:
    """Three significant digits, without an exponent for the ranges we meet."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def alternate(
    ours: Callable[[], float],
    peer: Callable[[], float],
    repeats: int,
    unit: str = "ms",
    warmup: bool = True,
) -> tuple[Samples, Samples]:
    """Run ``ours`` and ``peer`` in turn ``repeats`` times each (swapping who goes first each
    round, so neither always gets the warm cache), after one unrecorded warm-up of both."""
    if warmup:
        ours(), peer()
    a, b = Samples(unit), Samples(unit)
    for i in range(repeats):
        if i % 2:
            b.add(peer())
            a.add(ours())
        else:
            a.add(ours())
            b.add(peer())
    return a, b


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def thread_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds from /proc/<pid>/schedstat: finer than clock ticks for an idle daemon."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches summed over all threads: each voluntary one is
    a sleep the process chose, so a wake-up."""
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
    return vol, invol


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def slope_ratio(sizes: Sequence[int], times: Sequence[float]) -> float:
    """Time per mount at the largest size over time per mount at the smallest: 1.0 is linear,
    above 1 grows faster than linear. Uses the increments so that the fixed start cost cancels."""
    first = (times[1] - times[0]) / (sizes[1] - sizes[0])
    last = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
    return last / first


def off_cpu(latency_ms: float, cpu_ms: float, what: str) -> str:
    """What bounds a latency the daemon reports: its own CPU time for the work, and the rest,
    spent off its CPU (waiting for a free CPU on a shared machine, or for the kernel)."""
    load = os.getloadavg()[0]
    return (
        f"{what} costs the daemon {fmt(cpu_ms)} ms of CPU (median); the other "
        f"{fmt(max(0.0, latency_ms - cpu_ms))} ms of the {fmt(latency_ms)} ms are spent off "
        f"its CPU: waiting for one of {os.cpu_count()} CPUs (load {load:.2f} at the end) or "
        "for the kernel"
    )
