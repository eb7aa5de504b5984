"""`calico-mount-reaper demo`, run exactly as the README tells a new user to."""

from __future__ import annotations

import subprocess
import sys


def test_demo_shows_the_failure_then_the_fix_and_touches_nothing_on_the_host() -> None:
    with open("/proc/self/mountinfo") as f:
        before = f.read()
    out = subprocess.run(
        [sys.executable, "-m", "calico_mount_reaper", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    with open("/proc/self/mountinfo") as f:
        after = f.read()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Operation not permitted" in out.stdout  # the original problem, reproduced
    assert out.stdout.count("unmounted  /run/calico/cgroup") == 3  # the whole stack
    assert "rm exited 0; /run/calico is gone." in out.stdout
    assert "Decoys still mounted: 2 of 2." in out.stdout
    assert before == after
