"""shadow.py's budget (#19 item 1): shadow-memory over all connections, shadow-buffer per
connection, and the kernel send buffers of shadow sockets.

When shadow-memory is full the shadow connection furthest behind (the most waiting) is
dropped, not the one that happened to write last; every byte let go is counted under its
cause; what the queues hold goes back to nothing once their connections end.
"""
import os
import socket

import gevent
import pytest
from backends import hash_to_eof, sha256, wait_for_lines, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from gproxyd import shadow
from gproxyd.shadow import SEND_BUFFER_FLOOR, memory_stats, send_buffer_for
from gproxyd.stats import DROP_CAUSES, ShadowMemoryStats, ShadowStats

KiB = 1024
MiB = 1024 * KiB


def grown(before: ShadowMemoryStats) -> dict:
    """What the process-wide counters gained since `before`, by cause."""
    now = memory_stats()
    return {"drops": {cause: now.drops.get(cause, 0) - before.drops.get(cause, 0)
                      for cause in DROP_CAUSES if now.drops.get(cause, 0)
                      != before.drops.get(cause, 0)},
            "dropped_bytes": {cause: now.dropped_bytes.get(cause, 0)
                              - before.dropped_bytes.get(cause, 0)
                              for cause in DROP_CAUSES if now.dropped_bytes.get(cause, 0)
                              != before.dropped_bytes.get(cause, 0)}}


def settled(before: ShadowMemoryStats) -> None:
    """Every shadow connection of the test has ended: what they held and were granted is
    given back, to the byte."""
    wait_until(lambda: (memory_stats().queued, memory_stats().send_buffers)
               == (before.queued, before.send_buffers), timeout=10,
               what="the budget back where it was")
    assert shadow.BUDGET.sockets == 0


def steady(value) -> None:
    """Until `value()` stops changing (the kernel has taken what it takes)."""
    seen = [value()]

    def same() -> bool:
        seen.append(value())
        return seen[-1] == seen[-2]
    gevent.sleep(0.02)
    wait_until(same, timeout=5, interval=0.05, what="a steady value")


def push(client: socket.socket, production, count: int, connections: int) -> None:
    """Send `count` bytes on `client`; return once production has them all (by then every
    chunk went to the shadow's queue too: the shadows are fed right after production)."""
    client.sendall(os.urandom(count))
    wait_until(lambda: len(production.conns) >= connections and
               production.conns[connections - 1].received == count, timeout=10,
               what=f"{count} bytes at production")


def test_the_connection_furthest_behind_is_dropped_when_shadow_memory_is_full(
        servers, proxy, caplog, monkeypatch):
    """Three connections to a stalled shadow, shadow-memory 4 MiB: the second one (the
    furthest behind, neither the oldest nor the one writing) is dropped when the third
    fills the budget; the others carry on, and the total stays within the limit."""
    monkeypatch.setattr(shadow.BUDGET, "limit", 4 * MiB)
    monkeypatch.setattr(shadow.BUDGET, "high_water", 0)
    production, stalled = servers.sink(), servers.stall()
    proxied = proxy(production, shadow=[stalled], shadow_linger="100ms")
    before = memory_stats()

    def queued() -> int:
        return memory_stats().queued - before.queued

    oldest, furthest, writer = proxied.connect(), proxied.connect(), proxied.connect()
    push(oldest, production, 1 * MiB, 1)
    push(furthest, production, 3 * MiB, 2)
    steady(queued)
    assert 2 * MiB < queued() < 4 * MiB, queued()
    assert grown(before)["drops"] == {}
    sent = 0
    while not grown(before)["drops"]:
        assert sent < 4 * MiB, "shadow-memory never filled up"
        sent += 64 * KiB
        writer.sendall(os.urandom(64 * KiB))
        wait_until(lambda sent=sent: len(production.conns) == 3
                   and production.conns[2].received == sent,
                   what="the writer's bytes at production")
    assert grown(before)["drops"] == {"over-budget": 1}
    assert queued() <= 4 * MiB
    assert memory_stats().high_water <= 4 * MiB

    peers = {client.getsockname(): name for client, name in
             ((oldest, "oldest"), (furthest, "furthest"), (writer, "writer"))}
    for client in (oldest, furthest, writer):
        client.shutdown(socket.SHUT_WR)
        client.close()
    lines = wait_for_lines(caplog, count=3)
    outcomes = {peers[tuple(_address(line["client"]))]:
                (line["shadows"][stalled.address], line["why"].get(stalled.address))
                for line in lines}
    assert outcomes["furthest"] == ("dropped", "over-budget")
    assert outcomes["oldest"][0] != "dropped" and outcomes["writer"][0] != "dropped"
    assert "furthest behind" in caplog.text and "(shadow-memory)" in caplog.text
    # The other two ended with bytes still waiting (shadow-linger ran out): let go too.
    counted = grown(before)
    assert counted["drops"] == {"over-budget": 1, "shadow-failed": 2}
    assert counted["dropped_bytes"]["over-budget"] > 2 * MiB
    assert proxied.shadow_stats(stalled).drops == {"over-budget": 1, "shadow-failed": 2}
    assert proxied.shadow_stats(stalled).dropped == 1
    settled(before)


