"""`gproxyctl`: ask a running gproxyd how production and its shadows compare.

    gproxyctl stats [--watch] [--json] [-c FILE | --admin ADDRESS]
    gproxyctl diff [--route NAME] [--shadow ADDRESS] [--limit N] [--json]
                   [-c FILE | --admin ADDRESS]
    gproxyctl replay [FILE | --urls FILE | --access-log FILE] --target HOST:PORT ...

It reads the admin address from the same config file gproxyd uses (or --admin) and
talks to its admin endpoint (GET /stats, GET /mismatches). `replay` (gproxyd/replay/)
talks to no daemon: it sends load to --target and measures it.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode

from .config import DEFAULT_PATH, ConfigError, load_config
from .exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE, EX_USAGE
from .replay.cli import add_replay_command, run_replay
from .report import differences, table
from .settings import BadValue, address


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gproxyctl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    stats = commands.add_parser("stats", help="production vs shadows, per route")
    _where(stats)
    stats.add_argument("--json", action="store_true", help="print /stats as JSON and exit")
    stats.add_argument("--watch", action="store_true",
                       help="refresh the table every --interval seconds until Ctrl-C")
    stats.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                       help="seconds between two samples (req/s is measured over it)")
    stats.add_argument("--count", type=int, default=0, metavar="N",
                       help="with --watch: stop after N refreshes (0: never)")
    diff = commands.add_parser("diff", help="recent answers where a shadow differed from "
                                            "production")
    _where(diff)
    diff.add_argument("--route", metavar="NAME", help="only this route's")
    diff.add_argument("--shadow", metavar="ADDRESS", help="only this shadow's (as in shadow =)")
    diff.add_argument("--limit", type=int, default=10, metavar="N",
                      help="at most N exchanges, newest first (default: 10; 0: all kept)")
    diff.add_argument("--json", action="store_true", help="print /mismatches as JSON")
    add_replay_command(commands)
    return parser


def _where(command: argparse.ArgumentParser) -> None:
    """-c FILE or --admin ADDRESS: where the admin endpoint is."""
    group = command.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", default=DEFAULT_PATH, metavar="FILE",
                       help=f"gproxyd's config file, for the admin address (default: "
                            f"{DEFAULT_PATH})")
    group.add_argument("--admin", metavar="ADDRESS",
                       help="the admin endpoint's host:port or unix:/path (instead of "
                            "reading the config file)")


def fetch(address, path: str = "/stats", timeout: float = 5.0) -> dict:
    """GET an admin endpoint path as JSON. address: settings.Address."""
    if address.family == socket.AF_UNIX:
        return json.loads(_get_unix(address.path, path, timeout))
    host = f"[{address.host}]" if address.family == socket.AF_INET6 else address.host
    with urllib.request.urlopen(f"http://{host}:{address.port}{path}",
                                timeout=timeout) as response:
        return json.loads(response.read())


def _get_unix(sock_path: str, path: str, timeout: float) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: gproxyd\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        raise OSError(f"admin endpoint answered {head.splitlines()[0]!r}")
    return body


def _admin_address(args):
    """The admin endpoint's address from --admin or the config file; exits on errors."""
    if args.admin:
        try:
            return address(args.admin)
        except BadValue as error:
            print(f"gproxyctl: --admin: {error}", file=sys.stderr)
            sys.exit(EX_USAGE)
    try:
        config = load_config(args.config, [], {})
    except ConfigError as error:
        print(f"gproxyctl: {error}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    if config.settings.admin is None:
        print(f"gproxyctl: {args.config}: admin is off (expected admin = host:port to read "
              "stats)", file=sys.stderr)
        sys.exit(EX_CONFIG)
    return config.settings.admin


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        return run_replay(args)
    address = _admin_address(args)
    path = "/stats"
    try:
        if args.command == "diff":
            query = {key: value for key, value in (("route", args.route),
                                                    ("shadow", args.shadow),
                                                    ("limit", args.limit)) if value}
            path = "/mismatches" + (f"?{urlencode(query)}" if query else "")
            document = fetch(address, path)
            if args.json:
                print(json.dumps(document, indent=1))
            else:
                sys.stdout.write(differences(document["mismatches"]))
            return EX_OK
        if args.json:
            print(json.dumps(fetch(address), indent=1))
            return EX_OK
        previous, taken = fetch(address), time.monotonic()
        shown = 0
        while True:
            time.sleep(args.interval)
            document, now = fetch(address), time.monotonic()
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
                sys.stdout.write(time.strftime("%H:%M:%S ") + f"gproxyd at {address}\n")
            # Rates over the time between the two readings of the numbers (the daemon's
            # `time`: /stats may be served from a cache up to a second old; the same
            # reading twice shows no rate).
            if "time" in document and "time" in previous:
                elapsed = document["time"] - previous["time"]
            else:
                elapsed = now - taken
            sys.stdout.write(table(document, previous, elapsed))
            sys.stdout.flush()
            shown += 1
            if not args.watch or (args.count and shown >= args.count):
                return EX_OK
            previous, taken = document, now
    except (OSError, urllib.error.URLError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        print(f"gproxyctl: cannot read {path.split('?')[0][1:]} from http://{address}{path}: "
              f"{reason} "
              "(is gproxyd running with this config?)", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
