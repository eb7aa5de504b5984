"""Boot a real systemd as PID 1 in systemd-nspawn, one fresh overlay per scenario.

The host's PID 1 is not systemd, so nothing hands out cgroups or a machine registry: the harness
creates its own cgroup subtree per run and passes ``--register=no --keep-unit``. Every mount it
needs (a tmpfs over ``/run/systemd/nspawn``, the overlay) is made by a shell that runs inside
``unshare -m --propagation private``; the host's mount table is never touched, and the kernel
drops those mounts when nspawn exits.

Layers:
- `ensure_rootfs_tarball`: debootstrap'd Debian bookworm, cached as a zstd tarball (one build per
  machine, serialised with flock); `restore_rootfs` unpacks it into the read-only lower layer.
- `build_payload`: the project from the checkout, installed with pip ``--target`` into a tree
  that is laid over the guest's ``/usr/local`` (the package is pure Python, so one built by the
  host's CPython 3.11 runs on trixie's 3.13 too, under that interpreter's site directory; its
  dependencies come from Debian inside the rootfs).
- `boot`: one `Container` on a fresh overlay (lower = rootfs, upper/work per run).

Nothing here knows the reaper's internals: it installs the package and lets scenarios add files.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, Union

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
GUEST_PYTHON = "python3.11"
# The reaper runs on the distro's Python bindings (the oldest versions it must support), not on
# the newer ones pip put on the host.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "python3",
    "python3-pystemd",
    "python3-pyudev",
    "python3-sdnotify",
    "iproute2",
    "util-linux",
)
# Bump when the build recipe changes in a way the package list does not show.
ROOTFS_RECIPE_VERSION = 1
DEFAULT_CACHE_DIR = "/var/cache/calico-mount-reaper-e2e"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_PREFIX = "cmr-e2e-"  # + "<pytest pid>-<run>": a leftover names its owner

ENTRY_SCRIPT = """#!/usr/bin/python3
# Installed by the e2e harness from the checkout (pip's own script would name the host's python).
import sys

from calico_mount_reaper.cli import main

sys.exit(main())
"""

# A stand-in kubelet for scenarios: a long-running service whose stop is visible in the journal.
DUMMY_KUBELET_UNIT = """[Unit]
Description=Dummy kubelet (e2e stand-in)

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""

# Collected across the session and printed by conftest's terminal summary.
TIMINGS: dict[str, list[float]] = {}


def record(name: str, seconds: float) -> None:
    TIMINGS.setdefault(name, []).append(seconds)


class Unavailable(Exception):
    """This machine cannot run the end-to-end tests (the message says why)."""


# --------------------------------------------------------------------------- prerequisites


