"""transparent.py and the transparent-mode / PROXY protocol options: config values and the
exact errors for what cannot work, a connection's endpoints from its socket or its PROXY
header, the loop check, the refusal log. (The kernel side, REDIRECT and TPROXY, is in
tests/integration/test_transparent_daemon.py.)"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
from pathlib import Path

import backends
import pytest

from gproxyd import transparent
from gproxyd.config import ConfigError, load_config, make_route
from gproxyd.proxyproto import Addresses, parse
from gproxyd.settings import ORIGINAL_DST, address
from gproxyd.transparent import RefusalLog, Refused, endpoints, loops

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROUTE = "[gproxyd]\nadmin = off\n\n[route web]\nlisten = 127.0.0.1:8080\n"


def load(tmp_path, text: str):
    path = tmp_path / "gproxyd.conf"
    path.write_text(ROUTE + text)
    return load_config(str(path), [], {})


GOOD = [
    ("production = original-dst\n", {"production": ORIGINAL_DST, "source": None,
                                     "accept_proxy": "off", "send_proxy": "off",
                                     "listen_transparent": False}),
    ("production = ORIGINAL-DST\nsource = client\nlisten-transparent = yes\n",
     {"production": ORIGINAL_DST, "source": "client", "listen_transparent": True}),
    ("production = 127.0.0.1:81\nsource = 127.0.0.1\n", {"source": "127.0.0.1"}),
    ("production = [::1]:81\nsource = [::1]\n", {"source": "::1"}),
    ("production = 127.0.0.1:81\nsource = off\n", {"source": None}),
    ("production = 127.0.0.1:81\naccept-proxy = any\nsend-proxy = v2\n"
     "shadow-send-proxy = v1\nshadow = 127.0.0.1:82\n",
     {"accept_proxy": "any", "send_proxy": "v2", "shadow_send_proxy": "v1"}),
    ("listen = unix:/tmp/gpx-web.sock\nproduction = original-dst\naccept-proxy = v2\n"
     "source = client\n", {"production": ORIGINAL_DST}),
]


@pytest.mark.parametrize("text, expected", GOOD)
def test_good_values(tmp_path, text, expected):
    if "listen =" in text:
        path = tmp_path / "gproxyd.conf"
        path.write_text("[gproxyd]\nadmin = off\n\n[route web]\n" + text)
        route, = load_config(str(path), [], {}).routes
    else:
        route, = load(tmp_path, text).routes
    for attr, value in expected.items():
        assert getattr(route, attr) == value, attr


BAD = [
    ("production = 127.0.0.1:81\naccept-proxy = v3\n",
     "accept-proxy: bad value 'v3' (expected one of: off, v1, v2, any)"),
    ("production = 127.0.0.1:81\nsend-proxy = any\n",
     "send-proxy: bad value 'any' (expected one of: off, v1, v2)"),
    ("production = 127.0.0.1:81\nsource = clients\n",
     "source: bad source 'clients' (expected off, client, or an IP address such as "
     "10.0.0.2)"),
    ("production = original-dest\n",
     "production: bad address 'original-dest' (expected host:port, [ipv6]:port or "
     "unix:/path)"),
    ("production = unix:/tmp/app.sock\nsource = client\n",
     "source: a unix socket connection has no source address (expected source = off with "
     "a unix:/path production)"),
    ("production = backend.example:80\nsource = client\n",
     "source: production backend.example:80 is a host name, which may resolve to another "
     "IP version than the source (expected production as an IP address, or original-dst)"),
    ("production = [::1]:81\nsource = 127.0.0.1\n",
     "source: 127.0.0.1 and production [::1]:81 are not the same IP version (expected a "
     "source address of production's family)"),
    ("production = 127.0.0.1:81\nsource = 192.0.2.77\n",
     "source: 192.0.2.77 is not an address of this host (expected one of its addresses, "
     "or source = client)"),
]

UNIX_BAD = [
    ("production = original-dst\n",
     "production: original-dst: a unix socket's clients dialled nothing else (expected a "
     "TCP listen address, or accept-proxy to take the destination from the PROXY header)"),
    ("production = 127.0.0.1:81\nlisten-transparent = yes\n",
     "listen-transparent: TPROXY diverts TCP connections (expected a TCP listen address "
     "with listen-transparent)"),
    ("production = 127.0.0.1:81\nsource = client\n",
     "source: a unix socket's clients have no IP address to connect from (expected a TCP "
     "listen address, or accept-proxy to take the client's address from the PROXY header)"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_values_name_the_key_and_what_was_expected(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, text)
    assert str(error.value).split(": ", 1)[1] == message


@pytest.mark.parametrize("text, message", UNIX_BAD)
def test_what_a_unix_listener_cannot_do(tmp_path, text, message):
    path = tmp_path / "gproxyd.conf"
    path.write_text("[gproxyd]\nadmin = off\n\n[route web]\nlisten = unix:/tmp/gpx-web.sock\n"
                    + text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path), [], {})
    assert str(error.value) == f"{path}:{6 if 'production: ' in message else 7}: {message}"


@pytest.mark.parametrize("name", ["transparent.conf", "proxy-protocol.conf"])
def test_the_example_configs_load(name):
    config = load_config(str(EXAMPLES / name), [], {})
    assert config.routes


# --- endpoints ----------------------------------------------------------------------------

@pytest.fixture
def accepted():
    """(client socket, accepted socket, its peer address) over loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        sock, peer = server.accept()
    yield client, sock, peer
    client.close()
    sock.close()


