"""Boot a distro's own kernel under qemu, for the kernel matrix (issue 12, item 7).

An nspawn container shares the host's kernel, so it cannot show what the reaper does on the
kernels nodes really run. This module boots Debian 12's 6.1 (bookworm) and Debian 13's 6.12
(trixie) under qemu with software emulation (this machine kind has no usable KVM: see
DESIGN.md, "Old kernels under qemu").

Layers:
- `ensure_image`: debootstrap the suite, install the kernel with a small initrd and what the
  guest tests need, make an ext4 image with ``mkfs.ext4 -d`` (no loop mount), and cache vmlinuz,
  initrd and image as one tar+zstd per recipe in the e2e cache directory (flock-serialised, like
  the nspawn rootfs). Every mount the build needs (debootstrap's own, the chroot's /proc, /sys
  and /dev) is made inside ``unshare -m --propagation private``.
- `restore_image`: unpack the cached tarball (sparse) once per session.
- `run_guest`: one boot with ``-snapshot`` (the image is never written) and a host directory as
  a 9p share. The image carries a oneshot unit gated by ``cmr.run`` on the kernel command line:
  it runs ``/share/guest.py`` after multi-user.target, which writes its results back into the
  share, and then powers the VM off (``SuccessAction=``/``FailureAction=``).

The project reaches the guest through the share, installed by the guest script (pure Python;
its dependencies come from the suite's own Debian packages, the versions nodes really have).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e import harness


@dataclass(frozen=True)
class Kernel:
    """One tier of the matrix: a Debian suite booted on its own kernel."""

    suite: str
    debian: str  # the release, for test ids and reports
    kernel_series: str  # what `uname -r` starts with


BOOKWORM = Kernel(suite="bookworm", debian="12", kernel_series="6.1.")
TRIXIE = Kernel(suite="trixie", debian="13", kernel_series="6.12.")
KERNELS = (BOOKWORM, TRIXIE)

# What the guest needs: a booting systemd with udev and a bus (the daemon follows kubelet over
# D-Bus), the kernel and its initrd tools, and the Python side of the daemon and of the tests,
# all at the suite's own versions.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "initramfs-tools",
    "util-linux",
    "iproute2",
    "python3",
    "python3-pystemd",
    "python3-pyudev",
    "python3-sdnotify",
    "python3-pytest",
    "python3-hypothesis",
    "python3-dbus-next",  # the adversarial suite's fake systemd on a private bus
)
KERNEL_PACKAGE = "linux-image-amd64"
# Only what finds and mounts the root disk goes into the initrd (36 MB -> ~6.5 MB): the 9p
# modules load from the root filesystem later (modules-load.d), before the share is mounted.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4")
IMAGE_SIZE = "2G"
# Bump when the recipe changes in a way the lists above do not show.
IMAGE_RECIPE_VERSION = 1

RUN_FLAG = "cmr.run"
SHARE_TAG = "cmrshare"
GUEST_RUN_UNIT = "cmr-guest-run.service"

# qemu without KVM: TCG, with the translation cache capped (it takes ~930 MB otherwise). 1 GB
# rather than DESIGN's 512 MB: headroom for the guest's pytest run (hypothesis, a fork per
# namespace case); the guest's RAM is only allocated as it is touched.
QEMU_MACHINE = ("-accel", "tcg,tb-size=256", "-cpu", "max", "-m", "1024", "-smp", "2")
BOOT_TIMEOUT = 120.0  # per boot, on a busy machine; the run's own work comes on top

_GUEST_RUN_UNIT_TEXT = f"""[Unit]
Description=calico-mount-reaper: run the test script from the host's share, then power off
# Only when the host asked for it: the same image boots without running anything otherwise.
ConditionKernelCommandLine={RUN_FLAG}
RequiresMountsFor=/share
After=multi-user.target
# In [Unit], not [Service]: there they are ignored and the VM never stops.
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 -u /share/guest.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=40min

