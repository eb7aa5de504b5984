"""metrics.py: the exposition text, and atomic replacement on a real directory."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest
from calico_mount_reaper.metrics import Counters, render, write_textfile

COUNTERS = Counters(
    reaps_total=3,
    refusals_total=1,
    failures_total=0,
    targets_mounted=2,
    last_pass_timestamp_seconds=1712345678.25,
)

EXPECTED = """\
# HELP calico_mount_reaper_reaps_total Target mount points unmounted completely.
# TYPE calico_mount_reaper_reaps_total counter
calico_mount_reaper_reaps_total 3
# HELP calico_mount_reaper_refusals_total Reaps refused (in use, held, shadowed, mount ID changed).
# TYPE calico_mount_reaper_refusals_total counter
calico_mount_reaper_refusals_total 1
# HELP calico_mount_reaper_failures_total Reaps that failed and left a target mounted.
# TYPE calico_mount_reaper_failures_total counter
calico_mount_reaper_failures_total 0
# HELP calico_mount_reaper_targets_mounted Target mount points mounted at the last pass.
# TYPE calico_mount_reaper_targets_mounted gauge
calico_mount_reaper_targets_mounted 2
# HELP calico_mount_reaper_last_pass_timestamp_seconds Unix time of the last completed pass over \
the mount table.
# TYPE calico_mount_reaper_last_pass_timestamp_seconds gauge
calico_mount_reaper_last_pass_timestamp_seconds 1712345678.25
"""


def test_render_is_the_text_exposition_format() -> None:
    text = render(COUNTERS)
    assert text == EXPECTED
    sample = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]* [-+]?([0-9.e+-]+|Inf|NaN)")
    for line in text.splitlines():
        assert line.startswith(("# HELP ", "# TYPE ")) or sample.fullmatch(line), line


def test_render_special_floats() -> None:
    text = render(Counters(last_pass_timestamp_seconds=float("nan")))
    assert "calico_mount_reaper_last_pass_timestamp_seconds NaN\n" in text
    text = render(Counters(last_pass_timestamp_seconds=float("inf")))
    assert "calico_mount_reaper_last_pass_timestamp_seconds +Inf\n" in text


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_creates_a_world_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "calico_mount_reaper.prom"
    old_umask = os.umask(0o077)
    try:
        write_textfile(target, COUNTERS)
    finally:
        os.umask(old_umask)
    assert target.read_text() == EXPECTED
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(tmp_path) == []


def test_write_replaces_the_old_file_by_rename(tmp_path: Path) -> None:
    target = tmp_path / "m.prom"
    target.write_text("old\n")
    old_inode = target.stat().st_ino
    with open(target) as reader:  # a scrape in progress keeps reading the old, whole file
        write_textfile(str(target), COUNTERS)
        assert reader.read() == "old\n"
    assert target.read_text() == EXPECTED
    assert target.stat().st_ino != old_inode


def test_a_planted_symlink_is_replaced_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    target = tmp_path / "m.prom"
    target.symlink_to(victim)
    write_textfile(target, COUNTERS)
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink()
    assert target.read_text() == EXPECTED


def test_a_dangling_symlink_creates_nothing_at_its_target(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    target = tmp_path / "m.prom"
    target.symlink_to(elsewhere)
    write_textfile(target, COUNTERS)
    assert not elsewhere.exists()
    assert target.read_text() == EXPECTED


def test_errors_name_the_path_and_leave_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "m.prom"
    target.mkdir()  # a directory where the file should be: rename(2) fails
    with pytest.raises(OSError) as info:
        write_textfile(target, COUNTERS)
    assert info.value.filename == str(target)
    assert str(target) in str(info.value)
    assert "cannot write metrics textfile" in str(info.value)
    assert _leftovers(tmp_path) == []

    missing = tmp_path / "no-such-dir" / "m.prom"
    with pytest.raises(FileNotFoundError) as info2:
        write_textfile(missing, COUNTERS)
    assert info2.value.filename == str(missing)


def test_concurrent_readers_only_ever_see_a_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "m.prom"
    write_textfile(target, COUNTERS)
    seen: set[str] = set()
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            seen.add(target.read_text())

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for n in range(300):
            write_textfile(target, Counters(reaps_total=n % 2))
    finally:
        done.set()
        reader.join()
    whole = {render(COUNTERS), render(Counters(reaps_total=0)), render(Counters(reaps_total=1))}
    assert seen <= whole
    assert _leftovers(tmp_path) == []