def test_endpoints_from_the_socket(accepted):
    client, sock, peer = accepted
    route = make_route(listen="127.0.0.1:0", production="127.0.0.1:9", send_proxy="v2")
    found = endpoints(route, sock, peer, None)
    assert found.client == f"127.0.0.1:{client.getsockname()[1]}"
    assert found.client_ip == "127.0.0.1"
    assert found.addresses == Addresses(socket.AF_INET, client.getsockname(),
                                        client.getpeername())
    assert found.production is None
    assert parse(found.proxy_header("v2")).addresses == found.addresses


def test_endpoints_from_a_header_and_original_dst_from_its_destination(accepted):
    _, sock, peer = accepted
    route = make_route(listen="127.0.0.1:0", production="original-dst", accept_proxy="v1",
                       source="client")
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\n")
    found = endpoints(route, sock, peer, header)
    assert (found.client, found.client_ip) == ("[2001:db8::7]:41000", "2001:db8::7")
    assert found.production == address("[2001:db8::1]:443")
    assert found.proxy_header("v1") == b"PROXY TCP6 2001:db8::7 2001:db8::1 41000 443\r\n"


def test_a_header_without_addresses_leaves_the_sockets(accepted):
    client, sock, peer = accepted
    route = make_route(listen="127.0.0.1:0", production="127.0.0.1:9", accept_proxy="any")
    found = endpoints(route, sock, peer, parse(b"PROXY UNKNOWN\r\n"))
    assert found.client == f"127.0.0.1:{client.getsockname()[1]}"


def test_original_dst_without_a_redirect_is_refused(accepted):
    _, sock, peer = accepted
    route = make_route(listen="127.0.0.1:0", production="original-dst")
    with pytest.raises(Refused) as refused:
        endpoints(route, sock, peer, None)
    # Loopback without a NAT rule: no conntrack entry, or one pointing at the listener.
    assert str(refused.value).startswith("production = original-dst: ")


def test_original_dst_that_is_the_listen_address_is_a_loop(accepted):
    _, sock, peer = accepted
    route = make_route(listen="0.0.0.0:8080", production="original-dst", accept_proxy="v1")
    header = parse(b"PROXY TCP4 192.0.2.7 127.0.0.1 41000 8080\r\n")
    with pytest.raises(Refused, match=r"^production = original-dst: the client dialled "
                                      r"127\.0\.0\.1:8080, gproxyd's own listen address "
                                      r"0\.0\.0\.0:8080, which would loop"):
        endpoints(route, sock, peer, header)


