"""Run a command with the kernel refusing one kind of system call (seccomp), for fault tests.

    python3 refuse.py WHAT ERRNO CMD [ARGS...]

WHAT names what a sandbox or an older kernel would refuse:
- ``netlink``: socket(AF_NETLINK, ...), as a profile without the netlink family;
- ``listmount``: listmount and statmount, as SystemCallFilter= does on systemd 252 (EPERM when
  named, ENOSYS for syscalls systemd does not know);
- ``fanotify``: fanotify_init, as a unit that keeps @privileged denied.

ERRNO is the error the call gets (1 is EPERM, as SystemCallErrorNumber=EPERM). The filter is
installed in this process and survives the exec of CMD, so the program under test meets the
real kernel saying no, and nothing else changes. Runs as a script (no imports from tests/), and
`install` is importable for in-process use.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from typing import NamedTuple

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06
NR_OFFSET, ARCH_OFFSET, ARG0_OFFSET = 0, 4, 16  # in struct seccomp_data (low half of args[0])
AF_NETLINK = 16
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


class Refusal(NamedTuple):
    numbers: dict[str, tuple[int, ...]]  # machine -> syscall numbers
    first_arg: int | None = None  # refused only when args[0] is this (socket's family)


# The old per-architecture tables differ (socket, fanotify_init); the calls added since 5.x
# (statmount 457, listmount 458) have one number everywhere.
REFUSALS = {
    "netlink": Refusal({"x86_64": (41,), "aarch64": (198,)}, first_arg=AF_NETLINK),
    "listmount": Refusal({"x86_64": (457, 458), "aarch64": (457, 458)}),
    "fanotify": Refusal({"x86_64": (300,), "aarch64": (262,)}),
}


def program(what: str, error: int, machine: str) -> list[tuple[int, int, int, int]]:
    """The classic BPF program: other architectures and other calls pass, the named ones fail.

    Jumps are relative to the next instruction, so the layout is fixed first and each jump is
    computed from where its target ends up.
    """
    refusal = REFUSALS[what]
    numbers = refusal.numbers[machine]
    allow = 3 + len(numbers)  # index of RET ALLOW: LD arch, JEQ arch, LD nr, one JEQ per call
    # A matched number goes on to the argument check (LD, JEQ, RET ALLOW) if there is one, else
    # straight to the refusal: either way, the instruction after RET ALLOW. BPF jumps only
    # forward, hence the argument check's own RET ALLOW.
    matched = allow + 1
    insns = [
        (LD_ABS_W, 0, 0, ARCH_OFFSET),
        (JEQ_K, 0, allow - 2, AUDIT_ARCH[machine]),
        (LD_ABS_W, 0, 0, NR_OFFSET),
    ]
    for nr in numbers:
        insns.append((JEQ_K, matched - len(insns) - 1, 0, nr))
    insns.append((RET_K, 0, 0, SECCOMP_RET_ALLOW))
    if refusal.first_arg is not None:
        insns.append((LD_ABS_W, 0, 0, ARG0_OFFSET))
        insns.append((JEQ_K, 1, 0, refusal.first_arg))
        insns.append((RET_K, 0, 0, SECCOMP_RET_ALLOW))
    insns.append((RET_K, 0, 0, SECCOMP_RET_ERRNO | error))
    return insns


def install(what: str, error: int) -> None:
    """Install the filter in this process (and what it execs): no way back."""
    code = b"".join(struct.pack("HBBI", *i) for i in program(what, error, platform.machine()))
    buffer = ctypes.create_string_buffer(code)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if (
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), f"seccomp ({what})")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    os.execvp(sys.argv[3], sys.argv[3:])
