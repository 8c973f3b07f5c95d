"""proxyproto.py: PROXY protocol v1/v2 headers parsed strictly, built exactly, and read off
a real socket without taking the client's first bytes."""
import socket
import struct

import gevent
import pytest
from backends import (
    received,
    recording,
    recv_exactly,
    recv_to_eof,
    sees_eof,
    wait_for_lines,
    wait_until,
)
from gevent.event import AsyncResult

from gproxyd.channel import Channel
from gproxyd.proxyproto import (
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Addresses,
    HeaderReader,
    Malformed,
    ProxyHeader,
    build,
    parse,
)

INET = socket.AF_INET
INET6 = socket.AF_INET6
UNIX = socket.AF_UNIX


def v2(command=0x21, family=0x11, body=b"", length=None) -> bytes:
    """A hand-built v2 header: version/command byte, family/transport byte, body."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", command, family, size) + body


IPV4_BODY = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + \
    struct.pack("!HH", 41000, 443)
IPV6_BODY = socket.inet_pton(INET6, "2001:db8::7") + socket.inet_pton(INET6, "2001:db8::1") + \
    struct.pack("!HH", 41000, 443)


GOOD = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\r\n",
     ProxyHeader(1, Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)), 45)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\n",
     ProxyHeader(1, Addresses(INET6, ("2001:db8::7", 41000), ("2001:db8::1", 443)), 46)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
     ProxyHeader(1, Addresses(INET, ("0.0.0.0", 0), ("255.255.255.255", 65535)), 44)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, 15)),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
     ProxyHeader(1, None, 59)),
    (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # the longest: 107 bytes
     ProxyHeader(1, None, 107)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ProxyHeader(1, Addresses(INET6, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                              ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)), 104)),
    (v2(body=IPV4_BODY),
     ProxyHeader(2, Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)), 28)),
    (v2(family=0x21, body=IPV6_BODY),
     ProxyHeader(2, Addresses(INET6, ("2001:db8::7", 41000), ("2001:db8::1", 443)), 52)),
    (v2(family=0x31, body=b"/run/a.sock".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")),
     ProxyHeader(2, Addresses(UNIX, "/run/a.sock", "/run/b"), 232)),
    # TLVs after the addresses (ALPN "h2", an AWS-style 0xEA, a NOOP) are skipped.
    (v2(body=IPV4_BODY + b"\x01\x00\x02h2" + b"\xea\x00\x05\x01vpce" + b"\x04\x00\x00"),
     ProxyHeader(2, Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)), 44)),
    (v2(command=0x20, family=0x00), ProxyHeader(2, None, 16, local=True)),
    # LOCAL: whatever follows is skipped unread, even addresses.
    (v2(command=0x20, family=0x11, body=IPV4_BODY), ProxyHeader(2, None, 28, local=True)),
    (v2(command=0x21, family=0x00), ProxyHeader(2, None, 16)),
    # The longest accepted: one TLV fills it up to V2_MAX_LENGTH.
    (v2(body=IPV4_BODY + b"\x04" + struct.pack("!H", V2_MAX_LENGTH - 31) +
        b"\0" * (V2_MAX_LENGTH - 31)),
     ProxyHeader(2, Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)),
                 V2_MAX_LENGTH)),
]


@pytest.mark.parametrize("data, expected", GOOD)
def test_good_headers_parse_and_the_bytes_after_them_are_not_counted(data, expected):
    assert parse(data) == expected
    assert parse(data + b"GET / HTTP/1.1\r\n\r\n") == expected
    version = "v1" if expected.version == 1 else "v2"
    assert parse(data, version) == expected


@pytest.mark.parametrize("data, expected", GOOD)
def test_every_proper_beginning_of_a_good_header_asks_for_more(data, expected):
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"{data[:end]!r} is not yet a header"


BAD = [
    (b"GET / HTTP/1.1\r\n", "no PROXY header: the connection began with b'GET / HTTP/1.1\\r\\n' "
                            "(expected 'PROXY ...\\r\\n' or the v2 signature)"),
    (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x00",
     "no PROXY header: the connection began with b'\\r\\n\\r\\n\\x00\\r\\nQUIX\\n!\\x11\\x00\\x00' "
     "(expected 'PROXY ...\\r\\n' or the v2 signature)"),
    (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "no PROXY header: the connection began with "
     "b'proxy TCP4 1.2.3' (expected 'PROXY ...\\r\\n' or the v2 signature)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000\r\n",
     "bad v1 PROXY header 'PROXY TCP4 192.0.2.7 198.51.100.1 41000' (expected 'PROXY "
     "TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' or 'PROXY UNKNOWN')"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 41000 443\r\n",
     "bad v1 PROXY header 'PROXY TCP4  192.0.2.7 198.51.100.1 41000 443' (expected 'PROXY "
     "TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' or 'PROXY UNKNOWN')"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 41000 443\r\n",
     "bad v1 PROXY header 'PROXY UDP4 192.0.2.7 198.51.100.1 41000 443' (expected 'PROXY "
     "TCP4|TCP6 SOURCE DESTINATION SOURCE-PORT DESTINATION-PORT' or 'PROXY UNKNOWN')"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 41000 443\r\n",
     "bad address '2001:db8::7' in v1 PROXY header 'PROXY TCP4 2001:db8::7 198.51.100.1 "
     "41000 443' (expected an IPv4 address for TCP4)"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 41000 443\r\n",
     "bad address '192.0.2.7' in v1 PROXY header 'PROXY TCP6 192.0.2.7 2001:db8::1 41000 "
     "443' (expected an IPv6 address for TCP6)"),
    (b"PROXY TCP4 192.0.2.256 198.51.100.1 41000 443\r\n",
     "bad address '192.0.2.256' in v1 PROXY header 'PROXY TCP4 192.0.2.256 198.51.100.1 "
     "41000 443' (expected an IPv4 address for TCP4)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 041000 443\r\n",
     "bad port '041000' in v1 PROXY header 'PROXY TCP4 192.0.2.7 198.51.100.1 041000 443' "
     "(expected 0-65535, no leading zeros)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 65536\r\n",
     "bad port '65536' in v1 PROXY header 'PROXY TCP4 192.0.2.7 198.51.100.1 41000 65536' "
     "(expected 0-65535, no leading zeros)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 -1\r\n",
     "bad port '-1' in v1 PROXY header 'PROXY TCP4 192.0.2.7 198.51.100.1 41000 -1' "
     "(expected 0-65535, no leading zeros)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\n",
     "v1 PROXY header with a bare CR or LF (expected one line ending in \\r\\n)"),
    (b"PROXY TCP4 192.0.2.7\r198.51.100.1 41000 443",
     "v1 PROXY header with a bare CR or LF (expected one line ending in \\r\\n)"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 4\xc3\xa9\r\n",
     "v1 PROXY header with bytes that are not ASCII"),
    (b"PROXY UNKNOWN" + b" " * 94, "v1 PROXY header without CRLF in its first 107 bytes "
                                    "(expected at most 107 bytes ending in \\r\\n)"),
    (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 655350\r\n",  # 108 bytes
     "v1 PROXY header without CRLF in its first 107 bytes (expected at most 107 bytes "
     "ending in \\r\\n)"),
    (v2(command=0x11, body=IPV4_BODY), "v2 PROXY header of version 1 (expected 2)"),
    (v2(command=0x31, body=IPV4_BODY), "v2 PROXY header of version 3 (expected 2)"),
    (v2(command=0x22, body=IPV4_BODY),
     "v2 PROXY header with command 2 (expected 0 LOCAL or 1 PROXY)"),
    (v2(family=0x41, body=IPV4_BODY), "v2 PROXY header with address family 4 (expected 0 "
                                      "UNSPEC, 1 INET, 2 INET6 or 3 UNIX)"),
    (v2(family=0x13, body=IPV4_BODY), "v2 PROXY header with transport 3 (expected 0 UNSPEC, "
                                      "1 STREAM or 2 DGRAM)"),
    (v2(family=0x12, body=IPV4_BODY), "v2 PROXY header for a datagram or unspecified "
                                      "transport (expected STREAM: this is a TCP connection)"),
    (v2(family=0x10, body=IPV4_BODY), "v2 PROXY header for a datagram or unspecified "
                                      "transport (expected STREAM: this is a TCP connection)"),
    (v2(body=IPV4_BODY[:11]), "v2 PROXY header too short for its addresses: 11 bytes after "
                              "the fixed part (expected at least 12)"),
    (v2(family=0x21, body=IPV4_BODY), "v2 PROXY header too short for its addresses: 12 bytes "
                                      "after the fixed part (expected at least 36)"),
    # Oversized: a length field past the bound is refused at once, before the body came.
    (v2(length=V2_MAX_LENGTH - 15), f"v2 PROXY header of {V2_MAX_LENGTH + 1} bytes "
                                    f"(expected at most {V2_MAX_LENGTH}: addresses and TLVs "
                                    "this long are refused)"),
    (v2(length=0xFFFF), "v2 PROXY header of 65551 bytes (expected at most "
                        f"{V2_MAX_LENGTH}: addresses and TLVs this long are refused)"),
    # A TLV whose length runs past the header's end, and one cut inside its type+length.
    (v2(body=IPV4_BODY + b"\x01\x00\x05h2"),
     "v2 PROXY header with a TLV of 5 bytes at byte 28 that overruns the header's 33 bytes"),
    (v2(body=IPV4_BODY + b"\x01\xff\xffh2"),
     "v2 PROXY header with a TLV of 65535 bytes at byte 28 that overruns the header's 33 "
     "bytes"),
    (v2(body=IPV4_BODY + b"\x01\x00"),
     "v2 PROXY header with a truncated TLV at byte 28 (expected type, 2-byte length, value)"),
]


@pytest.mark.parametrize("data, message", BAD)
def test_malformed_headers_are_refused_with_what_is_wrong(data, message):
    with pytest.raises(Malformed) as refused:
        parse(data)
    assert str(refused.value) == message


def test_a_route_that_accepts_one_version_refuses_the_other():
    with pytest.raises(Malformed, match=r"^a v2 PROXY header \(expected v1: accept-proxy = "
                                        r"v1\)$"):
        parse(v2(body=IPV4_BODY), "v1")
    with pytest.raises(Malformed, match=r"^a v1 PROXY header \(expected v2: accept-proxy = "
                                        r"v2\)$"):
        parse(b"PROXY UNKNOWN\r\n", "v2")
    with pytest.raises(Malformed, match="expected 'PROXY ...\\\\r\\\\n'\\)$"):
        parse(b"GET / HTTP/1.1\r\n", "v1")


BUILT = [
    ("v1", Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)),
     b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\r\n"),
    ("v1", Addresses(INET6, ("2001:db8::7", 41000), ("2001:db8::1", 443)),
     b"PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\n"),
    ("v1", None, b"PROXY UNKNOWN\r\n"),
    ("v1", Addresses(UNIX, "/run/a.sock", "/run/b.sock"), b"PROXY UNKNOWN\r\n"),
    ("v1", Addresses(INET, ("192.0.2.7", 41000), ("2001:db8::1", 443)), b"PROXY UNKNOWN\r\n"),
    ("v2", Addresses(INET, ("192.0.2.7", 41000), ("198.51.100.1", 443)), v2(body=IPV4_BODY)),
    ("v2", Addresses(INET6, ("2001:db8::7", 41000), ("2001:db8::1", 443)),
     v2(family=0x21, body=IPV6_BODY)),
    ("v2", Addresses(UNIX, "/run/a.sock", "/run/b"),
     v2(family=0x31, body=b"/run/a.sock".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0"))),
    ("v2", None, v2(family=0x00)),
]


@pytest.mark.parametrize("version, addresses, expected", BUILT)
def test_built_headers_are_byte_exact_and_parse_back(version, addresses, expected):
    built = build(version, addresses)
    assert built == expected
    parsed = parse(built)
    assert parsed.length == len(built)
    if expected in (b"PROXY UNKNOWN\r\n", v2(family=0x00)):
        assert parsed.addresses is None
    else:
        assert parsed.addresses == addresses


# --- reading off a socket -----------------------------------------------------------------

@pytest.fixture
def connection():
    """(client socket, Channel of the accepted end) over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
    channel = Channel(accepted)
    yield client, channel
    client.close()
    channel.close()


