"""Micro-benchmark of the passive framers: gproxyd's pure-Python ones against httptools
(llhttp) and hiredis's reader, on the common case (small HTTP requests and answers,
redis-benchmark's SET/GET/LRANGE_100), one message per feed (request-reply) and 16
(pipelined). Prints CPU microseconds per message, the best of several repeats.

    .venv/bin/python bench/framers.py [--repeat 7] [--messages 20000] [--observer]

httptools and hiredis are optional: a missing one shows as n/a. What each does per
message is what a passive observer needs at least: the HTTP request's method, the
answer's status; the command's name, the reply's type and whether it is an error. Their
limits for passive framing are in the notes printed at the end.

--observer also measures the whole observer on redis-benchmark's traffic
(Exchanges.sent and received, framers and records included), driven as the relay
drives it: 50 connections in turn, each chunk a memoryview of one shared buffer, the
send and arrival times passed in; what the relay does itself (the copy into the
buffer, the slice, the clock) is measured alone and subtracted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gproxyd.observe import Exchanges  # noqa: E402
from gproxyd.protocols import new_framers  # noqa: E402
from gproxyd.stats import RouteStats  # noqa: E402

try:
    import httptools
except ImportError:
    httptools = None
try:
    import hiredis
except ImportError:
    hiredis = None

GET = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:40123\r\n\r\n"  # what wrk sends
POST = (b"POST /post HTTP/1.1\r\nHost: 127.0.0.1:40123\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1024\r\n\r\n" + b"x" * 1024)
SMALL = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
         b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\n"
         b"Connection: keep-alive\r\nETag: \"65a1b2c3-64\"\r\nAccept-Ranges: bytes\r\n\r\n"
         + b"s" * 100)
OK = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
      b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


def command(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


SET = command(b"SET", b"key:__rand_int__", b"xxx")        # redis-benchmark's
GET_CMD = command(b"GET", b"key:__rand_int__")
LRANGE = command(b"LRANGE", b"mylist", b"0", b"99")
REPLY_OK = b"+OK\r\n"
REPLY_GET = b"$3\r\nxxx\r\n"
REPLY_LRANGE = b"*100\r\n" + b"$3\r\nxxx\r\n" * 100

# (name, protocol, direction, message, the request each answers)
CASES = [
    ("http GET request", "http", "request", GET, None),
    ("http POST 1 KiB request", "http", "request", POST, None),
    ("http 100 B answer", "http", "response", SMALL, "GET"),
    ("http 'ok' answer", "http", "response", OK, "POST"),
    ("redis SET", "redis", "request", SET, None),
    ("redis GET", "redis", "request", GET_CMD, None),
    ("redis LRANGE_100", "redis", "request", LRANGE, None),
    ("redis +OK reply", "redis", "response", REPLY_OK, "SET"),
    ("redis GET reply", "redis", "response", REPLY_GET, "GET"),
    ("redis LRANGE_100 reply", "redis", "response", REPLY_LRANGE, "LRANGE"),
]


def framer_feed(protocol: str, direction: str, expects, use_native: bool):
    """feed(chunk, count) with gproxyd's framer; returns the messages completed."""
    pair = new_framers(protocol, use_native=use_native)
    if direction == "request":
        framer = pair[0]

        def feed(chunk, count):
            return len(framer.feed(memoryview(chunk)))
        return feed
    framer = pair[1]

    def feed(chunk, count):
        for _ in range(count):
            framer.expect(expects)
        return len(framer.feed(memoryview(chunk)))
    return feed


def pure(protocol: str, direction: str, expects):
    return framer_feed(protocol, direction, expects, False)


def wrapped(protocol: str, direction: str, expects):
    """gproxyd's framers with the C parser in front (protocols/native.py)."""
    if (httptools if protocol == "http" else hiredis) is None:
        return None
    return framer_feed(protocol, direction, expects, True)


def native(protocol: str, direction: str, expects):
    """httptools or hiredis alone, or None when it is not installed."""
    if protocol == "http":
        if httptools is None:
            return None
        done = []

        class Messages:
            def on_message_complete(self):
                done.append(parser.get_method() if direction == "request"
                            else parser.get_status_code())
        parser = (httptools.HttpRequestParser(Messages()) if direction == "request"
                  else httptools.HttpResponseParser(Messages()))

        def feed(chunk, count):
            parser.feed_data(chunk)
            got = len(done)
            done.clear()
            return got
        return feed
    if hiredis is None:
        return None
    reader = hiredis.Reader()
    error = hiredis.ReplyError

    def feed(chunk, count):
        reader.feed(chunk)
        got = 0
        while True:
            reply = reader.gets()
            if reply is False:
                return got
            if direction == "request":
                reply[0].upper()  # the command's name
            else:
                isinstance(reply, error)
            got += 1
    return feed


