"""The scenarios about bytes on the wire: bulk streams, half-close patterns, malformed
and fuzzed http/redis, large and deep Redis replies, slow half headers, resets."""
from __future__ import annotations

import errno
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
import zlib

import gevent
from gevent.event import AsyncResult
from gevent.pool import Pool
from gpbench.procfs import tree_fds

from . import corpus
from .harness import (
    MIB,
    Bench,
    PeakRss,
    Row,
    alive,
    connect,
    cpu_seconds,
    free_port,
    global_section,
    log_problems,
    route,
    rss_mib,
    settle_fds,
    stats,
    wait_until,
)
from .peers import (
    PATTERNS,
    BulkBackend,
    DeepReply,
    FuzzBackend,
    HalfCloseBackend,
    Recorder,
    Sink,
    Stall,
    Stream,
    half_close_client,
    hash_to_eof,
    read_to_eof,
    reset,
)
from .peers import Backend as PeerBackend


def _shadow_numbers(admin: int, name: str) -> dict:
    shadows = stats(admin)["routes"][name]["shadows"]
    return next(iter(shadows.values())) if shadows else {}


# -- 1 ----------------------------------------------------------------------------------

def bulk(bench: Bench, size: int) -> Row:
    row = Row(1, f"{size // MIB} MiB each way through a tcp route, sha256; without and with "
                 "a stalled shadow (accepts, never reads)",
              "byte-exact with and without a stalled shadow (time, RSS not given)")
    up, down = Stream(1, size), Stream(2, size)
    up.digest(), down.digest()
    parts, exact = [], True
    for stalled in (False, True):
        backend, stall = BulkBackend(down), Stall()
        port, admin = free_port(), free_port()
        keys = {"shadow": stall.address} if stalled else {}
        daemon = bench.daemon(f"bulk-{int(stalled)}", global_section(f"127.0.0.1:{admin}")
                              + route("bulk", port, backend.address, **keys))
        try:
            idle = rss_mib(daemon.pid)
            peak = PeakRss(daemon.pid)
            began = time.monotonic()
            with connect(port, timeout=120) as sock:
                sender = gevent.spawn(up.send, sock)
                got = hash_to_eof(sock)
                sender.get(timeout=600)
            elapsed = time.monotonic() - began
            wait_until(lambda peer=backend: peer.results or peer.failures, timeout=60,
                       what="the backend's hash")
            peak.stop()
            ok = (backend.results == [(size, up.digest())] and got == (size, down.digest())
                  and alive(daemon))
            exact &= ok
            text = (f"{'stalled shadow' if stalled else 'no shadow'}: "
                    f"{'exact' if ok else 'NOT exact'} both ways, {elapsed:.1f} s "
                    f"({2 * size / MIB / elapsed:.0f} MiB/s both ways together), "
                    f"RSS {idle:.0f} -> peak {peak.peak:.0f} MiB")
            if stalled:
                # the outcome is counted when the shadow connection ends (shadow-linger)
                try:
                    wait_until(lambda port=admin: sum(_shadow_numbers(port, "bulk").get(
                        "outcomes", {}).values()), timeout=15)
                except AssertionError:
                    pass
                shadow = _shadow_numbers(admin, "bulk")
                text += f", shadow outcome {json.dumps(shadow.get('outcomes', {}))}"
            if not ok:
                text += (f" [client got {got[0]} B, backend got {backend.results} "
                         f"{backend.failures}]")
            parts.append(text)
        finally:
            bench.stop(daemon)
            backend.stop()
            stall.stop()
    row.now = "; ".join(parts) + " (client and backend in one Python process: the time " \
                                 "is mostly theirs; gproxyd splices)"
    row.verdict = "ok" if exact else "DEFECT"
    return row


# -- 2 ----------------------------------------------------------------------------------