def read_header(channel, accept="any", timeout=5.0):
    """Run a HeaderReader to its end: (header, problem)."""
    done = AsyncResult()
    HeaderReader(channel, accept, timeout, lambda *outcome: done.set(outcome))
    return done.get(timeout=timeout + 5)


def test_the_clients_first_bytes_stay_in_the_socket_after_the_header(connection):
    client, channel = connection
    client.sendall(v2(body=IPV4_BODY + b"\x01\x00\x02h2") + b"GET / HTTP/1.1\r\n\r\n")
    header, problem = read_header(channel)
    assert problem is None
    assert header.addresses.source == ("192.0.2.7", 41000)
    channel.sock.setblocking(True)
    channel.sock.settimeout(5)
    assert channel.sock.recv(100) == b"GET / HTTP/1.1\r\n\r\n"


def test_a_header_arriving_a_few_bytes_at_a_time_is_assembled(connection):
    client, channel = connection
    data = b"PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\nhello"

    def trickle():
        for start in range(0, len(data), 3):
            client.sendall(data[start:start + 3])
            gevent.sleep(0.01)
    writer = gevent.spawn(trickle)
    header, problem = read_header(channel)
    writer.join(timeout=5)
    assert problem is None
    assert header.addresses == Addresses(INET6, ("2001:db8::7", 41000), ("2001:db8::1", 443))
    channel.sock.settimeout(5)
    received = b""
    while len(received) < 5:
        received += channel.sock.recv(100)
    assert received == b"hello"


