"""Answer comparison with real servers and real clients: HTTP (JSON, gzip, chunked,
pipelined, filtered) and Redis (redis-server, redis-py), /mismatches and gproxyctl diff."""
from __future__ import annotations

import json
import random
import socket
import uuid

import pytest
import redis
import requests
from backends import recv_exactly, redis_pings, unused_port, wait_until
from test_observe import url

from gproxyd import ctl
from gproxyd.admin import AdminServer
from gproxyd.settings import address


def compared(proxied, shadow: str, count: int):
    """Wait until `count` answers of `shadow` were judged; its ShadowStats."""
    stats = proxied.stats.shadows
    wait_until(lambda: shadow in stats and stats[shadow].compared
               + stats[shadow].uncompared >= count, timeout=10,
               what=f"{count} answers of {shadow} compared")
    return stats[shadow]


def get_items(proxied, items) -> None:
    with requests.Session() as client:
        for item in items:
            assert client.get(url(proxied, f"/items/{item}"), timeout=5).status_code == 200


def test_a_differing_field_is_counted_once_with_its_json_path(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11 if item == 3 else 10)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    get_items(proxied, range(10))
    stats = compared(proxied, candidate.address, 10)
    assert (stats.compared, stats.mismatches, stats.noise, stats.uncompared) == (10, 1, 0, 0)
    assert stats.mismatch_paths == {"$.price": 1}
    [sample] = proxied.stats.samples
    assert sample["request"].startswith("GET /items/3 HTTP/1.1")
    assert sample["paths"] == ["$.price"]
    assert sample["production"]["status"] == sample["candidate"]["status"] == 200
    assert '"price": 10' in sample["production"]["body"]
    assert '"price": 11' in sample["candidate"]["body"]


def test_the_baselines_noise_is_learned_and_not_counted(proxy, json_servers):
    """Production, its twin (baseline) and the candidate all stamp each answer with the
    time and a random id: only the candidate's price on item 3 is a real difference."""
    production = json_servers(noisy=("timestamp", "rid"))
    baseline = json_servers(noisy=("timestamp", "rid"))
    candidate = json_servers(noisy=("timestamp", "rid"),
                             price_of=lambda item: 11 if item == 3 else 10)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    baseline=baseline.address)
    get_items(proxied, range(10))
    stats = compared(proxied, candidate.address, 10)
    twin = compared(proxied, baseline.address, 10)
    assert (stats.compared, stats.mismatches, stats.noise) == (10, 1, 9)
    assert stats.mismatch_paths == {"$.price": 1}
    assert proxied.stats.samples[-1]["paths"] == ["$.price"]
    assert twin.mismatches == 10 and twin.mismatch_paths == {"$.timestamp": 10, "$.rid": 10}
    snapshot = proxied.stats.snapshot()
    assert snapshot["noise_paths"] == {"$.rid": 1.0, "$.timestamp": 1.0}
    assert snapshot["shadows"][baseline.address]["role"] == "baseline"
    assert snapshot["shadows"][candidate.address]["role"] == "candidate"


def test_ignored_fields_are_not_counted(proxy, json_servers):
    production = json_servers(noisy=("timestamp", "rid"))
    candidate = json_servers(noisy=("timestamp", "rid"))
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    compare_ignore_fields="$.timestamp, $.rid")
    get_items(proxied, range(5))
    stats = compared(proxied, candidate.address, 5)
    assert (stats.compared, stats.mismatches) == (5, 0)


