"""shadow.py: every shadow gets the client's exact stream, and no shadow can hurt production.

A shadow may stall, refuse, reset, never answer the connect, or die mid-stream: production
must still get every byte and the client every answer, with no hang; the shadow's counters
say what happened. Memory stays bounded with a stalled shadow (measured on a real gproxyd
process), sampling is repeatable with a seed, and shadows get the EOF and their linger.
"""
import hashlib
import os
import signal
import socket
import subprocess
import sys

import gevent
import pytest
from backends import (
    hash_to_eof,
    peer_closed,
    recv_exactly,
    recv_to_eof,
    sha256,
    unused_port,
    wait_for_lines,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gproxyd.config import make_route
from gproxyd.observe import Exchanges
from gproxyd.report import verdict
from gproxyd.settings import address
from gproxyd.shadow import ShadowSink, _Queue
from gproxyd.stats import RouteStats
from gproxyd.upstream import Upstream

MiB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def send_then_half_close(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def send_in_step(sock: socket.socket, data: bytes, shadow, piece: int = 256 * 1024) -> None:
    """Send `data` a piece at a time, each once `shadow` has everything before it; then
    the EOF. A moderate pace without sleeps: the shadow queue never has to hold more
    than a piece for a healthy shadow."""
    for start in range(0, len(data), piece):
        sock.sendall(data[start:start + piece])
        sent = min(start + piece, len(data))
        wait_until(lambda sent=sent: shadow.conns and shadow.conns[0].received >= sent,
                   timeout=10, interval=0.001, what="the healthy shadow keeping pace")
    sock.shutdown(socket.SHUT_WR)


def exchange(proxied, data: bytes) -> tuple[str, int]:
    """Send `data` and the EOF while reading the answer to EOF; (sha256, length) of it."""
    client = proxied.connect()
    try:
        sender = gevent.spawn(send_then_half_close, client, data)
        answer = hash_to_eof(client)
        sender.get()
    finally:
        client.close()
    return answer


@pytest.mark.parametrize("write_delay", ["5ms", "0"])
def test_production_and_every_shadow_get_the_exact_stream_and_its_eof(
        servers, proxy, caplog, write_delay):
    production = servers.sink(reply_at_eof=b"done")
    first, second = servers.sink(), servers.sink()
    proxied = proxy(production, shadow=[first, second], shadow_buffer="64MiB",
                    shadow_write_delay=write_delay)
    data = os.urandom(16 * MiB)

    assert exchange(proxied, data) == (sha256(b"done"), 4)
    for backend in (production, first, second):
        conn, = backend.conns
        assert conn.eof.wait(5), f"no EOF reached {backend.address}"
        assert (conn.received, conn.sha256) == (len(data), sha256(data))
    line, = wait_for_lines(caplog)
    assert line["shadows"] == {first.address: "done", second.address: "done"}
    for backend in (first, second):
        counters = proxied.shadow_stats(backend)
        assert (counters.mirrored, counters.bytes_sent) == (1, len(data))
        assert (counters.connect_failures, counters.dropped, counters.resets) == (0, 0, 0)


def test_shadow_answers_are_counted_and_never_reach_the_client(servers, proxy, caplog):
    production = servers.echo()
    shadow = servers.sink(reply_each=b"SHADOW", reply_at_eof=b"SHADOW-EOF")
    proxied = proxy(production, shadow=[shadow])
    data = os.urandom(2 * MiB)

    assert exchange(proxied, data) == (sha256(data), len(data))
    wait_for_lines(caplog)
    conn, = shadow.conns
    assert conn.sent > 0
    assert proxied.shadow_stats(shadow).bytes_received == conn.sent


# --- isolation ----------------------------------------------------------------------------

def _stalled(servers):
    return servers.stall(), {"shadow_buffer": "1MiB"}


def _refusing(servers):
    return f"127.0.0.1:{unused_port()}", {}


def _resetting(servers):
    return servers.closer(reset=True), {}


def _black_holed(servers):
    # The connect is neither accepted nor refused; the whole stream waits in the
    # shadow's queue meanwhile, so the buffer is large enough not to overflow first.
    return servers.black_hole(), {"shadow_connect_timeout": "300ms",
                                  "shadow_buffer": "64MiB"}


DIES_AFTER = 64 * 1024


def _dies_mid_stream(servers):
    return servers.dies_after(DIES_AFTER), {}


# kind of failing shadow -> (how to make it, its states in the log line, {counter: count})
ISOLATION = {
    "stalled": (_stalled, {"dropped"}, {"dropped": 1}),
    "refusing": (_refusing, {"failed"}, {"connect_failures": 1}),
    # A shadow that resets while the client goes on sending production more is
    # "diverged" (its numbers cannot be compared); the reset is still counted as one.
    "resetting": (_resetting, {"failed", "diverged"}, {"connect_failures+resets": 1}),
    "black-holed": (_black_holed, {"failed"}, {"connect_failures": 1}),
    # It never answers, so turns wait for it (shadow-turn-timeout): it either falls
    # behind by shadow-buffer first, or resets while production goes on.
    "dies-mid-stream": (_dies_mid_stream, {"diverged", "dropped"}, {"dropped+resets": 1}),
}


@pytest.mark.parametrize("kind", list(ISOLATION))
def test_a_failing_shadow_never_disturbs_production(servers, proxy, caplog, kind):
    make, states, expected = ISOLATION[kind]
    bad, options = make(servers)
    good = servers.echo()  # answers as production does: comparable, so "done"
    production = servers.echo()
    proxied = proxy(production, shadow=[bad, good], shadow_linger="1s", **options)
    data = os.urandom(16 * MiB)

    client = proxied.connect()
    with gevent.Timeout(20, AssertionError(f"the client hung behind a {kind} shadow")):
        sender = gevent.spawn(send_in_step, client, data, good)
        assert hash_to_eof(client) == (sha256(data), len(data))
        sender.get()
    client.close()
    assert production.conns[0].sha256 == sha256(data)

    line, = wait_for_lines(caplog, timeout=10)
    bad_text = bad if isinstance(bad, str) else bad.address
    assert line["shadows"][bad_text] in states
    assert line["shadows"][good.address] == "done"
    assert line["close"] == "eof"
    counters = proxied.stats.shadows[bad_text]
    got = {"dropped": counters.dropped, "connect_failures": counters.connect_failures,
           "resets": counters.resets,
           "connect_failures+resets": counters.connect_failures + counters.resets,
           "dropped+resets": counters.dropped + counters.resets}
    assert {name: got[name] for name in expected} == expected
    assert counters.dropped + counters.connect_failures + counters.resets == 1
    # the healthy shadow next to the failing one is not dragged down with it
    assert good.conns[0].sha256 == sha256(data)
    good_counters = proxied.shadow_stats(good)
    assert (good_counters.bytes_sent, good_counters.dropped, good_counters.resets,
            good_counters.connect_failures) == (len(data), 0, 0, 0)
    if kind == "dies-mid-stream":
        assert bad.conns[0].sha256 == sha256(data[:DIES_AFTER])

    # and production answers a fresh connection at once, the bad shadow still there
    with gevent.Timeout(2, AssertionError(f"production slow behind a {kind} shadow")):
        assert exchange(proxied, b"ping") == (sha256(b"ping"), 4)


def test_a_healthy_shadow_keeps_up_with_a_client_sending_at_full_speed(
        servers, proxy, caplog):
    """A shadow that reads as fast as production is not dropped at a shadow-buffer of
    4MiB (the default before #19) just because the client sends fast: the relay must let
    the shadow's writer run between chunks, not read the client dry first."""
    production, shadow = servers.sink(), servers.sink()
    proxied = proxy(production, shadow=[shadow], shadow_buffer="4MiB")
    data = os.urandom(32 * MiB)

    assert exchange(proxied, data) == (sha256(b""), 0)
    line, = wait_for_lines(caplog)
    assert line["shadows"] == {shadow.address: "done"}
    assert proxied.shadow_stats(shadow).dropped == 0
    assert shadow.conns[0].sha256 == sha256(data)


def test_a_busy_event_loop_does_not_keep_the_shadows_waiting(servers, proxy, caplog):
    """Without a write delay, a chunk that arrives while other events wait in the same
    turn of the event loop goes to the shadow once the loop has nothing else to do
    (production first). A loop that never runs out of work must not starve the shadow:
    here a greenlet yields to the loop without end, two clients send in the same turn
    (so at least one chunk is held back), and both shadow connections still get their
    bytes (the 2 ms deadline) while that greenlet is still spinning."""
    production, shadow = servers.echo(), servers.sink()
    proxied = proxy(production, shadow=[shadow])
    clients = [proxied.connect(), proxied.connect()]
    for client in clients:
        client.sendall(b"connect\n")
        assert recv_exactly(client, 8) == b"connect\n"
    wait_until(lambda: len(shadow.conns) == 2 and all(c.received == 8 for c in shadow.conns),
               what="both shadow connections open and written")
    spinning = True

    def spin() -> int:
        spins = 0
        while spinning:
            spins += 1
            gevent.sleep(0)  # always a callback pending: the loop is never idle
        return spins

    spinner = gevent.spawn(spin)
    try:
        for client in clients:  # non-blocking sends: no switch between the two
            client.sendall(b"while the loop is busy\n")
        for client in clients:
            assert recv_exactly(client, 23) == b"while the loop is busy\n"
        wait_until(lambda: all(c.received == 8 + 23 for c in shadow.conns), timeout=5,
                   interval=0.001, what="both shadows written while the loop is busy")
        assert not spinner.dead
    finally:
        spinning = False
    assert spinner.get(timeout=5) > 0
    for client in clients:
        client.close()
    for conn in shadow.conns:
        assert conn.eof.wait(5)
        assert conn.sha256 == sha256(b"connect\nwhile the loop is busy\n")
    lines = wait_for_lines(caplog, count=2)
    assert [line["shadows"] for line in lines] == [{shadow.address: "done"}] * 2


def test_a_connections_first_chunk_goes_to_the_shadow_at_once_even_when_the_loop_is_busy(
        servers):
    """A connection's first chunk has nothing before it to be batched with: it is
    written to a connected shadow from the callback that feeds it, while other events
    wait in the same turn of the loop (later chunks of a stream wait for spare time).
    Two sinks are fed from two io callbacks made ready for the same turn: whichever
    runs first sees the other pending."""
    route = make_route("test", listen="127.0.0.1:0", production="127.0.0.1:1")
    stats = RouteStats()
    production = Upstream(route.production, stats.production,
                          Exchanges("tcp", stats.production, stats, "test"))
    shadow = servers.sink()
    sinks = []
    for _ in range(2):
        upstream = Upstream(address(shadow.address), stats.shadow(shadow.address),
                            Exchanges("tcp", stats.shadow(shadow.address), stats, "test"))
        sinks.append(ShadowSink(upstream, route, "test", gevent.spawn, production))
    wait_until(lambda: all(sink.state == "open" for sink in sinks), what="both connected")

    loop = gevent.get_hub().loop
    pairs = [socket.socketpair() for _ in sinks]
    seen = []  # (events still pending when fed, bytes written by the time feed returned)

    def feed(sink, watcher):
        watcher.stop()
        pending = loop.pendingcnt
        sink.feed(memoryview(b"first request"))
        seen.append((pending, sink.upstream.sent.bytes))
    watchers = [loop.io(pair[1].fileno(), 1) for pair in pairs]
    for sink, watcher in zip(sinks, watchers, strict=True):
        watcher.start(feed, sink, watcher)
    for pair in pairs:  # no yield in between: both readable in the same turn
        pair[0].send(b"x")
    wait_until(lambda: len(seen) == 2, what="both fed")

    assert max(pending for pending, _ in seen) >= 1, "never fed while another event waited"
    assert [written for _, written in seen] == [13, 13]
    for sink in sinks:
        sink.linger(5)
    assert [sink.state for sink in sinks] == ["done", "done"]
    for pair in pairs:
        for end in pair:
            end.close()


# --- shadow-write-delay --------------------------------------------------------------------

def test_what_arrives_within_the_write_delay_reaches_the_shadow_in_one_write(
        servers, proxy, caplog):
    """Three chunks of one turn (production has not answered in between) reach the
    shadow together, in one write, after shadow-write-delay."""
    production, shadow = servers.sink(), servers.sink()
    proxied = proxy(production, shadow=[shadow], shadow_write_delay="1s")
    client = proxied.connect()
    requests = [b"first request\n", b"second request\n", b"third request\n"]
    for number, request in enumerate(requests, 1):
        client.sendall(request)
        wait_until(lambda number=number: production.conns and production.conns[0].received
                   == len(b"".join(requests[:number])), what="production has it")
    connected = wait_until(lambda: shadow.conns and shadow.conns[0])
    assert connected.received == 0, "the shadow got bytes before the write delay was over"

    wait_until(lambda: connected.received == len(b"".join(requests)), timeout=5,
               what="the delayed write at the shadow")
    assert connected.reads == [len(b"".join(requests))]
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""
    client.close()
    assert connected.eof.wait(5)
    assert connected.sha256 == sha256(b"".join(requests))
    line, = wait_for_lines(caplog)
    assert line["shadows"] == {shadow.address: "done"}


def test_the_write_delay_holds_every_batch_not_only_the_first(servers, proxy):
    """A libev timer started again after it has fired fires at the next loop turn: the
    delay held the first batch of a connection and none after it."""
    production, shadow = servers.echo(), servers.echo()
    proxied = proxy(production, shadow=[shadow], shadow_write_delay="500ms")
    client = proxied.connect()
    connected = None
    for number, request in enumerate([b"first\n", b"second\n", b"third\n"], 1):
        before = connected.received if connected else 0
        client.sendall(request)
        assert recv_exactly(client, len(request)) == request
        connected = wait_until(lambda: shadow.conns and shadow.conns[0])
        gevent.sleep(0.1)  # well within the delay: nothing may have been written yet
        assert connected.received == before, f"batch {number} was not held back"
        expected = before + len(request)
        wait_until(lambda conn=connected, expected=expected: conn.received == expected,
                   timeout=5, what=f"batch {number} after the delay")
    client.close()


def test_a_bulk_stream_and_the_eof_are_not_held_back_by_the_write_delay(
        servers, proxy, caplog):
    """Past 64 KiB waiting, bytes go to the shadow at once, and the client's EOF sends
    the rest: with a delay far longer than the transfer, 32 MiB at full speed pass
    without filling a shadow-buffer of 4 MiB, and the shadow is done well before it."""
    production, shadow = servers.sink(), servers.sink()
    proxied = proxy(production, shadow=[shadow], shadow_write_delay="30s",
                    shadow_buffer="4MiB")
    data = os.urandom(32 * MiB)

    assert exchange(proxied, data) == (sha256(b""), 0)
    line, = wait_for_lines(caplog, timeout=10)
    assert line["shadows"] == {shadow.address: "done"}
    assert line["duration"] < 30, "the shadow's last bytes waited for the write delay"
    assert proxied.shadow_stats(shadow).dropped == 0
    assert shadow.conns[0].sha256 == sha256(data)


def test_a_shadow_still_connecting_when_linger_runs_out_is_a_connect_failure(
        servers, proxy, caplog):
    """A short connection (shorter than shadow-connect-timeout, longer than nothing):
    the shadow never connected, so it got none of the stream. It must not be
    reported as 'done', and the failed connect must be counted."""
    hole = servers.black_hole()
    proxied = proxy(servers.echo(), shadow=[hole], shadow_connect_timeout="500ms",
                    shadow_linger="100ms")

    assert exchange(proxied, b"request") == (sha256(b"request"), 7)
    line, = wait_for_lines(caplog, timeout=5)
    assert line["shadows"] == {hole.address: "failed"}
    counters = proxied.shadow_stats(hole)
    assert (counters.connect_failures, counters.bytes_sent) == (1, 0)


# --- memory with a stalled shadow, on a real gproxyd process --------------------------------

def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_stalled_shadow_keeps_gproxyd_memory_bounded(servers, tmp_path):
    production, stalled = servers.sink(), servers.stall()
    port = unused_port()
    config = tmp_path / "gproxyd.conf"
    config.write_text(f"""[gproxyd]
admin = off
drain-timeout = 1s

[route memory]
listen = 127.0.0.1:{port}
production = {production.address}
shadow = {stalled.address}
shadow-buffer = 1MiB
""")
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-m", "gproxyd", "-c", str(config)], env=env,
                             cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = gevent.spawn(lambda: log.extend(iter(child.stderr.readline, "")))
    try:
        wait_until(lambda: any("gproxyd ready" in line for line in log) or child.poll(),
                   timeout=15, what="'gproxyd ready' on the child's stderr")
        assert child.poll() is None, "".join(log)
        baseline = peak = _rss(child.pid)

        def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss(child.pid))
                gevent.sleep(0.02)
        sampler = gevent.spawn(sample)

        block, blocks = os.urandom(MiB), 512
        expected = hashlib.sha256()
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        for _ in range(blocks):
            client.sendall(block)
            expected.update(block)
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
        client.close()
        sampler.kill()

        conn, = production.conns
        assert conn.eof.wait(10)
        assert (conn.received, conn.sha256) == (blocks * MiB, expected.hexdigest())
        assert peak - baseline < 64 * MiB, f"RSS grew by {(peak - baseline) / MiB:.1f} MiB"
        wait_until(lambda: any("dropped" in line for line in log), timeout=5,
                   what="the stalled shadow dropped at shadow-buffer")
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)
        reader.join(timeout=5)
        child.stderr.close()


