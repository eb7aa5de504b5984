"""The seccomp programs the fault tests run under refuse exactly what they name.

Interpreted here over every call number of interest, for both machines, so a wrong jump shows
up without installing anything; the fault tests then install them for real.
"""

from __future__ import annotations

import errno
import struct

import pytest

from tests.support.refuse import (
    AF_NETLINK,
    ARCH_OFFSET,
    AUDIT_ARCH,
    JEQ_K,
    LD_ABS_W,
    NR_OFFSET,
    REFUSALS,
    RET_K,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    program,
)


def run(insns: list[tuple[int, int, int, int]], arch: int, nr: int, arg0: int) -> int:
    """A classic-BPF interpreter for the three instructions the programs use."""
    data = struct.pack("iI", nr, arch) + b"\0" * 8 + struct.pack("Q", arg0)
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        assert jt >= 0 and jf >= 0, "BPF only jumps forward"
        if code == LD_ABS_W:
            acc = struct.unpack_from("I", data, k)[0]
            pc += 1
        elif code == JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        else:
            assert code == RET_K
            return k


@pytest.mark.parametrize("machine", sorted(AUDIT_ARCH))
@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_only_the_named_calls_are_refused(what: str, machine: str) -> None:
    insns = program(what, errno.EPERM, machine)
    refusal = REFUSALS[what]
    arch = AUDIT_ARCH[machine]
    refused = SECCOMP_RET_ERRNO | errno.EPERM
    for nr in range(0, 500):
        for arg0 in (AF_NETLINK, 1, 2):
            named = nr in refusal.numbers[machine]
            wanted = named and refusal.first_arg in (None, arg0)
            got = run(insns, arch, nr, arg0)
            assert got == (refused if wanted else SECCOMP_RET_ALLOW), (nr, arg0)
    other_arch = 0x40000003  # i386: its numbers mean other calls, so it is let through
    assert run(insns, other_arch, refusal.numbers[machine][0], AF_NETLINK) == SECCOMP_RET_ALLOW
    assert (insns[0][3], insns[2][3]) == (ARCH_OFFSET, NR_OFFSET)