def test_gzip_and_chunked_bodies_are_compared_as_their_payload(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(encoding="gzip", chunked=True,
                             price_of=lambda item: 12 if item == 1 else 10)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    get_items(proxied, range(4))
    stats = compared(proxied, candidate.address, 4)
    assert (stats.compared, stats.mismatches, stats.mismatch_paths) == (4, 1, {"$.price": 1})


def test_pipelined_requests_are_paired_in_order(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: item)  # differs except for item 10
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    client = proxied.connect()
    requests_bytes = b"".join(f"GET /items/{item} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                              for item in (10, 3, 10, 4, 10))
    client.sendall(requests_bytes)
    answers = b""
    while answers.count(b"HTTP/1.1 200") < 5 or not answers.endswith(b"}"):
        answers += client.recv(65536)
    client.close()
    stats = compared(proxied, candidate.address, 5)
    assert (stats.compared, stats.mismatches) == (5, 2)
    assert sorted(sample["request"] for sample in proxied.stats.samples) == [
        "GET /items/3 HTTP/1.1", "GET /items/4 HTTP/1.1"]


def test_status_mode_ignores_bodies(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 99)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    compare="status")
    get_items(proxied, range(3))
    stats = compared(proxied, candidate.address, 3)
    assert (stats.compared, stats.mismatches) == (3, 0)


def test_compare_off_pairs_latencies_and_compares_nothing(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 99)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    compare="off")
    get_items(proxied, range(3))
    stats = proxied.stats.shadows[candidate.address]
    wait_until(lambda: stats.paired.pairs == 3, what="3 latency pairs")
    assert (stats.compared, stats.mismatches) == (0, 0)


def test_sample_bodies_off_keeps_hashes_only(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    compare_sample_bodies="no")
    get_items(proxied, [1])
    compared(proxied, candidate.address, 1)
    [sample] = proxied.stats.samples
    assert set(sample["production"]) == {"status", "hash"}
    assert sample["production"]["hash"] != sample["candidate"]["hash"]
    assert '"price": 1' not in json.dumps(sample)  # no body, only where they differ


def test_the_shadow_filter_keeps_writes_away_and_pairs_the_rest(proxy, json_servers):
    seen_by_candidate: list = []
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11 if item == 2 else 10,
                             seen=seen_by_candidate)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http",
                    shadow_filter="GET HEAD OPTIONS")
    with requests.Session() as client:
        for item in range(4):
            assert client.post(url(proxied, f"/items/{item}"), data=b"x" * 100_000,
                               timeout=5).status_code == 200
            assert client.get(url(proxied, f"/items/{item}"), timeout=5).status_code == 200
            assert client.delete(url(proxied, f"/items/{item}"), timeout=5).status_code == 200
        client.put(url(proxied, "/items/9"), data=b"y", timeout=5)
    stats = compared(proxied, candidate.address, 4)
    assert seen_by_candidate == ["GET"] * 4
    assert proxied.stats.production.requests == 13
    assert (stats.requests, stats.compared, stats.mismatches, stats.uncompared) == (4, 4, 1, 0)
    assert proxied.stats.filtered == 9
    assert proxied.stats.samples[-1]["request"] == "GET /items/2 HTTP/1.1"


def test_mismatches_endpoint_and_gproxyctl_diff(proxy, json_servers, capsys):
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11 if item % 2 else 10)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    get_items(proxied, range(6))
    compared(proxied, candidate.address, 6)
    admin_address = address(f"127.0.0.1:{unused_port()}")
    admin = AdminServer(admin_address, lambda: {"test": proxied.stats})
    admin.start()
    try:
        base = f"http://{admin_address}"
        document = requests.get(base + "/mismatches", timeout=5).json()
        assert [m["request"] for m in document["mismatches"]] == [
            f"GET /items/{item} HTTP/1.1" for item in (5, 3, 1)]
        assert requests.get(base + "/mismatches?limit=1", timeout=5).json()["mismatches"][0][
            "request"] == "GET /items/5 HTTP/1.1"
        assert requests.get(base + "/mismatches?route=other", timeout=5).json()[
            "mismatches"] == []
        assert requests.get(base + f"/mismatches?shadow={candidate.address}",
                            timeout=5).json()["mismatches"]
        assert requests.get(base + "/mismatches?limit=x", timeout=5).status_code == 400
        text = requests.get(base + "/metrics", timeout=5).text
        labels = f'backend="{candidate.address}",route="test"'
        assert f"gproxyd_shadow_mismatches_total{{{labels}}} 3.0" in text
        assert f"gproxyd_shadow_compared_total{{{labels}}} 6.0" in text
        stats = requests.get(base + "/stats", timeout=5).json()["routes"]["test"]
        assert stats["shadows"][candidate.address]["mismatch_paths"] == {"$.price": 3}

        assert ctl.main(["diff", "--admin", str(admin_address), "--limit", "2"]) == 0
        shown = capsys.readouterr().out
        assert "GET /items/5 HTTP/1.1" in shown and "GET /items/3 HTTP/1.1" in shown
        assert "GET /items/1 " not in shown
        assert "differs at: $.price" in shown
        assert ctl.main(["diff", "--admin", str(admin_address), "--json"]) == 0
        assert len(json.loads(capsys.readouterr().out)["mismatches"]) == 3
        assert ctl.main(["stats", "--admin", str(admin_address)]) == 0
        assert "50.0% of answers differ, mostly $.price" in capsys.readouterr().out
    finally:
        admin.stop()


