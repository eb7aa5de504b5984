"""`calico-mount-reaper install-units`: the systemd files of a pip install, put where systemd looks.

The man page goes along (to /usr/local/share/man), since the unit's Documentation= names it.

A distro package ships the files in systemd/ as they are (the command at /usr/bin). A pip install
has the same files as package data (``data/`` is a symlink to the repository's systemd/, so there
is one copy to edit) but its command lives elsewhere, usually /usr/local/bin. This module writes
them under /usr/local/lib/systemd, the place systemd reads for locally installed software, with
the command's real path, so that /etc stays the operator's (``systemctl edit`` overrides win).

Idempotent: a file whose content is already right is not rewritten, and a drop-in that the
config no longer calls for is removed. Every file written, and every directory created for one, is
recorded with its SHA-256 in a manifest, so that `uninstall-units` can undo exactly that, and
refuse to remove a file that someone has changed (or put there) since.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from calico_mount_reaper.config import DEFAULT_PATH, Config, load, load_file, resolve_path
from calico_mount_reaper.targets import BUILTIN_RULES
from calico_mount_reaper.unitname import mount_unit

DATA = Path(__file__).resolve().parent / "data"
# The man page generated from the CLI's parser (packaging/manpage); the unit's Documentation=.
MAN_PAGE = Path(__file__).resolve().parent / "man" / "calico-mount-reaper.8"
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
# man(1) searches /usr/local/share/man: Documentation=man:calico-mount-reaper(8) works for pip too.
MAN_PATH = "usr/local/share/man/man8/calico-mount-reaper.8"
# What install-units wrote and created, for uninstall-units. Outside systemd's directories, which
# hold only what systemd reads.
MANIFEST = "usr/local/lib/calico-mount-reaper/installed-units.json"
# Where `systemctl enable` puts the unit's links (one per WantedBy= target): uninstalling under
# them would leave them dangling.
ENABLE_LINKS = "etc/systemd/system/*.wants"


# Bytes that need no quoting in a unit file's command line; anything else goes in double quotes.
_PLAIN_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:,@=")


def unit_word(arg: str) -> str:
    """``arg`` as one word of an ``ExecStart=`` line, read back by systemd exactly as given.

    systemd splits on whitespace, honours double quotes with C escapes, and expands ``%``
    specifiers and ``$`` variables even inside quotes: those are doubled (systemd.service(5),
    "Command lines").
    """
    if arg and set(arg) <= _PLAIN_WORD:
        return arg
    out = []
    for c in arg:
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c in ("%", "$"):
            out.append(c + c)
        elif not c.isprintable() and ord(c) < 128:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def command_line(command: str, config_path: str | None) -> str:
    """The command the units run, with ``--config`` when the node's config is not the default."""
    if config_path is None:
        return command
    return f"{command} --config {unit_word(os.path.abspath(config_path))}"


def render(text: str, command_line: str) -> str:
    """A shipped file with the distro's command path replaced by ``command_line``."""
    return text.replace(PACKAGED_COMMAND, command_line)


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


def planned(
    config: Config, command: str, config_path: str | None = None, data: Path = DATA
) -> dict[str, str | None]:
    """Relative path under the root -> content (None: must not exist)."""
    line = command_line(command, config_path)
    return {
        f"{UNIT_DIR}/{UNIT}": render((data / UNIT).read_text(), line),
        f"{UNIT_DIR}/{KUBELET_DROPIN}": render((data / KUBELET_DROPIN).read_text(), line),
        f"{UNIT_DIR}/{CUSTOM_DROPIN}": custom_targets_dropin(config),
        f"{PRESET_DIR}/{PRESET}": (data / PRESET).read_text(),
        f"{CATALOG_DIR}/{CATALOG}": (data / CATALOG).read_text(),
        MAN_PATH: MAN_PAGE.read_text(),
    }


