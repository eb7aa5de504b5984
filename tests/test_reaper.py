"""The reaper pass on a real, node-like mount table inside a private mount namespace."""

from __future__ import annotations

import os
import subprocess

import pytest
from calico_mount_reaper.config import Config
from calico_mount_reaper.model import KubeletSource, KubeletState, Liveness
from calico_mount_reaper.mountinfo import ParseResult, parse_line
from calico_mount_reaper.mounttable import MountApi, choose, switch_for
from calico_mount_reaper.plan import Mode, Verdict, assess, find_sites
from calico_mount_reaper.reaper import PassReport, run_pass
from calico_mount_reaper.unmount import Outcome, Result

from tests.support import node
from tests.support.nsutil import in_namespace, mount

ORPHANED = Liveness()


def _reap_node_like() -> dict[str, object]:
    node.build()
    before = node.lines()
    report = run_pass(Config(), Mode.NORMAL, liveness=ORPHANED)
    after = node.lines()
    rm = subprocess.run(["rm", "-rf", "/run/calico", "/run/cilium/cgroupv2"], capture_output=True)
    return {
        "before": before,
        "after": after,
        "results": [o.result for o in report.outcomes],
        "remaining": len(report.remaining),
        "rm": rm.returncode,
        "rm_err": rm.stderr.decode(),
        "calico_exists": os.path.exists("/run/calico"),
    }


def test_reap_leaves_exactly_the_targets_unmounted_and_the_rest_byte_for_byte() -> None:
    out = in_namespace(_reap_node_like)
    before, after = out["before"], out["after"]
    assert isinstance(before, list) and isinstance(after, list)
    kept = [line for line in before if not node.is_under_target(_point(line))]
    # Every non-target line is still there, unchanged to the byte; every target line is gone.
    assert after == kept
    assert len(before) - len(after) == len(node.TARGETS)
    assert out["results"] == [Result.UNMOUNTED] * len(node.TARGETS)
    assert out["remaining"] == 0
    assert out["rm"] == 0, out["rm_err"]
    assert not out["calico_exists"]


def _point(line: str) -> str:
    return parse_line(line).mount_point


def _owner_alive(force: bool) -> tuple[list[str], list[Result], int]:
    node.build(targets=(("cgroup2", "/run/calico/cgroup"),), decoys=())
    owner = node.Owner.start("calico-node")
    try:
        report = run_pass(Config(), Mode.FORCE if force else Mode.NORMAL)
        reasons = [a.reason for a in report.assessments]
        return reasons, [o.result for o in report.outcomes], len(report.remaining)
    finally:
        owner.stop()


def test_an_owner_alive_refuses_the_reap_and_names_it() -> None:
    reasons, results, remaining = in_namespace(_owner_alive, False)
    assert results == [] and remaining == 1
    assert "in use by calico-node (pid" in reasons[0]


def test_force_reaps_even_with_the_owner_alive() -> None:
    reasons, results, remaining = in_namespace(_owner_alive, True)
    assert results == [Result.UNMOUNTED] and remaining == 0
    assert "reaped anyway (force)" in reasons[0]


def _verdicts(kubelet: bool, mode: Mode) -> tuple[Verdict, bool, int]:
    node.build(targets=(("cgroup2", "/run/calico/cgroup"),), decoys=())
    liveness = Liveness(
        kubelet=KubeletState(active=kubelet, source=KubeletSource.PROCESS, detail="test")
    )
    report = run_pass(Config(), mode, liveness=liveness)
    a = report.assessments[0]
    return a.verdict, a.reap, len(report.remaining)


def test_held_by_kubelet_is_left_alone_in_normal_mode() -> None:
    assert in_namespace(_verdicts, True, Mode.NORMAL) == (Verdict.HELD, False, 1)


def test_decommission_drops_the_held_check() -> None:
    assert in_namespace(_verdicts, True, Mode.DECOMMISSION) == (Verdict.HELD, True, 0)


