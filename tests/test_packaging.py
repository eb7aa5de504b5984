"""The Debian package and the RPM, built by packaging/build, and the default config they ship.

The packages are built once per session from the working tree into a temporary directory (never
into the checkout's dist/), then inspected with the distributions' own tools: dpkg-deb, rpm -qp
and lintian. tests/e2e/test_deb.py installs the same .deb on a real systemd.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from calico_mount_reaper.config import Config, from_mapping, load_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older Pythons only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
DEFAULT_CONFIG = PACKAGING / "config.toml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
DEB_VERSION = f"{VERSION}-1"
# packaging/build runs with this PATH (the distribution's Python, not pyenv's).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "rpmbuild", "lintian")
BUILD_DEPS = (
    "build-essential dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all "
    "python3-setuptools lintian rpm"
)

# Files besides the Python package itself (whose modules are compared with the source tree).
DEB_FILES = {
    "/etc/calico-mount-reaper/config.toml",
    "/usr/lib/systemd/system/calico-mount-reaper.service",
    "/usr/lib/systemd/system/kubelet.service.d/50-calico-mount-reaper.conf",
    "/usr/bin/calico-mount-reaper",
    "/usr/lib/systemd/catalog/calico-mount-reaper.catalog",
    "/usr/share/doc/calico-mount-reaper/README.md.gz",
    "/usr/share/doc/calico-mount-reaper/changelog.Debian.gz",
    "/usr/share/doc/calico-mount-reaper/copyright",
    "/usr/share/lintian/overrides/calico-mount-reaper",
    "/usr/share/man/man8/calico-mount-reaper.8.gz",
}
RPM_FILES = {
    "/etc/calico-mount-reaper/config.toml",
    "/usr/lib/systemd/system/calico-mount-reaper.service",
    "/usr/lib/systemd/system/kubelet.service.d/50-calico-mount-reaper.conf",
    "/usr/bin/calico-mount-reaper",
    "/usr/lib/systemd/catalog/calico-mount-reaper.catalog",
    f"/usr/share/doc/calico-mount-reaper-{VERSION}/README.md",
    "/usr/share/man/man8/calico-mount-reaper.8",
}

_BUILT: dict[str, Path] = {}


def build_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run packaging/build once per session; return the directory holding .deb, .rpm, .changes.

    Shared with the e2e scenario, which installs the .deb built here.
    """
    if "out" in _BUILT:
        return _BUILT["out"]
    absent = [tool for tool in BUILD_TOOLS if shutil.which(tool, path=SYSTEM_PATH) is None]
    if absent:
        reason = f"not found: {' '.join(absent)} (apt-get install {BUILD_DEPS})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"packaging prerequisite missing in CI: {reason}", pytrace=False)
        pytest.skip(f"packaging: {reason}")
    out = tmp_path_factory.mktemp("packages")
    done = subprocess.run(
        [str(PACKAGING / "build"), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"packaging/build failed:\n{done.stdout}\n{done.stderr}"
    _BUILT["out"] = out
    return out


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packages(tmp_path_factory)


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def deb(packages: Path) -> Path:
    return packages / f"calico-mount-reaper_{DEB_VERSION}_all.deb"


def rpm(packages: Path) -> Path:
    return packages / f"calico-mount-reaper-{DEB_VERSION}.noarch.rpm"


def source_modules() -> set[str]:
    pkg = REPO / "daemon" / "calico_mount_reaper"
    return {str(p.relative_to(pkg)) for p in pkg.rglob("*.py")}


# --------------------------------------------------------------------------- default config


def test_default_config_parses_to_the_builtin_defaults() -> None:
    assert load_file(str(DEFAULT_CONFIG)) == Config()


def uncommented_defaults(text: str) -> str:
    """The config with every ``#key = value`` line switched on (prose and examples stay off)."""
    return re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text)


def test_default_config_lists_every_key_with_its_true_default() -> None:
    text = DEFAULT_CONFIG.read_text()
    data = tomllib.loads(uncommented_defaults(text))
    scalar_keys = {f.name for f in dataclasses.fields(Config)} - {"rules", "source"}
    assert set(data) == scalar_keys | {"builtin_targets"}
    # Switched on, the documented defaults change nothing: each comment tells the truth.
    assert from_mapping(data, str(DEFAULT_CONFIG)) == Config()


def test_default_config_target_example_is_valid() -> None:
    example = re.findall(r"(?m)^#   (.*)$", DEFAULT_CONFIG.read_text())
    assert example and example[0] == "[[target]]"
    config = from_mapping(tomllib.loads("\n".join(example)), "example")
    assert [r.name for r in config.rules][-1] == "calico-custom"
    assert config.rules[-1].prefix == "/run/calico-custom"  # /var/run folded


# --------------------------------------------------------------------------- build script


def copy_of_the_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    top_level_only = {".git", "tests", "dist", "build", ".venv", ".venv-floor"}
    shutil.copytree(
        REPO,
        tree,
        symlinks=True,
        ignore=lambda d, names: top_level_only.intersection(names) if Path(d) == REPO else set(),
    )
    return tree


def test_build_names_a_missing_unit_file(tmp_path: Path) -> None:
    tree = copy_of_the_tree(tmp_path)
    (tree / "systemd/kubelet.service.d/50-calico-mount-reaper.conf").unlink()
    done = subprocess.run(
        [str(tree / "packaging/build"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "systemd/kubelet.service.d/50-calico-mount-reaper.conf is missing" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        ("pyproject.toml", "packaging/debian/changelog is at 0.1.0-1 but pyproject.toml at 9.9.9"),
        ("spec", "spec is at 9.9.9 but pyproject.toml at 0.1.0"),
        ("spec-changelog", "newest %changelog entry"),
    ],
)
def test_build_refuses_versions_that_disagree(tmp_path: Path, edit: str, complaint: str) -> None:
    tree = copy_of_the_tree(tmp_path)
    spec = tree / "packaging/rpm/calico-mount-reaper.spec"
    if edit == "pyproject.toml":
        path = tree / "pyproject.toml"
        path.write_text(path.read_text().replace(f'version = "{VERSION}"', 'version = "9.9.9"'))
    elif edit == "spec":
        spec.write_text(spec.read_text().replace(f"Version:        {VERSION}", "Version: 9.9.9"))
    else:
        spec.write_text(spec.read_text().replace(f"- {VERSION}-1\n", "- 0.0.9-1\n"))
    done = subprocess.run(
        [str(tree / "packaging/build"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


def test_build_writes_the_packages_where_asked_and_keeps_its_logs(packages: Path) -> None:
    names = {p.name for p in packages.iterdir()}
    logs = {p.name for p in (packages / "logs").iterdir()}
    assert logs == {"rpmbuild.log", "dpkg-buildpackage.log"}
    assert "dh_installsystemd" in (packages / "logs/dpkg-buildpackage.log").read_text()
    assert {
        deb(packages).name,
        rpm(packages).name,
        f"calico-mount-reaper-{DEB_VERSION}.src.rpm",
    } <= names
    assert not (REPO / "debian").exists(), "the build must not write debian/ into the checkout"


# --------------------------------------------------------------------------- Debian package


def test_deb_control_fields(packages: Path) -> None:
    fields = run(
        "dpkg-deb",
        "-f",
        str(deb(packages)),
        "Package",
        "Version",
        "Architecture",
        "Section",
        "Depends",
    )
    control = dict(line.split(": ", 1) for line in fields.splitlines())
    assert control["Package"] == "calico-mount-reaper"
    assert control["Version"] == DEB_VERSION
    assert control["Architecture"] == "all"
    assert control["Section"] == "admin"
    depends = [d.strip() for d in control["Depends"].split(",")]
    for wanted in (
        "python3 (>= 3.9)",
        "python3-pystemd (>= 0.11)",
        "python3-pyudev",
        "python3-sdnotify",
    ):
        assert wanted in depends, control["Depends"]


def deb_paths(packages: Path) -> set[str]:
    names = run("dpkg-deb", "-c", str(deb(packages)))
    return {line.split()[-1].lstrip(".") for line in names.splitlines() if not line.startswith("d")}


def test_deb_file_list(packages: Path) -> None:
    paths = deb_paths(packages)
    site = "/usr/lib/python3/dist-packages/calico_mount_reaper/"
    modules = {p[len(site) :] for p in paths if p.startswith(site) and p.endswith(".py")}
    assert modules == source_modules()
    others = {p for p in paths if not p.startswith("/usr/lib/python3/dist-packages/")}
    presets = {p for p in others if p.startswith("/usr/lib/systemd/system-preset/")}
    assert [Path(p).name for p in presets] == [p.name for p in (REPO / "systemd").glob("*.preset")]
    assert others - presets == DEB_FILES
    # Nothing under the aliased /lib (Debian 13's lintian: aliased-location).
    assert not [p for p in paths if p.startswith(("/lib/", "/bin/", "/sbin/"))]


def test_deb_installs_the_units_from_systemd_dir_unchanged(packages: Path, tmp_path: Path) -> None:
    run("dpkg-deb", "-x", str(deb(packages)), str(tmp_path))
    unit = tmp_path / "usr/lib/systemd/system/calico-mount-reaper.service"
    assert unit.read_text() == (REPO / "systemd/calico-mount-reaper.service").read_text()
    assert "ExecStart=/usr/bin/calico-mount-reaper run" in unit.read_text().splitlines()
    dropin = "kubelet.service.d/50-calico-mount-reaper.conf"
    assert (tmp_path / "usr/lib/systemd/system" / dropin).read_text() == (
        REPO / "systemd" / dropin
    ).read_text()
    entry = (tmp_path / "usr/bin/calico-mount-reaper").read_text().splitlines()[0]
    assert entry == "#!/usr/bin/python3"


def test_deb_maintainer_scripts_enable_start_stop_and_purge(packages: Path, tmp_path: Path) -> None:
    run("dpkg-deb", "-e", str(deb(packages)), str(tmp_path))
    assert (tmp_path / "conffiles").read_text().split() == ["/etc/calico-mount-reaper/config.toml"]
    postinst = (tmp_path / "postinst").read_text()
    assert "deb-systemd-helper enable 'calico-mount-reaper.service'" in postinst
    assert "deb-systemd-invoke $_dh_action 'calico-mount-reaper.service'" in postinst
    prerm = (tmp_path / "prerm").read_text()
    assert "deb-systemd-invoke stop 'calico-mount-reaper.service'" in prerm
    assert (
        "deb-systemd-helper purge 'calico-mount-reaper.service'"
        in (tmp_path / "postrm").read_text()
    )


def test_lintian_has_no_errors_or_warnings_and_every_override_says_why(packages: Path) -> None:
    changes = packages / f"calico-mount-reaper_{DEB_VERSION}_amd64.changes"
    if not changes.exists():  # named after the build machine's architecture
        (changes,) = packages.glob("calico-mount-reaper_*.changes")
    done = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--pedantic", str(changes)],
        capture_output=True,
        text=True,
    )
    findings = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert done.returncode == 0 and not findings, done.stdout + done.stderr

    overrides = (PACKAGING / "debian/calico-mount-reaper.lintian-overrides").read_text()
    previous = ""
    for line in overrides.splitlines():
        if line.startswith("calico-mount-reaper:"):
            assert previous.startswith("# "), f"override without a reason above it: {line}"
        previous = line


# --------------------------------------------------------------------------- RPM


def test_rpm_is_noarch_with_the_expected_files(packages: Path) -> None:
    arch_version = run("rpm", "-qp", "--qf", "%{ARCH} %{VERSION}", str(rpm(packages)))
    assert arch_version == f"noarch {VERSION}"
    paths = set(run("rpm", "-qlp", str(rpm(packages))).split())
    site = next(p for p in paths if p.endswith("/site-packages/calico_mount_reaper"))
    modules = {p[len(site) + 1 :] for p in paths if p.startswith(site + "/") and p.endswith(".py")}
    assert modules == source_modules()
    others = {p for p in paths if "/site-packages/" not in p and not p.endswith("-packages")}
    presets = {p for p in others if p.startswith("/usr/lib/systemd/system-preset/")}
    assert [Path(p).name for p in presets] == [p.name for p in (REPO / "systemd").glob("*.preset")]
    dirs = {
        "/etc/calico-mount-reaper",
        "/usr/lib/systemd/system/kubelet.service.d",
        f"/usr/share/doc/calico-mount-reaper-{VERSION}",
    }
    assert others - presets - dirs == RPM_FILES


def test_rpm_config_is_noreplace_and_scriptlets_use_systemd(packages: Path) -> None:
    flags = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm(packages)))
    config = [line for line in flags.splitlines() if line.startswith("/etc/calico-mount-reaper/")]
    # c = %config, n = noreplace: a node's edited config survives an upgrade.
    assert config == ["/etc/calico-mount-reaper/config.toml cn"], config
    scripts = run("rpm", "-qp", "--scripts", str(rpm(packages)))
    assert "preset calico-mount-reaper.service" in scripts  # %systemd_post
    assert "disable --now calico-mount-reaper.service" in scripts  # %systemd_preun
    assert "try-restart calico-mount-reaper.service" in scripts  # %systemd_postun_with_restart
    requires = run("rpm", "-qp", "--requires", str(rpm(packages))).splitlines()
    assert {"python3-pystemd >= 0.11", "python3-pyudev", "python3-sdnotify"} <= set(requires)
    # Built for the build host's python3 (%{python3_sitelib}): rebuilt on RHEL 9 it says 3.9.
    host = run("/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])")
    assert f"python(abi) = {host.strip()}" in requires
    paths = run("rpm", "-qlp", str(rpm(packages))).split()
    assert f"/usr/lib/python{host.strip()}/site-packages/calico_mount_reaper/cli.py" in paths


# --------------------------------------------------------------------------- man page


def test_the_man_page_is_what_the_parser_generates() -> None:
    python = Path(sys.executable)
    done = subprocess.run(
        [str(PACKAGING / "manpage"), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": str(python)},
    )
    if done.returncode == 2 and "argparse-manpage not found" in done.stderr:
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr


def test_every_command_in_help_is_in_the_man_page() -> None:
    from calico_mount_reaper.install import MAN_PAGE

    help_text = subprocess.run(
        [sys.executable, "-m", "calico_mount_reaper", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Under "COMMAND", one indented line per command: "    status   list target mounts...".
    commands = re.findall(r"(?m)^    ([a-z][a-z-]+)(?:  |$)", help_text)
    assert {"status", "reap", "install-units", "uninstall-units"} <= set(commands)
    page = MAN_PAGE.read_text().replace("\\-", "-")
    for command in commands:
        assert f"calico-mount-reaper {command}" in page, command
    assert f'"calico-mount-reaper {VERSION}"' in page.splitlines()[0]
