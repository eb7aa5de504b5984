"""The C library, for the few syscalls Python's os module lacks (umount2, statx, openat2, ...).

Loaded at the first call, not at import: a `status` run that makes no such call should not pay
for ctypes (about 2 ms of its start). Every wrapper returns the errno instead of raising, so the
callers can decide what each errno means for the mount they are acting on.
"""

from __future__ import annotations

import functools

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    import ctypes


@functools.cache
def libc() -> ctypes.CDLL:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def call(name: str, *args: object) -> int:
    """Call libc's ``name``; 0 on success, else the errno it set."""
    import ctypes

    return 0 if getattr(libc(), name)(*args) == 0 else ctypes.get_errno()


def syscall(number: int, *args: object) -> tuple[int, int]:
    """syscall(2) by number, for calls glibc has no wrapper for: (return value, errno)."""
    import ctypes

    result = int(libc().syscall(number, *args))
    return result, (ctypes.get_errno() if result == -1 else 0)