def half_close(bench: Bench, count: int, concurrency: int = 200) -> Row:
    row = Row(2, f"{count:,} connections, random half-close patterns "
                 f"({', '.join(PATTERNS)}), 0-300 KB each way",
              "5,000 connections exact")
    backend = HalfCloseBackend()
    port = free_port()
    daemon = bench.daemon("halfclose", global_section() + route("hc", port, backend.address))
    client_bad: list[str] = []

    def one(ident: int) -> None:
        try:
            why = half_close_client(port, ident, random.Random(ident))
        except Exception as error:  # noqa: BLE001 - counted and shown
            why = f"#{ident}: {type(error).__name__}: {error}"
        if why:
            client_bad.append(why)
    try:
        began = time.monotonic()
        pool = Pool(concurrency)
        for ident in range(count):
            pool.spawn(one, ident)
        pool.join(timeout=300)
        elapsed = time.monotonic() - began
        wait_until(lambda: backend.ok + len(backend.bad) + len(backend.failures) >= count,
                   timeout=30, what="every backend verdict")
        served = alive(daemon)
    finally:
        bench.stop(daemon)
        backend.stop()
    upload_bad = len(backend.bad) + len(backend.failures)
    row.now = (f"downloads exact {count - len(client_bad):,}/{count:,}, uploads exact "
               f"{backend.ok:,}/{count:,}, {elapsed:.1f} s")
    problems = client_bad[:2] + backend.bad[:2] + backend.failures[:2]
    if problems:
        row.now += f" (first: {'; '.join(problems)})"
    row.verdict = "ok" if not client_bad and not upload_bad and served else "DEFECT"
    return row


# -- 3 ----------------------------------------------------------------------------------

def _relay_case(port: int, production: Recorder, shadow: Recorder, request: bytes,
                reply: bytes) -> tuple[bool, bool, bool]:
    """(client got the reply, production got the request, the shadow got the request)."""
    production.case = (request, reply, AsyncResult())
    shadow.case = (request, reply, AsyncResult())
    try:
        with connect(port) as sock:
            sock.sendall(request)
            got = read_to_eof(sock)
    except OSError as error:
        got = f"<{errno.errorcode.get(error.errno, error.errno)}>".encode()
    at_production = production.case[2].get(timeout=10)
    try:
        at_shadow = shadow.case[2].get(timeout=10)
    except gevent.Timeout:
        at_shadow = None
    return got == reply, at_production == request, at_shadow == request


def malformed(bench: Bench) -> Row:
    sets = {"http": corpus.malformed(corpus.HTTP_REQUESTS, corpus.HTTP_REPLIES),
            "redis": corpus.malformed(corpus.RESP_COMMANDS, corpus.RESP_REPLIES)}
    kinds = (len(corpus.HTTP_REQUESTS) + len(corpus.HTTP_REPLIES) + len(corpus.RESP_COMMANDS)
             + len(corpus.RESP_REPLIES))
    row = Row(3, f"malformed HTTP and RESP through protocol = http / redis routes with a "
                 f"shadow ({kinds} hand-built malformed requests and replies)",
              "47 kinds relayed unchanged")
    peers = {name: (Recorder(), Recorder()) for name in sets}
    ports = {name: free_port() for name in sets}
    admin = free_port()
    config = global_section(f"127.0.0.1:{admin}") + "".join(
        route(name, ports[name], peers[name][0].address, protocol=name,
              shadow=peers[name][1].address) for name in sets)
    daemon = bench.daemon("malformed", config)
    parts, all_ok, failed = [], True, []
    try:
        for name, cases in sets.items():
            counts = [0, 0, 0]
            for index, (request, reply) in enumerate(cases):
                result = _relay_case(ports[name], *peers[name], request, reply)
                for position, ok in enumerate(result):
                    counts[position] += ok
                if not all(result[:2]):
                    failed.append(f"{name} case {index}: {request[:40]!r} / {reply[:40]!r}")
            all_ok &= counts[0] == counts[1] == len(cases)
            parts.append(f"{name}: {len(cases)} exchanges, reply unchanged at the client "
                         f"{counts[0]}/{len(cases)}, request unchanged at production "
                         f"{counts[1]}/{len(cases)}, at the shadow {counts[2]}/{len(cases)}")
        gevent.sleep(1.1)   # /stats is rendered at most once a second
        routes = stats(admin)["routes"]
        parts = [f"{part} (parser fallbacks {routes[name].get('parser_fallbacks')})"
                 for name, part in zip(sets, parts, strict=True)]
        problems = log_problems(daemon.log())
        served = alive(daemon)
    finally:
        bench.stop(daemon)
        for pair in peers.values():
            for peer in pair:
                peer.stop()
    row.now = "; ".join(parts) + f"; daemon {'alive' if served else 'GONE'}, " \
                                 f"{len(problems)} traceback lines in its log"
    if failed:
        row.now += f" (changed: {'; '.join(failed[:3])})"
    row.verdict = "ok" if all_ok and served and not problems else "DEFECT"
    return row


