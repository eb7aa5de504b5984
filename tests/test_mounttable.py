"""One mount-table interface, two back-ends: both must give the planner the same sites.

- A property test over generated kernel tables: the pure half of the listmount back-end
  (`to_mounts`: filter and order by unique ID) against the mountinfo parser, same sites, stacks,
  shadowing and unmount order.
- Real tables in private mount namespaces: the whole listmount read (statx, climb, listmount,
  statmount) against mountinfo, for stacks, over-mounted parents, missing prefixes, propagated
  copies and symlinked prefixes; once as this kernel lists (whole subtrees, 6.18) and once
  trimmed to what Linux 6.8 lists (direct children only), which no kernel here can show.
- The switch, the probe and its fallbacks, including a real seccomp filter that refuses the
  calls the way a unit's SystemCallFilter= does.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from calico_mount_reaper import mountinfo
from calico_mount_reaper.config import MOUNT_API_ENV, Config, ConfigError, from_mapping, load
from calico_mount_reaper.mounttable import (
    PRUNE_AFTER,
    KernelTable,
    MountApi,
    MountinfoTable,
    Switch,
    choose,
    nearest_existing,
    outermost,
    switch_for,
    to_mounts,
)
from calico_mount_reaper.plan import Site, find_sites
from calico_mount_reaper.statmount import ApiError, Kernel, MountRecord
from calico_mount_reaper.targets import BUILTIN_RULES, Rule, search_needles
from hypothesis import given

from tests.support import refuse
from tests.support.daemon_harness import DaemonRun
from tests.support.fault_launchers import refusing
from tests.support.nsutil import in_namespace, mount
from tests.support.strategies import configs, kernel_tables, render

MS_BIND, MS_SHARED = 4096, 1 << 20
CUSTOM = Rule("custom", "/run/custom/deep", frozenset({"cgroup2"}), ("x",))
RULES = (*BUILTIN_RULES, CUSTOM)


def _has_kernel_api() -> bool:
    try:
        Kernel().statmount(Kernel().unique_mount_id("/"))
    except OSError:
        return False
    return True


needs_kernel_api = pytest.mark.skipif(not _has_kernel_api(), reason="needs Linux 6.8+")


def signature(sites: Sequence[Site]) -> list[tuple[object, ...]]:
    """What the planner decides by: sites in order, members in unmount order, each member's
    identity and the fields shown to users."""
    return [
        (
            s.mount_point,
            s.rule.name,
            tuple(m.mount_id for m in s.roots),
            tuple(
                (m.mount_id, m.parent_id, m.mount_point, m.fstype, m.major_minor, m.root)
                for m in s.members
            ),
        )
        for s in sites
    ]


# ---- the pure half, over generated tables -------------------------------------------------


def _records(mounts: Sequence[Mount]) -> list[MountRecord]:
    """The statmount answers for a table: unique IDs handed out in creation (line) order."""
    base = 1 << 31
    by_id = {m.mount_id: m for m in mounts}
    return [
        MountRecord(
            unique_id=base + m.index,
            unique_parent_id=base + by_id[m.parent_id].index if m.parent_id in by_id else base,
            mount_id=m.mount_id,
            parent_id=m.parent_id,
            dev_major=int(m.major_minor.split(":")[0]),
            dev_minor=int(m.major_minor.split(":")[1]),
            attr=0,
            propagation=0,
            peer_group=0,
            master=0,
            propagate_from=0,
            root=m.root,
            mount_point=m.mount_point,
            fstype=m.fstype,
            source=m.source,
        )
        for m in mounts
    ]


Mount = mountinfo.Mount


@given(kernel_tables(), configs())
def test_both_back_ends_give_the_same_sites_for_any_kernel_table(
    mounts: tuple[Mount, ...], config: Config
) -> None:
    via_mountinfo = mountinfo.parse_under(render(mounts), search_needles(config.rules)).mounts
    via_kernel = to_mounts(reversed(_records(mounts)), [r.prefix for r in config.rules])
    assert signature(find_sites(via_kernel, config.rules)) == signature(
        find_sites(via_mountinfo, config.rules)
    )
    assert all(m.unique_id is not None for m in via_kernel)
    assert [m.index for m in via_kernel] == sorted(m.index for m in via_kernel)


def test_outermost_prefixes_cover_the_rest_component_wise() -> None:
    assert outermost(["/run/calico/x", "/run/calico", "/run/calico2", "/run/cilium/cgroupv2"]) == [
        "/run/calico",
        "/run/calico2",
        "/run/cilium/cgroupv2",
    ]


def _nearest(tmp: str) -> list[str]:
    os.makedirs(f"{tmp}/a/b")
    os.symlink(f"{tmp}/a/b", f"{tmp}/a/link")
    with open(f"{tmp}/a/file", "w"):
        pass
    return [
        nearest_existing(p)
        for p in (f"{tmp}/a/b/c/d", f"{tmp}/a/link/c", f"{tmp}/a/file/x", f"{tmp}/a/b")
    ]


def test_nearest_existing_ancestor_stops_at_a_symlink_a_file_or_a_missing_part(
    tmp_path: object,
) -> None:
    tmp = str(tmp_path)
    assert _nearest(tmp) == [f"{tmp}/a/b", f"{tmp}/a", f"{tmp}/a", f"{tmp}/a/b"]


# ---- real tables ---------------------------------------------------------------------------


class ChildrenOnlyKernel(Kernel):
    """This kernel's answers trimmed to what Linux 6.8 lists: direct children only. (A fake of
    the one behaviour this host cannot show; every other answer is the real kernel's.)"""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0

    def listmount(self, mnt_id: int) -> list[int]:
        self.listings += 1
        listed = super().listmount(mnt_id)
        return [i for i in listed if self.statmount(i).unique_parent_id == mnt_id]


