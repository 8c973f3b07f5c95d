#!/usr/bin/env python3
"""Duplex HTTP: every request goes to production and to a shadow; each one's time is logged.

The client talks to production as if nothing were between them; a shadow (a candidate
build, a benchmark box) gets the same requests, and its answers are read and dropped.
For each connection the hooks log, per backend, the time from the client's first byte
to that backend's first and last answer byte.

The shadows' copies of the requests are tagged with a User-Agent of our own, so their
logs can tell mirrored traffic apart; production gets the client's bytes untouched
(on_data returns {backend: bytes}). --user-agent "" leaves the copies as they are.

    python3 examples/duplex_http.py --listen 127.0.0.1:8080 \\
        --production 127.0.0.1:8081 --shadow 127.0.0.1:8082

or in a config file (any number of shadows; the default User-Agent):

    [route duplex]
    listen = 127.0.0.1:8080
    production = 127.0.0.1:8081
    shadow = 127.0.0.1:8082
    hooks = /path/to/examples/duplex_http.py
"""
if __name__ == "__main__":  # as a script, patch first; as a hooks module the daemon does it
    from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
from time import monotonic  # noqa: E402

log = logging.getLogger("gproxyd.examples.duplex")

_HEADER_END = b"\r\n\r\n"
MAX_HEAD = 64 * 1024  # a longer header block is passed on untouched
_USER_AGENT = re.compile(rb"^User-Agent:[^\r\n]*\r\n", re.IGNORECASE | re.MULTILINE)
_CONTENT_LENGTH = re.compile(rb"^Content-Length:\s*([0-9]+)\s*\r\n", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^Transfer-Encoding:[^\r\n]*chunked", re.IGNORECASE | re.MULTILINE)


class DuplexHTTP:
    """Hooks: tag each request's User-Agent and time every backend's answer.

    `report(conn, backend, first, last)` is called once per backend when its side
    ends, with the seconds from the client's first byte to that backend's first and
    last answer byte (None if it never answered); the default logs a line.
    """

    def __init__(self, user_agent: str = "gproxyd-duplex", report=None):
        self.user_agent = user_agent.encode()
        self.report = report or self._log

    # --- requests: rewrite the User-Agent in each header block ----------------------

    def on_data(self, conn, data: bytes) -> dict | bytes | None:
        state = conn.state
        state.setdefault("started", monotonic())
        if not self.user_agent or state.get("opaque"):
            return data
        copy = []  # what the shadows get: the same bytes, each header block tagged
        pending = state.pop("pending", b"") + data
        while pending:
            body_left = state.get("body_left", 0)
            if body_left:  # a request body: passed on as it is
                copy.append(pending[:body_left])
                state["body_left"] = body_left - len(copy[-1])
                pending = pending[len(copy[-1]):]
                continue
            end = pending.find(_HEADER_END)
            if end < 0 and len(pending) > MAX_HEAD:  # not HTTP as we know it
                state["opaque"] = True
                copy.append(pending)
                break
            if end < 0:  # the header block is not complete yet: hold it back
                state["pending"] = pending
                break
            head, pending = pending[:end + 4], pending[end + 4:]
            copy.append(self._tagged(head))
            if _CHUNKED.search(head):  # no framing to follow: pass the rest through
                state["opaque"] = True
                copy.append(pending)
                break
            length = _CONTENT_LENGTH.search(head)
            state["body_left"] = int(length.group(1)) if length else 0
        tagged = b"".join(copy)
        # Production gets the client's bytes as they come; held-back bytes (an unfinished
        # header block) reach the shadows once complete.
        return {"production": data, **{backend: tagged for backend in conn.backends[1:]}}

    def _tagged(self, head: bytes) -> bytes:
        header = b"User-Agent: " + self.user_agent + b"\r\n"
        if _USER_AGENT.search(head):
            return _USER_AGENT.sub(lambda _: header, head, count=1)
        request_line_end = head.find(b"\r\n") + 2
        return head[:request_line_end] + header + head[request_line_end:]

    # --- answers: time them per backend ----------------------------------------------

    def on_response(self, conn, backend: str, data: bytes) -> bytes:
        now = monotonic()
        conn.state.setdefault("first", {}).setdefault(backend, now)
        conn.state.setdefault("last", {})[backend] = now
        return data  # production's answer goes to the client unchanged

    def on_finish(self, conn, backend: str) -> None:
        started = conn.state.get("started")
        first = conn.state.get("first", {}).get(backend)
        last = conn.state.get("last", {}).get(backend)
        if started is None:
            return  # the client sent nothing: nothing to time
        self.report(conn, backend, first and first - started, last and last - started)

    @staticmethod
    def _log(conn, backend: str, first: float | None, last: float | None) -> None:
        if first is None:
            log.info("route %s client %s: %s did not answer", conn.route, conn.client, backend)
        else:
            log.info("route %s client %s: %s answered in %.1f ms (last byte %.1f ms)",
                     conn.route, conn.client, backend, first * 1000, last * 1000)


# Module-level hooks with the default User-Agent, for `hooks = .../duplex_http.py`.
hooks = DuplexHTTP()
on_data = hooks.on_data
on_response = hooks.on_response
on_finish = hooks.on_finish


def build(argv: list[str] | None = None):
    """The proxy the command line asks for, not started yet."""
    import gproxyd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="where clients connect")
    parser.add_argument("--production", default="127.0.0.1:8081", help="the real server")
    parser.add_argument("--shadow", action="append", default=None,
                        help="a shadow server (repeat for more; default 127.0.0.1:8082)")
    parser.add_argument("--user-agent", default="gproxyd-duplex",
                        help="User-Agent put on every request ('' leaves requests alone)")
    args = parser.parse_args(argv)
    return gproxyd.Proxy(listen=args.listen, production=args.production, name="duplex",
                         shadow=args.shadow or ["127.0.0.1:8082"],
                         hooks=DuplexHTTP(args.user_agent))


def main(argv: list[str] | None = None) -> None:
    build(argv).serve_forever()


if __name__ == "__main__":
    main()
