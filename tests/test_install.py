"""install-units: rendering, idempotence, custom-target drop-in, catalog step.

Files are written under a temporary --root (never the host's /usr); systemd's own tools check the
results where they are installed (systemd-escape, systemd-analyze verify).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from calico_mount_reaper import cli, install
from calico_mount_reaper.config import Config, from_mapping

REPO = Path(__file__).resolve().parent.parent
UNIT_TEXT = (REPO / "systemd" / install.UNIT).read_text()


def custom_config(*prefixes: str) -> Config:
    targets = [
        {"name": f"t{i}", "prefix": p, "fstypes": ["cgroup2"], "owners": ["calico-node"]}
        for i, p in enumerate(prefixes)
    ]
    return from_mapping({"target": targets}, "/etc/calico-mount-reaper/config.toml")


def test_mount_unit_names_the_builtin_targets_as_the_unit_orders_them() -> None:
    for rule in install.BUILTIN_RULES:
        unit = install.mount_unit(rule.prefix + ("/cgroup" if rule.name == "calico" else ""))
        assert f"{unit}" in UNIT_TEXT, unit


# --------------------------------------------------------------------------- rendering


def test_render_replaces_every_command_path_and_nothing_else() -> None:
    files = install.planned(Config(), "/opt/venv/bin/calico-mount-reaper")
    unit = files[f"{install.UNIT_DIR}/{install.UNIT}"]
    dropin = files[f"{install.UNIT_DIR}/{install.KUBELET_DROPIN}"]
    assert unit is not None and dropin is not None
    assert "ExecStart=/opt/venv/bin/calico-mount-reaper run\n" in unit
    assert "/opt/venv/bin/calico-mount-reaper reap\n" in dropin
    assert install.PACKAGED_COMMAND not in unit + dropin
    assert unit.replace("/opt/venv/bin/calico-mount-reaper", install.PACKAGED_COMMAND) == UNIT_TEXT
    # Without custom targets there is no drop-in to write (and one left over is removed).
    assert files[f"{install.UNIT_DIR}/{install.CUSTOM_DROPIN}"] is None


def test_the_shipped_files_come_from_systemd_dir_through_the_package_data_link() -> None:
    assert (install.DATA / install.UNIT).read_text() == UNIT_TEXT
    assert os.path.samefile(install.DATA, REPO / "systemd")


def test_custom_targets_get_an_after_dropin_with_escaped_mount_units() -> None:
    text = install.custom_targets_dropin(custom_config("/var/run/calico-custom", "/srv/cg v2"))
    assert text is not None
    assert "[Unit]\nAfter=run-calico\\x2dcustom.mount\nAfter=srv-cg\\x20v2.mount\n" in text
    assert "/etc/calico-mount-reaper/config.toml" in text
    assert install.custom_targets_dropin(Config()) is None


# --------------------------------------------------------------------------- install


class Recorder:
    def __init__(self, returncode: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), self.returncode, "", "boom")


def test_install_writes_everything_then_is_idempotent(tmp_path: Path) -> None:
    run = Recorder()
    first = install.install(tmp_path, Config(), "/usr/local/bin/calico-mount-reaper", run)
    assert sorted(first.written) == sorted(
        f"/{rel}" for rel, content in install.planned(Config(), "x").items() if content
    )
    assert not first.unchanged and not first.removed
    assert (tmp_path / install.UNIT_DIR / install.UNIT).stat().st_mode & 0o777 == 0o644
    assert run.calls == []  # not the system's root: the catalog database is not touched
    assert "--root" in first.catalog

    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    second = install.install(tmp_path, Config(), "/usr/local/bin/calico-mount-reaper", run)
    assert second.written == [] and sorted(second.unchanged) == sorted(first.written)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    assert not list(tmp_path.rglob("*.partial"))


def test_install_adds_then_removes_the_custom_dropin(tmp_path: Path) -> None:
    command = "/usr/local/bin/calico-mount-reaper"
    dropin = tmp_path / install.UNIT_DIR / install.CUSTOM_DROPIN
    added = install.install(tmp_path, custom_config("/run/calico-custom"), command, Recorder())
    assert f"/{install.UNIT_DIR}/{install.CUSTOM_DROPIN}" in added.written
    assert "After=run-calico\\x2dcustom.mount" in dropin.read_text()
    removed = install.install(tmp_path, Config(), command, Recorder())
    assert removed.removed == [f"/{install.UNIT_DIR}/{install.CUSTOM_DROPIN}"]
    assert not dropin.exists()


def test_install_rewrites_a_changed_command_path(tmp_path: Path) -> None:
    install.install(tmp_path, Config(), "/usr/local/bin/calico-mount-reaper", Recorder())
    moved = install.install(tmp_path, Config(), "/opt/bin/calico-mount-reaper", Recorder())
    assert f"/{install.UNIT_DIR}/{install.UNIT}" in moved.written
    assert (
        "ExecStart=/opt/bin/calico-mount-reaper run"
        in (tmp_path / install.UNIT_DIR / install.UNIT).read_text()
    )


def test_catalog_update_runs_only_on_the_real_root(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, failing = Recorder(), Recorder(returncode=1)
    monkeypatch.setattr(install.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert install._update_catalog(Path("/"), ok).startswith("updated")
    assert ok.calls == [["journalctl", "--update-catalog"]]
    assert install._update_catalog(Path("/"), failing) == "update failed: boom"
    monkeypatch.setattr(install.shutil, "which", lambda name: None)
    assert "journalctl not found" in install._update_catalog(Path("/"), ok)
    assert len(ok.calls) == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the command to exist: point it at this interpreter's entry point, or python.
    command = shutil.which("calico-mount-reaper") or sys.executable
    install.install(tmp_path, Config(), command, Recorder())
    # --man=no: Documentation=man:calico-mount-reaper(8) is looked up in the host's man path,
    # where nothing installed it; test_install_puts_the_man_page_where_man_finds_it covers it.
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / install.UNIT_DIR / install.UNIT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


# --------------------------------------------------------------------------- command line


def test_find_command_prefers_argv0_then_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = "/opt/x/bin/calico-mount-reaper"
    assert install.find_command(own) == own
    fake = tmp_path / "calico-mount-reaper"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert install.find_command("/usr/lib/python3/x/__main__.py") == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert install.find_command("-c") == f"{sys.executable} -m calico_mount_reaper"


def test_cli_install_units_under_a_root_uses_that_roots_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    conf = tmp_path / "etc/calico-mount-reaper/config.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text(
        '[[target]]\nname = "c"\nprefix = "/run/calico-custom"\n'
        'fstypes = ["cgroup2"]\nowners = ["calico-node"]\n'
    )
    assert cli.main(["install-units", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"under {tmp_path}" in out and "wrote" in out
    assert "On the node: systemctl daemon-reload && systemctl enable --now" in out
    assert (tmp_path / install.UNIT_DIR / install.CUSTOM_DROPIN).exists()


def test_cli_install_units_bad_config_is_exit_78_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("grace_period = -1\n")
    root = tmp_path / "root"
    assert cli.main(["install-units", "--root", str(root), "--config", str(bad)]) == 78
    assert "grace_period" in capsys.readouterr().err
    assert not root.exists()


# --------------------------------------------------------------------------- --config, uninstall


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root with its mode and (for files) content: a byte-for-byte snapshot."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize(
    ("path", "word"),
    [
        ("/etc/cmr/node.toml", "/etc/cmr/node.toml"),
        ("/etc/my configs/a.toml", '"/etc/my configs/a.toml"'),
        ('/etc/q"uote\\d', '"/etc/q\\"uote\\\\d"'),
        ("/etc/100%/$HOME", '"/etc/100%%/$$HOME"'),
        ("/etc/new\nline", '"/etc/new\\x0aline"'),
    ],
)
def test_unit_word_quotes_what_systemd_would_split_or_expand(path: str, word: str) -> None:
    assert install.unit_word(path) == word


def test_config_is_carried_into_execstart_and_the_dropin(tmp_path: Path) -> None:
    files = install.planned(Config(), "/opt/venv/bin/calico-mount-reaper", "/etc/my node.toml")
    unit = files[f"{install.UNIT_DIR}/{install.UNIT}"]
    dropin = files[f"{install.UNIT_DIR}/{install.KUBELET_DROPIN}"]
    assert unit is not None and dropin is not None
    line = '/opt/venv/bin/calico-mount-reaper --config "/etc/my node.toml"'
    assert f"ExecStart={line} run\n" in unit
    assert f"{line} reap\n" in dropin
    # Relative paths mean nothing to systemd: made absolute against where the command ran.
    assert install.command_line("x", "n.toml") == f"x --config {os.path.abspath('n.toml')}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_a_unit_with_a_quoted_config_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    command = shutil.which("calico-mount-reaper") or sys.executable
    install.install(tmp_path, Config(), command, Recorder(), config_path="/etc/a b%/c.toml")
    # --man=no: Documentation=man:calico-mount-reaper(8) is looked up in the host's man path,
    # where nothing installed it; test_install_puts_the_man_page_where_man_finds_it covers it.
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / install.UNIT_DIR / install.UNIT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_cli_install_units_config_lands_in_the_units(tmp_path: Path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text("grace_period = 3\n")
    root = tmp_path / "root"
    assert cli.main(["install-units", "--root", str(root), "--config", str(conf)]) == 0
    unit = (root / install.UNIT_DIR / install.UNIT).read_text()
    assert f" --config {conf} run\n" in unit


def test_uninstall_undoes_install_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "usr/local/lib/systemd/system").mkdir(parents=True)  # systemd's own, kept
    (tmp_path / "usr/local/lib/systemd/system/other.service").write_text("[Unit]\n")
    before = tree(tmp_path)
    command = "/usr/local/bin/calico-mount-reaper"
    install.install(tmp_path, custom_config("/run/calico-custom"), command, Recorder())
    install.install(tmp_path, Config(), command, Recorder(), config_path="/etc/x.toml")
    assert tree(tmp_path) != before
    result = install.uninstall(tmp_path, Recorder())
    assert result.refused == [] and len(result.removed) == 5  # the custom drop-in went already
    assert tree(tmp_path) == before
    # Nothing recorded any more: a second run is a no-op.
    assert install.uninstall(tmp_path, Recorder()).removed == []


def test_uninstall_refuses_a_file_changed_since_install(tmp_path: Path) -> None:
    install.install(tmp_path, Config(), "/usr/local/bin/calico-mount-reaper", Recorder())
    edited = tmp_path / install.UNIT_DIR / install.UNIT
    edited.write_text(edited.read_text() + "# mine\n")
    result = install.uninstall(tmp_path, Recorder())
    assert result.refused == [f"/{install.UNIT_DIR}/{install.UNIT}"]
    assert edited.read_text().endswith("# mine\n")
    assert len(result.removed) == 4  # the other files
    # The record of what is left stays, so undoing the edit lets a rerun finish the job.
    edited.write_text(edited.read_text().removesuffix("# mine\n"))
    assert install.uninstall(tmp_path, Recorder()).removed == [
        f"/{install.UNIT_DIR}/{install.UNIT}"
    ]
    assert not (tmp_path / "usr").exists()


def test_uninstall_never_touches_files_it_did_not_write(tmp_path: Path) -> None:
    # Put there by hand (or a package): no record of install-units, so nothing is removed.
    unit = tmp_path / install.UNIT_DIR / install.UNIT
    unit.parent.mkdir(parents=True)
    unit.write_text(UNIT_TEXT)
    assert install.uninstall(tmp_path, Recorder()) == install.Result()
    assert unit.read_text() == UNIT_TEXT


def test_cli_uninstall_units_refuses_while_enabled_then_undoes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree(tmp_path)
    assert cli.main(["install-units", "--root", str(tmp_path)]) == 0
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / install.UNIT).symlink_to(f"/{install.UNIT_DIR}/{install.UNIT}")
    capsys.readouterr()
    assert cli.main(["uninstall-units", "--json", "--root", str(tmp_path)]) == 77
    assert "systemctl disable --now calico-mount-reaper" in capsys.readouterr().out
    (wants / install.UNIT).unlink()
    for d in (wants, wants.parent, wants.parent.parent, tmp_path / "etc"):
        d.rmdir()
    assert cli.main(["uninstall-units", "--root", str(tmp_path)]) == 0
    assert "systemctl daemon-reload" in capsys.readouterr().out
    assert tree(tmp_path) == before


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_install_puts_the_man_page_where_man_finds_it(tmp_path: Path) -> None:
    install.install(tmp_path, Config(), "/usr/local/bin/calico-mount-reaper", Recorder())
    unit = (tmp_path / install.UNIT_DIR / install.UNIT).read_text()
    assert "Documentation=man:calico-mount-reaper(8)\n" in unit
    manpath = tmp_path / "usr/local/share/man"
    found = subprocess.run(
        ["man", "-M", str(manpath), "-w", "8", "calico-mount-reaper"],
        capture_output=True,
        text=True,
    )
    assert found.stdout.strip() == str(manpath / "man8/calico-mount-reaper.8"), found.stderr