def _address(text: str) -> tuple:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def test_past_shadow_buffer_a_connection_is_dropped_as_over_buffer(servers, proxy, caplog):
    production, stalled = servers.sink(), servers.stall()
    proxied = proxy(production, shadow=[stalled], shadow_buffer="1MiB",
                    shadow_linger="100ms")
    before = memory_stats()
    client = proxied.connect()
    push(client, production, 4 * MiB, 1)
    client.shutdown(socket.SHUT_WR)
    client.close()
    line, = wait_for_lines(caplog)
    assert (line["shadows"][stalled.address], line["why"][stalled.address]) == \
        ("dropped", "over-buffer")
    assert "more than 1048576 bytes waiting (shadow-buffer)" in caplog.text
    counted = grown(before)
    assert counted["drops"] == {"over-buffer": 1}
    assert 0 < counted["dropped_bytes"]["over-buffer"] <= 1 * MiB
    assert proxied.shadow_stats(stalled).drops == {"over-buffer": 1}
    settled(before)


def test_bytes_waiting_for_a_shadow_that_never_connects_are_counted_as_shadow_failed(
        servers, proxy, caplog):
    """Everything the client sent while the connect was pending waited in the queue: all
    of it is let go, counted under shadow-failed."""
    production, hole = servers.sink(), servers.black_hole()
    proxied = proxy(production, shadow=[hole], shadow_connect_timeout="300ms")
    before = memory_stats()
    client = proxied.connect()
    push(client, production, 1 * MiB, 1)
    assert memory_stats().queued - before.queued >= 1 * MiB
    client.shutdown(socket.SHUT_WR)
    client.close()
    line, = wait_for_lines(caplog)
    assert line["shadows"][hole.address] == "failed"
    assert grown(before) == {"drops": {"shadow-failed": 1},
                             "dropped_bytes": {"shadow-failed": 1 * MiB}}
    settled(before)


def test_a_healthy_shadow_gives_back_all_it_held(servers, proxy, caplog):
    """A burst that queues megabytes for a moment: once the connection has ended, the
    budget holds exactly what it held before, nothing was let go, and the socket's send
    buffer grant is returned."""
    production, healthy = servers.echo(), servers.sink()
    proxied = proxy(production, shadow=[healthy])
    before = memory_stats()
    data = os.urandom(16 * MiB)
    client = proxied.connect()
    sender = gevent.spawn(lambda: (client.sendall(data), client.shutdown(socket.SHUT_WR)))
    assert hash_to_eof(client) == (sha256(data), len(data))
    sender.get()
    client.close()
    wait_for_lines(caplog)
    assert healthy.conns[0].sha256 == sha256(data)
    assert grown(before) == {"drops": {}, "dropped_bytes": {}}
    settled(before)


def test_a_lower_shadow_memory_drops_the_furthest_behind_at_the_next_chunk(
        servers, proxy, caplog, monkeypatch):
    """A reload that lowers shadow-memory below what is queued: nothing happens until
    the next chunk is queued, which makes room (the furthest behind goes)."""
    monkeypatch.setattr(shadow.BUDGET, "limit", 8 * MiB)  # kernel buffers of 1 MiB at most
    production, stalled = servers.sink(), servers.stall()
    proxied = proxy(production, shadow=[stalled], shadow_linger="100ms")
    before = memory_stats()
    behind, other = proxied.connect(), proxied.connect()
    push(behind, production, 4 * MiB, 1)
    push(other, production, 2 * MiB, 2)
    steady(lambda: memory_stats().queued)
    monkeypatch.setattr(shadow.BUDGET, "limit", memory_stats().queued - MiB)
    assert grown(before)["drops"] == {}
    other.sendall(b"x")
    wait_until(lambda: grown(before)["drops"] == {"over-budget": 1},
               what="the furthest behind dropped")
    behind_peer = "%s:%d" % behind.getsockname()
    for client in (behind, other):
        client.close()
    lines = wait_for_lines(caplog, count=2)
    whys = {line["client"]: line["why"].get(stalled.address) for line in lines}
    assert whys[behind_peer] == "over-budget"
    assert len([why for why in whys.values() if why == "over-budget"]) == 1
    settled(before)


# --- the kernel's send buffers ------------------------------------------------------------

AUTO = 4 * MiB  # autotuning's largest (tcp_wmem's third value) in these examples

