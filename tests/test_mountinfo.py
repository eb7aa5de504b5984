"""The mountinfo parser: real kernel lines, escapes, malformed input and scale."""

from __future__ import annotations

import os
import time

import pytest
from calico_mount_reaper.mountinfo import (
    MalformedLine,
    Mount,
    escape,
    parse,
    parse_line,
    read,
    unescape,
)
from hypothesis import given
from hypothesis import strategies as st

from tests.support.nsutil import in_namespace, mount
from tests.support.strategies import parsed_mount_lists, path_text, render

# The two examples from proc(5) (the first is the documented one, the second its newer wording).
PROC5_EXAMPLE = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
PROC5_NEWER = (
    "36 35 98:0 /mnt1 /mnt2 rw,noatime shared:7 master:1 - ext3 /dev/root rw,errors=continue"
)
# Lines as a Kubernetes node running Calico shows them.
CALICO_LINE = "1201 29 0:27 / /run/calico/cgroup rw,relatime shared:598 - cgroup2 none rw,seclabel"
ROOT_LINE = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"


def test_proc5_example_gives_every_field() -> None:
    m = parse_line(PROC5_EXAMPLE, index=3)
    assert m == Mount(
        mount_id=36,
        parent_id=35,
        major_minor="98:0",
        root="/mnt1",
        mount_point="/mnt2",
        options="rw,noatime",
        optional_fields=("master:1",),
        fstype="ext3",
        source="/dev/root",
        super_options="rw,errors=continue",
        index=3,
    )
    assert m.propagation == "slave"


def test_calico_line() -> None:
    m = parse_line(CALICO_LINE)
    assert (m.mount_id, m.parent_id, m.mount_point, m.fstype, m.source) == (
        1201,
        29,
        "/run/calico/cgroup",
        "cgroup2",
        "none",
    )
    assert m.propagation == "shared"


@pytest.mark.parametrize(
    ("optional", "propagation"),
    [
        ("", "private"),
        ("shared:1", "shared"),
        ("master:2", "slave"),
        ("master:2 propagate_from:5", "slave"),
        ("shared:7 master:1", "shared+slave"),
        ("shared:7 master:1 propagate_from:3", "shared+slave"),
        ("unbindable", "unbindable"),
        # proc(5): parsers must ignore optional fields they do not know.
        ("newfangled:9", "private"),
        ("shared:3 newfangled:9", "shared"),
    ],
)
def test_optional_fields_and_propagation(optional: str, propagation: str) -> None:
    line = f"40 22 0:5 / /x rw {optional} - tmpfs tmpfs rw".replace("  ", " ")
    m = parse_line(line)
    assert m.optional_fields == tuple(optional.split())
    assert m.propagation == propagation
    assert (m.fstype, m.source, m.super_options) == ("tmpfs", "tmpfs", "rw")


def test_several_optional_fields_keep_their_order() -> None:
    assert parse_line(PROC5_NEWER).optional_fields == ("shared:7", "master:1")


@pytest.mark.parametrize(
    ("escaped", "plain"),
    [
        (r"/run/calico/a\040b", "/run/calico/a b"),
        (r"/run/calico/tab\011here", "/run/calico/tab\there"),
        (r"/run/calico/new\012line", "/run/calico/new\nline"),
        (r"/run/calico/back\134slash", "/run/calico/back\\slash"),
        # A literal backslash followed by digits: the kernel escapes the backslash itself.
        (r"/run/calico/\134040", "/run/calico/\\040"),
        (r"/x\040\011\012\134", "/x \t\n\\"),
    ],
)
def test_octal_escapes_in_root_mount_point_and_source(escaped: str, plain: str) -> None:
    m = parse_line(f"50 22 0:27 {escaped} {escaped} rw - cgroup2 {escaped} rw")
    assert (m.root, m.mount_point, m.source) == (plain, plain, plain)
    assert escape(plain) == escaped


def test_super_options_are_kept_whole() -> None:
    m = parse_line("50 22 0:27 / /x rw - fuse.sshfs user@host:/a rw,user_id=0")
    assert (m.fstype, m.source, m.super_options) == ("fuse.sshfs", "user@host:/a", "rw,user_id=0")


