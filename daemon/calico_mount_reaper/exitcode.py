"""The process exit codes, one set for the CLI, the daemon and the demo.

77 and 78 are sysexits(3)'s EX_NOPERM and EX_CONFIG: the unit's ``RestartPreventExitStatus=77 78``
names them, because restarting fixes neither.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # no target is left mounted that this run was allowed to reap
    REMAIN = 1  # some remain (the output says which and why)
    USAGE = 2  # the command line is wrong (argparse's own code)
    NOT_PERMITTED = 77  # needs root (CAP_SYS_ADMIN) or write access it does not have
    CONFIG = 78  # the configuration is wrong (the message names the file and the key)
