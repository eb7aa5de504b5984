"""Parse /proc/<pid>/mountinfo into plain Mount records.

Format (proc(5)):

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)

Fields 4, 5 and 10 are escaped by the kernel with octal sequences for space, tab, newline and
backslash (``\\040 \\011 \\012 \\134``); the optional fields (7) run up to the lone ``-``.

Parsing is kept apart from every action on mounts: this module only turns text into data.
A malformed line is skipped and reported, never raised, so one odd line cannot stop a pass.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field

_OCTAL_DIGITS = frozenset("01234567")


@dataclass(frozen=True)
class Mount:
    """One mount. ``index`` is its position in the table: a higher index is a newer mount.

    ``mount_id``/``parent_id`` are the 32-bit IDs mountinfo shows (reused lowest-free-first);
    ``unique_id``/``unique_parent_id`` are the 64-bit IDs of Linux 6.8+ (never reused), or None
    when the table was read from mountinfo, which does not show them.
    """

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: str
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: str
    index: int = 0
    unique_id: int | None = None
    unique_parent_id: int | None = None

    @property
    def propagation(self) -> str:
        """``shared``, ``slave``, ``shared+slave``, ``unbindable`` or ``private``."""
        kinds = [f.split(":", 1)[0] for f in self.optional_fields]
        if "unbindable" in kinds:
            return "unbindable"
        shared, slave = "shared" in kinds, "master" in kinds
        if shared and slave:
            return "shared+slave"
        return "shared" if shared else "slave" if slave else "private"


@dataclass(frozen=True)
class ParseResult:
    mounts: tuple[Mount, ...]
    warnings: tuple[str, ...] = field(default=())


def unescape(text: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` -> space)."""
    if "\\" not in text:
        return text
    # String methods, not a regex: none of our modules needs re for a `status` (test_startup).
    head, *after_each_backslash = text.split("\\")
    parts = [head]
    for piece in after_each_backslash:
        code = piece[:3]
        if len(code) == 3 and _OCTAL_DIGITS.issuperset(code):
            parts.append(chr(int(code, 8)) + piece[3:])
        else:
            parts.append("\\" + piece)
    return "".join(parts)


def escape(path: str) -> str:
    """Escape a path the way the kernel writes it into mountinfo (inverse of `unescape`)."""
    # The kernel's show_path/seq_escape escapes exactly these four bytes in paths; the
    # backslash first, so that the escapes written after it stay as they are.
    return (
        path.replace("\\", "\\134")
        .replace(" ", "\\040")
        .replace("\t", "\\011")
        .replace("\n", "\\012")
    )


def _is_number(text: str) -> bool:
    """One or more ASCII digits, as the kernel prints IDs and device numbers (%d/%u). int()
    alone would also take "3_6", "+36" or non-ASCII digits, turning a garbled line into a
    plausible wrong mount. (Two str methods: a regex match per field cost 10% of a parse.)"""
    return text.isdigit() and text.isascii()


class MalformedLine(ValueError):
    """A mountinfo line that does not have the documented shape."""


def parse_line(line: str, index: int = 0) -> Mount:
    """Parse one mountinfo line, raising `MalformedLine` with the reason."""
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
    except ValueError:
        raise MalformedLine("no ' - ' separator after the optional fields") from None
    if len(fields) < sep + 4:
        raise MalformedLine(f"expected at least {sep + 4} fields, found {len(fields)}")
    if not (_is_number(fields[0]) and _is_number(fields[1])):
        raise MalformedLine("mount ID and parent ID must be integers")
    mount_id, parent_id = int(fields[0]), int(fields[1])
    major, colon, minor = fields[2].partition(":")
    if not (colon and _is_number(major) and _is_number(minor)):
        raise MalformedLine(f"major:minor field {fields[2]!r} is not two numbers")
    mount_point = unescape(fields[4])
    if not mount_point.startswith("/"):
        raise MalformedLine(f"mount point {mount_point!r} is not absolute")
    return Mount(
        mount_id=mount_id,
        parent_id=parent_id,
        major_minor=fields[2],
        root=unescape(fields[3]),
        mount_point=mount_point,
        options=fields[5],
        optional_fields=tuple(filter(None, fields[6:sep])),
        fstype=fields[sep + 1],
        source=unescape(fields[sep + 2]),
        # Super options never contain a space, but join defensively rather than drop text.
        super_options=" ".join(fields[sep + 3 :]),
        index=index,
    )


def _parse_into(line: str, number: int, mounts: list[Mount], warnings: list[str]) -> None:
    """Parse line ``number`` (0-based, which is also the Mount's index) or record why not."""
    try:
        mounts.append(parse_line(line, index=number))
    except MalformedLine as exc:
        warnings.append(f"mountinfo line {number + 1} skipped ({exc}): {line[:200]!r}")


def parse(text: str) -> ParseResult:
    """Parse a whole mountinfo text: one pass, linear in the number of lines.

    A Mount's ``index`` is its 0-based line number: later lines are newer mounts.
    """
    mounts: list[Mount] = []
    warnings: list[str] = []
    for number, line in enumerate(text.split("\n")):
        if line:
            _parse_into(line, number, mounts, warnings)
    return ParseResult(tuple(mounts), tuple(warnings))


def parse_under(text: str, needles: Iterable[str]) -> ParseResult:
    """Parse only the lines that contain one of ``needles`` (escaped text to look for).

    The same Mounts, indexes and warnings as `parse` gives for those lines, at a fraction of
    the cost on a big table: the search runs at C speed through ``str.find``, and only the
    few lines found are split into fields. The caller picks needles that no line it needs can
    lack (see `reaper.needles`), and filters the parsed Mounts exactly afterwards.
    """
    starts: set[int] = set()
    for needle in needles:
        found = text.find(needle)
        while found != -1:
            starts.add(text.rfind("\n", 0, found) + 1)
            line_end = text.find("\n", found)
            found = -1 if line_end == -1 else text.find(needle, line_end)
    mounts: list[Mount] = []
    warnings: list[str] = []
    number, counted_to = 0, 0
    for start in sorted(starts):
        number += text.count("\n", counted_to, start)  # each newline is counted once overall
        counted_to = start
        end = text.find("\n", start)
        line = text[start:] if end == -1 else text[start:end]
        if line:
            _parse_into(line, number, mounts, warnings)
    return ParseResult(tuple(mounts), tuple(warnings))


def decode(data: bytes, needles: Iterable[str] | None = None) -> ParseResult:
    """Parse mountinfo bytes: every line, or only those holding one of ``needles``."""
    text = data.decode("utf-8", "surrogateescape")
    return parse(text) if needles is None else parse_under(text, needles)


def read(path: str = "/proc/self/mountinfo", needles: Iterable[str] | None = None) -> ParseResult:
    """Read and parse a mountinfo file (see `decode`)."""
    with open(path, "rb", buffering=0) as f:
        return decode(read_all(f.fileno()), needles)


def read_all(fd: int) -> bytes:
    """Everything left to read on ``fd``.

    The kernel hands mountinfo out one seq_file page (about 4 KiB) per read(), whatever the
    buffer size: 10k mounts take some 400 reads. FileIO.readall grows one buffer in C; keeping
    400 separate chunks and joining them cost 1.6x the bare reads (20 ms against 12.7 ms at
    10k mounts, bench/ scenario 1a), most of a status pass.
    """
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readall()