def test_a_v2_header_with_large_tlvs_in_several_segments(connection):
    client, channel = connection
    tlv = b"\xe0" + struct.pack("!H", 3000) + bytes(range(256)) * 11 + b"x" * 184
    data = v2(body=IPV4_BODY + tlv) + b"after"
    client.sendall(data[:20])
    gevent.sleep(0.05)
    client.sendall(data[20:1500])
    gevent.sleep(0.05)
    client.sendall(data[1500:])
    header, problem = read_header(channel)
    assert problem is None and header.length == len(data) - 5
    channel.sock.settimeout(5)
    assert channel.sock.recv(100) == b"after"


@pytest.mark.parametrize("sent, problem", [
    (b"", "closed without sending a PROXY header"),
    (b"PROXY TCP4 192.0", "closed before its PROXY header was complete"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0c" + IPV4_BODY[:5],
     "closed before its PROXY header was complete"),
])
def test_a_client_that_closes_before_the_header_ends(connection, sent, problem):
    client, channel = connection
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    assert read_header(channel) == (None, problem)


@pytest.mark.parametrize("sent, problem", [
    (b"", "sent no PROXY header within connect-timeout"),
    (b"PROXY TCP4 ", "no complete PROXY header within connect-timeout"),
])
def test_a_client_that_sends_no_complete_header_in_time(connection, sent, problem):
    client, channel = connection
    client.sendall(sent)
    assert read_header(channel, timeout=0.2) == (None, problem)


