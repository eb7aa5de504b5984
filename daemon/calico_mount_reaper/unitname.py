"""systemd's names for things: a path's mount unit, and a unit's D-Bus object path.

Pure string work, shared by the installer (``After=`` lines for custom targets) and the daemon
(asking PID 1 whether it saw our unmounts, following kubelet's unit). Both escapings must agree
with systemd byte for byte, or we would order against, or listen to, a unit that does not exist;
the tests compare them with ``systemd-escape`` and libsystemd's ``sd_bus_path_encode``.
"""

from __future__ import annotations

UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"

# systemd-escape keeps these bytes as they are (unit-name.c, VALID_CHARS minus "-" and "\\").
_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def escape_path(path: str) -> str:
    """``systemd-escape --path PATH``: the name systemd gives the unit for a path.

    The path is simplified (duplicate and trailing slashes go), "/" becomes "-", and every byte
    outside [A-Za-z0-9:_.] becomes ``\\xNN``, as does a leading ".". The root is "-".
    """
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return "-"
    out = []
    # os.fsencode on Linux, without importing os into a pure module.
    for i, byte in enumerate("/".join(parts).encode("utf-8", "surrogateescape")):
        if byte == ord("/"):
            out.append("-")
        elif byte in _KEEP and not (i == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def mount_unit(path: str) -> str:
    """The ``.mount`` unit PID 1 keeps for a mount at ``path``."""
    return escape_path(path) + ".mount"


def unit_object_path(unit: str) -> str:
    """The object path systemd gives a unit, escaped as systemd's bus_label_escape() does.

    Every byte outside [A-Za-z0-9] becomes ``_xx`` (lower-case hex), and so does a leading
    digit, because a D-Bus path element must not start with one; the empty name is "_".
    """
    if not unit:
        return UNIT_PATH_PREFIX + "_"
    raw = unit.encode()
    return UNIT_PATH_PREFIX + "".join(
        chr(b) if _alpha(b) or (i > 0 and _digit(b)) else f"_{b:02x}" for i, b in enumerate(raw)
    )


def _alpha(b: int) -> bool:
    return 0x41 <= b <= 0x5A or 0x61 <= b <= 0x7A


def _digit(b: int) -> bool:
    return 0x30 <= b <= 0x39