def _dry_run() -> tuple[list[str], list[str], list[Result]]:
    node.build()
    before = node.lines()
    report = run_pass(Config(), Mode.FORCE, dry_run=True, liveness=ORPHANED)
    return before, node.lines(), [o.result for o in report.outcomes]


def test_dry_run_changes_nothing() -> None:
    before, after, results = in_namespace(_dry_run)
    assert before == after
    assert results and set(results) == {Result.DRY_RUN}


def _emptied_dir_on_tmpfs() -> tuple[bool, bool]:
    node.mount_at("cgroup2", "/run/calico/cgroup")
    report = run_pass(Config(), Mode.NORMAL, liveness=ORPHANED)
    return os.path.exists("/run/calico/cgroup"), "/run/calico/cgroup" in report.removed_dirs


def test_emptied_mount_point_directory_is_removed_on_tmpfs() -> None:
    exists, removed = in_namespace(_emptied_dir_on_tmpfs)
    assert (exists, removed) == (False, True)


def _report_with_a_new_mount_at_the_same_path(unmounted: bool) -> PassReport:
    """A pass that reaped (or failed to reap) a site, then saw a new target at the same path."""
    old = parse_line("900 30 0:31 / /run/calico/cgroup rw - cgroup2 none rw", index=5)
    new = parse_line("901 30 0:31 / /run/calico/cgroup rw - cgroup2 none rw", index=6)
    rules = Config().rules
    [before] = find_sites([old], rules)
    [after] = find_sites([new], rules)
    liveness = Liveness(kubelet=KubeletState(active=False, source=KubeletSource.PROCESS))
    report = PassReport(Mode.NORMAL, dry_run=False)
    report.assessments = (assess(before, liveness, Mode.NORMAL),)
    result = Result.UNMOUNTED if unmounted else Result.FAILED
    report.outcomes.append(Outcome(old, result, "test"))
    report.remaining = (after,)
    return report


def test_a_reap_counts_even_when_the_path_is_mounted_anew_before_the_final_read() -> None:
    # The soak test's race: the target is unmounted, and a new one lands at the same path
    # before the pass reads the table a last time. The reap happened, and must be journaled.
    assert len(_report_with_a_new_mount_at_the_same_path(unmounted=True).reaped) == 1
    # Without a verified unmount of every member, the final read decides: still there.
    assert _report_with_a_new_mount_at_the_same_path(unmounted=False).reaped == ()


def _mounted_anew_mid_pass() -> tuple[list[str], int] | str:
    """Reap an orphaned target while a new one is mounted at its path during the pass."""
    table = choose(switch_for("auto")).table
    if table.api is not MountApi.LISTMOUNT:
        return f"needs 64-bit mount IDs (Linux 6.8+), and this run reads {table.api.value}"
    os.makedirs("/run/calico/cgroup")
    mount("none", "/run/calico/cgroup", "cgroup2")
    reads = 0

    def read() -> ParseResult:
        nonlocal reads
        reads += 1
        if reads == 2:  # the re-read after the first round's unmount
            mount("none", "/run/calico/cgroup", "cgroup2")
        return table.read(Config().rules)

    report = run_pass(Config(), Mode.NORMAL, liveness=ORPHANED, read=read)
    still = sum(1 for line in node.lines() if " /run/calico/cgroup " in line)
    return [o.result.value for o in report.outcomes], still


def test_a_target_mounted_during_a_pass_is_left_for_its_own_verdict() -> None:
    # Later rounds finish what the first read showed; a mount that appeared meanwhile is new,
    # and must wait for its own grace period and a fresh look at its owners. Only the 64-bit
    # IDs tell it apart: on mountinfo it takes the freed ID at the same path (SECURITY.md).
    got = in_namespace(_mounted_anew_mid_pass)
    if isinstance(got, str):
        pytest.skip(got)
    results, still = got
    assert results == ["unmounted"]
    assert still == 1
