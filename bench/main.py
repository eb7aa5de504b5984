"""Run the benchmark scenarios and write bench/results.md. Usage: ``sudo bench/run [--quick]``.

Each scenario runs in a forked child inside a fresh private mount namespace with a tmpfs over
/run (tests/support/nsutil.py), so every mount it makes dies with it and the host's table is
untouched.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from scenarios import QUICK, SCENARIOS, Row, Size  # noqa: E402

from tests.support.nsutil import in_namespace  # noqa: E402

COMMAND = "sudo bench/run"


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    findmnt = subprocess.run(["findmnt", "--version"], capture_output=True, text=True).stdout
    return (
        f"Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), Python "
        f"{platform.python_version()}, {findmnt.strip()}"
    )


def table(rows: list[Row]) -> str:
    out = [
        "| scenario | measure | calico-mount-reaper (min / median / max) | peer | "
        "peer (min / median / max) | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        ours = r.ours + (f" ({r.note})" if r.note else "")
        out.append(
            f"| {r.scenario} | {r.measure} | {ours} | {r.peer} | {r.peer_value} | "
            f"{ratio} | {r.goal} | {met} |"
        )
    return "\n".join(out)


def run(names: list[str], size: Size) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        start = time.monotonic()
        print(f"== {name}", flush=True)
        got = in_namespace(SCENARIOS[name], size, timeout=3600)
        for r in got:
            print(
                f"   {r.measure}: {r.ours} | {r.peer} {r.peer_value} | "
                f"{'' if r.ratio is None else f'{r.ratio:.2f}x '}{r.goal} "
                f"{'' if r.met is None else ('met' if r.met else 'MISSED')}",
                flush=True,
            )
        print(f"   ({time.monotonic() - start:.0f} s)", flush=True)
        rows.extend(got)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SCENARIOS),
        help="run just this scenario (repeatable)",
    )
    parser.add_argument("--out", default=str(HERE / "results.md"), help="results file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.stderr.write(f"the benchmark makes mounts in private namespaces: run {COMMAND}\n")
        return 77
    size = QUICK if args.quick else Size()
    names = args.only or list(SCENARIOS)
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = run(names, size)
    flag = " --quick" if args.quick else ""
    text = (
        f"# Benchmark results\n\nWritten by `{COMMAND}{flag}` on {started}. {machine()}.\n"
        "All mounts in private mount namespaces. Peers measured alternately with ours, in "
        "the same run; ratio = our median / peer median (lower is better).\n\n"
        f"{table(rows)}\n"
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
