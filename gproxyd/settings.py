"""The option registry: every config key declared once, with its type, default and help.

`--help`, the man pages, the example config and validation are all generated from
`GLOBAL_OPTIONS` and `ROUTE_OPTIONS`; nothing else lists option names.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from importlib.machinery import PathFinder
from typing import Any, Callable


class BadValue(ValueError):
    """A value that does not parse; str() is `what is wrong (what was expected)`."""


# --- value types ----------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2,
               "mb": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3,
               "gib": 1024 ** 3}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def duration(text: str) -> float:
    """'250ms', '5s', '15m', '1h' (a bare number is seconds) -> seconds."""
    match = _NUMBER_UNIT.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _DURATION_UNITS and unit != "":
        raise BadValue(f"bad duration {text!r} (expected a number with ms, s, m or h, e.g. 5s)")
    return float(match.group(1)) * _DURATION_UNITS.get(unit, 1.0)


def positive_duration(text: str) -> float:
    """A duration above zero: a timeout of 0 would give up before anything could happen."""
    value = duration(text)
    if value <= 0:
        raise BadValue(f"bad duration {text!r} (expected more than 0, e.g. 5s)")
    return value


def size(text: str) -> int:
    """'4MiB', '512KiB', '65536' -> bytes."""
    match = _NUMBER_UNIT.match(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise BadValue(f"bad size {text!r} (expected bytes with KiB, MiB or GiB, e.g. 4MiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise BadValue(f"bad number {text!r} (expected a whole number >= 1)")
    return value


def whole_number(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise BadValue(f"bad number {text!r} (expected a whole number >= 0)")
    return value


def optional_int(text: str) -> int | None:
    raw = text.strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BadValue(f"bad number {text!r} (expected a whole number, or nothing)") from None


def percentage(text: str) -> float:
    """'100%', '12.5%' or '0.125' -> a share between 0 and 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise BadValue(f"bad share {text!r} (expected 0% to 100%)")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise BadValue(f"bad value {text!r} (expected one of: {', '.join(allowed)})")
        return value
    parse.__name__ = "|".join(allowed)
    return parse


def text_value(text: str) -> str:
    value = text.strip()
    if not value:
        raise BadValue("empty value (expected some text)")
    return value


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise BadValue(f"bad boolean {text!r} (expected yes or no)")


@dataclass(frozen=True)
class Address:
    """A TCP or unix-socket endpoint. `text` is the address as the user wrote it."""
    text: str
    family: int
    host: str = ""
    port: int = 0
    path: str = ""
    numeric: bool = True  # a literal IP: connect without asking a resolver
    sockaddr: Any = field(init=False, compare=False, repr=False)  # for bind()/connect()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sockaddr", self.path if self.family == socket.AF_UNIX
                           else (self.host, self.port))

    def __str__(self) -> str:
        return self.text


def address(text: str, lowest_port: int = 1) -> Address:
    """'host:port', '[v6]:port', 'unix:/path' -> Address."""
    raw = text.strip()
    if raw.startswith("unix:"):
        path = raw[5:]
        if not path.startswith("/"):
            raise BadValue(f"bad unix socket address {raw!r} (expected unix:/absolute/path)")
        return Address(raw, socket.AF_UNIX, path=path)
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
        if not sep:
            raise BadValue(f"bad address {raw!r} (expected [ipv6]:port)")
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or not host:
            raise BadValue(f"bad address {raw!r} (expected host:port, [ipv6]:port or unix:/path)")
        if ":" in host:
            raise BadValue(f"bad address {raw!r} (expected an IPv6 address in brackets: "
                           "[ipv6]:port)")
    if not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise BadValue(f"bad port {port!r} (expected {lowest_port}-65535)")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
            raise BadValue(f"bad host {host!r} (expected an IP address or a host name)") from None
        return Address(raw, socket.AF_INET, host=host, port=int(port), numeric=False)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(raw, family, host=str(ip), port=int(port))


def listen_address(text: str) -> Address:
    """Like address(), and port 0 asks the kernel for a free port (gproxyd.Proxy only:
    a daemon's listen address is something clients must be told)."""
    return address(text, lowest_port=0)