def test_a_slower_candidate_is_called_slower_with_its_interval(proxy, json_servers):
    production = json_servers()
    candidate = json_servers(delay=0.003)
    proxied = proxy(production.address, shadow=[candidate.address], protocol="http")
    get_items(proxied, range(60))
    stats = compared(proxied, candidate.address, 60)
    summary = stats.paired.summary()
    assert summary["pairs"] == 60
    # The candidate sleeps 3 ms on every request: no pair can differ by less.
    assert summary["p50_low"] >= 2.9
    verdict = proxied.stats.snapshot()["shadows"][candidate.address]
    from gproxyd.report import verdict as words
    assert "slower" in words(proxied.stats.snapshot()["production"], verdict)


# --- Redis ----------------------------------------------------------------------------------

@pytest.fixture
def production_redis():
    client = redis.Redis(host="127.0.0.1", port=6379)
    assert redis_pings(client), "the machine's redis-server on 127.0.0.1:6379 is not running"
    prefix = f"gproxyd-compare-{uuid.uuid4().hex}:"
    yield client, prefix
    for key in client.scan_iter(prefix + "*"):
        client.delete(key)
    client.close()


class Counted:
    def __init__(self, stats):
        self.compared, self.mismatches = stats.compared, stats.mismatches


def handshake_mismatches(proxied, client, shadow: str) -> Counted:
    """Let redis-py open its connection (HELLO answers each server's own client id:
    a real difference) and count what it compared, to leave it out."""
    assert client.ping()
    mirrored = proxied.stats.production.requests - proxied.stats.filtered
    return Counted(compared(proxied, shadow, mirrored))


def test_redis_replies_that_differ_for_known_keys(proxy, shadow_redis, production_redis):
    production, prefix = production_redis
    shadow = redis.Redis(port=int(shadow_redis.rsplit(":", 1)[1]))
    for number in range(5):
        production.set(f"{prefix}{number}", f"v{number}")
        shadow.set(f"{prefix}{number}", "changed" if number == 3 else f"v{number}")
        production.rpush(f"{prefix}list", number)
        shadow.rpush(f"{prefix}list", 9 if number == 1 else number)
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis], protocol="redis")
    client = redis.Redis(host=proxied.sockaddr[0], port=proxied.sockaddr[1])
    handshake = handshake_mismatches(proxied, client, shadow_redis)
    for number in range(5):
        assert client.get(f"{prefix}{number}") == f"v{number}".encode()
    assert client.lrange(f"{prefix}list", 0, -1) == [b"0", b"1", b"2", b"3", b"4"]
    client.close()
    stats = compared(proxied, shadow_redis, handshake.compared + 6)
    assert stats.mismatches - handshake.mismatches == 2
    paths = sorted(tuple(sample["paths"]) for sample in list(proxied.stats.samples)[-2:])
    assert paths == [("[1]",), ("reply",)]


