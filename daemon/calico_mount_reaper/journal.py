"""Logging for the daemon and the CLI: structured journal entries, or stderr lines.

Where a line goes (`choose_sink`):
- **journal**, through pystemd's sender (libsystemd ``sd_journal_sendv``), when stderr *is* the
  journal stream (``JOURNAL_STREAM`` equals stderr's ``dev:inode``, as systemd.exec(5) tells
  programs to check) and the journal socket exists. That is the service run by systemd, and the
  CLI run from a unit (kubelet's ``ExecStopPost``). Structured fields survive only there.
- **stderr with ``<N>`` prefixes** (sd-daemon(3)) when stderr is not a terminal: a pipe, a file,
  or the journal stream without a usable socket. A merely non-terminal stderr is *not* sent to
  the journal: an installer that captures our output must get the lines, not lose them to a
  journal it is not reading.
- **plain ``level: message``** for a person at a terminal.

pystemd's ``sendv`` (0.11 up to 0.15.3 alike) drops ``sd_journal_sendv``'s return value, so a
failed send cannot be seen from its result. The handler therefore checks that the socket accepts
a connection right before each send; if it does not, the record goes to stderr and the switch is
announced once per outage. Lines never vanish silently.

Encoding notes, also from pystemd's sender: ``str`` values are encoded as strict UTF-8 (which
fails on the surrogate-escaped bytes of an odd path) and each iovec's length is ``strlen`` (which
truncates at a NUL). So values are handed over as bytes, paths with ``os.fsencode``, and NULs are
escaped. Newlines in values are fine: ``sd_journal_sendv`` switches such a field to the native
protocol's binary form (name, newline, 64-bit little-endian length, raw bytes).

pystemd calls the ``sd_journal_sendv`` macro, not the plain function, so libsystemd appends
CODE_FILE/CODE_LINE/CODE_FUNC of pystemd's own C code after ours. journalctl then shows two
values for those fields; ours (the Python caller) come first.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TextIO

from calico_mount_reaper.printable import log_text

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "calico-mount-reaper"
LOGGER_NAME = "calico_mount_reaper"

# Stable IDs: journalctl MESSAGE_ID= filters and the catalog (systemd/calico-mount-reaper.catalog)
# key on them, so they are frozen here once and never regenerated.
MESSAGE_IDS: Mapping[str, str] = MappingProxyType(
    {
        "TARGET_APPEARED": "c9886f8e07524e91bcaa6896ffb6d6d0",
        "TARGET_GONE": "c99fc0e54feb4ea7a93c71770240c499",
        "REAPED": "339b1705c39742be8c8f7d2f43ccf1f0",
        "VERDICT": "e2414457ae514d029e5fd3907f5a9634",
        "REAP_REFUSED": "bd02ee495174465bb8e8f59b513dd0d3",
        "REAP_FAILED": "cfb6e1517d4442a6b710a7acd0ce505b",
        "BUSY": "705c0d44dd584085a6e1808f6d0f13fa",
        "DEGRADED": "908d64db8e664c138c73a7328ef78b86",
        "CONFIG_REJECTED": "68d4c517dbf341c194ab7f1e125db872",
        "STARTED": "ace0ca83904c4af5bebbdbbd42b1ed98",
        "STOPPING": "9969258d766d445ea9fc7d5ee1838def",
        "WRONG_NAMESPACE": "1874e544bea4434a82176c5620d4c9cc",
    }
)

# Fields the handler sets itself; an event() passing one would shadow or duplicate it.
_RESERVED = frozenset(
    {"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"}
    | {"CODE_FILE", "CODE_LINE", "CODE_FUNC"}
)
# journald silently drops fields whose names break these rules (journal_field_valid()).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

Sender = Callable[..., Any]


class Sink(enum.Enum):
    JOURNAL = "journal"
    PREFIXED = "prefixed"
    PLAIN = "plain"


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority (3 err, 4 warning, 6 info, 7 debug, 2 crit)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def printable(text: str) -> str:
    r"""Escape control characters, C1, undecodable bytes and other non-printables (printable.py),
    so one record stays one line and cannot drive the reader's terminal.

    A mount point may hold a newline; printed raw it could forge a second log line. The exact
    bytes travel in the MOUNT_POINT field; the human text shows ``\n`` / ``\xNN`` instead.
    """
    return log_text(text)


def field_name(key: str) -> str | None:
    """The journal field name for ``key`` (upper-cased), or None if journald would drop it."""
    name = key.upper()
    return name if _FIELD_NAME.fullmatch(name) else None


def field_value(value: object) -> bytes:
    """Bytes for the journal: paths byte-exact, ints in decimal, NULs escaped (see module doc)."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, (str, os.PathLike)):
        raw = os.fsencode(value)
    else:
        raw = os.fsencode(str(value))
    return raw.replace(b"\0", b"\\x00")


def render(record: logging.LogRecord) -> str:
    """The record's text: the escaped message, then any traceback and stack on their own lines."""
    text = printable(record.getMessage())
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        text += "\n" + record.exc_text
    if record.stack_info:
        text += "\n" + record.stack_info
    return text


