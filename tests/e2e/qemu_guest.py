"""Runs inside a qemu guest as /share/guest.py (tests/e2e/qemu.py boots it): one node's day.

Standard library only, and no imports from the project or the tests at module level: this runs
under the suite's own python3 (3.11 on bookworm, 3.13 on trixie) before the project is
installed. Every step is recorded in /share/out/results.json, including its failure, and the
script always exits 0 once that file is written: the host's tests judge the results, so a
failed step shows its reason there instead of only a stopped VM.

Steps, in order:
1. probe what this kernel has (statmount/listmount, STATX_MNT_ID_UNIQUE, fanotify mount events);
2. install the project from the share, run its fanotify probe, install its units with
   `install-units`, and start a dummy kubelet and the daemon under its real unit;
3. stack a Calico mount (cgroup2 / tmpfs / cgroup2), stop kubelet, and time the daemon's reap;
4. run the requested pytest selection from the share;
5. save the journal and `status --json`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import site
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

SHARE = Path("/share")
OUT = SHARE / "out"
CALICO = "/run/calico/cgroup"
CONFIG = "/etc/calico-mount-reaper/config.toml"
UNIT = "calico-mount-reaper.service"
# The daemon's own reap is what this run shows: kubelet's ExecStopPost drop-in (which
# `install-units` also writes) would reap first, synchronously, and leave the daemon nothing to do.
KUBELET_DROPIN = "/usr/local/lib/systemd/system/kubelet.service.d/50-calico-mount-reaper.conf"
KUBELET_UNIT = """[Unit]
Description=Dummy kubelet (qemu guest stand-in)

[Service]
ExecStart=/bin/sleep infinity
"""

SYS_STATMOUNT = 457
SYS_LISTMOUNT = 458
STATX_MNT_ID_UNIQUE = 0x4000
FAN_REPORT_MNT = 0x4000
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
results: dict[str, Any] = {"steps": {}}


def step(name: str, fn: Callable[[], Any]) -> Any:
    """Run one step, record its outcome and time; a failure is recorded, not raised."""
    started = time.monotonic()
    record: dict[str, Any] = {}
    try:
        record["value"] = fn()
        record["ok"] = True
    except BaseException:
        record["ok"] = False
        record["error"] = traceback.format_exc()
    record["seconds"] = round(time.monotonic() - started, 3)
    results["steps"][name] = record
    save()
    return record.get("value")


def save() -> None:
    (OUT / "results.json").write_text(json.dumps(results, indent=1))


def sh(*argv: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done.stdout


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- 1: kernel facts


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def probe_kernel() -> dict[str, Any]:
    """What the kernel answers, by the syscalls themselves (not by its version number)."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    facts: dict[str, Any] = {"release": os.uname().release}
    for name, number in (("statmount", SYS_STATMOUNT), ("listmount", SYS_LISTMOUNT)):
        # A NULL request: a kernel that has the call answers EFAULT, one that lacks it ENOSYS.
        ret = syscall(ctypes.c_long(number), None, None, ctypes.c_size_t(0), ctypes.c_uint(0))
        facts[name] = _errno_name(ctypes.get_errno()) if ret == -1 else "ok"
    buf = ctypes.create_string_buffer(256)
    ret = _libc.statx(AT_FDCWD, b"/", 0, STATX_MNT_ID_UNIQUE, buf)
    mask = int.from_bytes(buf.raw[0:4], "little")
    facts["statx_mnt_id_unique"] = ret == 0 and bool(mask & STATX_MNT_ID_UNIQUE)
    fd = _libc.fanotify_init(FAN_REPORT_MNT, os.O_RDONLY)
    facts["fanotify_report_mnt"] = _errno_name(ctypes.get_errno()) if fd == -1 else "ok"
    if fd >= 0:
        os.close(fd)
    return facts


def probe_fanotify() -> dict[str, str]:
    """The project's own probe (run as root, outside the unit's seccomp filter): on kernels
    before 6.15 it must name the kernel, not a refusal."""
    from calico_mount_reaper.sources import fanotify

    result = fanotify.probe()
    return {"why": result.why.value, "message": result.message}


# --------------------------------------------------------------------------- 2: the node