# (shadow-memory, shadow-buffer, sockets open, granted so far) -> kernel size (None: autotuned)
SEND_BUFFERS = [
    # The defaults: the first 8 shadow sockets are autotuned, like production's ...
    ((256 * MiB, 64 * MiB, 0, 0), None),
    ((256 * MiB, 64 * MiB, 7, 7 * AUTO), None),
    # ... then an eighth of shadow-memory shared among those open ...
    ((256 * MiB, 64 * MiB, 8, 8 * AUTO), 32 * MiB // 9),
    ((256 * MiB, 64 * MiB, 99, 64 * MiB), 32 * MiB // 100),
    # ... never below the floor ...
    ((256 * MiB, 64 * MiB, 5000, 100 * MiB), SEND_BUFFER_FLOOR),
    # ... and at the floor once half of shadow-memory is granted.
    ((256 * MiB, 64 * MiB, 100, 128 * MiB - 100 * KiB), SEND_BUFFER_FLOOR),
    ((256 * MiB, 64 * MiB, 100, 128 * MiB - 32 * MiB // 101), 32 * MiB // 101),
    # A small shadow-buffer caps it (and it is set, not autotuned).
    ((256 * MiB, 1 * MiB, 0, 0), 1 * MiB),
    ((256 * MiB, 4 * KiB, 0, 0), SEND_BUFFER_FLOOR),
    # A small shadow-memory: its eighth, shared.
    ((4 * MiB, 64 * MiB, 0, 0), 512 * KiB),
    ((4 * MiB, 64 * MiB, 3, 1536 * KiB), 128 * KiB),
]


@pytest.mark.parametrize("given_, expected", SEND_BUFFERS)
def test_a_shadow_sockets_send_buffer_follows_shadow_memory(given_, expected):
    memory, most, sockets, granted = given_
    assert send_buffer_for(memory, most, sockets, granted, autotuning_most=AUTO) == expected


def test_send_buffers_granted_never_pass_half_of_shadow_memory_but_for_the_floors():
    """However many shadow sockets open one after another (none closing: the worst case
    for sizes chosen as each connects), the total stays within half of shadow-memory
    plus the floor for each socket that got only the floor."""
    for memory in (4 * MiB, 256 * MiB, 1024 * MiB):
        granted = floors = 0
        for sockets in range(20000):
            size = send_buffer_for(memory, 64 * MiB, sockets, granted, autotuning_most=AUTO)
            size = AUTO if size is None else size
            granted += size
            floors += size == SEND_BUFFER_FLOOR
        assert granted <= memory // 2 + floors * SEND_BUFFER_FLOOR


def test_shadow_sockets_get_the_send_buffer_the_rule_gives(servers, proxy, monkeypatch):
    """On real sockets: with shadow-memory 4 MiB the first shadow socket asks for 256 KiB
    (the kernel doubles it, up to net.core.wmem_max); what was granted is counted while
    it is open and given back when it closes."""
    monkeypatch.setattr(shadow.BUDGET, "limit", 4 * MiB)
    production, healthy = servers.echo(), servers.sink()
    proxied = proxy(production, shadow=[healthy])
    before = memory_stats()
    client = proxied.connect()
    client.sendall(b"hello")
    wait_until(lambda: healthy.conns and healthy.conns[0].received == 5)
    with open("/proc/sys/net/core/wmem_max") as limit:
        kernel_size = 2 * min(256 * KiB, int(limit.read()))
    assert memory_stats().send_buffers - before.send_buffers == kernel_size
    assert shadow.BUDGET.sockets == 1
    client.close()
    settled(before)


@pytest.mark.parametrize("most", [32 * KiB, 1 * MiB, 3 * MiB])
def test_the_send_buffer_counted_is_the_one_the_kernel_granted(most):
    """What a shadow socket is counted for (worked out, not read back) is what
    SO_SNDBUF reads on it."""
    budget = shadow._Budget()
    budget.limit = 1024 * MiB  # an eighth of it is more than `most`: `most` is asked for
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        granted = budget.size_send_buffer(sock, most)
        assert granted == sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    finally:
        sock.close()
    assert (budget.sockets, budget.send_buffers) == (1, granted)


def test_a_unix_shadow_socket_is_left_alone(servers, proxy):
    production, healthy = servers.echo(), servers.sink(family="unix")
    proxied = proxy(production, shadow=[healthy])
    before = memory_stats()
    client = proxied.connect()
    client.sendall(b"hello")
    wait_until(lambda: healthy.conns and healthy.conns[0].received == 5)
    assert (memory_stats().send_buffers, shadow.BUDGET.sockets) == (before.send_buffers, 0)
    client.close()
    settled(before)


# --- finding the furthest behind ----------------------------------------------------------

class Queued:
    """What the budget reads of a ShadowSink: its memory held and its heap bookkeeping;
    end() is what the budget does to a sink that ends."""

    def __init__(self):
        self.held = 0
        self.alive = True
        self.budget_step = 0
        self.budget_entry = None

    def end(self) -> None:
        self.alive = False
        self.budget_entry[0] = None  # as let_go() does


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.sampled_from(["grow", "shrink", "end"]),
                          st.integers(1, 200 * KiB)), max_size=300))
def test_the_budget_finds_the_queue_holding_the_most(steps):
    """Queues grow (entering the heap as the sinks do), shrink (written: the heap is not
    told) and end in any order; the one found is always a live queue holding the most,
    to within the 16 KiB step."""
    budget = shadow._Budget()
    queues = [Queued() for _ in range(20)]
    for index, action, size in steps:
        queue = queues[index]
        if not queue.alive:
            continue
        if action == "grow":
            queue.held += size
            if queue.held >> shadow._STEP_BITS > queue.budget_step:
                budget.grew(queue)
        elif action == "shrink":
            queue.held = max(0, queue.held - size)
        elif queue.budget_entry is not None:
            queue.end()
        else:
            queue.alive = False
        live = [queue for queue in queues if queue.alive]
        most = max((queue.held >> shadow._STEP_BITS for queue in live), default=0)
        found = budget._furthest_behind()
        if most == 0:
            assert found is None
        else:
            assert found is not None and found.alive
            assert found.held >> shadow._STEP_BITS == most


def test_the_heap_forgets_superseded_entries():
    """A queue that grows step by step enters the heap at every step: the superseded
    entries are cleaned up, so the heap stays proportional to the live queues."""
    budget = shadow._Budget()
    queue = Queued()
    for _ in range(100_000):
        queue.held += 1 << shadow._STEP_BITS
        budget.grew(queue)
    assert len(budget._heap) <= 2 * shadow._COMPACT_AT
    assert budget._furthest_behind() is queue


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "write"]),
                          st.integers(min_value=0, max_value=200_000)), max_size=40))
