"""Issue 14: the Ansible role rolls the reaper out to a fleet and tears the fleet down.

ansible-core from the project venv drives three booted systemd-nspawn nodes (Debian 12, systemd
252) over real ssh, as a controller drives real nodes: each node shares the host's network, so
its sshd listens on a loopback port of its own, and takes a throwaway key made by this test. Two
nodes install the .deb that packaging/build makes, the third a wheel into a venv followed by
`install-units`. The playbooks are the README's own (tests/support/fleet.py takes them from
there), and the settings come from the inventory, as the README shows.

The scenario is one test, because each step starts from the state the previous one left (as on
a real fleet); the step names say which one failed:
1. deploy: every unit active, every `status --json` clean;
2. a second deploy changes nothing on any host;
3. a stacked Calico mount on every node, with a live calico-node on one of them;
4. the reset play: orphaned nodes reaped, the live-owner node force-reaped ("reaped anyway
   (force)"), `/run/calico` deleted everywhere; then a reset with nothing left is `ok`, and a
   target kept busy fails its host with the reaper's reason;
5. a deploy with a bad config value fails on every host with the reaper's message, and the old
   config and the running daemon stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.conftest import unavailable
from tests.support import fleet
from tests.test_packaging import DEB_VERSION, build_packages

pytestmark = pytest.mark.e2e

# sshd for Ansible to reach the node; python3-apt for its apt module; python3-venv for the
# node that installs a wheel into a venv; sudo for the README's `become: true`.
FLEET_PACKAGES = ("openssh-server", "sudo", "python3-apt", "python3-venv")
NODES = ("node1", "node2", "node3")
WHEEL_NODE = "node3"
OWNER_NODE = "node2"  # where calico-node is still alive at reset time
UNIT = "calico-mount-reaper.service"
CONFIG_PATH = "/etc/calico-mount-reaper/config.toml"
METRICS_PATH = "/var/lib/prometheus/node-exporter/calico-mount-reaper.prom"
CALICO = "/run/calico/cgroup"
CUSTOM = "/run/calico-custom"
CUSTOM_MOUNT_UNIT = "run-calico\\x2dcustom.mount"  # systemd-escape --path --suffix=mount
VENV = "/opt/calico-mount-reaper"
# The daemon must not reap the orphaned mounts of step 3 by itself before the reset play does.
GRACE = 3600
# Every node boots with the rootfs's host keys: nothing to trust or remember.
SSH_OPTIONS = ("-o StrictHostKeyChecking=no", "-o UserKnownHostsFile=/dev/null")
# The role's task names, as the results log records them.
REAP_TASK = "Reap every target mount, whatever still uses it (calico-mount-reaper reap --force)"
STILL_MOUNTED_TASK = "Fail the host if a target is still mounted, with the reaper's reasons"
CONFIG_TASK = "Write the config, validated on the node by calico-mount-reaper check-config"
REFUSED_TASK = "Fail with the reaper's own message; the old config and the running daemon stay"


@dataclass
class Node:
    name: str
    container: harness.Container
    port: int

    @property
    def command(self) -> str:
        """Where the role put the command: the package's path, or the venv's."""
        if self.name == WHEEL_NODE:
            return f"{VENV}/bin/calico-mount-reaper"
        return "/usr/bin/calico-mount-reaper"

    def run(self, cmd: list[str] | str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.container.run(cmd, check=check)

    def status(self) -> dict[str, Any]:
        done = self.run([self.command, "status", "--json"])
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def main_pid(self) -> str:
        return self.run(["systemctl", "show", "-P", "MainPID", UNIT]).stdout.strip()

    def config_digest(self) -> str:
        return hashlib.sha256(self.run(["cat", CONFIG_PATH]).stdout.encode()).hexdigest()

    def mounted(self, path: str) -> list[str]:
        return [ln for ln in self.container.mountinfo().splitlines() if ln.split()[4] == path]


@dataclass
class Fleet:
    nodes: list[Node]
    work: Path
    inventory: Path
    playbooks: dict[str, Path]
    runs: int = 0

    def play(self, name: str, *extra_args: str) -> fleet.PlaybookRun:
        run = fleet.run_playbook(self.playbooks[name], self.inventory, self.work, extra_args)
        harness.record(f"ansible {name}", run.seconds)
        # Kept beside the nodes' journals for a post-mortem.
        self.runs += 1
        (self.work / f"{self.runs}-{name}.log").write_text(run.output)
        return run


def free_port() -> int:
    """A loopback port nothing listens on now (the node's sshd binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_wheel(dest: Path) -> Path:
    """The project's wheel, built from a copy of the checkout (a build writes into its tree)."""
    with tempfile.TemporaryDirectory(prefix="cmr-wheel.") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(
            harness.REPO_ROOT,
            src,
            symlinks=True,
            ignore=shutil.ignore_patterns(
                ".*", "tests", "build", "dist", "*.egg-info", "__pycache__"
            ),
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "-w",
                str(dest),
                str(src),
            ],
            check=True,
        )
    (wheel,) = dest.glob("calico_mount_reaper-*.whl")
    return wheel