def missing_prerequisites() -> list[str]:
    """What this machine lacks to boot a container (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("must run as root (systemd-nspawn, mounts and cgroups need it)")
    tools = ("systemd-nspawn", "unshare", "nsenter", "journalctl", "systemctl", "tar", "zstd")
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        missing.append(f"not found: {' '.join(absent)} (apt-get install systemd-container zstd)")
    if not cgroup2_roots():
        missing.append("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified")
    return missing


def cgroup2_roots() -> list[str]:
    """Hierarchies the per-run cgroup must exist in: cgroup2, plus name=systemd on hybrid hosts."""
    if _fstype("/sys/fs/cgroup") == "cgroup2":
        return ["/sys/fs/cgroup"]
    if _fstype("/sys/fs/cgroup/unified") == "cgroup2":
        roots = ["/sys/fs/cgroup/unified"]
        if _fstype("/sys/fs/cgroup/systemd") == "cgroup":
            roots.append("/sys/fs/cgroup/systemd")
        return roots
    return []


def _fstype(path: str) -> str | None:
    # The last entry for a mount point is the one on top.
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                found = fields[fields.index("-") + 1]
    return found


# --------------------------------------------------------------------------- rootfs


def parse_mirror(sources: Sequence[str], sources_list: str, suite: str = SUITE) -> str | None:
    """The Debian mirror the host's apt uses for ``suite``.

    ``sources`` are deb822 ``*.sources`` texts, ``sources_list`` the one-line format. A stanza for
    the suite itself wins over any other (the first URI of the security archive would not carry
    ``bookworm``), then the first URI at all.
    """
    candidates: list[tuple[bool, str]] = []
    for text in sources:
        for stanza in text.split("\n\n"):
            keys: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ", "\t")):
                    key, _, value = line.partition(":")
                    keys[key.strip().lower()] = value.strip()
            if "deb" in keys.get("types", "deb").split() and keys.get("uris"):
                suites = keys.get("suites", "").split()
                candidates.append((suite in suites, keys["uris"].split()[0]))
    for line in sources_list.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            rest = words[1:]
            if rest[0].startswith("["):  # options: [arch=amd64 signed-by=...]
                while rest and not rest[0].endswith("]"):
                    rest = rest[1:]
                rest = rest[1:]
            if len(rest) >= 2:
                candidates.append((rest[1] == suite, rest[0]))
    for preferred in (True, False):
        for matches, uri in candidates:
            if matches == preferred:
                return uri.rstrip("/")
    return None


def host_mirror() -> str:
    sources = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        sources.append(Path(path).read_text())
    listed = ""
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            listed += Path(path).read_text() + "\n"
    mirror = parse_mirror(sources, listed)
    if mirror is None:
        raise Unavailable("no Debian mirror in the host's apt config (/etc/apt/sources.list*)")
    return mirror


def cache_dir() -> Path:
    return Path(os.environ.get("CMR_E2E_CACHE") or DEFAULT_CACHE_DIR)


def rootfs_key(suite: str = SUITE, packages: Sequence[str] = PACKAGES) -> str:
    """Names the tarball after what went into it, so a changed package list rebuilds."""
    spec = f"{ROOTFS_RECIPE_VERSION} {suite} minbase {','.join(sorted(set(packages)))}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def ensure_rootfs_tarball(
    cache: Path | None = None,
    suite: str = SUITE,
    packages: Sequence[str] = PACKAGES,
    variant: str = "",
) -> Path:
    """Return the cached rootfs tarball, building it first if this machine has none.

    flock serialises concurrent pytest processes: the second one waits and then finds the
    tarball the first one renamed into place (the rename makes a half-written one invisible).
    ``suite`` is the Debian release (bookworm by default; trixie for Debian 13 with systemd 257),
    ``packages`` what goes into it; each combination is a tarball of its own. ``variant`` names a
    package set (e.g. "fleet" for sshd nodes) whose older builds may be replaced by a newer one,
    so that suites with different needs never evict each other's cache.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"rootfs-{suite}-{variant}-" if variant else f"rootfs-{suite}-"
    tarball = cache / f"{stem}{rootfs_key(suite, packages)}.tar.zst"
    with open(cache / "rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise Unavailable(f"no cached rootfs at {tarball} and debootstrap is not installed")
        mirror = host_mirror()  # the host's Debian mirror carries every suite
        _check_reachable(mirror, tarball, suite)
        started = time.monotonic()
        _build_tarball(mirror, tarball, suite, packages)
        record(f"rootfs cold build ({suite} {variant or 'default'})", time.monotonic() - started)
        # An older build of the same suite and variant (or default set); other package sets stay.
        if variant or packages is PACKAGES:
            for stale in cache.glob(f"{stem}{'?' * 12}.tar.zst"):
                if stale != tarball:
                    stale.unlink()
    return tarball


def _check_reachable(mirror: str, tarball: Path, suite: str = SUITE) -> None:
    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(
            f"no cached rootfs at {tarball}, and the host's apt mirror is unreachable for a cold "
            f"debootstrap ({url}: {exc})"
        ) from exc


def _build_tarball(
    mirror: str, tarball: Path, suite: str = SUITE, packages: Sequence[str] = PACKAGES
) -> None:
    build = Path(tempfile.mkdtemp(prefix="build.", dir=tarball.parent))
    partial = tarball.with_suffix(".partial")
    try:
        root = build / "rootfs"
        log = build / "debootstrap.log"
        with open(log, "w") as out:
            # debootstrap mounts /proc and /sys inside the target: in a private mount namespace,
            # so that those mounts never appear in (or leak into) the host's mount table.
            # debootstrap's own dependency handling copes with the default set only (lintian's
            # perl stack fails in its configure pass): anything more is apt's job, in a chroot.
            extra = [p for p in packages if p not in PACKAGES]
            base = [p for p in packages if p in PACKAGES]
            script = 'debootstrap --variant=minbase --include="$1" "$2" "$3" "$4"'
            if extra:
                script += (
                    ' && mount -t proc proc "$3/proc" && cp /etc/resolv.conf "$3/etc/resolv.conf"'
                    ' && chroot "$3" apt-get update -q'
                    ' && DEBIAN_FRONTEND=noninteractive chroot "$3" apt-get install -y -q'
                    ' --no-install-recommends $5 && chroot "$3" apt-get clean'
                )
            args = [",".join(base), suite, str(root), mirror, " ".join(extra)]
            done = subprocess.run(
                ["unshare", "-m", "--propagation", "private", "sh", "-ec", script, "sh", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if done.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n" + "\n".join(tail))
        # Downloaded .debs and package lists only make the tarball bigger: the guest never runs apt.
        leftovers = [*root.glob("var/cache/apt/archives/*.deb"), *root.glob("var/lib/apt/lists/*")]
        for leftover in leftovers:
            if leftover.is_file():
                leftover.unlink()
        subprocess.run(
            [
                "tar",
                "-C",
                str(root),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-I",
                "zstd -T0",
                "-cpf",
                str(partial),
                ".",
            ],
            check=True,
        )
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def lower_dir(fallback: Path, suite: str = SUITE, variant: str = "") -> Path:
    """Where this process restores its lower layer: in RAM when there is room, else ``fallback``.

    Unpacking 270 MB to this machine's disk costs ~3.5 s of kernel time against ~0.4 s on tmpfs.
    The directory is named after this process, so one left behind by a killed run is recognised
    by its dead owner and removed here.
    """
    shm = Path("/dev/shm")
    if _fstype(str(shm)) != "tmpfs" or shutil.disk_usage(shm).free < 2 * 1024**3:
        return fallback
    base = (
        "cmr-e2e-rootfs"
        + ("" if suite == SUITE else f"-{suite}")
        + (f"-{variant}" if variant else "")
    )
    for stale in shm.glob(f"{base}.*"):
        owner = stale.suffix.lstrip(".")
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return shm / f"{base}.{os.getpid()}"


def restore_rootfs(tarball: Path, dest: Path) -> Path:
    """Unpack the cached rootfs into ``dest`` (the shared, never-booted lower layer)."""
    started = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "tar",
            "-C",
            str(dest),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-I",
            "zstd",
            "-xpf",
            str(tarball),
        ],
        check=True,
    )
    if not (dest / "lib/systemd/systemd").exists():
        raise RuntimeError(f"{tarball} holds no systemd; delete it to rebuild")
    record("rootfs restore", time.monotonic() - started)
    return dest


# --------------------------------------------------------------------------- payload


def build_payload(dest: Path, repo: Path = REPO_ROOT, python: str = GUEST_PYTHON) -> Path:
    """Install the checkout into a tree laid over the guest's root.

    ``python`` names the guest's interpreter (``python3.13`` for trixie): the package is pure
    Python, so only the directory it goes into depends on it. The build runs on a copy, because
    an in-tree setuptools build writes build/ and egg-info into the checkout that other people
    are editing.
    """
    site = dest / f"usr/local/lib/{python}/dist-packages"
    with tempfile.TemporaryDirectory(prefix="cmr-src.") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(
            repo,
            src,
            symlinks=True,
            ignore=shutil.ignore_patterns(
                ".*",
                "tests",
                "build",
                "dist",
                "*.egg-info",
                "__pycache__",
            ),
        )
        isolation = ["--no-build-isolation"] if _can_build_offline() else []
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                *isolation,
                "--no-compile",
                "--disable-pip-version-check",
                "--target",
                str(site),
                str(src),
            ],
            check=True,
            env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"},
        )
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts pointing at the host python
    entry = dest / "usr/local/bin/calico-mount-reaper"
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(ENTRY_SCRIPT)
    entry.chmod(0o755)
    return dest


