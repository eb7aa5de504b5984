"""Prometheus node_exporter textfile output (opt-in: a path in the config).

node_exporter's textfile collector reads every ``*.prom`` file in its directory at each scrape,
so the file must never be seen half-written: it is written to a temporary name in the same
directory (not ``*.prom``, so the collector skips it), fsynced, and renamed over the target.
rename(2) replaces whatever sits at the final path, a symlink included, without following it:
a planted link cannot redirect the write to another file. The temporary file is created with
O_EXCL|O_NOFOLLOW under a random name for the same reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from dataclasses import dataclass

PREFIX = "calico_mount_reaper_"


@dataclass
class Counters:
    """What the daemon exports; the ``*_total`` values only grow while the process lives."""

    reaps_total: int = 0
    refusals_total: int = 0
    failures_total: int = 0
    targets_mounted: int = 0
    last_pass_timestamp_seconds: float = 0.0


# (field, type, help): the order of the file.
_METRICS = (
    ("reaps_total", "counter", "Target mount points unmounted completely."),
    ("refusals_total", "counter", "Reaps refused (in use, held, shadowed, mount ID changed)."),
    ("failures_total", "counter", "Reaps that failed and left a target mounted."),
    ("targets_mounted", "gauge", "Target mount points mounted at the last pass."),
    (
        "last_pass_timestamp_seconds",
        "gauge",
        "Unix time of the last completed pass over the mount table.",
    ),
)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(counters: Counters) -> str:
    """The text exposition format: HELP and TYPE lines, then the sample, for each metric."""
    lines = []
    for field, kind, help_text in _METRICS:
        name = PREFIX + field
        lines += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} {kind}",
            f"{name} {_number(getattr(counters, field))}",
        ]
    return "\n".join(lines) + "\n"


def write_textfile(path: str | os.PathLike[str], counters: Counters) -> None:
    """Atomically replace ``path`` with the metrics. Raises OSError naming ``path`` on failure."""
    target = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(target))
    data = render(counters).encode()
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _naming(exc, target) from exc
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    created = False
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=dir_fd,
        )
        created = True
        with os.fdopen(fd, "wb") as f:
            # node_exporter usually runs as another user: readable whatever our umask is.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        created = False
        # The rename itself must survive a crash too, or the old file could come back.
        os.fsync(dir_fd)
    except OSError as exc:
        if created:
            # The error worth reporting is the one that brought us here.
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        raise _naming(exc, target) from exc
    finally:
        os.close(dir_fd)


def _naming(exc: OSError, path: str) -> OSError:
    return OSError(exc.errno, f"cannot write metrics textfile: {exc.strerror}", path)
