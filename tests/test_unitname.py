"""Unit-name escaping against systemd's own tools: systemd-escape and sd_bus_path_encode."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from calico_mount_reaper.unitname import escape_path, mount_unit, unit_object_path
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT_EXAMPLES = {
    "/run/calico/cgroup": "run-calico-cgroup",
    "/var/run/calico-custom": "var-run-calico\\x2dcustom",
    "/run//cilium/cgroupv2/": "run-cilium-cgroupv2",
    "/": "-",
    "/run/.hidden": "run-.hidden",
    "/.x": "\\x2ex",
    "/a b/ü": "a\\x20b-\\xc3\\xbc",
    "/a\\b:c_d.e": "a\\x5cb:c_d.e",
}


@pytest.mark.parametrize(("path", "escaped"), sorted(ROOT_EXAMPLES.items()))
def test_escape_path_examples(path: str, escaped: str) -> None:
    assert escape_path(path) == escaped


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape not installed")
@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
            min_size=1,
            max_size=8,
        ).filter(lambda s: s not in (".", "..")),
        min_size=1,
        max_size=4,
    )
)
def test_escape_path_agrees_with_systemd_escape(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    real = subprocess.run(
        ["systemd-escape", "--path", "--", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert escape_path(path) == real


def test_mount_unit_adds_the_suffix_to_the_escaped_path() -> None:
    assert mount_unit("/run/calico/cgroup") == "run-calico-cgroup.mount"
    assert mount_unit("/var/run/calico-custom") == "var-run-calico\\x2dcustom.mount"


def test_unit_object_path_escapes_like_systemd() -> None:
    assert unit_object_path("kubelet.service") == "/org/freedesktop/systemd1/unit/kubelet_2eservice"
    assert unit_object_path("a-b@c_d.service").endswith("/a_2db_40c_5fd_2eservice")
    assert unit_object_path("").endswith("/_")
    assert unit_object_path("0day.service").endswith("/_30day_2eservice")
    assert unit_object_path("ü").endswith("/_c3_bc")  # bytes of the UTF-8 encoding


def test_unit_object_path_matches_sd_bus_path_encode() -> None:
    # sd_bus_path_encode is libsystemd's own escaping, reached through pystemd.
    path_encode = pytest.importorskip("pystemd.dbuslib").path_encode

    names = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=names, max_size=40))
    def check(name: str) -> None:
        expected = path_encode(b"/org/freedesktop/systemd1/unit", name.encode()).decode()
        assert unit_object_path(name) == expected

    check()