# -- 4 ----------------------------------------------------------------------------------

def _fuzz_client(port: int, case: bytes, replies: list[bytes], rng: random.Random) -> bool:
    """Send CASE in 1-3 pieces, half-close, read to EOF: True when the reply is the one the
    request picks (so neither direction lost or changed a byte)."""
    with connect(port, timeout=30) as sock:
        cuts = sorted(rng.randint(0, len(case)) for _ in range(rng.randint(0, 2)))
        start = 0
        for cut in cuts + [len(case)]:
            sock.sendall(case[start:cut])
            start = cut
            if rng.random() < 0.3:
                gevent.sleep(0.001)
        sock.shutdown(socket.SHUT_WR)
        got = read_to_eof(sock)
    return got == replies[zlib.crc32(case) % len(replies)]


def fuzz(bench: Bench, seconds: float, concurrency: int = 32) -> Row:
    row = Row(4, f"fuzzer through http and redis routes with a shadow each ({seconds:g} s "
                 f"per route, {concurrency} clients each, both at once): random bytes, "
                 "valid messages, mutated ones",
              "110k cases, no crash")
    seeds = {"http": (corpus.HTTP_SEEDS, corpus.HTTP_REPLY_SEEDS),
             "redis": (corpus.RESP_SEEDS, corpus.RESP_REPLY_SEEDS)}
    replies = {name: corpus.fuzz_replies(index, pair[1])
               for index, (name, pair) in enumerate(seeds.items())}
    peers = {name: (FuzzBackend(replies[name]), FuzzBackend(replies[name])) for name in seeds}
    ports = {name: free_port() for name in seeds}
    config = global_section() + "".join(
        route(name, ports[name], peers[name][0].address, protocol=name,
              shadow=peers[name][1].address) for name in seeds)
    daemon = bench.daemon("fuzz", config)
    counts = {name: [0, 0, 0] for name in seeds}   # cases, exact, client errors
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker(name: str, number: int) -> None:
        rng = random.Random(f"{name}-{number}")
        while time.monotonic() < deadline and alive(daemon):
            case = corpus.fuzz_case(rng, seeds[name][0])
            try:
                exact = _fuzz_client(ports[name], case, replies[name], rng)
            except OSError as error:
                exact = False
                counts[name][2] += 1
                if len(errors) < 3:
                    errors.append(f"{name}: {error}")
            counts[name][0] += 1
            counts[name][1] += exact
    try:
        workers = [gevent.spawn(worker, name, number) for name in seeds
                   for number in range(concurrency)]
        gevent.joinall(workers, timeout=seconds + 60)
        served = alive(daemon)
        after = {}
        for name in seeds:
            case = corpus.HTTP_SEEDS[0] if name == "http" else corpus.RESP_SEEDS[0]
            after[name] = served and _fuzz_client(ports[name], case, replies[name],
                                                  random.Random(0))
        problems = log_problems(daemon.log())
    finally:
        bench.stop(daemon)
        for pair in peers.values():
            for peer in pair:
                peer.stop()
    total = sum(count[0] for count in counts.values())
    parts = [f"{name}: {count[0]:,} cases, {count[1]:,} byte-exact both ways, "
             f"{count[2]} client errors" for name, count in counts.items()]
    row.now = (f"{total:,} cases: " + "; ".join(parts)
               + f"; daemon {'alive' if served else 'GONE'}, serving after: "
               + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in after.items())
               + f"; {len(problems)} traceback lines in its log")
    if errors:
        row.now += f" (first errors: {'; '.join(errors)})"
    exact = all(count[0] == count[1] for count in counts.values())
    row.verdict = "ok" if served and all(after.values()) and exact and not problems \
        else "DEFECT"
    return row


