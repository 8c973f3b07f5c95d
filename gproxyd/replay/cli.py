"""`gproxyctl replay`: its arguments (added to gproxyctl's parser) and the run that uses them.

Only argparse and the value parsers are imported at module level: gproxyctl builds this
parser for every command, and `gproxyctl stats` must not pay for gevent or matplotlib.
"""
from __future__ import annotations

import argparse
import sys

from ..exitcodes import EX_OK, EX_USAGE
from ..settings import BadValue, address, duration


def _checked(parse):
    """An argparse type from a settings value parser: its message, not argparse's generic
    `invalid value`."""
    def checked(text: str):
        try:
            return parse(text)
        except BadValue as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    checked.__name__ = parse.__name__
    return checked


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise BadValue(f"bad rate {text!r} (expected requests per second > 0, e.g. 200)")
    return value


def _rates(text: str) -> list[float]:
    """'50,100,200' -> [50.0, 100.0, 200.0]."""
    return [_rate(part) for part in text.split(",") if part.strip()] or [_rate(text)]


def _speed(text: str) -> float:
    """'2x', '0.5x', '2' -> the factor the recorded inter-arrival times are divided by."""
    raw = text.strip().lower().removesuffix("x")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise BadValue(f"bad speed {text!r} (expected a factor > 0, e.g. 2x)")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BadValue(f"bad number {text!r} (expected a whole number >= 1)")
    return value


def add_replay_command(commands) -> argparse.ArgumentParser:
    """Adds `replay` to gproxyctl's subcommands (an argparse subparsers action)."""
    replay = commands.add_parser(
        "replay", help="replay a recording, a URL list or an access log at a target, "
                       "open-loop, at rising rates; print a table per rate with the knee",
        description="Send requests to --target at each offered rate in turn, open-loop: "
                    "each leaves at its scheduled time (the i-th at i/RATE) whether or not "
                    "earlier ones were answered, and its latency counts from that time. "
                    "Prints one row per rate (the median of --runs runs) and marks the "
                    "knee.")
    replay.add_argument("file", nargs="?", metavar="FILE",
                        help="a record file written by gproxyd (record = PATH); its requests "
                             "are sent as recorded, in file order")
    replay.add_argument("--urls", metavar="FILE",
                        help="instead of a record file: paths to GET, one per line")
    replay.add_argument("--access-log", metavar="FILE",
                        help="instead of a record file: an nginx/Apache combined-format "
                             "access log whose GET requests are replayed")
    replay.add_argument("--target", action="append", type=_checked(address), required=True,
                        metavar="HOST:PORT",
                        help="where to send the requests; twice to compare two targets run "
                             "by run (A, B, A, B, ...)")
    replay.add_argument("--rates", type=_checked(_rates), metavar="LIST",
                        help="offered rates in requests per second, e.g. 50,100,200,400")
    replay.add_argument("--from", dest="from_rate", type=_checked(_rate), metavar="RATE",
                        help="first offered rate of a ramp (with --to and --step)")
    replay.add_argument("--to", dest="to_rate", type=_checked(_rate), metavar="RATE",
                        help="last offered rate of a ramp")
    replay.add_argument("--step", type=_checked(_rate), metavar="RATE",
                        help="rate added at each step of a ramp")
    replay.add_argument("--speed", type=_checked(_speed), metavar="FACTOR",
                        help="with a record file and no rates: send at the recorded times "
                             "between requests divided by FACTOR (2x: twice as fast)")
    replay.add_argument("--runs", type=_checked(_count), default=3, metavar="N",
                        help="runs per rate; the table shows their median (default: 3)")
    replay.add_argument("--duration", type=_checked(duration), default=30.0,
                        metavar="DURATION",
                        help="how long each run sends, e.g. 30s (default: 30s)")
    replay.add_argument("--connections", type=_checked(_count), default=256, metavar="N",
                        help="most connections open to a target at once; a request that "
                             "finds none free waits, and the wait counts in its latency "
                             "(default: 256)")
    replay.add_argument("--timeout", type=_checked(duration), default=5.0, metavar="DURATION",
                        help="a request with no whole answer this long after its scheduled "
                             "time is a timeout (default: 5s)")
    replay.add_argument("--csv", metavar="FILE", help="also write one row per run as CSV")
    replay.add_argument("--json", metavar="FILE",
                        help="also write one object per run as a JSON list")
    replay.add_argument("--plot", metavar="FILE",
                        help="draw latency percentiles and achieved rate against offered "
                             "rate, knee marked, to FILE.png or FILE.svg (needs "
                             "pip install gproxyd[plot])")
    return replay


