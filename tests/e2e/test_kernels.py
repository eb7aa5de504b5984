"""The kernel matrix (issue 12, item 7): the daemon on the kernels nodes really run, under qemu.

Together with the host's own kernel (the nspawn scenarios), that is three tiers:

| guest | kernel | statmount/listmount | STATX_MNT_ID_UNIQUE | fanotify FAN_REPORT_MNT |
|---|---|---|---|---|
| Debian 12 (bookworm) | 6.1 | ENOSYS | no | EINVAL |
| Debian 13 (trixie) | 6.12 | yes | yes | EINVAL |

One boot per kernel (about 15 s of boot under TCG, plus the guest's work) runs everything in
tests/e2e/qemu_guest.py and writes the results into the share; the tests below judge them. So a
failed step fails its own test, with the guest's traceback, and the others still report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from calico_mount_reaper.journal import MESSAGE_IDS

from tests.e2e import harness, qemu
from tests.e2e.conftest import unavailable

pytestmark = pytest.mark.e2e

UNIT = "calico-mount-reaper.service"
CALICO = "/run/calico/cgroup"
# The pytest selection the guest runs: the CI profile of the adversarial suite (CI scale by
# default, HYPOTHESIS_PROFILE=ci). CMR_QEMU_PYTEST overrides it (space-separated node ids).
PYTEST_SELECTION = os.environ.get(
    "CMR_QEMU_PYTEST", "tests/reliability/test_adversarial.py"
).split()
PYTEST_TIMEOUT = 1800.0  # under TCG; the guest reports the real figure

# What each kernel has, probed by the syscalls themselves (DESIGN.md, "Old kernels under qemu").
EXPECTED_FACTS = {
    "bookworm": {
        "statmount": "ENOSYS",
        "listmount": "ENOSYS",
        "statx_mnt_id_unique": False,
        "fanotify_report_mnt": "EINVAL",
    },
    "trixie": {
        "statmount": "EFAULT",  # present: it rejects the NULL request
        "listmount": "EFAULT",
        "statx_mnt_id_unique": True,
        "fanotify_report_mnt": "EINVAL",
    },
}

# The STARTED entry's field naming the mount back-end, once the kernel-API back-end lands
# (issue 12, item 1; the kernelapi branch's MountApi values): mountinfo on 6.1, listmount (with
# statmount and unique IDs) on 6.12.
MOUNT_API_FIELD = "MOUNT_API"
EXPECTED_MOUNT_API = {"bookworm": "mountinfo", "trixie": "listmount"}


@pytest.fixture(scope="module", params=qemu.KERNELS, ids=lambda k: f"debian{k.debian}")
def guest(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One boot of this kernel's guest, and the results its script wrote into the share."""
    kernel: qemu.Kernel = request.param
    missing = qemu.missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))
    try:
        tarball = qemu.ensure_image(kernel)
    except harness.Unavailable as exc:
        unavailable(str(exc))
    work = tmp_path_factory.mktemp(f"qemu-{kernel.suite}")
    # The image is 2 GB sparse (about 1 GB used): RAM when there is room.
    image = qemu.restore_image(kernel, tarball, qemu.image_dir(kernel, fallback=work / "image"))
    try:
        share = work / "share"
        harness.build_payload(share / "payload")
        shutil.copytree(
            harness.REPO_ROOT / "tests",
            share / "src/tests",
            ignore=shutil.ignore_patterns("__pycache__", "e2e"),
        )
        shutil.copy(harness.REPO_ROOT / "pyproject.toml", share / "src/pyproject.toml")
        shutil.copy(Path(__file__).with_name("qemu_guest.py"), share / "guest.py")
        (share / "request.json").write_text(
            json.dumps({"pytest": PYTEST_SELECTION, "pytest_timeout": PYTEST_TIMEOUT})
        )
        run = qemu.run_guest(image, share, timeout=qemu.BOOT_TIMEOUT + PYTEST_TIMEOUT + 300)
        results_file = share / "out/results.json"
        assert results_file.exists(), f"the guest wrote no results; console:\n{run.console[-4000:]}"
        results = json.loads(results_file.read_text())
        _record_guest_timings(kernel, results)
        results["kernel"] = kernel
        results["run_seconds"] = run.seconds
        results["console"] = run.console
        results["share"] = share
        yield results
    finally:
        shutil.rmtree(image.disk.parent, ignore_errors=True)


