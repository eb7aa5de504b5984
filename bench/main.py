"""Run the benchmark scenarios and write bench/results.md. Usage: ``sudo bench/run [--quick]``.

Each scenario runs in a forked child inside fresh private mount, PID and network namespaces with
a tmpfs over /run (tests/support/nsutil.py), so every mount and link it makes dies with it and
the host is untouched.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import idle  # noqa: E402
import mount_events  # noqa: E402
import scenarios  # noqa: E402
from model import QUICK, Row, Size  # noqa: E402
from report import Machine, Timing, results  # noqa: E402

from tests.support.nsutil import in_namespace  # noqa: E402

COMMAND = "sudo bench/run"

# In the order of the table. Every scenario returns at least one row with a figure, or the run
# fails: a scenario that silently produced nothing would leave a hole nobody notices.
SCENARIOS: dict[str, Callable[[Size], list[Row]]] = {
    "pass": scenarios.pass_cost,
    "backends": scenarios.backends,
    "latency": scenarios.detection_latency,
    "detection": mount_events.detection,
    "churn": mount_events.churn,
    "slope": mount_events.slope,
    "storm": scenarios.storm,
    "owner-exit": scenarios.owner_exit,
    "idle": idle.idle,
    "start-stop": scenarios.start_stop,
}


def machine() -> Machine:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    findmnt = subprocess.run(["findmnt", "--version"], capture_output=True, text=True).stdout
    return Machine(
        kernel=platform.release(),
        cpus=os.cpu_count() or 0,
        cpu_model=cpu,
        python=platform.python_version(),
        findmnt=findmnt.strip(),
        load=os.getloadavg(),
    )


def has_figure(row: Row) -> bool:
    """A measured number in the row's own cells (a note may carry it: "none (... 34.9 ms)")."""
    return any(ch.isdigit() for ch in row.ours + row.note)


def run(names: list[str], size: Size) -> tuple[list[Row], list[Timing]]:
    rows: list[Row] = []
    timings: list[Timing] = []
    for name in names:
        load = os.getloadavg()[0]
        start = time.monotonic()
        print(f"== {name} (load {load:.2f})", flush=True)
        got = in_namespace(SCENARIOS[name], size, net=True, timeout=3600)
        for r in got:
            print(
                f"   {r.measure}: {r.ours} | {r.peer} {r.peer_value} | "
                f"{'' if r.ratio is None else f'{r.ratio:.2f}x '}{r.goal} "
                f"{'' if r.met is None else ('met' if r.met else 'MISSED: ' + r.bound)}",
                flush=True,
            )
        took = time.monotonic() - start
        print(f"   ({took:.0f} s)", flush=True)
        empty = [r.measure for r in got if not has_figure(r)]
        if not got or empty:
            raise SystemExit(f"scenario {name} produced no figure: {empty or 'no rows'}")
        rows.extend(got)
        timings.append(Timing(name, took, load))
    return rows, timings


def byte_compile() -> None:
    """Every scenario times the package byte-compiled, as every install is (pip at install
    time, py3compile in the .deb's postinst, rpmbuild). From a checkout under
    PYTHONDONTWRITEBYTECODE=1, each `status` would otherwise compile the modules changed since
    the last import from source, 15-20 ms no user pays."""
    import compileall

    import calico_mount_reaper

    compileall.compile_dir(os.path.dirname(calico_mount_reaper.__file__), quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        help="run just this scenario (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="results file")
    args = parser.parse_args()
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    if os.geteuid() != 0:
        sys.stderr.write(f"the benchmark makes mounts in private namespaces: run {COMMAND}\n")
        return 77
    size = QUICK if args.quick else Size()
    names = args.only or list(SCENARIOS)
    byte_compile()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    found = machine()
    print(found, flush=True)
    rows, timings = run(names, size)
    flags = " --quick" if args.quick else ""
    flags += "".join(f" --only {name}" for name in args.only or ())
    Path(args.out).write_text(results(COMMAND + flags, started, found, rows, timings))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
