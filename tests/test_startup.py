"""The start-up diet of the one-shot commands: what a `status` imports, and the argparse-free
reading of a plain `status` or `reap` (quickargs.py), held equal to argparse's.

Start-up is most of what a `status` costs (docs/performance.md): the pass itself at 10k mounts
is about 3 ms of CPU, the interpreter and the imports ten times that. These tests time nothing
(bench/ does); they guard the imports that decide it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from calico_mount_reaper import quickargs
from calico_mount_reaper.cli import build_parser, command_named_in
from hypothesis import given, settings
from hypothesis import strategies as st

PACKAGE = Path(__file__).resolve().parent.parent / "daemon" / "calico_mount_reaper"
SCRIPT = PACKAGE.parent / "bin" / "calico-mount-reaper"

# Never on a plain `status`: the command line is read without argparse, the D-Bus side loads
# only when a system bus exists, the journal and logging only when a reap runs under a unit,
# json only for --json, typing never at run time (TYPE_CHECKING = False, see cli.py).
NOT_FOR_STATUS = (
    "argparse",
    "gettext",
    "shutil",
    "typing",
    "json",
    "logging",
    "pystemd",
    "pyudev",
    "sdnotify",
    "tomllib",
    "tomli",
    "importlib.metadata",
    "calico_mount_reaper.argparser",
    "calico_mount_reaper.journal",
    "calico_mount_reaper.sources.systemd",
    "calico_mount_reaper.daemon",
)


def imports_of(*argv: str, env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """Every module a run of the command imports, as (depth, name) in -X importtime's order:
    a module's own imports are listed before it, one level deeper."""
    run_env = {k: v for k, v in os.environ.items() if k != "CALICO_MOUNT_REAPER_CONFIG"}
    # No system bus: kubelet comes from the process scan, as in the bench's namespaces.
    run_env["DBUS_SYSTEM_BUS_ADDRESS"] = "unix:path=/nonexistent/system_bus_socket"
    run_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env=run_env,
    )
    assert out.returncode == 0, out.stderr
    found = []
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            name = line.split("|")[2]
            found.append(((len(name) - len(name.lstrip()) - 1) // 2, name.strip()))
    return found


def importer_of(module: str, imports: list[tuple[int, str]]) -> str | None:
    """The module whose import first loaded ``module`` (None: the script itself)."""
    for i, (depth, name) in enumerate(imports):
        if name == module:
            return next((n for d, n in imports[i + 1 :] if d < depth), None)
    raise AssertionError(f"{module} was not imported")


def test_the_command_is_the_script_that_pip_installs() -> None:
    # What the tests below run is what users get: the installed command is this very script.
    installed = Path(sysconfig.get_path("scripts")) / "calico-mount-reaper"
    lines = installed.read_text().splitlines()
    assert lines[0].startswith("#!") and "python" in lines[0]
    assert lines[1:] == SCRIPT.read_text().splitlines()[1:]


def test_a_status_imports_nothing_it_does_not_use() -> None:
    imports = imports_of("status")
    names = {name for _, name in imports}
    assert "calico_mount_reaper.quickargs" in names  # the fast path was taken
    assert not names & set(NOT_FOR_STATUS), sorted(names & set(NOT_FOR_STATUS))
    # re: dataclasses imports it (inspect and re are a third of a `status`'s imports; see
    # docs/performance.md). Nothing of ours may be the one that needs it.
    assert importer_of("re", imports) == "dataclasses"


def test_no_module_a_status_loads_imports_re_itself() -> None:
    # importer_of sees only the first importer; an `import re` after dataclasses' would hide.
    ours = [
        name for _, name in imports_of("status", "--json") if name.startswith("calico_mount_reaper")
    ]
    assert "calico_mount_reaper.mountinfo" in ours
    for name in ours:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        imported = {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "re" not in imported, f"{name} imports re"


def test_a_reap_and_json_load_only_what_they_add() -> None:
    names = {name for _, name in imports_of("reap", "--dry-run", "--json")}
    assert "json" in names
    assert not names & {"argparse", "typing", "logging", "calico_mount_reaper.journal"}


# --------------------------------------------------------------------------- quickargs


PLAIN = [
    ["status"],
    ["status", "--json"],
    ["--json", "status"],
    ["--config", "/etc/x.toml", "status"],
    ["status", "--config=/etc/x.toml", "--json"],
    ["reap"],
    ["reap", "--dry-run"],
    ["reap", "--force", "--json"],
    ["--config", "reap", "reap", "--mode", "shutdown"],  # a config file named like a command
    ["reap", "--mode=decommission", "--dry-run", "--config", "c.toml"],
]


@pytest.mark.parametrize("argv", PLAIN)
def test_the_plain_forms_are_read_without_argparse_as_argparse_reads_them(argv: list[str]) -> None:
    quick = quickargs.parse(argv)
    assert quick is not None
    assert vars(quick) == vars(build_parser().parse_args(argv))


WORDS = [
    "status",
    "reap",
    "check-config",
    "run",
    "bogus",
    "--json",
    "--config",
    "--config=a.toml",
    "--config=",
    "a.toml",
    "--dry-run",
    "--force",
    "--mode",
    "--mode=normal",
    "--mode=bogus",
    "normal",
    "force",
    "shutdown",
    "--",
    "-h",
    "--help",
    "--version",
    "--js",
    "--dry",
    "--json=1",
    "-",
    "-1",
    "",
]


def agrees_with_argparse(argv: list[str]) -> None:
    quick = quickargs.parse(argv)
    if quick is None:
        return  # argparse decides: help, errors, abbreviations, the other commands
    expected = vars(quick)
    # main() builds only the named command's arguments; both parsers must agree.
    for parser in (build_parser(), build_parser(only=command_named_in(argv))):
        assert vars(parser.parse_args(argv)) == expected, argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "--json", "status"],  # argparse: --config expected one argument
        ["status", "--config"],
        ["status", "--config", "-x"],
        ["reap", "--force", "--mode", "normal"],  # not allowed together
        ["reap", "--mode", "bogus"],
        ["status", "--js"],  # an abbreviation argparse expands
        ["status", "--", "x"],
        ["status", "status"],
        ["--dry-run", "reap"],  # reap's option before the command
        ["status", "--dry-run"],
        ["--mode=force", "reap"],
    ],
)
def test_quickargs_leaves_the_hard_cases_to_argparse(argv: list[str]) -> None:
    agrees_with_argparse(argv)


@settings(max_examples=400)
@given(st.lists(st.sampled_from(WORDS), max_size=7))
def test_quickargs_never_reads_a_command_line_otherwise_than_argparse(argv: list[str]) -> None:
    agrees_with_argparse(argv)