# --- sampling -------------------------------------------------------------------------------

def _mirrored_of_400(servers, proxy, seed: int) -> int:
    shadow = servers.sink()
    proxied = proxy(servers.echo(), shadow=[shadow], shadow_sample="25%", shadow_seed=seed)
    for _ in range(8):
        answers = [gevent.spawn(exchange, proxied, b"%d" % n) for n in range(50)]
        gevent.joinall(answers, raise_error=True)
    counters = proxied.stats.shadows.get(shadow.address)
    mirrored = counters.mirrored if counters else 0
    # the count is what really went to the shadow, not just a counter
    wait_until(lambda: len(shadow.conns) == mirrored and all(c.eof.is_set()
                                                            for c in shadow.conns),
               what=f"{mirrored} mirrored connections at the shadow")
    return mirrored


def test_a_quarter_of_connections_are_mirrored_the_same_ones_for_the_same_seed(
        servers, proxy):
    first = _mirrored_of_400(servers, proxy, seed=7)
    second = _mirrored_of_400(servers, proxy, seed=7)
    assert 60 <= first <= 140
    assert first == second


@pytest.mark.parametrize("share, expected", [("0%", 0), ("100%", 20)])
def test_shadow_sample_none_or_all(servers, proxy, share, expected):
    shadow = servers.sink()
    proxied = proxy(servers.echo(), shadow=[shadow], shadow_sample=share)
    for n in range(20):
        exchange(proxied, b"%d" % n)
    counters = proxied.stats.shadows.get(shadow.address)
    assert (counters.mirrored if counters else 0) == expected
    wait_until(lambda: len(shadow.conns) == expected)


