"""argparse, as the command line uses it: a parser that raises instead of exiting, a formatter
that does not import shutil, and --version read only when asked for.

cli.build_parser defines the command line with these; it is the one definition, for --help,
usage errors and the man page (packaging/manpage). Imported only when a run needs argparse: a
plain ``status`` or ``reap`` is read by quickargs.py instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

TYPE_CHECKING = False  # not typing's: see cli.py
if TYPE_CHECKING:
    from typing import Any, NoReturn


class UsageError(Exception):
    """argparse's complaint, raised instead of exiting so that --json can report it."""

    def __init__(self, usage: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(self.format_usage(), f"{self.prog}: error: {message}")


class Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized from os instead of shutil.

    argparse builds a formatter for every add_argument, and its default asks
    shutil.get_terminal_size, whose import (bz2, lzma, fnmatch) costs more than the rest of the
    parser.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        super().__init__(prog, indent_increment, max_help_position, width=_columns())


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class ShowVersion(argparse.Action):
    """--version, printing what ``text`` returns: called only when asked for, because reading
    the installed metadata (importlib.metadata) costs more than a whole `status`."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, text: Callable[[], str], **_: Any
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")
        self.text = text

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        sys.stdout.write(f"{self.text()}\n")
        parser.exit()