def test_a_malformed_header_is_reported_without_waiting_for_more(connection):
    client, channel = connection
    client.sendall(b"GET / HTTP/1.1\r\n")
    header, problem = read_header(channel, timeout=30)
    assert header is None and problem.startswith("no PROXY header")


def test_cancel_means_no_answer(connection):
    client, channel = connection
    answers = []
    reader = HeaderReader(channel, "any", 0.05, lambda *outcome: answers.append(outcome))
    reader.cancel()
    client.sendall(b"PROXY UNKNOWN\r\n")
    gevent.sleep(0.2)
    assert answers == []


# --- a route with accept-proxy / send-proxy (an in-process Listener) -----------------------

def test_accept_proxy_the_headers_client_is_the_connections_and_bytes_after_it_pass(
        serve, proxy, caplog):
    production = serve(recording(reply_each=b""))
    shadow = serve(recording(reply_each=b""))
    proxied = proxy(production, shadow=[shadow], accept_proxy="any", send_proxy="v1",
                    shadow_send_proxy="v2")
    client = proxied.connect()
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    client.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\r\n" + request)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""
    line, = wait_for_lines(caplog)
    assert line["client"] == "192.0.2.7:41000"
    assert received(production) == b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\r\n" + \
        request
    wait_until(lambda: shadow.conns and shadow.conns[0].eof.is_set(), what="shadow EOF")
    assert received(shadow) == v2(body=IPV4_BODY) + request
    assert line["up"] == len(request), "the PROXY header is not a client byte"