@pytest.mark.parametrize("destination, listen, expected", [
    (("127.0.0.1", 8080), "127.0.0.1:8080", True),
    (("127.0.0.1", 8080), "0.0.0.0:8080", True),      # wildcard: any address of this host
    (("127.0.0.2", 8080), "0.0.0.0:8080", True),      # all of 127/8 is this host's
    (("192.0.2.7", 8080), "0.0.0.0:8080", False),     # another host's
    (("127.0.0.1", 8081), "0.0.0.0:8080", False),     # another port
    (("::1", 8080), "[::]:8080", True),
    (("::ffff:127.0.0.1", 8080), "127.0.0.1:8080", True),
    (("2001:db8::1", 8080), "[::]:8080", False),
    (("127.0.0.1", 8080), "localhost:8080", True),
    (("192.0.2.7", 8080), "localhost:8080", False),
    (("127.0.0.1", 8080), "unix:/run/x.sock", False),
])
def test_loops(destination, listen, expected):
    assert loops(destination, address(listen)) is expected


def test_refusals_are_logged_once_an_interval_with_how_many_since(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="gproxyd")
    now = [1000.0]
    monkeypatch.setattr(transparent.time, "monotonic", lambda: now[0])
    refusals = RefusalLog(every=10)
    for second in range(25):
        now[0] = 1000.0 + second
        refusals.add("web", f"192.0.2.7:{second}", "no PROXY header")
    assert [record.getMessage() for record in caplog.records] == [
        "route web client 192.0.2.7:0: no PROXY header; connection closed",
        "route web client 192.0.2.7:10: no PROXY header; connection closed (9 more refused "
        "since the last such line)",
        "route web client 192.0.2.7:20: no PROXY header; connection closed (9 more refused "
        "since the last such line)",
    ]


def test_gproxyctl_config_shows_the_options_as_they_are_written(tmp_path):
    from gproxyd.config import effective_text
    config = load(tmp_path, "production = original-dst\nsource = client\n")
    text = effective_text(config)
    assert "production = original-dst\n" in text
    assert "source = client\n" in text
    assert "accept-proxy = off" in text and "listen-transparent = no" in text
    default = effective_text(load(tmp_path, "production = 127.0.0.1:81\n"))
    assert "source = off" in default
    again = tmp_path / "again.conf"
    again.write_text(text)
    reread, = load_config(str(again), [], {}).routes
    assert dataclasses.replace(reread, where="") == dataclasses.replace(config.routes[0],
                                                                        where="")


# --- source (in-process, over loopback: all of 127/8 is this host's) -----------------------

def peers_of(serve):
    """A backend that records each connection's peer address and echoes."""
    peers = []

    def handle(conn):
        peers.append(conn.sock.getpeername()[:2])
        backends.echo(conn)
    return serve(handle), peers


def test_source_address_binds_production_connections_to_it(serve, proxy):
    production, peers = peers_of(serve)
    proxied = proxy(production, source="127.0.0.2")
    client = proxied.connect()
    client.sendall(b"ping")
    assert backends.recv_exactly(client, 4) == b"ping"
    assert peers[0][0] == "127.0.0.2"


def test_source_client_connects_from_the_proxy_headers_client(serve, proxy):
    """accept-proxy names the client 127.0.0.5; source = client connects production
    from there (IP_TRANSPARENT, allowed to root)."""
    assert os.getuid() == 0, "IP_TRANSPARENT needs CAP_NET_ADMIN: run the tests as root"
    production, peers = peers_of(serve)
    proxied = proxy(production, accept_proxy="v1", source="client", send_proxy="v1")
    client = proxied.connect()
    client.sendall(b"PROXY TCP4 127.0.0.5 127.0.0.1 41000 80\r\nping")
    header = b"PROXY TCP4 127.0.0.5 127.0.0.1 41000 80\r\n"
    assert backends.recv_exactly(client, len(header) + 4) == header + b"ping"
    assert peers[0][0] == "127.0.0.5"
