"""`gproxyctl`: ask a running gproxyd how production and its shadows compare.

    gproxyctl stats [--watch] [--json] [-c FILE | --admin ADDRESS] [--admin-token FILE]
    gproxyctl diff [--route NAME] [--shadow ADDRESS] [--limit N] [--json]
                   [-c FILE | --admin ADDRESS] [--admin-token FILE]
    gproxyctl check [-c FILE | --admin ADDRESS] [--admin-token FILE]
    gproxyctl reload [-c FILE] [--admin ADDRESS] [--admin-token FILE] [--timeout SECONDS]
    gproxyctl config [-c FILE]
    gproxyctl replay [FILE | --urls FILE | --access-log FILE] --target HOST:PORT ...

It finds the admin endpoint with --admin, else GPROXYD_ADMIN, else the admin key of the
config file gproxyd uses (-c, GPROXYD_CONFIG, /etc/gproxyd/gproxyd.conf; read even when
the rest of the file has errors), and talks to it (GET /stats, GET /mismatches), with
the bearer token of --admin-token FILE, else GPROXYD_ADMIN_TOKEN (a file), when the
endpoint is on another host and asks for one (admin-token).
`config` only reads the file; `replay` (gproxyd/replay/) talks to no daemon: it sends
load to --target and measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode

from .config import DEFAULT_PATH, ConfigError, admin_in_file, effective_text, load_config
from .dashboard import TokenError, read_token
from .exitcodes import EX_CONFIG, EX_FAILURE, EX_OK, EX_UNAVAILABLE, EX_USAGE
from .replay.cli import add_replay_command, run_replay
from .report import differences, recent, table
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
                       help="refresh the table every --interval seconds until Ctrl-C; "
                            "p50 and p99 are those of the last second (from gproxyd's "
                            "/stats/history), not since start")
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
    check = commands.add_parser("check", help="the running daemon's configuration: which "
                                              "file and generation serve, how the last "
                                              "reload went, and whether the file on disk "
                                              "would load now")
    _where(check)
    check.add_argument("--json", action="store_true", help="print the daemon's reload "
                                                           "status and the file's errors "
                                                           "as JSON")
    reload = commands.add_parser("reload", help="check the config file, then have the "
                                                "daemon reload it (SIGHUP) and wait for "
                                                "the outcome")
    _where(reload)
    reload.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the daemon to report the reload "
                             "(default: 30)")
    config = commands.add_parser("config", help="the effective configuration gproxyd "
                                                "reads from the config file (every key, "
                                                "defaults marked), like nginx -T")
    config.add_argument("-c", "--config", default=None, metavar="FILE",
                        help=f"the config file (default: GPROXYD_CONFIG, else "
                             f"{DEFAULT_PATH})")
    add_replay_command(commands)
    return parser


def _where(command: argparse.ArgumentParser) -> None:
    """-c FILE or --admin ADDRESS: where the admin endpoint is."""
    group = command.add_mutually_exclusive_group()
    group.add_argument("-c", "--config", default=None, metavar="FILE",
                       help=f"gproxyd's config file, for the admin address (default: "
                            f"GPROXYD_CONFIG, else {DEFAULT_PATH})")
    group.add_argument("--admin", metavar="ADDRESS",
                       help="the admin endpoint's host:port or unix:/path (default: "
                            "GPROXYD_ADMIN, else the config file's admin key)")
    command.add_argument("--admin-token", metavar="FILE", default=None,
                         help="a file holding the endpoint's bearer token (its admin-token), "
                              "for an endpoint on another host (default: "
                              "GPROXYD_ADMIN_TOKEN)")


class Endpoint:
    """The admin endpoint gproxyctl talks to: its address (settings.Address) and the
    bearer token to present ('' for none)."""

    def __init__(self, address, token: str = ""):
        self.address, self.token = address, token

    def __str__(self) -> str:
        return str(self.address)


def fetch(endpoint, path: str = "/stats", timeout: float = 5.0) -> dict:
    """GET an admin endpoint path as JSON. endpoint: an Endpoint, or a settings.Address
    (no token)."""
    address, token = getattr(endpoint, "address", endpoint), getattr(endpoint, "token", "")
    if address.family == socket.AF_UNIX:
        return json.loads(_get_unix(address.path, path, timeout))
    host = f"[{address.host}]" if address.family == socket.AF_INET6 else address.host
    request = urllib.request.Request(f"http://{host}:{address.port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
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


def _config_path(args) -> str:
    return args.config or os.environ.get("GPROXYD_CONFIG") or DEFAULT_PATH


def _admin_address(args):
    """The admin endpoint's address: --admin, GPROXYD_ADMIN (when no -c is given), or
    the config file's admin key; exits on errors."""
    given, source = args.admin, "--admin"
    if given is None and args.config is None and os.environ.get("GPROXYD_ADMIN"):
        given, source = os.environ["GPROXYD_ADMIN"], "GPROXYD_ADMIN"
    if given is not None:
        try:
            found = address(given) if given.strip().lower() != "off" else None
        except BadValue as error:
            print(f"gproxyctl: {source}: {error}", file=sys.stderr)
            sys.exit(EX_USAGE)
        if found is None:
            print(f"gproxyctl: {source}: off (expected the admin endpoint's host:port)",
                  file=sys.stderr)
            sys.exit(EX_USAGE)
        return found
    path = _config_path(args)
    try:
        found = admin_in_file(path)
    except ConfigError as error:
        print(f"gproxyctl: {error}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    if found is None:
        print(f"gproxyctl: {path}: admin is off (expected admin = host:port to read "
              "stats)", file=sys.stderr)
        sys.exit(EX_CONFIG)
    return found


def _admin_token(args) -> str:
    """The bearer token in --admin-token FILE, else GPROXYD_ADMIN_TOKEN's file ('' for
    none); exits on errors."""
    path = getattr(args, "admin_token", None) or os.environ.get("GPROXYD_ADMIN_TOKEN", "")
    try:
        return read_token(path)
    except TokenError as error:
        print(f"gproxyctl: {error}".replace("admin-token:", "--admin-token:", 1),
              file=sys.stderr)
        sys.exit(EX_USAGE)


def _file_errors(path: str) -> list[str]:
    """The config file's errors as gproxyd would report them (none: it loads)."""
    try:
        load_config(path, [], os.environ)
    except ConfigError as error:
        return str(error).splitlines()
    return []


def _check(address, fallback: str, as_json: bool) -> int:
    """gproxyctl check: the daemon's reload status and its config file on disk (the one
    a reload reads: the daemon's own, else `fallback`), side by side."""
    status = fetch(address).get("reload")
    path = status["config"] if status else fallback
    errors = _file_errors(path)
    if as_json:
        print(json.dumps({"reload": status, "file": path, "file_errors": errors}, indent=1))
    else:
        if status is None:
            print(f"gproxyd at {address}: serving (it does not report its configuration)")
        else:
            loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["time"]))
            print(f"gproxyd at {address}: serving {status['config']}, generation "
                  f"{status['generation']}, loaded {loaded}")
            if status["ok"]:
                print("last reload: succeeded" if status["generation"] > 1 else
                      "last reload: none since start")
            else:
                failed = time.strftime("%Y-%m-%d %H:%M:%S",
                                       time.localtime(status["failed_at"]))
                print(f"last reload: FAILED at {failed}, still serving generation "
                      f"{status['generation']}: {status['error']}")
        print(f"{path} on disk: " + ("loads" if not errors else
                                     f"{len(errors)} error(s), a reload would fail:"))
        for line in errors:
            print(f"  {line}")
    return EX_CONFIG if errors or (status is not None and not status["ok"]) else EX_OK