def test_a_queue_counts_the_memory_it_holds(steps):
    """What shadow-memory counts of a queue: at least the bytes waiting, at most two
    partly used 64 KiB blocks more (the one being drained and the one being filled),
    heap pieces for no more than its first 64 KiB, and nothing once it is empty."""
    queue = shadow._Queue()
    for action, size in steps:
        if action == "append":
            queue.append(bytes(size))
        else:
            queue.consume(min(size, sum(len(piece) for piece in queue.pieces(size))))
        assert queue.size <= queue.held <= queue.size + 2 * shadow._BLOCK or \
            queue.held == queue.size == 0
        heap_bytes = sum(len(piece) for piece in queue._pieces if type(piece) is bytes)
        blocks = sum(type(piece) is shadow._Block for piece in queue._pieces)
        assert queue.held == heap_bytes + blocks * shadow._BLOCK
        assert heap_bytes <= shadow._WRITE_NOW
    queue.clear()
    assert (queue.size, queue.held) == (0, 0)


# --- the numbers ----------------------------------------------------------------------------

def test_shadow_memory_numbers_add_up_over_processes():
    one = ShadowMemoryStats(limit=256 * MiB, queued=5, high_water=10, send_buffers=7,
                            drops={"over-budget": 2}, dropped_bytes={"over-budget": 100})
    two = ShadowMemoryStats(limit=256 * MiB, queued=1, high_water=20, send_buffers=3,
                            drops={"over-buffer": 1, "over-budget": 1},
                            dropped_bytes={"over-buffer": 9, "over-budget": 50})
    merged = ShadowMemoryStats()
    merged.add(one.export())
    merged.add(two.export())
    assert merged.snapshot() == {
        "limit": 512 * MiB, "queued": 6, "high_water": 30, "send_buffers": 10,
        "drops": {"over-buffer": 1, "over-budget": 3, "shadow-failed": 0,
                  "over-shadow-max-connections": 0},
        "dropped_bytes": {"over-buffer": 9, "over-budget": 150, "shadow-failed": 0,
                          "over-shadow-max-connections": 0}}
    assert one.export()["drops"] == {"over-budget": 2}  # not shared with the merge


def test_a_shadows_drops_by_cause_are_in_its_snapshot_and_merge():
    stats = ShadowStats(dropped=2, drops={"over-budget": 2, "shadow-failed": 1})
    other = ShadowStats()
    other.add(stats.export())
    other.add(stats.export())
    assert other.snapshot()["drops"] == {"over-buffer": 0, "over-budget": 4,
                                         "shadow-failed": 2, "over-shadow-max-connections": 0}
    assert other.snapshot()["dropped"] == 4


def test_the_budget_starts_at_the_option_default():
    assert shadow._Budget().limit == 256 * MiB
