"""The plan: (mounts, liveness, mode, config) -> verdicts and ordered unmount actions.

Pure functions over plain data; nothing here touches the system.

A *site* is a target mount together with everything mounted on top of it or inside it: its
descendants in the mount tree (``parent_id`` links). That is what must go for the path to stop
being a mount point: a stack such as cgroup2 / tmpfs / cgroup2 at one path is one site whose
members are unmounted top first. A mount that is not a descendant of a target is never part of
a site, even when it hides one (a tmpfs over ``/run/calico`` shadows ``/run/calico/cgroup``
but is the operator's, not ours): the executor's mount-ID check refuses to reach through it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from calico_mount_reaper.model import Liveness
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.targets import Rule, is_denied, normalize_path, rule_for

TYPE_CHECKING = False  # not typing's, whose import costs a `status` 3 ms: see cli.py
if TYPE_CHECKING:  # the type only: loading a config reads files, and the plan reads none
    from typing import TypedDict

    from calico_mount_reaper.config import Config

    class SiteFields(TypedDict):
        """What every journal entry about one site carries, typed so that it can be spread
        into journal.event() next to that function's own keyword arguments."""

        mount_point: str
        mount_id: int
        fstype: str
        target: str
        reason: str


# Filesystems a lazy detach is fine for: no data to flush, nothing to lose.
DETACHABLE_FSTYPES = frozenset({"cgroup2", "bpf"})


class Mode(enum.Enum):
    NORMAL = "normal"  # reap only what is orphaned
    DECOMMISSION = "decommission"  # kubelet removed: drop the held check (and the grace period)
    FORCE = "force"  # operator's call: drop the in-use and held checks
    SHUTDOWN = "shutdown"  # the node is going down: reap everything


class Verdict(enum.Enum):
    ORPHANED = "orphaned"
    IN_USE = "in-use"
    HELD = "held"


@dataclass(frozen=True)
class Site:
    """A target mount point: the target mounts there and all their descendants."""

    mount_point: str  # as the kernel shows it (not normalized): what we unmount by
    rule: Rule
    roots: tuple[Mount, ...]  # the target mounts at mount_point that no other target covers
    members: tuple[Mount, ...]  # roots and descendants, in unmount order

    @property
    def mount_ids(self) -> frozenset[int]:
        return frozenset(m.mount_id for m in self.members)


