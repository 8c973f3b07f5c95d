"""The dashboard in headless Chromium against a live gproxyd route with traffic.

gproxyd serves an http route (production and a candidate shadow, answers compared) in this
process; its admin endpoint is an AdminServer (the dashboard in front, as in the
daemon), and history.sample_forever samples the route every second. Chromium loads
the page once and is never told to reload: the test waits for the charts to draw, makes
the candidate slower, and waits for the later points to show it; the numbers in the
page's table must equal /stats; a screenshot is kept (GPROXYD_TEST_ARTIFACTS, else a
folder in the temporary directory). Traffic that
carries markup (a request line with <script>, a body with an onerror handler) must show
as text.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import gevent
import pytest
import requests
from chromium import Chromium
from http_backend import HTTPServer

from gproxyd.admin import AdminServer
from gproxyd.history import History, sample_forever
from gproxyd.listener import bind
from gproxyd.settings import address

SCRIPT_PATH = "/items/<script>window.pwned=1</script>"
HOSTILE_BODY = '<img src=x onerror="window.pwned=2">'


class Backend:
    """An HTTP backend answering /items/N with JSON, each answer in one write;
    `delay` (seconds) before each answer can change while it runs; `price` is what it
    says an item ending in 3 costs."""

    def __init__(self, price: int):
        self.delay = 0.0
        self.price = price
        self._server = HTTPServer(self._answer)
        self.address = self._server.address

    def _answer(self, _server, _connection, request: bytes) -> bytes:
        if self.delay:
            gevent.sleep(self.delay)
        path = request.split(b" ", 2)[1].decode()
        if "script" in path:  # markup in the answer, which differs between the two sides
            document = {"note": HOSTILE_BODY, "price": self.price}
        else:
            item = path.rsplit("/", 1)[-1]
            # Items ending in 3 cost more on the candidate: answers that differ.
            document = {"id": item, "price": self.price if item.endswith("3") else 10}
        body = json.dumps(document).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def stop(self):
        self._server.stop()


class Stack:
    """Production, the candidate, the route, its admin endpoint with the dashboard, the
    history sampler, and a client sending requests."""

    def __init__(self, proxy):
        self.production = Backend(price=10)
        self.candidate = Backend(price=11)
        self.route = proxy(self.production.address, shadow=[self.candidate.address],
                           protocol="http")
        self.name = self.route.route.name
        source = lambda: {self.name: self.route.stats}  # noqa: E731
        self.history = History()
        self.sampler = gevent.spawn(sample_forever, self.history, source)
        listening = bind(address("127.0.0.1:0", lowest_port=0))
        self.admin = AdminServer(address(f"127.0.0.1:{listening.getsockname()[1]}"), source,
                                 listening, history=self.history)
        self.admin.start()
        self.url = f"http://{self.admin.address}/"
        self.session = requests.Session()
        self.sent = 0
        self._sending = False
        self._client: gevent.Greenlet | None = None

    def start_traffic(self, rate: float = 80.0) -> None:
        self._sending = True

        def send():
            while self._sending:
                self.get(f"/items/{self.sent}")
                gevent.sleep(1 / rate)
        self._client = gevent.spawn(send)

    def stop_traffic(self) -> None:
        """After the request in flight, if any: killed in the middle of one, the client
        would not count a request that production answered and /stats counts."""
        if self._client is not None:
            self._sending = False
            self._client.join(timeout=10)
            self._client.kill()
            self._client = None

    def get(self, path: str) -> None:
        host, port = self.route.sockaddr
        response = self.session.get(f"http://{host}:{port}{path}", timeout=5)
        assert response.status_code == 200
        self.sent += 1

    def send_raw(self, request_line: str) -> bytes:
        """One request whose request line goes out exactly as written."""
        with socket.create_connection(self.route.sockaddr, timeout=5) as sock:
            sock.sendall(f"{request_line}\r\nHost: test\r\n\r\n".encode())
            sock.shutdown(socket.SHUT_WR)  # the backend closes once it has answered
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        return b"".join(chunks)

    def stats(self) -> dict:
        return requests.get(self.url + "stats", timeout=5).json()

    def stop(self) -> None:
        self.stop_traffic()
        self.sampler.kill()
        self.admin.stop()
        self.production.stop()
        self.candidate.stop()


@pytest.fixture
def stack(proxy):
    made = Stack(proxy)
    yield made
    made.stop()


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium"
    profile.mkdir()
    started = Chromium(str(profile))
    yield started
    started.close()


def artifacts() -> Path:
    folder = Path(os.environ.get("GPROXYD_TEST_ARTIFACTS")
                  or Path(tempfile.gettempdir()) / "gproxyd-test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# What the page shows, read in the page.
SERIES = """(() => {
  const found = {};
  for (const path of document.querySelectorAll('svg[data-chart="latency"] path.line')) {
    const values = path.dataset.values.split(" ").filter(v => v !== "").map(
      v => v === "-" ? null : Number(v));
    const ys = [...path.getAttribute("d").matchAll(/[ML]([-\\d.]+) ([-\\d.]+)/g)].map(
      m => Number(m[2]));
    found[path.dataset.backend + " " + path.dataset.metric] = {values, ys};
  }
  return found;
})()"""

TABLE = """(() => {
  const rows = {};
  for (const row of document.querySelectorAll("table.numbers tbody tr")) {
    const cells = {};
    for (const cell of row.querySelectorAll("td[data-field]")) {
      cells[cell.dataset.field] = cell.textContent;
    }
    rows[row.dataset.backend] = cells;
  }
  return rows;
})()"""


def test_live_dashboard_draws_both_sides_and_shows_a_slower_candidate(stack, browser):
    candidate = stack.candidate.address
    stack.start_traffic()
    # Two complete seconds of traffic in the history before the page opens.
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until:
        gevent.sleep(0.2)
        points = stack.history.document(time.time(), 60)["routes"].get(stack.name, {})
        if all(sum(1 for point in points.get(side, {}).get("points", [])
                   if point["requests"]) >= 2 for side in ("production", candidate)):
            break
    browser.open(stack.url)
    drawn = browser.wait_for(
        f"(() => {{ const s = {SERIES}; const p = s['production p99'], "
        f"c = s['{candidate} p99']; return p && c && p.values.filter(v => v !== null)"
        f".length >= 2 && c.values.filter(v => v !== null).length >= 2 && s; }})()",
        what="production and candidate latency series drawn")
    for metric in ("p50", "p99"):
        for backend in ("production", candidate):
            series = drawn[f"{backend} {metric}"]
            assert len(series["ys"]) == len([v for v in series["values"] if v is not None])
    fast = [v for v in drawn[f"{candidate} p50"]["values"] if v is not None]
    assert max(fast) < 15, fast
    opened = browser.evaluate("performance.timeOrigin")

    stack.candidate.delay = 0.03  # 30 ms more for every candidate answer from now on
    slow = browser.wait_for(
        f"(() => {{ const c = {SERIES}['{candidate} p50']; const v = c.values.filter("
        f"v => v !== null); return v.length && v[v.length - 1] > 25 && c; }})()",
        timeout=15, what="the slower candidate in the chart's later points")
    assert browser.evaluate("performance.timeOrigin") == opened  # the same page, not reloaded
    values = [v for v in slow["values"] if v is not None]
    assert values[0] < 15 and values[-1] > 25, values
    # Drawn as it reads: the later point is higher up the chart (smaller y).
    assert slow["ys"][-1] < slow["ys"][0]
    production = [v for v in browser.evaluate(SERIES)["production p50"]["values"] if v]
    assert production[-1] < 15, production  # production did not change

    stack.stop_traffic()
    gevent.sleep(1.5)  # the candidate's last answers arrive

    def page_equals_stats():
        numbers = stack.stats()["routes"][stack.name]
        table = browser.evaluate(TABLE)
        expected = {}
        for backend, side in (("production", numbers["production"]),
                              *numbers["shadows"].items()):
            row = {"requests": str(side["requests"]), "errors": str(side["errors"]),
                   "p50": f"{side['latency_ms']['p50']:.2f}",
                   "p99": f"{side['latency_ms']['p99']:.2f}"}
            if backend != "production":
                row.update(dropped=str(side["dropped"]), mismatches=str(side["mismatches"]))
            expected[backend] = row
        shown = {backend: {field: cells.get(field) for field in row}
                 for backend, cells in table.items()
                 for row in [expected.get(backend, {})]}
        return shown == expected and int(expected[candidate]["mismatches"]) > 0 and table

    deadline = time.monotonic() + 10
    while not page_equals_stats():
        assert time.monotonic() < deadline, (browser.evaluate(TABLE), stack.stats())
        gevent.sleep(0.3)
    requests_shown = int(browser.evaluate(TABLE)["production"]["requests"])
    assert requests_shown == stack.sent
    verdict = browser.evaluate(
        f"document.querySelector('li.verdict[data-backend=\"{candidate}\"]').textContent")
    assert "answers differ" in verdict, verdict
    top_paths = browser.evaluate("document.querySelector('.paths ol').textContent")
    assert "$.price" in top_paths

    picture = artifacts() / "dashboard.png"
    browser.screenshot(str(picture))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    print(f"screenshot: {picture}")


def test_markup_in_traffic_shows_as_text(stack, browser):
    answer = stack.send_raw(f"GET {SCRIPT_PATH} HTTP/1.1")
    assert b"onerror" in answer  # production's answer carries the markup to the client
    for number in range(30):
        stack.get(f"/items/{number}")
    browser.open(stack.url)
    shown = browser.wait_for(
        "[...document.querySelectorAll('code.request')].map(c => c.textContent)"
        ".find(t => t.includes('script')) || ''", what="the mismatch with <script> shown")
    assert f"GET {SCRIPT_PATH} HTTP/1.1" in shown
    # The page holds text, not elements: the only script is the dashboard's own, no
    # image was made from the body, and nothing from the traffic ran.
    assert browser.evaluate("[...document.scripts].map(s => s.src)") == \
        [stack.url + "dashboard/app.js"]
    assert browser.evaluate("document.images.length") == 0
    assert browser.evaluate("typeof window.pwned") == "undefined"
    bodies = browser.evaluate(
        "[...document.querySelectorAll('.mismatch pre')].map(p => p.textContent).join('\\n')")
    assert HOSTILE_BODY.replace('"', '\\"') in bodies
    assert browser.evaluate("document.querySelectorAll('.mismatch img, .mismatch script')"
                            ".length") == 0
