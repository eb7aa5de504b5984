"""Command line: status, reap, check-config, demo, install-units, uninstall-units and run.

Exit codes are `ExitCode` (documented in the README and the man page). With ``--json``, every
exit prints one JSON object on stdout with ``schema``, ``exit_code`` and ``error`` (null on
success), usage errors (2), missing privilege (77) and config errors (78) included.

Start-up is part of the product: ``status`` runs in install scripts and on busy nodes. So a
plain ``status`` or ``reap`` is read without argparse (quickargs.py); anything else builds the
argparse parser (argparser.py), per command (only the one being run gets its arguments;
``--help`` and errors build them all). Each command imports what it needs when it runs:
pystemd, pyudev, the journal, the TOML parser and the unmount machinery stay out of a
``status --help``. tests/test_startup.py holds what a ``status`` imports.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from calico_mount_reaper import quickargs
from calico_mount_reaper.config import Config, ConfigError, load
from calico_mount_reaper.exitcode import ExitCode
from calico_mount_reaper.quickargs import MODES

# Not typing.TYPE_CHECKING: importing typing costs 3 ms of every `status`; mypy treats any
# name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse  # only for --help, errors and the rarer commands (see quickargs.py)
    import logging  # the journal (and logging) load only when a reap runs under a unit
    from types import SimpleNamespace
    from typing import Any, TextIO, Union

    from calico_mount_reaper.install import Result as UnitsResult
    from calico_mount_reaper.plan import Mode
    from calico_mount_reaper.reaper import PassReport

    # What a handler gets: argparse's result, or quickargs' equal for a plain status or reap.
    Arguments = Union[argparse.Namespace, SimpleNamespace]

PROG = "calico-mount-reaper"
DISTRIBUTION = "calico-mount-reaper"
JSON_SCHEMA_VERSION = 1
CAP_SYS_ADMIN = 21


class Privilege(enum.Enum):
    """What a command needs before it may start; checked before the config is read."""

    NONE = "none"
    CAP_SYS_ADMIN = "cap_sys_admin"  # unmounting: root, or a unit with the capability
    CAP_SYS_ADMIN_UNLESS_DRY_RUN = "cap_sys_admin_unless_dry_run"


@dataclass(frozen=True)
class Command:
    """One row of the command table: everything main() needs to know about a command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    # Runs the command; gets the validated Config when loads_config, else None.
    handler: Callable[[Arguments, Config | None], int]
    privilege: Privilege = Privilege.NONE
    loads_config: bool = False  # main() loads --config first (a ConfigError is exit 78)


class NotPermitted(Exception):
    """The command lacks a privilege or a write access; the message says what to do."""


# --------------------------------------------------------------------------- privilege


def has_cap_sys_admin(status_path: str = "/proc/self/status") -> bool:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


def _check_privilege(command: Command, args: Arguments) -> None:
    needs = command.privilege == Privilege.CAP_SYS_ADMIN or (
        command.privilege == Privilege.CAP_SYS_ADMIN_UNLESS_DRY_RUN and not args.dry_run
    )
    if needs and not has_cap_sys_admin():
        hint = ", or use --dry-run to see the plan" if hasattr(args, "dry_run") else ""
        raise NotPermitted(
            f"{command.name} needs CAP_SYS_ADMIN to unmount; run as root "
            f"(sudo {PROG} {command.name}){hint}"
        )


# --------------------------------------------------------------------------- output


def display_path(path: str) -> str:
    """A path safe to print as one token (see printable.py: controls, C1, raw bytes, ...)."""
    from calico_mount_reaper.printable import display_path as escaped

    return escaped(path)


def _print_json(obj: dict[str, Any]) -> None:
    import json  # 1.5 ms: only for --json

    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def error_json(command: str | None, code: ExitCode, message: str) -> dict[str, Any]:
    """What --json prints for an exit that has no report: the error and what to do about it."""
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": command,
        "error": message,
        "exit_code": int(code),
    }


