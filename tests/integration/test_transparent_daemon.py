"""Transparent mode with the installed gproxyd, in network namespaces the tests create:

    client ns (10.77.1.2, fd77:1::2) -- gateway ns (gproxyd) -- server ns (10.77.2.2, fd77:2::2)

The client dials the server's address; rules in the gateway (nftables or iptables,
REDIRECT or TPROXY) divert the connection to gproxyd, which relays it to where the client
was going (production = original-dst) from the client's own address (source = client),
and mirrors it to a shadow from the config. gproxyd runs as nobody: CAP_NET_ADMIN must
survive the privilege drop. Whatever the kernel lacks makes a test fail, saying what.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager

import pytest
from gevent.event import Event
from gevent.server import StreamServer
from service import Daemon, NotifySocket, send_and_read_to_eof, wait_until

CLIENT_V4, GATEWAY_V4, SERVER_V4 = "10.77.1.2", "10.77.1.1", "10.77.2.2"
CLIENT_V6, GATEWAY_V6, SERVER_V6 = "fd77:1::2", "fd77:1::1", "fd77:2::2"
PRODUCTION_PORT, SHADOW_PORT, REDIRECT_PORT, TPROXY_PORT = 8000, 9000, 15001, 15002
_CLONE_NEWNET = 0x40000000


def run(*command: str, stdin: str | None = None) -> None:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{' '.join(command)} failed (the kernel or the tools " \
                                   f"lack something transparent mode needs): " \
                                   f"{result.stderr.strip() or result.stdout.strip()}"


class Namespaces:
    """Three namespaces joined by two veth pairs; the gateway routes between them."""

    def __init__(self, tag: str):
        self.client, self.gateway, self.server = (f"gpx{tag}{role}" for role in "cgs")

    def create(self) -> None:
        for tool in ("ip", "nft", "iptables", "ip6tables"):
            assert shutil.which(tool), f"{tool} is not installed (.ci/install-system-deps " \
                                       "installs iproute2, nftables and iptables)"
        for name in (self.client, self.gateway, self.server):
            run("ip", "netns", "add", name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        for ns, near, far, net in ((self.client, "c0", "g1", 1), (self.server, "s0", "g2", 2)):
            run("ip", "link", "add", near, "netns", ns, "type", "veth", "peer", "name", far,
                "netns", self.gateway)
            run("ip", "-n", ns, "addr", "add", f"10.77.{net}.2/24", "dev", near)
            run("ip", "-n", ns, "addr", "add", f"fd77:{net}::2/64", "dev", near, "nodad")
            run("ip", "-n", ns, "link", "set", near, "up")
            run("ip", "-n", ns, "route", "add", "default", "via", f"10.77.{net}.1")
            run("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd77:{net}::1")
            run("ip", "-n", self.gateway, "addr", "add", f"10.77.{net}.1/24", "dev", far)
            run("ip", "-n", self.gateway, "addr", "add", f"fd77:{net}::1/64", "dev", far,
                "nodad")
            run("ip", "-n", self.gateway, "link", "set", far, "up")
        run("ip", "netns", "exec", self.gateway, "sysctl", "-qw", "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1", "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0")
        # The policy routing every transparent setup needs: packets marked 1 (answers to
        # gproxyd's IP_TRANSPARENT sockets, TPROXY-diverted connections) are delivered
        # locally, whatever their destination address.
        for version in ("-4", "-6"):
            run("ip", "-n", self.gateway, version, "rule", "add", "fwmark", "1", "lookup",
                "100")
            run("ip", "-n", self.gateway, version, "route", "add", "local",
                "0.0.0.0/0" if version == "-4" else "::/0", "dev", "lo", "table", "100")

    def delete(self) -> None:
        for name in (self.client, self.gateway, self.server):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    def in_gateway(self, *command: str, stdin: str | None = None) -> None:
        run("ip", "netns", "exec", self.gateway, *command, stdin=stdin)


@contextmanager
def inside(namespace: str):
    """Sockets created in this block belong to `namespace` (this thread's network
    namespace is switched, then switched back)."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        assert libc.setns(target, _CLONE_NEWNET) == 0, \
            f"setns({namespace}): {os.strerror(ctypes.get_errno())}"
        try:
            yield
        finally:
            assert libc.setns(home, _CLONE_NEWNET) == 0, "cannot return to our namespace"
    finally:
        os.close(home)
        os.close(target)


