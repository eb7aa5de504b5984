"""Command line: status, reap, check-config, demo and run.

Exit codes (documented in the README and the man page):
  0   no target is left mounted that this run was allowed to reap
  1   some remain (the output says which and why)
  2   usage error
  77  not permitted (run as root: unmounting needs CAP_SYS_ADMIN)
  78  configuration error (the message names the file and the key)

Heavy imports (pystemd, pyudev) happen only in the code paths that need them, so that a
``status`` on a node with nothing to decide costs little more than reading mountinfo.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial

from calico_mount_reaper import __version__
from calico_mount_reaper.config import Config, ConfigError, load
from calico_mount_reaper.plan import Mode
from calico_mount_reaper.reaper import (
    PassReport,
    in_host_mount_namespace,
    journal_outcome,
    journal_report,
    run_pass,
)

# Not typing.TYPE_CHECKING: importing typing costs 3 ms of every `status`; mypy treats any
# name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging  # the journal (and logging) load only when a reap runs under a unit
    from typing import Any, TextIO

EXIT_OK, EXIT_REMAIN, EXIT_USAGE, EXIT_NOPERM, EXIT_CONFIG = 0, 1, 2, 77, 78
JSON_SCHEMA_VERSION = 1
CAP_SYS_ADMIN = 21


def display_path(path: str) -> str:
    """A path safe to print as one token (see printable.py: controls, C1, raw bytes, ...)."""
    from calico_mount_reaper.printable import display_path as escaped

    return escaped(path)


def has_cap_sys_admin(status_path: str = "/proc/self/status") -> bool:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    return False


def _mode(args: argparse.Namespace) -> Mode:
    if getattr(args, "force", False):
        return Mode.FORCE
    return Mode(getattr(args, "mode", "normal"))


def report_json(report: PassReport, command: str, exit_code: int) -> dict[str, Any]:
    """The stable --json schema (version 1), documented in the README."""
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
        "exit_code": exit_code,
    }


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


def _warn_namespace(err: TextIO) -> None:
    if in_host_mount_namespace() is False:
        err.write(
            "warning: this process is not in the host's mount namespace (PID 1's); an unmount "
            "here would not reach the host. Run it from the host (nsenter -t 1 -m).\n"
        )


def _emit(report: PassReport, command: str, code: int, as_json: bool) -> None:
    """The report as JSON on stdout, or the table (plus what was done) for a person."""
    if as_json:
        import json  # 1.5 ms: only for --json

        json.dump(report_json(report, command, code), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _warn_namespace(sys.stderr)
        _print_table(report, sys.stdout)
        if command == "reap":
            _print_outcomes(report, sys.stdout)
            if not report.dry_run:
                _next_steps(report, sys.stderr)
    for w in report.warnings:
        sys.stderr.write(f"warning: {w}\n")


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    _emit(run_pass(config, Mode.NORMAL, dry_run=True), "status", EXIT_OK, args.json)
    return EXIT_OK


def cmd_reap(args: argparse.Namespace, config: Config) -> int:
    if not args.dry_run and not has_cap_sys_admin():
        sys.stderr.write(
            "error: unmounting needs CAP_SYS_ADMIN; run as root (sudo calico-mount-reaper reap), "
            "or use --dry-run to see the plan\n"
        )
        return EXIT_NOPERM
    from calico_mount_reaper import journal

    # Run from a unit (kubelet's ExecStopPost), the decisions go to the journal as entries.
    log = None
    if not args.dry_run and journal.choose_sink(sys.stderr) is journal.Sink.JOURNAL:
        log = journal.setup()
    report = run_pass(
        config,
        _mode(args),
        dry_run=args.dry_run,
        on_outcome=None if log is None else partial(journal_outcome, log),
    )
    if log is not None:
        _journal_decisions(log, report)
    # Refusals (in use, held) are decisions, not failures: only an allowed reap that left
    # something mounted is exit 1.
    code = EXIT_REMAIN if report.unreaped and not args.dry_run else EXIT_OK
    _emit(report, "reap", code, args.json)
    return code


def _journal_decisions(log: logging.Logger, report: PassReport) -> None:
    from calico_mount_reaper import journal

    journal_report(log, report)
    for a in report.assessments:
        if not a.reap:
            journal.event(
                log,
                "VERDICT",
                f"{a.site.mount_point}: left alone, {a.reason}",
                mount_point=a.site.mount_point,
                mount_id=a.site.roots[0].mount_id,
                fstype=a.site.roots[0].fstype,
                target=a.site.rule.name,
                reason=a.reason,
                result="refused",
            )


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args.path or args.config)
    sys.stdout.write(f"{config.source}: OK\n")
    for rule in config.rules:
        types = ",".join(sorted(rule.fstypes))
        owners = ", ".join(rule.owners)
        sys.stdout.write(f"  target {rule.name}: {rule.prefix} ({types}) owners {owners}\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calico-mount-reaper",
        description="Find and safely unmount the cgroup2/bpf mounts that Calico and Cilium "
        "leave behind.",
        epilog="Exit codes: 0 nothing left to reap, 1 targets remain, 2 usage, "
        "77 not permitted (run as root), 78 configuration error.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config_help = (
        "config file (default: $CALICO_MOUNT_REAPER_CONFIG, else "
        "/etc/calico-mount-reaper/config.toml if present, else built-in defaults)"
    )
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # Accepted after the command too ("reap --config X"), as people type it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    status = add("status", help="list target mounts and their verdicts")
    status.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")

    reap = add("reap", help="unmount orphaned target mounts")
    reap.add_argument("--dry-run", action="store_true", help="plan and report; change nothing")
    reap.add_argument(
        "--force", action="store_true", help="skip the in-use and held checks (node decommission)"
    )
    reap.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default="normal",
        help="normal (default), decommission (ignore kubelet), force, shutdown",
    )
    reap.add_argument("--json", action="store_true", help="machine-readable output (schema 1)")

    check = add("check-config", help="validate a config file and show the targets")
    check.add_argument("path", nargs="?", help="file to check (default: the one in use)")

    add("demo", help="reproduce the leftover-mount problem and its fix in a sandbox")

    units = add(
        "install-units",
        help="install the systemd unit, kubelet drop-in, preset and "
        "journal catalog of this installation (idempotent)",
    )
    units.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="install under DIR instead of / (an image being built)",
    )

    run = add("run", help="serve as the node daemon (a systemd Type=notify service)")
    run.add_argument("--verbose", action="store_true", help="log debug detail too")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "demo":
            from calico_mount_reaper.demo import run_demo

            return run_demo()
        if args.command == "install-units":
            from calico_mount_reaper.install import main as install_units

            return install_units(args.root, args.config)
        if args.command == "run":
            if not has_cap_sys_admin():
                sys.stderr.write(
                    "error: the daemon needs CAP_SYS_ADMIN to unmount; run it as "
                    "root (the packaged unit does)\n"
                )
                return EXIT_NOPERM
            from calico_mount_reaper.daemon import run as run_daemon

            return run_daemon(args.config, args.verbose)
        config = load(args.config)
        if args.command == "status":
            return cmd_status(args, config)
        return cmd_reap(args, config)
    except ConfigError as exc:
        sys.stderr.write(
            f"config error: {exc}\nNothing was unmounted. Fix the file and rerun "
            "'calico-mount-reaper check-config'.\n"
        )
        return EXIT_CONFIG
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