@dataclass
class Manifest:
    """What install-units wrote (relative path -> SHA-256) and the directories it created."""

    files: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, root: Path) -> Manifest:
        try:
            data = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            return cls()
        return cls(files=dict(data["files"]), dirs=list(data["dirs"]))

    def write(self, root: Path) -> None:
        path = root / MANIFEST
        self.dirs += [d for d in _make_parents(root, path) if d not in self.dirs]
        text = json.dumps({"files": self.files, "dirs": self.dirs}, indent=1, sort_keys=True)
        if not (path.is_file() and path.read_text() == text + "\n"):  # idempotent, as the units
            _write_atomically(path, text + "\n")

    def owns(self, root: Path, rel: str) -> bool:
        """True when the file at ``rel`` is still exactly the one install-units wrote there."""
        path = root / rel
        if path.is_symlink() or not path.is_file():
            return False
        return self.files.get(rel) == _digest(path.read_bytes())


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _make_parents(root: Path, path: Path) -> list[str]:
    """Create the missing directories above ``path``; return them (relative), outermost first."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        d.mkdir(mode=0o755)
        d.chmod(0o755)  # whatever the umask: systemd and journalctl read these as any user
    # The root itself (an image directory made for the occasion) is the caller's to remove.
    return [str(d.relative_to(root)) for d in reversed(missing) if d != root]


def _write_atomically(path: Path, content: str) -> None:
    # Written beside and renamed: systemd never reads half a unit.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(content)
    partial.chmod(0o644)
    partial.replace(path)


@dataclass
class Result:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # Left alone: changed (or put there) by someone else since install-units wrote it.
    refused: list[str] = field(default_factory=list)
    catalog: str = ""  # what happened to the journal's catalog database


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def install(
    root: Path,
    config: Config,
    command: str,
    run: Runner | None = None,
    data: Path = DATA,
    config_path: str | None = None,
) -> Result:
    """Write the files under ``root``; update the catalog database when ``root`` is the system."""
    result, manifest = Result(), Manifest.read(root)
    for rel, content in planned(config, command, config_path, data).items():
        target = root / rel
        if content is None:
            if manifest.owns(root, rel):
                target.unlink()
                del manifest.files[rel]
                result.removed.append(f"/{rel}")
            elif target.exists():
                result.refused.append(f"/{rel}")
            continue
        manifest.files[rel] = _digest(content.encode())
        if target.is_file() and not target.is_symlink() and target.read_text() == content:
            result.unchanged.append(f"/{rel}")
            continue
        manifest.dirs += _make_parents(root, target)
        _write_atomically(target, content)
        result.written.append(f"/{rel}")
    manifest.write(root)
    result.catalog = _update_catalog(root, run or _run)
    return result


class StillEnabled(Exception):
    """uninstall-units would leave `systemctl enable`'s links dangling: disable first."""


def uninstall(root: Path, run: Runner | None = None) -> Result:
    """Remove what install-units recorded, and nothing else; keep what others changed."""
    # The links point at our unit, which may be gone already: lexists, not glob's exists.
    links = sorted(p / UNIT for p in root.glob(ENABLE_LINKS) if os.path.lexists(p / UNIT))
    if links:
        raise StillEnabled(", ".join(f"/{p.relative_to(root)}" for p in links))
    result, manifest = Result(), Manifest.read(root)
    if not (root / MANIFEST).exists():
        return result
    for rel in sorted(manifest.files):
        target = root / rel
        if manifest.owns(root, rel):
            target.unlink()
            del manifest.files[rel]
            result.removed.append(f"/{rel}")
        elif target.exists() or target.is_symlink():
            result.refused.append(f"/{rel}")
        else:
            del manifest.files[rel]  # already gone: nothing to undo
    if manifest.files:  # keep the record of what is left, so a rerun can finish the job
        manifest.write(root)
    else:
        (root / MANIFEST).unlink()
        for rel in sorted(manifest.dirs, key=lambda d: d.count("/"), reverse=True):
            with contextlib.suppress(FileNotFoundError, OSError):
                (root / rel).rmdir()  # only when empty: something else may live there now
    if result.removed:
        result.catalog = _update_catalog(root, run or _run)
    return result


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def _update_catalog(root: Path, run: Runner) -> str:
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


def node_config_path(explicit: str | None, root: Path) -> str | None:
    """The config file the units must name: the one given (or in the environment), if any.

    The default file is found by the daemon without help, so it is not named.
    """
    if explicit is None and root.resolve() != Path("/"):
        return None  # the image's own default file (load_config)
    path = resolve_path(explicit, os.environ)
    return None if path is None or path == DEFAULT_PATH else path