def _can_build_offline() -> bool:
    """Whether the host's setuptools can build a wheel by itself (it needs bdist_wheel).

    Otherwise pip builds in an isolated environment, fetching setuptools and wheel from PyPI.
    """
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(x) for x in version.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


# A file for the guest: text or bytes (mode 0755 when it starts with "#!", else 0644), or a host
# Path to a file or directory copied with its own modes.
FileSource = Union[str, bytes, Path]


def lay_files(upper: Path, lower: Path, files: Mapping[str, FileSource]) -> None:
    """Write guest files into the overlay's upper layer before it is mounted.

    Directories created on the way copy owner and mode from the lower layer, because the upper
    directory's attributes are what the merged view shows.
    """
    for guest_path, source in files.items():
        rel = Path(guest_path.lstrip("/"))
        _make_parents(upper, lower, rel)
        target = upper / rel
        if isinstance(source, Path):
            if source.is_dir():
                _make_dir(upper, lower, rel)
                for child in sorted(source.iterdir()):
                    lay_files(upper, lower, {f"/{rel / child.name}": child})
            else:
                shutil.copy2(source, target)
            continue
        data = source.encode() if isinstance(source, str) else source
        target.write_bytes(data)
        target.chmod(0o755 if data.startswith(b"#!") else 0o644)


