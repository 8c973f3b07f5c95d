"""Loading the config file, environment and command line into one frozen Config.

`load_config()` is the single pure function used by start-up, `--check-config` and
SIGHUP reload alike: it either returns a complete Config or raises ConfigError naming
FILE:LINE, the key, what is wrong and what was expected.
"""
from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Mapping

import configargparse

from . import __version__, checks
from .exitcodes import EX_USAGE
from .settings import (
    GLOBAL_BY_NAME,
    GLOBAL_OPTIONS,
    ORIGINAL_DST,
    ROUTE_BY_NAME,
    ROUTE_OPTIONS,
    Address,
    BadValue,
    HookSpec,
    boolean,
    hide_password,
    listen_address,
)

DEFAULT_PATH = "/etc/gproxyd/gproxyd.conf"

Settings = make_dataclass(
    "Settings", [(o.attr, Any) for o in GLOBAL_OPTIONS], frozen=True,
    namespace={"__doc__": "The [gproxyd] section: process-wide options."})

_RouteOptions = make_dataclass(
    "_RouteOptions", [(o.attr, Any) for o in ROUTE_OPTIONS], frozen=True)


@dataclass(frozen=True)
class Route(_RouteOptions):
    """One [route NAME] section: a listener and where its traffic goes."""
    name: str = ""
    where: str = ""  # FILE:LINE of the section header, for messages


@dataclass(frozen=True)
class Config:
    path: str
    settings: Any
    routes: tuple[Route, ...] = field(default_factory=tuple)


class ConfigError(Exception):
    """A user error in the configuration. str() is the complete message to print."""

    def __init__(self, where: str, key: str, problem: str):
        self.where, self.key, self.problem = where, key, problem
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


class ConfigErrors(ConfigError):
    """Every error found in one reading of the configuration (like `haproxy -c`, all of
    them at once); where/key/problem are the first's, str() has one line each."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        super().__init__(first.where, first.key, first.problem)
        self.errors = list(errors)
        self.args = ("\n".join(str(error) for error in errors),)

    def __str__(self) -> str:
        return self.args[0]


class _Errors(list):
    """Where the readers below put what they find wrong, to raise it all at the end."""

    def raise_any(self) -> None:
        if len(self) == 1:
            raise self[0]
        if self:
            raise ConfigErrors(self)


# --- reading the INI text, keeping line numbers ---------------------------------------

_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\]\s*(?:[;#].*)?$")
_KEY = re.compile(r"^([A-Za-z0-9_.-]+)\s*[=:]\s*(.*)$")
_INLINE_COMMENT = re.compile(r"(?:^|\s+)[;#].*$")


@dataclass
class _Section:
    title: str
    line: int
    values: dict[str, tuple[str, int]] = field(default_factory=dict)


def _read_sections(path: str, errors: _Errors) -> list[_Section]:
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read config file: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "cannot read config file: not UTF-8 text") from None
    sections: list[_Section] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        header = _SECTION.match(line)
        if header:
            sections.append(_Section(" ".join(header.group(1).split()), number))
            continue
        pair = _KEY.match(line)
        if not pair:
            errors.append(ConfigError(f"{path}:{number}", "", f"cannot parse {line!r} "
                                      "(expected [section] or key = value)"))
            continue
        if not sections:
            errors.append(ConfigError(f"{path}:{number}", pair.group(1),
                                      "key outside any section (expected it under "
                                      "[gproxyd] or [route NAME])"))
            continue
        key, value = pair.group(1).lower(), _INLINE_COMMENT.sub("", pair.group(2)).strip()
        section = sections[-1]
        if key in section.values:
            errors.append(ConfigError(f"{path}:{number}", key,
                                      f"given twice in [{section.title}] (first on line "
                                      f"{section.values[key][1]})"))
            continue
        section.values[key] = (value, number)
    return sections


# --- building the frozen config -------------------------------------------------------

def _parse(option, text: str, where: str, errors: _Errors | None = None) -> Any:
    """The option's value; a bad one raises ConfigError, or is added to `errors`."""
    try:
        return option.parse(text)
    except BadValue as error:
        if errors is None:
            raise ConfigError(where, option.name, str(error)) from None
        errors.append(ConfigError(where, option.name, str(error)))
        return None


