"""Run test code inside private mount and PID namespaces (and optionally a network namespace).

Every real mount a test makes lives in such a namespace, with a fresh tmpfs over ``/run``, so
the host's mount table is never touched: when the namespace's last process exits, the kernel
drops all of its mounts.

The PID namespace, with its own ``/proc``, keeps the machine's processes out of the test: on a
Kubernetes node, a ``calico-node`` in some container would otherwise make every target "in use"
and every verdict wrong. Only what the test starts inside is there (`tests/conftest.py` starts
decoys outside to prove it).

Two shapes:
- `in_namespace(fn, *args)` forks, enters the namespaces in the child, runs ``fn`` there and
  returns its (picklable) result or re-raises its failure in the parent;
- `NamespaceShell` keeps a namespace alive around a long-running ``sleep`` so that a test can
  start the daemon inside it and drive mounts from outside with ``nsenter``.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2) for tests (only ever called inside a private namespace)."""
    _check(
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            os.fsencode(fstype),
            flags,
            os.fsencode(data) if data else None,
        ),
        f"mount {fstype} on {target!r}",
    )


def enter_private_namespace(net: bool = False) -> None:
    """unshare the mount (and network) namespace, make it private, put a tmpfs over /run."""
    _check(_libc.unshare(CLONE_NEWNS | (CLONE_NEWNET if net else 0)), "unshare")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / rprivate")
    mount("tmpfs", "/run", "tmpfs", 0, "mode=755")
    if net:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _in_own_pid_namespace() -> int:
    """Fork into a new PID namespace: returns 0 in the child (its PID 1, with its own /proc
    mounted), the child's PID in the parent. Call from inside a private mount namespace."""
    _check(_libc.unshare(CLONE_NEWPID), "unshare PID namespace")
    pid = os.fork()
    if pid == 0:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return pid


class HostSignals:
    """Signals to host processes on behalf of code in a PID namespace, which cannot see them.

    Start it in the test process, before `in_namespace` forks: a thread there does the kill for
    the namespaced code, which talks to it through inherited pipes. For a test that must stall
    a helper it started on the host (a fake systemd) at a chosen moment of a pass.
    """

    def __init__(self) -> None:
        self._req_r, self._req_w = os.pipe()
        self._ack_r, self._ack_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> HostSignals:
        self._thread.start()
        return self

    def kill(self, pid: int, signum: int) -> None:
        """os.kill(pid, signum) as the host sees ``pid``; returns once it is sent."""
        os.write(self._req_w, struct.pack("ii", pid, signum))
        if os.read(self._ack_r, 1) != b"k":
            raise ProcessLookupError(f"no host process {pid}")

    def _serve(self) -> None:
        while len(request := os.read(self._req_r, 8)) == 8:
            pid, signum = struct.unpack("ii", request)
            try:
                os.kill(pid, signum)
                os.write(self._ack_w, b"k")
            except ProcessLookupError:
                os.write(self._ack_w, b"-")

    def __exit__(self, *exc: object) -> None:
        os.close(self._req_w)  # the thread reads EOF and ends
        self._thread.join(5)
        for fd in (self._req_r, self._ack_r, self._ack_w):
            os.close(fd)


def in_namespace(fn: Callable[..., T], *args: Any, net: bool = False, timeout: float = 120) -> T:
    """Run ``fn(*args)`` in a forked child inside fresh private mount and PID namespaces."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(read_fd)
        status = 0
        try:
            enter_private_namespace(net)
            inner = _in_own_pid_namespace()
            if inner:  # the namespace's PID 1 runs fn; its exit status is ours
                os._exit(os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1]) & 0xFF)
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:
            failure = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            payload = pickle.dumps(("error", failure))
            status = 1
        with os.fdopen(write_fd, "wb") as f:
            f.write(payload)
        os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        signal.alarm(int(timeout))
        try:
            data = f.read()
        finally:
            signal.alarm(0)
    os.waitpid(pid, 0)
    if not data:
        raise AssertionError("namespace child died without a result")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"in namespace: {value}")
    return value  # type: ignore[no-any-return]


class NsProcess:
    """A process started inside a `NamespaceShell`.

    nsenter forks to enter a PID namespace and forwards no signal to its child, so ``pid`` and
    the signals go to the child itself (the process the test means), while ``wait`` and
    ``poll`` go through nsenter, which exits with the child's status (or dies of its signal).
    """

    def __init__(self, nsenter: subprocess.Popen[Any]) -> None:
        self.nsenter = nsenter
        self.pid = _child_of(nsenter)
        self.stdout, self.stderr = nsenter.stdout, nsenter.stderr

    @property
    def returncode(self) -> int | None:
        return self.nsenter.returncode

    def send_signal(self, signum: int) -> None:
        if self.nsenter.poll() is None:  # else the PID may already be someone else's
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def poll(self) -> int | None:
        return self.nsenter.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.nsenter.wait(timeout)


def _child_of(parent: subprocess.Popen[Any], timeout: float = 10) -> int:
    """The one child ``parent`` forks (host PID); ``parent.pid`` if it is gone already."""
    deadline = time.monotonic() + timeout
    path = f"/proc/{parent.pid}/task/{parent.pid}/children"
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                children = f.read().split()
        except FileNotFoundError:
            children = []
        if children:
            return int(children[0])
        if parent.poll() is not None:
            return parent.pid
        time.sleep(0.001)
    raise RuntimeError(f"{parent.args!r} started no child in {timeout} s")


class NamespaceShell:
    """Long-lived private mount and PID namespaces (tmpfs over /run, own /proc), entered with
    nsenter.

    Use as a context manager; ``run()`` executes a command inside, ``popen()`` starts one.
    """

    def __init__(self, net: bool = False) -> None:
        self.net = net
        self._holder: subprocess.Popen[bytes] | None = None
        self._init = 0  # the holder's child: PID 1 of the namespace, as the host sees it

    def __enter__(self) -> NamespaceShell:
        # --kill-child: when the holder is killed, PID 1 inside goes too, and with it every
        # process the test left in the namespace.
        flags = ["-m", "--propagation", "private", "-p", "--fork", "--kill-child"]
        flags += ["--mount-proc"] + (["-n"] if self.net else [])
        script = "mount -t tmpfs -o mode=755 tmpfs /run && "
        if self.net:
            script += "ip link set lo up && "
        script += "echo ready && exec sleep infinity"
        self._holder = subprocess.Popen(
            ["unshare", *flags, "sh", "-c", script], stdout=subprocess.PIPE
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != b"ready":
            raise RuntimeError("could not set up the private namespace")
        self._init = _child_of(self._holder)
        return self

    @property
    def pid(self) -> int:
        """PID 1 of the namespace as the host sees it: the one to enter, whose /proc to read."""
        assert self._init
        return self._init

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-p"] + (["-n"] if self.net else [])

    def run(
        self, cmd: Sequence[str] | str, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return subprocess.run(
            self.prefix() + argv, check=check, text=True, capture_output=True, **kw
        )

    def popen(self, cmd: Sequence[str], **kw: Any) -> NsProcess:
        return NsProcess(subprocess.Popen(self.prefix() + list(cmd), **kw))

    def mountinfo(self) -> str:
        with open(f"/proc/{self.pid}/mountinfo") as f:
            return f.read()

    def __exit__(self, *exc: object) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()


def quote(path: str) -> str:
    return shlex.quote(path)
