"""journal.py against a real journal socket.

libsystemd's sender only ever talks to /run/systemd/journal/socket, so the tests that need a
journal run in a private mount namespace (tests/support/nsutil.py, fresh tmpfs over /run) and
bind a real AF_UNIX datagram socket there; the datagrams are parsed as journald would parse them
(the native protocol: ``KEY=value\\n``, or ``KEY\\n`` + 64-bit LE length + raw bytes + ``\\n``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from calico_mount_reaper import journal
from calico_mount_reaper.journal import (
    JOURNAL_SOCKET,
    MESSAGE_IDS,
    JournalHandler,
    Sink,
    StderrHandler,
    choose_sink,
    event,
)

from tests.support.nsutil import in_namespace

ODD_MOUNT_POINT = "/run/calico/a b\ncgroup"
UNDECODABLE = os.fsdecode(b"/run/calico/\xff\xfe")


def parse_native(data: bytes) -> list[tuple[str, bytes]]:
    """Split one native-protocol datagram into (name, value) pairs, in order."""
    fields, pos = [], 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            pos = end + 1
        else:  # binary form: the value may hold newlines
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields.append((name.decode(), value))
    return fields


def first_values(pairs: list[tuple[str, bytes]]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def _bind_journal() -> socket.socket:
    os.makedirs(os.path.dirname(JOURNAL_SOCKET), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(JOURNAL_SOCKET)
    sock.settimeout(5)
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    sock.settimeout(0.2)
    out = []
    try:
        while True:
            out.append(sock.recv(1 << 20))
    except socket.timeout:
        return out


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def _send_event() -> dict[str, Any]:
    sock = _bind_journal()
    err = io.StringIO()
    logger = _logger(JournalHandler(StderrHandler(err, prefixed=True)), "t.journal.event")
    fields: dict[str, Any] = {
        "mount_point": ODD_MOUNT_POINT,
        "MOUNT_ID": 42,
        "fstype": "cgroup2",
        "source": UNDECODABLE,
    }
    line = _line_of_next_event()
    event(logger, "REAPED", f"unmounted {ODD_MOUNT_POINT}", level=logging.WARNING, **fields)
    return {"raw": sock.recv(1 << 20), "stderr": err.getvalue(), "line": line}


def _line_of_next_event() -> int:
    import inspect

    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


def test_event_reaches_a_real_journal_socket_with_every_field() -> None:
    got = in_namespace(_send_event)
    pairs = parse_native(got["raw"])
    fields = first_values(pairs)
    # pystemd calls the sd_journal_sendv *macro*, so libsystemd appends the location of pystemd's
    # own C code after ours: CODE_* repeat, ours first. No other field may repeat.
    repeated = sorted({name for name, _ in pairs if [n for n, _ in pairs].count(name) > 1})
    assert repeated in ([], ["CODE_FILE", "CODE_FUNC", "CODE_LINE"])
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["REAPED"].encode()
    assert fields["SYSLOG_IDENTIFIER"] == b"calico-mount-reaper"
    assert fields["PRIORITY"] == b"4"
    # The exact bytes of the path survive, newline and space included, in the binary form.
    assert fields["MOUNT_POINT"] == b"/run/calico/a b\ncgroup"
    assert b"\nMOUNT_POINT\n" + struct.pack("<Q", len(ODD_MOUNT_POINT)) in got["raw"]
    assert fields["SOURCE"] == b"/run/calico/\xff\xfe"
    assert fields["MOUNT_ID"] == b"42"
    assert fields["FSTYPE"] == b"cgroup2"
    # The human text is one line: the newline is shown escaped.
    assert fields["MESSAGE"] == b"unmounted /run/calico/a b\\ncgroup"
    # CODE_* name the caller of event(), not journal.py.
    assert fields["CODE_FILE"] == __file__.encode()
    assert fields["CODE_FUNC"] == b"_send_event"
    assert fields["CODE_LINE"] == str(got["line"]).encode()
    assert got["stderr"] == ""


def _extra_and_traceback() -> dict[str, Any]:
    sock = _bind_journal()
    logger = _logger(JournalHandler(StderrHandler(io.StringIO(), True)), "t.journal.extra")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception(
            "pass failed",
            extra={
                "journal": {
                    "MESSAGE_ID": MESSAGE_IDS["REAP_FAILED"],
                    "result": "error",
                    "bad-name": "x",
                }
            },
        )
    return {"raw": sock.recv(1 << 20)}


def test_extra_fields_and_traceback_are_sent() -> None:
    fields = first_values(parse_native(in_namespace(_extra_and_traceback)["raw"]))
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["REAP_FAILED"].encode()
    assert fields["RESULT"] == b"error"
    assert fields["PRIORITY"] == b"3"
    assert not any(name.startswith("BAD") for name in fields)
    message = fields["MESSAGE"].decode()
    assert message.startswith("pass failed\nTraceback")
    assert "RuntimeError: boom" in message


def _outages() -> dict[str, Any]:
    err = io.StringIO()
    logger = _logger(JournalHandler(StderrHandler(err, prefixed=True)), "t.journal.outage")
    received: list[bytes] = []

    logger.info("before the journal exists")  # ENOENT
    logger.warning("still no journal")
    sock = _bind_journal()
    logger.info("journal is up")
    received += _drain(sock)
    sock.close()  # the socket file stays, nobody reads it: ECONNREFUSED
    logger.error("journal died")
    os.unlink(JOURNAL_SOCKET)
    logger.info("journal socket gone")
    sock = _bind_journal()
    logger.info("journal is back")
    received += _drain(sock)
    return {"stderr": err.getvalue(), "received": received}


def test_unreachable_journal_falls_back_to_stderr_and_says_so_once_per_outage() -> None:
    got = in_namespace(_outages)
    messages = [first_values(parse_native(raw))["MESSAGE"] for raw in got["received"]]
    assert messages == [b"journal is up", b"journal is back"]
    lines = got["stderr"].splitlines()
    assert lines == [
        f"<4>cannot write to the journal at {JOURNAL_SOCKET} "
        f"([Errno 2] No such file or directory); logging to stderr",
        "<6>before the journal exists",
        "<4>still no journal",
        f"<4>cannot write to the journal at {JOURNAL_SOCKET} "
        f"([Errno 111] Connection refused); logging to stderr",
        "<3>journal died",
        "<6>journal socket gone",
    ]


def _setup_under_systemd() -> dict[str, Any]:
    sock = _bind_journal()
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    stream = os.fdopen(write_fd, "w")
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    logger = journal.setup(verbose=False, stream=stream)
    sinks = [type(h).__name__ for h in logger.handlers]
    logging.getLogger("calico_mount_reaper.daemon").info("hello from a module")
    logging.getLogger("calico_mount_reaper.daemon").debug("not without --verbose")
    stream.close()
    with os.fdopen(read_fd) as r:
        stderr = r.read()
    return {"sinks": sinks, "received": _drain(sock), "stderr": stderr}


def test_setup_under_systemd_logs_module_records_to_the_journal() -> None:
    got = in_namespace(_setup_under_systemd)
    assert got["sinks"] == ["JournalHandler"]
    messages = [first_values(parse_native(r))["MESSAGE"] for r in got["received"]]
    assert messages == [b"hello from a module"]
    assert got["stderr"] == ""


def _sink_with_socket(stream_matches: bool) -> str:
    _bind_journal()
    _, write_fd = os.pipe()
    _, other_fd = os.pipe()  # both ends of one pipe share an inode: take another pipe
    st = os.fstat(write_fd if stream_matches else other_fd)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with os.fdopen(write_fd, "w") as stream:
        return choose_sink(stream, env).value


def test_journal_only_when_stderr_is_the_journal_stream() -> None:
    assert in_namespace(_sink_with_socket, True) == Sink.JOURNAL.value
    # A pipe someone else reads (an installer capturing our output) keeps the lines.
    assert in_namespace(_sink_with_socket, False) == Sink.PREFIXED.value


def test_no_journal_socket_means_prefixed_stderr(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    st = os.fstat(write_fd)
    with os.fdopen(write_fd, "w") as stream:
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert choose_sink(stream, env, str(tmp_path / "no-socket")) is Sink.PREFIXED
    os.close(read_fd)


def test_a_terminal_gets_plain_lines() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        assert choose_sink(tty, {}) is Sink.PLAIN
        logger = _logger(StderrHandler(tty, prefixed=False), "t.journal.tty")
        logger.warning("in use by calico-node (pid %d)", 4242)
    assert os.read(master, 4096).replace(b"\r\n", b"\n") == (
        b"warning: in use by calico-node (pid 4242)\n"
    )
    os.close(master)


def test_a_stream_without_fileno_gets_prefixed_lines() -> None:
    assert choose_sink(io.StringIO(), {}) is Sink.PREFIXED


def test_prefixed_lines_keep_one_record_per_line() -> None:
    err = io.StringIO()
    logger = _logger(StderrHandler(err, prefixed=True), "t.journal.prefix")
    event(logger, "TARGET_APPEARED", f"target {ODD_MOUNT_POINT}", mount_point=ODD_MOUNT_POINT)
    logger.debug("bytes %s", UNDECODABLE)
    try:
        raise OSError(16, "Device or resource busy")
    except OSError:
        logger.critical("umount failed", exc_info=True)
    lines = err.getvalue().splitlines()
    assert lines[0] == "<6>target /run/calico/a b\\ncgroup"
    assert lines[1] == "<7>bytes /run/calico/\\xff\\xfe"
    assert lines[2] == "<2>umount failed"
    assert lines[3] == "<2>Traceback (most recent call last):"
    assert all(line.startswith("<2>") for line in lines[3:])
    assert lines[-1] == "<2>OSError: [Errno 16] Device or resource busy"


class FieldsHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, bytes]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.fields.append(journal.journal_fields(record))


def _wrapped_event(logger: logging.Logger) -> None:
    event(logger, "STARTED", "via a helper", stacklevel=2)


def test_stacklevel_lets_a_helper_point_code_fields_at_its_caller() -> None:
    handler = FieldsHandler()
    logger = _logger(handler, "t.journal.stacklevel")
    line = _line_of_next_event()
    _wrapped_event(logger)
    (fields,) = handler.fields
    assert fields["CODE_FUNC"] == b"test_stacklevel_lets_a_helper_point_code_fields_at_its_caller"
    assert fields["CODE_LINE"] == str(line).encode()
    assert "STACKLEVEL" not in fields


def test_event_rejects_unknown_names_and_bad_fields() -> None:
    logger = _logger(StderrHandler(io.StringIO(), True), "t.journal.bad")
    with pytest.raises(ValueError, match="unknown journal event"):
        event(logger, "NOPE", "x")
    with pytest.raises(ValueError, match="invalid journal field"):
        event(logger, "REAPED", "x", **{"mount-point": "/run/calico"})
    with pytest.raises(ValueError, match="invalid journal field"):
        event(logger, "REAPED", "x", _pid=1)
    with pytest.raises(ValueError, match="invalid journal field"):
        event(logger, "REAPED", "x", message_id="0" * 32)


def test_message_ids_are_stable_distinct_128_bit_ids() -> None:
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    for value in MESSAGE_IDS.values():
        assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert set(MESSAGE_IDS) == {
        "TARGET_APPEARED",
        "TARGET_GONE",
        "VERDICT",
        "REAPED",
        "REAP_REFUSED",
        "REAP_FAILED",
        "BUSY",
        "DEGRADED",
        "CONFIG_REJECTED",
        "STARTED",
        "STOPPING",
        "WRONG_NAMESPACE",
    }


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """setup() configures the process-wide package logger: put it back for the other tests."""
    logger = logging.getLogger(journal.LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_setup_is_idempotent_and_does_not_propagate(package_logger: logging.Logger) -> None:
    err = io.StringIO()
    journal.setup(stream=err)
    logger = journal.setup(verbose=True, stream=err)
    logging.getLogger("calico_mount_reaper.x").debug("once")
    assert err.getvalue() == "<7>once\n"
    assert logger.propagate is False


CATALOG = Path(__file__).resolve().parent.parent / "systemd" / "calico-mount-reaper.catalog"


def parse_catalog(text: str) -> dict[str, dict[str, str]]:
    """``-- <id>`` blocks (journalctl(1) catalog format) -> id -> headers, plus "body"."""
    entries: dict[str, dict[str, str]] = {}
    for block in re.split(r"^-- ", text, flags=re.M)[1:]:
        first, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n\n")
        entry = dict(line.split(": ", 1) for line in head.splitlines())
        entry["body"] = body.strip()
        assert first not in entries, f"{first} defined twice"
        entries[first] = entry
    return entries


def test_every_message_id_has_a_catalog_entry_and_no_other() -> None:
    entries = parse_catalog(CATALOG.read_text())
    assert set(entries) == set(MESSAGE_IDS.values())
    for message_id, entry in entries.items():
        assert entry["Defined-By"] == "calico-mount-reaper", message_id
        assert entry["Subject"] and entry["Support"], message_id
        assert len(entry["body"]) > 80, f"{message_id}: say what happened and what to do"


def test_journalctl_accepts_the_catalog(tmp_path: Path) -> None:
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl is not installed: only the parser above checked the catalog")
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    update = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True
    )
    assert (update.returncode, update.stderr) == (0, "")
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ids = {line.split(" ", 1)[0] for line in listed}
    assert ids == set(MESSAGE_IDS.values())
    assert all(line.split(" ", 1)[1].startswith("calico-mount-reaper: ") for line in listed)


def test_catalog_names_fields_as_substitutions_never_as_empty_assignments() -> None:
    # journalctl -x replaces @FIELD@ with the entry's value; a bare "MOUNT_ID=" prints as is,
    # which reads as an empty field.
    entries = parse_catalog(CATALOG.read_text())
    for message_id, entry in entries.items():
        text = entry["Subject"] + "\n" + entry["body"]
        bare = re.findall(r"\b[A-Z][A-Z0-9_]{2,}=(?=[\s,.;:)]|$)", text)
        assert not bare, f"{message_id}: write @{bare[0][:-1]}@, not {bare[0]}"
        for name in re.findall(r"@([^@\s]+)@", text):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"{message_id}: @{name}@"