def test_redis_readonly_filter_keeps_every_write_off_the_shadow(proxy, shadow_redis,
                                                                production_redis):
    production, prefix = production_redis
    shadow = redis.Redis(port=int(shadow_redis.rsplit(":", 1)[1]))
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis], protocol="redis",
                    shadow_filter="readonly")
    client = redis.Redis(host=proxied.sockaddr[0], port=proxied.sockaddr[1])
    handshake = handshake_mismatches(proxied, client, shadow_redis)
    assert client.set(f"{prefix}a", "1")
    assert client.incr(f"{prefix}n") == 1
    with client.pipeline(transaction=False) as pipe:
        for number in range(20):
            pipe.set(f"{prefix}p{number}", number)
            pipe.get(f"{prefix}p{number}")
        results = pipe.execute()
    assert results[1::2] == [str(number).encode() for number in range(20)]
    with client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
        pipe.get(f"{prefix}a")
        pipe.incr(f"{prefix}n")
        assert pipe.execute() == [b"1", 2]
    assert client.get(f"{prefix}a") == b"1"
    client.close()
    reads = 20 + 1  # the pipeline's GETs and the last GET: each differs (the shadow is empty)
    stats = compared(proxied, shadow_redis, handshake.compared + reads)
    assert shadow.dbsize() == 0
    assert stats.mismatches - handshake.mismatches == reads
    assert proxied.stats.filtered >= 2 + 20 + 4  # SET, INCR, the SETs, MULTI..EXEC


def test_an_identical_shadow_matches_under_a_random_mix(proxy, shadow_redis, production_redis):
    """A/A: the same data on both sides gives no mismatch, whatever the mix."""
    production, prefix = production_redis
    shadow = redis.Redis(port=int(shadow_redis.rsplit(":", 1)[1]))
    for number in range(50):
        for server in (production, shadow):
            server.set(f"{prefix}{number}", f"value-{number}" * number)
            server.hset(f"{prefix}h{number}", mapping={"a": number, "b": "x"})
    proxied = proxy("127.0.0.1:6379", shadow=[shadow_redis], protocol="redis",
                    shadow_filter="readonly")
    client = redis.Redis(host=proxied.sockaddr[0], port=proxied.sockaddr[1])
    handshake = handshake_mismatches(proxied, client, shadow_redis)
    chooser = random.Random(7)
    with client.pipeline(transaction=False) as pipe:
        for _ in range(300):
            number = chooser.randrange(50)
            getattr(pipe, chooser.choice(["get", "hgetall", "strlen", "exists"]))(
                f"{prefix}{'h' if chooser.random() < 0.5 else ''}{number}")
        pipe.execute(raise_on_error=False)
    client.close()
    stats = compared(proxied, shadow_redis, handshake.compared + 300)
    assert stats.mismatches == handshake.mismatches
    assert stats.compared == handshake.compared + 300


def test_an_oversized_answer_is_compared_by_hash(proxy, serve):
    """Answers over compare-max-body: equal ones match, different ones differ at 'body'."""
    from backends import Conn  # noqa: F401  (the type of the handler's argument)

    def big(fill: bytes, odd: bytes):
        def handler(conn):
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.sock.recv(65536)
                    if not data:
                        return
                    head += data
                item = head.split(b" ", 2)[1]
                body = (odd if item == b"/odd" else fill) * 300_000
                conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                                  + body)
        return handler
    production, candidate = serve(big(b"a", b"z")), serve(big(b"a", b"y"))
    proxied = proxy(production, shadow=[candidate], protocol="http", compare_max_body="64KiB")
    client = proxied.connect()
    for path in (b"/even", b"/odd", b"/even"):
        client.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head = recv_exactly(client, len(b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"))
        assert head.startswith(b"HTTP/1.1 200")
        recv_exactly(client, 300_000)
    client.close()
    stats = compared(proxied, candidate.address, 3)
    assert (stats.compared, stats.mismatches) == (3, 1)
    assert proxied.stats.samples[-1]["paths"] == ["body"]


def test_a_dead_candidate_leaves_nothing_waiting(proxy, json_servers):
    """Production answers; the shadow never does: rows are given up, memory stays bounded."""
    production = json_servers()
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)  # accepts (in the kernel) and never answers
    silent = f"127.0.0.1:{listening.getsockname()[1]}"
    try:
        proxied = proxy(production.address, shadow=[silent], protocol="http",
                        shadow_linger="100ms")
        get_items(proxied, range(20))
        wait_until(lambda: proxied.stats.active == 0, what="the session ended")
        stats = proxied.stats.shadows[silent]
        wait_until(lambda: sum(stats.outcomes.values()) == 1, what="the shadow ended")
        assert (stats.compared, stats.mismatches) == (0, 0)
    finally:
        listening.close()