@pytest.mark.parametrize("sent, problem", [
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY header: the connection began with"),
    (v2(body=IPV4_BODY + b"\x01\x00\x09h2"), "that overruns the header's"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 41000\r\nGET /", "bad v1 PROXY header"),
])
def test_accept_proxy_without_a_valid_header_closes_and_production_sees_nothing(
        serve, proxy, caplog, sent, problem):
    production = serve(recording(reply_each=None))
    proxied = proxy(production, accept_proxy="any")
    client = proxied.connect()
    client.sendall(sent)
    assert sees_eof(client, timeout=5), "closed (a FIN, or a reset: the header was unread)"
    wait_until(lambda: problem in caplog.text, what="the refusal's log line")
    warning, = [record.getMessage() for record in caplog.records if problem in
                record.getMessage()]
    assert warning.startswith("route test client 127.0.0.1:")
    assert warning.endswith("; connection closed")
    assert production.conns == [], "nothing may reach production"
    assert proxied.stats.active == 0


def test_refusals_are_logged_once_per_interval_with_a_count(servers, proxy, caplog):
    production = servers.echo()
    proxied = proxy(production, accept_proxy="v2")
    for _ in range(5):
        client = proxied.connect()
        client.sendall(b"PROXY UNKNOWN\r\n")
        assert sees_eof(client, timeout=5)
    client = proxied.connect()
    client.sendall(v2(family=0x00) + b"ping")
    assert recv_exactly(client, 4) == b"ping"
    lines = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    assert lines == [lines[0]] and "a v1 PROXY header (expected v2" in lines[0]
    assert production.conns and len(production.conns) == 1
    # each one counted, in /stats' connections and /metrics
    assert proxied.stats.refused == 5
    assert proxied.stats.snapshot()["connections"]["refused"] == 5


def test_accept_proxy_times_out_after_connect_timeout(servers, proxy, caplog):
    production = servers.echo()
    proxied = proxy(production, accept_proxy="v1", connect_timeout="200ms")
    client = proxied.connect()
    client.sendall(b"PROXY TCP4 1.2.")
    assert sees_eof(client, timeout=3)
    assert "no complete PROXY header within connect-timeout" in caplog.text
    assert production.conns == []


def test_handshakes_count_against_max_connections_and_drain_ends_them(servers, proxy):
    production = servers.echo()
    proxied = proxy(production, accept_proxy="any", max_connections=2)
    waiting = [proxied.connect() for _ in range(2)]
    gevent.sleep(0.1)
    extra = proxied.connect()
    assert sees_eof(extra, timeout=2), "a third client over max-connections stayed open"
    assert proxied.stats.rejected == 1
    proxied.listener.close()
    assert proxied.listener.drain(0.1) == 0
    for client in waiting:
        assert sees_eof(client, timeout=2)


def test_hooks_see_the_headers_client_as_conn_client(serve, proxy, caplog):
    production = serve(recording(reply_each=b""))
    seen = []

    class Watch:
        def on_connect(self, conn):
            seen.append(conn.client)

    proxied = proxy(production, accept_proxy="v2", hooks=Watch())
    client = proxied.connect()
    client.sendall(v2(family=0x21, body=IPV6_BODY) + b"hello")
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b""
    wait_for_lines(caplog)
    assert seen == ["[2001:db8::7]:41000"]
    assert received(production) == b"hello"


def test_a_header_the_connection_does_not_take_is_a_failed_connect_the_caller_hears_of():
    """send-proxy writes its header into the fresh connection in one send(); if that fails
    (here: a preamble larger than the socket buffers, to a server that never reads), the
    connect has failed, and whoever waits for it is told (it used to be left waiting)."""
    from gproxyd.settings import address
    from gproxyd.stats import BackendStats
    from gproxyd.upstream import Upstream

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stats = BackendStats()
    upstream = Upstream(address(f"127.0.0.1:{server.getsockname()[1]}"), stats, None,
                        preamble=b"x" * (64 << 20))
    told = AsyncResult()
    upstream.connect(5.0, told.set, gevent.spawn)
    error = told.get(timeout=5)
    assert isinstance(error, OSError) and "PROXY header" in str(error)
    assert upstream.channel is None and not upstream.connecting
    assert (stats.connect_failures, stats.errors) == (1, 1)
    server.close()
