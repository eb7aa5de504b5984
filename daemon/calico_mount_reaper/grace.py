"""Grace timers: which orphaned sites have stayed orphaned long enough to reap.

Pure: the daemon passes in the verdicts and the time. A site must be reapable *continuously*
for the grace period; any moment in between when it is not (an owner came back, kubelet
started) resets its timer. A site is known by its mount point and the IDs of its root mounts,
so a mount that is replaced by a new one at the same path starts a fresh timer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from calico_mount_reaper.model import SiteKey
from calico_mount_reaper.plan import Assessment, Site


def site_key(site: Site) -> SiteKey:
    return site.mount_point, tuple(sorted(m.mount_id for m in site.roots))


@dataclass(frozen=True)
class GraceTimers:
    since: Mapping[SiteKey, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GraceDecision:
    timers: GraceTimers
    due: tuple[Assessment, ...]  # reap these now
    next_deadline: float | None  # when the next pending site becomes due


def decide(
    timers: GraceTimers,
    assessments: Iterable[Assessment],
    now: float,
    grace: float,
    immediate: bool = False,
) -> GraceDecision:
    """Start, keep or drop each site's timer; ``immediate`` skips the wait (decommission)."""
    since: dict[SiteKey, float] = {}
    due: list[Assessment] = []
    deadlines: list[float] = []
    for a in assessments:
        if not a.reap:
            continue  # not reapable now: its timer (if any) is dropped
        key = site_key(a.site)
        start = timers.since.get(key, now)
        since[key] = start
        if immediate or now - start >= grace:
            due.append(a)
        else:
            deadlines.append(start + grace)
    return GraceDecision(GraceTimers(since), tuple(due), min(deadlines, default=None))
