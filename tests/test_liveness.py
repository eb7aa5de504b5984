"""Owner processes by comm and argv[0], against real processes; kubelet state from processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from calico_mount_reaper.liveness import (
    find_owners,
    kubelet_from_processes,
    read_process,
    scan_processes,
)
from calico_mount_reaper.model import COMM_LEN, KubeletSource, KubeletState, Process


def test_is_named_by_argv0_or_comm() -> None:
    assert Process(1, "sleep", "calico-node").is_named("calico-node")
    assert Process(1, "calico-node", "").is_named("calico-node")
    assert not Process(1, "calico-node", "calico-node").is_named("calico")  # no text prefixes
    assert not Process(1, "calico-node2", "calico-node2").is_named("calico-node")
    assert not Process(1, "calico-node", "calico-node").is_named("calico-node-x")


def test_comm_is_truncated_to_15_chars() -> None:
    long_name = "calico-felix-with-a-long-name"
    comm = long_name[:COMM_LEN]
    assert COMM_LEN == 15 and comm == "calico-felix-wi"
    assert Process(1, comm, "").is_named(long_name)
    # A long name is matched on comm only up to the truncation, and argv0 must be whole.
    assert not Process(1, comm[:-1], "").is_named(long_name)
    assert not Process(1, "sh", long_name[:20]).is_named(long_name)


def test_find_owners() -> None:
    procs = [
        Process(30, "calico-node", "calico-node"),
        Process(7, "calico-node", "calico-node"),
        Process(8, "calico-felix", ""),
        Process(9, "bash", "bash"),
        Process(10, "sleep", "cilium-agent"),
    ]
    assert find_owners(procs, ["calico-node", "calico-felix", "kubelet"]) == {
        "calico-node": (7, 30),
        "calico-felix": (8,),
    }
    assert find_owners(procs, []) == {}
    assert find_owners([], ["calico-node"]) == {}
    # One process can answer to two names (comm one, argv0 the other).
    both = [Process(5, "calico-felix", "calico-node")]
    assert find_owners(both, ["calico-node", "calico-felix"]) == {
        "calico-node": (5,),
        "calico-felix": (5,),
    }


def test_find_owners_reads_names_once_from_an_iterator() -> None:
    names: Iterator[str] = iter(["calico-node", "calico-felix"])
    procs = [Process(1, "calico-felix", ""), Process(2, "calico-node", "")]
    assert find_owners(procs, names) == {"calico-felix": (1,), "calico-node": (2,)}


def test_kubelet_from_processes() -> None:
    procs = [Process(1, "bash", "bash"), Process(812, "kubelet", "kubelet")]
    running = kubelet_from_processes(procs)
    assert running.active is True and running.source is KubeletSource.PROCESS
    assert "pid 812" in running.detail and "no system bus" in running.detail
    stopped = kubelet_from_processes([Process(1, "bash", "bash")])
    assert stopped.active is False and stopped.source is KubeletSource.PROCESS
    assert "not found" in stopped.detail
    assert not running.decommissioned and not stopped.decommissioned


@pytest.mark.parametrize(
    ("source", "load_state", "unit_file_state", "decommissioned"),
    [
        ("dbus", "loaded", "enabled", False),
        ("dbus", "loaded", "static", False),
        ("dbus", "loaded", "", False),
        ("dbus", "loaded", "disabled", True),
        ("dbus", "loaded", "masked", True),
        ("dbus", "loaded", "masked-runtime", True),
        ("dbus", "masked", "", True),
        ("dbus", "not-found", "", True),
        # Without systemd's answer there is no way to tell, so never assume decommission.
        ("process", "not-found", "disabled", False),
        ("none", "not-found", "masked", False),
    ],
)
def test_decommissioned(
    source: str, load_state: str, unit_file_state: str, decommissioned: bool
) -> None:
    state = KubeletState(
        active=False,
        source=KubeletSource(source),
        load_state=load_state,
        unit_file_state=unit_file_state,
    )
    assert state.decommissioned is decommissioned


# --- real processes ---------------------------------------------------------------------------


def _start(args: list[str], executable: str | None = None) -> subprocess.Popen[bytes]:
    """Start a child and wait until it has exec'd (before that /proc shows our own names)."""
    proc = subprocess.Popen(args, executable=executable, stdout=subprocess.PIPE)
    if args[0] == sys.executable:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != args[0].encode():
        assert time.monotonic() < deadline, "child did not exec"
        time.sleep(0.005)
    return proc


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_real_process_found_by_argv0(children: list[subprocess.Popen[bytes]]) -> None:
    # Calico's image starts calico-node with that argv[0]; exec sets comm from the file name,
    # so here comm is "sleep" and only argv[0] can identify it.
    child = _start(["calico-node", "30"], executable="/bin/sleep")
    children.append(child)
    proc = read_process(child.pid)
    assert proc == Process(child.pid, "sleep", "calico-node")
    # Other calico-node processes may exist on the machine; ours must be among the found.
    assert child.pid in find_owners(scan_processes(), ["calico-node"])["calico-node"]