class _Parser(configargparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage()
        self.exit(EX_USAGE, f"{self.prog}: {message}\n")

    def format_help(self) -> str:
        # configargparse ends the help with its own precedence sentence, which our
        # epilog already says (with the config file in it).
        text = super().format_help()
        stray = text.find("In general, command-line values override")
        return text[:stray].rstrip() + "\n" if stray >= 0 else text


def build_parser(prog: str = "gproxyd") -> configargparse.ArgumentParser:
    """The `gproxyd` command line: -c, the actions, and one flag per global option."""
    parser = _Parser(
        prog=prog, allow_abbrev=False, auto_env_var_prefix=None,
        description="gproxyd: transparent TCP proxy with shadow traffic and live benchmarking.",
        usage="%(prog)s [-c FILE] [--check-config] [OPTIONS]\n       %(prog)s demo [--serve] "
              "[--requests N] [--clients N] [--candidate-delay SECONDS]",
        epilog="gproxyd demo runs a self-contained tour: a production server, a slower "
               "candidate as its shadow and gproxyd between them, with real HTTP traffic "
               "and the comparison at the end (gproxyd demo --help). Every global option "
               "may also be set in the [gproxyd] section of the config "
               "file and in a GPROXYD_* environment variable; precedence: defaults < file < "
               "environment < command line.")
    parser.add_argument("-c", "--config", default=DEFAULT_PATH, env_var="GPROXYD_CONFIG",
                        metavar="FILE", help=f"config file (default: {DEFAULT_PATH})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config file, print a summary and exit (0 if good, "
                             "78 if not)")
    parser.add_argument("--version", action="version", version=f"gproxyd {__version__}")
    # Internal: how the master (workers = N) starts a worker on inherited sockets.
    parser.add_argument("--worker", metavar="SPEC", help=configargparse.SUPPRESS)
    for option in GLOBAL_OPTIONS:
        # A yes/no option is also a bare switch: `--daemonize` means `--daemonize yes`.
        switch = {"nargs": "?", "const": "yes"} if option.parse is boolean else {}
        parser.add_argument(option.flag, dest=option.attr, default=None, env_var=option.env,
                            metavar=option.metavar,
                            help=f"{option.help} (default: {option.default})"
                            if option.default else option.help,
                            **switch)
    return parser


def _cli_and_env(argv: list[str], env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Global option values given on the command line or in GPROXYD_* variables."""
    namespace = build_parser().parse_known_args(argv, env_vars=dict(env))[0]
    found: dict[str, tuple[str, str]] = {}
    for option in GLOBAL_OPTIONS:
        value = getattr(namespace, option.attr, None)
        if value is None:
            continue
        flag_given = any(arg == option.flag or arg.startswith(option.flag + "=") for arg in argv)
        found[option.name] = (value, option.flag if flag_given else option.env)
    return found


def _settings(path: str, section: _Section | None, overrides: dict[str, tuple[str, str]],
              errors: _Errors):
    """The [gproxyd] section, environment and flags as Settings; None if any is wrong
    (each wrong value is added to `errors`)."""
    values = {}
    count = len(errors)
    for option in GLOBAL_OPTIONS:
        # The file's value is checked even when overridden: the same file must not pass
        # --check-config under one environment and fail under another.
        if section and option.name in section.values:
            text, line = section.values[option.name]
            values[option.attr] = _parse(option, text, f"{path}:{line}", errors)
        else:
            values[option.attr] = _parse(option, option.default, "default", errors)
        if option.name in overrides:
            text, where = overrides[option.name]
            values[option.attr] = _parse(option, text, where, errors)
    if len(errors) > count:
        return None
    settings = Settings(**values)

    def where(key: str) -> str:
        if key in overrides:
            return overrides[key][1]
        return f"{path}:{section.values[key][1]}" if (
            section and key in section.values) else path

    if settings.daemonize:
        if settings.log_file == "-":
            errors.append(ConfigError(where("log-file"), "log-file", "'-' (standard error) "
                                      "is closed when daemonized (expected a file path with "
                                      "daemonize)"))
        for key, value in (("log-file", settings.log_file), ("pid-file", settings.pid_file)):
            if value and not os.path.isabs(value):
                errors.append(ConfigError(where(key), key, f"relative path {value!r} with "
                                          "daemonize (expected an absolute path: a daemon "
                                          "runs in /)"))
    for key, problem in checks.settings_problems(settings):
        errors.append(ConfigError(where(key), key, problem))
    return settings


def _route(path: str, section: _Section, name: str, errors: _Errors) -> Route | None:
    """A [route NAME] section as a Route; None if any of it is wrong (added to
    `errors`)."""
    values: dict[str, Any] = {}
    count = len(errors)
    for option in ROUTE_OPTIONS:
        if option.name in section.values:
            text, line = section.values[option.name]
            values[option.attr] = _parse(option, text, f"{path}:{line}", errors)
            if isinstance(values[option.attr], HookSpec):
                values[option.attr] = values[option.attr].at(f"{path}:{line}")
        elif option.default is None:
            errors.append(ConfigError(f"{path}:{section.line}", option.name,
                                      f"missing in [route {name}] (expected {option.name} = "
                                      f"{option.metavar.lower()})"))
        else:
            values[option.attr] = option.parse(option.default)
    if len(errors) > count:
        return None
    route = Route(name=name, where=f"{path}:{section.line}", **values)
    for key, problem in [*_conflicts(route), *checks.route_problems(route)]:
        line = section.values[key][1] if key in section.values else section.line
        errors.append(ConfigError(f"{path}:{line}", key, problem))
    return route


def _transparency_conflicts(route: Route):
    """(key, problem) for transparent-mode and PROXY protocol options that cannot work
    with the route's addresses."""
    unix_listen = route.listen.family == socket.AF_UNIX
    original_dst = route.production is ORIGINAL_DST
    if original_dst and unix_listen and route.accept_proxy == "off":
        yield "production", "original-dst: a unix socket's clients dialled nothing else " \
                            "(expected a TCP listen address, or accept-proxy to take the " \
                            "destination from the PROXY header)"
    if route.listen_transparent and unix_listen:
        yield "listen-transparent", "TPROXY diverts TCP connections (expected a TCP listen " \
                                    "address with listen-transparent)"
    if route.source is None:
        return
    if route.production.family == socket.AF_UNIX:
        yield "source", "a unix socket connection has no source address (expected source " \
                        "= off with a unix:/path production)"
    elif not route.production.numeric and not original_dst:
        yield "source", f"production {route.production} is a host name, which may resolve " \
                        "to another IP version than the source (expected production as an " \
                        "IP address, or original-dst)"
    elif route.source == "client":
        if unix_listen and route.accept_proxy == "off":
            yield "source", "a unix socket's clients have no IP address to connect from " \
                            "(expected a TCP listen address, or accept-proxy to take the " \
                            "client's address from the PROXY header)"
    elif not original_dst and (":" in route.source) != \
            (route.production.family == socket.AF_INET6):
        yield "source", f"{route.source} and production {route.production} are not the " \
                        "same IP version (expected a source address of production's family)"


def _conflicts(route: Route):
    """(key, problem) for each option the route's other options make meaningless."""
    yield from _transparency_conflicts(route)
    protocol = route.protocol
    if route.compare == "status" and protocol != "http":
        yield "compare", f"status compares HTTP status codes (expected body or off on a " \
                         f"{protocol} route)"
    if route.compare_headers and protocol != "http":
        yield "compare-headers", f"headers are HTTP's (expected no compare-headers on a " \
                                 f"{protocol} route)"
    if route.shadow_filter:
        if protocol == "redis" and route.shadow_filter != ("readonly",):
            yield "shadow-filter", f"bad filter {' '.join(route.shadow_filter)!r} (expected " \
                                   "readonly on a redis route)"
        elif protocol == "http" and not all(name.isupper() for name in route.shadow_filter):
            yield "shadow-filter", f"bad filter {' '.join(route.shadow_filter)!r} (expected " \
                                   "HTTP methods in capitals, e.g. GET HEAD OPTIONS)"
        elif protocol not in ("http", "redis"):
            yield "shadow-filter", "requests are told apart only on http and redis routes " \
                                   "(expected protocol = http or redis)"
    if route.archive:
        if protocol != "beanstalkd":
            yield "archive", "jobs are archived from beanstalkd traffic (expected protocol = " \
                             "beanstalkd)"
        elif route.shadow or route.baseline is not None:
            yield "archive", "a route with an archive answers some commands itself, so " \
                             "shadows would not see what production sees (expected no " \
                             "shadow or baseline with archive)"
        elif route.hooks is not None:
            yield "archive", "hooks and an archive both rewrite the traffic (expected one " \
                             "of them on a route)"
    if route.record and protocol != "http":
        yield "record", "requests are recorded whole from HTTP traffic (expected protocol = " \
                        "http)"
    if route.baseline is not None:
        if protocol not in ("http", "redis") or route.compare == "off":
            yield "baseline", "a baseline only serves answer comparison (expected protocol = " \
                              "http or redis, and compare not off)"
        elif route.baseline.sockaddr in {shadow.sockaddr for shadow in route.shadow}:
            yield "baseline", f"{route.baseline} is also a shadow (expected the baseline " \
                              "apart from the shadows compared with it)"
        elif route.baseline.sockaddr == route.production.sockaddr:
            yield "baseline", f"{route.baseline} is production itself (expected a second " \
                              "instance of production's build)"


def make_route(name: str = "proxy", **values: Any) -> Route:
    """A Route from Python values: option names with '_' for '-'; strings are parsed
    like config text, other values (lists of shadows, a hooks object) are taken as they
    are (a hooks object is checked when it is loaded: hooks.load_route_hooks). Raises
    ConfigError naming the option."""
    parsed: dict[str, Any] = {}
    for option in ROUTE_OPTIONS:
        value = values.pop(option.attr, None)
        if value is None:
            if option.default is None:
                raise ConfigError("Proxy()", option.attr, "missing (expected a value)")
            parsed[option.attr] = option.parse(option.default)
        elif option.name == "listen":
            try:
                parsed[option.attr] = listen_address(str(value))
            except BadValue as error:
                raise ConfigError("Proxy()", "listen", str(error)) from None
        elif isinstance(value, str):
            parsed[option.attr] = _parse(option, value, "Proxy()")
        elif option.name == "shadow":
            parsed[option.attr] = _parse(option, ",".join(map(str, value)), "Proxy()")
        elif option.name == "hooks":
            parsed[option.attr] = value  # an object: checked where hooks are loaded
        else:
            parsed[option.attr] = _parse(option, str(value), "Proxy()")
    if values:
        raise ConfigError("Proxy()", ", ".join(values), "unknown option (expected one of: "
                          f"{', '.join(o.attr for o in ROUTE_OPTIONS)})")
    route = Route(name=name, where="Proxy()", **parsed)
    for key, problem in _conflicts(route):
        raise ConfigError("Proxy()", key.replace("-", "_"), problem)
    return route


def load_config(path: str = DEFAULT_PATH, argv: list[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read PATH, then GPROXYD_* variables and command-line flags, into a Config.

    Precedence: defaults < file < environment < command line. Raises ConfigError with
    the one error found, or ConfigErrors with all of them.
    """
    argv = list(argv or [])
    env = os.environ if env is None else env
    errors = _Errors()
    sections = _read_sections(path, errors)
    global_section = None
    routes: list[Route] = []
    names: dict[str, int] = {}
    for section in sections:
        where = f"{path}:{section.line}"
        kind, _, name = section.title.partition(" ")
        if section.title == "gproxyd":
            if global_section is not None:
                errors.append(ConfigError(where, "", "section [gproxyd] given twice (first "
                                                     f"on line {global_section.line})"))
                continue
            global_section = section
            allowed, other = GLOBAL_BY_NAME, ROUTE_BY_NAME
        elif kind == "route" and re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            if name in names:
                errors.append(ConfigError(where, "", f"route {name!r} given twice (first "
                                                     f"on line {names[name]}; expected each "
                                                     "route name once)"))
                continue
            names[name] = section.line
            allowed, other = ROUTE_BY_NAME, GLOBAL_BY_NAME
        else:
            errors.append(ConfigError(where, "", f"unknown section [{section.title}] "
                                                 "(expected [gproxyd] or [route NAME], NAME "
                                                 "of letters, digits, '-', '_' or '.')"))
            continue
        for key, (_, line) in list(section.values.items()):
            if key not in allowed:
                errors.append(ConfigError(f"{path}:{line}", key,
                                          _unknown_key(key, section.title, allowed, other)))
                del section.values[key]
        if allowed is ROUTE_BY_NAME:
            route = _route(path, section, name, errors)
            if route is not None:
                routes.append(route)
    if not names and not errors:
        errors.append(ConfigError(path, "", "no [route NAME] section (expected at least "
                                            "one route)"))
    overrides = _cli_and_env(argv, env)
    settings = _settings(path, global_section, overrides, errors)
    admin_where = path
    if global_section and "admin" in global_section.values:
        admin_where = f"{path}:{global_section.values['admin'][1]}"
    if "admin" in overrides:
        admin_where = overrides["admin"][1]
    for route, key, problem in checks.clashes(routes, settings.admin if settings else None):
        section = next(s for s in sections if s.title == f"route {route.name}")
        line = section.values[key][1] if key in section.values else section.line
        where = admin_where if key == "admin" else f"{path}:{line}"
        errors.append(ConfigError(where, key, problem))
    errors.raise_any()
    return Config(path=path, settings=settings, routes=tuple(routes))


def _unknown_key(key: str, title: str, allowed: Mapping, other: Mapping) -> str:
    """What to say of a key this section does not have: the one meant, if it is clear."""
    if key in other:
        home = "[gproxyd]" if other is GLOBAL_BY_NAME else "a [route NAME] section"
        return f"unknown key in [{title}] (expected it in {home})"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"unknown key in [{title}] (did you mean {close[0]}?)"
    return f"unknown key in [{title}] (expected one of: {', '.join(sorted(allowed))})"


def admin_in_file(path: str) -> Address | None:
    """The admin address a config file gives, read from that one key even when the rest
    of the file is wrong (gproxyctl can still reach a daemon serving its last good
    config); the default when the key is absent. Raises ConfigError when the file cannot
    be read or its admin value is itself wrong."""
    sections = _read_sections(path, _Errors())
    option = GLOBAL_BY_NAME["admin"]
    for section in sections:
        if section.title == "gproxyd" and "admin" in section.values:
            text, line = section.values["admin"]
            return _parse(option, text, f"{path}:{line}")
    return option.parse(option.default)


# --- the effective configuration, as text (gproxyctl config) --------------------------

def effective_text(config: Config) -> str:
    """Every option of every section with the value gproxyd uses, in config file syntax;
    values that are defaults say so. Passwords in archive URLs are hidden."""
    lines = [f"# {config.path}, as gproxyd reads it (file, GPROXYD_* variables, defaults)",
             "[gproxyd]"]
    lines += [_effective_line(option, getattr(config.settings, option.attr))
              for option in GLOBAL_OPTIONS]
    for route in config.routes:
        lines += ["", f"[route {route.name}]"]
        lines += [_effective_line(option, getattr(route, option.attr))
                  for option in ROUTE_OPTIONS]
    return "\n".join(lines) + "\n"


def _effective_line(option, value: Any) -> str:
    text = _as_text(option, value)
    default = option.default is not None and value == option.parse(option.default)
    line = f"{option.name} = {text}".rstrip()
    return f"{line:<40} ; default" if default else line


def _as_text(option, value: Any) -> str:
    """A parsed value back in the syntax the option's parser reads."""
    if value is None:
        return "off" if option.name in ("admin", "source") else ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ", ".join(str(part) for part in value)
    if option.metavar == "DURATION":
        return _duration_text(value)
    if option.metavar == "SIZE":
        return _size_text(value)
    if option.metavar == "PERCENT":
        return f"{value * 100:g}%"
    if option.metavar == "MODE":
        return f"{value:04o}"
    if option.metavar == "URL":
        return hide_password(value)
    return str(value)


def _duration_text(seconds: float) -> str:
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= scale and (seconds / scale).is_integer():
            return f"{seconds / scale:g}{unit}"
    return f"{seconds * 1000:g}ms" if seconds else "0"


def _size_text(count: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if count >= scale and count % scale == 0:
            return f"{count // scale}{unit}"
    return str(count)
