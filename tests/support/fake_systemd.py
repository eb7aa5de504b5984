"""A fake systemd (org.freedesktop.systemd1) and logind (org.freedesktop.login1) on a test bus.

It stands in for systemd because PID 1 on the test machines is not systemd and there is no system
bus; real systemd is covered by the e2e suite (systemd-nspawn). It is a mock of the *peer* only:
the bus daemon is a real ``dbus-daemon``, and the code under test talks to it with pystemd (sd-bus)
exactly as it would talk to PID 1.

It implements only what the reaper asks or listens for:

- Manager: ``Subscribe`` (counted), ``Unsubscribe``, ``GetUnit``, ``LoadUnit``, ``ListJobs``, the
  ``SystemState`` property, and the ``UnitRemoved``, ``UnitFilesChanged``, ``JobNew`` and
  ``JobRemoved`` signals;
- one Unit object per unit name at systemd's escaped object path, with ``Id``, ``ActiveState``,
  ``SubState``, ``LoadState`` and ``UnitFileState``; like PID 1, a path for a unit nobody asked
  about yet answers with ``LoadState`` "not-found";
- logind's Manager with the ``PrepareForShutdown`` signal.

Run: ``python fake_systemd.py BUS_ADDRESS``. It prints ``READY`` once both names are owned, then
reads one command per stdin line and answers each with one ``OK ...`` (or ``ERR ...``) line:

    active UNIT STATE            set ActiveState, emit PropertiesChanged
    unitfile UNIT STATE          set UnitFileState (masked: LoadState too), emit UnitFilesChanged
    remove UNIT                  forget the unit file, emit UnitRemoved
    job UNIT                     queue a start job for UNIT, emit JobNew
    systemstate STATE            set Manager.SystemState
    prepare true|false           emit logind PrepareForShutdown
    burst UNIT N                 flip ActiveState N times (ending where it started), one signal each
    subscribes                   answer ``OK subscribes N``
"""

import asyncio
import re
import sys

from dbus_next import BusType, Message, PropertyAccess
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

SYSTEMD = "org.freedesktop.systemd1"
LOGIND = "org.freedesktop.login1"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"


def escape(name: str) -> str:
    # systemd's bus_label_escape, written independently of the code under test on purpose:
    # a shared helper would hide a bug in it.
    if not name:
        return "_"
    hexed = lambda m: b"_" + m.group().hex().encode()  # noqa: E731
    escaped = re.sub(rb"^[0-9]|[^A-Za-z0-9]", hexed, name.encode())
    return escaped.decode()


class Unit(ServiceInterface):
    def __init__(self, name: str) -> None:
        super().__init__("org.freedesktop.systemd1.Unit")
        self.unit_name = name
        self.active = "inactive"
        self.load = "not-found"
        self.file_state = ""

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":  # noqa: F821
        return self.unit_name

    @dbus_property(access=PropertyAccess.READ)
    def ActiveState(self) -> "s":  # noqa: F821
        return self.active

    @dbus_property(access=PropertyAccess.READ)
    def SubState(self) -> "s":  # noqa: F821
        return {"active": "running", "inactive": "dead"}.get(self.active, self.active)

    @dbus_property(access=PropertyAccess.READ)
    def LoadState(self) -> "s":  # noqa: F821
        return self.load

    @dbus_property(access=PropertyAccess.READ)
    def UnitFileState(self) -> "s":  # noqa: F821
        return self.file_state