def test_real_process_found_by_comm(children: list[subprocess.Popen[bytes]]) -> None:
    # prctl(PR_SET_NAME) changes comm only (argv[0] stays the interpreter's), as a process
    # that renames its threads does. exec would reset comm, so it is set after exec.
    code = (
        "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'calico-felix', 0, 0, 0); "
        "print('ready', flush=True); time.sleep(30)"
    )
    child = _start([sys.executable, "-c", code])
    children.append(child)
    proc = read_process(child.pid)
    assert proc is not None
    assert proc.comm == "calico-felix"
    assert proc.argv0 == os.path.basename(sys.executable)
    assert find_owners([proc], ["calico-felix"]) == {"calico-felix": (child.pid,)}


def test_real_process_with_long_name_matches_on_truncated_comm(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    long_name = "calico-node-with-a-long-name"
    link = tmp_path / long_name
    link.symlink_to("/bin/sleep")
    child = _start(["x", "30"], executable=str(link))
    children.append(child)
    proc = read_process(child.pid)
    assert proc == Process(child.pid, long_name[:COMM_LEN], "x")
    assert proc.is_named(long_name)


def test_argv0_is_the_basename(children: list[subprocess.Popen[bytes]]) -> None:
    child = _start(["/opt/cni/bin/calico-node", "30"], executable="/bin/sleep")
    children.append(child)
    proc = read_process(child.pid)
    assert proc is not None and proc.argv0 == "calico-node"


def test_kernel_thread_has_no_argv0() -> None:
    proc = read_process(2)  # kthreadd, visible from the host's PID namespace
    if proc is None:
        pytest.skip("no kthreadd in this PID namespace")
    assert proc.comm == "kthreadd" and proc.argv0 == ""


def test_gone_process_is_none() -> None:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the PID no longer exists
    assert read_process(child.pid) is None
    assert read_process(child.pid, proc_root="/nonexistent") is None


def test_scan_sees_ourselves() -> None:
    me = {p.pid: p for p in scan_processes()}
    assert os.getpid() in me
    argv0 = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    assert me[os.getpid()].argv0 == os.path.basename(argv0)


@pytest.mark.parametrize("long_name", ["calicö-node-agent", "calico-node-xyé-agent"])
def test_non_ascii_long_name_is_truncated_in_bytes_like_the_kernel(
    tmp_path: Path, children: list[subprocess.Popen[bytes]], long_name: str
) -> None:
    # The kernel cuts comm at 15 bytes, not characters, possibly inside a UTF-8 sequence.
    link = tmp_path / long_name
    link.symlink_to("/bin/sleep")
    child = _start(["x", "30"], executable=str(link))
    children.append(child)
    proc = read_process(child.pid)
    assert proc is not None and proc.argv0 == "x"
    assert proc.is_named(long_name)
    assert not proc.is_named(long_name.replace("agent", "other")[:14])


def test_an_exited_process_its_parent_has_not_collected_is_gone(tmp_path: Path) -> None:
    link = tmp_path / "calico-node"
    link.symlink_to("/bin/true")
    child = subprocess.Popen([str(link)])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
            assert time.monotonic() < deadline, "child did not exit"
            time.sleep(0.005)
        # Still listed under its name (comm survives exit), but no owner any more.
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "calico-node"
        assert read_process(child.pid) is None
        assert child.pid not in {p.pid for p in scan_processes()}
    finally:
        child.wait()


def test_a_process_whose_first_thread_exited_alone_is_still_alive(
    children: list[subprocess.Popen[bytes]],
) -> None:
    # SYS_exit (60 on x86_64) ends only the calling thread: the leader shows Z while another
    # thread runs on, and the process is alive (measured on Linux 6.18: num_threads stays 2).
    if os.uname().machine != "x86_64":
        pytest.skip("the raw syscall number below is x86_64's")
    code = (
        "import ctypes, threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); "
        "print('ready', flush=True); ctypes.CDLL(None).syscall(60, 0)"
    )
    child = _start([sys.executable, "-c", code])
    children.append(child)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
        assert time.monotonic() < deadline, "leader thread did not exit"
        time.sleep(0.005)
    proc = read_process(child.pid)
    assert proc is not None and proc.pid == child.pid


def test_a_comm_with_parentheses_and_spaces_is_read_whole(
    tmp_path: Path, children: list[subprocess.Popen[bytes]]
) -> None:
    # /proc/<pid>/stat prints comm raw between "(" and ")": the last ")" ends it.
    link = tmp_path / "a) b (c"
    link.symlink_to("/bin/sleep")
    child = _start(["x", "30"], executable=str(link))
    children.append(child)
    assert read_process(child.pid) == Process(child.pid, "a) b (c", "x")