class Recorder:
    """A server in the server namespace: records each connection's peer and bytes,
    echoes them when `echo`."""

    def __init__(self, namespace: str, host: str, port: int, echo: bool):
        self.echo = echo
        self.peers: list[tuple] = []
        self.data: list[bytearray] = []
        self.done: list[Event] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with inside(namespace):
            listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(64)
        self.server = StreamServer(listening, self._handle)
        self.server.start()

    def _handle(self, sock, peer):
        self.peers.append(peer[:2])
        data = bytearray()
        self.data.append(data)
        finished = Event()
        self.done.append(finished)
        with sock:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if self.echo:
                    sock.sendall(chunk)
        finished.set()

    def stop(self):
        self.server.stop(timeout=1)


class PathNotifySocket(NotifySocket):
    """NOTIFY_SOCKET as a file: an abstract socket belongs to one network namespace,
    and gproxyd runs in the gateway's."""

    def __init__(self):
        # Where nobody (gproxyd after the drop) may reach it: not under pytest's tmp_path.
        self.folder = tempfile.mkdtemp(prefix="gpx-notify-")
        os.chmod(self.folder, 0o755)
        self.path = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.messages = []

    def close(self):
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def net(request):
    namespaces = Namespaces(str(os.getpid() % 100000))
    namespaces.delete()  # left over by a killed run
    try:
        namespaces.create()
        yield namespaces
    finally:
        namespaces.delete()


@pytest.fixture
def servers(net):
    started = []

    def start(host: str, port: int, echo: bool = True) -> Recorder:
        started.append(Recorder(net.server, host, port, echo))
        return started[-1]
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway_daemon(net, tmp_path):
    """gateway_daemon(routes) -> gproxyd started in the gateway namespace, as nobody."""
    assert os.getuid() == 0, "network namespaces and the privilege drop need root"
    os.chmod(tmp_path, 0o777)  # the log file is reopened by nobody
    started = []

    def start(routes: str, settings: str = "") -> Daemon:
        daemon = Daemon(tmp_path, "[gproxyd]\nadmin = off\nlog-level = info\n"
                                  "user = nobody\n" + settings + "\n" + routes)
        daemon.notify.close()
        daemon.notify = PathNotifySocket()
        daemon.env["NOTIFY_SOCKET"] = daemon.notify.path
        daemon.args = ["ip", "netns", "exec", net.gateway] + daemon.args
        started.append(daemon)
        return daemon.start()
    yield start
    for daemon in started:
        daemon.stop()
        daemon.notify.close()


NFT_REDIRECT = """
table inet gproxyd {
    chain divert {
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
    }
    chain intercept {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "g1" tcp dport 8000 redirect to :15001
    }
}
"""

NFT_TPROXY = """
table inet gproxyd {
    chain divert {
        type filter hook prerouting priority mangle; policy accept;
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
        iifname "g1" meta nfproto ipv4 tcp dport 8000 tproxy ip to :15002 meta mark set 1 accept
        iifname "g1" meta nfproto ipv6 tcp dport 8000 tproxy ip6 to :15002 meta mark set 1 accept
    }
}
"""


def iptables_rules(net: Namespaces, divert: str) -> None:
    """The same rules as iptables/ip6tables commands (README: Transparent mode)."""
    for tool in ("iptables", "ip6tables"):
        net.in_gateway(tool, "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-m",
                       "socket", "--transparent", "-j", "MARK", "--set-mark", "1")
        if divert == "redirect":
            net.in_gateway(tool, "-t", "nat", "-A", "PREROUTING", "-i", "g1", "-p", "tcp",
                           "--dport", "8000", "-j", "REDIRECT", "--to-ports", "15001")
        else:
            net.in_gateway(tool, "-t", "mangle", "-A", "PREROUTING", "-i", "g1", "-p",
                           "tcp", "--dport", "8000", "-j", "TPROXY", "--on-port", "15002",
                           "--tproxy-mark", "1")


ROUTES = f"""
[route redirect4]
listen = 0.0.0.0:{REDIRECT_PORT}
production = original-dst
source = client
shadow = {SERVER_V4}:{SHADOW_PORT}

[route redirect6]
listen = [::]:{REDIRECT_PORT}
production = original-dst
source = client
shadow = [{SERVER_V6}]:{SHADOW_PORT}

[route tproxy4]
listen = 0.0.0.0:{TPROXY_PORT}
listen-transparent = yes
production = original-dst
source = client
shadow = {SERVER_V4}:{SHADOW_PORT}

[route tproxy6]
listen = [::]:{TPROXY_PORT}
listen-transparent = yes
production = original-dst
source = client
shadow = [{SERVER_V6}]:{SHADOW_PORT}
"""