def install_project() -> str:
    """The project from the share into /usr/local, as a pip install on the node would put it."""
    payload = SHARE / "payload"
    built = next((payload / "usr/local/lib").glob("python3*/dist-packages"))
    target = next(p for p in site.getsitepackages() if p.startswith("/usr/local/"))
    shutil.copytree(built, target, dirs_exist_ok=True)
    command = Path("/usr/local/bin/calico-mount-reaper")
    command.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(payload / "usr/local/bin/calico-mount-reaper", command)
    command.chmod(0o755)
    return target


def start_node() -> dict[str, str]:
    Path(CONFIG).parent.mkdir(parents=True, exist_ok=True)
    Path(CONFIG).write_text("grace_period = 0.5\n")
    Path("/etc/systemd/system/kubelet.service").write_text(KUBELET_UNIT)
    installed = sh("/usr/local/bin/calico-mount-reaper", "install-units")
    os.unlink(KUBELET_DROPIN)
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "kubelet.service")
    sh("systemctl", "enable", "--now", UNIT)  # Type=notify: returns after READY=1
    return {
        "install_units": installed,
        "active": sh("systemctl", "is-active", UNIT, check=False).strip(),
        "status_text": sh("systemctl", "show", "-P", "StatusText", UNIT).strip(),
    }


# --------------------------------------------------------------------------- 3: the reap


def pid1_mounts_at(path: str) -> list[str]:
    lines = Path("/proc/1/mountinfo").read_text().splitlines()
    return [line for line in lines if line.split()[4] == path]


def journal_entries(*match: str) -> list[dict[str, Any]]:
    out = sh("journalctl", "--no-pager", "-o", "json", *match)
    return [json.loads(line) for line in out.splitlines() if line]


def reap_after_kubelet_stops() -> dict[str, Any]:
    from calico_mount_reaper.journal import MESSAGE_IDS

    os.makedirs(CALICO, exist_ok=True)
    for fstype in ("cgroup2", "tmpfs", "cgroup2"):
        sh("mount", "-t", fstype, fstype if fstype == "tmpfs" else "none", CALICO)
    stacked = len(pid1_mounts_at(CALICO))
    verdict = f"MESSAGE_ID={MESSAGE_IDS['VERDICT']}"
    wait_for(
        lambda: [e for e in journal_entries(verdict) if e.get("RESULT") == "refused"],
        timeout=60,
        what="the daemon's 'held' verdict while kubelet runs",
    )
    still_there = len(pid1_mounts_at(CALICO))
    started = time.monotonic()
    sh("systemctl", "stop", "kubelet.service")
    wait_for(lambda: not pid1_mounts_at(CALICO), timeout=60, what=f"{CALICO} to be reaped")
    return {
        "stacked": stacked,
        "while_held": still_there,
        "reap_seconds": round(time.monotonic() - started, 3),
    }


# --------------------------------------------------------------------------- 4: pytest


def run_pytest(selection: list[str], timeout: float) -> dict[str, Any]:
    """The selection from a private copy of the checkout's tests (the share stays clean)."""
    src = Path("/tmp/src")
    shutil.copytree(SHARE / "src", src)
    env = {
        **os.environ,
        "HYPOTHESIS_PROFILE": "ci",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    (OUT / "pytest.log").write_text(done.stdout + done.stderr)
    return {
        "returncode": done.returncode,
        "seconds": round(time.monotonic() - started, 1),
        "summary": (done.stdout.strip().splitlines() or [""])[-1],
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    OUT.mkdir(exist_ok=True)
    request = json.loads((SHARE / "request.json").read_text())
    results["uptime_at_start"] = float(Path("/proc/uptime").read_text().split()[0])
    # `systemd-analyze time` refuses until the boot transaction, this unit included, is done.
    reached = sh("systemctl", "show", "-P", "ActiveEnterTimestampMonotonic", "multi-user.target")
    results["multi_user_seconds"] = int(reached.strip() or 0) / 1e6
    step("kernel", probe_kernel)
    if step("install", install_project) is not None:
        step("fanotify_probe", probe_fanotify)
        if step("node", start_node) is not None:
            step("reap", reap_after_kubelet_stops)
        step(
            "status",
            lambda: json.loads(sh("/usr/local/bin/calico-mount-reaper", "status", "--json")),
        )
    step("journal", lambda: (OUT / "journal.jsonl").write_text(sh("journalctl", "-o", "json")))
    if request.get("pytest"):
        step("pytest", lambda: run_pytest(request["pytest"], request["pytest_timeout"]))
    results["uptime_at_end"] = float(Path("/proc/uptime").read_text().split()[0])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