def _record_guest_timings(kernel: qemu.Kernel, results: dict[str, Any]) -> None:
    """The guest's own clock, into the session's "e2e timings" summary (the share itself goes
    with pytest's tmp directory)."""
    harness.record(f"qemu boot {kernel.suite}", results["multi_user_seconds"])
    for name in ("node", "reap", "pytest"):
        record = results["steps"].get(name)
        if record and record["ok"]:
            harness.record(f"qemu {name} {kernel.suite}", record["seconds"])


def step(guest: dict[str, Any], name: str) -> Any:
    """A guest step's value; its traceback (from the guest) when it failed."""
    record = guest["steps"].get(name)
    assert record is not None, f"the guest never ran {name!r}: {sorted(guest['steps'])}"
    assert record["ok"], f"guest step {name!r} failed:\n{record['error']}"
    return record["value"]


def journal(guest: dict[str, Any]) -> list[dict[str, Any]]:
    step(guest, "journal")
    text = (guest["share"] / "out/journal.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def reaper_events(guest: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in journal(guest) if e.get("MESSAGE_ID") == MESSAGE_IDS[name]]


# --------------------------------------------------------------------------- tests


def test_guest_runs_its_own_kernel_with_the_expected_features(guest: dict[str, Any]) -> None:
    kernel: qemu.Kernel = guest["kernel"]
    facts = step(guest, "kernel")
    assert facts["release"].startswith(kernel.kernel_series), facts
    expected = EXPECTED_FACTS[kernel.suite]
    assert {k: facts[k] for k in expected} == expected, facts


def test_fanotify_probe_names_the_kernel_as_the_reason(guest: dict[str, Any]) -> None:
    probe = step(guest, "fanotify_probe")
    assert probe["why"] == "kernel-too-old", probe
    assert guest["steps"]["kernel"]["value"]["release"] in probe["message"], probe


def test_daemon_says_which_mount_backend_it_chose(guest: dict[str, Any]) -> None:
    started = [e for e in reaper_events(guest, "STARTED") if e.get("_SYSTEMD_UNIT") == UNIT]
    assert len(started) == 1 and started[0]["RESULT"] == "ready", started
    status = step(guest, "status")
    expected = EXPECTED_MOUNT_API[guest["kernel"].suite]
    assert status["mount_api"] == expected, status
    assert started[0].get(MOUNT_API_FIELD) == expected, started


def test_daemon_under_its_real_unit_reaps_a_stacked_mount_after_kubelet_stops(
    guest: dict[str, Any],
) -> None:
    node = step(guest, "node")
    assert node["active"] == "active", node
    assert node["status_text"].startswith("watching 2 target rules"), node
    reap = step(guest, "reap")
    assert reap["stacked"] == 3 and reap["while_held"] == 3, reap
    reaped = [e for e in reaper_events(guest, "REAPED") if e.get("MOUNT_POINT") == CALICO]
    # The daemon did it, not a one-shot (the guest removed kubelet's drop-in).
    assert [e["_SYSTEMD_UNIT"] for e in reaped] == [UNIT], reaped
    assert "3 mount(s) gone" in reaped[0]["MESSAGE"], reaped


def test_adversarial_ci_profile_passes_in_the_guest(guest: dict[str, Any]) -> None:
    outcome = step(guest, "pytest")
    log = (guest["share"] / "out/pytest.log").read_text()
    assert outcome["returncode"] == 0, log[-6000:]
    assert " passed" in outcome["summary"], log[-3000:]
    # Every case runs on the old-ID path; the unique-ID variants skip only where the kernel has
    # no 64-bit mount IDs (6.1), and nothing else may skip.
    skipped = re.findall(r"SKIPPED \[\d+\] [^\n]*: (.*)", log)
    if step(guest, "kernel")["statx_mnt_id_unique"]:
        assert "skipped" not in outcome["summary"], log[-3000:]
    else:
        assert skipped and all("Linux < 6.8" in why for why in skipped), skipped
