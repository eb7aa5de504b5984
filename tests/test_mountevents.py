"""The pure rules of `mountevents`: which fanotify events cost a re-read, which source is used."""

from __future__ import annotations

from calico_mount_reaper.mountevents import Effect, Use, Via, choose, effect, may_touch_a_target
from calico_mount_reaper.sources.fanotify import Change, MountEvent, Probe, Why

PREFIXES = ["/run/calico", "/run/cilium/cgroupv2"]


def test_an_attach_at_or_below_a_prefix_or_over_it_may_touch_a_target() -> None:
    assert may_touch_a_target("/run/calico", PREFIXES)
    assert may_touch_a_target("/run/calico/cgroup", PREFIXES)
    assert may_touch_a_target("/var/run/calico/bpffs", PREFIXES)  # /var/run folded
    assert may_touch_a_target("/run", PREFIXES)  # an over-mount hides what is below
    assert not may_touch_a_target("/run/calico2", PREFIXES)  # components, not characters
    assert not may_touch_a_target("/run/netns/cni-1", PREFIXES)
    assert not may_touch_a_target("/var/lib/kubelet/pods/x/volumes/y", PREFIXES)


def test_a_detach_matters_only_for_a_mount_in_the_view() -> None:
    view = frozenset({7})
    assert effect(MountEvent(Change.DETACHED, 7), view, None, PREFIXES) is Effect.REREAD
    assert effect(MountEvent(Change.DETACHED, 8), view, None, PREFIXES) is Effect.NONE


def test_an_attach_matters_by_where_statmount_places_it() -> None:
    attach = MountEvent(Change.ATTACHED, 9)
    assert effect(attach, frozenset(), "/run/calico/cgroup", PREFIXES) is Effect.REREAD
    assert effect(attach, frozenset(), "/run/netns/x", PREFIXES) is Effect.NONE
    assert effect(attach, frozenset(), None, PREFIXES) is Effect.NONE  # gone again already


def test_fanotify_only_on_the_kernel_api_and_only_an_old_kernel_is_not_degraded() -> None:
    ok = Probe(Why.AVAILABLE, "fanotify")
    assert choose(Use.KERNEL_API, ok).via is Via.FANOTIFY
    assert choose(Use.MOUNTINFO, None).via is Via.POLLPRI
    old = choose(Use.KERNEL_API, Probe(Why.KERNEL_TOO_OLD, "6.12"))
    assert (old.via, old.degraded) == (Via.POLLPRI, False)
    refused = choose(Use.KERNEL_API, Probe(Why.REFUSED, "seccomp"))
    assert (refused.via, refused.degraded) == (Via.POLLPRI, True)
    assert "seccomp" in refused.reason