def journal_fields(record: logging.LogRecord) -> dict[str, bytes]:
    """The fields of one journal entry: ours, then those of ``extra={"journal": {...}}``."""
    fields = {
        "MESSAGE": field_value(render(record)),
        "PRIORITY": field_value(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": field_value(SYSLOG_IDENTIFIER),
        "CODE_FILE": field_value(record.pathname),
        "CODE_LINE": field_value(record.lineno),
        "CODE_FUNC": field_value(record.funcName),
    }
    extra = getattr(record, "journal", None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            name = field_name(str(key))
            # event() rejects bad names loudly; a stray one in a hand-made extra is dropped here
            # rather than losing the whole record.
            if name is not None:
                fields[name] = field_value(value)
    return fields


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """One record per line: ``<N>message`` (sd-daemon prefixes) or ``level: message``."""

    def __init__(self, stream: TextIO, prefixed: bool) -> None:
        super().__init__(stream)
        self.prefixed = prefixed

    def format(self, record: logging.LogRecord) -> str:
        text = render(record)
        if self.prefixed:
            prefix = f"<{syslog_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{record.levelname.lower()}: {text}"


class JournalHandler(logging.Handler):
    """Structured entries to the journal socket; ``fallback`` takes any record it cannot send."""

    def __init__(
        self,
        fallback: logging.Handler,
        sender: Sender | None = None,
        socket_path: str = JOURNAL_SOCKET,
    ) -> None:
        super().__init__()
        self.fallback = fallback
        self.socket_path = socket_path
        self._sender = sender
        self._probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._outage_reported = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = [name.encode() + b"=" + value for name, value in journal_fields(record).items()]
        except Exception:  # a broken record (bad format args), not a journal problem
            self.handleError(record)  # prints it with a traceback to stderr, as logging does
            return
        try:
            # connect() on a datagram socket fails with ENOENT when the socket is gone and
            # ECONNREFUSED when nobody reads it: the failures pystemd's sendv would hide.
            self._probe.connect(self.socket_path)
            if self._sender is None:
                self._sender = load_sender()
            self._sender(*entry)
        except Exception as exc:  # any failure at all must reach stderr, not vanish
            self._fall_back(record, exc)
            return
        self._outage_reported = False

    def _fall_back(self, record: logging.LogRecord, exc: Exception) -> None:
        if not self._outage_reported:
            self._outage_reported = True
            self.fallback.handle(
                logging.makeLogRecord(
                    {
                        "name": record.name,
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": "cannot write to the journal at %s (%s); logging to stderr",
                        "args": (self.socket_path, exc),
                    }
                )
            )
        self.fallback.handle(record)

    def close(self) -> None:
        self._probe.close()
        self.fallback.close()
        super().close()


def load_sender() -> Sender:
    """pystemd's ``sendv``; imported lazily so that the CLI runs where pystemd is missing."""
    from pystemd.journal import sendv

    return sendv  # type: ignore[no-any-return]


def _sender_available() -> bool:
    try:
        load_sender()
    except ImportError:
        return False
    return True


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def is_journal_stream(fd: int, journal_stream: str | None) -> bool:
    """Whether ``fd`` is the stream systemd tied to the journal (``JOURNAL_STREAM=dev:ino``)."""
    if not journal_stream:
        return False
    try:
        dev, ino = (int(part) for part in journal_stream.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def choose_sink(
    stream: TextIO,
    environ: Mapping[str, str] = os.environ,
    socket_path: str = JOURNAL_SOCKET,
) -> Sink:
    """Where log lines go for this ``stream`` (see the module docstring for why)."""
    fd = _fileno(stream)
    if (
        fd is not None
        and is_journal_stream(fd, environ.get("JOURNAL_STREAM"))
        and _is_socket(socket_path)
        and _sender_available()
    ):
        return Sink.JOURNAL
    if fd is not None and os.isatty(fd):
        return Sink.PLAIN
    return Sink.PREFIXED


def setup(verbose: bool = False, stream: TextIO | None = None) -> logging.Logger:
    """Configure the package logger for the chosen sink and return it. Safe to call again.

    ``stream`` defaults to ``sys.stderr`` at call time (not import time), so a redirected
    stderr is honoured.
    """
    out = stream if stream is not None else sys.stderr
    sink = choose_sink(out)
    stderr_handler = StderrHandler(out, prefixed=sink is not Sink.PLAIN)
    handler: logging.Handler = (
        JournalHandler(stderr_handler) if sink is Sink.JOURNAL else stderr_handler
    )
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Our handler is the whole story: a root handler would print every line a second time.
    logger.propagate = False
    return logger


def event(
    logger: logging.Logger,
    name: str,
    message: str,
    *,
    level: int = logging.INFO,
    stacklevel: int = 1,
    **fields: object,
) -> None:
    """Log one catalogued event: MESSAGE_ID of ``name`` plus upper-cased ``fields``.

    ``event(log, "REAPED", "unmounted /run/calico/cgroup", mount_point=..., mount_id=42)``.
    CODE_FILE/LINE/FUNC point at the caller; a helper that wraps event() passes
    ``stacklevel=2`` so they point at *its* caller. A bad name or field is a programming error
    and raises here, at the call site, instead of leaving a hole in the journal.
    """
    if name not in MESSAGE_IDS:
        raise ValueError(f"unknown journal event {name!r}; known: {', '.join(MESSAGE_IDS)}")
    journal: dict[str, object] = {"MESSAGE_ID": MESSAGE_IDS[name]}
    for key, value in fields.items():
        field = field_name(key)
        if field is None or field in _RESERVED:
            raise ValueError(f"invalid journal field name {key!r} for event {name}")
        journal[field] = value
    logger.log(level, "%s", message, extra={"journal": journal}, stacklevel=stacklevel + 1)
