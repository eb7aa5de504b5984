"""The benchmark harness at its tiny CI size, so that it cannot rot (issue 6).

Not a timed test: goals are not asserted here (a loaded CI machine would fail them); what is
asserted is that every scenario runs end to end in its private namespace, and that the results
file has a row for each with numbers in it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "bench" / "run"
SCENARIOS = (
    "1a pass cost",
    "1b status process",
    "1b imports",
    "1c growth",
    "1d back-ends",
    "2 detection latency",
    "3 storm",
    "4 owner exit",
    "5 idle",
    "6 start",
    "6 stop",
    "6 reap stack",
)


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark mounts (in private namespaces)")
def test_quick_run_writes_a_row_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    before = Path("/proc/self/mountinfo").read_text()
    done = subprocess.run(
        [str(RUN), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=55,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert Path("/proc/self/mountinfo").read_text() == before, "the host's table changed"
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    for name in SCENARIOS:
        assert any(line.startswith(f"| {name} |") for line in rows), f"no row for {name}"
    assert "storm | final view matches the table" in out.read_text()
    assert all(any(ch.isdigit() for ch in line) for line in rows[1:])