def address_list(text: str) -> tuple[Address, ...]:
    """Comma-separated addresses; empty means none."""
    return tuple(address(part) for part in text.split(",") if part.strip())


def admin_address(text: str) -> Address | None:
    return None if text.strip().lower() == "off" else address(text)


def optional_text(text: str) -> str:
    return text.strip()


@dataclass(frozen=True)
class HookSpec:
    """A route's `hooks` value as data: the module or file named, and where it was named.

    Config stays pure data: parsing checks that the module or file exists and compiles,
    but runs none of it; the serving process imports it (hooks.load_route_hooks).
    """
    text: str
    where: str = ""  # FILE:LINE of the hooks key, for the import's error messages

    @property
    def is_file(self) -> bool:
        return self.text.endswith(".py") or os.sep in self.text

    def at(self, where: str) -> "HookSpec":
        return HookSpec(self.text, where)

    def __str__(self) -> str:
        return self.text


def hook_spec(text: str) -> HookSpec | None:
    """The `hooks` option: empty for none, else a module or .py file that must exist and
    compile (checked without running any of it)."""
    spec = HookSpec(text.strip())
    if not spec.text:
        return None
    source = spec.text if spec.is_file else _module_source(spec.text)
    if spec.is_file and not os.path.isfile(source):
        raise BadValue(f"no such hooks file {spec.text!r} (expected a readable .py file)")
    if source and source.endswith(".py"):
        _check_trusted(source)
        try:
            with open(source, "rb") as handle:
                compile(handle.read(), source, "exec", dont_inherit=True)
        except OSError as error:
            raise BadValue(f"cannot read hooks file {source!r}: {error.strerror} (expected "
                           "a readable .py file)") from None
        except (SyntaxError, ValueError) as error:
            line = getattr(error, "lineno", None)
            at = f" at {source}:{line}" if line else ""
            raise BadValue(f"cannot import {spec.text!r}: {type(error).__name__}: {error}{at} "
                           "(expected a module path or a .py file defining on_connect, "
                           "on_data, on_response or on_finish)") from None
    return spec


def _check_trusted(source: str) -> None:
    """Hooks run with gproxyd's privileges (root, until the drop): refuse a file that
    someone else could have written: owned by another user than root or us, writable by
    others, or in a directory others may write to (without the sticky bit)."""
    try:
        info = os.stat(source)
        folder = os.stat(os.path.dirname(os.path.abspath(source)))
    except OSError as error:
        raise BadValue(f"cannot read hooks file {source!r}: {error.strerror}") from None
    if info.st_uid not in (0, os.getuid()):
        problem = f"owned by uid {info.st_uid}"
    elif info.st_mode & stat.S_IWOTH:
        problem = "writable by every user"
    elif folder.st_mode & stat.S_IWOTH and not folder.st_mode & stat.S_ISVTX:
        problem = "in a directory every user may write to"
    else:
        return
    raise BadValue(f"untrusted hooks file {source!r}: {problem} (expected a file only root "
                   "or gproxyd's own user can change: it runs with gproxyd's privileges)")


def _module_source(name: str) -> str | None:
    """The file a dotted module name resolves to on sys.path, found without importing
    it or its parent packages (their __init__ would run); None when it has no source
    file (a namespace package)."""
    parts = name.split(".")
    search = None
    found = None
    for count in range(1, len(parts) + 1):
        dotted = ".".join(parts[:count])
        try:
            found = (PathFinder.find_spec(dotted, search)
                     if count == 1 or search is not None else None)  # None: not a package
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise BadValue(f"cannot import {name!r}: ModuleNotFoundError: no module named "
                           f"{dotted!r} (expected a module path or a .py file defining "
                           "on_connect, on_data, on_response or on_finish)")
        search = found.submodule_search_locations
    return found.origin if found.has_location else None