def _reload(address, timeout: float) -> int:
    """gproxyctl reload: check the daemon's config file (what ExecReload does), signal
    it, then wait to see the reload take or fail."""
    before = fetch(address)
    status, pid = before.get("reload"), before.get("pid")
    if status is None or not pid:
        print(f"gproxyctl: gproxyd at {address} does not report its process id or reload "
              "status (expected a gproxyd of this version)", file=sys.stderr)
        return EX_UNAVAILABLE
    errors = _file_errors(status["config"])
    if errors:
        for line in errors:
            print(f"gproxyctl: {line}", file=sys.stderr)
        print("gproxyctl: not reloading: the running daemon keeps its configuration",
              file=sys.stderr)
        return EX_CONFIG
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as error:
        print(f"gproxyctl: cannot signal gproxyd (pid {pid}): {error.strerror} (run as "
              "gproxyd's user or root)", file=sys.stderr)
        return EX_FAILURE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = fetch(address)["reload"]
        if now["generation"] > status["generation"]:
            print(f"reloaded {now['config']}: generation {now['generation']}")
            return EX_OK
        if now["failed_at"] not in (None, status["failed_at"]):
            print(f"gproxyctl: reload failed, still serving generation "
                  f"{now['generation']}: {now['error']}", file=sys.stderr)
            return EX_CONFIG
    print(f"gproxyctl: gproxyd (pid {pid}) did not report the reload within {timeout:g}s",
          file=sys.stderr)
    return EX_UNAVAILABLE


