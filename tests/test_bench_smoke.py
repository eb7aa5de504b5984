"""The benchmark harness at its tiny CI size, so that it cannot rot (issues 6 and 12).

Not a timed test: goals are not asserted here (a loaded CI machine would fail them, and the
tiny sizes miss some by design); what is asserted is that every scenario runs end to end in its
private namespaces, that the results file has each scenario's rows with numbers in them, and
that every miss carries what bounds it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "bench" / "run"
# The rows each scenario must produce, by their first column: written out here, not taken from
# the harness, so that a scenario that stops producing a row fails this test.
ROWS = (
    "1a pass cost",
    "1b status process",
    "1b imports",
    "1c growth",
    "1d back-ends",
    "2 detection latency",
    "2b detection",
    "3b churn",
    "3c event cost growth",
    "3 storm",
    "4 owner exit",
    "5 idle",
    "5 idle, uevents",
    "6 start",
    "6 stop",
    "6 reap stack",
)


def scenario_names() -> list[str]:
    listed = subprocess.run(
        [str(RUN), "--list"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return listed.stdout.split()


def test_list_names_the_scenarios_of_both_issues() -> None:
    names = scenario_names()
    assert {"pass", "backends", "detection", "churn", "slope", "idle"} <= set(names), names


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts (in private namespaces)")
def test_quick_run_writes_a_row_with_a_figure_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    before = Path("/proc/self/mountinfo").read_text()
    done = subprocess.run(
        [str(RUN), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,  # about 35 s on 2 busy cores; the margin is for a loaded CI machine
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path("/proc/self/mountinfo").read_text() == before, "the host's table changed"
    for name in scenario_names():
        assert f"== {name} " in done.stdout, f"scenario {name} did not run"
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # no header
    for name in ROWS:
        assert any(line.startswith(f"| {name} |") for line in rows), f"no row for {name}"
    for line in rows:
        ours = line.split(" | ")[2]
        assert re.search(r"\d", ours), f"a row without a figure: {line}"
    assert "storm | final view matches the table" in text
    assert re.search(r"real dbus-daemon .*, \d+ uevents", text), "the idle rows hide their setup"
    # Every miss is explained under the table, with a bound measured in the same run.
    missed = [line for line in rows if line.endswith("| **no** |")]
    explained = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(explained) == len(missed), (missed, explained)
    assert "no bound measured" not in text
    assert re.search(r"load average at the start \d", text)


def test_wake_ups_are_put_down_to_the_ping_or_uevent_before_them() -> None:
    sys.path.insert(0, str(RUN.parent))
    try:
        from idle import split_wakes  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(RUN.parent))
    # Counter samples 0.05 s apart: two wakes with a ping at 1.0 s (the ping and its rescan's
    # bus call), one 0.3 s after a uevent at 3.0 s, one at 9.0 s with nothing before it.
    counts = [(t / 20, 0) for t in range(0, 20)] + [(1.0, 2), (1.05, 2)]
    counts += [(3.3, 2), (3.35, 3), (9.0, 3), (9.05, 4)]
    split = split_wakes(counts, pings=[1.0], uevents=[3.0])
    assert (split.watchdog, split.uevent, split.other) == (2, 1, 1)
    assert split.other_at == [9.05]
