"""gproxyd.dashboard: who may ask (admin-allow, admin-token), the token file, and what
the page, its assets, /stats/history and the summary answer."""
from __future__ import annotations

import ipaddress
import json

import pytest

from gproxyd import dashboard
from gproxyd.dashboard import REFUSED, TOKEN_COOKIE, TokenError, allowed, handle, read_token
from gproxyd.history import History
from gproxyd.stats import RouteStats

TOKEN = "0123456789abcdef0123456789abcdef"
TEN = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize("peer, headers, allow, token, path, query, expected", [
    # loopback and unix sockets: always, with or without a token
    ("127.0.0.1", {}, (), TOKEN, "/stats", "", True),
    ("127.8.9.1", {}, (), "", "/stats", "", True),
    ("::1", {}, (), TOKEN, "/stats", "", True),
    ("::ffff:127.0.0.1", {}, (), TOKEN, "/stats", "", True),
    ("", {}, (), TOKEN, "/stats", "", True),
    # others: only from admin-allow's networks
    ("10.1.2.3", {}, (), "", "/stats", "", False),
    ("10.1.2.3", {}, TEN, "", "/stats", "", True),
    ("::ffff:10.1.2.3", {}, TEN, "", "/stats", "", True),
    ("fd00::5", {}, TEN, "", "/metrics", "", True),
    ("192.168.1.1", {}, TEN, "", "/stats", "", False),
    ("fe80::1%eth0", {}, TEN, "", "/stats", "", False),
    ("not-an-address", {}, TEN, "", "/stats", "", False),
    # ... and with a token, presenting it
    ("10.1.2.3", {}, TEN, TOKEN, "/stats", "", False),
    ("10.1.2.3", {"authorization": f"Bearer {TOKEN}"}, TEN, TOKEN, "/stats", "", True),
    ("10.1.2.3", {"authorization": f"bearer  {TOKEN} "}, TEN, TOKEN, "/stats", "", True),
    ("10.1.2.3", {"authorization": f"Basic {TOKEN}"}, TEN, TOKEN, "/stats", "", False),
    ("10.1.2.3", {"authorization": "Bearer wrong-token-wrong-token"}, TEN, TOKEN, "/stats",
     "", False),
    ("10.1.2.3", {"authorization": "Bearer ünïcode"}, TEN, TOKEN, "/stats", "", False),
    ("10.1.2.3", {"cookie": f"a=b; {TOKEN_COOKIE}={TOKEN}"}, TEN, TOKEN, "/stats", "", True),
    ("10.1.2.3", {"cookie": f"{TOKEN_COOKIE}=x"}, TEN, TOKEN, "/stats", "", False),
    ("10.1.2.3", {}, TEN, TOKEN, "/", f"token={TOKEN}", True),
    ("10.1.2.3", {}, TEN, TOKEN, "/stats", f"token={TOKEN}", False),  # the page only
    ("10.1.2.3", {}, TEN, TOKEN, "/healthz", "", True),  # load balancers need no token
    ("192.168.1.1", {}, TEN, TOKEN, "/healthz", "", False),  # but admin-allow still holds
])
def test_allowed(peer, headers, allow, token, path, query, expected):
    assert allowed(peer, headers, allow, token, path, query) is expected


@pytest.mark.parametrize("content, error", [
    (f"{TOKEN}\n", None),
    (f"  {TOKEN}  \n", None),
    ("short\n", "expected one line of at least 16"),
    (f"{TOKEN}\n{TOKEN}\n", "expected one line of at least 16"),
    ("", "expected one line of at least 16"),
    ("has spaces in it, sixteen+\n", "expected one line of at least 16"),
])
def test_read_token(tmp_path, content, error):
    path = tmp_path / "admin.token"
    path.write_text(content)
    if error is None:
        assert read_token(str(path)) == TOKEN
    else:
        with pytest.raises(TokenError) as raised:
            read_token(str(path))
        assert str(raised.value) == (
            f"admin-token: {path}: expected one line of at least 16 letters, digits or "
            ". _ ~ + / = - (e.g. from 'openssl rand -hex 32')")


def test_read_token_unreadable_and_none(tmp_path):
    assert read_token("") == ""
    missing = tmp_path / "missing"
    with pytest.raises(TokenError) as raised:
        read_token(str(missing))
    assert str(raised.value) == (f"admin-token: cannot read {missing}: No such file or "
                                 "directory (it must be readable by gproxyd's user)")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff" * 32)
    with pytest.raises(TokenError):
        read_token(str(binary))