# --- EOF and linger ---------------------------------------------------------------------------

def test_the_client_eof_reaches_the_shadows_while_the_session_goes_on(servers, proxy):
    production = servers.sink(reply_at_eof=b"late answer", delay=0.3)
    shadow = servers.sink()
    proxied = proxy(production, shadow=[shadow])
    client = proxied.connect()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)

    conn = wait_until(lambda: shadow.conns and shadow.conns[0])
    assert conn.eof.wait(2), "the client's EOF did not reach the shadow"
    assert not production.conns[0].done.is_set(), "the EOF came only after production's answer"
    assert recv_to_eof(client) == b"late answer"
    assert conn.sha256 == sha256(b"request")


def test_shadow_linger_lets_a_slow_answer_in_and_closes_a_silent_shadow(
        servers, proxy, caplog):
    slow = servers.sink(reply_at_eof=b"slow answer", delay=0.3)
    silent = servers.sink(hold=True)       # reads to EOF, never answers, never closes
    proxied = proxy(servers.echo(), shadow=[slow, silent], shadow_linger="1s")

    assert exchange(proxied, b"request") == (sha256(b"request"), 7)
    line, = wait_for_lines(caplog, timeout=5)
    # The silent one never answered: a timeout, with no request and no latency counted.
    assert line["shadows"] == {slow.address: "done", silent.address: "timeout"}
    assert line["why"] == {silent.address: "1-unanswered"}
    assert line["duration"] >= 1.0, "the silent shadow was closed before shadow-linger"
    assert proxied.shadow_stats(slow).bytes_received == len(b"slow answer")
    silent_stats = proxied.shadow_stats(silent)
    assert silent_stats.bytes_received == 0
    assert (silent_stats.requests, silent_stats.timeouts, silent_stats.latency.count) == (0, 1, 0)
    assert silent_stats.outcomes == {"timeout": 1}
    assert proxied.shadow_stats(slow).outcomes == {"done": 1}
    snapshot = proxied.stats.snapshot()
    words = verdict(snapshot["production"], snapshot["shadows"][silent.address])
    assert words == ("no answers from the candidate (1 requests timed out); shadow "
                     "connections not done: 1 timeout")
    assert peer_closed(silent.conns[0].sock), "the silent shadow was never closed"


