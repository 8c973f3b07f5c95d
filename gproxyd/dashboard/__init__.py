"""The admin endpoint's dashboard: GET / (a page), /stats/history (JSON), who may ask.

The page (index.html, app.js, style.css beside this file, shipped as package data) is
plain JavaScript that draws its charts itself as inline SVG: nothing is fetched from
elsewhere, so it works on a host without Internet access, and there is no third-party
code to vendor or license. It polls, once a second, /dashboard/summary.json (the /stats
document with each shadow's verdict in words) and /stats/history (history.History),
and every few seconds /mismatches.

The admin endpoint calls `allowed()` before anything else and `handle()` for the paths
here (`middleware()` puts both in front of its WSGI application); both are plain
functions of the request, so the endpoint (admin.py) keeps its own server, caps and
deadlines.
"""
from __future__ import annotations

import ipaddress
import json
import re
import time
from hmac import compare_digest
from importlib.resources import files
from typing import TYPE_CHECKING, Callable, Iterable, Mapping
from urllib.parse import parse_qs

from .. import __version__
from ..report import verdict
from ..stats import RouteStats

if TYPE_CHECKING:  # history.py imports gevent, which gproxyctl (read_token) does without
    from ..history import History

# (status, headers, body): what the admin endpoint sends back.
Answer = tuple[str, list[tuple[str, str]], bytes]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The cookie a browser keeps the bearer token in, once it opened /?token=TOKEN.
TOKEN_COOKIE = "gproxyd-admin-token"
# What a token may be: long enough not to be guessed, and safe in a header and a cookie.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")

# The history a page or a client asks for: 5 minutes unless told, an hour at most.
DEFAULT_SINCE = 300.0