class CountingKernel(Kernel):
    def __init__(self) -> None:
        super().__init__()
        self.stats = 0

    def statmount(self, mnt_id: int) -> MountRecord:
        self.stats += 1
        return super().statmount(mnt_id)


def _mkmount(fstype: str, path: str, source: str = "none") -> None:
    os.makedirs(path, exist_ok=True)
    mount(source, path, fstype)


def _scenario(name: str) -> None:
    """Build one table inside the namespace (never rm -rf below a cgroup2 made here)."""
    if name == "stack":  # cgroup2 / tmpfs / cgroup2 at one point, and a bpffs beside it
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("tmpfs", "/run/calico/cgroup", "t")
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("bpf", "/run/calico/bpffs", "bpf")
    elif name == "overmounted-parent":  # a tmpfs over /run/calico hides the first cgroup2
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("tmpfs", "/run/calico", "t")
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("tmpfs", "/run/calico", "t2")  # and a second layer over both
    elif name == "prefix-is-a-mount":  # /run/calico is a tmpfs; a nested prefix is missing
        _mkmount("tmpfs", "/run/calico", "t")
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("tmpfs", "/run/custom", "t")  # /run/custom/deep does not exist
    elif name == "missing-prefixes":  # nothing there yet: no targets, nothing read below
        _mkmount("tmpfs", "/run/other", "t")
    elif name == "propagated-copies":  # shared peers at one path: the cgroup2 lands twice
        _mkmount("tmpfs", "/run/calico", "t")
        mount("none", "/run/calico", "", MS_SHARED)
        mount("/run/calico", "/run/calico", "", MS_BIND)
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("cgroup2", "/run/custom/deep/x")
    elif name == "overmounted-run":  # a second tmpfs over /run hides everything below it
        _mkmount("cgroup2", "/run/calico/cgroup")
        mount("run2", "/run", "tmpfs")
    elif name == "big-site":  # a site with more mounts inside than a prune lets pass
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("cgroup2", "/run/custom/deep/x")
        _mkmount("tmpfs", "/run/custom/deep/x", "t")  # mkdir below a cgroup2 would make cgroups
        for i in range(PRUNE_AFTER + 6):
            _mkmount("tmpfs", f"/run/custom/deep/x/m{i}", "m")
    elif name == "var-run-real-directory":  # /var/run not the usual symlink: a second tree
        mount("tmpfs", "/var", "tmpfs")  # only in this namespace
        _mkmount("cgroup2", "/var/run/calico/cgroup")
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("cgroup2", "/var/run/calico2")
    elif name == "symlinked-prefix":  # /run/calico points elsewhere: nothing there is a target
        _mkmount("cgroup2", "/run/elsewhere/cgroup")
        os.symlink("/run/elsewhere", "/run/calico")
    elif name == "deep-nesting":  # a target inside a decoy inside a target's parent
        _mkmount("tmpfs", "/run/cilium", "t")
        _mkmount("cgroup2", "/run/cilium/cgroupv2")
        _mkmount("tmpfs", "/run/cilium/cgroupv2x", "t")
        _mkmount("cgroup2", "/run/calico/cgroup")
        _mkmount("tmpfs", "/run/calico/cgroup/sub", "t")  # sub-directory of a real cgroup
    else:
        raise AssertionError(name)


