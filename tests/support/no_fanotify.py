"""Run a command with the kernel refusing fanotify_init (seccomp), as a unit's
SystemCallFilter= without fanotify_init does.

    python3 no_fanotify.py ERRNO CMD [ARGS...]

Installs a seccomp filter that makes fanotify_init fail with ERRNO (1 for EPERM, as
SystemCallErrorNumber=EPERM), then execs CMD; the filter survives exec. Everything else,
statmount and listmount included, is allowed: only the event source is refused.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
LD_ABS_W, JEQ_K, RET_K = 0x20, 0x15, 0x06
# (audit arch, fanotify_init's number): the old per-architecture tables, unlike statmount's.
ARCHES = {"x86_64": (0xC000003E, 300), "aarch64": (0xC00000B7, 262)}


def _filter(refusal: int) -> bytes:
    arch, fanotify_init = ARCHES[platform.machine()]
    program = [
        (LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        (JEQ_K, 0, 3, arch),
        (LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
        (JEQ_K, 1, 0, fanotify_init),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | refusal),
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)


def install(refusal: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(_filter(refusal))

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
    install(int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