def test_shadow_linger_is_one_deadline_for_all_shadows_not_one_each(servers, proxy, caplog):
    """With three silent shadows and shadow-linger = 0.5s, all three are closed about
    0.5s after production is done, not one after another (0.5s + 0.5s + 0.5s)."""
    silent = [servers.sink(hold=True) for _ in range(3)]
    proxied = proxy(servers.echo(), shadow=silent, shadow_linger="500ms")

    assert exchange(proxied, b"request") == (sha256(b"request"), 7)
    line, = wait_for_lines(caplog, timeout=5)
    assert 0.5 <= line["duration"] < 1.0, (
        f"the session lingered {line['duration']}s for shadow-linger = 0.5s")


# --- the shadow queue -------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "write"]),
                          st.integers(min_value=0, max_value=200_000)), max_size=40))
def test_the_shadow_queue_gives_back_exactly_what_went_in_in_order(steps):
    """Appends of any size (small pieces, then 64 KiB blocks past 64 KiB waiting), and
    writes of any part of what pieces() offers (as a partial send() would), keep the
    bytes exact and in order."""
    queue, expected, written, counter = _Queue(), bytearray(), bytearray(), 0
    for action, size in steps:
        if action == "append":
            data = bytes((counter + i) % 251 for i in range(size))
            counter += size
            queue.append(memoryview(data))
            expected += data
        elif queue.size:
            offered = b"".join(bytes(piece) for piece in queue.pieces())
            assert offered == expected[len(written):len(written) + len(offered)]
            count = min(size, len(offered))
            written += offered[:count]
            queue.consume(count)
        assert queue.size == len(expected) - len(written)
    while queue.size:
        offered = b"".join(bytes(piece) for piece in queue.pieces())
        written += offered
        queue.consume(len(offered))
    assert written == expected
    assert queue.pieces() == []


