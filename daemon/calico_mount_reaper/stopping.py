"""What stopping the daemon does: whether it makes a final reap, and why (pure).

A stop during shutdown is the last chance to unmount before PID 1 does it itself, noisily, or
before the node's next life trips over what is left; a plain `systemctl stop` leaves the mounts
to whoever comes next unless the operator asked for ``reap_on_stop = "always"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from calico_mount_reaper.model import ReapOnStop

GOING_DOWN = "the system is going down"
SERVICE_STOPPING = "the service is stopping"


@dataclass(frozen=True)
class StopDecision:
    final_reap: bool
    why: str  # GOING_DOWN or SERVICE_STOPPING: what the journal and STATUS= say


def decide_stop(policy: ReapOnStop, going_down: bool) -> StopDecision:
    final = policy is ReapOnStop.ALWAYS or (policy is ReapOnStop.SHUTDOWN and going_down)
    return StopDecision(final, GOING_DOWN if going_down else SERVICE_STOPPING)