def _intervals(address, seconds: float) -> dict | None:
    """report.recent()'s numbers from the daemon's /stats/history over the last `seconds`;
    None from a gproxyd without it (older: then --watch shows since-start percentiles)."""
    try:
        history = fetch(address, f"/stats/history?since={max(2.0, seconds + 1):g}")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    except OSError as error:  # over a unix socket: _get_unix says what it answered
        if " 404 " in str(error):
            return None
        raise
    return recent(history, seconds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "replay":
        return run_replay(args)
    if args.command == "config":
        try:
            sys.stdout.write(effective_text(load_config(_config_path(args), [],
                                                        os.environ)))
        except ConfigError as error:
            for line in str(error).splitlines():
                print(f"gproxyctl: {line}", file=sys.stderr)
            return EX_CONFIG
        return EX_OK
    address = Endpoint(_admin_address(args), _admin_token(args))
    path = "/stats"
    try:
        if args.command == "check":
            return _check(address, _config_path(args), args.json)
        if args.command == "reload":
            return _reload(address, args.timeout)
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
        with_history = args.watch
        while True:
            time.sleep(args.interval)
            document, now = fetch(address), time.monotonic()
            intervals = None
            if with_history:
                intervals = _intervals(address, args.interval)
                with_history = intervals is not None
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
                sys.stdout.write(time.strftime("%H:%M:%S ") + f"gproxyd at {address}\n")
                if intervals is not None:
                    sys.stdout.write(f"req/s over the last {args.interval:g}s; p50 and p99 "
                                     "of the last second's requests\n")
            # Rates over the time between the two readings of the numbers (the daemon's
            # `time`: /stats may be served from a cache up to a second old; the same
            # reading twice shows no rate).
            if "time" in document and "time" in previous:
                elapsed = document["time"] - previous["time"]
            else:
                elapsed = now - taken
            sys.stdout.write(table(document, previous, elapsed, intervals))
            sys.stdout.flush()
            shown += 1
            if not args.watch or (args.count and shown >= args.count):
                return EX_OK
            previous, taken = document, now
    except urllib.error.HTTPError as error:
        if error.code != 403:
            raise
        print(f"gproxyctl: gproxyd at {address} refused {path.split('?')[0]} (403): this "
              "host is not in its admin-allow, or it wants a bearer token (--admin-token "
              "FILE or GPROXYD_ADMIN_TOKEN)", file=sys.stderr)
        return EX_UNAVAILABLE
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
