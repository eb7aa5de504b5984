"""The plain data the core decides on: processes, kubelet's state, liveness, and the choices.

Nothing here touches the system, and nothing here imports a module that does: `plan`, `grace`
and the daemon's `schedule` take these types without pulling in a ``/proc`` scan or D-Bus. The
shell (`liveness`, `sources.systemd`) fills them in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# /proc/<pid>/comm holds at most 15 bytes of the executable's name.
COMM_LEN = 15

# A site (a target mount point with its stack) as the grace timers and the journal know it: its
# mount point and the sorted IDs of its root mounts, so a mount replaced at the same path is new.
SiteKey = tuple[str, tuple[int, ...]]


class KubeletSource(str, enum.Enum):
    """Where kubelet's state came from, so operators can tell an answer from a guess.

    A ``str`` enum: the value is what the JSON output and the journal show.
    """

    DBUS = "dbus"  # systemd answered over the system bus
    PROCESS = "process"  # no bus: a running kubelet process counts as active
    NONE = "none"  # nothing was asked yet


class ReapOnStop(str, enum.Enum):
    """The ``reap_on_stop`` setting: when stopping the daemon makes a final reap."""

    SHUTDOWN = "shutdown"  # only when the whole system is going down
    ALWAYS = "always"  # on every stop, even with owners alive
    NEVER = "never"  # never: stopping the service changes nothing


def comm_of(name: str) -> str:
    """What /proc/<pid>/comm shows for an executable ``name``: the kernel cuts 15 *bytes*
    (maybe inside a UTF-8 sequence), and `liveness.read_process` decodes with "replace"."""
    return name.encode()[:COMM_LEN].decode("utf-8", "replace")


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    argv0: str  # basename of argv[0]; "" for kernel threads and zombies

    def is_named(self, name: str) -> bool:
        # A long name only shows truncated in comm; matching the prefix errs towards "in use".
        return self.argv0 == name or self.comm == comm_of(name)


@dataclass(frozen=True)
class KubeletState:
    """``active`` is None when it could not be learned at all."""

    active: bool | None
    source: KubeletSource
    unit_file_state: str = ""  # enabled, disabled, masked, ... (D-Bus only)
    load_state: str = ""  # loaded, not-found, masked, ... (D-Bus only)
    detail: str = ""

    @property
    def decommissioned(self) -> bool:
        """kubelet.service was disabled, masked or removed: the node is leaving the cluster.

        Only systemd can say so: without its answer there is no way to tell.
        """
        return self.source is KubeletSource.DBUS and (
            self.load_state in ("not-found", "masked")
            or self.unit_file_state in ("disabled", "masked", "masked-runtime")
        )


@dataclass(frozen=True)
class Liveness:
    owners: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # name -> live PIDs
    kubelet: KubeletState = KubeletState(active=False, source=KubeletSource.NONE)