def report_json(report: PassReport, command: str, exit_code: int) -> dict[str, Any]:
    """The stable --json schema (version 1), documented in the README."""
    from calico_mount_reaper.reaper import in_host_mount_namespace

    outcomes_by_point: dict[str, list[dict[str, Any]]] = {}
    for o in report.outcomes:
        outcomes_by_point.setdefault(o.mount.mount_point, []).append(
            {
                "mount_id": o.mount.mount_id,
                "fstype": o.mount.fstype,
                "result": o.result.value,
                "detail": o.detail,
                "blockers": [{"pid": b.pid, "comm": b.comm, "how": b.how} for b in o.blockers],
            }
        )
    remaining = {s.mount_point for s in report.remaining}
    kubelet = report.liveness.kubelet if report.liveness else None
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": command,
        "mode": report.mode.value,
        "dry_run": report.dry_run,
        "mount_api": report.mount_api.value,
        "host_mount_namespace": in_host_mount_namespace(),
        "kubelet": None
        if kubelet is None
        else {"active": kubelet.active, "source": kubelet.source, "detail": kubelet.detail},
        "targets": [
            {
                "mount_point": a.site.mount_point,
                "rule": a.site.rule.name,
                "verdict": a.verdict.value,
                "reason": a.reason,
                "owners": [{"pid": pid, "name": name} for pid, name in a.owners],
                "reap": a.reap,
                "mounts": [
                    {
                        "mount_id": m.mount_id,
                        "parent_id": m.parent_id,
                        "fstype": m.fstype,
                        "source": m.source,
                        "propagation": m.propagation,
                    }
                    for m in a.site.members
                ],
                "actions": outcomes_by_point.get(a.site.mount_point, []),
                "still_mounted": a.site.mount_point in remaining,
            }
            for a in report.assessments
        ],
        "removed_dirs": report.removed_dirs,
        "warnings": report.warnings,
        "error": _remaining_error(report) if exit_code == ExitCode.REMAIN else None,
        "exit_code": exit_code,
    }


def _remaining_error(report: PassReport) -> str:
    points = ", ".join(display_path(s.mount_point) for s in report.unreaped)
    return f"still mounted after the reap: {points}; see each target's actions, then rerun reap"


def _print_table(report: PassReport, out: TextIO) -> None:
    if not report.assessments:
        out.write("no target mounts found\n")
        return
    rows = [("MOUNT POINT", "RULE", "MOUNTS", "VERDICT", "REASON")]
    rows += [
        (
            display_path(a.site.mount_point),
            a.site.rule.name,
            str(len(a.site.members)),
            a.verdict.value,
            a.reason,
        )
        for a in report.assessments
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] + "\n")


def _print_outcomes(report: PassReport, out: TextIO) -> None:
    for o in report.outcomes:
        line = f"{o.result.value:13} {display_path(o.mount.mount_point)} "
        line += f"(mount {o.mount.mount_id}, {o.mount.fstype}): {o.detail}"
        if o.blockers:
            line += "; held by " + ", ".join(str(b) for b in o.blockers)
        out.write(line + "\n")
    for d in report.removed_dirs:
        out.write(f"removed empty mount-point directory {display_path(d)}\n")


def _next_steps(report: PassReport, out: TextIO) -> None:
    """Tell the operator what to do about each target that is still mounted."""
    remaining = {s.mount_point for s in report.remaining}
    for a in report.assessments:
        if a.site.mount_point not in remaining:
            continue
        where = display_path(a.site.mount_point)
        if a.reap:
            out.write(f"{where}: still mounted; see the failures above, then rerun reap\n")
        elif a.owners:
            out.write(f"{where}: {a.reason}; stop it, or use --force (node decommission)\n")
        else:
            out.write(f"{where}: {a.reason}; stop kubelet first, or use --force\n")


def namespace_note(in_host: bool | None) -> str | None:
    """What a person must know about the mount namespace this runs in, if anything."""
    if in_host is False:
        return (
            "warning: this process is not in the host's mount namespace (PID 1's); an unmount "
            "here would not reach the host. Run it from the host (nsenter -t 1 -m)."
        )
    if in_host is None:
        return (
            "note: cannot tell whether this is the host's mount namespace (/proc/1/ns/mnt is "
            "not readable); run as root to be sure an unmount reaches the host."
        )
    return None


