"""The command line as a user runs it: real processes, real mounts in a private namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
