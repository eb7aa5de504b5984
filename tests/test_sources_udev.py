"""Kernel uevents for Calico/Cilium links, from real veth and vxlan links in a private netns."""

from __future__ import annotations

import os
import resource
import selectors
import subprocess
import time

import pytest
from calico_mount_reaper.sources.udev import (
    OVERFLOW,
    InterfaceEvent,
    InterfaceWatch,
    UdevUnavailable,
    is_dataplane_interface,
)

from tests.support.nsutil import in_namespace


def ip(cmd: str) -> None:
    subprocess.run(["ip", *cmd.split()], check=True, capture_output=True)


def collect(
    watch: InterfaceWatch, want: set[InterfaceEvent], timeout: float = 5
) -> list[InterfaceEvent]:
    """Drain through a selector until ``want`` was seen or the time is up; then drain the rest."""
    seen: list[InterfaceEvent] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        while not want <= set(seen) and time.monotonic() < deadline:
            if sel.select(deadline - time.monotonic()):
                seen += watch.drain()
        sel.select(0.1)
        return seen + watch.drain()


@pytest.mark.parametrize(
    "name",
    [
        "cali1234abcd567",
        "vxlan.calico",
        "vxlan-v6.calico",
        "tunl0",
        "wireguard.cali",
        "wg-v6.cali",
        "bpfin.cali",
        "bpfout.cali",
        "cilium_host",
        "cilium_vxlan",
        "calico2",
    ],
)
def test_dataplane_names(name: str) -> None:
    # "calico2" matches too: the "cali*" is a prefix glob, and a false hint costs one
    # re-check while a missed one costs the fast path.
    assert is_dataplane_interface(name)


@pytest.mark.parametrize(
    "name",
    [
        "eth9",
        "lo",
        "vxlan0",
        "vxlan.calico0",
        "tunl1",
        "cilium",
        "wireguard.calico",
        "Cali1234",
        "xcali1",
        "flannel.1",
        "lxc_health",
        "",
    ],
)
def test_other_names(name: str) -> None:
    assert not is_dataplane_interface(name)


def test_custom_patterns() -> None:
    assert is_dataplane_interface("eth9", ["eth*"])
    assert not is_dataplane_interface("cali1", ["eth*"])


def _links_come_and_go() -> list[InterfaceEvent]:
    watch = InterfaceWatch()
    ip("link add cali1234abcd type veth peer name eth9")  # eth9: a decoy that must not show
    ip("link add vxlan.calico type vxlan id 4096 dstport 4789 dev lo")
    ip("link add vxlan0 type vxlan id 4097 dstport 4790 dev lo")  # another decoy
    ip("link del cali1234abcd")
    ip("link del vxlan.calico")
    ip("link del vxlan0")
    want = {
        InterfaceEvent("add", "cali1234abcd"),
        InterfaceEvent("add", "vxlan.calico"),
        InterfaceEvent("remove", "cali1234abcd"),
        InterfaceEvent("remove", "vxlan.calico"),
    }
    return collect(watch, want)


def test_calico_links_are_seen_and_others_filtered_out() -> None:
    events = in_namespace(_links_come_and_go, net=True)
    assert sorted(set(events), key=str) == sorted(
        {
            InterfaceEvent("add", "cali1234abcd"),
            InterfaceEvent("add", "vxlan.calico"),
            InterfaceEvent("remove", "cali1234abcd"),
            InterfaceEvent("remove", "vxlan.calico"),
        },
        key=str,
    )
    assert events.index(InterfaceEvent("add", "cali1234abcd")) < events.index(
        InterfaceEvent("remove", "cali1234abcd")
    )


def _sibling_namespace_is_invisible() -> tuple[list[InterfaceEvent], list[InterfaceEvent]]:
    watch = InterfaceWatch()
    # The same links in a sibling network namespace: their uevents go to that namespace only.
    subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            "ip link add cali5678 type veth peer name eth8 && ip link del cali5678",
        ],
        check=True,
    )
    elsewhere = collect(watch, set(), timeout=0.3)
    ip("link add cali9999 type veth peer name eth7")  # control: our own namespace is seen
    here = collect(watch, {InterfaceEvent("add", "cali9999")})
    return elsewhere, here


def test_uevents_are_scoped_to_the_network_namespace() -> None:
    elsewhere, here = in_namespace(_sibling_namespace_is_invisible, net=True)
    assert elsewhere == []
    assert InterfaceEvent("add", "cali9999") in here


def _idle() -> int:
    watch = InterfaceWatch()
    with selectors.DefaultSelector() as sel:
        sel.register(watch, selectors.EVENT_READ)
        woke = sel.select(0.3)
        # Other subsystems' uevents on the node can wake the fd; they must drain to nothing.
        return len(watch.drain()) if woke else 0


def test_idle_namespace_yields_nothing() -> None:
    assert in_namespace(_idle, net=True) == 0


def _overflow() -> list[InterfaceEvent]:
    # The smallest receive buffer the kernel allows: a few uevents overflow it.
    watch = InterfaceWatch(receive_buffer=1)
    for i in range(20):
        ip(f"link add cali{i} type veth peer name peer{i}")
    first = watch.drain()
    ip("link set cali0 name cali0x")  # after the overflow, events flow again
    return first + collect(watch, {InterfaceEvent("move", "cali0x")})


def test_overflow_is_reported_once_and_the_watch_keeps_working() -> None:
    events = in_namespace(_overflow, net=True)
    assert events.count(InterfaceEvent(OVERFLOW, "")) == 1
    assert InterfaceEvent("move", "cali0x") in events


def _no_netlink() -> str:
    import ctypes.util

    import pyudev
    import pyudev._ctypeslib.utils

    # pyudev's Context() looks libudev up through ctypes.util.find_library, which spawns gcc or
    # ldconfig and so needs free fds itself. Load the library once and pin the lookup to it, so
    # that the fd limit below hits the netlink socket, the failure under test, and nothing else.
    libname = ctypes.util.find_library("udev")
    pyudev.Context()
    pyudev._ctypeslib.utils.find_library = lambda name: libname
    free = os.dup(0)
    os.close(free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))  # no new fd can be made
    try:
        InterfaceWatch()
    except UdevUnavailable as exc:
        return str(exc)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return "no error"


def test_unavailable_netlink_raises_a_clear_error() -> None:
    message = in_namespace(_no_netlink, net=True)
    assert message.startswith("cannot watch interfaces through netlink:"), message
    assert "monitor" in message, message  # pyudev's "Could not create udev monitor"