def _make_parents(upper: Path, lower: Path, rel: Path) -> None:
    for parent in reversed(list(rel.parents)[:-1]):  # the last parent is "." (upper itself)
        _make_dir(upper, lower, parent)


def _make_dir(upper: Path, lower: Path, rel: Path) -> None:
    target = upper / rel
    if target.is_dir():
        return
    target.mkdir()
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(lower / rel)
        os.chown(target, st.st_uid, st.st_gid)
        target.chmod(st.st_mode & 0o7777)


# --------------------------------------------------------------------------- container

# Runs inside `unshare -m --propagation private`: every mount here dies with nspawn.
_INNER = r"""
set -euo pipefail
# Host /run is not what nspawn expects (no systemd there); a private tmpfs keeps nspawn's
# propagation and lock directories away from the host and from concurrent runs.
mkdir -p /run/systemd/nspawn
mount -t tmpfs -o mode=755 tmpfs /run/systemd/nspawn
mount -t overlay overlay \
    -o "lowerdir=$E2E_LOWER,upperdir=$E2E_RUN/upper,workdir=$E2E_RUN/work" "$E2E_RUN/merged"
if [ -n "$E2E_ENABLE" ]; then systemctl --quiet --root="$E2E_RUN/merged" enable $E2E_ENABLE; fi
for cg in $E2E_CGROUPS; do echo $$ > "$cg/cgroup.procs"; done
exec systemd-nspawn -D "$E2E_RUN/merged" "$@"
"""


