"""Rendering the example config and the man pages from the declarations they describe.

`make docs` (python3 tools/docs.py) rewrites etc/gproxyd.conf and the man pages;
tests/test_docs.py fails when a committed copy differs from what is rendered here. Option
names, types, defaults and help come from settings.GLOBAL_OPTIONS and
settings.ROUTE_OPTIONS, gproxyctl's commands and options from its argparse parser
(ctl.build_parser), exit statuses from exitcodes.EXIT_CODES; this module adds the prose
around them. It is a build tool: the installed package neither ships nor needs it.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

SOURCE_ROOT = Path(__file__).resolve().parent.parent
# The pages describe this source tree, not whatever gproxyd happens to be installed.
sys.path.insert(0, str(SOURCE_ROOT))

from gproxyd import __version__, ctl, exitcodes
from gproxyd.config import DEFAULT_PATH
from gproxyd.exitcodes import EX_CONFIG, EX_FAILURE, EX_OK, EX_UNAVAILABLE, EX_USAGE, EXIT_CODES
from gproxyd.settings import GLOBAL_OPTIONS, ROUTE_BY_NAME, ROUTE_OPTIONS, Option, boolean

REGENERATE = "make docs"

# The example route of etc/gproxyd.conf. Its keys are looked up in the registry, so a
# renamed option breaks rendering instead of silently documenting a key that is gone.
EXAMPLE_ROUTE_NAME = "web"
EXAMPLE_ROUTE = {"listen": "127.0.0.1:8080", "production": "127.0.0.1:8081"}
EXAMPLE_ROUTE_COMMENTED = {"shadow": "127.0.0.1:8082, 127.0.0.1:8083"}

# Illustrations for options whose default is empty, by metavar (the kind of value).
# test_docs.py checks that every such option gets one and that it parses.
SAMPLE_BY_METAVAR = {"USER": "gproxyd", "GROUP": "gproxyd", "PATH": "/run/gproxyd/gproxyd.pid",
                     "NUMBER": "42", "MODULE": "gproxyd.trace",
                     "NAMES": "Content-Type, Cache-Control",
                     "PATHS": "$.timestamp, $.items[*].updated_at",
                     "ADDRESS": "127.0.0.1:8084", "FILTER": "GET HEAD OPTIONS",
                     "DURATION": "2ms", "URL": "sqlite:////var/lib/gproxyd/jobs.db",
                     "MODE": "0660", "OWNER": "gproxyd:www-data",
                     "NETWORKS": "10.0.0.0/8, fd00::/8",
                     "FILE": "/etc/gproxyd/admin.token",
                     "PEM": "/etc/gproxyd/tls/api.pem", "HOST": "api.internal"}

# A complete, realistic file for gproxyd.conf(5); test_docs.py loads it with load_config.
MAN_EXAMPLE = """\
[gproxyd]
admin = 127.0.0.1:9901
log-file = /var/log/gproxyd/gproxyd.log   ; reopened on SIGUSR1

# The web site: production answers, two candidates get a tenth of the traffic.
[route web]
listen = [::]:8080
production = 10.0.0.5:80
shadow = 10.0.0.6:80, unix:/run/candidate/http.sock
shadow-sample = 10%
protocol = http

