"""record.py: sampled whole requests of an http route in the record file.

A real Listener (the proxy fixture) in front of a pywsgi server or a raw backend, raw
client sockets; the file is read back with recordfile.RecordReader. Write failures are
real ones (a record path turned into a link to /dev/full), a slow writer is a FIFO
nobody reads, and two recorders of one file are two routes naming it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time

import gevent
import pytest
from backends import wait_until
from gevent import os as gevent_os
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gproxyd import record
from gproxyd.config import make_route
from gproxyd.observe import Exchanges
from gproxyd.protocols.http import ResponseFramer
from gproxyd.record import Recorder, Recording, unmasked_secret
from gproxyd.recordfile import HEADER, PLACEHOLDER, RecordReader, encode, mask_secrets
from gproxyd.stats import BackendStats, RecordStats, RouteStats

# --- helpers ---------------------------------------------------------------------------


def get(path: str, *fields: bytes) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example\r\n" + \
        b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def post(path: str, body: bytes) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: example\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunked(path: str, *pieces: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: example\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-Trailer: yes\r\n\r\n")


def read_answers(sock: socket.socket, count: int, methods: list[str] | None = None) -> list:
    """Read until `count` whole responses have come (their (status, error) pairs)."""
    framer = ResponseFramer()
    for method in methods or ["GET"] * count:
        framer.expect(method)
    done: list = []
    while len(done) < count:
        data = sock.recv(65536)
        assert data, f"the connection closed after {len(done)} of {count} answers"
        done += framer.feed(data) or []
    return done


def records(path) -> list:
    reader = RecordReader(str(path))
    found = list(reader)
    assert reader.torn == 0
    return found


def start(proxy, server, path, **options):
    return proxy(server.address, protocol="http", record=str(path), **options)


@pytest.fixture
def web(json_servers):
    """A keep-alive HTTP server (pywsgi) answering /items/N."""
    return json_servers()


# --- what a record holds -----------------------------------------------------------------

def test_each_request_is_recorded_whole_as_sent_in_order(proxy, web, tmp_path):
    """Pipelined requests are separate records; bodies framed by Content-Length and by
    chunked coding are whole; a request sent a byte at a time is one record; blank lines
    before a request are no part of it; the times are when each request was sent."""
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path)
    pipelined = [get("/items/1", b"Accept: */*"), post("/items/2", b"x" * 3000),
                 chunked("/items/3", b"hello", b"w" * 70000), get("/items/4")]
    trickled = post("/items/5", b"byte by byte")
    after_blank = get("/items/6")
    before = time.time()
    with proxied.connect() as sock:
        sock.sendall(b"".join(pipelined))
        assert read_answers(sock, 4) == [(200, False)] * 4
        for index in range(len(trickled)):
            sock.sendall(trickled[index:index + 1])
            gevent.sleep(0.001)
        assert read_answers(sock, 1) == [(200, False)]
        between = time.time()
        gevent.sleep(0.05)
        sock.sendall(b"\r\n\r\n" + after_blank)
        read_answers(sock, 1)  # pywsgi answers 400: it skips no blank lines (RFC 9112 2.2)
    with proxied.connect() as sock:
        sock.sendall(get("/items/7"))
        assert read_answers(sock, 1) == [(200, False)]
    after = time.time()
    proxied.stop()  # the recorder writes what it holds before the listener is done
    found = records(path)
    assert [found.data for found in found] == [*pipelined, trickled, after_blank,
                                               get("/items/7")]
    times = [found.time for found in found]
    assert before <= times[0] <= times[4] < between < times[5] <= times[6] <= after
    assert times[0] == times[1]  # sent in one chunk (loopback's first segment): one time
    assert times == sorted(times)
    assert proxied.stats.snapshot()["record"] == {
        "file": str(path), "recorded": 7, "dropped": 0, "skipped": 0, "errors": 0,
        "bytes": sum(len(encode(0, each.data)) for each in found)}
    assert os.stat(path).st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_route_without_record_has_no_record_numbers(proxy, web):
    proxied = proxy(web.address, protocol="http")
    assert proxied.listener.recorder is None
    assert proxied.stats.snapshot()["record"] is None


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 10 ** 6), max_size=12), blank=st.booleans())
def test_records_do_not_depend_on_how_the_stream_was_cut(tmp_path_factory, cuts, blank):
    """The observer fed the same requests in any chunks: the same records (production's
    observer with its framer, a Recording and a Recorder writing the file)."""
    path = tmp_path_factory.mktemp("cuts") / "web.rec"
    requests = [get("/a"), post("/b", b"0123456789" * 7), chunked("/c", b"ab", b"cdef"),
                get("/d", b"Cookie: a=b")]
    stream = (b"\r\n" if blank else b"").join(requests)
    route = make_route("cuts", listen="127.0.0.1:0", production="127.0.0.1:1",
                       protocol="http", record=str(path))
    recorder = Recorder(route, RecordStats())
    recorder.start()
    observer = Exchanges("http", BackendStats(), RouteStats(), "test")
    observer.record_in(Recording(lambda: recorder))
    edges = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for begin, end in zip(edges, edges[1:], strict=False):
        observer.sent(memoryview(bytearray(stream[begin:end])))
    recorder.stop()
    masked = requests[:3] + [get("/d", b"Cookie: " + PLACEHOLDER)]
    assert [found.data for found in records(path)] == masked


# --- sampling ----------------------------------------------------------------------------

def test_the_sample_is_a_share_of_requests_not_of_connections(proxy, web, tmp_path):
    """record-sample = 10% over 2,000 requests on 4 connections: a binomial count (5
    standard deviations either way: a false alarm once in ~2 million runs); recorded
    requests are whole ones sent, in each connection's order, none twice. Sampling
    whole connections would record 0, 500, 1000, ... of them."""
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path, record_sample="10%")
    total, connections, burst = 2000, 4, 50
    sent = {}

    def client(number: int) -> None:
        with proxied.connect() as sock:
            for first in range(0, total // connections, burst):
                batch = [get(f"/items/{number * 10000 + first + index}")
                         for index in range(burst)]
                sock.sendall(b"".join(batch))
                read_answers(sock, burst)
                for index, request in enumerate(batch):
                    sent[request] = (number, first + index)
    gevent.joinall([gevent.spawn(client, number) for number in range(connections)],
                   raise_error=True)
    proxied.stop()
    found = [each.data for each in records(path)]
    mean = total * 0.1
    spread = 5 * math.sqrt(total * 0.1 * 0.9)
    assert mean - spread <= len(found) <= mean + spread, len(found)
    assert all(request in sent for request in found)
    assert len(set(found)) == len(found)
    for number in range(connections):
        order = [sent[request][1] for request in found if sent[request][0] == number]
        assert order == sorted(order)
    assert proxied.stats.record.recorded == len(found)


def test_record_sample_zero_records_nothing(proxy, web, tmp_path):
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path, record_sample="0%")
    with proxied.connect() as sock:
        sock.sendall(get("/items/1") * 20)
        read_answers(sock, 20)
    proxied.stop()
    assert records(path) == []
    assert path.read_bytes() == HEADER


# --- secrets -----------------------------------------------------------------------------

SECRET = get("/items/9", b"Authorization: Bearer s3cr3t", b"cookie:  session=s3cr3t",
             b"Proxy-Authorization: Basic czNjcjN0", b"X-Kept: visible")


@pytest.mark.parametrize("secrets, expected", [
    ("mask", get("/items/9", b"Authorization: " + PLACEHOLDER, b"cookie: " + PLACEHOLDER,
                 b"Proxy-Authorization: " + PLACEHOLDER, b"X-Kept: visible")),
    ("keep", SECRET),
])
def test_secret_headers_are_masked_unless_kept(proxy, web, tmp_path, secrets, expected):
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path, record_secrets=secrets)
    with proxied.connect() as sock:
        sock.sendall(SECRET)
        read_answers(sock, 1)
    proxied.stop()
    assert [each.data for each in records(path)] == [expected]


MASKED = [  # (as sent, as recorded)
    # bare LF line ends
    (b"GET /a HTTP/1.1\nHost: example\nCookie: s3cr3t\n\nCookie: body",
     b"GET /a HTTP/1.1\nHost: example\nCookie: " + PLACEHOLDER + b"\n\nCookie: body"),
    # a secret folded onto a continuation line (obs-fold): the continuation goes too
    (b"GET /b HTTP/1.1\r\nHost: example\r\nAuthorization: Bearer\r\n s3cr3t\r\n\r\n",
     b"GET /b HTTP/1.1\r\nHost: example\r\nAuthorization: " + PLACEHOLDER + b"\r\n\r\n"),
    (b"GET /c HTTP/1.1\r\nCookie: a\r\n\tb\r\nHost: x\r\n\r\n",
     b"GET /c HTTP/1.1\r\nCookie: " + PLACEHOLDER + b"\r\nHost: x\r\n\r\n"),
]


@pytest.mark.parametrize("sent, recorded", MASKED)
def test_secrets_are_masked_whatever_the_line_ends_and_folding(sent, recorded):
    assert mask_secrets(sent) == recorded
    assert not unmasked_secret(recorded)


@pytest.mark.parametrize("request_bytes, leaks", [
    (get("/a", b"Cookie: " + PLACEHOLDER), False),
    (get("/a", b"Accept: */*"), False),
    (b"GET /a HTTP/1.1\nHost: example\n\n", False),
    (b"GET /a HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n", False),
    (get("/a", b"Cookie: s3cr3t"), True),
    (b"GET /a HTTP/1.1\r\nCookie: " + PLACEHOLDER + b"\r\n more\r\n\r\n", True),
    (post("/a", b"Cookie: in the body is no header\r\n\r\n"), False),
    *[(sent, True) for sent, _ in MASKED],
])
def test_unmasked_secret_finds_what_masking_missed(request_bytes, leaks):
    assert unmasked_secret(request_bytes) is leaks


def test_requests_with_odd_line_ends_are_recorded_masked(proxy, servers, tmp_path):
    path = tmp_path / "web.rec"
    sink = servers.sink()
    proxied = proxy(sink.address, protocol="http", record=str(path))
    with proxied.connect() as sock:
        sock.sendall(b"".join(sent for sent, _ in MASKED[1:]) + get("/d", b"Cookie: s3cr3t"))
        wait_until(lambda: proxied.stats.record.recorded == 3, what="three requests written")
    proxied.stop()
    assert [each.data for each in records(path)] == [
        *(recorded for _, recorded in MASKED[1:]), get("/d", b"Cookie: " + PLACEHOLDER)]
    assert proxied.stats.record.skipped == 0
    assert b"s3cr3t" not in path.read_bytes()


# --- what is not recorded ------------------------------------------------------------------

def test_a_request_larger_than_the_largest_record_is_skipped(proxy, web, tmp_path):
    """record-max-size bounds one record too: a 10 KiB request on a 4 KiB file is skipped
    (counted) and the requests around it are recorded."""
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path, record_max_size="4KiB", record_keep="9")
    requests = [get("/items/1"), post("/items/2", b"b" * 10240), get("/items/3")]
    with proxied.connect() as sock:
        sock.sendall(b"".join(requests))
        read_answers(sock, 3)
    proxied.stop()
    assert [each.data for each in records(path)] == [requests[0], requests[2]]
    assert (proxied.stats.record.skipped, proxied.stats.record.recorded) == (1, 2)


def test_a_connection_the_framer_gave_up_on_records_no_more(proxy, servers, tmp_path):
    path = tmp_path / "web.rec"
    sink = servers.sink()
    proxied = proxy(sink.address, protocol="http", record=str(path))
    with proxied.connect() as sock:
        sock.sendall(get("/before") + get("/same-chunk") + b"NOT HTTP AT ALL\r\n")
        gevent.sleep(0.05)
        sock.sendall(get("/after"))
        wait_until(lambda: sink.conns and sink.conns[0].received >= 100, what="all sent")
    with proxied.connect() as sock:
        sock.sendall(get("/other-connection"))
        wait_until(lambda: proxied.stats.record.recorded == 3, what="3 recorded")
    proxied.stop()
    assert [each.data for each in records(path)] == [get("/before"), get("/same-chunk"),
                                                     get("/other-connection")]
    assert proxied.stats.parser_fallbacks == 1


def upgrading(conn) -> None:
    """Answers the first request with 101 Switching Protocols, then echoes."""
    sock = conn.sock
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            return
        head += data
    sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                 b"Connection: Upgrade\r\n\r\n")
    while True:
        data = sock.recv(4096)
        if not data:
            return
        sock.sendall(data)


def test_an_upgraded_connection_records_no_more(proxy, serve, tmp_path):
    path = tmp_path / "web.rec"
    backend = serve(upgrading)
    proxied = proxy(backend.address, protocol="http", record=str(path))
    upgrade = get("/socket", b"Upgrade: echo", b"Connection: Upgrade")
    with proxied.connect() as sock:
        sock.sendall(upgrade)
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        tunnelled = get("/inside-the-tunnel")
        sock.sendall(tunnelled)
        echoed = b""
        while len(echoed) < len(tunnelled):
            echoed += sock.recv(4096)
        assert echoed == tunnelled
    proxied.stop()
    assert [each.data for each in records(path)] == [upgrade]


# --- the memory bound ---------------------------------------------------------------------

def test_a_writer_that_cannot_keep_up_drops_requests_not_the_relay(proxy, web, tmp_path,
                                                                   monkeypatch):
    """The record file is a FIFO nobody reads for a while: the writer thread blocks in
    write(), the queue fills to its bound (lowered to 256 KiB), further requests are
    dropped and counted, and every request is answered all the same. Once the FIFO is
    read, what was queued arrives whole."""
    monkeypatch.setattr(record, "MAX_HELD", 256 * 1024)
    path = tmp_path / "web.rec"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # open, never read (yet)
    proxied = start(proxy, web, path)
    total = 200
    body = b"p" * 8192
    with proxied.connect() as sock:
        for first in range(0, total, 10):
            sock.sendall(b"".join(post(f"/items/{first + index}", body) for index in range(10)))
            assert read_answers(sock, 10) == [(200, False)] * 10
    numbers = proxied.stats.record
    assert numbers.dropped > 0
    # 64 KiB in the pipe, 256 KiB held: far fewer than all of them
    assert numbers.recorded < total // 2
    received = bytearray()

    def drain_fifo() -> None:
        while True:
            gevent_os.make_nonblocking(reader)
            try:
                data = gevent_os.nb_read(reader, 65536)
            except OSError:
                return
            if not data:
                return
            received.extend(data)
    draining = gevent.spawn(drain_fifo)
    proxied.stop()  # the writer appends what is queued, now that the FIFO is read
    gevent.wait([draining], timeout=10)
    os.close(reader)
    stored = tmp_path / "copy.rec"
    stored.write_bytes(bytes(received))
    found = records(stored)
    assert numbers.recorded + numbers.dropped == total
    assert len(found) == numbers.recorded
    assert all(each.data == post(each.data.split(b" ")[1].decode(), body) for each in found)


# --- rotation and several writers -------------------------------------------------------------

def test_rotation_keeps_record_keep_files(proxy, web, tmp_path):
    """A 2 KiB record-max-size and record-keep = 3: PATH, PATH.1 to PATH.3, no PATH.4;
    each file a readable record file, each rotated one just past the size, and together
    the newest requests, in order."""
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path, record_max_size="2KiB", record_keep="3")
    sent = [get(f"/items/{number}", b"X-Padding: " + b"p" * 100) for number in range(100)]
    with proxied.connect() as sock:
        for request in sent:
            sock.sendall(request)
            read_answers(sock, 1)
    proxied.stop()
    names = [path.with_name(f"web.rec.{number}") for number in (3, 2, 1)] + [path]
    assert all(name.exists() for name in names)
    assert not path.with_name("web.rec.4").exists()
    kept = []
    for name in names:
        found = records(name)
        kept += [each.data for each in found]
        if name != path:
            assert 2048 <= name.stat().st_size < 2048 + len(encode(0, sent[0]))
    assert kept == sent[-len(kept):]
    assert len(kept) > 3 * (2048 // len(encode(0, sent[0])))


def test_two_recorders_of_one_file_take_turns(proxy, web, tmp_path):
    """Two routes record to one file with a small record-max-size: they lock each other
    out while appending and rotating, so every request of both is in exactly one of the
    files, every file is whole, and each file is rotated once."""
    path = tmp_path / "shared.rec"
    options = {"record_max_size": "4KiB", "record_keep": "1000"}
    first, second = start(proxy, web, path, **options), start(proxy, web, path, **options)
    sent = []

    def client(proxied, tag: str) -> None:
        with proxied.connect() as sock:
            for burst in range(20):
                batch = [get(f"/items/{tag}{burst:03d}{index:02d}") for index in range(10)]
                sock.sendall(b"".join(batch))
                read_answers(sock, 10)
                sent.extend(batch)
    gevent.joinall([gevent.spawn(client, proxied, tag)
                    for proxied, tag in ((first, "1"), (second, "2"), (first, "3"),
                                         (second, "4"))], raise_error=True)
    first.stop()
    second.stop()
    files = sorted(tmp_path.glob("shared.rec*"))
    rotated = [name for name in files if name.suffix[1:].isdigit()]
    found = [each.data for name in files if name.suffix != ".lock"
             for each in records(name)]
    assert sorted(found) == sorted(sent)
    assert len(rotated) >= 10
    # Rotated once each time it filled: no file much smaller than the size (a double
    # rotation would leave one nearly empty).
    assert all(name.stat().st_size >= 4096 for name in rotated)


# --- reloads, failures ---------------------------------------------------------------------

def test_a_reload_keeps_moves_and_ends_the_recording(proxy, web, tmp_path):
    """Same file: the recorder stays (its file, counters) and takes the new sample; another
    file: requests beginning after the reload go there, also on a connection accepted
    before, and the old file holds what came before; no record: nothing is recorded, the
    numbers are off."""
    first, moved = tmp_path / "first.rec", tmp_path / "moved.rec"
    proxied = start(proxy, web, first)
    listener = proxied.listener
    recorder = listener.recorder
    with proxied.connect() as sock:
        def exchange(path: str) -> None:
            sock.sendall(get(path))
            read_answers(sock, 1)
        exchange("/items/1")
        listener.update(dataclasses.replace(listener.route, record_sample=0.0))
        assert listener.recorder is recorder
        exchange("/items/2")
        listener.update(dataclasses.replace(listener.route, record_sample=1.0,
                                            record=str(moved)))
        assert listener.recorder is not recorder
        exchange("/items/3")
        wait_until(lambda: proxied.stats.record.recorded == 2, what="2 recorded")
        assert proxied.stats.record.file == str(moved)
        listener.update(dataclasses.replace(listener.route, record=""))
        assert proxied.stats.snapshot()["record"] is None
        exchange("/items/4")
    proxied.stop()
    assert [each.data for each in records(first)] == [get("/items/1")]
    assert [each.data for each in records(moved)] == [get("/items/3")]


def test_a_reload_to_a_file_that_cannot_be_opened_records_on_to_the_old_one(
        proxy, web, tmp_path, caplog):
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path)
    listener = proxied.listener
    missing = tmp_path / "no-such-directory" / "web.rec"
    listener.update(dataclasses.replace(listener.route, record=str(missing),
                                        record_sample=1.0))
    assert f"route test: record: cannot open {missing}: {missing.parent} is not a " \
           f"directory (expected an existing directory gproxyd's user may write to); " \
           f"recording on to {path}" in caplog.text
    with proxied.connect() as sock:
        sock.sendall(get("/items/1"))
        read_answers(sock, 1)
    proxied.stop()
    assert [each.data for each in records(path)] == [get("/items/1")]


def test_write_failures_are_counted_logged_and_recovered_from(proxy, web, tmp_path, caplog):
    """The record path turns into a link to /dev/full (writes fail with ENOSPC): the
    request is lost, counted in errors and logged; the relay answers; once the path is
    free again, a new file is begun and recording goes on."""
    path = tmp_path / "web.rec"
    proxied = start(proxy, web, path)
    numbers = proxied.stats.record
    with proxied.connect() as sock:
        def exchange(path: str) -> None:
            sock.sendall(get(path))
            assert read_answers(sock, 1) == [(200, False)]
        exchange("/items/1")
        wait_until(lambda: numbers.recorded == 1, what="1 recorded")
        path.rename(tmp_path / "first.rec")
        path.symlink_to("/dev/full")
        exchange("/items/2")
        wait_until(lambda: numbers.errors == 1, what="1 error")
        wait_until(lambda: "No space left on device" in caplog.text, what="the error logged")
        assert f"route test: record: cannot write {path}: No space left on device; sampled " \
               "requests are lost until it works again (1 so far)" in caplog.text
        path.unlink()
        exchange("/items/3")
        wait_until(lambda: numbers.recorded == 2, timeout=5, what="recording again")
        wait_until(lambda: f"route test: record: writing {path} again" in caplog.text,
                   what="the recovery logged")
    proxied.stop()
    assert [each.data for each in records(tmp_path / "first.rec")] == [get("/items/1")]
    assert [each.data for each in records(path)] == [get("/items/3")]
    assert caplog.text.count("cannot write") == 1


def test_a_record_path_that_cannot_be_opened_stops_the_start(web, tmp_path):
    from gproxyd.listener import Listener
    from gproxyd.record import RecordError

    taken = tmp_path / "taken.rec"
    taken.write_bytes(b"not a record file")
    route = make_route("web", listen="127.0.0.1:0", production=web.address,
                       protocol="http", record=str(taken))
    listener = Listener(route)
    with pytest.raises(RecordError, match=f"{taken} exists and is not a version 1 record"):
        listener.start()
    listener.close()
    assert taken.read_bytes() == b"not a record file"


# --- numbers across workers ------------------------------------------------------------------

def test_record_numbers_merge_across_workers():
    workers = []
    for number in range(3):
        stats = RouteStats()
        stats.record = RecordStats(file="/var/lib/gproxyd/web.rec", recorded=number + 1,
                                   dropped=2, skipped=number, bytes=100 * number, errors=1)
        workers.append(stats)
    merged = RouteStats()
    for stats in workers:
        merged.add(json.loads(json.dumps(stats.export())))
    assert merged.snapshot()["record"] == {
        "file": "/var/lib/gproxyd/web.rec", "recorded": 6, "dropped": 6, "skipped": 3,
        "bytes": 300, "errors": 3}
    off = RouteStats()
    off.add(json.loads(json.dumps(RouteStats().export())))
    assert off.snapshot()["record"] is None

