"""Shared hypothesis strategies: mount tables shaped like a node's, and a mountinfo renderer.

Profiles (registered here, not in conftest.py, so that they travel with the strategies):

- ``ci`` (the default): a few hundred examples per property; every test file stays well under 30 s.
- ``deep``: 100_000 examples per property, on demand, for the scale proof of issue 7 item 2::

      HYPOTHESIS_PROFILE=deep pytest -q tests/test_plan.py tests/test_mountinfo.py

Mount tables come in two shapes:

- `kernel_tables`: what the kernel can really produce. A tree whose parent links follow the
  paths (a new mount's parent is the topmost mount at the longest mounted prefix of its path),
  so mounting twice at one path stacks, and a parent is always listed before its children.
- `corrupt_tables`: parent links picked at random, including loops, self-parents and parents
  that are not in the table. The planner must stay safe on input the kernel never writes.

Paths are drawn from a pool that mixes targets (``/run/calico``, ``/var/run/calico``,
``/run/cilium/cgroupv2``), decoys that share a prefix as text (``/run/calico2``,
``/run/calicox``, ``/run/cilium/cgroupv2x``) and the hard deny-list (``/``, ``/proc``, ``/sys``,
``/sys/fs/cgroup``, ``/dev``, ``/run``), plus random children with escapable bytes.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from dataclasses import replace

from calico_mount_reaper.config import Config
from calico_mount_reaper.model import KubeletSource, KubeletState, Liveness
from calico_mount_reaper.mountinfo import Mount, escape
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.targets import BUILTIN_RULES, Rule
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TARGET_PATHS = (
    "/run/calico",
    "/run/calico/cgroup",
    "/run/calico/cgroup/kubepods",
    "/run/calico/bpffs",
    "/run/calico/data",
    "/var/run/calico",
    "/var/run/calico/cgroup",
    "/var/run/calico/bpffs",
    "/run/cilium/cgroupv2",
    "/run/cilium/cgroupv2/sub",
    "/var/run/cilium/cgroupv2",
    "/run/calico-custom/cgroup",
)
DECOY_PATHS = (
    "/run/calico2",
    "/run/calico2/cgroup",
    "/run/calicox",
    "/var/run/calicox/cgroup",
    "/run/cilium",
    "/run/cilium/cgroupv2x",
    "/run/cilium/cgroup",
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs",
    "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~empty-dir/x",
    "/mnt/cgroup2",
    "/home",
    "/var",
    "/var/lib",
    "/calico",
    "/run-calico",
)
DENIED_PATHS = (
    "/",
    "/proc",
    "/proc/sys/fs/binfmt_misc",
    "/sys",
    "/sys/fs/cgroup",
    "/sys/fs/cgroup/kubepods.slice",
    "/sys/fs/bpf",
    "/sys/kernel/debug",
    "/dev",
    "/dev/shm",
    "/dev/pts",
    "/run",
    "/var/run",
    # The kernel never writes ``..``, but a table built by hand could: the planner must still
    # see through it (``/run/calico/../..`` is ``/``).
    "/run/calico/../../sys/fs/cgroup",
    "/run/calico/..",
)
PATH_POOL = TARGET_PATHS + DECOY_PATHS + DENIED_PATHS
FSTYPES = ("cgroup2", "bpf", "tmpfs", "cgroup2", "bpf", "ext4", "proc", "sysfs", "overlay", "nsfs")
OWNER_NAMES = ("calico-node", "calico-felix", "cilium-agent", "kubelet", "bash")

# Path text with every byte the kernel escapes (space, tab, newline, backslash), octal-looking
# text that must survive unescaping, and non-ASCII. Drawn as one text (not a list of pieces)
# because draws dominate the cost of an example and the deep profile runs 100k of them.
segments = st.text("abc-_.0127 \t\n\\\u00e9\udcff", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
# A pool path, or a pool path with one random child component.
mount_paths = st.one_of(
    st.sampled_from(PATH_POOL),
    st.tuples(st.sampled_from(PATH_POOL), segments).map(lambda p: posixpath.join(*p)),
)


def _kernel_parent(mounts: Sequence[Mount], path: str) -> Mount:
    """The mount a new mount at ``path`` lands on: the newest mount at the longest prefix."""
    best = mounts[0]
    best_len = -1
    for m in mounts:
        point = m.mount_point
        inside = point == "/" or path == point or path.startswith(point + "/")
        # ``>=`` picks the newest of equal length: that is the top of a stack.
        if inside and len(point) >= best_len:
            best, best_len = m, len(point)
    return best


def _mount(mount_id: int, parent_id: int, point: str, fstype: str, index: int) -> Mount:
    return Mount(
        mount_id=mount_id,
        parent_id=parent_id,
        major_minor="0:" + str(mount_id % 97),
        root="/",
        mount_point=point,
        options="rw,relatime",
        optional_fields=(f"shared:{mount_id}",) if mount_id % 3 == 0 else (),
        fstype=fstype,
        source="none" if fstype in ("cgroup2", "bpf") else fstype,
        super_options="rw",
        index=index,
    )


@st.composite
def kernel_tables(draw: st.DrawFn, max_mounts: int = 40) -> tuple[Mount, ...]:
    """A mount table the kernel could write: a tree under ``/``, parents before children.

    Mount IDs are unique but not ordered (the kernel reuses freed IDs), so only the line
    position (``index``) tells newer from older. Drawing one path twice stacks mounts.
    """
    # (restack, pick, path, fstype) per mount: one draw for the whole table keeps it cheap.
    specs = draw(
        st.lists(
            st.tuples(
                st.integers(0, 3), st.integers(0, 1 << 16), mount_paths, st.sampled_from(FSTYPES)
            ),
            max_size=max_mounts,
        )
    )
    ids = draw(
        st.lists(
            st.integers(2, 10_000), min_size=len(specs) + 1, max_size=len(specs) + 1, unique=True
        )
    )
    # The namespace root's parent lies outside the namespace, so it is not in the table.
    mounts = [_mount(ids[0], 1, "/", "ext4", 0)]
    for i, (restack, pick, point, fstype) in enumerate(specs, start=1):
        # Re-using an earlier path makes stacks (cgroup2 / tmpfs / cgroup2 at one point) common.
        if restack == 0 and i > 1:
            point = mounts[1 + pick % (i - 1)].mount_point
        parent = _kernel_parent(mounts, point)
        mounts.append(_mount(ids[i], parent.mount_id, point, fstype, i))
    return tuple(mounts)


@st.composite
def corrupt_tables(draw: st.DrawFn, max_mounts: int = 30) -> tuple[Mount, ...]:
    """Unique IDs, but parent links at random: loops, self-parents and dangling parents."""
    specs = draw(
        st.lists(
            st.tuples(st.integers(0, 1 << 16), mount_paths, st.sampled_from(FSTYPES)),
            min_size=1,
            max_size=max_mounts,
        )
    )
    ids = draw(st.lists(st.integers(2, 200), min_size=len(specs), max_size=len(specs), unique=True))
    candidates = [*ids, 1, 9999]  # 1 and 9999: parents outside the table
    order = draw(st.permutations(range(len(specs))))
    return tuple(
        _mount(ids[k], candidates[specs[k][0] % len(candidates)], specs[k][1], specs[k][2], i)
        for i, k in enumerate(order)
    )


def kubelet_states() -> st.SearchStrategy[KubeletState]:
    return st.builds(
        KubeletState,
        active=st.sampled_from((True, False, None)),
        source=st.sampled_from(KubeletSource),
        unit_file_state=st.sampled_from(("", "enabled", "disabled", "masked")),
        load_state=st.sampled_from(("", "loaded", "not-found")),
        detail=st.just("generated"),
    )


def livenesses() -> st.SearchStrategy[Liveness]:
    owners = st.dictionaries(
        st.sampled_from(OWNER_NAMES),
        st.lists(st.integers(2, 4_000_000), min_size=1, max_size=3, unique=True).map(
            lambda pids: tuple(sorted(pids))
        ),
        max_size=3,
    )
    return st.builds(Liveness, owners=owners, kubelet=kubelet_states())


# Rules the config loader accepts, and rules it would refuse (a denied or root prefix, every
# fstype): the planner gets the latter too, because the deny-list must win even over a rule
# that slipped past validation.
_CUSTOM_RULES = (
    Rule("custom", "/run/calico-custom", frozenset({"cgroup2"}), ("calico-node",), False),
    Rule("decoy-lover", "/mnt", frozenset({"cgroup2", "tmpfs"}), ("nobody",)),
    Rule("greedy", "/", frozenset(FSTYPES), ("nobody",)),
    Rule("cgroup-hog", "/sys/fs/cgroup", frozenset({"cgroup2"}), ("nobody",)),
    Rule("run-hog", "/run", frozenset({"cgroup2", "tmpfs", "bpf"}), ("calico-node",)),
)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    extra = draw(st.lists(st.sampled_from(_CUSTOM_RULES), unique=True, max_size=3))
    builtin = draw(st.booleans()) or not extra
    return replace(Config(), rules=(*(BUILTIN_RULES if builtin else ()), *extra))


modes = st.sampled_from(list(Mode))


def render(mounts: Sequence[Mount]) -> str:
    """Write mounts as the kernel writes /proc/<pid>/mountinfo (the inverse of ``parse``)."""
    lines = []
    for m in mounts:
        fields = [
            str(m.mount_id),
            str(m.parent_id),
            m.major_minor,
            escape(m.root),
            escape(m.mount_point),
            m.options,
            *m.optional_fields,
            "-",
            m.fstype,
            escape(m.source),
            m.super_options,
        ]
        lines.append(" ".join(fields))
    return "".join(line + "\n" for line in lines)


# Any text the kernel could show for a path: everything but NUL, surrogates included because
# non-UTF-8 bytes are decoded with surrogateescape.
path_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=()))
_WORD = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_.,=:"), min_size=1, max_size=12
)
_OPTIONAL_FIELD = st.one_of(
    st.integers(1, 10_000).map(lambda n: f"shared:{n}"),
    st.integers(1, 10_000).map(lambda n: f"master:{n}"),
    st.integers(1, 10_000).map(lambda n: f"propagate_from:{n}"),
    st.just("unbindable"),
)


@st.composite
def parsed_mount_lists(draw: st.DrawFn) -> tuple[Mount, ...]:
    """Arbitrary Mount records that mountinfo can represent, in any field, with their index."""
    count = draw(st.integers(0, 20))
    mounts = []
    for i in range(count):
        mounts.append(
            Mount(
                mount_id=draw(st.integers(0, 2**31)),
                parent_id=draw(st.integers(0, 2**31)),
                major_minor=f"{draw(st.integers(0, 4095))}:{draw(st.integers(0, 2**20))}",
                root=draw(path_text),
                mount_point="/" + draw(path_text),
                options=draw(_WORD),
                optional_fields=tuple(draw(st.lists(_OPTIONAL_FIELD, max_size=4))),
                fstype=draw(_WORD),
                source=draw(path_text),
                super_options=draw(_WORD),
                index=i,
            )
        )
    return tuple(mounts)
