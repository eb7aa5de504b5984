"""Run a command with the kernel refusing every netlink socket (seccomp), for the fault suite.

    python3 no_netlink.py CMD [ARGS...]

Installs a seccomp filter that makes socket(AF_NETLINK, ...) fail with EAFNOSUPPORT, then
execs CMD; the filter survives exec. This is an honest "no netlink": the real kernel says no,
exactly as under a seccomp profile or a kernel without the netlink family, and nothing else
changes (AF_UNIX for D-Bus, the journal and the notify socket still works).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

AF_NETLINK, EAFNOSUPPORT = 16, 97
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06
# (audit arch, __NR_socket) per machine.
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def _filter() -> bytes:
    arch, nr_socket = ARCHES[platform.machine()]
    program = [
        (LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        (JEQ_K, 0, 4, arch),
        (LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
        (JEQ_K, 0, 2, nr_socket),
        (LD_ABS_W, 0, 0, 16),  # low half of args[0]: the address family
        (JEQ_K, 1, 0, AF_NETLINK),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | EAFNOSUPPORT),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(_filter())

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(code.raw) // 8, ctypes.cast(code, ctypes.c_void_p))
    if (
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "seccomp")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
