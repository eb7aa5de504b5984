"""Which mounts are targets: rules, component-wise prefixes and the hard deny-list.

A rule says "mounts of these filesystem types at or below this path belong to these owners".
Matching is on path components, so ``/run/calico`` covers ``/run/calico/cgroup`` but never
``/run/calico2``. ``/var/run`` is the same directory as ``/run`` on every distro that matters,
so both spellings are folded to ``/run`` before anything is compared.

The deny-list is checked last, on the final normalized path, and no rule can override it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from calico_mount_reaper.mountinfo import Mount, escape

# Paths that must never be unmounted, whatever a rule says.
DENIED_EXACT = frozenset({"/", "/run", "/var/run"})
# Whole subtrees that must never be unmounted: API filesystems and the host's cgroup hierarchy.
DENIED_TREES = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Rule:
    """A target rule. ``prefix`` is normalized; ``detach_on_busy`` allows MNT_DETACH on EBUSY."""

    name: str
    prefix: str
    fstypes: frozenset[str]
    owners: tuple[str, ...]
    detach_on_busy: bool = True


BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("calico", "/run/calico", frozenset({"cgroup2", "bpf"}), ("calico-node", "calico-felix")),
    Rule("cilium", "/run/cilium/cgroupv2", frozenset({"cgroup2"}), ("cilium-agent",)),
)


def normalize_path(path: str) -> str:
    """Collapse ``//`` and ``/./``, drop a trailing slash and fold ``/var/run`` into ``/run``.

    ``..`` is resolved lexically; mountinfo never contains it, and config paths with it are
    refused by the config loader before they get here.
    """
    norm = posixpath.normpath(path)
    if norm.startswith("//"):  # POSIX keeps a leading double slash; Linux does not care.
        norm = "/" + norm.lstrip("/")
    if norm == "/var/run" or norm.startswith("/var/run/"):
        norm = "/run" + norm[len("/var/run") :]
    return norm


def is_within(path: str, prefix: str) -> bool:
    """True if ``path`` equals ``prefix`` or lies below it, compared component by component."""
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def is_denied(path: str) -> bool:
    """True if ``path`` is on the hard deny-list (already normalized or not)."""
    norm = normalize_path(path)
    return norm in DENIED_EXACT or any(is_within(norm, tree) for tree in DENIED_TREES)


def search_needles(rules: Iterable[Rule]) -> frozenset[str]:
    """Text that every mountinfo line of a target, or of a mount inside one, must contain.

    A target's mount point lies at or below a rule's prefix, and so does every mount stacked
    on or nested in it, so its line holds the escaped prefix. The ``/var/run`` spelling of a
    ``/run`` prefix holds it too, so one needle per prefix covers both: each needle is one
    C-speed sweep over the table (0.5 ms per 10k mounts). Lines without any needle can be
    skipped unparsed (`mountinfo.parse_under`); a line that holds one elsewhere, in its root
    or source, is parsed and then filtered out exactly by the caller.
    """
    return frozenset(escape(rule.prefix) for rule in rules)


def rule_for(mount: Mount, rules: Iterable[Rule]) -> Rule | None:
    """The first rule that makes ``mount`` a target, or None.

    The deny-list is checked last, on the final path, so it wins over every rule.
    """
    path = None  # normalized only for a mount of a rule's type: most mounts are not
    for rule in rules:
        if mount.fstype in rule.fstypes:
            if path is None:
                path = normalize_path(mount.mount_point)
            if is_within(path, rule.prefix):
                return None if is_denied(path) else rule
    return None