_SAME_ORIGIN_ONLY = (
    # Nothing but this endpoint's own script, style and JSON: proxied traffic shown on the
    # page (request lines, bodies) cannot run or load anything even if it got past the
    # escaping.
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_COMMON = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")]


def _asset(name: str) -> bytes | None:
    try:
        return (files(__package__) / name).read_bytes()
    except OSError:  # an installation without its package data: the rest still serves
        return None


# Read at import: a daemon imports everything before it drops privileges (cli.py).
_ASSETS = {
    "/": (_asset("index.html"), "text/html; charset=utf-8"),
    "/dashboard/app.js": (_asset("app.js"), "text/javascript; charset=utf-8"),
    "/dashboard/style.css": (_asset("style.css"), "text/css; charset=utf-8"),
}

REFUSED: Answer = (
    "403 Forbidden", [("Content-Type", "text/plain"), *_COMMON],
    b"forbidden: this source address is not in admin-allow, or a bearer token is needed "
    b"(admin-token): send 'Authorization: Bearer TOKEN', or open /?token=TOKEN once in a "
    b"browser\n")


class TokenError(Exception):
    """The admin-token file cannot be used; str() says why, naming the file."""


def read_token(path: str) -> str:
    """The bearer token in the admin-token file `path` ('' when path is ''): its one
    line, without the line end. Raises TokenError."""
    if not path:
        return ""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except OSError as error:
        raise TokenError(f"admin-token: cannot read {path}: {error.strerror} (it must be "
                         "readable by gproxyd's user)") from None
    except UnicodeDecodeError:
        text = "\0"
    token = text.strip()
    if not _TOKEN.fullmatch(token):
        raise TokenError(f"admin-token: {path}: expected one line of at least 16 "
                         "letters, digits or . _ ~ + / = - (e.g. from "
                         "'openssl rand -hex 32')")
    return token


def allowed(peer: str, headers: Mapping[str, str], allow: Iterable[Network], token: str,
            path: str = "/", query: str = "") -> bool:
    """Whether a request may be answered.

    `peer`: the client's IP address as text ('' for a unix socket, whose file mode decides
    who connects); `headers`: the request's "authorization" and "cookie" headers (lower
    case names); `allow`: admin-allow's networks; `token`: admin-token's token ('' if
    none). Loopback clients are always allowed; another client must come from a network in
    `allow` and, when there is a token, present it: as 'Authorization: Bearer TOKEN', as
    the cookie TOKEN_COOKIE, or as /?token=TOKEN (the page only). /healthz needs no token:
    load balancers ask it.
    """
    if not peer:
        return True
    try:
        ip = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    if not any(ip.version == network.version and ip in network for network in allow):
        return False
    if not token or path == "/healthz":
        return True
    wanted = token.encode()
    return any(compare_digest(given.encode("utf-8", "replace"), wanted)
               for given in _presented(headers, path, query))


def _presented(headers: Mapping[str, str], path: str, query: str) -> list[str]:
    """The tokens a request carries."""
    found = []
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        found.append(credentials.strip())
    for pair in headers.get("cookie", "").split(";"):
        name, _, value = pair.strip().partition("=")
        if name == TOKEN_COOKIE:
            found.append(value)
    if path == "/":
        found.extend(parse_qs(query).get("token", []))
    return found


def handle(path: str, query: str, source: Callable[[], dict[str, RouteStats]],
           history: History | None, stats_json: Callable[[], bytes] | None = None,
           now: Callable[[], float] = time.time) -> Answer | None:
    """The answer to GET `path`?`query` if it is the dashboard's, else None.

    `source()`: {route: RouteStats}, as for /stats; `stats_json()`: the /stats document
    as the endpoint serves it (so the page shows the very numbers of /stats; without it,
    rendered here from `source()`); `history`: what /stats/history reads (None: no
    /stats/history here, as from a gproxyd without it).
    """
    if path in ("/", "/index.html"):
        if "token" in parse_qs(query):
            # allowed() has checked it: keep it in a cookie, and take it out of the
            # address bar (and of the browser's history).
            token = parse_qs(query)["token"][-1]
            return ("303 See Other",
                    [("Location", "/"), ("Content-Type", "text/plain"),
                     ("Set-Cookie", f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; "
                                    "SameSite=Strict"), *_COMMON], b"see /\n")
        path = "/"
    if path in _ASSETS:
        body, kind = _ASSETS[path]
        if body is None:
            return _text("500 Internal Server Error", "the dashboard's files are missing "
                         "from this installation of gproxyd (gproxyd/dashboard/*.html, *.js, "
                         "*.css): reinstall it\n")
        return ("200 OK", [("Content-Type", kind), ("Cache-Control", "no-cache"),
                           ("Content-Security-Policy", _SAME_ORIGIN_ONLY), *_COMMON], body)
    if path == "/stats/history" and history is not None:
        try:
            document = history_document(history, query, now())
        except LookupError as error:
            return _text("404 Not Found", f"{error.args[0]}\n")
        except ValueError as error:
            return _text("400 Bad Request", f"{error}\n")
        return _json(document, compact=True)
    if path == "/dashboard/summary.json":
        return _json(summary(stats_json() if stats_json is not None
                             else _stats_json(source())))
    return None


def middleware(app, source: Callable[[], dict[str, RouteStats]], history: History | None,
               stats_json: Callable[[], bytes] | None = None,
               access: Callable[[], tuple[Iterable[Network], str]] = lambda: ((), "")):
    """The admin endpoint's WSGI `app` behind the dashboard: every request is checked
    with allowed() (`access()` gives admin-allow's networks and the token, read at each
    request so that a reload changes them), then answered by handle() or else by `app`."""
    def application(environ, start_response):
        path, query = environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", "")
        headers = {"authorization": environ.get("HTTP_AUTHORIZATION", ""),
                   "cookie": environ.get("HTTP_COOKIE", "")}
        allow, token = access()
        if not allowed(environ.get("REMOTE_ADDR", ""), headers, allow, token, path, query):
            answer = REFUSED
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return app(environ, start_response)
        else:
            answer = handle(path, query, source, history, stats_json)
            if answer is None:
                return app(environ, start_response)
        status, answer_headers, body = answer
        start_response(status, [*answer_headers, ("Content-Length", str(len(body)))])
        return [body]
    return application


def history_document(history: History, query: str, now: float) -> dict:
    """/stats/history?route=NAME&since=SECONDS&step=1|10 (see History.document): the
    points of the last `since` seconds (default 300, at most what the coarsest tier
    keeps). Raises ValueError for a bad value, LookupError for an unknown route."""
    asked = {key: values[-1] for key, values in parse_qs(query).items()}
    since = _seconds(asked, "since", DEFAULT_SINCE)
    step = _seconds(asked, "step", None)
    longest = max(seconds * kept for seconds, kept in history.tiers)
    if since <= 0:
        raise ValueError(f"bad since {asked['since']!r} (expected seconds above 0, at "
                         f"most {longest:g})")
    steps = [seconds for seconds, _ in history.tiers]
    if step is not None and step not in steps:
        raise ValueError(f"bad step {asked['step']!r} (expected one of: "
                         f"{', '.join(f'{seconds:g}' for seconds in steps)})")
    route = asked.get("route")
    if route is not None and route not in history.routes():
        known = ", ".join(history.routes()) or "none yet"
        raise LookupError(f"no route {route!r} (routes: {known})")
    document = history.document(now, min(since, longest), route, step)
    return {"version": __version__, **document}


def _seconds(asked: dict, key: str, default: float | None) -> float | None:
    if key not in asked:
        return default
    try:
        value = float(asked[key])
    except ValueError:
        raise ValueError(f"bad {key} {asked[key]!r} (expected seconds)") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"bad {key} {asked[key]!r} (expected seconds)")
    return value


_cached: tuple[bytes, dict] | None = None


def summary(stats_text: bytes) -> dict:
    """The /stats document with, per shadow, "verdict": report.verdict()'s sentence
    (what the log's summary line and gproxyctl say). Kept for the same /stats text, so
    that many pages polling cost one reading."""
    global _cached
    if _cached is not None and _cached[0] is stats_text:
        return _cached[1]
    document = json.loads(stats_text)
    for route in document.get("routes", {}).values():
        threshold = route.get("verdict_threshold_ms")
        for shadow in route.get("shadows", {}).values():
            shadow["verdict"] = verdict(route["production"], shadow, threshold)
    _cached = (stats_text, document)
    return document


def _stats_json(routes: dict[str, RouteStats]) -> bytes:
    return json.dumps({"version": __version__, "time": round(time.time(), 3),
                       "routes": {name: stats.snapshot()
                                  for name, stats in routes.items()}}).encode()


def _json(document: dict, compact: bool = False) -> Answer:
    # A history of 900 points a backend is read every time a page opens: no indent.
    text = json.dumps(document, separators=(",", ":")) if compact else \
        json.dumps(document, indent=1)
    return ("200 OK", [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                       *_COMMON], text.encode() + b"\n")


def _text(status: str, text: str) -> Answer:
    return (status, [("Content-Type", "text/plain"), *_COMMON], text.encode())