class ContainerCommandError(subprocess.CalledProcessError):
    """A command inside the container failed; unlike the base class, it shows the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@dataclass
class Container:
    """A booted container; drive it with `run`, observe it with `mountinfo` and `journal`."""

    run_dir: Path
    process: subprocess.Popen[bytes]
    cgroups: list[str]
    leader: int = 0
    boot_state: str = ""
    exit_code: int | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def journal_dir(self) -> Path:
        return self.run_dir / "journal"

    @property
    def results_dir(self) -> Path:
        """Host side of the guest's /results, readable after poweroff."""
        return self.run_dir / "results"

    @property
    def console_log(self) -> str:
        return (self.run_dir / "console.log").read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a string for sh -c) in all of the container's namespaces.

        The process stays in the test's cgroup, but it is inside the container's PID namespace,
        so it dies with the container. The environment is the guest's, not pytest's.
        """
        if not self.running():
            raise RuntimeError(f"container is down (nspawn exited {self.process.returncode})")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        done = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *argv],
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input,
            env={"PATH": GUEST_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", **(env or {})},
        )
        if check and done.returncode != 0:
            raise ContainerCommandError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def mountinfo(self) -> str:
        """PID 1's mount table, as systemd inside sees it."""
        return Path(f"/proc/{self.leader}/mountinfo").read_text()

    def journal(self, *args: str) -> str:
        """Read the persisted journal from the host (works while running and after poweroff)."""
        dirs = [d for d in self.journal_dir.iterdir() if d.is_dir()]
        where = dirs[0] if len(dirs) == 1 else self.journal_dir
        done = subprocess.run(
            ["journalctl", "-D", str(where), "--no-pager", "-q", *args],
            text=True,
            capture_output=True,
            env={**os.environ, "SYSTEMD_PAGER": ""},
        )
        if done.returncode != 0 and not done.stdout:
            raise RuntimeError(f"journalctl -D {where} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10,
        interval: float = 0.05,
        what: str = "condition",
    ) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def poweroff(self, timeout: float = 60) -> int:
        """``systemctl poweroff`` and wait for nspawn to exit; returns its exit code (0 = off)."""
        started = time.monotonic()
        # The manager may drop the connection while it goes down: the exit code proves nothing.
        self.run(["systemctl", "poweroff"], check=False)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"container still running {timeout}s after poweroff; "
                f"console:\n{self.console_log[-4000:]}"
            ) from None
        record("poweroff", time.monotonic() - started)
        return self.exit_code

    def close(self) -> None:
        """Kill what is left, remove the cgroup subtree and the overlay; keep journal and logs."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        try:
            if self.process.poll() is None:
                # SIGTERM makes nspawn ask the guest's systemd for a clean halt; KILL if it hangs.
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
            if self.exit_code is None:
                self.exit_code = self.process.returncode
        finally:
            remove_cgroups(self.cgroups)
            for part in ("upper", "work", "merged"):
                shutil.rmtree(self.run_dir / part, ignore_errors=True)
            record("teardown", time.monotonic() - started)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_cgroups(cgroups: Sequence[str], timeout: float = 10) -> None:
    """Kill anything left in our cgroup subtrees, then rmdir them bottom-up.

    rmdir fails with EBUSY until the kernel has reaped the last member, hence the retry.
    """
    deadline = time.monotonic() + timeout
    for top in cgroups:
        while os.path.isdir(top):
            for dirpath, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    for pid in Path(dirpath, "cgroup.procs").read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)
            if not os.path.isdir(top):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not remove cgroup {top}: still populated")
            time.sleep(0.05)


def remove_stale_cgroups() -> list[str]:
    """Remove run cgroups whose pytest process is gone (killed before its teardown ran).

    Killing their members also ends the orphaned nspawn and its guest, whose mounts then go
    with their namespace.
    """
    stale = []
    for root in cgroup2_roots():
        for path in glob.glob(f"{root}/{CGROUP_PREFIX}*"):
            owner = Path(path).name[len(CGROUP_PREFIX) :].split("-")[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                stale.append(path)
    remove_cgroups(stale)
    return stale


_RUN_COUNTER = iter(range(1, 1 << 30))


def boot(
    lower: Path,
    run_dir: Path,
    payload: Path | None = None,
    files: Mapping[str, FileSource] | None = None,
    enable: Sequence[str] = (),
    udev: bool = False,
    host_network: bool = False,
    nspawn_args: Sequence[str] = (),
    timeout: float = 60,
    machine: str = "e2e",
) -> Container:
    """Boot systemd on a fresh overlay of ``lower`` and wait until startup has finished.

    ``payload`` (a tree from `build_payload`) and ``files`` (guest path -> content) go into the
    upper layer; ``enable`` names units to enable before boot. ``udev`` also runs systemd-udevd
    (it needs a writable /sys and CAP_NET_ADMIN to broadcast uevents).

    The container gets its own network namespace unless ``host_network``: links a scenario makes
    (veth, vxlan standing in for Calico's) must not appear on the host, and their uevents, which
    the kernel delivers per network namespace, must reach the guest rather than the host.
    ``machine`` is the container's name (and so its hostname): give containers that run at the
    same time distinct ones.
    """
    for part in ("upper", "work", "merged", "journal", "results"):
        (run_dir / part).mkdir(parents=True)
    if payload is not None:
        lay_files(run_dir / "upper", lower, {"/": payload})
    lay_files(run_dir / "upper", lower, files or {})

    # Host PID 1 hands out no cgroups, so each run gets its own subtree (nspawn needs one it may
    # delegate), named after this process so a leftover can be traced to its owner.
    name = f"{CGROUP_PREFIX}{os.getpid()}-{next(_RUN_COUNTER)}"
    cgroups = [f"{root}/{name}" for root in cgroup2_roots()]

    env = {
        **os.environ,
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",  # pure cgroup2 inside, like a modern node
        "E2E_LOWER": str(lower),
        "E2E_RUN": str(run_dir),
        "E2E_ENABLE": " ".join(enable),
        "E2E_CGROUPS": " ".join(cgroups),
    }
    args = [
        "-b",
        "-M",
        machine,
        "--register=no",
        "--keep-unit",
        "--console=pipe",
        f"--bind={run_dir / 'journal'}:/var/log/journal",
        f"--bind={run_dir / 'results'}:/results",
    ]
    if not host_network:
        args.append("--private-network")  # also grants CAP_NET_ADMIN inside that namespace
    if udev:
        env["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] = "1"
        # CAP_NET_ADMIN lets udevd broadcast processed uevents; masking the trigger keeps it from
        # replaying every host device.
        args += [
            "--capability=CAP_NET_ADMIN",
            "--bind-ro=/dev/null:/etc/systemd/system/systemd-udev-trigger.service",
        ]
    args += list(nspawn_args)

    started = time.monotonic()
    try:
        for cg in cgroups:
            os.mkdir(cg)
        with open(run_dir / "console.log", "wb") as console:
            process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "bash", "-c", _INNER, "inner", *args],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
    except BaseException:
        remove_cgroups(cgroups)
        raise
    container = Container(run_dir=run_dir, process=process, cgroups=cgroups)
    try:
        container.leader = _wait_for_manager(container, started + timeout)
        state = container.run(
            ["systemctl", "is-system-running", "--wait"],
            check=False,
            timeout=max(1.0, started + timeout - time.monotonic()),
        )
        container.boot_state = state.stdout.strip()
    except BaseException:
        container.close()
        raise
    record("boot", time.monotonic() - started)
    return container


def _wait_for_manager(container: Container, deadline: float) -> int:
    """PID (host view) of the guest's systemd, once it has bound the socket systemctl uses."""
    nspawn = container.process.pid
    while time.monotonic() < deadline:
        if container.process.poll() is not None:
            raise RuntimeError(
                f"nspawn exited {container.process.returncode} during boot; console:\n"
                f"{container.console_log[-4000:]}"
            )
        for pid in _children(nspawn):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/exe").endswith("/lib/systemd/systemd") and (
                    os.path.exists(f"/proc/{pid}/root/run/systemd/private")
                ):
                    return pid
        time.sleep(0.02)
    raise TimeoutError(f"container did not come up; console:\n{container.console_log[-4000:]}")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def host_mount_table() -> set[str]:
    """The host's mounts as (mount point, fstype, source): IDs and options shift innocently."""
    rows = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        rows.add(f"{fields[4]} {fields[sep + 1]} {fields[sep + 2]}")
    return rows
