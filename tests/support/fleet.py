"""The Ansible side of the fleet tests: the README's playbooks, and ansible-playbook runs whose
results can be asserted on.

The playbooks a user copies from the README are the ones the tests run: they are taken from
between ``<!-- fleet-playbook: NAME -->`` and ``<!-- /fleet-playbook -->`` markers, never kept
as a second copy that could drift.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES_PATH = REPO_ROOT / "packaging/ansible/roles"
ROLE = ROLES_PATH / "calico_mount_reaper"
ALERT_RULES = ROLE / "files/prometheus-alerts.yml"
CALLBACKS = Path(__file__).resolve().parent / "ansible_callbacks"
# The controller's tools come with the interpreter running the tests (the project venv).
VENV_BIN = Path(sys.executable).parent

_PLAYBOOK = re.compile(
    r"<!-- fleet-playbook: (?P<name>[\w.-]+) -->\n"
    r"```yaml\n(?P<body>.*?)```\n"
    r"<!-- /fleet-playbook -->",
    re.DOTALL,
)


def readme_playbooks(readme: Path = REPO_ROOT / "README.md") -> dict[str, str]:
    """Playbook file name -> its text, as the README shows it."""
    return {m["name"]: m["body"] for m in _PLAYBOOK.finditer(readme.read_text())}


def tool(name: str) -> str | None:
    """An Ansible command from the project venv, or None when it is not installed."""
    path = VENV_BIN / name
    return str(path) if path.exists() else None


def isolated_env(home: Path) -> dict[str, str]:
    """Keep Ansible's and ansible-lint's caches and temp files out of root's home."""
    return {
        **os.environ,
        "ANSIBLE_HOME": str(home / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(home / "ansible/tmp"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "NO_COLOR": "1",
    }


@dataclass
class PlaybookRun:
    """What one ansible-playbook run did: its exit code, output, every task result and the recap."""

    returncode: int
    output: str
    results: list[dict[str, Any]]
    stats: dict[str, dict[str, int]]
    seconds: float

    def task(self, name: str, host: str) -> dict[str, Any]:
        """The result of the task called ``name`` on ``host`` (the last one, if it ran twice)."""
        found = [r for r in self.results if r["task"] == name and r["host"] == host]
        if not found:
            ran = sorted({(r["task"], r["host"]) for r in self.results})
            raise AssertionError(f"no result for task {name!r} on {host}; ran: {ran}")
        return found[-1]

    def failures(self, host: str) -> list[dict[str, Any]]:
        return [r for r in self.results if r["host"] == host and r["status"] == "failed"]


def run_playbook(
    playbook: Path,
    inventory: Path,
    work: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> PlaybookRun:
    """ansible-playbook with the role on its path, recording results through result_log."""
    log = work / f"results-{time.monotonic_ns()}.jsonl"
    playbook_bin = tool("ansible-playbook")
    assert playbook_bin, "ansible-playbook is not installed in the project venv"
    started = time.monotonic()
    done = subprocess.run(
        [playbook_bin, "-i", str(inventory), str(playbook), *extra_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=playbook.parent,
        env={
            **isolated_env(work),
            "ANSIBLE_ROLES_PATH": str(ROLES_PATH),
            "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACKS),
            "ANSIBLE_CALLBACKS_ENABLED": "result_log",
            "CMR_ANSIBLE_RESULT_LOG": str(log),
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            **(env or {}),
        },
    )
    seconds = time.monotonic() - started
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    stats: dict[str, dict[str, int]] = {}
    results = []
    for entry in entries:
        if "stats" in entry:
            stats = entry["stats"]
        else:
            results.append(entry)
    return PlaybookRun(done.returncode, done.stdout + done.stderr, results, stats, seconds)
