"""The command line as a user runs it: real processes, real mounts in a private namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from calico_mount_reaper import cli as cli_mod
from calico_mount_reaper.argparser import UsageError

from tests.support import node
from tests.support.nsutil import in_namespace

CLI = [sys.executable, "-m", "calico_mount_reaper"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CALICO_MOUNT_REAPER_CONFIG"}
    full_env.update(env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env)


def _status_and_reap() -> tuple[dict[str, object], int, dict[str, object], str]:
    node.build()
    status = cli("status", "--json")
    table = cli("status")
    reap = cli("reap", "--json")
    return json.loads(status.stdout), reap.returncode, json.loads(reap.stdout), table.stdout


def test_status_lists_targets_then_reap_removes_them() -> None:
    status, code, reap, table = in_namespace(_status_and_reap)
    points = sorted(t["mount_point"] for t in status["targets"])  # type: ignore[union-attr,index]
    assert points == sorted(
        [
            "/run/calico/cgroup",
            "/run/calico/bpffs",
            "/run/calico/felix-cgroup",
            "/run/cilium/cgroupv2",
            node.WEIRD_TARGET,
        ]
    )
    assert {t["verdict"] for t in status["targets"]} == {"orphaned"}  # type: ignore[union-attr,index]
    assert status["schema"] == 1 and status["exit_code"] == 0
    # The human table escapes the control bytes so a newline in a path cannot forge a row.
    assert "/run/calico/we\\040ird\\011name\\012with\\134slash" in table
    assert code == 0
    assert all(not t["still_mounted"] for t in reap["targets"])  # type: ignore[union-attr,index]
    results = {a["result"] for t in reap["targets"] for a in t["actions"]}  # type: ignore[union-attr,index]
    assert results == {"unmounted"}


def _in_use() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    node.build(targets=(("cgroup2", "/run/calico/cgroup"),), decoys=())
    owner = node.Owner.start("calico-node")
    try:
        return cli("reap"), cli("reap", "--force")
    finally:
        owner.stop()


def test_reap_refuses_in_use_with_a_next_step_and_force_overrides() -> None:
    refused, forced = in_namespace(_in_use)
    assert refused.returncode == 0  # a refusal is a decision, not a failure
    assert "in use by calico-node (pid" in refused.stderr
    assert "stop it, or use --force" in refused.stderr
    assert forced.returncode == 0
    assert "unmounted" in forced.stdout


def _dry_run() -> tuple[int, str, list[str], list[str]]:
    node.build()
    before = node.lines()
    out = cli("reap", "--dry-run", "--force")
    return out.returncode, out.stdout, before, node.lines()


def test_dry_run_changes_nothing() -> None:
    code, stdout, before, after = in_namespace(_dry_run)
    assert code == 0 and before == after
    assert "dry-run" in stdout


def _bad_config(text: str) -> tuple[int, str, list[str], list[str]]:
    node.build()
    with open("/run/bad.toml", "w") as f:
        f.write(text)
    before = node.lines()
    out = cli("reap", "--config", "/run/bad.toml")
    return out.returncode, out.stderr, before, node.lines()


def test_bad_config_exits_78_names_the_key_and_unmounts_nothing() -> None:
    code, err, before, after = in_namespace(_bad_config, "grace_period = 'soon'\n")
    assert code == 78
    assert "/run/bad.toml" in err and "grace_period" in err
    assert before == after


def test_config_from_the_environment_is_used_and_checked() -> None:
    def run() -> tuple[int, str]:
        with open("/run/env.toml", "w") as f:
            f.write("reap_on_stop = 'sometimes'\n")
        out = cli("status", env={"CALICO_MOUNT_REAPER_CONFIG": "/run/env.toml"})
        return out.returncode, out.stderr

    code, err = in_namespace(run)
    assert code == 78 and "reap_on_stop" in err and "/run/env.toml" in err


def test_check_config_shows_the_targets(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "ok.toml")
    with open(path, "w") as f:
        f.write(
            '[[target]]\nname = "custom"\nprefix = "/var/run/custom"\n'
            'fstypes = ["cgroup2"]\nowners = ["calico-node"]\n'
        )
    out = cli("check-config", path)
    assert out.returncode == 0, out.stderr
    assert "target custom: /run/custom (cgroup2)" in out.stdout
    assert "target calico: /run/calico" in out.stdout


def test_usage_error_exits_2() -> None:
    assert cli("reap", "--no-such-flag").returncode == 2
    assert cli().returncode == 2


def test_reap_without_cap_sys_admin_exits_77_with_what_to_do() -> None:
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", *CLI, "reap"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 77, out.stderr
    assert "run as root" in out.stderr


# --------------------------------------------------------------------------- the command table


def test_every_command_in_the_table_is_in_help_and_parses_alone() -> None:
    from calico_mount_reaper.cli import COMMANDS, build_parser

    help_text = cli("--help").stdout
    for name, command in COMMANDS.items():
        assert name in help_text and command.help.split()[0] in help_text
        # Built for one command, the parser still knows every other one (for errors and --help).
        parser = build_parser(only=name)
        assert parser.parse_args([name, *(["--dry-run"] if name == "reap" else [])]).command == name


def test_only_the_command_being_run_gets_its_arguments() -> None:
    from calico_mount_reaper.cli import build_parser

    lean = build_parser(only="status")
    assert lean.parse_args(["status", "--json"]).json is True
    with pytest.raises(UsageError):
        lean.parse_args(["reap", "--dry-run"])  # reap's options were never built
    assert build_parser().parse_args(["reap", "--dry-run"]).dry_run is True


def test_modes_offered_are_the_plans_modes() -> None:
    from calico_mount_reaper.plan import Mode

    assert tuple(m.value for m in Mode) == cli_mod.MODES


def test_force_and_mode_together_are_a_usage_error() -> None:
    out = cli("reap", "--dry-run", "--force", "--mode", "normal")
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr
    assert cli("reap", "--dry-run", "--mode", "decommission", "--json").returncode == 0


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["--json", "bogus"], 2, "invalid choice: 'bogus'"),
        (["reap", "--json", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (["reap", "--json", "--force", "--mode", "normal"], 2, "not allowed with argument"),
        (["--json"], 2, "required"),
        (["status", "--json", "--config", "/nonexistent.toml"], 78, "does not exist"),
        (["check-config", "--json", "/nonexistent.toml"], 78, "does not exist"),
    ],
)
def test_json_on_usage_and_config_errors(argv: list[str], code: int, needle: str) -> None:
    out = cli(*argv)
    assert out.returncode == code, out.stderr
    obj = json.loads(out.stdout)  # one JSON object, nothing else on stdout
    assert obj["exit_code"] == code and obj["schema"] == 1
    assert needle in obj["error"], obj
    assert out.stderr == ""


def test_json_on_a_missing_privilege_says_what_to_do() -> None:
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", *CLI, "reap", "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 77, out.stderr
    obj = json.loads(out.stdout)
    assert obj["exit_code"] == 77 and obj["command"] == "reap"
    assert "run as root" in obj["error"] and "--dry-run" in obj["error"]


def test_json_success_carries_a_null_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("grace_period = 3\n")
    obj = json.loads(cli("check-config", "--json", str(path)).stdout)
    assert obj["error"] is None and obj["exit_code"] == 0
    assert [t["name"] for t in obj["targets"]] == ["calico", "cilium"]


def test_version_comes_from_the_installed_metadata(tmp_path: Path) -> None:
    # A distribution's metadata ahead of the real one on the path: --version must follow it,
    # as it follows a package upgrade, whatever the source says.
    meta = tmp_path / "calico_mount_reaper-9.8.7.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: calico-mount-reaper\nVersion: 9.8.7\n"
    )
    paths = [str(tmp_path), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    out = cli("--version", env={"PYTHONPATH": ":".join(paths)})
    assert out.stdout == "calico-mount-reaper 9.8.7\n", out.stderr


def test_an_empty_config_variable_is_a_config_error() -> None:
    out = cli("status", "--json", env={"CALICO_MOUNT_REAPER_CONFIG": ""})
    assert out.returncode == 78
    assert "CALICO_MOUNT_REAPER_CONFIG: is set but empty" in json.loads(out.stdout)["error"]


@pytest.mark.parametrize(
    ("in_host", "needle"),
    [(False, "not in the host's mount namespace"), (None, "cannot tell"), (True, None)],
)
def test_namespace_note_covers_cannot_tell(in_host: bool | None, needle: str | None) -> None:
    note = cli_mod.namespace_note(in_host)
    assert (note is None) if needle is None else (note is not None and needle in note)


def _reap_under_a_unit() -> dict[str, object]:
    """reap as kubelet's ExecStopPost runs it: stdout and stderr are the unit's journal stream."""
    from tests.test_journal import _bind_journal, _drain, first_values, parse_native

    node.build(targets=(("cgroup2", "/run/calico/cgroup"),), decoys=())
    sock = _bind_journal()
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    env = {k: v for k, v in os.environ.items() if k != "CALICO_MOUNT_REAPER_CONFIG"}
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    # --force: the verdict must not depend on fake owners other tests run on this machine.
    done = subprocess.run([*CLI, "reap", "--force"], stdout=write_fd, stderr=write_fd, env=env)
    os.close(write_fd)
    with os.fdopen(read_fd) as r:
        printed = r.read()
    entries = [first_values(parse_native(d)) for d in _drain(sock)]
    return {
        "code": done.returncode,
        "printed": printed,
        "identifiers": {e["SYSLOG_IDENTIFIER"] for e in entries},
        "messages": [e["MESSAGE"].decode() for e in entries],
    }


def test_reap_under_a_unit_writes_entries_as_itself_and_prints_nothing() -> None:
    # Printed lines would reach kubelet's journal named after `timeout`, the drop-in's wrapper.
    got = in_namespace(_reap_under_a_unit)
    assert got["code"] == 0
    assert got["printed"] == ""
    assert got["identifiers"] == {b"calico-mount-reaper"}
    assert any(m.startswith("reaped /run/calico/cgroup") for m in got["messages"]), got  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["status"], "status"),
        (["--json", "reap", "--dry-run"], "reap"),
        (["--config", "status", "reap"], "reap"),  # a config file named like a command
        (["--config=x.toml", "check-config"], "check-config"),
        (["--help"], None),
        (["bogus", "status"], None),
    ],
)
def test_the_command_is_found_before_parsing_as_the_parser_will(
    argv: list[str], name: str | None
) -> None:
    assert cli_mod.command_named_in(argv) == name
