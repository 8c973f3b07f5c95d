from gevent import monkey; monkey.patch_all()  # noqa: E702  (before anything else is imported)

"""Shared fixtures: in-process backends, an in-process gproxyd Listener, a per-test bound.

The monkey-patching comes first, before gevent's hub or any socket exists, so the
backends, the clients and the proxy under test are all greenlets of one process.
"""

import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402

import gproxyd  # noqa: E402
from gproxyd.listener import Listener  # noqa: E402

import backends  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)

TEST_TIMEOUT = 60  # seconds; a test that takes longer is hung, not slow


class Hung(Exception):
    """A test ran into the per-test bound: something waited forever."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with gevent.Timeout(TEST_TIMEOUT, Hung(f"{item.nodeid} still running after {TEST_TIMEOUT}s")):
        yield


# --- backends ----------------------------------------------------------------------------

@pytest.fixture
def sockdir():
    """A short directory for unix sockets (sun_path holds 107 bytes; tmp_path is long)."""
    path = tempfile.mkdtemp(prefix="gpx", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Servers:
    """Starts backends for one test and stops them all at its end."""

    def __init__(self, sockdir: str):
        self._sockdir = sockdir
        self._started: list = []
        self._names = 0

    def _start(self, handler, family: str = "tcp4", port: int = 0):
        path = ""
        if family == "unix":
            self._names += 1
            path = os.path.join(self._sockdir, f"backend{self._names}.sock")
        server = backends.Backend(handler, family, path=path, port=port)
        self._started.append(server)
        return server

    def echo(self, family: str = "tcp4", port: int = 0):
        return self._start(backends.echo, family, port)

    def sink(self, family: str = "tcp4", **options):
        return self._start(backends.sink(**options), family)

    def stall(self):
        return self._start(backends.stall)

    def closer(self, reset: bool = False, after: int = 0):
        return self._start(backends.closer(reset, after))

    def reply_then_half_close(self, greeting: bytes):
        return self._start(backends.reply_then_half_close(greeting))

    def dies_after(self, limit: int):
        return self._start(backends.dies_after(limit))

    def firehose(self, block: bytes):
        return self._start(backends.firehose(block))

    def black_hole(self):
        hole = backends.BlackHole()
        self._started.append(hole)
        return hole

    def stop_all(self) -> None:
        for server in reversed(self._started):
            server.stop()


@pytest.fixture
def serve():
    """serve(handler, port=0) -> a started backends.Backend; all are stopped at the end."""
    started = []

    def start(handler, port: int = 0):
        started.append(backends.Backend(handler, port=port))
        return started[-1]

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def servers(sockdir):
    started = Servers(sockdir)
    yield started
    started.stop_all()


# --- gproxyd in-process ------------------------------------------------------------------

class Proxy:
    """A running Listener for one route, and how a client reaches it."""

    def __init__(self, listener: Listener):
        self.listener = listener
        self.stopped = False
        self.route = listener.route
        self.family = self.route.listen.family
        bound = listener.bound  # the port the kernel chose, where the route says 0
        self.sockaddr = bound if self.family == socket.AF_UNIX else bound[:2]

    @property
    def stats(self):
        return self.listener.stats

    def shadow_stats(self, backend):
        return self.stats.shadows[backend.address]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.sockaddr)
        return sock

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.listener.close()
            self.listener.drain(1)


@pytest.fixture
def proxy(sockdir, caplog):
    """proxy(production, shadow=(), listen='tcp4'|'tcp6'|'unix'|ADDRESS, **options) -> Proxy.

    `production` and `shadow` are backends or address strings; options are route options
    as gproxyd.Proxy takes them (idle_timeout='300ms', hooks=PATH or an object). tcp4 and
    tcp6 listen on port 0 of 127.0.0.1 and [::1]: the kernel picks a free port, so no test
    races another for one. An ADDRESS is used as written ('127.0.0.1:8080', 'unix:/path').
    """
    caplog.set_level(logging.INFO, logger="gproxyd")
    running: list[Proxy] = []

    def start(production, shadow=(), listen: str = "tcp4", **options) -> Proxy:
        if listen == "unix":
            listen = f"unix:{os.path.join(sockdir, f'proxy{len(running)}.sock')}"
        else:
            listen = {"tcp4": "127.0.0.1:0", "tcp6": "[::1]:0"}.get(listen, listen)
        if shadow:
            options["shadow"] = [_address(backend) for backend in shadow]
        # gproxyd.Proxy builds the route and imports its hooks as a proxy script's would;
        # the Listener is the fixture's own, so that tests can reach it (update, drain).
        built = gproxyd.Proxy(listen=listen, production=_address(production), name="test",
                              **options)
        listener = Listener(built.route, hooks=built.hooks)
        listener.start()
        proxied = Proxy(listener)
        running.append(proxied)
        return proxied

    yield start
    for proxied in running:
        proxied.stop()


def _address(backend) -> str:
    return backend if isinstance(backend, str) else backend.address


# --- a throw-away redis-server ------------------------------------------------------------

@pytest.fixture
def shadow_redis(tmp_path):
    """A second, throw-away redis-server the test starts (the machine's one is production)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (.ci/install-system-deps installs it)"
    port = backends.unused_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    backends.wait_until(lambda: backends.redis_pings(client), timeout=10,
                        what="shadow redis-server up")
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def json_servers():
    """json_servers(**options) -> a started backends.json_server, stopped after the test."""
    started = []

    def make(**kwargs):
        started.append(backends.json_server(**kwargs))
        return started[-1]
    yield make
    for server in started:
        server.stop(timeout=1)