@pytest.fixture(scope="module")
def fleet_rootfs(e2e_machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The e2e rootfs plus sshd and what Ansible needs on a node, cached as a variant of its own."""
    missing = [t for t in ("ansible-playbook",) if fleet.tool(t) is None]
    missing += [t for t in ("ssh", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        unavailable(f"not found: {' '.join(missing)} (tests/run installs them)")
    try:
        tarball = harness.ensure_rootfs_tarball(
            packages=(*harness.PACKAGES, *FLEET_PACKAGES), variant="fleet"
        )
    except harness.Unavailable as exc:
        unavailable(str(exc))
    lower = harness.lower_dir(tmp_path_factory.mktemp("fleet-rootfs"), variant="fleet")
    try:
        yield harness.restore_rootfs(tarball, lower)
    finally:
        shutil.rmtree(lower, ignore_errors=True)


@pytest.fixture
def booted_fleet(
    fleet_rootfs: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Three booted nodes with sshd on their own loopback ports, and the controller's files."""
    work = tmp_path / "controller"
    work.mkdir()
    key = work / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cmr-e2e-fleet", "-f", str(key)],
        check=True,
    )
    deb = build_packages(tmp_path_factory) / f"calico-mount-reaper_{DEB_VERSION}_all.deb"
    wheel = build_wheel(work / "wheel")

    started = time.monotonic()
    nodes: list[Node] = []
    try:
        for name in NODES:
            port = free_port()
            sshd = f"Port {port}\nListenAddress 127.0.0.1\n"
            container = harness.boot(
                fleet_rootfs,
                tmp_path / name,
                files={
                    "/etc/ssh/sshd_config.d/e2e-fleet.conf": sshd,
                    "/root/.ssh/authorized_keys": key.with_suffix(".pub").read_text(),
                    "/etc/systemd/system/kubelet.service": harness.DUMMY_KUBELET_UNIT,
                },
                host_network=True,
                machine=f"cmr-fleet-{name}",
            )
            nodes.append(Node(name, container, port))
            # Installed and enabled, but not running: nothing holds the mounts of step 3, and it
            # is no decommission either, so the daemon's grace period applies.
            container.run(["systemctl", "enable", "kubelet.service"])
            assert container.run(["systemctl", "is-active", "ssh.service"]).stdout.strip() == (
                "active"
            )
        harness.record("fleet boot (3 nodes)", time.monotonic() - started)

        inventory = work / "inventory.yml"
        custom = {"name": "calico-custom", "prefix": CUSTOM, "fstypes": ["cgroup2"]}
        custom |= {"owners": ["calico-node"], "detach_on_busy": False}
        hosts: dict[str, Any] = {
            n.name: {"ansible_host": "127.0.0.1", "ansible_port": n.port} for n in nodes
        }
        hosts[WHEEL_NODE] |= {
            "calico_mount_reaper_package": str(wheel),
            "calico_mount_reaper_pip_extra_args": "--no-index",  # the node has no index to ask
        }
        group_vars = {
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": " ".join(SSH_OPTIONS),
            "ansible_python_interpreter": "/usr/bin/python3",
            "calico_mount_reaper_package": str(deb),
            "calico_mount_reaper_config": {"grace_period": GRACE, "metrics_path": METRICS_PATH},
            "calico_mount_reaper_targets": [custom],
        }
        # JSON is YAML: the inventory plugin reads it as it is.
        inventory.write_text(json.dumps({"k8s_nodes": {"hosts": hosts, "vars": group_vars}}))
        playbooks = {}
        for name, text in fleet.readme_playbooks().items():
            playbooks[name] = work / name
            playbooks[name].write_text(text)
        yield Fleet(nodes, work, inventory, playbooks)
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.container.close()