def source():
    stats = RouteStats()
    for _ in range(30):
        stats.production.record(0.001)
        stats.shadow("127.0.0.1:8082").record(0.002)
    stats.shadow("127.0.0.1:8082").compared = 30
    stats.shadow("127.0.0.1:8082").mismatches = 3
    return {"web": stats}


@pytest.mark.parametrize("path, kind", [
    ("/", "text/html; charset=utf-8"),
    ("/index.html", "text/html; charset=utf-8"),
    ("/dashboard/app.js", "text/javascript; charset=utf-8"),
    ("/dashboard/style.css", "text/css; charset=utf-8"),
])
def test_page_and_assets(path, kind):
    status, headers, body = handle(path, "", source, History())
    headers = dict(headers)
    assert status == "200 OK" and headers["Content-Type"] == kind
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body


def test_the_page_loads_nothing_from_elsewhere():
    """No CDN: every script, style and fetch is relative to the endpoint itself."""
    _, _, page = handle("/", "", source, History())
    _, _, script = handle("/dashboard/app.js", "", source, History())
    text = page.decode() + script.decode()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "//cdn" not in text
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text


def test_token_in_the_address_becomes_a_cookie():
    status, headers, _ = handle("/", f"token={TOKEN}", source, History())
    assert status == "303 See Other"
    headers = dict(headers)
    assert headers["Location"] == "/"
    assert headers["Set-Cookie"] == (f"{TOKEN_COOKIE}={TOKEN}; Path=/; HttpOnly; "
                                     "SameSite=Strict")


def test_history_and_summary():
    history = History()
    history.sample(1000.0, source())
    status, _, body = handle("/stats/history", "route=web&since=60", source, history,
                             now=lambda: 1001.0)
    assert status == "200 OK"
    document = json.loads(body)
    assert document["step"] == 1.0 and set(document["routes"]["web"]) == {
        "production", "127.0.0.1:8082"}
    assert handle("/stats/history", "route=api", source, history)[0] == "404 Not Found"
    assert handle("/stats/history", "since=x", source, history)[0] == "400 Bad Request"
    assert handle("/stats/history", "", source, None) is None  # the endpoint says 404
    status, _, body = handle("/dashboard/summary.json", "", source, history)
    shadow = json.loads(body)["routes"]["web"]["shadows"]["127.0.0.1:8082"]
    assert shadow["requests"] == 30
    assert "10.0% of answers differ" in shadow["verdict"]
    assert handle("/stats", "", source, history) is None
    assert handle("/nothing", "", source, history) is None


def test_summary_is_the_stats_text_it_is_given():
    text = json.dumps({"routes": {"web": {
        "production": {"requests": 0, "errors": 0, "latency_ms": {"p99": 0}},
        "shadows": {"s": {"requests": 0, "errors": 0, "timeouts": 0,
                          "latency_ms": {"p99": 0}}}}}}).encode()
    status, _, body = handle("/dashboard/summary.json", "", source, History(),
                             stats_json=lambda: text)
    assert json.loads(body)["routes"]["web"]["shadows"]["s"]["verdict"] == \
        "not enough requests yet to compare"


def call(app, peer: str, path: str, method: str = "GET", **headers):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "",
               "REMOTE_ADDR": peer, **{f"HTTP_{key.upper()}": value
                                       for key, value in headers.items()}}
    answered = {}

    def start_response(status, response_headers):
        answered.update(status=status, headers=dict(response_headers))
    body = b"".join(app(environ, start_response))
    return answered["status"], answered["headers"], body


def test_middleware_checks_then_answers_or_passes_on():
    passed = []

    def admin(environ, start_response):
        passed.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"admin\n"]

    access = {"value": (TEN, TOKEN)}
    app = dashboard.middleware(admin, source, History(), access=lambda: access["value"])
    assert call(app, "127.0.0.1", "/stats")[2] == b"admin\n"
    status, headers, body = call(app, "10.1.2.3", "/stats")
    assert (status, body) == (REFUSED[0], REFUSED[2])
    assert call(app, "10.1.2.3", "/stats", authorization=f"Bearer {TOKEN}")[2] == b"admin\n"
    status, headers, body = call(app, "10.1.2.3", "/", authorization=f"Bearer {TOKEN}")
    assert status == "200 OK" and b"<html" in body
    assert headers["Content-Length"] == str(len(body))
    assert call(app, "192.168.0.9", "/", authorization=f"Bearer {TOKEN}")[0] == REFUSED[0]
    assert call(app, "127.0.0.1", "/", method="POST")[2] == b"admin\n"  # admin says 405
    access["value"] = (TEN, "")  # a reload took the token away
    assert call(app, "10.1.2.3", "/stats")[2] == b"admin\n"
    assert passed == ["/stats", "/stats", "/", "/stats"]