SCENARIOS = (
    "stack",
    "overmounted-parent",
    "prefix-is-a-mount",
    "missing-prefixes",
    "propagated-copies",
    "overmounted-run",
    "big-site",
    "var-run-real-directory",
    "symlinked-prefix",
    "deep-nesting",
)


NOISE_IN_RUN = 200


def _compare(name: str) -> dict[str, object]:
    _scenario(name)
    for i in range(50):  # mounts nobody asks about, outside every prefix's subtree
        _mkmount("tmpfs", f"/tmp/noise{i}", "n")
    # ... and below /run, in one subtree, as containerd's are: listed, but pruned.
    _mkmount("tmpfs", "/run/containerd", "c")
    for i in range(NOISE_IN_RUN):
        _mkmount("tmpfs", f"/run/containerd/task{i}/rootfs", "n")
    counting, children_only = CountingKernel(), ChildrenOnlyKernel()
    via_mountinfo = MountinfoTable().read(RULES)
    via_kernel = KernelTable(counting).read(RULES)
    via_children = KernelTable(children_only).read(RULES)
    out = {
        "mountinfo": signature(find_sites(via_mountinfo.mounts, RULES)),
        "kernel": signature(find_sites(via_kernel.mounts, RULES)),
        "children": signature(find_sites(via_children.mounts, RULES)),
        "stats": counting.stats,
        "unique": all(m.unique_id is not None for m in via_kernel.mounts),
    }
    for i in range(50):
        subprocess.run(["umount", f"/tmp/noise{i}"], check=False)  # /tmp is not ours to hide
    return out


@needs_kernel_api
@pytest.mark.parametrize("name", SCENARIOS)
def test_both_back_ends_agree_on_a_real_table(name: str) -> None:
    out = in_namespace(_compare, name)
    assert out["kernel"] == out["mountinfo"]
    assert out["children"] == out["mountinfo"]  # and as Linux 6.8 lists
    assert out["unique"]
    sites = out["mountinfo"]
    assert isinstance(sites, list) and isinstance(out["stats"], int)
    # (mount point, roots, members), newest site first.
    expected = {
        "stack": [("/run/calico/bpffs", 1, 1), ("/run/calico/cgroup", 1, 3)],
        # The hidden first cgroup2 and the one on the tmpfs over /run/calico: one path, two roots.
        "overmounted-parent": [("/run/calico/cgroup", 2, 2)],
        "prefix-is-a-mount": [("/run/calico/cgroup", 1, 1)],
        "missing-prefixes": [],
        "propagated-copies": [("/run/custom/deep/x", 1, 1), ("/run/calico/cgroup", 2, 2)],
        "overmounted-run": [("/run/calico/cgroup", 1, 1)],
        "big-site": [("/run/custom/deep/x", 1, PRUNE_AFTER + 8), ("/run/calico/cgroup", 1, 1)],
        "var-run-real-directory": [("/run/calico/cgroup", 1, 1), ("/var/run/calico/cgroup", 1, 1)],
        "symlinked-prefix": [],
        "deep-nesting": [("/run/calico/cgroup", 1, 2), ("/run/cilium/cgroupv2", 1, 1)],
    }[name]
    assert [(s[0], len(s[2]), len(s[3])) for s in sites] == expected
    # Only the subtrees were read: the noise outside /run (and the host's mounts) never, and the
    # noise below /run only until the prune (64 mounts, then one listmount skips the rest).
    assert out["stats"] < 12 + PRUNE_AFTER + (PRUNE_AFTER + 8 if name == "big-site" else 0)