def name_list(text: str) -> tuple[str, ...]:
    """Comma- or space-separated names (header names, methods); empty means none."""
    names = tuple(part for part in re.split(r"[\s,]+", text.strip()) if part)
    for name in names:
        if not re.fullmatch(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+", name):
            raise BadValue(f"bad name {name!r} (expected names such as Content-Type, "
                           "separated by commas)")
    return names


_JSON_PATH = re.compile(r"\$(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|\*)|\[(?:[0-9]+|\*|\"[^\"]*\")\])*")


def json_paths(text: str) -> tuple[str, ...]:
    """Comma-separated JSON paths such as $.timestamp, $.items[*].updated_at."""
    paths = tuple(part.strip() for part in text.split(",") if part.strip())
    for path in paths:
        if not _JSON_PATH.fullmatch(path):
            raise BadValue(f"bad JSON path {path!r} (expected $ then .key, [index], "
                           "[\"key\"] or * for any one, e.g. $.items[*].updated_at)")
    return paths


def archive_url(text: str) -> str:
    """'' (no archive), sqlite:///relative.db, sqlite:////absolute.db or
    mysql://user:password@host:port/database; checked for its form only (the store is
    opened when the route starts)."""
    value = text.strip()
    if not value:
        return ""
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value
    if re.fullmatch(r"mysql://.+@[^/:@]+(?::[0-9]+)?/[A-Za-z0-9_$]+", value):
        return value
    raise BadValue(f"bad archive {hide_password(value)!r} (expected sqlite:////path/jobs.db "
                   "or mysql://user:password@host:3306/database)")


def hide_password(url: str) -> str:
    """A store URL fit for logs: its password replaced by ***. The credentials end at
    the last '@' (a password may hold '/' or '@' unescaped)."""
    scheme, sep, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    user, colon, _password = credentials.partition(":")
    if not sep or not at or not colon:
        return url
    return f"{scheme}://{user}:***@{place}"


def file_mode(text: str) -> int | None:
    """'' (the umask decides) or an octal mode such as 0660, for unix listen sockets."""
    raw = text.strip()
    if not raw:
        return None
    if not re.fullmatch(r"0?[0-7]{3}", raw):
        raise BadValue(f"bad mode {text!r} (expected an octal mode such as 0660)")
    return int(raw, 8)


def owner(text: str) -> str:
    """'' (keep), 'user' or 'user:group'; checked to exist when the route starts."""
    raw = text.strip()
    if raw and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*(:[A-Za-z0-9_.][A-Za-z0-9_.-]*)?"
                                r"|[0-9]+(:[0-9]+)?", raw):
        raise BadValue(f"bad owner {text!r} (expected user or user:group)")
    return raw


def optional_path(text: str) -> str:
    """'' (off) or an absolute file path."""
    raw = text.strip()
    if raw and not raw.startswith("/"):
        raise BadValue(f"bad path {text!r} (expected an absolute path, e.g. "
                       "/var/lib/gproxyd/web.rec)")
    return raw


def networks(text: str) -> tuple:
    """Comma-separated networks or addresses (10.0.0.0/8, 192.0.2.7, ::1), as
    ipaddress networks; empty means none."""
    found = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        try:
            found.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise BadValue(f"bad network {part!r} (expected an address or a network such "
                           "as 10.0.0.0/8 or fd00::/8, separated by commas)") from None
    return tuple(found)


def optional_address(text: str) -> Address | None:
    return address(text) if text.strip() else None


def threshold(text: str) -> float | None:
    """'' (automatic) or a duration, for verdict-threshold."""
    return duration(text) if text.strip() else None


# Transparent mode (issue #20): production = original-dst stands for the address each
# client originally dialled, known only once it has connected.
ORIGINAL_DST = Address("original-dst", socket.AF_UNSPEC, numeric=False)


def production_address(text: str) -> Address:
    """An address(), or original-dst."""
    return ORIGINAL_DST if text.strip().lower() == "original-dst" else address(text)


def source_address(text: str) -> str | None:
    """'off' (the kernel chooses), 'client', or an IP address of this host."""
    value = text.strip().lower()
    if value in ("off", ""):
        return None
    if value == "client":
        return value
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        raise BadValue(f"bad source {text!r} (expected off, client, or an IP address such "
                       "as 10.0.0.2)") from None


