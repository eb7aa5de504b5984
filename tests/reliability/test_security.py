"""Security review checks that can be automated (SECURITY.md has the whole review)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "daemon" / "calico_mount_reaper"
# Modules that may start programs at all, and why (each call must be an argv list, no shell).
MAY_EXEC = {
    "demo.py": "rm -rf inside its own throwaway sandbox",
    "install.py": "systemctl/daemon-reload during installation",
}


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else ""


def test_no_shell_outs_in_the_package() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree):
            name = _name(call)
            if (
                name in ("os.system", "os.popen")
                or name.startswith("os.exec")
                or any(k.arg == "shell" for k in call.keywords)
            ):
                bad.append(f"{path.name}:{call.lineno} {name}")
            elif name.startswith("subprocess.") and path.name not in MAY_EXEC:
                bad.append(f"{path.name}:{call.lineno} {name} (not an allowed module)")
            elif (
                name.startswith("subprocess.")
                and call.args
                and isinstance(call.args[0], (ast.JoinedStr, ast.Constant, ast.BinOp))
            ):
                bad.append(f"{path.name}:{call.lineno} {name} with a string command")
    assert bad == []


HOSTILE = "/run/calico/esc\x1b[31mred\ttab\nnl\x7f\\bs \xe9"


def test_json_output_escapes_control_characters() -> None:
    script = (
        f'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -p "$P" && mount -t cgroup2 none "$P"'
        f" && exec {sys.executable} -m calico_mount_reaper status --json"
    )
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        env={**os.environ, "P": HOSTILE},
        timeout=60,
    )
    text = out.stdout.decode("ascii")  # ensure_ascii: anything else would fail here
    assert not any(ord(c) < 0x20 and c not in "\n " for c in text), text
    assert "\x1b" not in text and "\x7f" not in text
    points = json.dumps(json.loads(text))  # valid JSON, and it names the hostile path exactly
    assert json.dumps(HOSTILE)[1:-1] in points


# ---- finding 4: nothing unprintable reaches a terminal or a log line ----------------------------

# C0 (ESC, newline), DEL, C1 as a character (U+009B, CSI), C1 as a raw byte that is not UTF-8
# (0x9b, CSI on 8-bit terminals), a bidi override: each in a mount point of its own.
HOSTILE_NAMES = (
    b"esc\x1b[2Jnl\nend",
    b"del\x7f",
    "c1\u009bchar".encode(),
    b"raw\x9b\xff\xfebytes",
    "bidi\u202eoverride".encode(),
)


def _unprintable(text: str) -> list[str]:
    return [c for c in text if not c.isprintable() and c != "\n"]


def test_display_path_and_log_text_leave_nothing_unprintable() -> None:
    from calico_mount_reaper.printable import display_path, log_text

    every = "".join(chr(c) for c in range(1, 0x250)) + os.fsdecode(bytes(range(0x80, 0x100)))
    every += "\u200e\u2028\u202e\U000e0001"
    assert _unprintable(display_path(every)) == []
    assert " " not in display_path(every)  # one token in a table column
    assert _unprintable(log_text(every).replace("\n", "")) == [] and "\n" not in log_text(every)
    assert display_path(os.fsdecode(b"/run/a b\x9b")) == "/run/a\\040b\\233"
    assert log_text(os.fsdecode(b"x\x9b\n") + "\u009b") == "x\\x9b\\n\\x9b"


def test_human_status_output_escapes_c1_raw_bytes_and_controls() -> None:
    script = "mount -t tmpfs -o mode=755 tmpfs /run"
    env = {**os.environ}
    for i, name in enumerate(HOSTILE_NAMES):
        env[f"P{i}"] = os.fsdecode(b"/run/calico/" + name)
        script += f' && mkdir -p "$P{i}" && mount -t cgroup2 none "$P{i}"'
    script += f" && exec {sys.executable} -m calico_mount_reaper status"
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        env={k: os.fsencode(v) for k, v in env.items()},  # type: ignore[misc]
        timeout=60,
    )
    assert out.returncode in (0, 1), out.stderr  # a report, not a crash
    text = out.stdout.decode("utf-8")  # strict: no raw byte that is not UTF-8 gets out
    assert _unprintable(text) == [], text
    assert "\\233" in text and "c1\\302\\233char" not in text  # 0x9b byte and U+009B, escaped
    assert text.count("/run/calico/") == len(HOSTILE_NAMES), text


# ---- finding 3: config trust as strict as sshd's StrictModes ----------------------------------

NOGROUP = 65534


def _config_in(directory: Path, mode: int = 0o644, gid: int = 0) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text("grace_period = 1\n")
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return str(path)


def _refusal(path: str) -> str:
    from calico_mount_reaper.config import ConfigError, load_file

    with pytest.raises(ConfigError) as info:
        load_file(path)
    return str(info.value)


def test_a_config_writable_by_a_non_root_group_is_refused(tmp_path: Path) -> None:
    path = _config_in(tmp_path / "etc", mode=0o664, gid=NOGROUP)
    message = _refusal(path)
    assert message.startswith(path) and f"chmod g-w {path}" in message


def test_a_group_writable_config_of_group_root_is_accepted(tmp_path: Path) -> None:
    from calico_mount_reaper.config import load_file

    assert load_file(_config_in(tmp_path / "etc", mode=0o664, gid=0)).grace_period == 1


@pytest.mark.parametrize(
    ("setup", "fix"),
    [
        (lambda d: os.chown(d, 12345, -1), "chown root"),
        (lambda d: os.chmod(d, 0o777), "chmod o-w"),
        (lambda d: (os.chown(d, 0, NOGROUP), os.chmod(d, 0o775)), "chmod g-w"),
    ],
    ids=["dir-owned-by-a-user", "dir-world-writable", "dir-group-writable"],
)
def test_a_config_in_a_directory_others_may_write_is_refused(
    tmp_path: Path, setup: Callable[[Path], object], fix: str
) -> None:
    # The weak directory is one level above the file's own: every directory on the path counts.
    weak = tmp_path / "weak"
    path = _config_in(weak / "etc")
    setup(weak)
    message = _refusal(path)
    assert message.startswith(path) and f"{fix} {weak}" in message, message


def test_a_sticky_directory_is_accepted_only_above_an_entry_root_owns(tmp_path: Path) -> None:
    from calico_mount_reaper.config import load_file

    sticky = tmp_path / "sticky"
    path = _config_in(sticky / "etc")
    os.chmod(sticky, 0o1777)  # like /tmp: others may create, but not rename root's entries
    assert load_file(path).grace_period == 1
    os.chown(sticky / "etc", 12345, -1)  # now that user could swap the config under it
    assert "chown root" in _refusal(path)
