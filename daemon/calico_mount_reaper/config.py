"""The TOML config: defaults, validation and where it is looked for.

Every mistake is reported with the file, the key and what was expected, and a config that
fails validation is never half-applied: the caller gets either a whole Config or a ConfigError.

Example (every key optional)::

    grace_period = 10          # seconds a target must stay orphaned before it is reaped
    rescan_interval = 60       # seconds between safety-net re-reads of the mount table
    reap_on_stop = "shutdown"  # "shutdown", "always" or "never"
    builtin_targets = true     # keep the built-in Calico and Cilium rules
    busy_retries = 4           # EBUSY retries before detaching or giving up
    busy_backoff = 0.05        # first retry delay in seconds; doubles each time
    remove_mount_point = true  # rmdir the emptied mount-point directory on a normal filesystem
    kubelet_unit = "kubelet.service"
    metrics_path = ""          # node_exporter textfile, e.g. /var/lib/node_exporter/reaper.prom
    mount_api = "auto"         # "mountinfo" forces the fallback (see mounttable.py)

    [[target]]
    name = "calico-custom"     # CALICO_CGROUP_PATH moved elsewhere; names are unique
    prefix = "/var/run/calico-custom"
    fstypes = ["cgroup2"]      # any of cgroup2, cgroup, bpf (FSTYPES)
    owners = ["calico-node"]
    detach_on_busy = true
"""

from __future__ import annotations

import math
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from calico_mount_reaper.targets import BUILTIN_RULES, Rule, is_denied, normalize_path

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PATH = "/etc/calico-mount-reaper/config.toml"
ENV_VAR = "CALICO_MOUNT_REAPER_CONFIG"
REAP_ON_STOP_CHOICES = ("shutdown", "always", "never")
# How the mount table is read: "auto" probes for listmount/statmount (Linux 6.8+), "mountinfo"
# forces the fallback and the old 32-bit identity path. The environment variable wins over the
# file: it is the per-process override (a test, a one-off run, a unit drop-in's Environment=).
MOUNT_API_ENV = "CALICO_MOUNT_REAPER_MOUNT_API"
MOUNT_API_CHOICES = ("auto", "mountinfo")
# The filesystems Calico and Cilium leave behind. A target of any other type (ext4, tmpfs...)
# would make the reaper unmount a node's real storage on a typo, so none is accepted.
FSTYPES = ("cgroup2", "cgroup", "bpf")