# --- the registry ---------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    name: str                      # as written in the config file: drain-timeout
    parse: Callable[[str], Any]
    default: str | None            # as text, parsed like a user value; None = required
    help: str
    metavar: str = "VALUE"

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def env(self) -> str:
        return "GPROXYD_" + self.attr.upper()


GLOBAL_OPTIONS: tuple[Option, ...] = (
    Option("admin", admin_address, "127.0.0.1:9901",
           "Admin HTTP endpoint (the dashboard at /, /stats, /stats/history, /mismatches, "
           "/metrics, /healthz) as host:port, unix:/path, or 'off'.", "ADDRESS"),
    Option("admin-allow", networks, "",
           "Source addresses besides loopback that may use the admin endpoint: networks "
           "or addresses separated by commas (10.0.0.0/8, ::1). Loopback clients (and a "
           "unix admin socket, which its file mode guards) always may; any other client "
           "is refused (403) unless it is in one of these. Only matters when admin listens "
           "on an address other hosts reach.", "NETWORKS"),
    Option("admin-token", optional_path, "",
           "A file holding a bearer token (one line, at least 16 characters: e.g. "
           "'openssl rand -hex 32'): clients not on loopback must also present it, as "
           "'Authorization: Bearer TOKEN' (gproxyctl --admin-token FILE), or in a browser "
           "by opening /?token=TOKEN once (kept in a cookie). /healthz needs none. Read at "
           "start and on each reload, as gproxyd's user.", "FILE"),
    Option("log-file", text_value, "-",
           "Where the log goes: a file path, or '-' for standard error (journald under systemd).",
           "PATH"),
    Option("log-level", choice("debug", "info", "warning", "error"), "info",
           "Least severe log level written: debug, info, warning or error.", "LEVEL"),
    Option("log-format", choice("text", "json"), "text",
           "Log line format: text, or json (one object a line).", "FORMAT"),
    Option("drain-timeout", duration, "30s",
           "On stop, how long live connections may finish before they are closed.", "DURATION"),
    Option("stats-interval", duration, "60s",
           "How often a summary line per route is logged; 0 turns it off.", "DURATION"),
    Option("workers", positive_int, "1",
           "Worker processes; above 1, each listen address is bound once per worker with "
           "SO_REUSEPORT and a master process supervises them (use up to one per core). "
           "Changing it takes a restart.", "NUMBER"),
    Option("user", optional_text, "",
           "After binding, drop privileges to this user (empty: keep the current user).", "USER"),
    Option("group", optional_text, "",
           "After binding, drop privileges to this group (default: the user's group).", "GROUP"),
    Option("daemonize", boolean, "no",
           "Detach from the terminal and run in the background (for hosts without "
           "systemd; needs log-file set to a file).", "yes|no"),
    Option("pid-file", optional_text, "",
           "Write the daemon's process id here (removed on exit).", "PATH"),
    Option("shadow-max-connections", whole_number, "0",
           "Most shadow connections one process keeps open after their client has gone "
           "(shadow-linger); past it the oldest is dropped (counted, outcome dropped) so "
           "that lingering shadows never take the descriptors production needs. 0: a "
           "quarter of the open-files limit.", "NUMBER"),
    Option("shadow-memory", size, "256MiB",
           "Most memory one process holds for bytes waiting to be written to shadows, over "
           "all its connections (a queue counts in whole 64 KiB blocks past its first 64 "
           "KiB): one shadow connection may hold up to shadow-buffer while this has room; "
           "when it is full, the shadow connection furthest behind (the most waiting) is "
           "dropped (counted as over-budget), so memory stays bounded whatever the number "
           "of connections. Each worker process has its own. It also sizes the kernel send "
           "buffers of shadow sockets as they connect: an eighth of it shared among those "
           "open (at least 32 KiB; at most shadow-buffer and tcp_wmem's maximum, which is "
           "left to autotuning), and half of it at most for all of them.",
           "SIZE"),
    Option("hook-timeout", duration, "2s",
           "Longest a hook may hold the event loop without yielding (a CPU loop): past it "
           "the hook is interrupted, logged with its name and stack, and its connection "
           "closed, so other connections and signals are served again. 0 turns the "
           "watchdog off.", "DURATION"),
)