def _probe_under_seccomp(errno_value: int) -> tuple[str, str, bool, str]:
    """Install a real seccomp filter that refuses statmount/listmount with ``errno_value``,
    as systemd's SystemCallFilter= does, then let `choose` probe."""
    refuse.install("listmount", errno_value)
    choice = choose(Switch.AUTO)
    try:
        Kernel().statmount(1)
        direct = "allowed"
    except ApiError as exc:
        direct = errno.errorcode[exc.errno or 0]
    return choice.table.api.value, choice.reason, choice.refused, direct


@needs_kernel_api
@pytest.mark.parametrize("refusal", [errno.EPERM, errno.ENOSYS])
def test_a_sandbox_that_refuses_the_calls_falls_back_to_mountinfo_and_says_why(
    refusal: int,
) -> None:
    api, reason, refused, direct = in_namespace(_probe_under_seccomp, refusal)
    assert direct == errno.errorcode[refusal]  # the filter really bit
    assert api == "mountinfo"
    assert refused  # this kernel has the calls (6.8+): a refusal is loud, not "old kernel"
    assert "refused" in reason and "SystemCallFilter" in reason


def test_an_old_kernel_without_the_calls_falls_back_quietly() -> None:
    def enosys() -> Kernel:
        raise ApiError(errno.ENOSYS, "statmount: Function not implemented")

    choice = choose(Switch.AUTO, probe=enosys, kernel_release="6.1.0-40-amd64")
    assert choice.table.api is MountApi.MOUNTINFO
    assert not choice.refused and "6.1.0-40-amd64" in choice.reason


def test_an_unexpected_probe_failure_falls_back_loudly_and_never_raises() -> None:
    def efault() -> Kernel:
        raise ApiError(errno.EFAULT, "statmount: Bad address")

    choice = choose(Switch.AUTO, probe=efault, kernel_release="6.18.0")
    assert choice.table.api is MountApi.MOUNTINFO and choice.refused
    assert "failed its probe" in choice.reason and "Bad address" in choice.reason


def test_the_switch_and_a_test_table_force_mountinfo_without_probing() -> None:
    def never() -> Kernel:
        raise AssertionError("probed")

    assert choose(Switch.MOUNTINFO, probe=never).table.api is MountApi.MOUNTINFO
    forced = choose(Switch.AUTO, path="/tmp/table", probe=never).table
    assert isinstance(forced, MountinfoTable) and forced.path == "/tmp/table"


@needs_kernel_api
def test_auto_picks_the_kernel_api_on_this_kernel() -> None:
    choice = choose(Switch.AUTO)
    assert choice.table.api is MountApi.LISTMOUNT and not choice.refused


# ---- the switch: config key and environment -------------------------------------------------


def test_mount_api_key_is_validated_and_the_environment_wins(tmp_path: object) -> None:
    assert from_mapping({"mount_api": "mountinfo"}, "f.toml").mount_api == "mountinfo"
    with pytest.raises(ConfigError, match=r"mount_api.*expected one of"):
        from_mapping({"mount_api": "statmount"}, "f.toml")
    assert load(None, {MOUNT_API_ENV: "mountinfo"}).mount_api == "mountinfo"
    assert load(None, {}).mount_api == "auto"
    path = os.path.join(str(tmp_path), "config.toml")
    with open(path, "w") as f:
        f.write('mount_api = "mountinfo"\n')
    assert load(path, {MOUNT_API_ENV: "auto"}).mount_api == "auto"
    with pytest.raises(ConfigError, match=MOUNT_API_ENV):
        load(None, {MOUNT_API_ENV: "fast"})