# -- 10 ---------------------------------------------------------------------------------

PINGER = r"""
import json, signal, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
stopped = []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
times, end = [], time.monotonic() + seconds
while time.monotonic() < end and not stopped:
    began = time.perf_counter()
    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
    data = b""
    while not data.endswith(b"\r\n"):
        data += sock.recv(100)
    times.append(time.perf_counter() - began)
    time.sleep(0.002)
times.sort()
print(json.dumps({"max_ms": times[-1] * 1000, "p50_ms": times[len(times) // 2] * 1000,
                  "count": len(times)}))
"""


def _resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _load_list(port: int, elements: int) -> bytes:
    """RPUSH ELEMENTS numbers into `big`; returns the exact LRANGE 0 -1 reply."""
    values = [b"%d" % n for n in range(elements)]
    with connect(port, timeout=60) as sock:
        sock.sendall(_resp(b"DEL", b"big"))
        sock.recv(100)
        batches = [values[at:at + 10000] for at in range(0, elements, 10000)]
        for batch in batches:
            sock.sendall(_resp(b"RPUSH", b"big", *batch))
        replies = b""
        while replies.count(b"\r\n") < len(batches):
            replies += sock.recv(65536)
    return b"*%d\r\n" % elements + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)


def _lrange(port: int, expected: bytes) -> tuple[float, bool]:
    command = _resp(b"LRANGE", b"big", b"0", b"-1")
    hasher, size = hashlib.sha256(), 0
    with connect(port, timeout=60) as sock:
        began = time.perf_counter()
        sock.sendall(command)
        buffer = bytearray(1 << 20)
        while size < len(expected):
            count = sock.recv_into(buffer)
            if not count:
                break
            hasher.update(memoryview(buffer)[:count])
            size += count
        elapsed = time.perf_counter() - began
    return elapsed, size == len(expected) and \
        hasher.digest() == hashlib.sha256(expected).digest()


