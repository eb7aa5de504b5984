"""The planner: sites, verdicts, modes, and the safety properties over generated mount tables.

The property tests are the proof asked for in issue 7 item 2. They check the plan against
oracles written here independently of targets.py and plan.py (paths compared as
``PurePosixPath`` components, ancestry walked along ``parent_id``). Run them at scale with
``HYPOTHESIS_PROFILE=deep`` (100_000 tables per property; see tests/support/strategies.py).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import replace
from pathlib import PurePosixPath

import pytest
from calico_mount_reaper.config import Config
from calico_mount_reaper.model import KubeletSource, KubeletState, Liveness
from calico_mount_reaper.mountinfo import Mount, parse, parse_under
from calico_mount_reaper.plan import Mode, Plan, Verdict, find_sites, plan
from calico_mount_reaper.targets import BUILTIN_RULES, Rule, search_needles
from hypothesis import given
from hypothesis import strategies as st

from tests.support.strategies import (
    configs,
    corrupt_tables,
    kernel_tables,
    livenesses,
    modes,
    render,
)

CALICO, CILIUM = BUILTIN_RULES
KUBELET_ACTIVE = KubeletState(
    active=True, source=KubeletSource.DBUS, detail="kubelet.service is active"
)
KUBELET_STOPPED = KubeletState(
    active=False, source=KubeletSource.DBUS, detail="kubelet.service is inactive"
)
NOBODY = Liveness(kubelet=KUBELET_STOPPED)


def table(*rows: tuple[int, int, str, str]) -> tuple[Mount, ...]:
    """Mounts from (id, parent, mount point, fstype) rows; row order is age, oldest first."""
    return tuple(
        Mount(mid, parent, "0:1", "/", point, "rw", (), fstype, "none", "rw", index=i)
        for i, (mid, parent, point, fstype) in enumerate(rows)
    )


BASE = (
    (20, 1, "/", "ext4"),
    (21, 20, "/run", "tmpfs"),
    (22, 20, "/sys", "sysfs"),
    (23, 22, "/sys/fs/cgroup", "cgroup2"),
    (24, 20, "/proc", "proc"),
)


def ids(mounts: Sequence[Mount]) -> list[int]:
    return [m.mount_id for m in mounts]


def action_ids(p: Plan) -> list[int]:
    return [a.mount.mount_id for a in p.actions]


# --- sites -------------------------------------------------------------------------------------


def test_stack_at_one_path_is_one_site_top_first() -> None:
    mounts = table(
        *BASE,
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 30, "/run/calico/cgroup", "tmpfs"),
        (32, 31, "/run/calico/cgroup", "cgroup2"),
    )
    [site] = find_sites(mounts, BUILTIN_RULES)
    assert site.mount_point == "/run/calico/cgroup" and site.rule == CALICO
    assert ids(site.roots) == [30]
    assert ids(site.members) == [32, 31, 30]
    assert action_ids(plan(mounts, NOBODY, Mode.NORMAL, Config())) == [32, 31, 30]


def test_nested_mounts_go_children_first_newest_first() -> None:
    mounts = table(
        *BASE,
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 30, "/run/calico/cgroup/a", "tmpfs"),
        (32, 31, "/run/calico/cgroup/a/b", "tmpfs"),
        (33, 30, "/run/calico/cgroup/c", "tmpfs"),
    )
    [site] = find_sites(mounts, BUILTIN_RULES)
    assert ids(site.members) == [33, 32, 31, 30]


def test_target_inside_a_target_belongs_to_the_outer_site() -> None:
    mounts = table(
        *BASE,
        (30, 21, "/run/calico", "cgroup2"),
        (31, 30, "/run/calico/bpffs", "bpf"),
        (32, 31, "/run/calico/bpffs/x", "cgroup2"),
    )
    [site] = find_sites(mounts, BUILTIN_RULES)
    assert ids(site.roots) == [30]
    assert ids(site.members) == [32, 31, 30]


DECOYS = (
    (40, 21, "/run/calico2", "cgroup2"),
    (41, 21, "/run/calicox", "cgroup2"),
    (42, 20, "/mnt/cgroup", "cgroup2"),
    (43, 21, "/run/cilium/cgroupv2x", "cgroup2"),
    (44, 21, "/run/calico/data", "tmpfs"),
    (45, 21, "/run/calico2/cgroup", "bpf"),
    (46, 23, "/sys/fs/cgroup/kubepods", "cgroup2"),
)


def test_decoys_are_never_selected() -> None:
    mounts = table(*BASE, *DECOYS)
    assert find_sites(mounts, BUILTIN_RULES) == []
    for mode in Mode:
        assert plan(mounts, NOBODY, mode, Config()).actions == ()


def test_targets_among_decoys() -> None:
    mounts = table(
        *BASE,
        *DECOYS,
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 21, "/var/run/calico/bpffs", "bpf"),
        (32, 21, "/run/cilium/cgroupv2", "cgroup2"),
    )
    p = plan(mounts, NOBODY, Mode.NORMAL, Config())
    assert sorted(action_ids(p)) == [30, 31, 32]
    assert {a.site.rule.name for a in p.actions} == {"calico", "cilium"}
    # Newest site first.
    assert action_ids(p) == [32, 31, 30]


def test_shadowing_tmpfs_is_not_a_member() -> None:
    # A tmpfs mounted over /run/calico after the target hides it; it is not ours to remove.
    mounts = table(
        *BASE,
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 21, "/run/calico", "tmpfs"),
    )
    [site] = find_sites(mounts, BUILTIN_RULES)
    assert ids(site.members) == [30]
    assert action_ids(plan(mounts, NOBODY, Mode.SHUTDOWN, Config())) == [30]


def test_two_uncovered_targets_at_one_path_newest_first() -> None:
    # The same path reached twice: once under the shadowing tmpfs (31) and once beside it (30).
    mounts = table(
        *BASE,
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 21, "/run/calico", "tmpfs"),
        (32, 31, "/run/calico/cgroup", "cgroup2"),
        (33, 32, "/run/calico/cgroup/x", "tmpfs"),
    )
    [site] = find_sites(mounts, BUILTIN_RULES)
    assert ids(site.roots) == [30, 32]
    assert ids(site.members) == [33, 32, 30]


# --- verdicts and modes -----------------------------------------------------------------------

STACK = table(
    *BASE, (30, 21, "/run/calico/cgroup", "cgroup2"), (31, 30, "/run/calico/cgroup", "tmpfs")
)


def test_in_use_names_owner_pids() -> None:
    owners = {"calico-node": (4242,), "calico-felix": (17, 99)}
    live = Liveness(owners=owners, kubelet=KUBELET_ACTIVE)
    [a] = plan(STACK, live, Mode.NORMAL, Config()).assessments
    assert a.verdict is Verdict.IN_USE
    assert set(a.owners) == {(4242, "calico-node"), (17, "calico-felix"), (99, "calico-felix")}
    for text in ("calico-node (pid 4242)", "calico-felix (pid 17)", "calico-felix (pid 99)"):
        assert text in a.reason


def test_owner_of_another_rule_does_not_make_it_in_use() -> None:
    live = Liveness(owners={"cilium-agent": (5,)}, kubelet=KUBELET_STOPPED)
    [a] = plan(STACK, live, Mode.NORMAL, Config()).assessments
    assert a.verdict is Verdict.ORPHANED and a.reap


def test_held_when_kubelet_active() -> None:
    [a] = plan(STACK, Liveness(kubelet=KUBELET_ACTIVE), Mode.NORMAL, Config()).assessments
    assert a.verdict is Verdict.HELD
    assert "kubelet" in a.reason and "active" in a.reason


def test_orphaned() -> None:
    [a] = plan(STACK, NOBODY, Mode.NORMAL, Config()).assessments
    assert a.verdict is Verdict.ORPHANED and a.reap and a.owners == ()
    assert "calico-node/calico-felix" in a.reason


@pytest.mark.parametrize(
    ("mode", "orphaned", "held", "in_use"),
    [
        (Mode.NORMAL, True, False, False),
        (Mode.DECOMMISSION, True, True, False),
        (Mode.FORCE, True, True, True),
        (Mode.SHUTDOWN, True, True, True),
    ],
)
def test_what_each_mode_allows(mode: Mode, orphaned: bool, held: bool, in_use: bool) -> None:
    for allowed, live in (
        (orphaned, NOBODY),
        (held, Liveness(kubelet=KUBELET_ACTIVE)),
        (in_use, Liveness(owners={"calico-node": (7,)}, kubelet=KUBELET_STOPPED)),
    ):
        p = plan(STACK, live, mode, Config())
        [a] = p.assessments
        assert a.reap is allowed
        assert action_ids(p) == ([31, 30] if allowed else [])
        if allowed and a.verdict is not Verdict.ORPHANED:
            assert mode.value in a.reason  # "reaped anyway (force)"


def test_detach_allowed_only_for_cgroup2_and_bpf_with_the_rule_allowing_it() -> None:
    no_detach = Rule("custom", "/srv/cg", frozenset({"cgroup2", "tmpfs"}), ("x",), False)
    config = replace(Config(), rules=(*BUILTIN_RULES, no_detach))
    mounts = table(
        *BASE,
        (29, 20, "/srv", "ext4"),
        (30, 21, "/run/calico/cgroup", "cgroup2"),
        (31, 30, "/run/calico/cgroup", "tmpfs"),
        (32, 31, "/run/calico/cgroup", "cgroup2"),
        (33, 21, "/run/calico/bpffs", "bpf"),
        (34, 29, "/srv/cg", "cgroup2"),
    )
    actions = plan(mounts, NOBODY, Mode.NORMAL, config).actions
    detach = {a.mount.mount_id: a.detach_allowed for a in actions}
    assert detach == {30: True, 31: False, 32: True, 33: True, 34: False}


# --- properties over generated tables ---------------------------------------------------------


def _norm(path: str) -> PurePosixPath:
    parts = list(PurePosixPath(posixpath.normpath("/" + path.lstrip("/"))).parts)
    if parts[1:3] == ["var", "run"]:
        parts[1:3] = ["run"]
    return PurePosixPath(*parts)


def _under(path: PurePosixPath, top: str) -> bool:
    t = PurePosixPath(top)
    return path == t or t in path.parents


def oracle_denied(point: str) -> bool:
    p = _norm(point)
    return str(p) in ("/", "/run") or any(_under(p, t) for t in ("/proc", "/sys", "/dev"))


def oracle_target(m: Mount, rules: Sequence[Rule]) -> bool:
    p = _norm(m.mount_point)
    return not oracle_denied(m.mount_point) and any(
        m.fstype in r.fstypes and _under(p, r.prefix) for r in rules
    )


def ancestors(m: Mount, by_id: dict[int, Mount]) -> list[Mount]:
    """Walk parent_id links up; stops at the table's edge or when a loop comes round."""
    out, seen = [], {m.mount_id}
    parent = by_id.get(m.parent_id)
    while parent is not None and parent.mount_id not in seen:
        out.append(parent)
        seen.add(parent.mount_id)
        parent = by_id.get(parent.parent_id)
    return out


