"""Fixtures for the end-to-end tests: a cached rootfs, the checkout as a payload, and `boot`.

A machine that cannot boot containers skips these tests with the reason; under CI=true the same
reason fails them, because CI can and must run them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from tests.e2e import harness


def unavailable(reason: str) -> None:
    """Skip locally, fail in CI: a CI run that silently skipped would prove nothing."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"e2e prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(f"e2e: {reason}")


@pytest.fixture(scope="session")
def e2e_machine() -> None:
    missing = harness.missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))
    harness.remove_stale_cgroups()


@pytest.fixture(scope="session")
def rootfs(e2e_machine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The read-only lower layer every container boots over, restored once per session."""
    try:
        tarball = harness.ensure_rootfs_tarball()
    except harness.Unavailable as exc:
        unavailable(str(exc))
    lower = harness.lower_dir(fallback=tmp_path_factory.mktemp("rootfs"))
    try:
        yield harness.restore_rootfs(tarball, lower)
    finally:
        shutil.rmtree(lower, ignore_errors=True)


@pytest.fixture(scope="session")
def operator_rootfs(e2e_machine: None) -> Iterator[dict[str, Path]]:
    """suite -> the operator rootfs's lower layer (`operator_env.lower_for` restores each on
    first use); all are removed at the end of the session."""
    lowers: dict[str, Path] = {}
    yield lowers
    for lower in lowers.values():
        shutil.rmtree(lower, ignore_errors=True)


@pytest.fixture(scope="session")
def payload(e2e_machine: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project from this checkout, as a tree to lay over the guest's root."""
    return harness.build_payload(tmp_path_factory.mktemp("payload"))


class Boot(Protocol):
    def __call__(
        self,
        files: Mapping[str, harness.FileSource] | None = ...,
        enable: Sequence[str] = ...,
        udev: bool = ...,
        host_network: bool = ...,
        nspawn_args: Sequence[str] = ...,
        install_project: bool = ...,
        timeout: float = ...,
    ) -> harness.Container: ...


@pytest.fixture
def boot(rootfs: Path, payload: Path, tmp_path: Path) -> Iterator[Boot]:
    """Factory: each call boots a container on a fresh overlay; all are torn down afterwards.

    Journal, console log and /results stay under tmp_path for post-mortems; the overlay goes.
    """
    containers: list[harness.Container] = []

    def _boot(
        files: Mapping[str, harness.FileSource] | None = None,
        enable: Sequence[str] = (),
        udev: bool = False,
        host_network: bool = False,
        nspawn_args: Sequence[str] = (),
        install_project: bool = True,
        timeout: float = 60,
    ) -> harness.Container:
        container = harness.boot(
            rootfs,
            tmp_path / f"run{len(containers) + 1}",
            payload=payload if install_project else None,
            files=files,
            enable=enable,
            udev=udev,
            host_network=host_network,
            nspawn_args=nspawn_args,
            timeout=timeout,
        )
        containers.append(container)
        return container

    try:
        yield _boot
    finally:
        errors = []
        for container in containers:
            try:
                container.close()
            except Exception as exc:  # close the others anyway, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not harness.TIMINGS:
        return
    terminalreporter.section("e2e timings")
    for name, values in harness.TIMINGS.items():
        mean = sum(values) / len(values)
        terminalreporter.write_line(
            f"{name:<18} n={len(values):<3} mean={mean:6.2f}s  min={min(values):6.2f}s  "
            f"max={max(values):6.2f}s"
        )