def test_the_environment_wins_wherever_the_table_is_opened() -> None:
    assert switch_for("auto", {MOUNT_API_ENV: "mountinfo"}) is Switch.MOUNTINFO
    assert switch_for("mountinfo", {MOUNT_API_ENV: "auto"}) is Switch.AUTO
    assert switch_for("mountinfo", {}) is Switch.MOUNTINFO


def _status_json() -> dict[str, dict[str, object]]:
    _mkmount("cgroup2", "/run/calico/cgroup")
    _mkmount("tmpfs", "/run/calico/cgroup", "t")
    reports: dict[str, dict[str, object]] = {}
    for switch in ("auto", "mountinfo"):
        proc = subprocess.run(
            [sys.executable, "-m", "calico_mount_reaper", "status", "--json"],
            capture_output=True,
            env={**os.environ, MOUNT_API_ENV: switch},
            check=True,
        )
        reports[switch] = json.loads(proc.stdout)
    return reports


@needs_kernel_api
def test_status_json_names_the_back_end_it_used() -> None:
    reports = in_namespace(_status_json)
    auto, forced = reports["auto"], reports["mountinfo"]
    assert auto["mount_api"] == "listmount" and forced["mount_api"] == "mountinfo"

    # Verdicts depend on owner processes anywhere on the machine; the table part must agree.
    def table(report: dict[str, object]) -> list[tuple[object, object]]:
        targets = report["targets"]
        assert isinstance(targets, list)
        return [(t["mount_point"], t["mounts"]) for t in targets]

    assert table(auto) == table(forced) != []


# ---- the daemon under a sandbox that refuses the calls --------------------------------------

# A rule of our own, with an owner name nothing else on this machine runs (owners count in any
# PID namespace, and other test runs may have calico-node processes alive).
OWN_TARGET = "/run/kapitest/cgroup"
OWN_RULE = (
    'grace_period = 0.2\nbuiltin_targets = false\n[[target]]\nname = "kapitest"\n'
    'prefix = "/run/kapitest"\nfstypes = ["cgroup2"]\nowners = ["kapitest-owner"]\n'
)
FELL_BACK = "reading the mount table from mountinfo:"


def _daemon_sees(tmp_path: Path, wrapper: Sequence[str]) -> tuple[str, list[str]]:
    """Start the daemon, mount a target, wait for the daemon to see it in its table. (Not for
    the reap: that also depends on kubelet-named processes anywhere on this shared machine.)"""
    auto = {MOUNT_API_ENV: "auto"}  # whatever the suite runs under: this is about the probe
    with DaemonRun(tmp_path, config=OWN_RULE, env=auto, wrapper=wrapper) as d:
        d.start()
        d.wait_notify("READY=1")
        d.mount("cgroup2", OWN_TARGET)
        d.wait_log(f"kapitest target {OWN_TARGET} (cgroup2) appeared")
        d.collect(0.3)  # the STATUS= of the pass that followed
        assert d.stop() == 0
        return d.log(), [text for _, text in d.messages if text.startswith("STATUS=")]


@needs_kernel_api
@pytest.mark.parametrize("refusal", [errno.EPERM, errno.ENOSYS])
def test_a_daemon_refused_the_calls_says_so_once_and_still_reads_the_table(
    tmp_path: Path, refusal: int
) -> None:
    wrapper = refusing("listmount", refusal)
    log, statuses = _daemon_sees(tmp_path, wrapper)
    assert log.count(FELL_BACK) == 1, log  # one DEGRADED entry, not one per read
    assert "mount table via mountinfo" in log
    assert statuses and all("mount table: mountinfo" in s for s in statuses), statuses


@needs_kernel_api
def test_an_unfiltered_daemon_reads_through_the_kernel_api(tmp_path: Path) -> None:
    log, statuses = _daemon_sees(tmp_path, ())
    assert FELL_BACK not in log and "mount table via listmount" in log, log
    assert statuses and all("mount table: listmount" in s for s in statuses), statuses