def assert_recap(run: fleet.PlaybookRun, failed: bool = False, changed: bool | None = None) -> None:
    """Every host reached; failed (or not) everywhere; changed (or not) everywhere if given."""
    assert set(run.stats) == set(NODES), run.output
    for host, counts in run.stats.items():
        assert counts["unreachable"] == 0, (host, run.output)
        assert bool(counts["failures"]) is failed, (host, counts, run.output)
        if changed is not None:
            assert bool(counts["changed"]) is changed, (host, counts, run.output)
    assert (run.returncode != 0) is failed, run.output


def test_fleet_deploy_is_idempotent_reset_reaps_and_a_bad_config_changes_nothing(
    booted_fleet: Fleet,
) -> None:
    f = booted_fleet
    scenario_started = time.monotonic()

    # ---- 1. deploy: every unit active, every status clean.
    deployed = f.play("deploy.yml")
    assert_recap(deployed, changed=True)
    for node in f.nodes:
        assert node.run(["systemctl", "is-enabled", UNIT]).stdout.strip() == "enabled", node.name
        assert node.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active", node.name
        cmdline = node.run(["cat", f"/proc/{node.main_pid()}/cmdline"]).stdout.split("\0")
        assert node.command in cmdline[:2], (node.name, cmdline)
        status = node.status()
        assert status["targets"] == [] and status["warnings"] == [], (node.name, status)
        assert status["host_mount_namespace"] is True, (node.name, status)
        checked = node.run([node.command, "check-config"]).stdout
        assert f"target calico-custom: {CUSTOM} (cgroup2) owners calico-node" in checked, checked
        config = node.run(["cat", CONFIG_PATH]).stdout
        assert f"grace_period = {GRACE}\n" in config, config
        # The final reap at shutdown is ordered before systemd's unmount of the custom path too
        # (install-units' drop-in on the venv node, the role's own under /etc on the others).
        # systemctl quotes a name with a backslash in it, C-style.
        after = shlex.split(node.run(["systemctl", "show", "-P", "After", UNIT]).stdout)
        assert CUSTOM_MOUNT_UNIT in after, (node.name, after)
        # The restarted daemon runs with the new config: it wrote the metrics textfile.
        node.container.wait_for(
            lambda n=node: n.run(["test", "-f", METRICS_PATH], check=False).returncode == 0,
            timeout=15,
            what=f"{METRICS_PATH} on {node.name}",
        )
        metrics = node.run(["cat", METRICS_PATH]).stdout
        assert "calico_mount_reaper_targets_mounted 0\n" in metrics, metrics
    wheel_unit = f.nodes[2].run(["systemctl", "show", "-P", "FragmentPath", UNIT]).stdout
    assert wheel_unit.strip() == "/usr/local/lib/systemd/system/calico-mount-reaper.service"
    pids = {node.name: node.main_pid() for node in f.nodes}

    # ---- 2. a second deploy changes nothing, anywhere (so no restart either).
    again = f.play("deploy.yml")
    assert_recap(again, changed=False)
    assert {node.name: node.main_pid() for node in f.nodes} == pids

    # ---- 3. a stacked Calico mount everywhere; calico-node still alive on one node.
    for node in f.nodes:
        node.run(
            f"mkdir -p {CALICO} && mount -t cgroup2 none {CALICO} && "
            f"mount -t tmpfs tmpfs {CALICO} && mount -t cgroup2 none {CALICO}"
        )
        assert len(node.mounted(CALICO)) == 3, node.container.mountinfo()
    owner = f.nodes[NODES.index(OWNER_NODE)]
    owner.run(["systemd-run", "--unit=calico-node", "bash", "-c", "exec -a calico-node sleep inf"])
    owner.container.wait_for(
        lambda: owner.status()["targets"][0]["verdict"] == "in-use", what="calico-node seen"
    )
    for node in f.nodes:
        (target,) = node.status()["targets"]
        expected = "in-use" if node is owner else "orphaned"
        assert target["verdict"] == expected, (node.name, target)

    # ---- 4. the reset play: reaped everywhere, /run/calico deleted everywhere.
    reset = f.play("reset.yml")
    assert_recap(reset, changed=True)
    for node in f.nodes:
        report = json.loads(reset.task(REAP_TASK, node.name)["result"]["stdout"])
        assert report["exit_code"] == 0 and report["mode"] == "force", (node.name, report)
        (target,) = report["targets"]
        assert target["mount_point"] == CALICO and target["still_mounted"] is False, target
        assert [a["result"] for a in target["actions"]] == ["unmounted"] * 3, target
        if node is owner:
            assert target["verdict"] == "in-use", target
            assert target["reason"].endswith("; reaped anyway (force)"), target
        else:
            assert target["verdict"] == "orphaned", target
            assert "reaped anyway" not in target["reason"], target
        assert reset.task("Delete /run/calico", node.name)["status"] == "changed"
        assert not node.mounted(CALICO), node.container.mountinfo()
        assert node.run(["test", "-e", "/run/calico"], check=False).returncode != 0, node.name
    # The reaper unmounts; it kills nothing.
    assert owner.run(["systemctl", "is-active", "calico-node.service"]).stdout.strip() == "active"

    # A reset of nodes that are already clean has nothing to do.
    clean = f.play("reset.yml")
    assert_recap(clean, changed=False)
    for node in f.nodes:
        report = json.loads(clean.task(REAP_TASK, node.name)["result"]["stdout"])
        assert report["targets"] == [] and report["exit_code"] == 0, (node.name, report)

    # A target that stays busy (a process's cwd inside it; this rule may not detach) fails its
    # host with the reaper's reason, before the delete; the other hosts go on.
    busy = f.nodes[0]
    busy.run(f"mkdir -p {CUSTOM} && mount -t cgroup2 none {CUSTOM}")
    busy.run(["systemd-run", f"--working-directory={CUSTOM}", "--unit=holder", "sleep", "inf"])
    stuck = f.play("reset.yml")
    assert stuck.returncode != 0, stuck.output
    assert stuck.stats[busy.name]["failures"] == 1, stuck.stats
    assert all(stuck.stats[n.name]["failures"] == 0 for n in f.nodes if n is not busy)
    (failure,) = stuck.failures(busy.name)
    message = failure["result"]["msg"]
    assert failure["task"] == STILL_MOUNTED_TASK, failure
    assert f"{CUSTOM} (" in message and "held by sleep (pid " in message, message
    assert ", cwd)" in message, message
    assert not [
        r for r in stuck.results if r["host"] == busy.name and r["task"] == "Delete /run/calico"
    ]
    assert busy.mounted(CUSTOM), busy.container.mountinfo()
    busy.run(["systemctl", "stop", "holder.service"])

    # ---- 5. a bad config value: every host fails with the reaper's message; nothing changes.
    digests = {node.name: node.config_digest() for node in f.nodes}
    pids = {node.name: node.main_pid() for node in f.nodes}
    bad = json.dumps({"calico_mount_reaper_config": {"grace_period": "soon"}})
    refused = f.play("deploy.yml", "-e", bad)
    assert_recap(refused, failed=True)
    for node in f.nodes:
        message = refused.task(REFUSED_TASK, node.name)["result"]["msg"]
        assert message.startswith("calico-mount-reaper refused the new config: config error: "), (
            message
        )
        assert "key 'grace_period'" in message and "'soon'" in message, message
        assert refused.task(CONFIG_TASK, node.name)["result"]["exit_status"] == 78
        assert node.config_digest() == digests[node.name], node.name
        assert node.run(["systemctl", "is-active", UNIT]).stdout.strip() == "active", node.name
        assert node.main_pid() == pids[node.name], node.name

    harness.record("fleet scenario (3 nodes)", time.monotonic() - scenario_started)
