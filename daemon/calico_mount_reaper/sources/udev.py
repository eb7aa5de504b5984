"""Network-interface uevents as an event source: hints that Calico's or Cilium's dataplane moved.

Mounts make no uevents; the mount table stays the primary signal. But when ``cali*`` or
``vxlan.calico`` links go away, Calico is being torn down, and the daemon re-checks at once
instead of waiting for its periodic pass.

The monitor listens to the *kernel* netlink group, not udevd's: it needs no udevd (nodes and
containers often have none) and the kernel sends these events before any udev rule runs.
Measured: the add event wakes the loop while ``ip link add`` is still running (0.6 ms before it
exits), a remove even 15 ms before ``ip link del`` returns.
Net-device uevents are scoped to a network namespace: the socket sees the links of the
namespace it was opened in, and only those (measured: a veth made in a sibling namespace sends
nothing here). That is why the unit must not use PrivateNetwork=. Uevents of other subsystems
(block, mem, ...) are not scoped and do wake the fd: libudev's in-kernel filter only applies to
udevd's messages, so for kernel ones the subsystem is checked on receipt and `drain()` returns
nothing for them.
"""

from __future__ import annotations

import errno
import fnmatch
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Calico: workload veths (cali + hash), VXLAN (v4/v6), IP-in-IP, WireGuard (v4/v6), and the
# eBPF dataplane's NAT devices. Cilium: cilium_host, cilium_net, cilium_vxlan, ...
# A false match only costs one re-check, so the globs are as broad as the names they stand for.
DATAPLANE_PATTERNS: tuple[str, ...] = (
    "cali*",
    "vxlan.calico",
    "vxlan-v6.calico",
    "tunl0",
    "wireguard.cali",
    "wg-v6.cali",
    "bpfin.cali",
    "bpfout.cali",
    "cilium_*",
)

# Reported when the kernel dropped uevents because the socket's buffer was full: something may
# have changed that no event tells about, so the daemon should re-check as for any other event.
OVERFLOW = "overflow"


def is_dataplane_interface(name: str, patterns: Sequence[str] = DATAPLANE_PATTERNS) -> bool:
    """Whether ``name`` is one of Calico's or Cilium's interfaces (case-sensitive globs)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class InterfaceEvent:
    """``action`` is the uevent's (add, remove, move, change, ...) or OVERFLOW with no name."""

    action: str
    name: str


class UdevUnavailable(Exception):
    """No kernel uevent monitor could be opened (no libudev, or netlink refused)."""


class InterfaceWatch:
    """A kernel uevent monitor for the ``net`` subsystem; `fileno()` is readable on events."""

    def __init__(
        self, patterns: Sequence[str] = DATAPLANE_PATTERNS, receive_buffer: int | None = None
    ) -> None:
        """``receive_buffer`` (bytes, needs CAP_NET_ADMIN) bounds how many uevents can queue
        between two drains before the kernel drops them (see OVERFLOW)."""
        self.patterns = tuple(patterns)
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
            monitor.filter_by("net")
            if receive_buffer is not None:
                monitor.set_receive_buffer_size(receive_buffer)
            monitor.start()  # binds the socket and makes it non-blocking
        except (ImportError, OSError) as exc:
            # ImportError: pyudev or libudev.so.1 missing. OSError: socket(2) or bind(2) on
            # NETLINK_KOBJECT_UEVENT refused (seccomp, fd limits, a kernel without it).
            raise UdevUnavailable(f"cannot watch interfaces through netlink: {exc}") from exc
        self._monitor: Any = monitor

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def drain(self) -> list[InterfaceEvent]:
        """Every pending uevent for a dataplane interface, without blocking."""
        events: list[InterfaceEvent] = []
        while True:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                # After an overflow the socket holds ENOBUFS and polls as POLLERR, which pyudev
                # turns into an OSError without errno, again on every poll until the error is
                # fetched. SO_ERROR fetches and clears it; what was queued after it still counts.
                # (If recvmsg(2) got there first, libudev passes ENOBUFS on as the errno.)
                if exc.errno != errno.ENOBUFS and self._take_socket_error() != errno.ENOBUFS:
                    raise
                events.append(InterfaceEvent(OVERFLOW, ""))
                continue
            if device is None:
                return events
            name = device.sys_name
            if is_dataplane_interface(name, self.patterns):
                events.append(InterfaceEvent(device.action or "", name))

    def close(self) -> None:
        """Stop listening. pyudev (0.24) has no close: dropping the last reference unrefs the
        libudev monitor, which closes its socket."""
        self._monitor = None

    def _take_socket_error(self) -> int:
        with socket.fromfd(self.fileno(), socket.AF_NETLINK, socket.SOCK_RAW) as sock:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