def round_trip(net: Namespaces, host: str, port: int, payload: bytes):
    """From the client namespace: send `payload`, half-close, read the echo to EOF.
    Returns (the client's own address, what came back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with inside(net.client):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(20)
        sock.connect((host, port))
        return sock.getsockname()[:2], send_and_read_to_eof(sock, payload)


def digest(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


@pytest.mark.parametrize("rules", ["nftables", "iptables"])
@pytest.mark.parametrize("divert", ["redirect", "tproxy"])
@pytest.mark.parametrize("version", [4, 6])
def test_the_server_sees_the_client_and_every_byte_and_a_shadow_gets_the_copy(
        net, servers, gateway_daemon, rules, divert, version):
    server_ip, client_ip = (SERVER_V4, CLIENT_V4) if version == 4 else (SERVER_V6, CLIENT_V6)
    production = servers(server_ip, PRODUCTION_PORT)
    shadow = servers(server_ip, SHADOW_PORT, echo=False)
    if rules == "nftables":
        net.in_gateway("nft", "-f", "-", stdin=NFT_REDIRECT if divert == "redirect"
                       else NFT_TPROXY)
    else:
        iptables_rules(net, divert)
    daemon = gateway_daemon(ROUTES)
    assert "keeping CAP_NET_ADMIN" in daemon.log()

    payload = os.urandom(2 << 20)
    client, answer = round_trip(net, server_ip, PRODUCTION_PORT, payload)
    assert digest(answer) == digest(payload), f"{len(answer)} bytes came back of " \
                                              f"{len(payload)}"
    assert [peer[0] for peer in production.peers] == [client_ip], \
        "production must see the client's own address"
    assert digest(production.data[0]) == digest(payload)
    wait_until(lambda: shadow.done and shadow.done[0].is_set(), timeout=15,
               what="the shadow's copy to its EOF")
    assert digest(shadow.data[0]) == digest(payload)
    assert shadow.peers[0][0] != client_ip, "a shadow is connected from gproxyd's address"
    route = f"{divert}{version}"
    shown = f"[{client[0]}]:{client[1]}" if version == 6 else f"{client[0]}:{client[1]}"
    where = f"[{server_ip}]:{PRODUCTION_PORT}" if version == 6 else \
        f"{server_ip}:{PRODUCTION_PORT}"
    daemon.wait_log(f"route={route} client={shown} production={where} ")


def test_a_client_dialling_gproxyd_itself_is_refused_as_a_loop(net, servers,
                                                              gateway_daemon):
    net.in_gateway("nft", "-f", "-", stdin=NFT_REDIRECT)
    daemon = gateway_daemon(ROUTES)
    for target in (GATEWAY_V4, GATEWAY_V6):
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        with inside(net.client):
            sock = socket.socket(family, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(10)
            sock.connect((target, REDIRECT_PORT))
            sock.sendall(b"hello")
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
    shown = {GATEWAY_V4: f"{GATEWAY_V4}:{REDIRECT_PORT}",
             GATEWAY_V6: f"[{GATEWAY_V6}]:{REDIRECT_PORT}"}
    daemon.wait_log(f"production = original-dst: the client dialled {shown[GATEWAY_V4]}, "
                    f"gproxyd's own listen address 0.0.0.0:{REDIRECT_PORT}, which would "
                    "loop")
    daemon.wait_log(f"production = original-dst: the client dialled {shown[GATEWAY_V6]}, "
                    f"gproxyd's own listen address [::]:{REDIRECT_PORT}, which would loop")


@pytest.mark.parametrize("keep, expected", [(True, "0000000000001000"),
                                            (False, "0000000000000000")])
def test_the_drop_keeps_cap_net_admin_for_exec_d_workers_too(keep, expected):
    """Workers (workers = N) are started with exec() after the drop: the capability is
    raised as ambient, which exec() keeps (checked with a system binary: on this
    machine nobody may not run the venv's interpreter, so a daemon with user = nobody
    and workers cannot start its workers at all)."""
    assert os.getuid() == 0, "the privilege drop needs root"
    program = ("import os; from gproxyd.daemon import drop_privileges, capabilities_needed; "
               "from gproxyd.config import make_route; "
               "routes = [make_route(listen='127.0.0.1:0', production='127.0.0.1:9', "
               f"source={'client' if keep else 'off'!r})]; "
               "print(drop_privileges('nobody', '', capabilities_needed(routes)), flush=True); "
               "os.execv('/bin/grep', ['grep', '^Cap[EA]', '/proc/self/status'])")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(", keeping CAP_NET_ADMIN") is keep
    assert lines[1:] == [f"CapEff:\t{expected}", f"CapAmb:\t{expected}"]
