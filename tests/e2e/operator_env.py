"""The node an operator starts from, per Debian release: what README.md's install steps need.

Kept apart from the default rootfs, whose package set the other scenarios depend on: lintian,
the compiler and the -dev packages make this one about three times the size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import harness
from tests.e2e.conftest import unavailable

SUITES = {
    "bookworm": "Debian 12, systemd 252, Python 3.11",
    "trixie": "Debian 13, systemd 257, Python 3.13",
}
# The reaper's own dependencies come from Debian (as apt would pull them); lintian checks the
# package the way each release's lintian sees it; the rest is README's list for `pip install` of
# pystemd from source in a venv: build-essential, pkg-config, libsystemd-dev, python3-dev.
OPERATOR_PACKAGES = (
    *harness.PACKAGES,
    "lintian",
    "python3-venv",
    "python3-dev",
    "libsystemd-dev",
    "pkg-config",
    "build-essential",
)


def lower_for(suite: str, rootfs: dict[str, Path], tmp: pytest.TempPathFactory) -> Path:
    """The operator rootfs of ``suite`` as a lower layer, restored on first use into ``rootfs``
    (conftest's session-wide `operator_rootfs`, so every module boots the same copy)."""
    if suite not in rootfs:
        try:
            tarball = harness.ensure_rootfs_tarball(suite=suite, packages=OPERATOR_PACKAGES)
        except harness.Unavailable as exc:
            unavailable(str(exc))
        lower = harness.lower_dir(
            fallback=tmp.mktemp(f"rootfs-{suite}"), suite=suite, variant="operator"
        )
        rootfs[suite] = harness.restore_rootfs(tarball, lower)
    return rootfs[suite]
