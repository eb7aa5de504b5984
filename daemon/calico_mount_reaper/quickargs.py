"""The hot commands' command lines read without argparse.

``status`` and ``reap`` run in install scripts, in kubelet's ExecStopPost and on busy nodes,
where start-up is most of their cost: importing argparse (with gettext) and building even one
command's parser costs about 5 ms of CPU, more than the kernel-API pass at 10k mounts. So the
plain forms are read here, into the same attributes argparse would give. Anything else (help,
--version, an abbreviation, an unknown option, --force with --mode, ``--``) returns None and
goes to argparse (cli.build_parser), which stays the one definition of the command line:
tests/test_startup.py holds this table equal to argparse's results.
"""

from __future__ import annotations

from types import SimpleNamespace

MODES = ("normal", "decommission", "force", "shutdown")  # plan.Mode's values (a test checks)

# Per command: the switches (store_true) and the options that take one value, with the
# attributes argparse sets when neither is given. --config is valid on both sides of the command.
_SWITCHES = {"status": ("--json",), "reap": ("--json", "--dry-run", "--force")}
_VALUED = {"status": ("--config",), "reap": ("--config", "--mode")}
# (argparse's --version action leaves version=None behind too.)
_DEFAULTS = {
    "status": {"config": None, "json": False, "version": None},
    "reap": {
        "config": None,
        "json": False,
        "version": None,
        "dry_run": False,
        "force": False,
        "mode": None,
    },
}
# Before the command word: the top-level switches and valued options.
_TOP_LEVEL: tuple[tuple[str, ...], tuple[str, ...]] = (("--json",), ("--config",))


def parse(argv: list[str]) -> SimpleNamespace | None:
    """``argv``'s arguments as argparse would give them, or None to let argparse decide."""
    values: dict[str, object] = {}
    command = None
    switches, valued = _TOP_LEVEL
    i = 0
    while i < len(argv):
        word = argv[i]
        if command is None and word in _SWITCHES:
            command = word
            switches, valued = _SWITCHES[word], _VALUED[word]
        elif word in switches:
            values[_dest(word)] = True
        elif word.split("=", 1)[0] in valued:
            name, equals, value = word.partition("=")
            if not equals:
                i += 1
                if i == len(argv):
                    return None
                value = argv[i]
                if value.startswith("-"):  # argparse takes it for an option, not a value
                    return None
            if name == "--mode" and value not in MODES:
                return None
            values[_dest(name)] = value
        else:
            return None
        i += 1
    if command is None or (values.get("force") and "mode" in values):
        return None  # no command, or --force with --mode: argparse's usage errors
    return SimpleNamespace(**{**_DEFAULTS[command], **values, "command": command})


def _dest(option: str) -> str:
    return option[2:].replace("-", "_")
