"""What a scenario is given (`Size`) and what it gives back (`Row`): plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from measure import Samples


@dataclass
class Row:
    """One line of the results table.

    ``bound`` says what limits the figure, written by the scenario from what it measured in
    the same run (a floor, a peer, the machine's load): the results file prints it under the
    table when the row misses its goal, so a miss never stands unexplained.
    """

    scenario: str
    measure: str
    ours: str
    peer: str = ""
    peer_value: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    bound: str = ""


@dataclass(frozen=True)
class Size:
    """How big and how often: the full run and the CI smoke run differ only here."""

    pass_sizes: tuple[int, ...] = (1000, 10000, 50000)
    pass_repeats: int = 20
    process_repeats: int = 10
    base: int = 1000
    latency_samples: int = 100
    storm_pairs: int = 10000
    exit_samples: int = 30
    idle_seconds: float = 60.0
    uevent_every: float = 5.0
    start_samples: int = 10
    deep_stack: int = 1000
    stack_repeats: int = 5
    backend_sizes: tuple[int, ...] = (10000, 50000)
    # The daemon's mount-event sources (issue 12): fanotify against POLLPRI + mountinfo.
    events_base: int = 10000
    detection_samples: int = 40
    raw_samples: int = 100
    churn_seconds: float = 60.0
    slope_sizes: tuple[int, int] = (1000, 50000)
    slope_seconds: float = 20.0


QUICK = Size(
    pass_sizes=(100, 300, 600),
    pass_repeats=3,
    process_repeats=2,
    base=100,
    latency_samples=3,
    storm_pairs=200,
    exit_samples=2,
    idle_seconds=2.0,
    uevent_every=0.5,
    start_samples=2,
    deep_stack=40,
    stack_repeats=1,
    backend_sizes=(300, 600),
    events_base=300,
    detection_samples=3,
    raw_samples=4,
    churn_seconds=2.0,
    slope_sizes=(100, 600),
    slope_seconds=2.0,
)


def ratio_row(
    scenario: str,
    measure: str,
    ours: Samples,
    peer_name: str,
    peer: Samples,
    goal_ratio: float | None,
    goal: str,
    note: str = "",
    bound: str = "",
) -> Row:
    ratio = ours.median / peer.median
    met = None if goal_ratio is None else ratio <= goal_ratio
    return Row(
        scenario, measure, ours.summary(), peer_name, peer.summary(), ratio, goal, met, note, bound
    )


def label(mounts: int) -> str:
    """``10k mounts`` or ``300 mounts``."""
    return f"{mounts // 1000}k mounts" if mounts >= 1000 else f"{mounts} mounts"
