"""Symlink-free directory opening and its verification, on both ways of opening (openat2 and the
component walk kernels before 5.6 need), in private mount namespaces."""

from __future__ import annotations

import os

import pytest
from calico_mount_reaper.resolve import (
    Expected,
    Method,
    Unsafe,
    components,
    open_directory,
    path_of,
    verify,
)
from calico_mount_reaper.statx import IdKind, stat_mount

from tests.support import node
from tests.support.nsutil import in_namespace

METHODS = pytest.mark.parametrize("method", [Method.OPENAT2, Method.WALK], ids=["openat2", "walk"])


def test_only_canonical_absolute_paths_are_accepted() -> None:
    assert components("/") == [] and components("/run/calico") == ["run", "calico"]
    for bad in ("run/calico", "/run/../etc", "/run/./calico", "/run//calico", "/run/calico/"):
        with pytest.raises(Unsafe):
            components(bad)


def _symlink_at_each_component(method: Method) -> list[str]:
    os.makedirs("/run/calico/a/b")
    os.makedirs("/run/decoy/a/b")
    refused = []
    for swapped in ("/run/calico", "/run/calico/a", "/run/calico/a/b"):
        os.rename(swapped, swapped + ".real")
        os.symlink("/run/decoy" + swapped[len("/run/calico") :], swapped)
        try:
            os.close(open_directory("/run/calico/a/b", method))
        except Unsafe as exc:
            refused.append(f"{swapped}: {exc.errno}")
        finally:
            os.unlink(swapped)
            os.rename(swapped + ".real", swapped)
    fd = open_directory("/run/calico/a/b", method)
    refused.append(path_of(fd))
    os.close(fd)
    return refused


@METHODS
def test_a_symlink_at_any_component_is_refused(method: Method) -> None:
    out = in_namespace(_symlink_at_each_component, method)
    assert out[:3] == [f"{p}: 40" for p in ("/run/calico", "/run/calico/a", "/run/calico/a/b")]
    assert out[3] == "/run/calico/a/b"  # and the real directory opens, once it is back


def _verify_cases(method: Method) -> dict[str, str | None]:
    node.mount_at("tmpfs", "/run/calico")
    os.makedirs("/run/calico/a")
    here = stat_mount(b"/run/calico/a", IdKind.OLD).mount_id
    unique = stat_mount(b"/run/calico/a", IdKind.UNIQUE).mount_id
    assert here is not None
    planned = Expected("/run/calico/a", here, unique)
    old_only = Expected("/run/calico/a", here)
    out: dict[str, str | None] = {}
    fd = open_directory("/run/calico/a", method)
    out["as planned"] = verify(fd, planned)
    out["as planned (old ID)"] = verify(fd, old_only)
    os.rename("/run/calico/a", "/run/calico/moved")
    out["renamed"] = verify(fd, planned)
    os.close(fd)
    node.mount_at("tmpfs", "/run/calico/a")  # a look-alike on another mount at the same path
    fd = open_directory("/run/calico/a", method)
    out["other mount"] = verify(fd, planned)
    out["other mount (old ID)"] = verify(fd, old_only)
    os.close(fd)
    return out


@METHODS
def test_verify_accepts_the_planned_directory_and_nothing_else(method: Method) -> None:
    out = in_namespace(_verify_cases, method)
    assert out["as planned"] is None and out["as planned (old ID)"] is None
    assert out["renamed"] is not None and "now at '/run/calico/moved'" in out["renamed"]
    assert out["other mount"] is not None and "not the planned mount" in out["other mount"]
    assert out["other mount (old ID)"] is not None