class ConfigError(Exception):
    """A config that cannot be used. The message names the file and the key."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        where = f"{source}: key '{key}'" if key else source
        super().__init__(f"{where}: {problem}")
        self.source, self.key, self.problem = source, key, problem


@dataclass(frozen=True)
class Config:
    rules: tuple[Rule, ...] = BUILTIN_RULES
    grace_period: float = 10.0
    rescan_interval: float = 60.0
    reap_on_stop: str = "shutdown"
    busy_retries: int = 4
    busy_backoff: float = 0.05
    remove_mount_point: bool = True
    kubelet_unit: str = "kubelet.service"
    metrics_path: str = ""
    mount_api: str = "auto"
    source: str = field(default="(built-in defaults)", compare=False)

    @property
    def owner_names(self) -> frozenset[str]:
        return frozenset(name for rule in self.rules for name in rule.owners)


def _number(minimum: float) -> Callable[[str, str, Any], float]:
    def check(source: str, key: str, value: Any) -> float:
        # TOML has nan and inf; neither is a usable duration (nan even compares as "not below").
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < minimum
        ):
            expected = f"expected a finite number >= {minimum:g}"
            raise ConfigError(source, key, f"{expected}, got {value!r}")
        return float(value)

    return check


def _integer(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(source, key, f"expected a whole number >= 0, got {value!r}")
    return int(value)  # an int already: int() tells mypy so (value is Any)


def _boolean(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(source, key, f"expected true or false, got {value!r}")
    return value


def _string(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(source, key, f"expected a string, got {value!r}")
    return value


def _reap_on_stop(source: str, key: str, value: Any) -> str:
    if value not in REAP_ON_STOP_CHOICES:
        choices = ", ".join(f'"{c}"' for c in REAP_ON_STOP_CHOICES)
        raise ConfigError(source, key, f"expected one of {choices}, got {value!r}")
    return str(value)


def _mount_api(source: str, key: str, value: Any) -> str:
    if value not in MOUNT_API_CHOICES:
        choices = ", ".join(f'"{c}"' for c in MOUNT_API_CHOICES)
        raise ConfigError(source, key, f"expected one of {choices}, got {value!r}")
    return str(value)


def _metrics_path(source: str, key: str, value: Any) -> str:
    path = _string(source, key, value)
    if path and not os.path.isabs(path):
        raise ConfigError(source, key, f'expected an absolute path or "", got {path!r}')
    return path


_SCALARS: dict[str, Callable[[str, str, Any], Any]] = {
    "grace_period": _number(0),
    "rescan_interval": _number(1),
    "reap_on_stop": _reap_on_stop,
    "busy_retries": _integer,
    "busy_backoff": _number(0),
    "remove_mount_point": _boolean,
    "kubelet_unit": _string,
    "metrics_path": _metrics_path,
    "mount_api": _mount_api,
}
_TOP_KEYS = {*_SCALARS, "builtin_targets", "target"}
_RULE_KEYS = {"name", "prefix", "fstypes", "owners", "detach_on_busy"}


def _string_list(source: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(source, key, f"expected a non-empty list of strings, got {value!r}")
    return tuple(value)


def _parse_rule(source: str, index: int, table: Any) -> Rule:
    where = f"target[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(source, where, "expected a table ([[target]])")
    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        allowed = ", ".join(sorted(_RULE_KEYS))
        raise ConfigError(source, f"{where}.{unknown[0]}", f"unknown key (allowed: {allowed})")
    for required in ("name", "prefix", "fstypes", "owners"):
        if required not in table:
            raise ConfigError(source, f"{where}.{required}", "missing; every target needs it")
    name = _string(source, f"{where}.name", table["name"])
    prefix = _string(source, f"{where}.prefix", table["prefix"])
    if not prefix.startswith("/") or "/../" in prefix + "/" or "\0" in prefix:
        raise ConfigError(source, f"{where}.prefix", f"expected an absolute path, got {prefix!r}")
    norm = normalize_path(prefix)
    if is_denied(norm):
        raise ConfigError(
            source, f"{where}.prefix", f"{prefix!r} is on the hard deny-list and is never reaped"
        )
    fstypes = _string_list(source, f"{where}.fstypes", table["fstypes"])
    others = [t for t in fstypes if t not in FSTYPES]
    if others:
        raise ConfigError(
            source,
            f"{where}.fstypes",
            f"{others[0]!r} is not reaped: expected only {', '.join(FSTYPES)} "
            "(the filesystems Calico and Cilium leave behind)",
        )
    return Rule(
        name=name,
        prefix=norm,
        fstypes=frozenset(fstypes),
        owners=_string_list(source, f"{where}.owners", table["owners"]),
        detach_on_busy=_boolean(
            source, f"{where}.detach_on_busy", table.get("detach_on_busy", True)
        ),
    )


def from_mapping(data: Mapping[str, Any], source: str) -> Config:
    """Validate a parsed TOML document into a Config."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        allowed = ", ".join(sorted(_TOP_KEYS))
        raise ConfigError(source, unknown[0], f"unknown key (allowed: {allowed})")
    values = {key: check(source, key, data[key]) for key, check in _SCALARS.items() if key in data}
    builtin = _boolean(source, "builtin_targets", data.get("builtin_targets", True))
    tables = data.get("target", [])
    if not isinstance(tables, list):
        raise ConfigError(source, "target", "expected an array of tables ([[target]])")
    rules = (
        *(BUILTIN_RULES if builtin else ()),
        *(_parse_rule(source, i, t) for i, t in enumerate(tables)),
    )
    if not rules:
        raise ConfigError(source, "builtin_targets", "no targets left: add a [[target]]")
    _refuse_duplicate_names(source, rules, builtin)
    return replace(Config(), rules=rules, source=source, **values)


def _refuse_duplicate_names(source: str, rules: tuple[Rule, ...], builtin: bool) -> None:
    """A name is how the journal (TARGET=) and --json tell rules apart: two alike would lie."""
    first: dict[str, int] = {}
    offset = len(BUILTIN_RULES) if builtin else 0
    for i, rule in enumerate(rules):
        if rule.name not in first:
            first[rule.name] = i
            continue
        earlier = first[rule.name]
        what = "a built-in target" if earlier < offset else f"target[{earlier - offset}]"
        hint = " (or set builtin_targets = false)" if earlier < offset else ""
        raise ConfigError(
            source,
            f"target[{i - offset}].name",
            f"{rule.name!r} is already the name of {what}; give each target its own name{hint}",
        )


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _others_may_write(st: os.stat_result) -> str | None:
    """Who besides the owner may write, or None: the group unless it is root's, and others."""
    if st.st_mode & stat.S_IWOTH:
        return "world-writable"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group {st.st_gid}"
    return None


