"""`calico-mount-reaper install-units`: the systemd files of a pip install, put where systemd looks.

A distro package ships the files in systemd/ as they are (the command at /usr/bin). A pip install
has the same files as package data (``data/`` is a symlink to the repository's systemd/, so there
is one copy to edit) but its command lives elsewhere, usually /usr/local/bin. This module writes
them under /usr/local/lib/systemd, the place systemd reads for locally installed software, with
the command's real path, so that /etc stays the operator's (``systemctl edit`` overrides win).

Idempotent: a file whose content is already right is not rewritten, and a drop-in that the
config no longer calls for is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calico_mount_reaper.config import DEFAULT_PATH, Config, load, load_file
from calico_mount_reaper.targets import BUILTIN_RULES
from calico_mount_reaper.unitname import mount_unit

DATA = Path(__file__).resolve().parent / "data"
UNIT = "calico-mount-reaper.service"
KUBELET_DROPIN = "kubelet.service.d/50-calico-mount-reaper.conf"
PRESET = "90-calico-mount-reaper.preset"
CATALOG = "calico-mount-reaper.catalog"
# The drop-in ordering the reaper after the mount units of custom target paths.
CUSTOM_DROPIN = f"{UNIT}.d/60-custom-targets.conf"
# The command as the shipped files name it (the distro package's path).
PACKAGED_COMMAND = "/usr/bin/calico-mount-reaper"

PREFIX = "usr/local/lib/systemd"
UNIT_DIR = f"{PREFIX}/system"
PRESET_DIR = f"{PREFIX}/system-preset"
CATALOG_DIR = f"{PREFIX}/catalog"


def render(text: str, command: str) -> str:
    """A shipped file with the distro's command path replaced by ``command``."""
    return text.replace(PACKAGED_COMMAND, command)


def custom_targets_dropin(config: Config) -> str | None:
    """``After=`` for the mount units of configured target paths the shipped unit does not name.

    Stop order is the reverse of start order: this makes the final reap at shutdown run before
    PID 1 unmounts those paths itself (which would leave the reaper nothing to decide).
    """
    units = sorted({mount_unit(r.prefix) for r in config.rules if r not in BUILTIN_RULES})
    if not units:
        return None
    return (
        f"# Written by `calico-mount-reaper install-units` from {config.source}.\n"
        "# Rerun it after changing the [[target]] tables.\n"
        "[Unit]\n" + "".join(f"After={u}\n" for u in units)
    )


def planned(config: Config, command: str, data: Path = DATA) -> dict[str, str | None]:
    """Relative path under the root -> content (None: must not exist)."""
    return {
        f"{UNIT_DIR}/{UNIT}": render((data / UNIT).read_text(), command),
        f"{UNIT_DIR}/{KUBELET_DROPIN}": render((data / KUBELET_DROPIN).read_text(), command),
        f"{UNIT_DIR}/{CUSTOM_DROPIN}": custom_targets_dropin(config),
        f"{PRESET_DIR}/{PRESET}": (data / PRESET).read_text(),
        f"{CATALOG_DIR}/{CATALOG}": (data / CATALOG).read_text(),
    }


@dataclass
class Result:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    catalog: str = ""  # what happened to the journal's catalog database


def install(
    root: Path,
    config: Config,
    command: str,
    run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] | None = None,
    data: Path = DATA,
) -> Result:
    """Write the files under ``root``; update the catalog database when ``root`` is the system."""
    result = Result()
    for rel, content in planned(config, command, data).items():
        target = root / rel
        if content is None:
            if target.exists():
                target.unlink()
                result.removed.append(f"/{rel}")
            continue
        if target.is_file() and target.read_text() == content:
            result.unchanged.append(f"/{rel}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # Written beside and renamed: systemd never reads half a unit.
        partial = target.with_name(f".{target.name}.partial")
        partial.write_text(content)
        partial.chmod(0o644)
        partial.replace(target)
        result.written.append(f"/{rel}")
    result.catalog = _update_catalog(root, run or _run)
    return result


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _update_catalog(
    root: Path, run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]]
) -> str:
    if root.resolve() != Path("/"):
        return "not updated (--root): run 'journalctl --update-catalog' on the node itself"
    if shutil.which("journalctl") is None:
        return "not updated: journalctl not found"
    done = run(["journalctl", "--update-catalog"])
    if done.returncode != 0:
        return f"update failed: {done.stderr.strip() or done.returncode}"
    return "updated (journalctl -x now explains each entry)"


def find_command(argv0: str = sys.argv[0]) -> str:
    """The absolute path of the ``calico-mount-reaper`` command that systemd should run.

    The one this process was started as, when it was; else the one on PATH (pip puts it in
    /usr/local/bin, or the venv's bin). Under ``python -m`` with neither, the interpreter runs
    the module, which works from anywhere.
    """
    if os.path.basename(argv0) == "calico-mount-reaper" and os.sep in argv0:
        return os.path.abspath(argv0)
    found = shutil.which("calico-mount-reaper")
    if found:
        return os.path.abspath(found)
    return f"{sys.executable} -m calico_mount_reaper"


def load_config(explicit: str | None, root: Path) -> Config:
    """--config; else, for another root (an image being built), that root's own config file."""
    image_config = root / DEFAULT_PATH.lstrip("/")
    if explicit is None and root.resolve() != Path("/") and image_config.exists():
        return load_file(str(image_config))
    return load(explicit)


def main(root: str, config_path: str | None) -> int:
    """The `install-units` command. ConfigError is left to the CLI (exit 78, file and key)."""
    base = Path(root)
    config = load_config(config_path, base)
    command = find_command()
    result = install(base, config, command)
    where = "" if base.resolve() == Path("/") else f" under {base}"
    print(f"calico-mount-reaper units for {command}{where}:")
    for label, paths in (
        ("wrote", result.written),
        ("unchanged", result.unchanged),
        ("removed", result.removed),
    ):
        for p in paths:
            print(f"  {label:9} {p}")
    print(f"  catalog   {result.catalog}")
    if base.resolve() == Path("/"):
        print("Now run: systemctl daemon-reload && systemctl enable --now calico-mount-reaper")
    else:
        print("On the node: systemctl daemon-reload && systemctl enable --now calico-mount-reaper")
    return 0