any_table = st.one_of(kernel_tables(), corrupt_tables())


@given(any_table, livenesses(), modes, configs())
def test_a_actions_only_touch_targets_and_their_descendants(
    mounts: tuple[Mount, ...], live: Liveness, mode: Mode, config: Config
) -> None:
    by_id = {m.mount_id: m for m in mounts}
    p = plan(mounts, live, mode, config)
    for a in p.actions:
        m = a.mount
        assert not oracle_denied(m.mount_point), f"denied path planned: {m.mount_point!r}"
        assert oracle_target(m, config.rules) or any(
            oracle_target(up, config.rules) for up in ancestors(m, by_id)
        ), f"mount {m.mount_id} at {m.mount_point!r} is neither a target nor inside one"
        assert m in a.site.members
        assert all(oracle_target(root, config.rules) for root in a.site.roots)
        assert m is by_id[m.mount_id]  # planned from the table, never invented


@given(kernel_tables(), livenesses(), modes, configs())
def test_b_children_before_parents_and_top_before_bottom(
    mounts: tuple[Mount, ...], live: Liveness, mode: Mode, config: Config
) -> None:
    by_id = {m.mount_id: m for m in mounts}
    order = action_ids(plan(mounts, live, mode, config))
    assert len(order) == len(set(order)), "a mount is planned twice"
    position = {mid: i for i, mid in enumerate(order)}
    for mid, i in position.items():
        for up in ancestors(by_id[mid], by_id):
            assert position.get(up.mount_id, len(order)) > i, (
                f"mount {up.mount_id} is planned before its descendant {mid}"
            )


