"""systemd over D-Bus (pystemd): kubelet's state, decommission and shutdown as loop events.

A thin object over one bus connection whose fd goes into the daemon's selector, in the same way
as the other sources. What pystemd (0.11 to 0.15, the same low-level API in both) demands:

- systemd sends unit signals only to subscribed clients, so every connection calls
  ``Manager.Subscribe()``; a reconnect is a new connection and subscribes again.
- sd-bus reads whole messages into an internal queue, above all while a blocking call waits for
  its reply. Queued signals do not make the fd readable, so ``process()`` must be drained after
  every wake and after every blocking call (``kubelet()``, ``system_stopping()``).
- pystemd hides sd_bus_process()'s return value. "Did nothing" is inferred from a call that ran
  none of our callbacks and handed back no message: a signal comes back as a message even after
  our callback ran, because pystemd's callbacks never claim it. Some steps do work that shows
  neither way (reading the EOF that starts a disconnect, answering a call to us), so draining
  stops only after two such calls in a row.
- sd-bus keeps only a borrowed pointer to each callback, and pystemd stores the userdata on the
  function object itself (so bound methods are refused, and one function shared between matches
  would see the last match's userdata). Each match therefore gets its own plain function, and
  the watch keeps it referenced for as long as its bus lives: a collected callback crashes.
- An exception raised in a callback surfaces from ``process()`` as SystemError. Ours only append
  the message to a list; all parsing happens outside sd-bus, where errors are ordinary.
- Without a bus, pystemd raises ``DBusBaseError`` (not OSError); this module turns it into
  ``BusUnavailable`` on connect and into a ``BusLost`` event while running.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from calico_mount_reaper.model import KubeletSource, KubeletState
from calico_mount_reaper.unitname import unit_object_path

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"
LOGIND = b"org.freedesktop.login1"
LOGIND_PATH = b"/org/freedesktop/login1"
LOGIND_IFACE = b"org.freedesktop.login1.Manager"
LOCAL_IFACE = b"org.freedesktop.DBus.Local"  # sd-bus synthesises Disconnected here
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"

# A start job for any of these means the node is going down (all of them pull in shutdown.target).
SHUTDOWN_TARGETS = frozenset(
    {"shutdown.target", "poweroff.target", "reboot.target", "halt.target", "kexec.target"}
)
# "deactivating" is not held: kubelet's ExecStopPost (our drop-in) runs in that state.
HELD_STATES = frozenset({"active", "reloading", "activating"})


class BusUnavailable(Exception):
    """No usable system bus or no systemd on it; the daemon runs degraded and retries."""


@dataclass(frozen=True)
class KubeletChanged:
    state: KubeletState


@dataclass(frozen=True)
class Decommissioned:
    reason: str


@dataclass(frozen=True)
class ShuttingDown:
    reason: str


@dataclass(frozen=True)
class BusLost:
    reason: str


SystemdEvent = Union[KubeletChanged, Decommissioned, ShuttingDown, BusLost]


def kubelet_state(unit: str, active: str, load: str, file_state: str) -> KubeletState:
    """The verdict's view of kubelet from its unit properties as systemd reports them."""
    return KubeletState(
        active=active in HELD_STATES,
        source=KubeletSource.DBUS,
        unit_file_state=file_state,
        load_state=load,
        detail=f"{unit} is {active} ({load}, {file_state or 'no unit file'})",
    )


def query_kubelet(bus: Any, unit: str) -> KubeletState:
    """Ask systemd for ``unit``'s state over an open pystemd bus (one blocking call).

    The unit's path is addressed directly: systemd loads a unit on demand when its path is
    asked about, so a unit that is not loaded (or has no file at all) still answers, with
    LoadState "not-found" where that applies. Raises pystemd's DBusBaseError.
    """
    reply = bus.call_method(
        SYSTEMD,
        unit_object_path(unit).encode(),
        PROPERTIES_IFACE,
        b"GetAll",
        [(ord("s"), UNIT_IFACE)],
    )
    props: dict[bytes, Any] = reply.body or {}

    def prop(name: bytes) -> str:
        value = props.get(name, b"")
        return value.decode() if isinstance(value, bytes) else str(value)

    return kubelet_state(unit, prop(b"ActiveState"), prop(b"LoadState"), prop(b"UnitFileState"))