class Manager(ServiceInterface):
    def __init__(self, bus: MessageBus) -> None:
        super().__init__("org.freedesktop.systemd1.Manager")
        self.bus = bus
        self.units: dict[str, Unit] = {}
        self.jobs: list[tuple[int, str]] = []
        self.system_state = "running"
        self.subscribes = 0

    def unit(self, name: str) -> Unit:
        if name not in self.units:
            self.units[name] = Unit(name)
            self.bus.export(UNIT_PREFIX + escape(name), self.units[name])
        return self.units[name]

    @method()
    def Subscribe(self) -> None:
        self.subscribes += 1

    @method()
    def Unsubscribe(self) -> None:
        pass

    @method()
    def GetUnit(self, name: "s") -> "o":  # noqa: F821
        if name not in self.units or self.units[name].load == "not-found":
            raise DBusError("org.freedesktop.systemd1.NoSuchUnit", f"Unit {name} not loaded.")
        return UNIT_PREFIX + escape(name)

    @method()
    def LoadUnit(self, name: "s") -> "o":  # noqa: F821
        self.unit(name)
        return UNIT_PREFIX + escape(name)

    @method()
    def ListJobs(self) -> "a(usssoo)":  # noqa: F821
        return [
            [
                jid,
                name,
                "start",
                "waiting",
                f"/org/freedesktop/systemd1/job/{jid}",
                UNIT_PREFIX + escape(name),
            ]
            for jid, name in self.jobs
        ]

    @dbus_property(access=PropertyAccess.READ)
    def SystemState(self) -> "s":  # noqa: F821
        return self.system_state

    @signal()
    def UnitRemoved(self, name: str) -> "so":  # noqa: F821
        return [name, UNIT_PREFIX + escape(name)]

    @signal()
    def UnitFilesChanged(self) -> None:
        return None

    @signal()
    def JobNew(self, job: tuple[int, str]) -> "uos":  # noqa: F821
        jid, name = job
        return [jid, f"/org/freedesktop/systemd1/job/{jid}", name]


class Login(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.freedesktop.login1.Manager")

    @signal()
    def PrepareForShutdown(self, start: bool) -> "b":  # noqa: F821
        return start


def command(manager: Manager, login: Login, words: list[str]) -> str:
    verb, args = words[0], words[1:]
    if verb == "active":
        unit = manager.unit(args[0])
        unit.active = args[1]
        unit.emit_properties_changed({"ActiveState": unit.active, "SubState": unit.SubState})
    elif verb == "unitfile":
        unit = manager.unit(args[0])
        unit.file_state = args[1]
        unit.load = "masked" if args[1].startswith("masked") else "loaded"
        manager.UnitFilesChanged()
    elif verb == "remove":
        unit = manager.unit(args[0])
        unit.load, unit.file_state, unit.active = "not-found", "", "inactive"
        manager.UnitRemoved(args[0])
    elif verb == "job":
        jid = len(manager.jobs) + 1
        manager.jobs.append((jid, args[0]))
        manager.JobNew((jid, args[0]))
    elif verb == "systemstate":
        manager.system_state = args[0]
    elif verb == "prepare":
        login.PrepareForShutdown(args[0] == "true")
    elif verb == "burst":
        unit = manager.unit(args[0])
        start = unit.active
        for i in range(int(args[1])):
            unit.active = start if i % 2 else ("inactive" if start == "active" else "active")
            unit.emit_properties_changed({"ActiveState": unit.active})
    elif verb == "subscribes":
        return f"OK subscribes {manager.subscribes}"
    else:
        return f"ERR unknown command {verb}"
    return "OK"


async def serve(address: str) -> None:
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    manager, login = Manager(bus), Login()
    bus.export("/org/freedesktop/systemd1", manager)
    bus.export("/org/freedesktop/login1", login)
    kubelet = manager.unit("kubelet.service")
    kubelet.active, kubelet.load, kubelet.file_state = "active", "loaded", "enabled"
    await bus.request_name(SYSTEMD)
    await bus.request_name(LOGIND)
    print("READY", flush=True)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    lines = asyncio.ensure_future(reader.readline())
    gone = asyncio.ensure_future(bus.wait_for_disconnect())
    while True:
        done, _ = await asyncio.wait({lines, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone in done:
            gone.exception()  # EOFError when the bus daemon died; expected, so not reported
            return  # nothing left to fake
        line = lines.result().decode()
        if not line:
            return  # the test closed our stdin
        words = line.split()
        reply = command(manager, login, words) if words else "ERR empty"
        # Signals are queued by emit; a round trip through the bus daemon makes sure they left
        # before the test hears OK and starts looking for them.
        await bus.call(_ping())
        print(reply, flush=True)
        lines = asyncio.ensure_future(reader.readline())


def _ping() -> Message:
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus.Peer",
        member="Ping",
    )


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