ROUTE_OPTIONS: tuple[Option, ...] = (
    Option("listen", address, None,
           "Where clients connect: host:port, [ipv6]:port or unix:/path.", "ADDRESS"),
    Option("production", production_address, None,
           "The production backend every byte is relayed to: host:port or unix:/path; or "
           "original-dst, the address each client originally dialled, for a listener that "
           "iptables/nftables rules divert connections to (see Transparent mode).",
           "ADDRESS"),
    Option("shadow", address_list, "",
           "Zero or more shadow backends (comma-separated) that get a copy of every client "
           "byte; their answers are read and discarded.", "ADDRESSES"),
    Option("shadow-sample", percentage, "100%",
           "Share of client connections mirrored to the shadows.", "PERCENT"),
    Option("shadow-seed", optional_int, "",
           "Seed for choosing which connections are mirrored (empty: unpredictable); "
           "a fixed seed makes the choice repeatable.", "NUMBER"),
    Option("shadow-buffer", size, "64MiB",
           "Most bytes one shadow connection may have waiting (while shadow-memory has "
           "room); past it that shadow connection is dropped (counted as over-buffer).",
           "SIZE"),
    Option("shadow-write-delay", duration, "0",
           "Longest a client byte may wait before it is written to a shadow; what the same "
           "client sends meanwhile goes out in the same write. 0 (the default): a chunk "
           "goes to the shadows right after production when it is the connection's first, "
           "starts a new turn (see shadow-turn-timeout) or nothing else waits in the event "
           "loop, else once the "
           "loop has served what was waiting (production first), at the latest 2 ms "
           "later. A few ms (e.g. 5ms) always batches: fewer "
           "shadow writes, each request reaches the shadow that much later.", "DURATION"),
    Option("shadow-turn-timeout", duration, "1s",
           "A client chunk that production got only after it had answered (a new turn of "
           "the conversation) goes to a shadow once the shadow has answered the turn "
           "before, so handshakes reach it as they reached production; this is the "
           "longest it waits for that answer (counted as a turn timeout, then sent).",
           "DURATION"),
    Option("shadow-divergence", percentage, "50%",
           "A shadow connection whose answers differ in size from production's by more "
           "than this share (over a connection with at least 64 KiB of answers) ends as "
           "diverged instead of done: its numbers cannot be compared with production's.",
           "PERCENT"),
    Option("shadow-connect-timeout", positive_duration, "1s",
           "How long connecting to a shadow may take.", "DURATION"),
    Option("shadow-linger", duration, "5s",
           "After production is done, how long a shadow gets to finish its answer.",
           "DURATION"),
    Option("connect-timeout", positive_duration, "5s",
           "How long connecting to production may take before the client is closed.",
           "DURATION"),
    Option("idle-timeout", positive_duration, "15m",
           "Close a connection after this long with no byte in either direction.", "DURATION"),
    Option("max-connections", positive_int, "10000",
           "Most client connections served at once; clients over it are closed at once.",
           "NUMBER"),
    # Transparent mode and the PROXY protocol (issue #20).
    Option("accept-proxy", choice("off", "v1", "v2", "any"), "off",
           "Require a PROXY protocol header (HAProxy's: v1 text, v2 binary, or any of "
           "them) at the start of every client connection, within connect-timeout: the "
           "client address in it is the one logs, hooks (conn.client), stats and source = "
           "client use. A connection without a valid header is closed (logged at most "
           "every 10 s) before anything reaches production. Only for listeners that "
           "nothing but your proxies can reach.", "VERSION"),
    Option("send-proxy", choice("off", "v1", "v2"), "off",
           "Begin each production connection with a PROXY protocol header (v1 or v2) "
           "carrying the client's address and the address it connected to.", "VERSION"),
    Option("shadow-send-proxy", choice("off", "v1", "v2"), "off",
           "The same towards each shadow and the baseline.", "VERSION"),
    Option("source", source_address, "off",
           "The address production connections come from: off (the kernel chooses), "
           "client (the client's own address, with IP_TRANSPARENT: production sees real "
           "clients; needs CAP_NET_ADMIN and the policy routing under Transparent mode), "
           "or an IP address of this host.", "SOURCE"),
    Option("listen-transparent", boolean, "no",
           "Set IP_TRANSPARENT on the listener, so it accepts connections a TPROXY rule "
           "diverts to it for any destination (needs CAP_NET_ADMIN).", "yes|no"),
    Option("hooks", hook_spec, "",
           "Python hooks that see and may change the traffic: a dotted module name or a "
           "path to a .py file defining on_connect, on_data, on_response or on_finish "
           "(see Writing hooks). Re-imported on reload.", "MODULE"),
    Option("compare", choice("body", "status", "off"), "body",
           "On http and redis routes, compare each shadow answer with production's answer "
           "to the same request: body (http: status and body; redis: the whole reply), "
           "status (http only) or off. Counted as mismatches, sampled at /mismatches. "
           "Ignored on tcp routes.", "WHAT"),
    Option("compare-headers", name_list, "",
           "HTTP header fields compared too (by default no header is compared), e.g. "
           "Content-Type, Cache-Control.", "NAMES"),
    Option("compare-ignore-fields", json_paths, "",
           "JSON paths never counted as differences, e.g. $.timestamp, "
           "$.items[*].updated_at (* for any one index or key; a path covers what is "
           "below it).", "PATHS"),
    Option("compare-max-body", size, "1MiB",
           "Answers up to this size are compared in full (JSON structurally); longer ones "
           "by length and hash only.", "SIZE"),
    Option("compare-samples", positive_int, "100",
           "How many recent differing exchanges per route /mismatches keeps.", "NUMBER"),
    Option("compare-sample-bodies", boolean, "yes",
           "Keep the first bytes of both answers in /mismatches samples; no keeps only the "
           "differing paths and hashes (answers may hold personal data).", "yes|no"),
    Option("baseline", optional_address, "",
           "An extra shadow running production's own build: it gets the same mirrored "
           "traffic, and where its answers differ from production's (timestamps, random "
           "ids) is noise, not counted against the other shadows.", "ADDRESS"),
    Option("shadow-filter", name_list, "",
           "Mirror only these requests: HTTP methods (e.g. GET HEAD OPTIONS) on http "
           "routes, or readonly on redis routes (read-only commands; MULTI/EXEC blocks "
           "and pub/sub are not mirrored). Empty: every request.", "FILTER"),
    Option("verdict-threshold", threshold, "",
           "Smallest latency difference the verdict calls slower or faster (empty: 5% of "
           "production's value at that percentile, at least 0.1 ms).", "DURATION"),
    Option("protocol", choice("tcp", "http", "redis", "beanstalkd"), "tcp",
           "How the route's traffic is understood for measurement: tcp (a connection is a "
           "request), http (HTTP/1.x requests and responses), redis (RESP2/RESP3 "
           "commands and replies) or beanstalkd (commands and replies). Bytes are never "
           "changed by it (see archive for what a beanstalkd route can do).", "PROTOCOL"),
    Option("observe-max-header", size, "16KiB",
           "On http routes, the most the observer buffers of one unfinished request or "
           "response head (start-line and header fields), for each backend of each "
           "connection: a slow client holds this much per backend until its head ends. A "
           "longer head is still relayed unchanged; that connection is measured as tcp from "
           "there on (counted in parser_fallbacks). 16KiB is far above what browsers and "
           "API clients send, and half of what nginx accepts by default "
           "(large_client_header_buffers 4 8k: 8k a line, 32k in all); 32KiB follows every "
           "head nginx's defaults accept.", "SIZE"),
    Option("archive", archive_url, "",
           "On a beanstalkd route: keep jobs put with a delay longer than archive-after in "
           "this database instead of beanstalkd, and move them into beanstalkd when they "
           "are due: sqlite:////var/lib/gproxyd/jobs.db (embedded) or "
           "mysql://user:password@host:3306/database (shared by a fleet). Empty: off.",
           "URL"),
    Option("archive-after", duration, "10m",
           "Puts delayed longer than this are archived.", "DURATION"),
    Option("archive-lead", duration, "30s",
           "Archived jobs are moved into beanstalkd this long before they are due.",
           "DURATION"),
    Option("record", optional_path, "",
           "On an http route: append sampled whole client requests (arrival time and raw "
           "bytes) to this file, for gproxyctl replay. Its directory must be writable by "
           "gproxyd's user (rotation, and PATH.lock, which processes sharing the file take "
           "turns with). Empty: off.", "PATH"),
    Option("record-sample", percentage, "100%",
           "Share of requests recorded, drawn for each request.", "PERCENT"),
    Option("record-max-size", size, "1GiB",
           "When the record file grows past this, it is renamed to FILE.1 (older ones "
           "shift to .2, ...) and a new one begun. A request larger than this, or than "
           "16MiB, is not recorded (counted as skipped).", "SIZE"),
    Option("record-keep", whole_number, "3",
           "How many rotated record files are kept.", "NUMBER"),
    Option("record-secrets", choice("mask", "keep"), "mask",
           "mask replaces the values of Authorization, Proxy-Authorization and Cookie "
           "headers in recorded requests by a placeholder; keep records them as sent.",
           "mask|keep"),
    Option("listen-mode", file_mode, "",
           "For a unix:/path listen address: the socket file's mode, e.g. 0660 (empty: "
           "what the umask gives).", "MODE"),
    Option("listen-owner", owner, "",
           "For a unix:/path listen address: the socket file's owner, as user or "
           "user:group (empty: gproxyd's user).", "OWNER"),
    # TLS on either side (issue #20; gproxyd/tls.py). Without these, TLS passes through.
    Option("tls-cert", optional_path, "",
           "Terminate TLS on the listen side with this PEM certificate (then its chain), so "
           "observers, comparison and hooks see plaintext; production gets plaintext unless "
           "production-tls is on. TLS 1.2 and up, OpenSSL's default ciphers, ALPN http/1.1 "
           "on http routes. The handshake must end within connect-timeout; a failed one is "
           "counted (gproxyd_tls_handshake_failures_total), logged at most once a minute and "
           "closes that client only. Read at start and on each reload (SIGHUP), as "
           "gproxyd's user: new connections use the new certificate, live ones keep theirs; "
           "a file that cannot be used fails the reload and keeps the old one. Empty: TLS "
           "passes through untouched.", "PEM"),
    Option("tls-key", optional_path, "",
           "The unencrypted PEM private key of tls-cert (empty: it is in the tls-cert file).",
           "PEM"),
    Option("production-tls", boolean, "no",
           "Connect to production over TLS (the handshake within connect-timeout, verified "
           "as tls-verify, tls-ca and tls-server-name say): with tls-cert, what the client "
           "sent encrypted is re-encrypted towards production. A failed handshake is a "
           "failed connect to production, also counted apart.", "yes|no"),
    Option("shadow-tls", boolean, "no",
           "Connect to the shadows (and the baseline) over TLS, as production-tls does to "
           "production (within shadow-connect-timeout).", "yes|no"),
    Option("tls-ca", optional_path, "",
           "PEM file of the CA certificates that production-tls and shadow-tls verify "
           "backends with (empty: the system's CAs).", "PEM"),
    Option("tls-verify", boolean, "yes",
           "Verify the certificates of TLS backends (chain and name); no accepts any "
           "certificate (for tests and self-signed backends only).", "yes|no"),
    Option("tls-server-name", optional_text, "",
           "The name sent (SNI) to TLS backends and verified in their certificates (empty: "
           "each backend's own host from its address).", "HOST"),
)

GLOBAL_BY_NAME = {option.name: option for option in GLOBAL_OPTIONS}
ROUTE_BY_NAME = {option.name: option for option in ROUTE_OPTIONS}