def kubelet_from_dbus(unit: str = "kubelet.service") -> KubeletState | None:
    """One question to systemd on a short-lived connection (the CLI's way): None when there
    is no bus, no pystemd or no systemd to ask, so that the caller falls back to processes."""
    try:
        from pystemd.dbusexc import DBusBaseError
        from pystemd.dbuslib import DBus
    except ImportError:
        return None
    bus = DBus()
    try:
        bus.open()
        return query_kubelet(bus, unit)
    except DBusBaseError:
        return None
    finally:
        bus.close()  # also right after a failed open(): sd-bus accepts closing a NULL bus


def _collector(kind: str, inbox: list[tuple[str, Any]]) -> Callable[..., None]:
    """A fresh plain function per match (see the module docstring for why)."""

    def collect(msg: Any, error: Any = None, userdata: Any = None) -> None:
        inbox.append((kind, msg))

    return collect


class _Disconnected(Exception):
    pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SystemdWatch:
    """systemd and logind signals on one bus connection, for a selectors loop.

    ``connect()``, register the watch (or ``fileno()``) for reading, and call ``process()``
    right away (connecting makes blocking calls) and then on every wake. After a ``BusLost``
    event, unregister, ``close()``, and ``connect()`` again later.
    """

    def __init__(self, kubelet_unit: str = "kubelet.service", address: str | None = None) -> None:
        self.kubelet_unit = kubelet_unit
        self.address = address
        self._bus: Any = None
        self._lost = False
        # Must outlive the bus: sd-bus holds borrowed pointers to these functions.
        self._callbacks: list[Callable[..., None]] = []
        # Filled by the callbacks; never rebound, because the callbacks hold this very list.
        self._inbox: list[tuple[str, Any]] = []
        self._last: KubeletState | None = None
        self._fd: int | None = None

    @property
    def where(self) -> str:
        """The bus address in use, for messages."""
        if self.address:
            return self.address
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", DEFAULT_SYSTEM_BUS)

    def connect(self) -> None:
        """Open the bus, listen for the signals and Subscribe(); callable again after BusLost."""
        self.close()
        try:
            from pystemd.dbusexc import DBusBaseError
            from pystemd.dbuslib import DBus, DBusAddress
        except ImportError as e:
            raise BusUnavailable(
                f"pystemd is not installed ({e}); install python3-pystemd to follow systemd"
            ) from e
        bus = DBusAddress(self.address.encode()) if self.address else DBus()
        self._bus = bus
        try:
            bus.open()
            # Listen before asking: a change between the first answer and the match would be lost.
            for kind, sender, path, interface, member in self._matches():
                callback = _collector(kind, self._inbox)
                self._callbacks.append(callback)
                bus.match_signal(sender, path, interface, member, callback)
            bus.call_method(SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"Subscribe", [])
            self._last = query_kubelet(bus, self.kubelet_unit)
            self._fd = bus.get_fd()
        except DBusBaseError as e:
            self.close()
            raise BusUnavailable(
                f"cannot follow systemd on the D-Bus system bus at {self.where}: {e}. "
                "Check that dbus is running (systemctl status dbus) or set "
                "DBUS_SYSTEM_BUS_ADDRESS; until then kubelet is judged by its process."
            ) from e

    def _matches(self) -> list[tuple[str, bytes, bytes, bytes, bytes]]:
        kubelet_path = unit_object_path(self.kubelet_unit).encode()
        return [
            ("kubelet", SYSTEMD, kubelet_path, PROPERTIES_IFACE, b"PropertiesChanged"),
            ("unit-removed", SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"UnitRemoved"),
            ("unit-files", SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"UnitFilesChanged"),
            ("job-new", SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"JobNew"),
            ("prepare", LOGIND, LOGIND_PATH, LOGIND_IFACE, b"PrepareForShutdown"),
        ]

    def _open_bus(self) -> Any:
        if self._bus is None or self._lost:
            raise BusUnavailable(f"not connected to the D-Bus system bus at {self.where}")
        return self._bus

    def fileno(self) -> int:
        """The bus fd, from connect() until close(), even after BusLost.

        sd-bus closes the fd itself when the peer goes away; the number stays valid for
        ``selector.unregister()``, which must come before close(). Without a connection this
        raises ValueError, as a closed file does, which selectors know to handle.
        """
        if self._fd is None:
            raise ValueError(f"not connected to the D-Bus system bus at {self.where}")
        return self._fd

    def process(self) -> list[SystemdEvent]:
        """Drain everything sd-bus has read or can read now, and translate it into events."""
        if self._bus is None or self._lost:
            return []
        from pystemd.dbusexc import DBusBaseError

        events: list[SystemdEvent] = []
        try:
            while True:
                self._drain()
                if not self._inbox:
                    return events
                batch = list(self._inbox)
                self._inbox.clear()
                # May make a blocking call, after which the loop drains again.
                events.extend(self._translate(batch))
        except _Disconnected:
            reason = "the bus daemon closed the connection"
        except DBusBaseError as e:
            reason = str(e)
        self._lost = True
        self._inbox.clear()
        events.append(BusLost(f"lost the D-Bus system bus at {self.where}: {reason}"))
        return events

    def _drain(self) -> None:
        quiet = 0
        while quiet < 2:
            before = len(self._inbox)
            msg = self._bus.process()
            if msg.is_signal(LOCAL_IFACE, b"Disconnected"):
                raise _Disconnected
            quiet = quiet + 1 if len(self._inbox) == before and msg.is_empty() else 0

    def _translate(self, batch: list[tuple[str, Any]]) -> list[SystemdEvent]:
        events: list[SystemdEvent] = []
        requery = False
        for kind, msg in batch:
            msg.process_reply(False)
            body = msg.body
            if kind == "kubelet":
                # body: interface, {changed property: value}, [invalidated properties]
                changed = body[1] if isinstance(body, list) and len(body) > 2 else {}
                invalidated = body[2] if isinstance(body, list) and len(body) > 2 else []
                requery |= b"ActiveState" in changed or b"ActiveState" in invalidated
            elif kind == "unit-removed":
                requery |= isinstance(body, list) and _text(body[0]) == self.kubelet_unit
            elif kind == "unit-files":
                requery = True
            elif kind == "job-new":
                unit = _text(body[2]) if isinstance(body, list) and len(body) > 2 else ""
                if unit in SHUTDOWN_TARGETS:
                    events.append(ShuttingDown(f"systemd queued a job for {unit}"))
            elif kind == "prepare" and body is True:
                events.append(ShuttingDown("logind announced PrepareForShutdown"))
        if requery:
            events.extend(self._update(query_kubelet(self._bus, self.kubelet_unit)))
        return events

    def _update(self, state: KubeletState) -> list[SystemdEvent]:
        before, self._last = self._last, state
        if before == state:
            return []
        events: list[SystemdEvent] = [KubeletChanged(state)]
        if state.decommissioned and not (before is not None and before.decommissioned):
            events.append(
                Decommissioned(
                    f"{self.kubelet_unit} was disabled, masked or removed: {state.detail}"
                )
            )
        return events

    def kubelet(self) -> KubeletState:
        """kubelet's current state (a blocking call: call ``process()`` afterwards)."""
        state = self.unit_state(self.kubelet_unit)
        self._last = state
        return state

    def unit_state(self, unit: str) -> KubeletState:
        """Any unit's state, in the same shape (a blocking call: call ``process()`` afterwards)."""
        from pystemd.dbusexc import DBusBaseError

        try:
            return query_kubelet(self._open_bus(), unit)
        except DBusBaseError as e:
            raise BusUnavailable(f"cannot ask systemd about {unit}: {e}") from e

    def system_stopping(self) -> bool:
        """Whether the system is going down (blocking calls: call ``process()`` afterwards).

        SystemState says "stopping" only once the shutdown transaction runs; a queued start job
        for a shutdown target says it a little earlier.
        """
        from pystemd.dbusexc import DBusBaseError

        bus = self._open_bus()
        try:
            state = bus.get_property(SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"SystemState", b"s")
            if _text(state) == "stopping":
                return True
            # a(usssoo): id, unit, job type, job state, job path, unit path
            jobs = bus.call_method(SYSTEMD, MANAGER_PATH, MANAGER_IFACE, b"ListJobs", []).body
        except DBusBaseError as e:
            raise BusUnavailable(f"cannot ask systemd whether the system is stopping: {e}") from e
        return any(
            _text(job[1]) in SHUTDOWN_TARGETS and _text(job[2]) == "start" for job in jobs or []
        )

    def close(self) -> None:
        """Close the bus (idempotent: pystemd's close() must not run twice on one bus)."""
        bus, self._bus, self._fd = self._bus, None, None
        self._inbox.clear()
        if bus is not None:
            bus.close()
        # Only now, with the bus closed, can nothing call these any more.
        self._callbacks.clear()
        self._lost = False
