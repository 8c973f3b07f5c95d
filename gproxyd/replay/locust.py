"""A Locust user that replays a gproxyd recording (or a URL list, or an access log) at a
set rate per user, for load from more machines than one (`pip install gproxyd[locust]`).

    locust -f gproxyd/replay/locust.py --host http://TARGET:PORT \\
        --replay-file requests.rec --replay-rate 20 -u 50 -r 10 --headless --run-time 5m

Each user sends the requests one after another, each at its slot of a fixed schedule
(user start + i / --replay-rate): the offered load is users x rate. A user whose answer
comes later than its next slot sends the next request at once, so it catches up; add
users rather than rate per user to stay open-loop. Within a process the users take the
requests in file order, one counter for all of them, looping; each Locust worker goes
through the whole input in order. Requests are sent as `gproxyctl replay` sends them:
a recording's bytes as recorded (Host included), URL-list and access-log requests as
GET with Host: the --host's host:port. Every worker needs the input file at the same
path (the master passes the --replay-* options on to its workers).

Loaded by path (locust -f); it imports the rest of gproxyd absolutely for that reason.
"""
from __future__ import annotations

import itertools
import time
from urllib.parse import urlsplit

from locust import User, events, task
from locust.exception import StopUser

from gproxyd.replay.engine import Tally, send
from gproxyd.replay.sources import SourceError, load
from gproxyd.settings import BadValue, address

MAX_NAMES = 100  # distinct request names in Locust's stats; later paths count as "other"
_names: set[str] = set()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("gproxyd replay")
    group.add_argument("--replay-file", default="", metavar="FILE",
                       help="a record file written by gproxyd (record = PATH)")
    group.add_argument("--replay-urls", default="", metavar="FILE",
                       help="instead: paths to GET, one per line")
    group.add_argument("--replay-access-log", default="", metavar="FILE",
                       help="instead: an nginx/Apache combined-format access log (GETs)")
    group.add_argument("--replay-rate", type=float, default=1.0, metavar="RATE",
                       help="requests per second per user (default: 1)")
    group.add_argument("--replay-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="seconds a request may take (default: 5)")


class _Input:
    """What this process replays, loaded once for all its users."""

    def __init__(self, options, host: str) -> None:
        given = [value for value in (options.replay_file, options.replay_urls,
                                     options.replay_access_log) if value]
        if len(given) != 1:
            raise SourceError("expected exactly one of --replay-file, --replay-urls or "
                              "--replay-access-log")
        parts = urlsplit(host if "://" in host else f"http://{host}")
        if parts.scheme != "http" or not parts.hostname:
            raise SourceError(f"--host {host}: expected http://HOST:PORT (plain HTTP)")
        port = parts.port or 80
        try:
            self.address = address(f"{parts.hostname}:{port}" if ":" not in parts.hostname
                                   else f"[{parts.hostname}]:{port}")
        except BadValue as error:
            raise SourceError(f"--host {host}: {error}") from None
        source = load(options.replay_file or None, options.replay_urls or None,
                      options.replay_access_log or None)
        self.requests = source.requests_for(parts.netloc)
        self.names = [self._name(request.data) for request in self.requests]
        self.next = itertools.count()
        self.timeout = options.replay_timeout

    @staticmethod
    def _name(data: bytes) -> str:
        target = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b"?"
        return target.split(b"?", 1)[0].decode("latin-1")[:80]


_loaded: dict[str, _Input] = {}


class ReplayUser(User):
    """Sends the input's requests at --replay-rate per second, on one kept-alive
    connection (reopened when it closes)."""

    def wait_time(self) -> float:
        due = self._started + self._count / self._rate
        return max(0.0, due - time.monotonic())

    def on_start(self) -> None:
        options = self.environment.parsed_options
        host = self.host or self.environment.host or ""
        try:
            if host not in _loaded:
                _loaded[host] = _Input(options, host)
        except SourceError as error:
            self.environment.events.user_error.fire(user_instance=self, exception=error,
                                                    tb=None)
            raise StopUser() from None
        self._input = _loaded[host]
        self._rate = options.replay_rate
        self._started = time.monotonic()
        self._count = 0
        self._connection = None

    def on_stop(self) -> None:
        if getattr(self, "_connection", None) is not None:
            self._connection.close()
            self._connection = None

    @task
    def replay(self) -> None:
        feed = self._input
        index = next(feed.next) % len(feed.requests)
        request = feed.requests[index]
        self._count += 1
        name = feed.names[index]
        if name not in _names and len(_names) >= MAX_NAMES:
            name = "other"
        _names.add(name)
        started = time.monotonic()
        tally = Tally(started, 0.0)
        self._connection, outcome = send(feed.address, self._connection, request, started,
                                         feed.timeout, tally)
        elapsed_ms = (time.monotonic() - started) * 1000.0
        if isinstance(outcome, int):
            # As Locust's own HTTP users count them: 4xx and 5xx answers are failures.
            failure = None if outcome < 400 else Exception(f"HTTP {outcome}")
        else:
            failure = Exception(outcome)
        self.environment.events.request.fire(
            request_type=request.method, name=name, response_time=elapsed_ms,
            response_length=tally.bytes_in, exception=failure, context={}, response=None,
            url=name)