def test_lingering_shadows_past_shadow_max_connections_drop_the_oldest(
        servers, proxy, caplog, monkeypatch):
    """Clients that open short connections while a shadow never answers leave shadow
    sockets lingering; past the bound the oldest are dropped, not production's."""
    from gproxyd import shadow
    monkeypatch.setattr(shadow.LINGERING, "limit", 2)
    silent = servers.sink(hold=True)       # reads to EOF, never answers, never closes
    proxied = proxy(servers.echo(), shadow=[silent], shadow_linger="2s")
    for number in range(5):
        assert exchange(proxied, b"request %d" % number)[1] == 9
    lines = wait_for_lines(caplog, count=5, timeout=10)
    stats = proxied.shadow_stats(silent)
    assert stats.outcomes == {"dropped": 3, "timeout": 2}
    assert stats.dropped == 3
    whys = sorted(line["why"][silent.address] for line in lines)
    assert whys == ["1-unanswered"] * 2 + ["over-shadow-max-connections"] * 3
    assert "shadow connections lingering (shadow-max-connections): dropping the oldest" \
        in caplog.text


def test_a_shadow_that_keeps_up_again_has_its_answers_read_in_bulk_again(servers, proxy):
    """A tcp-level shadow's answers are read once per 32 KiB (SO_RCVLOWAT) while it keeps
    up, per answer while a request waits for its answer to the one before (turns), and
    in bulk again once it has kept up for 16 turns in a row."""
    slow_turns = (1, 2)

    def echo_slow_twice(conn):
        for turn in range(40):
            data = conn.sock.recv(65536)
            if not data:
                return
            conn.take(data)
            if turn in slow_turns:
                gevent.sleep(0.3)  # production has answered long before
            conn.sock.sendall(data)
            conn.sent += len(data)

    production, shadow = servers.echo(), servers._start(echo_slow_twice, "tcp4", 0)
    proxied = proxy(production, [shadow])
    client = proxied.connect()

    def low_water() -> int:
        [session] = proxied.listener.sessions
        [sink] = session.shadows
        return sink.upstream.channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)

    try:
        for turn in range(40):
            request = b"request %02d\n" % turn
            client.sendall(request)
            assert recv_exactly(client, len(request)) == request
            if turn in slow_turns:
                continue  # the next request comes before the shadow's answer
            wait_until(lambda turn=turn: shadow.conns[0].sent == 11 * (turn + 1),
                       what="the shadow's answer")
            if turn == 0:
                assert low_water() == 32 * 1024
            elif turn == slow_turns[-1] + 1:
                assert low_water() == 1  # turns waited for the shadow's answers
        assert low_water() == 32 * 1024
    finally:
        client.close()
    stats = proxied.shadow_stats(shadow)
    wait_until(lambda: stats.outcomes.get("done") == 1, what="the shadow connection done")
    assert (stats.bytes_sent, stats.bytes_received, stats.turn_timeouts) == (440, 440, 0)


def test_shadows_linger_after_their_session_in_the_hub_and_drain_waits_for_them(
        servers, proxy):
    """A session without hooks whose shadow has not answered yet when it ends leaves the
    shadow lingering in the event loop (no greenlet per session); drain() waits for it,
    and its outcome is counted before drain returns."""
    slow = servers.sink(reply_at_eof=b"late", delay=0.5)
    proxied = proxy(servers.echo(), shadow=[slow], shadow_linger="5s")
    assert exchange(proxied, b"request") == (sha256(b"request"), 7)
    listener = proxied.listener
    wait_until(lambda: not listener.sessions, what="the session ended")
    stats = proxied.shadow_stats(slow)
    assert stats.outcomes == {}, "the shadow was decided before it answered"
    assert len(listener._greenlets) == 0, "a greenlet lingers for the shadow"
    listener.close()
    assert listener.drain(5) == 0
    assert stats.outcomes == {"done": 1}
    assert stats.bytes_received == len(b"late")
