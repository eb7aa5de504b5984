"""Figures the reliability suites publish: each test records one row, `run` renders the table.

A test calls `record(...)` with what it measured; rows are appended as JSON lines to the file
named by ``RELIABILITY_FIGURES`` (set by tests/reliability/run). Without it, recording is a
no-op, so the suites also run as plain pytest tests in CI.
"""

from __future__ import annotations

import json
import os
from typing import Any


def record(suite: str, case: str, **figures: Any) -> None:
    path = os.environ.get("RELIABILITY_FIGURES")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"suite": suite, "case": case, **figures}, sort_keys=True) + "\n")