def redis_large(bench: Bench, elements: int, depth: int, runs: int = 3) -> Row:
    row = Row(10, f"LRANGE of {elements:,} elements through a redis route vs a tcp route "
                  f"(median of {runs}; meanwhile the slowest PING of another connection, "
                  "through a tcp route of the same gproxyd to another redis-server); a reply "
                  f"nested {depth:,} deep through a redis route",
              "LRANGE 2.04 s (redis) vs 0.063 s (tcp), up to +115 ms to other connections; "
              "5M deep: 10.7 s CPU, +76 MiB")
    redis_port, other_redis = bench.redis(), bench.redis("redis-other")
    expected = _load_list(redis_port, elements)
    deep = DeepReply(depth)
    ports = {"direct": redis_port, "tcp": free_port(), "redis": free_port()}
    deep_port, admin, other = free_port(), free_port(), free_port()
    config = (global_section(f"127.0.0.1:{admin}")
              + route("other", other, f"127.0.0.1:{other_redis}")
              + route("tcp", ports["tcp"], f"127.0.0.1:{redis_port}")
              + route("redis", ports["redis"], f"127.0.0.1:{redis_port}", protocol="redis")
              + route("deep", deep_port, deep.address, protocol="redis"))
    daemon = bench.daemon("redis-large", config)
    parts, ok = [], True
    try:
        timings = {}
        for name, port in ports.items():
            # direct: straight to the other redis, the machine's own noise
            pinger = subprocess.Popen([sys.executable, "-c", PINGER,
                                       str(other_redis if name == "direct" else other), "60"],
                                      stdout=subprocess.PIPE, text=True)
            gevent.sleep(0.3)
            results = [_lrange(port, expected) for _ in range(runs)]
            pinger.terminate()
            out, _ = pinger.communicate(timeout=10)
            ping = json.loads(out) if out.strip() else {}
            times = sorted(seconds for seconds, _ in results)
            exact = all(good for _, good in results)
            ok &= exact
            timings[name] = times[len(times) // 2]
            parts.append(f"{name} {timings[name]:.3f} s ({'exact' if exact else 'NOT exact'}"
                         + (f", slowest other PING {ping['max_ms']:.1f} ms"
                            if ping else ", no PING numbers") + ")")
        cpu_before, rss_before = cpu_seconds(daemon.pid), rss_mib(daemon.pid)
        peak = PeakRss(daemon.pid, 0.05)
        began = time.perf_counter()
        with connect(deep_port, timeout=120) as sock:
            sock.sendall(_resp(b"PING"))
            hasher, size = hashlib.sha256(), 0
            while size < len(deep.reply):
                data = sock.recv(1 << 20)
                if not data:
                    break
                hasher.update(data)
                size += len(data)
        elapsed = time.perf_counter() - began
        gevent.sleep(0.3)
        peak.stop()
        cpu = cpu_seconds(daemon.pid) - cpu_before
        deep_exact = hasher.digest() == hashlib.sha256(deep.reply).digest()
        ok &= deep_exact and alive(daemon)
        fallbacks = stats(admin)["routes"]["deep"].get("parser_fallbacks")
        parts.append(f"{depth:,} deep ({len(deep.reply) / MIB:.0f} MiB): "
                     f"{'exact' if deep_exact else 'NOT exact'}, {elapsed:.2f} s, gproxyd "
                     f"CPU {cpu:.2f} s, RSS {rss_before:.0f} -> peak {peak.peak:.0f} MiB "
                     f"(+{peak.peak - rss_before:.0f}), parser fallbacks {fallbacks}")
    finally:
        bench.stop(daemon)
        deep.stop()
    row.now = "LRANGE: " + ", ".join(parts[:3]) + f" (redis/tcp x" \
        f"{timings['redis'] / timings['tcp']:.1f}); " + parts[3]
    row.verdict = "ok" if ok else "DEFECT"
    return row


# -- 11 ---------------------------------------------------------------------------------

def slow_headers(bench: Bench, clients: int, header_bytes: int = 64000) -> Row:
    row = Row(11, f"{clients:,} slow clients each sending {header_bytes // 1000} KB of an "
                  "unfinished HTTP header (4 pieces, 50 ms apart) through a protocol = http "
                  "route with one shadow (both backends read and never answer): gproxyd RSS",
              "55 -> 284 MiB, ~270 MiB after they closed")
    production, shadow = Sink(), Sink()
    port, admin = free_port(), free_port()
    daemon = bench.daemon("slow-headers", global_section(f"127.0.0.1:{admin}")
                          + route("web", port, production.address, protocol="http",
                                  shadow=shadow.address))
    head = b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * (header_bytes - 36)
    pieces = [head[at:at + len(head) // 4 + 1] for at in range(0, len(head), len(head) // 4 + 1)]
    held: list[socket.socket] = []
    try:
        gevent.sleep(0.5)
        idle, fds_idle = rss_mib(daemon.pid), tree_fds(daemon.pid)

        def slow_client() -> None:
            sock = connect(port, timeout=30)
            held.append(sock)
            for piece in pieces:
                sock.sendall(piece)
                gevent.sleep(0.05)
        pool = Pool(500)
        for _ in range(clients):
            pool.spawn(slow_client)
        pool.join(timeout=120)
        expected = clients * len(head)
        wait_until(lambda: production.bytes >= expected and shadow.bytes >= expected,
                   timeout=60, what="every header at both backends")
        gevent.sleep(0.5)
        during = rss_mib(daemon.pid)
        fallbacks = stats(admin)["routes"]["web"].get("parser_fallbacks")
        for sock in held:
            sock.close()
        held.clear()
        fds_left = settle_fds(daemon.pid, fds_idle + 4, timeout=30)
        gevent.sleep(0.5)
        after = rss_mib(daemon.pid)
        served = alive(daemon)
    finally:
        for sock in held:
            sock.close()
        bench.stop(daemon)
        production.stop()
        shadow.stop()
    row.now = (f"RSS {idle:.0f} -> {during:.0f} MiB with {clients:,} held "
               f"(+{(during - idle) * 1024 / clients:.1f} KiB a connection), {after:.0f} MiB "
               f"after they closed ({fds_left} fds left); parser fallbacks {fallbacks}; "
               f"daemon {'alive' if served else 'GONE'}")
    row.verdict = "ok" if served else "DEFECT"
    return row


# -- 12 ---------------------------------------------------------------------------------

def _outcome_of_reading(sock: socket.socket) -> tuple[str, int]:
    size = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "EOF", size
            size += len(data)
    except ConnectionResetError:
        return "reset", size
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno)), size


def resets(bench: Bench, runs: int = 5, size: int = 10 * MIB) -> Row:
    row = Row(12, f"RST both ways through a tcp route ({runs} runs each): production sends "
                  f"{size // MIB} MiB then resets; the client sends 1 KB then resets",
              "production RST reached the client as a clean EOF (after 9,982,149 bytes); "
              "client RST reached production as EOF")
    seen: list[str] = []

    def production_resets(sock: socket.socket) -> None:
        sock.sendall(b"x" * size)
        gevent.sleep(0.2)
        reset(sock)

    def production_reads(sock: socket.socket) -> None:
        seen.append(_outcome_of_reading(sock)[0])

    resetting, reading = PeerBackend(production_resets), PeerBackend(production_reads)
    ports = {"resetting": free_port(), "reading": free_port()}
    daemon = bench.daemon("resets", global_section()
                          + route("resetting", ports["resetting"], resetting.address)
                          + route("reading", ports["reading"], reading.address))
    results: dict[str, dict[str, list[str]]] = {}
    try:
        for via, target in (("direct", {"resetting": resetting.port, "reading": reading.port}),
                            ("gproxyd", ports)):
            client_saw = []
            for _ in range(runs):
                with connect(target["resetting"], timeout=30) as sock:
                    client_saw.append(_outcome_of_reading(sock)[0])
            seen.clear()
            for _ in range(runs):
                sock = connect(target["reading"])
                sock.sendall(b"y" * 1000)
                gevent.sleep(0.2)
                reset(sock)
            wait_until(lambda: len(seen) >= runs, timeout=15, what="production's outcomes")
            results[via] = {"client": client_saw, "production": list(seen)}
        served = alive(daemon)
    finally:
        bench.stop(daemon)
        resetting.stop()
        reading.stop()

    def summary(outcomes: list[str]) -> str:
        return ", ".join(f"{outcomes.count(kind)}/{len(outcomes)} {kind}"
                         for kind in sorted(set(outcomes)))
    row.now = (f"production RST -> client saw {summary(results['gproxyd']['client'])} "
               f"(direct: {summary(results['direct']['client'])}); client RST -> production "
               f"saw {summary(results['gproxyd']['production'])} (direct: "
               f"{summary(results['direct']['production'])})")
    good = (set(results["gproxyd"]["client"]) == {"reset"}
            and set(results["gproxyd"]["production"]) == {"reset"} and served)
    row.verdict = "ok" if good else "DEFECT"
    return row