@dataclass(frozen=True)
class Assessment:
    site: Site
    verdict: Verdict
    reason: str
    owners: tuple[tuple[int, str], ...]  # (pid, name) of live owners
    reap: bool  # whether this mode allows reaping it now

    def journal_fields(self) -> SiteFields:
        """The fields every journal entry about this site carries (VERDICT, REAPED), so that
        `journalctl MOUNT_POINT=...` or `TARGET=calico` finds all of them alike."""
        return {
            "mount_point": self.site.mount_point,
            "mount_id": self.site.roots[0].mount_id,
            "fstype": self.site.roots[0].fstype,
            "target": self.site.rule.name,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Action:
    """Unmount one mount. ``mount_point`` is the exact path; ``mount_id`` must match it."""

    mount: Mount
    site: Site
    reason: str
    detach_allowed: bool


@dataclass(frozen=True)
class Plan:
    assessments: tuple[Assessment, ...]
    actions: tuple[Action, ...]


def children_index(mounts: Iterable[Mount]) -> dict[int, list[Mount]]:
    """parent_id -> children. A mount that names itself as parent (the root) is left out."""
    index: dict[int, list[Mount]] = {}
    for m in mounts:
        if m.parent_id != m.mount_id:
            index.setdefault(m.parent_id, []).append(m)
    return index


def unmount_order(root: Mount, children: Mapping[int, Sequence[Mount]]) -> list[Mount]:
    """``root`` and its descendants, innermost and newest first (post-order, newest child first).

    Children must go before their parent (the kernel refuses a busy parent), and among
    siblings the newest goes first because an older sibling may lie under it.
    Iterative so a deep stack cannot hit the recursion limit; ``seen`` guards against a
    corrupt table that loops.
    """
    order: list[Mount] = []
    seen = {root.mount_id}
    stack: list[tuple[Mount, bool]] = [(root, False)]
    while stack:
        mount, expanded = stack.pop()
        if expanded:
            order.append(mount)
            continue
        stack.append((mount, True))
        # Pushed oldest first, so the newest child is popped (and emptied) first.
        for child in sorted(children.get(mount.mount_id, ()), key=lambda m: m.index):
            if child.mount_id not in seen:
                seen.add(child.mount_id)
                stack.append((child, False))
    return order


def find_sites(mounts: Sequence[Mount], rules: Sequence[Rule]) -> list[Site]:
    """Group the target mounts into sites, newest site first."""
    children = children_index(mounts)
    by_id = {m.mount_id: m for m in mounts}
    matched = {m.mount_id: rule for m in mounts if (rule := rule_for(m, rules)) is not None}

    def covered_by_target(m: Mount) -> bool:
        # Walk up the tree: a target under another target belongs to the outer one's site.
        seen = {m.mount_id}
        parent = by_id.get(m.parent_id)
        while parent is not None and parent.mount_id not in seen:
            if parent.mount_id in matched:
                return True
            seen.add(parent.mount_id)
            parent = by_id.get(parent.parent_id)
        return False

    roots_by_point: dict[str, list[Mount]] = {}
    for m in mounts:
        if m.mount_id in matched and not covered_by_target(m):
            roots_by_point.setdefault(m.mount_point, []).append(m)

    sites = []
    for point, roots in roots_by_point.items():
        # Propagated copies can put two uncovered targets at one path: each is emptied in turn,
        # newest first, which is the order the path reveals them in.
        members: list[Mount] = []
        for root in sorted(roots, key=lambda m: m.index, reverse=True):
            members.extend(unmount_order(root, children))
        sites.append(Site(point, matched[roots[0].mount_id], tuple(roots), tuple(members)))
    sites.sort(key=lambda s: max(m.index for m in s.roots), reverse=True)
    return sites


def assess(site: Site, liveness: Liveness, mode: Mode) -> Assessment:
    """The verdict on one site and whether ``mode`` lets it be reaped now."""
    owners = tuple(
        (pid, name) for name in site.rule.owners for pid in liveness.owners.get(name, ())
    )
    kubelet = liveness.kubelet
    if owners:
        shown = ", ".join(f"{name} (pid {pid})" for pid, name in owners[:5])
        verdict, reason = Verdict.IN_USE, f"in use by {shown}"
    elif kubelet.active:
        verdict, reason = Verdict.HELD, f"held: kubelet is active ({kubelet.detail})"
    elif kubelet.active is None:
        # Not knowing is not "inactive": Calico may be about to come back.
        verdict, reason = Verdict.HELD, "held: kubelet's state is unknown"
    else:
        verdict, reason = Verdict.ORPHANED, f"orphaned: no {'/'.join(site.rule.owners)} running"
        reason += f" and kubelet is not active ({kubelet.detail or kubelet.source.value})"
    reap = {
        Mode.NORMAL: verdict is Verdict.ORPHANED,
        Mode.DECOMMISSION: verdict is not Verdict.IN_USE,
        Mode.FORCE: True,
        Mode.SHUTDOWN: True,
    }[mode]
    if reap and verdict is not Verdict.ORPHANED:
        reason += f"; reaped anyway ({mode.value})"
    return Assessment(site, verdict, reason, owners, reap)


def plan(
    mounts: Sequence[Mount],
    liveness: Liveness,
    mode: Mode,
    config: Config,
    sites: Sequence[Site] | None = None,
) -> Plan:
    """Verdicts on every site and the unmount actions this mode allows, in execution order.

    ``sites`` is ``find_sites(mounts, config.rules)`` when the caller already has it: finding
    them walks the whole table, and a pass that just read the table need not walk it twice.
    """
    if sites is None:
        sites = find_sites(mounts, config.rules)
    assessments = tuple(assess(site, liveness, mode) for site in sites)
    actions = tuple(
        Action(
            mount=m,
            site=a.site,
            reason=a.reason,
            detach_allowed=a.site.rule.detach_on_busy and m.fstype in DETACHABLE_FSTYPES,
        )
        for a in assessments
        if a.reap
        for m in a.site.members
        # The deny-list is checked last, on the final path of every single unmount.
        if not is_denied(normalize_path(m.mount_point))
    )
    return Plan(assessments, actions)