@given(kernel_tables(), livenesses(), modes, configs())
def test_b_plan_is_complete_for_what_it_reaps(
    mounts: tuple[Mount, ...], live: Liveness, mode: Mode, config: Config
) -> None:
    """A reaped site loses every mount inside it that is not denied: the path is left bare."""
    by_id = {m.mount_id: m for m in mounts}
    p = plan(mounts, live, mode, config)
    planned = set(action_ids(p))
    reaped_roots = {r.mount_id for a in p.assessments if a.reap for r in a.site.roots}
    for m in mounts:
        if oracle_denied(m.mount_point):
            continue
        chain = [m, *ancestors(m, by_id)]
        if any(c.mount_id in reaped_roots for c in chain):
            assert m.mount_id in planned
    # Every target lies in exactly one site.
    members = [mid for a in p.assessments for mid in a.site.mount_ids]
    assert len(members) == len(set(members))
    assert {m.mount_id for m in mounts if oracle_target(m, config.rules)} <= set(members)


@given(any_table, livenesses(), modes, configs())
def test_c_actions_only_for_reaped_assessments_and_modes_honoured(
    mounts: tuple[Mount, ...], live: Liveness, mode: Mode, config: Config
) -> None:
    p = plan(mounts, live, mode, config)
    for a in p.assessments:
        owners_alive = any(live.owners.get(name) for name in a.site.rule.owners)
        expected = (
            Verdict.IN_USE
            if owners_alive
            # An unknown kubelet state (None) holds, like an active one: not knowing is not
            # "inactive".
            else Verdict.HELD
            if live.kubelet.active is not False
            else Verdict.ORPHANED
        )
        assert a.verdict is expected
        if a.verdict is Verdict.IN_USE and mode in (Mode.NORMAL, Mode.DECOMMISSION):
            assert not a.reap
        if a.verdict is Verdict.HELD and mode is Mode.NORMAL:
            assert not a.reap
        if mode in (Mode.FORCE, Mode.SHUTDOWN) or a.verdict is Verdict.ORPHANED:
            assert a.reap
    reaped_sites = {a.site for a in p.assessments if a.reap}
    for action in p.actions:
        assert action.site in reaped_sites
        assert action.detach_allowed == (
            action.site.rule.detach_on_busy and action.mount.fstype in ("cgroup2", "bpf")
        )


@given(any_table, livenesses(), modes, configs())
def test_d_plan_is_deterministic(
    mounts: tuple[Mount, ...], live: Liveness, mode: Mode, config: Config
) -> None:
    first = plan(mounts, live, mode, config)
    again = plan(tuple(replace(m) for m in mounts), live, mode, config)
    assert first == again
    assert action_ids(first) == action_ids(again)


@given(kernel_tables(), configs(), st.lists(st.sampled_from(["garbage", "1 2 x"]), max_size=3))
def test_sites_from_the_prefiltered_parse_equal_sites_from_the_full_parse(
    mounts: tuple[Mount, ...], config: Config, junk: list[str]
) -> None:
    """The fast read (only lines holding a rule's prefix are parsed) loses nothing a site needs.

    Sites, members, order and indexes must be identical to planning over every line.
    """
    text = render(mounts) + "".join(line + "\n" for line in junk)
    full = parse(text)
    fast = parse_under(text, search_needles(config.rules))
    assert find_sites(fast.mounts, config.rules) == find_sites(full.mounts, config.rules)
    assert set(fast.mounts) <= set(full.mounts)
