"""Security review checks that can be automated (SECURITY.md has the whole review)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

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
