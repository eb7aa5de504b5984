"""The Ansible role and its alerting rules pass their own tools, as CI must show.

ansible-lint (production profile, offline) runs on the role together with the playbooks the
README shows; promtool checks the rule file and runs its unit tests, which prove that each alert
fires on the node in trouble and stays quiet on the healthy one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import fleet

PROMTOOL_TESTS = Path(__file__).resolve().parent / "prometheus/alerts.test.yml"


def required(path: str | None, what: str) -> str:
    """Skip locally, fail in CI (tests/run installs both), when a tool is missing."""
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is not installed (tests/run installs it)", pytrace=False)
        pytest.skip(f"{what} is not installed (tests/run installs it)")
    return path


def test_readme_shows_a_deploy_and_a_reset_playbook() -> None:
    playbooks = fleet.readme_playbooks()
    assert set(playbooks) == {"deploy.yml", "reset.yml"}, playbooks
    assert "- calico_mount_reaper\n" in playbooks["deploy.yml"]
    assert "tasks_from: reset\n" in playbooks["reset.yml"]


def test_role_and_readme_playbooks_pass_ansible_lint_production(tmp_path: Path) -> None:
    lint = required(fleet.tool("ansible-lint"), "ansible-lint")
    project = tmp_path / "project"
    shutil.copytree(fleet.REPO_ROOT / "packaging/ansible", project)
    for name, text in fleet.readme_playbooks().items():
        (project / name).write_text("---\n" + text)
    done = subprocess.run(
        [lint, "--offline", "--profile", "production", "-f", "pep8"],
        cwd=project,
        capture_output=True,
        text=True,
        env=fleet.isolated_env(tmp_path),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stderr, done.stderr
    # It linted the role and both playbooks, not an empty or half-found tree.
    processed = re.search(r"in (\d+) files processed", done.stderr)
    assert processed, done.stderr
    assert int(processed[1]) >= len(list(project.rglob("*.yml"))), done.stderr


def test_alert_rules_pass_promtool_check() -> None:
    promtool = required(shutil.which("promtool"), "promtool (Debian's prometheus package)")
    done = subprocess.run(
        [promtool, "check", "rules", str(fleet.ALERT_RULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 3 rules found" in done.stdout, done.stdout


def test_alerts_fire_on_the_node_in_trouble_only() -> None:
    promtool = required(shutil.which("promtool"), "promtool (Debian's prometheus package)")
    done = subprocess.run(
        [promtool, "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
