"""`calico-mount-reaper demo`: the leftover-mount problem and its fix, in a sandbox.

Everything happens in a forked child inside private mount and cgroup namespaces, with a tmpfs
over /run, so the host's mount table is never touched. The cgroup namespace matters: a cgroup2
mount shows the cgroup tree of the namespace's root, and ``rm -rf`` walking into it would try
to rmdir real, empty cgroups. Rooted at a fresh empty cgroup of our own, there are none to hit.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable

from calico_mount_reaper import mountinfo
from calico_mount_reaper.config import Config
from calico_mount_reaper.exitcode import ExitCode
from calico_mount_reaper.model import Liveness
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.reaper import run_pass

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
STACK = "/run/calico/cgroup"
DECOYS = (("cgroup2", "/run/calico2"), ("tmpfs", "/run/calicox"))

_libc = ctypes.CDLL(None, use_errno=True)


def _sys(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(fstype: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    _sys(_libc.mount(b"none", target.encode(), fstype.encode(), 0, None), f"mount {target}")


def _unified_hierarchy() -> str:
    for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(f"{path}/cgroup.procs") and os.path.exists(f"{path}/cgroup.controllers"):
            return path
    raise OSError("no cgroup2 hierarchy found under /sys/fs/cgroup")


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _show_mounts(title: str) -> None:
    _say(f"    {title}")
    for m in mountinfo.read().mounts:
        if m.mount_point.startswith("/run/"):
            _say(f"      {m.mount_point:24} {m.fstype:8} (mount {m.mount_id}, on {m.parent_id})")


def _rm_rf(path: str) -> int:
    proc = subprocess.run(["rm", "-rf", path], capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    for line in lines[:3]:
        _say(f"      {line}")
    if len(lines) > 3:
        _say(f"      ... and {len(lines) - 3} more lines like these")
    return proc.returncode


def _scenario() -> int:
    _say("1. A node after Calico ran: in a private mount namespace with a fresh tmpfs on /run,")
    _say(f"   build the stack Calico and its propagated copies leave at {STACK}:")
    _say("   cgroup2, then a tmpfs over it, then cgroup2 again (the kernel refuses the same")
    _say("   cgroup2 twice directly on one point, so real stacks have a layer between).")
    for fstype in ("cgroup2", "tmpfs", "cgroup2"):
        _mount(fstype, STACK)
    _say("   Decoys that must survive: cgroup2 on /run/calico2 and a tmpfs on /run/calicox")
    _say("   (a prefix matches whole path components: /run/calico never covers /run/calico2).")
    for fstype, path in DECOYS:
        _mount(fstype, path)
    _show_mounts("mounts under /run now:")
    _say()
    _say("2. The teardown script runs 'rm -rf /run/calico', as kubeadm reset instructions say:")
    rc = _rm_rf("/run/calico")
    _say(f"   rm exited {rc}: cgroupfs files cannot be deleted, so cleanup stops half way.")
    _say()
    _say("3. calico-mount-reaper reap: no calico-node or kubelet owns these mounts in this")
    _say("   sandbox, so they are orphaned. It unmounts the whole stack, top first, checking")
    _say("   the exact mount ID before every umount2:")
    report = run_pass(Config(), Mode.NORMAL, liveness=Liveness())
    for o in report.outcomes:
        _say(
            f"      {o.result.value:10} {o.mount.mount_point} ({o.mount.fstype}, mount "
            f"{o.mount.mount_id}): {o.detail}"
        )
    _show_mounts("mounts under /run after the reap:")
    _say()
    _say("4. The same 'rm -rf /run/calico' again:")
    rc = _rm_rf("/run/calico")
    gone = not os.path.exists("/run/calico")
    _say(f"   rm exited {rc}; /run/calico {'is gone' if gone else 'is still there'}.")
    decoys_left = sum(
        1 for m in mountinfo.read().mounts if m.mount_point in ("/run/calico2", "/run/calicox")
    )
    _say(f"   Decoys still mounted: {decoys_left} of 2.")
    ok = rc == 0 and gone and decoys_left == 2 and not report.remaining
    _say()
    _say(
        "Done: the reap removed every stacked Calico mount and nothing else."
        if ok
        else "The demo did not end as expected: see above."
    )
    return 0 if ok else 1


def _in_sandbox(cgroup: str, body: Callable[[], int]) -> int:
    """Fork a child that enters its own cgroup, cgroup namespace and mount namespace."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open(f"{cgroup}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            _sys(_libc.unshare(CLONE_NEWNS | CLONE_NEWCGROUP), "unshare")
            _sys(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            _sys(_libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, b"mode=755"), "mount tmpfs /run")
            code = body()
        except OSError as exc:
            sys.stderr.write(f"demo: {exc}\n")
        finally:
            sys.stdout.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run_demo() -> int:
    if os.geteuid() != 0:
        sys.stderr.write(
            "demo: needs root to make mounts in its sandbox; run: sudo calico-mount-reaper demo\n"
        )
        return ExitCode.NOT_PERMITTED
    cgroup = os.path.join(_unified_hierarchy(), f"calico-mount-reaper-demo.{os.getpid()}")
    os.mkdir(cgroup)
    try:
        return _in_sandbox(cgroup, _scenario)
    finally:
        os.rmdir(cgroup)  # the child has exited, so the cgroup is empty again
