#!/usr/bin/env python3
"""Issue #15's attack scenarios, run again against the installed gproxyd (the venv's
editable install): one table row per scenario, what the issue reported before and what
happens now, with the numbers measured.

    .venv/bin/python bench/resilience.py --out /tmp/resilience.md    # ~4-5 minutes
    .venv/bin/python bench/resilience.py --quick --only 1,12          # a smoke run

Real servers (nginx, a redis-server of its own), wrk, and scripted peers (a stalled
shadow, recorders, sinks) in this process; everything on 127.0.0.1, free ports, a temporary
directory removed at the end. Needs root (user = nobody, a planted pid file of root's).
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from resilience import lifecycle, limits, traffic  # noqa: E402
from resilience.harness import MIB, REPO_DIR, Bench, Row, gproxyd_command  # noqa: E402
from resilience.report import markdown  # noqa: E402

# number -> (what runs it, its arguments in a full run, in a --quick run)
SCENARIOS = {
    1: (traffic.bulk, {"size": 1024 * MIB}, {"size": 64 * MIB}),
    2: (traffic.half_close, {"count": 5000}, {"count": 300}),
    3: (traffic.malformed, {}, {}),
    4: (traffic.fuzz, {"seconds": 45.0}, {"seconds": 5.0}),
    5: (lifecycle.reloads, {"count": 20}, {"count": 3}),
    6: (lifecycle.hooks, {}, {}),
    7: (lifecycle.usr1_as_nobody, {}, {}),
    8: (limits.admin, {"connections": 1100, "rounds": 4, "window": 5.0},
        {"connections": 1100, "rounds": 1, "window": 2.0}),
    9: (limits.stalled_close, {"seconds": 10.0}, {"seconds": 3.0}),
    10: (traffic.redis_large, {"elements": 1_000_000, "depth": 5_000_000},
         {"elements": 100_000, "depth": 500_000}),
    11: (traffic.slow_headers, {"clients": 2000}, {"clients": 200}),
    12: (traffic.resets, {}, {"runs": 2}),
    13: (lifecycle.daemonize_relative, {}, {}),
    14: (lifecycle.pid_symlink, {}, {}),
}
TOOLS = ("nginx", "redis-server", "wrk")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/resilience.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    parser.add_argument("--only", default="", metavar="N,...",
                        help="run only these scenarios (numbers 1-14; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and counts: a smoke run of each scenario")
    args = parser.parse_args(argv)
    try:
        args.numbers = sorted({int(part) for part in args.only.split(",") if part.strip()}
                              or SCENARIOS)
    except ValueError:
        parser.error(f"--only: expected numbers 1-14, got {args.only!r}")
    unknown = set(args.numbers) - set(SCENARIOS)
    if unknown:
        parser.error(f"--only: no scenario {', '.join(map(str, sorted(unknown)))} "
                     "(expected 1-14)")
    return args


def describe() -> str:
    """What ran: gproxyd's commit and version, the machine, when."""
    def run(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_DIR, timeout=30)
        return (done.stdout or done.stderr).strip().splitlines()[-1] if (
            done.stdout or done.stderr).strip() else "?"
    commit = run("git", "rev-parse", "--short", "HEAD")
    dirty = subprocess.run(["git", "status", "--porcelain", "gproxyd"], capture_output=True,
                           text=True, cwd=REPO_DIR, timeout=30).stdout.rstrip()
    version = run(*gproxyd_command(), "--version")
    changed = ", ".join(line[3:] for line in dirty.splitlines())
    return (f"{version} at {commit}"
            f"{f' + uncommitted changes in the working tree: {changed}' if dirty else ''}"
            f"; {os.cpu_count()} CPUs ({platform.machine()}), load "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at start; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        sys.exit(f"bench/resilience.py: missing {', '.join(missing)} "
                 "(bench/setup.sh installs them)")
    # the stalled shadow holds thousands of connections, the slow clients thousands more
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    header = describe()
    print(header, file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="gproxyd-resilience-")
    bench = Bench(workdir)
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for number in args.numbers:
            function, full, quick = SCENARIOS[number]
            began = time.monotonic()
            print(f"{number}: {function.__name__} ...", file=sys.stderr, flush=True)
            try:
                row = function(bench, **(quick if args.quick else full))
            except Exception as error:  # noqa: BLE001 - one scenario's failure is a row
                traceback.print_exc()
                row = Row(number, function.__name__, "", f"{type(error).__name__}: {error}",
                          "error")
            row.seconds = time.monotonic() - began
            rows.append(row)
            print(f"{number}: {row.verdict} ({row.seconds:.0f} s): {row.now}", file=sys.stderr,
                  flush=True)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    text = (f"{header}; {elapsed / 60:.1f} minutes"
            f"{' (--quick: smaller sizes)' if args.quick else ''}.\n\n" + markdown(rows))
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0 if all(row.verdict.startswith(("ok", "measured")) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