[Install]
WantedBy=multi-user.target
"""

# Runs inside `unshare -m --propagation private`, so every mount here (debootstrap's and the
# chroot's) lives and dies with that namespace. Arguments come in the environment.
_BUILD_SCRIPT = r"""
set -euo pipefail
root=$BUILD/rootfs
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" \
  > "$BUILD/debootstrap.log" 2>&1 || { tail -n 40 "$BUILD/debootstrap.log"; exit 1; }

cp -a "$STAGING/." "$root/"  # the guest's own files (fstab, the run unit, ...)
# A small initrd, configured before the kernel package builds it.
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
printf '%s\n' $INITRD_MODULES >> "$root/etc/initramfs-tools/modules"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"  # start no services in the chroot
chmod 755 "$root/usr/sbin/policy-rc.d"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends "$KERNEL_PACKAGE" > "$BUILD/kernel.log" 2>&1 \
  || { tail -n 40 "$BUILD/kernel.log"; exit 1; }
rm -f "$root/usr/sbin/policy-rc.d"
chroot "$root" systemctl enable "$GUEST_RUN_UNIT" >/dev/null
# Timers that would only compete with the tests for two emulated CPUs.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
  fstrim.timer >/dev/null 2>&1 || true
umount "$root/dev" "$root/sys" "$root/proc"

rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
out=$BUILD/out
mkdir "$out"
cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
mkfs.ext4 -q -L cmr-root -d "$root" "$out/root.ext4" "$IMAGE_SIZE"
tar -C "$out" -S -I 'zstd -T0' -cf "$TARBALL_PARTIAL" vmlinuz initrd.img root.ext4
"""


def missing_prerequisites() -> list[str]:
    """What this machine lacks to build and boot the guests (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("must run as root (debootstrap and chroot need it)")
    tools = ("qemu-system-x86_64", "unshare", "tar", "zstd", "mkfs.ext4")
    absent = [tool for tool in tools if shutil.which(tool) is None]
    if absent:
        missing.append(
            f"not found: {' '.join(absent)} (apt-get install qemu-system-x86 zstd e2fsprogs)"
        )
    return missing


def image_key(kernel: Kernel) -> str:
    """Names the cached image after its recipe, so a changed package list rebuilds it."""
    spec = (
        f"{IMAGE_RECIPE_VERSION} {kernel.suite} {KERNEL_PACKAGE} {','.join(sorted(PACKAGES))} "
        f"{','.join(INITRD_MODULES)} {IMAGE_SIZE} {sorted(_guest_files().items())} {_BUILD_SCRIPT}"
    )
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def ensure_image(kernel: Kernel, cache: Path | None = None) -> Path:
    """Return the cached image tarball for ``kernel``, building it first if there is none."""
    cache = cache or harness.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    prefix = f"qemu-{kernel.suite}-"
    tarball = cache / f"{prefix}{image_key(kernel)}.tar.zst"
    with open(cache / f"qemu-{kernel.suite}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        if shutil.which("debootstrap") is None:
            raise harness.Unavailable(
                f"no cached guest image at {tarball} and debootstrap is not installed"
            )
        mirror = _mirror(kernel.suite)
        started = time.monotonic()
        _build(kernel, mirror, tarball)
        harness.record(f"qemu image build {kernel.suite}", time.monotonic() - started)
        for stale in cache.glob(f"{prefix}*.tar.zst"):
            if stale != tarball:
                stale.unlink()
    return tarball


def _mirror(suite: str) -> str:
    """The host's Debian mirror (the same archive carries every suite): never hard-coded."""
    harness.host_mirror()  # raises Unavailable, with the reason, when the host names none
    sources = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    listed = ""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt").glob("*.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            listed += path.read_text() + "\n"
    mirror = harness.parse_mirror(sources, listed, suite)
    assert mirror is not None  # host_mirror() found one in the same files
    return mirror


def _build(kernel: Kernel, mirror: str, tarball: Path) -> None:
    build = Path(tempfile.mkdtemp(prefix="qemu-build.", dir=tarball.parent))
    partial = tarball.with_suffix(".partial")
    try:
        # The guest's own files, copied over the rootfs once debootstrap has made it.
        staging = build / "staging"
        for rel, text in _guest_files().items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (staging / "share").mkdir()
        env = {
            **os.environ,
            "BUILD": str(build),
            "SUITE": kernel.suite,
            "MIRROR": mirror,
            "PACKAGES": ",".join(PACKAGES),
            "KERNEL_PACKAGE": KERNEL_PACKAGE,
            "INITRD_MODULES": " ".join(INITRD_MODULES),
            "IMAGE_SIZE": IMAGE_SIZE,
            "GUEST_RUN_UNIT": GUEST_RUN_UNIT,
            "TARBALL_PARTIAL": str(partial),
            "STAGING": str(staging),
        }
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", "-c", _BUILD_SCRIPT],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"building the {kernel.suite} guest image failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


def _guest_files() -> dict[str, str]:
    return {
        "etc/hostname": "cmr-guest\n",
        "etc/fstab": (
            "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
            # noauto: mounted only for the run unit (RequiresMountsFor=/share).
            f"{SHARE_TAG} /share 9p trans=virtio,version=9p2000.L,msize=262144,noauto 0 0\n"
        ),
        # Loaded early by systemd-modules-load, so the share can mount whatever udev is doing.
        "etc/modules-load.d/cmr-share.conf": "9pnet_virtio\n9p\n",
        f"etc/systemd/system/{GUEST_RUN_UNIT}": _GUEST_RUN_UNIT_TEXT,
    }


@dataclass(frozen=True)
class Image:
    kernel: Kernel
    vmlinuz: Path
    initrd: Path
    disk: Path


def image_dir(kernel: Kernel, fallback: Path) -> Path:
    """Where this process unpacks a guest image: in RAM when there is room, else ``fallback``.

    Its own name, not the nspawn rootfs's (`harness.lower_dir`), which the same session may be
    using. Named after this process, so one left by a killed run is removed here.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir() or shutil.disk_usage(shm).free < 4 * 1024**3:
        return fallback
    for stale in shm.glob("cmr-e2e-qemu.*"):
        owner = stale.name.split(".")[1]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return shm / f"cmr-e2e-qemu.{os.getpid()}.{kernel.suite}"


def restore_image(kernel: Kernel, tarball: Path, dest: Path) -> Image:
    """Unpack the cached image into ``dest`` (sparse; qemu's -snapshot keeps it unwritten)."""
    started = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "-S", "-I", "zstd", "-xf", str(tarball)], check=True)
    harness.record(f"qemu image restore {kernel.suite}", time.monotonic() - started)
    return Image(kernel, dest / "vmlinuz", dest / "initrd.img", dest / "root.ext4")


@dataclass(frozen=True)
class GuestRun:
    """What one boot left behind: the share (with the guest's outputs) and the console."""

    share: Path
    console: str
    returncode: int
    seconds: float


def run_guest(image: Image, share: Path, timeout: float) -> GuestRun:
    """Boot ``image`` once with ``share`` as /share; the guest runs /share/guest.py and powers
    off. Raises TimeoutError (with the console's tail) if it has not stopped by ``timeout``."""
    console = share.parent / f"{share.name}.console.log"
    argv = [
        "qemu-system-x86_64",
        *QEMU_MACHINE,
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(image.vmlinuz),
        "-initrd",
        str(image.initrd),
        "-append",
        f"root=/dev/vda rw console=ttyS0 quiet {RUN_FLAG}",
        "-drive",
        f"file={image.disk},format=raw,if=virtio",
        "-snapshot",
        "-virtfs",
        f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id=share",
    ]
    started = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise TimeoutError(
            f"the {image.kernel.suite} guest did not power off within {timeout:.0f} s; console:\n"
            f"{_tail(console)}"
        ) from None
    seconds = time.monotonic() - started
    harness.record(f"qemu run {image.kernel.suite}", seconds)
    text = console.read_text(errors="replace") if console.exists() else ""
    if process.returncode != 0:
        raise RuntimeError(
            f"qemu exited {process.returncode}: {output.decode(errors='replace')}\n{text[-3000:]}"
        )
    return GuestRun(share=share, console=text, returncode=process.returncode, seconds=seconds)


def _tail(path: Path, chars: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return "(no console output)"
