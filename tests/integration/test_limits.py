"""Running out of file descriptors is survived: a clear log line, no crash, no busy loop."""
from __future__ import annotations

import resource
import socket
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
