"""Target rules: component-wise prefixes, /var/run folding, the deny-list and fstypes."""

from __future__ import annotations

import posixpath
from pathlib import PurePosixPath

import pytest
from calico_mount_reaper.mountinfo import Mount
from calico_mount_reaper.targets import (
    BUILTIN_RULES,
    Rule,
    is_denied,
    is_within,
    normalize_path,
    rule_for,
)
from hypothesis import given
from hypothesis import strategies as st

from tests.support.strategies import FSTYPES, PATH_POOL, mount_paths

CALICO, CILIUM = BUILTIN_RULES
# A rule that would take everything: only the deny-list stands between it and the host.
GREEDY = Rule("greedy", "/", frozenset(FSTYPES), ("nobody",))


def at(path: str, fstype: str = "cgroup2") -> Mount:
    return Mount(7, 1, "0:27", "/", path, "rw", (), fstype, "none", "rw")


def test_builtin_rules() -> None:
    assert (CALICO.prefix, CALICO.fstypes, CALICO.owners) == (
        "/run/calico",
        frozenset({"cgroup2", "bpf"}),
        ("calico-node", "calico-felix"),
    )
    assert (CILIUM.prefix, CILIUM.fstypes, CILIUM.owners) == (
        "/run/cilium/cgroupv2",
        frozenset({"cgroup2"}),
        ("cilium-agent",),
    )
    assert CALICO.detach_on_busy and CILIUM.detach_on_busy


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/run/calico", CALICO),
        ("/run/calico/cgroup", CALICO),
        ("/run/calico/cgroup/deep/er", CALICO),
        ("/var/run/calico/cgroup", CALICO),
        ("/var/run/calico/bpffs", CALICO),
        ("/run/calico/cgroup/", CALICO),
        ("//run//calico/./cgroup", CALICO),
        ("/run/cilium/cgroupv2", CILIUM),
        ("/var/run/cilium/cgroupv2/x", CILIUM),
        ("/run/calico2", None),
        ("/run/calicox", None),
        ("/run/calico2/cgroup", None),
        ("/run/calico-custom/cgroup", None),
        ("/var/run/calicox", None),
        ("/run/cilium", None),
        ("/run/cilium/cgroupv2x", None),
        ("/calico", None),
        ("/var/calico", None),
        ("/sys/fs/cgroup", None),
        ("/mnt/run/calico", None),
    ],
)
def test_component_wise_prefix(path: str, rule: Rule | None) -> None:
    assert rule_for(at(path), BUILTIN_RULES) == rule


@pytest.mark.parametrize(
    ("path", "fstype", "rule"),
    [
        ("/run/calico/cgroup", "cgroup2", CALICO),
        ("/run/calico/bpffs", "bpf", CALICO),
        ("/run/calico/data", "tmpfs", None),
        ("/run/calico", "tmpfs", None),
        ("/run/calico/cgroup", "cgroup", None),  # cgroup v1 is not what Calico mounts
        ("/run/cilium/cgroupv2", "bpf", None),
        ("/run/cilium/cgroupv2", "cgroup2", CILIUM),
    ],
)
def test_fstype_filter(path: str, fstype: str, rule: Rule | None) -> None:
    assert rule_for(at(path, fstype), BUILTIN_RULES) == rule


@pytest.mark.parametrize(
    ("path", "norm"),
    [
        ("/var/run", "/run"),
        ("/var/run/", "/run"),
        ("/var/run/calico", "/run/calico"),
        ("/var/runner", "/var/runner"),
        ("//run/calico", "/run/calico"),
        ("///run/calico", "/run/calico"),
        ("/run/./calico/", "/run/calico"),
        ("/run/calico/../cilium", "/run/cilium"),
        ("/", "/"),
    ],
)
def test_normalize_path(path: str, norm: str) -> None:
    assert normalize_path(path) == norm


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "//",
        "/proc",
        "/proc/1/ns",
        "/proc/sys/fs/binfmt_misc",
        "/sys",
        "/sys/kernel/debug",
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/",
        "/sys/fs/cgroup/kubepods.slice/x",
        "/sys/fs/bpf",
        "/dev",
        "/dev/shm",
        "/dev/pts",
        "/dev/mqueue",
        "/run",
        "/run/",
        "/var/run",
        "/var/run/",
        "/run/calico/../..",
        "/run/calico/../../sys/fs/cgroup",
    ],
)
def test_deny_list_wins_over_every_rule(path: str) -> None:
    assert is_denied(path)
    for fstype in FSTYPES:
        assert rule_for(at(path, fstype), [GREEDY, *BUILTIN_RULES]) is None


@pytest.mark.parametrize(
    "path",
    [
        "/run/calico",
        "/run/user/0",
        "/var/run/calico",
        "/procx",
        "/system",
        "/devices",
        "/var",
        "/var/lib/kubelet",
        "/runner",
        "/home/sys",
    ],
)
def test_not_denied(path: str) -> None:
    assert not is_denied(path)


def test_a_later_rule_still_matches_when_an_earlier_one_is_denied_for_the_path() -> None:
    # The deny-list decides on the path alone: if the path is denied, no rule gets it, and if it
    # is not, the first matching rule in config order gets it.
    tmpfs_rule = Rule("tmp", "/run/calico", frozenset({"tmpfs"}), ("x",))
    assert rule_for(at("/run/calico/data", "tmpfs"), [*BUILTIN_RULES, tmpfs_rule]) == tmpfs_rule
    assert rule_for(at("/run/calico/cgroup"), [GREEDY, CALICO]) == GREEDY


def test_is_within_root_prefix() -> None:
    assert is_within("/anything", "/")
    assert is_within("/run/calico", "/run/calico")
    assert not is_within("/run/calico2", "/run/calico")


def _oracle_norm(path: str) -> PurePosixPath:
    """An independent spelling of the normalization: lexical, with /var/run folded."""
    parts = list(PurePosixPath(posixpath.normpath("/" + path.lstrip("/"))).parts)
    if parts[1:3] == ["var", "run"]:
        parts[1:3] = ["run"]
    return PurePosixPath(*parts)


_ORACLE_DENIED_TREES = [PurePosixPath(p) for p in ("/proc", "/sys", "/dev")]


def _oracle_denied(path: str) -> bool:
    p = _oracle_norm(path)
    return str(p) in ("/", "/run") or any(p == t or t in p.parents for t in _ORACLE_DENIED_TREES)


rule_lists = st.lists(
    st.builds(
        Rule,
        name=st.just("r"),
        prefix=st.sampled_from(PATH_POOL).map(normalize_path),
        fstypes=st.frozensets(st.sampled_from(FSTYPES), min_size=1),
        owners=st.just(("x",)),
    ),
    max_size=4,
).map(lambda extra: [*BUILTIN_RULES, *extra])


@given(mount_paths, st.sampled_from(FSTYPES), rule_lists)
def test_rule_for_never_returns_a_rule_for_a_denied_path_or_outside_its_prefix(
    path: str, fstype: str, rules: list[Rule]
) -> None:
    rule = rule_for(at(path, fstype), rules)
    assert is_denied(path) == _oracle_denied(path)
    if rule is None:
        return
    assert not _oracle_denied(path)
    assert fstype in rule.fstypes
    norm, prefix = _oracle_norm(path), PurePosixPath(rule.prefix)
    assert norm == prefix or prefix in norm.parents
    # Component-wise: the next character after the prefix text is a separator or the end.
    rest = str(norm)[len(rule.prefix) :]
    assert rule.prefix == "/" or rest == "" or rest.startswith("/")