def _emit(report: PassReport, command: str, code: int, as_json: bool) -> None:
    """The report as JSON on stdout, or the table (plus what was done) for a person."""
    if as_json:
        _print_json(report_json(report, command, code))
    else:
        from calico_mount_reaper.reaper import in_host_mount_namespace

        note = namespace_note(in_host_mount_namespace())
        if note:
            sys.stderr.write(note + "\n")
        _print_table(report, sys.stdout)
        if command == "reap":
            _print_outcomes(report, sys.stdout)
            if not report.dry_run:
                _next_steps(report, sys.stderr)
    for w in report.warnings:
        sys.stderr.write(f"warning: {w}\n")


# --------------------------------------------------------------------------- commands


def _add_status(p: argparse.ArgumentParser) -> None:
    _add_json(p)


def cmd_status(args: Arguments, config: Config | None) -> int:
    from calico_mount_reaper.plan import Mode
    from calico_mount_reaper.reaper import run_pass

    assert config is not None  # the table says loads_config
    _emit(run_pass(config, Mode.NORMAL, dry_run=True), "status", ExitCode.OK, args.json)
    return ExitCode.OK


def _add_reap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="plan and report; change nothing")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--force", action="store_true", help="skip the in-use and held checks (node decommission)"
    )
    how.add_argument(
        "--mode",
        choices=MODES,
        help="normal (default), decommission (ignore kubelet), force, shutdown",
    )
    _add_json(p)


def reap_mode(args: Arguments) -> Mode:
    from calico_mount_reaper.plan import Mode

    return Mode.FORCE if args.force else Mode(args.mode or "normal")


def cmd_reap(args: Arguments, config: Config | None) -> int:
    from functools import partial

    from calico_mount_reaper.reaper import journal_outcome, run_pass

    assert config is not None  # the table says loads_config
    # Run from a unit (kubelet's ExecStopPost), the decisions go to the journal as entries.
    log = None
    if not args.dry_run:  # a dry run journals nothing: logging stays out of it
        from calico_mount_reaper import journal

        if journal.choose_sink(sys.stderr) is journal.Sink.JOURNAL:
            log = journal.setup()
    report = run_pass(
        config,
        reap_mode(args),
        dry_run=args.dry_run,
        on_outcome=None if log is None else partial(journal_outcome, log),
    )
    # Refusals (in use, held) are decisions, not failures: only an allowed reap that left
    # something mounted is exit 1.
    code = ExitCode.REMAIN if report.unreaped and not args.dry_run else ExitCode.OK
    if log is not None:
        _journal_decisions(log, report)
        if not args.json:
            # Under a unit (kubelet's ExecStopPost) the entries are the output. Printed lines
            # would land in kubelet's journal under the name of the program systemd ran
            # (`timeout`), not under calico-mount-reaper.
            for w in report.warnings:
                log.warning("%s", w)
            return code
    _emit(report, "reap", code, args.json)
    return code


def _journal_decisions(log: logging.Logger, report: PassReport) -> None:
    from calico_mount_reaper import journal
    from calico_mount_reaper.reaper import journal_report

    journal_report(log, report)
    for a in report.assessments:
        if not a.reap:
            journal.event(
                log,
                "VERDICT",
                f"{a.site.mount_point}: left alone, {a.reason}",
                **a.journal_fields(),
                result="refused",
            )


def _add_check_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="file to check (default: the one in use)")
    _add_json(p)


def cmd_check_config(args: Arguments, _: Config | None) -> int:
    config = load(args.path or args.config)
    if args.json:
        targets = [
            {
                "name": r.name,
                "prefix": r.prefix,
                "fstypes": sorted(r.fstypes),
                "owners": list(r.owners),
                "detach_on_busy": r.detach_on_busy,
            }
            for r in config.rules
        ]
        _print_json(
            {
                "schema": JSON_SCHEMA_VERSION,
                "command": "check-config",
                "config": config.source,
                "targets": targets,
                "error": None,
                "exit_code": int(ExitCode.OK),
            }
        )
        return ExitCode.OK
    sys.stdout.write(f"{config.source}: OK\n")
    for rule in config.rules:
        types = ",".join(sorted(rule.fstypes))
        owners = ", ".join(rule.owners)
        sys.stdout.write(f"  target {rule.name}: {rule.prefix} ({types}) owners {owners}\n")
    return ExitCode.OK


