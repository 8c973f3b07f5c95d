"""`gproxyctl stats --watch` reads per-interval percentiles from /stats/history: a shadow
that became slow a moment ago shows slow there while its since-start p50 is still fast;
against an endpoint without /stats/history it shows the since-start table as before."""
from __future__ import annotations

import re

import gevent
import pytest
from http_backend import OK, HTTPServer

from gproxyd import ctl
from gproxyd.admin import AdminServer
from gproxyd.history import History, sample_forever
from gproxyd.listener import bind
from gproxyd.settings import address


class Slowable:
    """An HTTP backend whose answers can be made to wait."""

    def __init__(self):
        self.delay = 0.0
        self.server = HTTPServer(self._answer)
        self.address = self.server.address

    def _answer(self, _server, _connection, _request):
        if self.delay:
            gevent.sleep(self.delay)
        return OK


@pytest.fixture
def endpoint(proxy):
    """endpoint(with_history) -> (route, shadow, admin address); traffic runs meanwhile."""
    started = []

    def start(with_history: bool):
        production, shadow = HTTPServer(), Slowable()
        route = proxy(production.address, shadow=[shadow.address], protocol="http")
        source = lambda: {"web": route.stats}  # noqa: E731
        listening = bind(address("127.0.0.1:0", lowest_port=0))
        history = History()
        admin = AdminServer(address(f"127.0.0.1:{listening.getsockname()[1]}"), source,
                            listening, history=history if with_history else None)
        admin.start()

        def send():
            with route.connect() as sock:
                while True:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = b""
                    while not answer.endswith(b"ok\n"):
                        answer += sock.recv(4096)
                    gevent.sleep(0.005)

        greenlets = [gevent.spawn(send), gevent.spawn(sample_forever, history, source)]
        started.append((greenlets, admin, production, shadow))
        return route, shadow, admin.address

    yield start
    for greenlets, admin, production, shadow in started:
        gevent.killall(greenlets)
        admin.stop()
        production.stop()
        shadow.server.stop()


def rows(output: str) -> dict[str, list[str]]:
    """The last table's rows: backend -> its columns."""
    last = output[output.rindex("route web:"):]
    return {line.split()[0]: line.split()[1:] for line in last.splitlines()
            if re.match(r"  (production|127\.)", line)}


def test_watch_shows_the_last_seconds_percentiles(endpoint, capsys):
    route, shadow, admin = endpoint(with_history=True)
    gevent.sleep(3)  # a few hundred fast requests
    shadow.delay = 0.05
    gevent.sleep(2.1)  # at least one whole second of slow answers sampled
    status = ctl.main(["stats", "--watch", "--count", "1", "--interval", "0.2",
                       "--admin", str(admin)])
    output = capsys.readouterr().out
    assert status == 0
    assert "p50 and p99 of the last second's requests" in output
    table = rows(output)
    rate, requests, p50, p99 = table[shadow.address][:4]
    assert float(p50) > 40, output  # the last interval: slow
    since_start = route.stats.shadows[shadow.address].latency.percentile(0.5) * 1e3
    assert since_start < 10  # since start: still fast, what --watch showed before
    assert float(rate) > 0 and float(table["production"][2]) < 10


def test_watch_against_an_endpoint_without_history(endpoint, capsys):
    route, shadow, admin = endpoint(with_history=False)
    gevent.sleep(0.5)
    shadow.delay = 0.05
    gevent.sleep(0.5)
    status = ctl.main(["stats", "--watch", "--count", "2", "--interval", "0.2",
                       "--admin", str(admin)])
    output = capsys.readouterr().out
    assert status == 0
    assert output.count("route web:") == 2
    assert "last second's" not in output
    p50 = float(rows(output)[shadow.address][2])
    since_start = route.stats.shadows[shadow.address].latency.percentile(0.5) * 1e3
    assert p50 < 10 and abs(p50 - since_start) < 1  # the since-start percentile, as before
