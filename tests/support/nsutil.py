"""Run test code inside a private mount namespace (and optionally a private network namespace).

Every real mount a test makes lives in such a namespace, with a fresh tmpfs over ``/run``, so
the host's mount table is never touched: when the namespace's last process exits, the kernel
drops all of its mounts.

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
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
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


def in_namespace(fn: Callable[..., T], *args: Any, net: bool = False, timeout: float = 120) -> T:
    """Run ``fn(*args)`` in a forked child inside a fresh private mount namespace."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(read_fd)
        status = 0
        try:
            enter_private_namespace(net)
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


class NamespaceShell:
    """A long-lived private mount namespace (tmpfs over /run), entered with nsenter.

    Use as a context manager; ``run()`` executes a command inside, ``popen()`` starts one.
    """

    def __init__(self, net: bool = False) -> None:
        self.net = net
        self._holder: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NamespaceShell:
        flags = ["-m", "--propagation", "private"] + (["-n"] if self.net else [])
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
        return self

    @property
    def pid(self) -> int:
        assert self._holder is not None
        return self._holder.pid

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m"] + (["-n"] if self.net else [])

    def run(
        self, cmd: Sequence[str] | str, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return subprocess.run(
            self.prefix() + argv, check=check, text=True, capture_output=True, **kw
        )

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.prefix() + list(cmd), **kw)

    def mountinfo(self) -> str:
        with open(f"/proc/{self.pid}/mountinfo") as f:
            return f.read()

    def __exit__(self, *exc: object) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()


def quote(path: str) -> str:
    return shlex.quote(path)