def cmd_demo(args: Arguments, _: Config | None) -> int:
    from calico_mount_reaper.demo import run_demo

    return run_demo()


def _add_units_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="work under DIR instead of / (an image being built)",
    )
    _add_json(p)


def _units_report(command: str, root: str, result: UnitsResult) -> None:
    """What install-units / uninstall-units did, as JSON or as lines for a person."""
    from pathlib import Path

    labels = (
        ("wrote", result.written),
        ("unchanged", result.unchanged),
        ("removed", result.removed),
        ("refused", result.refused),
    )
    for label, paths in labels:
        for p in paths:
            sys.stdout.write(f"  {label:9} {p}\n")
    if result.catalog:
        sys.stdout.write(f"  catalog   {result.catalog}\n")
    if result.refused:
        sys.stderr.write(
            "left alone: the files marked 'refused' were changed or put there by someone else "
            "since install-units wrote them; remove them by hand if they are not wanted\n"
        )
    on_node = Path(root).resolve() == Path("/")
    where = "Now run" if on_node else "On the node"
    if command == "install-units":
        sys.stdout.write(
            f"{where}: systemctl daemon-reload && systemctl enable --now calico-mount-reaper\n"
        )
    elif result.removed:
        sys.stdout.write(f"{where}: systemctl daemon-reload\n")


def _units_json(command: str, result: UnitsResult, code: ExitCode) -> dict[str, Any]:
    return {
        "schema": JSON_SCHEMA_VERSION,
        "command": command,
        "written": result.written,
        "unchanged": result.unchanged,
        "removed": result.removed,
        "refused": result.refused,
        "catalog": result.catalog,
        "error": None
        if code == ExitCode.OK
        else "some files were changed since install-units wrote them and were left alone: "
        + ", ".join(result.refused),
        "exit_code": int(code),
    }


def cmd_install_units(args: Arguments, _: Config | None) -> int:
    from pathlib import Path

    from calico_mount_reaper import install

    root = Path(args.root)
    config = install.load_config(args.config, root)
    command = install.find_command()
    try:
        result = install.install(
            root, config, command, config_path=install.node_config_path(args.config, root)
        )
    except PermissionError as exc:
        raise NotPermitted(f"cannot write {exc.filename}: run as root (sudo {PROG} ...)") from None
    code = ExitCode.REMAIN if result.refused else ExitCode.OK
    if args.json:
        _print_json(_units_json("install-units", result, code))
        return code
    where = "" if root.resolve() == Path("/") else f" under {root}"
    sys.stdout.write(f"calico-mount-reaper units for {command}{where}:\n")
    _units_report("install-units", args.root, result)
    return code


def cmd_uninstall_units(args: Arguments, _: Config | None) -> int:
    from pathlib import Path

    from calico_mount_reaper import install

    root = Path(args.root)
    try:
        result = install.uninstall(root)
    except install.StillEnabled as exc:
        raise NotPermitted(
            f"calico-mount-reaper is still enabled ({exc}); run 'systemctl disable --now "
            "calico-mount-reaper' first, then uninstall-units"
        ) from None
    except PermissionError as exc:
        raise NotPermitted(
            f"cannot remove {exc.filename}: run as root (sudo {PROG} uninstall-units)"
        ) from None
    code = ExitCode.REMAIN if result.refused else ExitCode.OK
    if args.json:
        _print_json(_units_json("uninstall-units", result, code))
        return code
    if not (result.removed or result.refused):
        sys.stdout.write(
            f"nothing to uninstall: no record of install-units at /{install.MANIFEST}\n"
        )
        return code
    sys.stdout.write("calico-mount-reaper units removed:\n")
    _units_report("uninstall-units", args.root, result)
    return code


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="log debug detail too")


def cmd_run(args: Arguments, _: Config | None) -> int:
    # The daemon loads the config itself, so that a rejection lands in the journal.
    from calico_mount_reaper.daemon import run as run_daemon

    return run_daemon(args.config, args.verbose)