def test_empty_source_is_not_malformed() -> None:
    # `mount -t tmpfs "" /x` shows an empty source field; the line is still well formed.
    m = parse_line("50 22 0:40 / /x rw - tmpfs  rw")
    assert (m.fstype, m.source, m.super_options) == ("tmpfs", "", "rw")


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "\x00\x01\x02\udcff\udcfe",
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 ext3 /dev/root rw",  # no separator
        "36 35 98:0 /mnt1 /mnt2 rw,noatime -",  # nothing after the separator
        "36 35 98:0 /mnt1 /mnt2 rw - ext3 /dev/root",  # no super options
        "3x 35 98:0 / /mnt rw - ext3 /dev/root rw",  # non-integer mount ID
        "36 y 98:0 / /mnt rw - ext3 /dev/root rw",  # non-integer parent ID
        "3_6 35 98:0 / /mnt rw - ext3 /dev/root rw",  # int() would take "3_6" as 36
        "+36 35 98:0 / /mnt rw - ext3 /dev/root rw",
        "-36 35 98:0 / /mnt rw - ext3 /dev/root rw",
        "\u0663\u0666 35 98:0 / /mnt rw - ext3 /dev/root rw",  # Arabic-Indic digits
        "36  35 98:0 / /mnt rw - ext3 /dev/root rw",  # double space
        "36 35 98 / /mnt rw - ext3 /dev/root rw",  # major:minor without colon
        "36 35 a:b / /mnt rw - ext3 /dev/root rw",
        "36 35 98:0 / mnt rw - ext3 /dev/root rw",  # relative mount point
        "36 35 98:0 / - rw - ext3 /dev/root rw",
    ],
)
def test_malformed_line_raises_malformed_line(line: str) -> None:
    with pytest.raises(MalformedLine):
        parse_line(line)


def test_malformed_lines_are_skipped_with_a_warning() -> None:
    text = "\n".join([ROOT_LINE, "garbage \udcff\x00", CALICO_LINE, "3_6 1 0:1 / /y rw - x y z"])
    result = parse(text + "\n")
    assert [m.mount_id for m in result.mounts] == [22, 1201]
    # Indexes are line numbers: "newer" stays meaningful across a skipped line.
    assert [m.index for m in result.mounts] == [0, 2]
    assert len(result.warnings) == 2
    assert "line 2" in result.warnings[0] and "separator" in result.warnings[0]
    assert "line 4" in result.warnings[1] and "integer" in result.warnings[1]


def test_empty_text() -> None:
    result = parse("")
    assert result.mounts == () and result.warnings == ()


@given(st.text())
def test_parse_never_raises_and_accounts_for_every_line(text: str) -> None:
    result = parse(text)
    lines = [line for line in text.split("\n") if line]
    assert len(result.mounts) + len(result.warnings) == len(lines)


def test_parse_real_proc_self_mountinfo() -> None:
    result = read("/proc/self/mountinfo")
    assert result.warnings == ()
    with open("/proc/self/mountinfo") as f:
        assert len(result.mounts) == sum(1 for _ in f)
    assert any(m.mount_point == "/" for m in result.mounts)
    ids = [m.mount_id for m in result.mounts]
    assert len(set(ids)) == len(ids)
    proc = [m for m in result.mounts if m.mount_point == "/proc"]
    assert proc and proc[0].fstype == "proc"


def _mount_weird_names() -> list[str]:
    names = ["a b", "tab\there", "new\nline", "back\\slash", "\\040literal"]
    for name in names:
        path = f"/run/{name}"
        os.mkdir(path)
        mount("tmpfs", path, "tmpfs")
    return [m.mount_point for m in read().mounts if m.mount_point.startswith("/run/")]


def test_real_kernel_escapes_round_trip() -> None:
    # The kernel writes these names; the parser must give back exactly what was mounted.
    points = in_namespace(_mount_weird_names)
    assert sorted(points) == sorted(
        ["/run/a b", "/run/tab\there", "/run/new\nline", "/run/back\\slash", "/run/\\040literal"]
    )


@given(path_text)
def test_escape_unescape_round_trip(text: str) -> None:
    escaped = escape(text)
    assert unescape(escaped) == text
    # What splits a line into fields or lines never survives escaping.
    assert not any(c in escaped for c in " \t\n")


@given(parsed_mount_lists())
def test_render_parse_round_trip(mounts: tuple[Mount, ...]) -> None:
    result = parse(render(mounts))
    assert result.warnings == ()
    assert result.mounts == mounts


def test_parse_is_linear() -> None:
    def table(n: int) -> str:
        return "".join(
            f"{i + 100} 22 0:{i % 200} / /run/calico/m\\040{i} rw,relatime shared:{i} "
            f"- cgroup2 none rw\n"
            for i in range(n)
        )

    small, large = table(10_000), table(100_000)

    def best_of(text: str, runs: int) -> float:
        times = []
        for _ in range(runs):
            # CPU time of this process: what other processes on the machine do cannot skew it.
            start = time.process_time()
            result = parse(text)
            times.append(time.process_time() - start)
        assert not result.warnings
        return min(times)

    ratio = best_of(large, 3) / best_of(small, 3)
    # Ten times the lines: linear is ~10x; quadratic would be ~100x. Loose for noisy machines.
    assert ratio < 20, f"100k lines took {ratio:.1f}x the time of 10k lines"