[route cache]
listen = unix:/run/gproxyd/redis.sock
production = 10.0.0.9:6379
idle-timeout = 1h
protocol = redis
"""


def example_value(option: Option) -> str:
    """A value to show in `key = value` examples: valid for the option, never empty."""
    for table in (EXAMPLE_ROUTE, EXAMPLE_ROUTE_COMMENTED):
        if option.name in table and ROUTE_BY_NAME.get(option.name) is option:
            return table[option.name]
    if option.default:
        return option.default
    return SAMPLE_BY_METAVAR.get(option.metavar, "")


def command_line(option: Option) -> str:
    """How the flag is written: a yes/no option may also be given bare (`--daemonize`)."""
    if option.parse is boolean:
        return f"{option.flag} [{option.metavar}]"
    return f"{option.flag} {option.metavar}"


def describe_default(option: Option) -> str:
    if option.default is None:
        return "none (required)"
    return option.default or "empty"


# --- the example config ----------------------------------------------------------------

def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=79, initial_indent="; ", subsequent_indent="; ",
                         break_on_hyphens=False, break_long_words=False)


def _conf_entry(option: Option, in_route: bool) -> list[str]:
    lines = _comment(option.help)
    if not in_route:
        lines += _comment(f"Command line: {command_line(option)}; "
                          f"environment: {option.env}.")
    if in_route and option.name in EXAMPLE_ROUTE:
        if option.default is None:
            lines.append("; Required.")
        lines.append(f"{option.name} = {EXAMPLE_ROUTE[option.name]}")
    elif in_route and option.name in EXAMPLE_ROUTE_COMMENTED:
        lines.append(f"; Default: {describe_default(option)}. For example:")
        lines.append(f";{option.name} = {EXAMPLE_ROUTE_COMMENTED[option.name]}")
    elif option.default is None:
        raise ValueError(f"required option {option.name} has no value in EXAMPLE_ROUTE")
    else:
        lines.append(f";{option.name} = {option.default}".rstrip())
    return lines + [""]


def render_example_config() -> str:
    """etc/gproxyd.conf: every key with its help; commented-out keys show their default."""
    unknown = set(EXAMPLE_ROUTE).union(EXAMPLE_ROUTE_COMMENTED).difference(ROUTE_BY_NAME)
    if unknown:
        raise ValueError(f"EXAMPLE_ROUTE names keys the registry lacks: {sorted(unknown)}")
    lines = _comment(
        f"gproxyd configuration ({DEFAULT_PATH}); the full description is gproxyd.conf(5).")
    lines += [";"]
    lines += _comment(
        f"Generated from gproxyd/settings.py by `{REGENERATE}`. Comments start with ';' "
        "or '#'. A commented-out key shows its default: remove the ';' to change it.")
    lines += [";"]
    lines += _comment(
        "[gproxyd] holds the process-wide options; each is also a command-line flag and a "
        "GPROXYD_* environment variable (precedence: defaults < file < environment < "
        "command line). Each [route NAME] section is one listener and the backends its "
        "connections are relayed to; add as many as needed, each with its own listen "
        "address. Check the file with `gproxyd --check-config -c FILE`; reload it with "
        "SIGHUP (systemctl reload gproxyd).")
    lines += ["", "[gproxyd]", ""]
    for option in GLOBAL_OPTIONS:
        lines += _conf_entry(option, in_route=False)
    lines += [f"[route {EXAMPLE_ROUTE_NAME}]", ""]
    for option in ROUTE_OPTIONS:
        lines += _conf_entry(option, in_route=True)
    return "\n".join(lines).rstrip("\n") + "\n"


# --- roff ------------------------------------------------------------------------------

def roff(text: str) -> str:
    """Plain text made safe for a roff text line or macro argument.

    Hyphens become minus signs and quotes ASCII quotes, so that flags, keys and values
    copied from the rendered page work when pasted.
    """
    return (text.replace("\\", "\\e").replace("-", "\\-")
            .replace("'", "\\(aq").replace("`", "\\(ga"))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _line(text: str) -> str:
    """One roff text line; one starting with '.' or a quote would be read as a request."""
    line = roff(text)
    return "\\&" + line if line.startswith((".", "'")) else line


def _text(text: str) -> str:
    """Roff text lines, one sentence a line as roff wants (it then spaces sentences right)."""
    return "\n".join(_line(sentence) for sentence in _SENTENCE_END.split(text))


# Flags, keys, variables and paths are set in bold or italic and never hyphenated (\%):
# a reader must see GPROXYD_DRAIN_TIMEOUT whole to copy it.
def _bold(text: str) -> str:
    return f"\\fB\\%{roff(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI\\%{roff(text)}\\fR"


def _example(text: str) -> list[str]:
    """An indented literal block in a paragraph of its own, one line per line of TEXT."""
    body = [_line(line) if line else "" for line in text.splitlines()]
    return [".PP", ".RS 4", ".EX", *body, ".EE", ".RE"]


def _header(name: str, section: int, manual: str, sources: str) -> list[str]:
    return [f'.\\" Generated from {sources} by `{REGENERATE}`; do not edit.',
            f'.TH {roff(name.upper())} {section} "" "gproxyd {__version__}" "{manual}"']


def _flag_tag(option: Option) -> str:
    if option.parse is boolean:
        return f"{_bold(option.flag)} [{_italic(option.metavar)}]"
    return f"{_bold(option.flag)} {_italic(option.metavar)}"


def _global_option_item(option: Option) -> list[str]:
    lines = [".TP", _flag_tag(option), _text(option.help)]
    if option.parse is boolean:
        lines.append(f"A bare {_bold(option.flag)} means {_bold('yes')}.")
    return lines + [".br",
                    f"Default: {_bold(describe_default(option))}",
                    ".br",
                    f"Environment: {_bold(option.env)}",
                    ".br",
                    f"Config file: {_bold(option.name)} in {_bold('[gproxyd]')}"]


# Which statuses each command can exit with; what a status means is exitcodes.EXIT_CODES'.
GPROXYD_EXITS = (EX_OK, EX_FAILURE, EX_USAGE, EX_CONFIG)
GPROXYCTL_EXITS = (EX_OK, EX_FAILURE, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG)


def _sysexits_name(code: int) -> str | None:
    """The sysexits.h name exitcodes.py gives CODE, if it is one (os mirrors sysexits.h)."""
    for name, value in vars(exitcodes).items():
        if name.startswith("EX_") and value == code and getattr(os, name, None) == code:
            return name
    return None


def _exit_status(codes: tuple[int, ...]) -> list[str]:
    """The EXIT STATUS section for a command that exits with CODES."""
    unknown = set(codes).difference(code for code, _ in EXIT_CODES)
    if unknown:
        raise ValueError(f"exit statuses missing from exitcodes.EXIT_CODES: {sorted(unknown)}")
    lines = ['.SH "EXIT STATUS"']
    for code, meaning in EXIT_CODES:
        if code in codes:
            name = _sysexits_name(code)
            lines += [".TP", _bold(str(code)) + (f" ({roff(name)})" if name else ""),
                      _text(meaning)]
    return lines


# gproxyd(8) and gproxyd.conf(5) both explain hooks (the hooks key refers to it).
HOOKS_SECTION = [
    _text("A route's hooks option names a Python module (a dotted name, or a .py file) "
              "that may define on_connect(conn), on_data(conn, data), on_response(conn, "
              "backend, data) and on_finish(conn, backend). on_data returns the bytes to "
              "relay, None to drop them, or (bytes, [backend names]) to send them only to "
              "those backends; on_response returns what reaches the client (for "
              "production; shadows' answers are shown but never reach it). conn has route, "
              "client, backends, state (a dict), reply(bytes), close(), and production, "
              "which on_connect may set to an address or a list tried in order. Hooks run "
              "in the connection's greenlets and may block in gevent-friendly ways. A hook "
              "that raises closes only its connection and is logged with its traceback; a "
              "module that cannot be imported is a configuration error, at start and on "
              "reload (which imports it again). gproxyd.trace is a ready-made module that "
              "logs every chunk. Routes without hooks never call Python per chunk."),
    ".PP",
    _text("A hook that holds the event loop longer than hook-timeout (default 2s) without "
          "yielding, such as a CPU loop, is interrupted: it is logged with its name and "
          "stack, its connection is closed, and every other connection, signal and the "
          "admin endpoint are served again; hook-timeout = 0 turns the watchdog off. A "
          "hook waiting in a gevent-friendly way has yielded and is never interrupted; a "
          "loop held outside any hook is logged once per stall, with its stack, and not "
          "interrupted. Whatever a hook raises, SystemExit, KeyboardInterrupt and "
          "GreenletExit included, and a gevent.Timeout it leaves running, closes only its "
          "own connection. A hooks module whose import calls sys.exit() is a "
          "configuration error like any other import error."),
]


def render_man8() -> str:
    """man/gproxyd.8: the command, its options, signals and exit status."""
    lines = _header("gproxyd", 8, "System Manager's Manual",
                    "gproxyd/settings.py and gproxyd/exitcodes.py")
    lines += [
        ".SH NAME",
        "gproxyd \\- transparent TCP proxy with shadow traffic and live benchmarking",
        ".SH SYNOPSIS",
        ".B gproxyd",
        ".RB [ \\-c",
        ".IR FILE ]",
        ".RB [ \\-\\-check\\-config ]",
        ".RI [ options ]",
        ".br",
        ".B gproxyd demo",
        ".SH DESCRIPTION",
        _text("gproxyd is a transparent TCP proxy. For every route of its configuration "
              "file it listens on one address and relays each client connection, byte for "
              "byte and in both directions, to the route's production backend."),
        ".PP",
        _text("A route may also have shadow backends. Each shadow gets a copy of the bytes "
              "the client sends; what a shadow answers is read and discarded. A shadow that "
              "is slow, down or falls too far behind is dropped for that connection, and "
              "never slows down or breaks the connection to production."),
        ".PP",
        _text("A route can be told which protocol it carries (http, redis) to "
              "measure requests and responses instead of plain connections; the bytes are "
              "never changed by it. Counters and latency histograms are served by the admin "
              "HTTP endpoint (/stats, /metrics)."),
        ".PP",
        f"{_bold('gproxyd demo')} " + _text(
            "is a self-contained tour that needs no configuration file: it starts a small "
            "HTTP production server and a slower candidate on free loopback ports, puts a "
            "route in front of production with the candidate as its shadow, sends HTTP "
            "traffic through it and prints what each side saw."),
        ".PP",
        _text("Routes and global options are read from the configuration file described in"),
        ".BR gproxyd.conf (5).",
        _text("Each global option can also be given as a command-line option and as a "
              "GPROXYD_* environment variable; precedence is defaults < file < environment "
              "< command line. The same loader serves start-up, --check-config and reload. "
              "A mistake is reported without a traceback, naming the file, line, key, what "
              "is wrong and what was expected:"),
        *_example(f"gproxyd: {DEFAULT_PATH}:12: listen: bad port 'notaport' "
                  "(expected 1-65535)"),
        ".PP",
        _text("Under systemd (NOTIFY_SOCKET set) gproxyd tells the service manager it is "
              "ready once every listen address is bound, and sends watchdog pings when "
              "WatchdogSec= asks for them. Binding a port below 1024 needs root or "
              "CAP_NET_BIND_SERVICE; the user and group options drop privileges after "
              "binding."),
        ".SH OPTIONS",
        ".TP",
        f"{_bold('-c')} {_italic('FILE')}, {_bold('--config')} {_italic('FILE')}",
        _text("Read the configuration from FILE."),
        ".br",
        f"Default: {_bold(DEFAULT_PATH)}",
        ".br",
        f"Environment: {_bold('GPROXYD_CONFIG')}",
        ".TP",
        _bold("--check-config"),
        _text("Load and validate the configuration (file, environment and command line) as "
              "start-up would, print a summary of the routes and exit: 0 when it is good, "
              "78 when it is not. Nothing is bound or started."),
        ".TP",
        _bold("--version"),
        _text("Print the version and exit."),
        ".TP",
        f"{_bold('-h')}, {_bold('--help')}",
        _text("Print a summary of the options and exit."),
        ".PP",
        _text("The global options below are the keys of the [gproxyd] section of"),
        ".BR gproxyd.conf (5);",
        _text("a value given here overrides the environment and the file."),
    ]
    for option in GLOBAL_OPTIONS:
        lines += _global_option_item(option)
    lines += [
        ".SH STATISTICS",
        _text("gproxyd measures production and every shadow side by side on the live "
              "traffic. With protocol = tcp a request is a connection, timed to its first "
              "response byte; with protocol = http each HTTP/1.x request is timed from "
              "fully sent to response complete (5xx counts as an error); with protocol = "
              "redis each command, pipelines included (error replies count as errors). A "
              "shadow's clock starts when gproxyd wrote the request to it (after "
              "shadow-write-delay), and a request written while an earlier answer was "
              "still owed is timed from when that answer was complete, so pipelined "
              "requests are compared by the time the backend spent on each. A stream the "
              "parser cannot follow is measured as tcp from there on, and its bytes are "
              "relayed untouched."),
        ".PP",
        _text("The admin endpoint (the admin option, by default 127.0.0.1:9901) serves "
              "GET /stats (JSON: per route, connections, and for production and each "
              "shadow requests, errors, dropped, mismatches and latency_ms p50, p90, p99, "
              "p999, max), GET /mismatches (see COMPARING ANSWERS), GET /metrics "
              "(Prometheus text, metric names prefixed gproxyd_, "
              "labels route and backend) and GET /healthz (200 ok, or 503 draining once the "
              "daemon is stopping; the endpoint answers until the drain is over). /stats "
              "also has pid (the process to signal) and reload: generation, time, config, "
              "ok, error and failed_at of the last reload; /metrics has them as "
              "gproxyd_config_*. /stats and /metrics are rendered "
              "at most once a second, so either may be up to 1 s old (time in /stats says "
              "when its numbers were read). The endpoint holds at most 64 connections (a new "
              "one closes the one that has waited longest for a request, or itself if every "
              "one is being answered) and closes a connection that has not sent a complete "
              "request 10 s after connecting or sits idle 5 s between requests. /stats also "
              "has shadow_memory (shadow-memory: limit, queued, high_water, send_buffers, "
              "drops and dropped_bytes by cause), /metrics gproxyd_shadow_memory_*. Every "
              "stats-interval a summary line per route is logged."),
        ".PP",
        _text("GET / is a dashboard for a browser: per route, production and each shadow "
              "side by side, updated every second (requests a second, p50 and p99 over "
              "time, errors, drops, mismatches and the paths that differ, the latency "
              "verdict); it needs nothing from the Internet. GET /stats/history?route=NAME"
              "&since=SECONDS returns what it draws: per backend, a point a second for the "
              "last 15 minutes and a point per 10 s for the last hour (requests, errors, "
              "dropped, compared, mismatches and the p50, p90, p99 and max latency of that "
              "interval), 144 KB per backend; with workers, of the merged numbers. Clients "
              "on loopback may always use the endpoint; others only from admin-allow's "
              "networks, and with admin-token's bearer token when it is set (403 "
              "otherwise; /healthz needs no token)."),
        ".BR gproxyctl (1)",
        _text("prints production against each shadow from the same config file."),
        ".SH \"COMPARING ANSWERS\"",
        _text("On http and redis routes every shadow answer is paired with production's "
              "answer to the same request (the n-th answer of each backend on a connection "
              "answers the same request) and compared after production's answer has "
              "reached the client (compare = body: status and body, or the whole RESP "
              "reply; compare = status: the status code; compare-headers adds named "
              "header fields). JSON bodies (Content-Type application/json or +json) and "
              "RESP replies are compared structurally: a difference is named by its path, "
              "$.items[3].price in JSON, [2] or [name] inside a RESP array or map, reply "
              "for a whole scalar reply. Other bodies are equal or not, with the first "
              "differing byte. Content-Encoding gzip and deflate are undone (at most 8 MiB "
              "decoded), chunked bodies are compared as their payload. Answers over "
              "compare-max-body are compared by length and BLAKE2b hash of the body as "
              "transferred. compare-ignore-fields names JSON paths never counted."),
        ".PP",
        _text("A baseline (a second instance of production's build) gets the same traffic; "
              "the paths where its answers differ from production's are noise: a "
              "candidate answer that differs only there counts as noise, not as a "
              "mismatch. The baseline is judged first for each request, so noise seen in "
              "that very exchange is already known. shadow-filter keeps requests away "
              "from the shadows (HTTP methods, or Redis read-only commands): whole "
              "requests are mirrored or not, decided as soon as the method or command "
              "name is read, and pairing skips the requests the shadows did not get. "
              "Memory is bounded per connection: at most 1000 exchanges and max(4 MiB, "
              "2 x compare-max-body) of answers wait for their pair; beyond that the "
              "oldest is given up and counted as uncompared."),
        ".PP",
        _text("GET /stats adds, per shadow, compared, mismatches, noise, uncompared, the "
              "top mismatch_paths, role (candidate or baseline) and latency_diff_ms; per "
              "route noise_paths (the baseline's differing paths with the share of its "
              "answers they differed in) and filtered. GET /mismatches returns the most "
              "recent differing exchanges (compare-samples per route), newest first, "
              "narrowed by ?route=NAME&shadow=ADDRESS&limit=N: request line or command, "
              "differing paths, both statuses and the first 200 characters of both "
              "bodies, or only their hashes with compare-sample-bodies = no."),
        ".PP",
        _text("Latency verdict: every compared request gives a pair (production's latency, "
              "the shadow's). A uniform sample of 4096 pairs per shadow is kept (reservoir "
              "sampling). latency_diff_ms.p50 is the median of the paired differences "
              "(shadow minus production, request by request); p99 is the difference of "
              "the two 99th percentiles. Each has a 95% distribution-free confidence "
              "interval (p50_low..p50_high, p99_low..p99_high): order statistics at the "
              "ranks the binomial distribution gives (normal approximation); the p99's "
              "combines the two sides' own 97.5% intervals, so it is conservative. The "
              "verdict says slower or faster only when the interval excludes 0 and the "
              "difference exceeds verdict-threshold (default: 5% of production's value "
              "at that percentile, at least 0.1 ms); otherwise no significant difference. "
              "With fewer than 20 pairs it compares the p99s of the two histograms."),
        ".SH \"BEANSTALKD ARCHIVE\"",
        _text("On a route with protocol = beanstalkd and an archive, a well-formed put whose "
              "delay exceeds archive-after (body at most 65535 bytes) is stored in the "
              "archive, committed before the client reads INSERTED <id>, and never reaches "
              "beanstalkd; a store that fails answers INTERNAL_ERROR. Archived ids are "
              "2^62 + the store's row id (beanstalkd counts its ids up from 1). peek, "
              "delete, stats-job and kick-job on an archived id are answered from the "
              "archive; release, bury, touch and reserve-job answer NOT_FOUND. Once the "
              "job is in beanstalkd, its archived id keeps working for seven days: those "
              "commands are passed on with beanstalkd's id and answered with the archived "
              "one. stats and stats-tube add the archived jobs to current-jobs-delayed and "
              "total-jobs. Every other command, and everything after a command that is not "
              "well-formed, goes to beanstalkd byte for byte; replies reach the client in "
              "command order."),
        ".PP",
        _text("Every second each process claims the jobs due within archive-lead (a 60 s "
              "lease; MySQL claims with SELECT ... FOR UPDATE SKIP LOCKED, SQLite with "
              "BEGIN IMMEDIATE, so processes and hosts sharing one store never inject the "
              "same job while the lease holds), puts each into beanstalkd with the delay "
              "that remains, the same priority and ttr, and deletes it from the archive "
              "only after INSERTED: at least once. While beanstalkd is unreachable the "
              "jobs stay archived and are tried again, backing off up to 10 s; one log "
              "line per outage. SQLite runs in gevent's threadpool (WAL, synchronous=FULL); "
              "MySQL and MariaDB through PyMySQL. An archive that cannot be opened at start "
              "is an error (exit 1); a reload naming one keeps the old store. GET /stats "
              "shows per route archive: store, archived, archived_total, injected_total, "
              "inject_failures, overdue_seconds; /metrics the same as gproxyd_archive_*."),
        ".SH HOOKS",
        *HOOKS_SECTION,
        ".SH WORKERS",
        _text("With workers = N above 1, a master process binds every TCP listen address N "
              "times with SO_REUSEPORT, starts N worker processes on those sockets, merges "
              "their statistics for the admin endpoint, restarts a worker that dies, and on "
              "SIGHUP starts new workers on the same sockets before the old ones are "
              "retired, so a reload refuses no connection. A retired worker stops "
              "accepting, serves the connections it has for as long as they last, and "
              "exits after the last one, as one process leaves live connections alone on "
              "a reload. Signals go to the master. Processes are titled gproxyd: master "
              "[N workers] -c FILE and gproxyd: worker K [routes], with (draining) while "
              "they finish."),
        ".PP",
        _text("Every worker reports to the master process twice a second; a worker that "
              "has sent no report for 1.5 seconds (three reports) is considered hung: the "
              "master kills it with SIGKILL, logs it and starts another. A worker that exits "
              "without being asked is restarted after a delay that starts at 0.25 seconds "
              "and doubles with each crash in the last 60 seconds (0.25, 0.5, 1, 2 s); at "
              "the fifth crash within 60 seconds the master logs that it gives up, stops "
              "the other workers and exits with status 1. A worker that cannot start "
              "because of its configuration or its hooks is not restarted: at start-up "
              "gproxyd exits with status 78 and prints the worker's one-line error; on "
              "SIGHUP the reload fails and the running workers keep serving; for a worker "
              "restarted after a crash, the master stops and exits with status 78. On "
              "SIGTERM or SIGINT every worker, retired ones included, drains for up to "
              "drain-timeout; one still running drain-timeout plus 5 seconds after it was "
              "told to stop is killed with SIGKILL, and the kill is logged."),
        ".SH \"TRANSPARENT MODE\"",
        _text("With production = original-dst a route relays each connection to the "
              "address its client originally dialled: read from conntrack (SO_ORIGINAL_DST, "
              "IP6T_SO_ORIGINAL_DST) after an iptables or nftables REDIRECT rule, or the "
              "accepted socket's own address after a TPROXY rule (listen-transparent = "
              "yes); a client that dialled gproxyd's own listen address is closed as a "
              "loop, with one log line. source = client connects to production from the "
              "client's address (IP_TRANSPARENT), which needs policy routing (ip rule add "
              "fwmark 1 lookup 100; ip route add local 0.0.0.0/0 dev lo table 100) and a "
              "rule marking packets of transparent sockets (nft: socket transparent 1 meta "
              "mark set 1; iptables: -m socket --transparent -j MARK --set-mark 1). These "
              "need CAP_NET_ADMIN: started as root with user, gproxyd keeps it (and only "
              "it) after the drop when a route uses source = client or "
              "listen-transparent; under systemd, add it to AmbientCapabilities= and "
              "CapabilityBoundingSet=. The full rules are in the README, Transparent mode."),
        ".SH \"PROXY PROTOCOL\"",
        _text("accept-proxy = v1, v2 or any makes a route require HAProxy's PROXY header "
              "before a client's first byte, within connect-timeout; its client address "
              "is the connection's in logs, hooks (conn.client) and source = client. A "
              "missing or malformed header closes the connection before anything reaches "
              "production, logged at most every 10 seconds per route. send-proxy and "
              "shadow-send-proxy (v1 or v2) begin each production or shadow connection "
              "with a header carrying the client's address and the address it connected "
              "to."),
        ".SH SIGNALS",
        ".TP",
        _bold("SIGHUP"),
        _text("Reload: read the configuration file again, with the same environment and "
              "command line. If it is good it is applied: routes are matched by listen "
              "address, so an unchanged address keeps its socket and gets the new settings, "
              "a removed route stops accepting while its connections finish, and a new "
              "route starts. Live connections keep the settings they were accepted with and "
              "are left alone for as long as they last (drain-timeout does not apply to a "
              "reload), with workers too. If the new configuration has an error, or a new "
              "address cannot be bound, the error is logged, /stats shows it under reload, "
              "and the running configuration stays in force."),
        ".TP",
        f"{_bold('SIGTERM')}, {_bold('SIGINT')}",
        _text("Graceful stop: stop accepting, let live connections finish for up to "
              "drain-timeout, then close what is left and exit. The admin endpoint answers "
              "until then, /healthz with 503 draining. A second SIGTERM or SIGINT closes "
              "every connection at once."),
        ".TP",
        _bold("SIGUSR1"),
        _text("Reopen the log file, after logrotate(8) has moved it away."),
        ".SH ENVIRONMENT",
        ".TP",
        _bold("GPROXYD_CONFIG"),
        _text("The configuration file, like --config."),
        ".TP",
        _bold("GPROXYD_*"),
        _text("One variable per global option, named after it (GPROXYD_LOG_LEVEL for "
              "log-level); see OPTIONS."),
        ".TP",
        _bold("NOTIFY_SOCKET"),
        _text("Set by systemd for Type=notify services: readiness, reload, stop and "
              "watchdog notifications go there."),
        ".SH FILES",
        ".TP",
        _italic(DEFAULT_PATH),
        _text("The configuration file; an annotated example with every key is shipped as "
              "share/doc/gproxyd/gproxyd.conf."),
        *_exit_status(GPROXYD_EXITS),
        ".SH EXAMPLES",
        _text("Check a configuration before installing it:"),
        *_example("gproxyd --check-config -c ./gproxyd.conf"),
        ".PP",
        _text("Run in the foreground with debug logging and no admin endpoint:"),
        *_example("gproxyd -c ./gproxyd.conf --log-level debug --admin off"),
        ".PP",
        _text("The same through the environment:"),
        *_example("GPROXYD_LOG_LEVEL=debug GPROXYD_ADMIN=off gproxyd -c ./gproxyd.conf"),
        ".PP",
        _text("Apply an edited configuration without dropping connections:"),
        *_example("systemctl reload gproxyd      # or: kill -HUP PID"),
        ".PP",
        _text("Try it out without writing a configuration:"),
        *_example("gproxyd demo"),
        ".SH \"SEE ALSO\"",
        ".BR gproxyctl (1),",
        ".BR gproxyd.conf (5),",
        ".BR systemd.service (5),",
        ".BR logrotate (8)",
    ]
    return "\n".join(lines) + "\n"


def _file_option_item(option: Option, section: str) -> list[str]:
    lines = [".TP",
             f"{_bold(option.name)} = {_italic(option.metavar)}",
             _text(option.help),
             ".br",
             f"Default: {_bold(describe_default(option))}"]
    if section == "gproxyd":
        lines += [".br", f"Command line: {_flag_tag(option)}",
                  ".br", f"Environment: {_bold(option.env)}"]
    return lines + [".br", f"Example: {_bold(f'{option.name} = {example_value(option)}')}"]


def render_man5() -> str:
    """man/gproxyd.conf.5: the file syntax, the value forms and every key."""
    lines = _header("gproxyd.conf", 5, "File Formats Manual", "gproxyd/settings.py")
    lines += [
        ".SH NAME",
        "gproxyd.conf \\- configuration file of gproxyd",
        ".SH SYNOPSIS",
        _italic(DEFAULT_PATH),
        ".SH DESCRIPTION",
        ".BR gproxyd (8)",
        _text("reads its routes and process-wide options from one INI file, at start-up, "
              "for --check-config and on every reload (SIGHUP)."),
        ".SH SYNTAX",
        _text("The file is UTF-8 text made of sections. A section starts with a header line "
              "in square brackets; the lines after it, up to the next header, are its keys, "
              "one key = value (or key: value) a line. Spaces around keys and values are "
              "ignored, and keys are not case-sensitive. A key may be given once per "
              "section. Values do not continue on the next line."),
        ".PP",
        _text("A line whose first character other than a space is ; or # is a comment, as is "
              "the rest of a line from a ; or # that follows a space."),
        ".TP",
        _bold("[gproxyd]"),
        _text("The global options, listed below. The section may appear once, or not at all: "
              "every global option has a default, and each can be overridden by a "
              "command-line option and by a GPROXYD_* environment variable (precedence: "
              "defaults < file < environment < command line)."),
        ".TP",
        f"{_bold('[route')} {_italic('NAME')}{_bold(']')}",
        _text("One listener and the backends its connections go to. NAME is made of letters, "
              "digits, -, _ and . and is unique. At least one route is needed, and no two "
              "routes may share a listen address."),
        ".SH VALUES",
        ".TP",
        _italic("ADDRESS"),
        f"{_bold('host:port')}, {_bold('[ipv6]:port')} or {_bold('unix:/path')}, e.g. "
        f"{_bold('0.0.0.0:8080')}, {_bold('[::1]:8080')}, {_bold('backend.internal:80')} or "
        f"{_bold('unix:/run/app/app.sock')}.",
        _text("The host is an IP address or a host name; the port is 1 to 65535; a unix "
              "socket path is absolute. ADDRESSES is a comma-separated list of them, empty "
              "for none."),
        ".TP",
        _italic("VERSION"),
        _text("A PROXY protocol version: off, v1 or v2 (accept-proxy also takes any)."),
        ".TP",
        _italic("SOURCE"),
        _text("off (the kernel chooses), client (the client's own address, with "
              "IP_TRANSPARENT), or an IP address of this host, e.g. 10.0.0.2."),
        ".TP",
        _italic("DURATION"),
        _text("A number with a unit: ms, s, m or h, e.g. 250ms, 5s, 15m or 1h. A bare number "
              "is seconds."),
        ".TP",
        _italic("SIZE"),
        _text("A number of bytes, optionally with a unit: KiB, MiB or GiB (1024-based; K, KB, "
              "M, MB, G and GB mean the same), e.g. 65536, 512KiB or 4MiB."),
        ".TP",
        _italic("PERCENT"),
        _text("A share from 0% to 100%, e.g. 12.5%, or as a fraction from 0 to 1, e.g. 0.125."),
        ".TP",
        _italic("NUMBER"),
        _text("A whole number."),
        ".TP",
        _italic("yes|no"),
        _text("Either yes or no; true, on and 1 also mean yes; false, off and 0 also mean no."),
        ".TP",
        f"{_italic('LEVEL')}, {_italic('FORMAT')}, {_italic('PROTOCOL')}, {_italic('WHAT')}, "
        f"{_italic('mask|keep')}",
        _text("One of the words listed in the key's description."),
        ".TP",
        f"{_italic('PATH')}, {_italic('USER')}, {_italic('GROUP')}",
        _text("A file path; a user or group name."),
        ".TP",
        _italic("MODE"),
        _text("An octal file mode such as 0660."),
        ".TP",
        _italic("OWNER"),
        _text("A user name, or user:group (names or numeric ids)."),
        ".TP",
        _italic("NAMES"),
        _text("Names separated by commas or spaces, e.g. Content-Type, Cache-Control."),
        ".TP",
        _italic("PATHS"),
        _text("JSON paths separated by commas: $ is the whole document, .key or [\"key\"] "
              "a member, [3] an array element, * any one key or element; a path covers "
              "everything below it, e.g. $.timestamp, $.items[*].updated_at."),
        ".TP",
        _italic("FILTER"),
        _text("HTTP methods in capitals separated by spaces or commas (e.g. GET HEAD "
              "OPTIONS), or the word readonly on a redis route."),
        ".TP",
        _italic("URL"),
        _text("Where the beanstalkd archive is kept: sqlite:////absolute/path.db (or "
              "sqlite:///relative.db) for an embedded SQLite file, or "
              "mysql://user:password@host:3306/database for a MySQL or MariaDB server shared "
              "by several gproxyd."),
        ".TP",
        _italic("NETWORKS"),
        _text("IP networks or single addresses separated by commas, e.g. 10.0.0.0/8, "
              "192.0.2.7, fd00::/8."),
        ".TP",
        _italic("FILE"),
        _text("The absolute path of a file gproxyd reads (see the key)."),
        ".TP",
        _italic("PEM"),
        _text("The absolute path of a PEM file (certificates, or a private key), read at "
              "start and on each reload as gproxyd's user."),
        ".TP",
        _italic("HOST"),
        _text("A host name as certificates carry it, e.g. api.internal."),
        ".TP",
        _italic("MODULE"),
        _text("A Python module: a dotted name importable by gproxyd (gproxyd.trace logs "
              "every chunk), or the path of a .py file. See HOOKS."),
        ".SH \"GLOBAL OPTIONS\"",
        _text("Keys of the [gproxyd] section."),
    ]
    for option in GLOBAL_OPTIONS:
        lines += _file_option_item(option, "gproxyd")
    lines += [
        ".SH \"ROUTE OPTIONS\"",
        _text("Keys of a [route NAME] section."),
    ]
    for option in ROUTE_OPTIONS:
        lines += _file_option_item(option, "route")
    lines += [
        ".SH HOOKS",
        *HOOKS_SECTION,
        ".SH RELOADING",
        _text("On SIGHUP the file is read again. Routes are matched by listen address: an "
              "unchanged address keeps its socket and takes the new settings for new "
              "connections, a removed route stops accepting while its connections finish, "
              "and a new route starts. A file with an error changes nothing: the error is "
              "logged and the running configuration stays in force."),
        ".PP",
        _text("gproxyctl reload checks the file, signals the daemon and waits for the "
              "outcome; gproxyctl check shows the generation in use and the last reload's "
              "result, which GET /stats (reload) and /metrics (gproxyd_config_*) also "
              "show."),
        ".SH DIAGNOSTICS",
        _text("Every mistake is reported as FILE:LINE: key: what is wrong (what was "
              "expected), one line each, all of a file's mistakes at once, for instance:"),
        *_example(f"{DEFAULT_PATH}:12: listen: bad port 'notaport' (expected 1-65535)\n"
                  f"{DEFAULT_PATH}:14: shadow-sampel: unknown key in [route web] (did you "
                  "mean shadow-sample?)"),
        ".PP",
        _text("Besides values that do not parse, the check refuses what cannot run or would "
              "misbehave: listen addresses that overlap (0.0.0.0:P takes P on every IPv4 "
              "address; [::]:P and 0.0.0.0:P coexist), the admin endpoint on a route's "
              "address, a production, shadow or baseline that is the route's own listen "
              "address (a loop), a shadow that is production itself, a timeout of 0, a user "
              "or group this host does not have, and a unix socket in a directory that "
              "does not exist."),
        ".PP",
        _text("A value from the environment or the command line names the variable or the "
              "option instead of FILE:LINE. Check a file with"),
        _bold("gproxyd --check-config -c FILE") + ".",
        ".SH EXAMPLE",
        *_example(MAN_EXAMPLE.rstrip("\n")),
        ".SH FILES",
        ".TP",
        _italic(DEFAULT_PATH),
        _text("The configuration file read by default."),
        ".SH \"SEE ALSO\"",
        ".BR gproxyd (8)",
    ]
    return "\n".join(lines) + "\n"


# --- gproxyctl(1), from its argparse parser -------------------------------------------
# argparse has no public API to walk a parser; _actions, _SubParsersAction, _HelpAction
# and _choices_actions are what argparse-to-man-page tools read, and have long been stable.

def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand of PARSER, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [(choice.dest, _help(choice, parser.prog), action.choices[choice.dest])
                    for choice in action._choices_actions]
    return []


def _options(parser: argparse.ArgumentParser, with_help: bool) -> list[argparse.Action]:
    """PARSER's options in the order they were added, without hidden ones.

    with_help=False leaves out -h as well: it is documented once, for the whole command.
    """
    options = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if with_help or not isinstance(action, argparse._HelpAction):
            options.append(action)
    return options


def _help(action: argparse.Action, prog: str) -> str:
    """ACTION's help as --help shows it (%(default)s filled in), ending as a sentence."""
    text = (action.help or "") % {**vars(action), "prog": prog}
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def _metavar(action: argparse.Action) -> str:
    return action.metavar or action.dest.upper()


