"""How the daemon hears of mount changes, and which ones it must look at: pure rules.

Two sources can wake the daemon when the mount table changes:

- ``fanotify`` (Linux 6.15+, `sources.fanotify`): each event names the mount by its unique ID,
  so one statmount tells where it is, and only a change that can touch a target costs a read
  of the target subtrees. Pod churn elsewhere on the node (container rootfs, netns, secrets,
  each a mount or several) costs one statmount per attach and nothing per detach.
- ``pollpri`` (`sources.mountinfo`): POLLPRI on mountinfo only says "something changed", so
  every change anywhere costs a coalesced re-read.

fanotify is used only with the kernel-API mount table: it needs statmount to place an attach,
and a node whose sandbox refuses statmount, or a forced ``mount_api = "mountinfo"``, keeps the
whole old path (`choose`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from calico_mount_reaper.sources.fanotify import Change, MountEvent, Probe, Why
from calico_mount_reaper.targets import is_within, normalize_path


class Via(enum.Enum):
    """What wakes the daemon on a mount change (shown in STARTED and STATUS=)."""

    FANOTIFY = "fanotify"
    POLLPRI = "pollpri"


class Use(enum.Enum):
    """Whether the kernel-API table can carry fanotify events (`choose`'s first question)."""

    KERNEL_API = "kernel-api"  # statmount works: fanotify may be tried
    MOUNTINFO = "mountinfo"  # forced, too old or refused: POLLPRI, whatever fanotify could do


@dataclass(frozen=True)
class Choice:
    via: Via
    reason: str  # for STARTED: why this source
    degraded: bool = False  # the kernel has fanotify mount events, but they were refused


def choose(table: Use, probe: Probe | None) -> Choice:
    """The source to register, given the table's back-end and fanotify's probe (None: not
    tried, because the table reads mountinfo)."""
    if table is Use.MOUNTINFO or probe is None:
        return Choice(Via.POLLPRI, "mountinfo POLLPRI (the mount table is read from mountinfo)")
    if probe.available:
        return Choice(Via.FANOTIFY, probe.message)
    # An old kernel is not degraded, just old (Debian 13's 6.12 has statmount but not this).
    old = probe.why is Why.KERNEL_TOO_OLD
    return Choice(Via.POLLPRI, f"mountinfo POLLPRI: {probe.message}", degraded=not old)


def may_touch_a_target(mount_point: str, prefixes: Iterable[str]) -> bool:
    """Can a mount attached here change what a pass finds under a rule prefix?

    Yes if it lies at or below a prefix (component-wise, ``/var/run`` folded). Also yes if it
    covers a prefix (a mount over ``/run``): it hides or reveals every target below it, and
    the kernel-API read starts from the mount a prefix lives on. Nodes do that almost never,
    and pods never at those places, so it costs nothing under churn.
    """
    path = normalize_path(mount_point)
    return any(is_within(path, p) or is_within(p, path) for p in prefixes)


class Effect(enum.Enum):
    REREAD = "reread"  # the view may be wrong: re-read the target subtrees (coalesced)
    NONE = "none"  # nothing a pass would see has changed


def effect(
    event: MountEvent, view: frozenset[int], mount_point: str | None, prefixes: Iterable[str]
) -> Effect:
    """What one event means for the daemon's view (``view``: the unique IDs it holds).

    ``mount_point`` is where statmount places an attached mount now, or None when it is
    gone again (then its detach follows, and the view never held it). A detach only matters
    for a mount the view holds: any other was never a target, nor inside one.
    """
    if event.change is Change.DETACHED:
        return Effect.REREAD if event.mount_id in view else Effect.NONE
    if mount_point is not None and may_touch_a_target(mount_point, prefixes):
        return Effect.REREAD
    return Effect.NONE