def measure(make, case, batch: int, messages: int, repeat: int) -> float | None:
    _, protocol, direction, message, expects = case
    chunk = message * batch
    best = None
    for _ in range(repeat):
        feed = make(protocol, direction, expects)
        if feed is None:
            return None
        rounds = messages // batch
        start = time.process_time()
        for _ in range(rounds):
            got = feed(chunk, batch)
        elapsed = time.process_time() - start
        assert got == batch, (case[0], got)
        per = elapsed * 1e6 / (rounds * batch)
        best = per if best is None or per < best else best
    return best


# redis-benchmark's (-c 50): (name, one write of commands, the chunk answering it, commands)
PIPELINES = [
    ("-P1 SET", SET, REPLY_OK, 1),
    ("-P16 SET", SET * 16, REPLY_OK * 16, 16),
    ("-P16 GET", GET_CMD * 16, REPLY_GET * 16, 16),
    ("LRANGE 0 99", LRANGE, REPLY_LRANGE, 1),
]
CONNECTIONS = 50


def measure_observer(pipeline, use_native: bool, messages: int, repeat: int) -> float:
    """CPU us per command of the whole observer (see --observer), best of `repeat`."""
    _, request, reply, commands = pipeline
    buffer = bytearray(max(len(request), len(reply)))
    view = memoryview(buffer)
    rounds = max(1, messages // (commands * CONNECTIONS))
    best = None
    for _ in range(repeat):
        stats = RouteStats()
        observers = [Exchanges("redis", stats.production, stats, "bench", use_native=use_native)
                     for _ in range(CONNECTIONS)]
        start = time.process_time()
        for _ in range(rounds):
            for observer in observers:
                buffer[:len(request)] = request
                observer.sent(view[:len(request)], time.monotonic())
            for observer in observers:
                buffer[:len(reply)] = reply
                observer.received(view[:len(reply)], time.monotonic())
        elapsed = time.process_time() - start
        start = time.process_time()
        for _ in range(rounds):
            for _observer in observers:
                buffer[:len(request)] = request
                view[:len(request)], time.monotonic()
            for _observer in observers:
                buffer[:len(reply)] = reply
                view[:len(reply)], time.monotonic()
        elapsed -= time.process_time() - start
        assert stats.production.requests == rounds * CONNECTIONS * commands, pipeline[0]
        assert stats.parser_fallbacks == 0, pipeline[0]
        per = elapsed * 1e6 / (rounds * CONNECTIONS * commands)
        best = per if best is None or per < best else best
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--observer", action="store_true",
                        help="also the whole observer on redis-benchmark's pipelines")
    args = parser.parse_args()
    versions = [f"python {sys.version.split()[0]}",
                f"httptools {httptools.__version__}" if httptools else "httptools n/a",
                f"hiredis {hiredis.__version__}" if hiredis else "hiredis n/a"]
    print(f"CPU us per message, best of {args.repeat} x {args.messages} messages "
          f"({', '.join(versions)})\n")
    print("| message | batch | pure Python | httptools / hiredis alone | gproxyd with them "
          "in front | with / pure |")
    print("|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        for batch in (1, 16):
            mine = measure(pure, case, batch, args.messages, args.repeat)
            theirs = measure(native, case, batch, args.messages, args.repeat)
            both = measure(wrapped, case, batch, args.messages, args.repeat)
            ratio = f"{both / mine:.2f}" if both is not None else "n/a"
            print(f"| {case[0]} | {batch} | {mine:.2f} | {shown(theirs)} | {shown(both)} "
                  f"| {ratio} |")
    if args.observer:
        print(f"\nThe whole observer, CPU us per command, best of {args.repeat} "
              f"(redis-benchmark -c {CONNECTIONS})\n")
        print("| pipeline | pure Python | hiredis in front |")
        print("|---|---:|---:|")
        for pipeline in PIPELINES:
            pure_us = measure_observer(pipeline, False, args.messages, args.repeat)
            both = (measure_observer(pipeline, True, args.messages, args.repeat)
                    if hiredis is not None else None)
            print(f"| {pipeline[0]} | {pure_us:.2f} | {shown(both)} |")


def shown(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


if __name__ == "__main__":
    main()