def _synopsis_item(action: argparse.Action) -> list[str]:
    if not action.option_strings:  # a positional argument
        name = roff(_metavar(action))
        return [f".RI [ {name} ]" if action.nargs in ("?", "*") else f".I {name}"]
    flag = roff(action.option_strings[0])
    if action.nargs == 0:
        return [f".RB [ {flag} ]"]
    return [f".RB [ {flag}", f".IR {roff(_metavar(action))} ]"]


def _option_item(action: argparse.Action, prog: str) -> list[str]:
    if not action.option_strings:  # a positional argument
        return [".TP", _italic(_metavar(action)), _text(_help(action, prog))]
    takes_value = action.nargs != 0
    spellings = [_bold(flag) + (f" {_italic(_metavar(action))}" if takes_value else "")
                 for flag in action.option_strings]
    lines = [".TP", ", ".join(spellings), _text(_help(action, prog))]
    # A default the help text already states is not repeated.
    if takes_value and action.default is not None and "default" not in (action.help or ""):
        lines += [".br", f"Default: {_bold(str(action.default))}"]
    return lines


def render_man1_gproxyctl(parser: argparse.ArgumentParser | None = None) -> str:
    """man/gproxyctl.1: the stats client; commands and options are PARSER's.

    PARSER is gproxyctl's own (ctl.build_parser()) unless a test passes another.
    """
    parser = parser or ctl.build_parser()
    commands = _subcommands(parser)
    lines = _header("gproxyctl", 1, "User Commands", "gproxyd/ctl.py and gproxyd/exitcodes.py")
    lines += [
        ".SH NAME",
        "gproxyctl \\- show how production and its shadows compare in a running gproxyd",
        ".SH SYNOPSIS",
    ]
    for number, (name, _, command) in enumerate(commands):
        if number:
            lines.append(".br")
        lines += [f".B {roff(parser.prog)}"]
        for action in _options(parser, with_help=False):
            lines += _synopsis_item(action)
        lines += [f".B {roff(name)}"]
        for action in _options(command, with_help=False):
            lines += _synopsis_item(action)
    lines += [
        ".SH DESCRIPTION",
        _text("gproxyctl finds gproxyd's admin endpoint with --admin, else the GPROXYD_ADMIN "
              "variable, else the admin key of gproxyd's configuration file (-c, else "
              "GPROXYD_CONFIG, else /etc/gproxyd/gproxyd.conf), read even when the rest of "
              "the file has errors, so a daemon serving its last good configuration stays "
              "reachable."),
        ".PP",
        _text("gproxyctl stats asks the running daemon for GET /stats. It takes two "
              "samples --interval seconds apart and prints, per route, a row for "
              "production and one for each shadow: req/s over the interval, requests, "
              "p50 and p99 latency in milliseconds, errors and drops; then, per shadow, "
              "a verdict in words, such "
              "as \"candidate is slower: p99 +3.02 ms (95% CI +2.95..+3.10, 5000 pairs); "
              "0.4% of answers differ, mostly $.price\"."),
        ".PP",
        _text("gproxyctl diff asks for GET /mismatches and prints the most recent exchanges "
              "where a shadow answered differently from production: when, route, shadow, "
              "the request line or command, the differing paths, and both answers' status "
              "and first bytes (or hashes). --admin ADDRESS reaches the admin endpoint "
              "without reading a config file."),
        ".PP",
        _text("gproxyctl check shows which configuration file and generation the daemon "
              "serves, when it was loaded, whether its last reload failed and why, and "
              "whether that file on disk would load now; it exits 78 when either is wrong. "
              "gproxyctl reload checks the daemon's file first (a broken file is reported "
              "and the daemon not signalled), sends it SIGHUP and waits until /stats shows "
              "the new generation or the failure. gproxyctl config prints the effective "
              "configuration (every key, defaults marked, archive passwords hidden), as "
              "nginx -T does; its output is itself a valid configuration file."),
        ".PP",
        _text("gproxyctl replay sends recorded or listed HTTP requests to one or more "
              "targets, open-loop, at rising rates, and prints one row per rate with the "
              "knee marked; it talks to no daemon."),
        ".SH COMMANDS",
    ]
    for name, help_text, _ in commands:
        lines += [".TP", _bold(name), _text(help_text)]
    lines += [".SH OPTIONS"]
    for action in _options(parser, with_help=True):
        lines += _option_item(action, parser.prog)
    for _, _, command in commands:
        lines += [f'.SS "{roff(command.prog)}"']
        for action in _options(command, with_help=False):
            lines += _option_item(action, command.prog)
    lines += [
        *_exit_status(GPROXYCTL_EXITS),
        ".SH \"SEE ALSO\"",
        ".BR gproxyd (8),",
        ".BR gproxyd.conf (5)",
    ]
    return "\n".join(lines) + "\n"


# --- writing ---------------------------------------------------------------------------

OUTPUTS: dict[str, Callable[[], str]] = {
    "man/gproxyctl.1": render_man1_gproxyctl,
    "etc/gproxyd.conf": render_example_config,
    "man/gproxyd.8": render_man8,
    "man/gproxyd.conf.5": render_man5,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/docs.py", description="Rewrite the example config and the man pages "
                                          "from the declarations they describe.")
    parser.add_argument("--root", type=Path, default=SOURCE_ROOT,
                        help="the source tree to write into (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file differs from its rendering")
    args = parser.parse_args(argv)
    stale = []
    for relative, render in OUTPUTS.items():
        target = args.root / relative
        text = render()
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        if args.check:
            stale.append(relative)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        print(f"wrote {target}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run `{REGENERATE}`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
