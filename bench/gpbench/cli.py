"""The command line of bench/run.py: its options, the tools it needs, and one run from
start to report."""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from . import BENCH_DIR
from .machine import machine_description
from .processes import parse_cpus
from .report import console_summary, results_markdown
from .rig import Rig
from .sections import NAMES, SECTIONS, running

DESCRIPTION = ("The benchmark suite (issue 7): gproxyd side by side with haproxy and a "
               "direct connection.")
TOOLS = ("haproxy", "nginx", "wrk", "iperf3")


def section_list() -> str:
    return "\n".join(f"  {section.name:14} {section.summary}" for section in SECTIONS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections:\n" + section_list())
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 runs of 2 s, a 10 s stalled run (a few minutes)")
    parser.add_argument("--runs", type=int, help="interleaved runs per measurement "
                                                 "(default 5; --quick 3)")
    parser.add_argument("--duration", type=float,
                        help="seconds per wrk/iperf3 run (default 10; --quick 2)")
    parser.add_argument("--stall-seconds", type=float,
                        help="length of the long stalled-shadow run (default 60; --quick 10)")
    parser.add_argument("--only", default=",".join(NAMES), metavar="SECTION,...",
                        help="sections to run (default: all)")
    parser.add_argument("--list", action="store_true",
                        help="list the sections, one line each, and exit")
    parser.add_argument("--idle-conns", type=int, default=10000,
                        help="idle connections held for the memory section (default 10000)")
    parser.add_argument("--rate", type=int, default=2000,
                        help="offered req/s for the fixed-rate shadow runs (default 2000)")
    parser.add_argument("--rate-connections", type=int, default=50,
                        help="connections for the fixed-rate runs (default 50)")
    parser.add_argument("--threads", type=int, default=1 if (os.cpu_count() or 1) <= 2 else 2,
                        help="wrk threads (default 1 on <= 2 CPUs, else 2)")
    parser.add_argument("--pin-proxy", default="", metavar="CPUS",
                        help="pin haproxy and gproxyd to these CPUs, e.g. 1 (default: no pinning)")
    parser.add_argument("--pin-load", default="", metavar="CPUS",
                        help="pin nginx, wrk, iperf3 and the test servers, e.g. 0")
    parser.add_argument("--haproxy-splice", action="store_true",
                        help="let haproxy splice (option splice-request and "
                             "splice-response; off in its defaults)")
    parser.add_argument("--output", default=os.path.join(BENCH_DIR, "results.md"),
                        help="where the report goes (default bench/results.md)")
    parser.add_argument("--gproxyd-rev", default="", metavar="REV",
                        help="measure gproxyd as committed at REV (git archive into the "
                             "temporary directory) instead of the working tree")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.argv = argv
    args.runs = args.runs or (3 if args.quick else 5)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.stall_seconds = args.stall_seconds or (10.0 if args.quick else 60.0)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - set(NAMES)
    if unknown:
        parser.error(f"--only: unknown section {', '.join(sorted(unknown))} "
                     f"(expected some of: {', '.join(NAMES)}; --list describes them)")
    if not args.only:
        parser.error(f"--only: no section given (expected some of: {', '.join(NAMES)})")
    for flag in ("pin_proxy", "pin_load"):
        try:
            parse_cpus(getattr(args, flag))
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')}: bad CPU list "
                         f"{getattr(args, flag)!r} (expected e.g. 0 or 0,2 or 1-3)")
    args.raw_path = os.path.join(BENCH_DIR, "out", time.strftime("raw-%Y%m%d-%H%M%S.json"))
    return args


def ensure_tools() -> None:
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if not missing:
        return
    print(f"missing {', '.join(missing)}: running bench/setup.sh", file=sys.stderr)
    done = subprocess.run(["sh", os.path.join(BENCH_DIR, "setup.sh")], timeout=900)
    still = [tool for tool in TOOLS if not shutil.which(tool)]
    if done.returncode != 0 or still:
        sys.exit(f"bench: cannot find {', '.join(still or missing)} "
                 "(run bench/setup.sh as root, or install them)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.list:
        print(section_list())
        return 0
    ensure_tools()
    rig = Rig(args, running(args.only))
    atexit.register(rig.close)  # also on an exception; close() is idempotent
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        rig.machine = machine_description(args.gproxyd_rev, rig.gproxyd_source)
        rig.start_backends()
        rig.start_targets()
        for target in rig.targets.values():
            if target.error:
                print(f"{target.name}: n/a: {target.error}", file=sys.stderr)
        rig.run()
    finally:
        rig.close()
    elapsed = time.monotonic() - started
    with open(args.output, "w") as handle:
        handle.write(results_markdown(rig, elapsed))
    os.makedirs(os.path.dirname(args.raw_path), exist_ok=True)
    with open(args.raw_path, "w") as handle:
        json.dump({"argv": argv, "runs": rig.raw}, handle, indent=1)
    summary = console_summary(rig)
    if summary:
        print(summary)
    print(f"\nwrote {os.path.relpath(args.output)} ({elapsed / 60:.1f} minutes)")
    return 0
