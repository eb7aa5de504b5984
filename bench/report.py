"""bench/results.md from the rows of one run: the machine, the table, what bounds each miss,
and how long each scenario took. Pure text; main.py gathers the facts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model import Row

NO_BOUND = "no bound measured in this run"


@dataclass(frozen=True)
class Machine:
    """What the figures depend on, as found at the start of the run."""

    kernel: str
    cpus: int
    cpu_model: str
    python: str
    findmnt: str
    load: tuple[float, float, float]

    def __str__(self) -> str:
        one, five, fifteen = self.load
        return (
            f"Linux {self.kernel}, {self.cpus} CPUs ({self.cpu_model}), Python {self.python}, "
            f"{self.findmnt}; load average at the start {one:.2f} / {five:.2f} / {fifteen:.2f} "
            "(1 / 5 / 15 min)"
        )


@dataclass(frozen=True)
class Timing:
    """How long one scenario ran, and the load average (1 min) when it started."""

    scenario: str
    seconds: float
    load: float


def table(rows: Sequence[Row]) -> str:
    out = [
        "| scenario | measure | calico-mount-reaper (min / median / max) | peer | "
        "peer (min / median / max) | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        ours = r.ours + (f" ({r.note})" if r.note else "")
        out.append(
            f"| {r.scenario} | {r.measure} | {ours} | {r.peer} | {r.peer_value} | "
            f"{ratio} | {r.goal} | {met} |"
        )
    return "\n".join(out)


def misses(rows: Sequence[Row]) -> str:
    """One line per missed goal: the figure, the goal, and what bounds it in this run."""
    lines = []
    for r in rows:
        if r.met is False:
            figure = r.ours + (f", {r.ratio:.2f}x {r.peer}" if r.ratio is not None else "")
            lines.append(
                f"- **{r.scenario}, {r.measure}**: {figure}; goal {r.goal}. "
                f"Bound: {r.bound or NO_BOUND}."
            )
    if not lines:
        return "Every goal in the table was met in this run."
    return "What bounds each miss, from this run's own figures:\n\n" + "\n".join(lines)


def durations(timings: Sequence[Timing]) -> str:
    total = sum(t.seconds for t in timings)
    each = ", ".join(f"{t.scenario} {t.seconds:.0f} s (load {t.load:.2f})" for t in timings)
    return f"The run took {total / 60:.1f} min: {each}."


def results(
    command: str,
    started: str,
    machine: Machine,
    rows: Sequence[Row],
    timings: Sequence[Timing],
) -> str:
    return (
        f"# Benchmark results\n\nWritten by `{command}` on {started} UTC, in one run.\n"
        f"{machine}.\n"
        "All mounts in private mount namespaces. Peers measured alternately with ours, in "
        "the same run; ratio = our median / peer median (lower is better).\n\n"
        f"{table(rows)}\n\n{misses(rows)}\n\n{durations(timings)}\n"
    )
