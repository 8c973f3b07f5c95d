"""Running out of file descriptors is survived: a clear log line, no crash, no busy loop."""
from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time

from service import GLOBAL, Daemon, TaggedEcho, exchange, free_port, route_section, wait_until


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def test_emfile_is_logged_and_survived(tmp_path):
    backend = TaggedEcho(b"a")
    port, stuck_port = free_port(), free_port()
    # A production that never accepts: past its backlog, connects hang until
    # connect-timeout, each session holding two descriptors meanwhile.
    never_accepts = socket.socket()
    never_accepts.bind(("127.0.0.1", 0))
    never_accepts.listen(1)
    stuck = "127.0.0.1:%d" % never_accepts.getsockname()[1]
    daemon = Daemon(tmp_path, GLOBAL + route_section("web", port, backend.address)
                    + route_section("stuck", stuck_port, stuck, connect_timeout="1s"))
    limit = 64

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    daemon.start(preexec_fn=low_fd_limit)
    clients = []
    try:
        # Each proxied connection costs the daemon two fds: 64 cannot hold 40 of them.
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", stuck_port), timeout=5)
            clients.append(sock)
        daemon.wait_log("cannot accept on")
        assert "raise the open-files limit" in daemon.log()
        # No busy loop while the listen queue stays full of unacceptable connections.
        before = _cpu_seconds(daemon.pid)
        time.sleep(1.0)
        assert _cpu_seconds(daemon.pid) - before < 0.5
        assert daemon.process.poll() is None
        for sock in clients:
            sock.close()
        clients.clear()
        # Once fds are free again, it serves as before.
        wait_until(lambda: _serves(port), timeout=15, what="serving again")
    finally:
        for sock in clients:
            sock.close()
        daemon.stop()
        backend.stop()
        never_accepts.close()


def _serves(port: int) -> bool:
    try:
        return exchange(port, b"again", timeout=2) == b"a:again"
    except OSError:
        return False


# In a process of its own (its limit is lowered to what it has open): a connect that
# gets EMFILE from socket() is counted as out_of_descriptors, not as the backend's fault.
_EMFILE_CONNECT = """
from gevent import monkey; monkey.patch_all()
import json, os, resource
import gevent
from gevent.event import AsyncResult
from gproxyd.observe import Exchanges
from gproxyd.settings import address
from gproxyd.stats import RouteStats
from gproxyd.upstream import Upstream
stats = RouteStats()
upstream = Upstream(address("127.0.0.1:9"), stats.production,
                    Exchanges("tcp", stats.production, stats, "test"))
gevent.sleep(0)
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
outcome = AsyncResult()
upstream.connect(5.0, outcome.set, gevent.spawn)
error = outcome.get(timeout=5)
print(json.dumps({"errno": error.errno, "stats": stats.production.snapshot()}))
"""


def test_a_connect_without_descriptors_is_not_the_backends_fault():
    done = subprocess.run([sys.executable, "-c", _EMFILE_CONNECT], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["errno"] == 24  # EMFILE, from the kernel
    stats = result["stats"]
    assert (stats["out_of_descriptors"], stats["connect_failures"], stats["errors"]) == (1, 0, 1)


def test_the_soft_open_files_limit_is_raised_to_the_hard_one(tmp_path):
    backend = TaggedEcho(b"a")
    port = free_port()
    daemon = Daemon(tmp_path, GLOBAL + route_section("web", port, backend.address))

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
    daemon.start(preexec_fn=low_soft_limit)
    try:
        limits = [line for line in open(f"/proc/{daemon.pid}/limits")
                  if line.startswith("Max open files")][0].split()
        assert limits[3:5] == ["4096", "4096"]  # soft, hard
        assert exchange(port, b"x") == b"a:x"
    finally:
        daemon.stop()
        backend.stop()