def check_trust(path: str, st: os.stat_result) -> None:
    """Refuse a config file that someone other than root (or us) could have written.

    Like sshd's StrictModes: owned by root (or the user running us), and writable by nobody
    else, including a group other than root's (``root:nogroup 0664`` is refused).
    """
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, None, "not a regular file")
    if not _trusted_owner(st.st_uid):
        raise ConfigError(path, None, f"is owned by uid {st.st_uid}; fix with: chown root {path}")
    writers = _others_may_write(st)
    if writers is not None:
        fix = "o-w" if writers == "world-writable" else "g-w"
        raise ConfigError(
            path, None, f"is {writers}, not only root's; fix with: chmod {fix} {path}"
        )


def check_directories(path: str, real_path: str, owner: int) -> None:
    """Refuse a config whose directories someone other than root (or us) could change.

    Whoever may write a directory on the path may replace everything below it, so every
    directory from the file's up to ``/`` must be owned by root (or us) and writable by no one
    else. One exception, as for ``/tmp``: a directory with the sticky bit, when the entry in it
    on our path is owned by root (or us), because then no one else may rename or remove that
    entry. ``real_path`` is the file's path as the kernel reports it for the opened file.
    """
    child, child_owner = real_path, owner
    while child != "/":
        directory = os.path.dirname(child)
        try:
            st = os.stat(directory)
        except OSError as exc:
            why = f"cannot check directory {directory}: {exc.strerror}"
            raise ConfigError(path, None, why) from None
        if not _trusted_owner(st.st_uid):
            raise ConfigError(
                path,
                None,
                f"its directory {directory} is owned by uid {st.st_uid}, so that user could "
                f"replace the config; fix with: chown root {directory}",
            )
        writers = _others_may_write(st)
        sticky_guarded = st.st_mode & stat.S_ISVTX and _trusted_owner(child_owner)
        if writers is not None and not sticky_guarded:
            fix = "o-w" if writers == "world-writable" else "g-w"
            raise ConfigError(
                path,
                None,
                f"its directory {directory} is {writers}, so others could replace the config; "
                f"fix with: chmod {fix} {directory}",
            )
        child, child_owner = directory, st.st_uid


def load_file(path: str) -> Config:
    """Load and validate one config file. Symlinks are refused: they are an easy redirection."""
    try:
        # O_NONBLOCK: opening a planted FIFO must not hang the start or a reload; it is refused
        # below as not a regular file. Reads from a regular file ignore the flag.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(path, None, "does not exist") from None
    except OSError as exc:
        if os.path.islink(path):
            raise ConfigError(path, None, "is a symlink; point --config at the real file") from None
        raise ConfigError(path, None, f"cannot be opened: {exc.strerror}") from None
    try:
        # Checked on the fd before wrapping it: fdopen itself refuses a directory with a raw
        # IsADirectoryError instead of our message.
        st = os.fstat(fd)
        check_trust(path, st)
        check_directories(path, os.readlink(f"/proc/self/fd/{fd}"), st.st_uid)
    except ConfigError:
        os.close(fd)
        raise
    # Imported here, not at the top: most runs have no config file, and a status pass on a
    # node with nothing to decide should not pay for a TOML parser.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on older Pythons only
        import tomli as tomllib
    with os.fdopen(fd, "rb") as f:
        try:
            data = tomllib.load(f)
        # tomllib decodes the bytes itself: a non-UTF-8 file raises UnicodeDecodeError.
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(path, None, f"is not valid TOML: {exc}") from None
    return from_mapping(data, path)


def resolve_path(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """--config wins, then the env var (both must exist), then the default file if present.

    An empty --config or env var is refused rather than read as "not set": someone meant to
    name a file, and running on the defaults instead would be a silent surprise.
    """
    if explicit is not None:
        if not explicit:
            raise ConfigError("--config", None, "is empty: name a config file")
        return explicit
    if ENV_VAR in environ:
        if not environ[ENV_VAR]:
            raise ConfigError(
                f"${ENV_VAR}",
                None,
                "is set but empty: name a config file, or unset it to use "
                f"{DEFAULT_PATH} (if present) or the built-in defaults",
            )
        return environ[ENV_VAR]
    return DEFAULT_PATH if os.path.lexists(DEFAULT_PATH) else None


def load(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """The Config to run with; built-in defaults when no file is configured or installed.

    CALICO_MOUNT_REAPER_MOUNT_API, when set, replaces the file's ``mount_api``."""
    path = resolve_path(explicit, environ)
    config = Config() if path is None else load_file(path)
    if environ.get(MOUNT_API_ENV):
        value = _mount_api("environment", MOUNT_API_ENV, environ[MOUNT_API_ENV])
        config = replace(config, mount_api=value)
    return config
