"""The systemd integration, proven on a real systemd 252 as PID 1 (issue 4's eight scenarios).

Every scenario boots a fresh overlay with the project installed from the checkout and the units
from systemd/ (rendered for /usr/local/bin, as `install-units` does for a pip install). Mounts are
made inside the container, so they live in its PID 1's mount namespace. Assertions read PID 1's
mountinfo (never the test process's own) and the persisted journal: a mount that is gone after
poweroff proves nothing, because systemd unmounts what is left itself; the order of journal
entries says who got there first.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from calico_mount_reaper import install
from calico_mount_reaper.journal import MESSAGE_IDS
from e2e import harness
from e2e.conftest import Boot

pytestmark = pytest.mark.e2e

UNIT = "calico-mount-reaper.service"
COMMAND = "/usr/local/bin/calico-mount-reaper"  # where the harness installs it, as pip would
CONFIG_PATH = "/etc/calico-mount-reaper/config.toml"
CALICO = "/run/calico/cgroup"
# An owner process as Calico's would look: argv[0] is calico-node (comm stays "sleep"). Ordered
# Before= the reaper, so at shutdown it is still running while the reaper does its final reap.
OWNER = ["systemd-run", "--unit=calico-node-fake", "--property=Before=calico-mount-reaper.service",
         "bash", "-c", "exec -a calico-node sleep infinity"]


def config(grace: float) -> str:
    return f"grace_period = {grace}\n"


def units(config_text: str | None = None, **extra: harness.FileSource) -> dict[str, Any]:
    """The files `install-units` writes for /usr/local/bin, plus a config and ``extra``."""
    files: dict[str, Any] = {
        f"/{rel}": content
        for rel, content in install.planned(_config_for(config_text), COMMAND).items()
        if content is not None
    }
    if config_text is not None:
        files[CONFIG_PATH] = config_text
    files.update(extra)
    return files


def _config_for(text: str | None) -> Any:
    from calico_mount_reaper.config import Config, from_mapping

    if text is None:
        return Config()
    import tomllib

    return from_mapping(tomllib.loads(text), CONFIG_PATH)


def mounts_at(c: harness.Container, path: str) -> list[str]:
    """PID 1's mount table rows at ``path`` (the container's host view)."""
    return [line for line in c.mountinfo().splitlines() if line.split()[4] == path]


def entries(c: harness.Container, *args: str) -> list[dict[str, Any]]:
    """Journal entries as dicts (journalctl -o json), in journal order."""
    return [json.loads(line) for line in c.journal("-o", "json", *args).splitlines() if line]


def reaper_events(c: harness.Container, name: str, **fields: str) -> list[dict[str, Any]]:
    """Structured entries of the reaper (daemon or one-shot) with MESSAGE_ID of ``name``."""
    found = entries(c, f"MESSAGE_ID={MESSAGE_IDS[name]}")
    return [e for e in found if all(e.get(k) == v for k, v in fields.items())]


def line_index(lines: Sequence[str], pattern: str, last: bool = False) -> int:
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert hits, f"no journal line matches {pattern!r}:\n" + "\n".join(lines[-60:])
    return hits[-1] if last else hits[0]


def start_owner(c: harness.Container) -> int:
    c.run(OWNER)
    pid = c.wait_for(lambda: _main_pid(c, "calico-node-fake.service"), what="owner process")
    argv0 = c.run(["cat", f"/proc/{pid}/cmdline"]).stdout.split("\0")[0]
    assert argv0 == "calico-node", argv0
    return pid


def _main_pid(c: harness.Container, unit: str) -> int:
    out = c.run(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
    return int(out or 0)


def stack_calico(c: harness.Container) -> None:
    """A legal stack at /run/calico/cgroup: cgroup2, tmpfs, cgroup2 (as propagation leaves)."""
    c.run(f"mkdir -p {CALICO} && mount -t cgroup2 none {CALICO} && "
          f"mount -t tmpfs tmpfs {CALICO} && mount -t cgroup2 none {CALICO}")
    assert len(mounts_at(c, CALICO)) == 3, c.mountinfo()


def active(c: harness.Container, unit: str) -> str:
    return c.run(["systemctl", "is-active", unit], check=False).stdout.strip()


# --------------------------------------------------------------------------- 1

def test_enable_now_reaches_active_with_ready(boot: Boot) -> None:
    c = boot()
    out = c.run([COMMAND, "install-units"]).stdout
    assert "systemctl daemon-reload && systemctl enable --now calico-mount-reaper" in out, out
    assert "catalog   updated" in out, out
    again = c.run([COMMAND, "install-units"]).stdout
    assert "wrote" not in again and again.count("unchanged") == 4, again

    unit_path = f"/{install.UNIT_DIR}/{UNIT}"
    verify = c.run(["systemd-analyze", "verify", unit_path], check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    c.run("systemctl daemon-reload && systemctl enable --now calico-mount-reaper")
    # Type=notify: "active" only once the daemon sent READY=1 (after its first pass).
    show = dict(
        line.split("=", 1) for line in c.run(
            ["systemctl", "show", UNIT, "-p", "ActiveState,SubState,Type,StatusText,ExecMainPID,"
             "UnitFileState,FragmentPath,NRestarts"]
        ).stdout.splitlines()
    )
    assert show["ActiveState"] == "active" and show["SubState"] == "running", show
    assert show["Type"] == "notify", show
    assert show["UnitFileState"] == "enabled" and show["FragmentPath"] == unit_path, show
    assert show["StatusText"].startswith("watching 2 target rules"), show
    exec_start = c.run(["systemctl", "show", "-P", "ExecStart", UNIT]).stdout
    assert f"argv[]={COMMAND} run ;" in exec_start, exec_start
    # The sandbox is really applied (seccomp, no_new_privs, the three capabilities), and the
    # daemon runs under it (MemoryDenyWriteExecute= included: ctypes needs no W+X memory).
    status = c.run(["cat", f"/proc/{show['ExecMainPID']}/status"]).stdout
    caps = (1 << 21) | (1 << 19) | (1 << 2)  # CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH
    assert re.search(rf"^CapBnd:\s+{caps:016x}$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status

    c.run(["systemctl", "reload", UNIT])
    c.wait_for(lambda: "config reloaded" in c.journal("-u", UNIT), what="reload entry")
    # The preset agrees with the operator's enable.
    preset = c.run(["systemctl", "preset", "--dry-run", UNIT], check=False)
    assert "Removed" not in preset.stdout + preset.stderr, preset

    started = reaper_events(c, "STARTED", _SYSTEMD_UNIT=UNIT)
    assert started and started[0]["RESULT"] == "ready", started
    # The daemon's own namespace is PID 1's: no WRONG_NAMESPACE entry.
    assert not reaper_events(c, "WRONG_NAMESPACE")
    # READY arrived before systemd logged the unit as started.
    lines = c.journal("-o", "short-monotonic").splitlines()
    assert line_index(lines, r"calico-mount-reaper\[\d+\]: watching") < line_index(
        lines, r"Started calico-mount-reaper\.service"
    )