def _add_json(p: argparse.ArgumentParser) -> None:
    import argparse  # already loaded: only a parser being built calls this

    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"machine-readable output (schema {JSON_SCHEMA_VERSION}), on errors too",
    )


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "status",
            "list target mounts and their verdicts",
            _add_status,
            cmd_status,
            loads_config=True,
        ),
        Command(
            "reap",
            "unmount orphaned target mounts",
            _add_reap,
            cmd_reap,
            Privilege.CAP_SYS_ADMIN_UNLESS_DRY_RUN,
            loads_config=True,
        ),
        Command(
            "check-config",
            "validate a config file and show the targets",
            _add_check_config,
            cmd_check_config,
        ),
        Command(
            "demo",
            "reproduce the leftover-mount problem and its fix in a sandbox",
            _no_arguments,
            cmd_demo,
            Privilege.CAP_SYS_ADMIN,
        ),
        Command(
            "install-units",
            "install the systemd unit, kubelet drop-in, preset and journal catalog of this "
            "installation (idempotent; --config carries into the units)",
            _add_units_root,
            cmd_install_units,
        ),
        Command(
            "uninstall-units",
            "remove exactly the files install-units wrote (never one changed since)",
            _add_units_root,
            cmd_uninstall_units,
        ),
        Command(
            "run",
            "serve as the node daemon (a systemd Type=notify service)",
            _add_run,
            cmd_run,
            Privilege.CAP_SYS_ADMIN,
        ),
    )
}

EPILOG = (
    "Exit codes: 0 nothing left to reap, 1 targets remain, 2 usage, 77 not permitted "
    "(run as root), 78 configuration error. With --json every exit prints one JSON object "
    "with schema, exit_code and error."
)


# --------------------------------------------------------------------------- parser


def version() -> str:
    """The installed version (what pip, dpkg or rpm put there), never a copy in the source."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: run from a source tree without pip install)"


def command_named_in(argv: Sequence[str]) -> str | None:
    """The command word in ``argv``, found the way the top-level parser will find it."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--config":
            i += 2
        elif word.startswith("-"):
            i += 1
        else:
            return word if word in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, the other commands are listed but get no arguments.

    Building a command's arguments costs argparse time on every run; a run needs one command's.
    The man page and --help use the full parser (``only=None``).
    """
    import argparse

    from calico_mount_reaper.argparser import Formatter, Parser, ShowVersion

    parser = Parser(
        prog=PROG,
        description="Find and safely unmount the cgroup2/bpf mounts that Calico and Cilium "
        "leave behind.",
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action=ShowVersion, text=lambda: f"{PROG} {version()}")
    config_help = (
        "config file (default: $CALICO_MOUNT_REAPER_CONFIG, else "
        "/etc/calico-mount-reaper/config.toml if present, else built-in defaults)"
    )
    parser.add_argument("--config", metavar="PATH", help=config_help)
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"machine-readable output (schema {JSON_SCHEMA_VERSION}), on errors too",
    )
    # Accepted after the command too ("reap --config X"), as people type it.
    common = Parser(add_help=False, formatter_class=Formatter)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name, help=command.help, parents=[common], formatter_class=Formatter
        )
        if only is None or only == command.name:
            command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = command_named_in(argv)
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args: Arguments | None = quickargs.parse(argv)
        if args is None:
            from calico_mount_reaper.argparser import UsageError

            try:
                args = build_parser(only=name).parse_args(argv)
            except SystemExit as exc:  # --help, --version
                return int(exc.code or 0)
            except UsageError as exc:
                return _fail(name, ExitCode.USAGE, str(exc), as_json, usage=exc.usage)
        command = COMMANDS[args.command]
        _check_privilege(command, args)
        config = None
        if command.loads_config:
            config = load(args.config)
        return command.handler(args, config)
    except NotPermitted as exc:
        return _fail(name, ExitCode.NOT_PERMITTED, f"error: {exc}", as_json)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    except ConfigError as exc:
        return _fail(
            name,
            ExitCode.CONFIG,
            f"config error: {exc}\nNothing was unmounted. Fix the file and rerun "
            f"'{PROG} check-config'.",
            as_json,
        )


def _fail(command: str | None, code: ExitCode, message: str, as_json: bool, usage: str = "") -> int:
    if as_json:
        _print_json(error_json(command, code, message))
    else:
        sys.stderr.write(usage + message + "\n")
    return code
