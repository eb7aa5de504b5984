"""The node an operator starts from, per Debian release: what README.md's install steps need.

Kept apart from the default rootfs, whose package set the other scenarios depend on: lintian,
the compiler and the -dev packages make this one about three times the size.
"""

from __future__ import annotations

from tests.e2e import harness

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