class _Stop(Exception):
    """A usage error found after parsing: exit with STATUS after printing MESSAGE."""

    def __init__(self, message: str, status: int = EX_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _ramp(args: argparse.Namespace) -> list[float]:
    """The offered rates, from --rates or --from/--to/--step ([] with --speed)."""
    ramp = (args.from_rate, args.to_rate, args.step)
    if args.speed is not None:
        if args.rates or any(value is not None for value in ramp):
            raise _Stop("--speed replays at the recorded pace: give it or rates "
                        "(--rates, --from/--to/--step), not both")
        if not args.file:
            raise _Stop("--speed needs a record file (FILE): a URL list or an access log "
                        "has no recorded pace")
        return []
    if args.rates and any(value is not None for value in ramp):
        raise _Stop("give --rates or --from/--to/--step, not both")
    if args.rates:
        return args.rates
    if all(value is None for value in ramp):
        raise _Stop("expected the rates to send at: --rates 50,100,200 or --from 50 --to "
                    "800 --step 50 (or --speed 1x with a record file)")
    if any(value is None for value in ramp):
        raise _Stop("a ramp needs all three of --from, --to and --step")
    if args.from_rate > args.to_rate:
        raise _Stop(f"--from {args.from_rate:g} is above --to {args.to_rate:g}")
    rates, index = [], 0
    while args.from_rate + index * args.step <= args.to_rate * (1 + 1e-9):
        rates.append(round(args.from_rate + index * args.step, 6))
        index += 1
    return rates


def _check(args: argparse.Namespace) -> list[float]:
    """The usage errors the parser cannot see; returns the rates."""
    given = [name for name, value in (("FILE", args.file), ("--urls", args.urls),
                                      ("--access-log", args.access_log)) if value]
    if len(given) != 1:
        raise _Stop("expected exactly one source of requests: a record FILE, --urls FILE "
                    f"or --access-log FILE (got {' and '.join(given) or 'none'})")
    if len(args.target) > 2:
        raise _Stop(f"at most two --target to compare (got {len(args.target)})")
    if len({str(target) for target in args.target}) < len(args.target):
        raise _Stop("the two --target are the same")
    return _ramp(args)


def run_replay(args: argparse.Namespace) -> int:
    """Runs `gproxyctl replay` with parsed ARGS; returns the exit status."""
    try:
        rates = _check(args)
        if args.plot:
            from .plot import PlotError, check
            try:
                check(args.plot)
            except PlotError as error:
                raise _Stop(str(error)) from None
        for option, path in (("--csv", args.csv), ("--json", args.json),
                             ("--plot", args.plot)):
            if path:
                try:
                    open(path, "ab").close()  # now, not after a long ramp
                except OSError as error:
                    raise _Stop(f"{option} {path}: cannot write it: {error.strerror}") from None
        from .sources import SourceError, load
        try:
            source = load(args.file, args.urls, args.access_log)
        except SourceError as error:
            raise _Stop(str(error)) from None
        if args.speed is not None and len(source.recorded) < 2:
            raise _Stop(f"--speed needs at least two recorded requests ({args.file} has "
                        f"{len(source.recorded)})")
        from .runner import Runner
        return Runner(args, source, rates).main()
    except _Stop as stop:
        print(f"gproxyctl replay: {stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        return EX_OK
