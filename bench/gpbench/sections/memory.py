"""memory: the proxy's RSS and descriptors per idle proxied connection, 10,000 held."""
from __future__ import annotations

import socket
import time

from .. import BenchError
from ..procfs import settle, tree_fds, tree_rss_kib
from ..rig import Rig
from ..section import Row, Section
from ..targets import Target


def idle_connections(rig: Rig) -> int:
    """--idle-conns, or fewer where the open-files limit cannot hold that many: a proxy
    holds two descriptors per proxied connection; leave room for the rest (haproxy's
    splice pipes, listeners, logs)."""
    return min(rig.args.idle_conns, (rig.nofile - 1000) // 2)


def hold_connections(port: int, count: int, socks: list[socket.socket]) -> str:
    """Open COUNT connections to PORT, each proven end to end by a one-byte echo, appending
    them to SOCKS. Returns '' or why fewer were held (the caller closes SOCKS)."""
    batch_size = 200  # below the listen backlogs, so connect() never waits for a SYN retry
    deadline = time.monotonic() + 120
    while len(socks) < count:
        if time.monotonic() > deadline:
            return f"{len(socks)} of {count} connections held: timed out after 120 s"
        batch: list[socket.socket] = []
        try:
            for _ in range(min(batch_size, count - len(socks))):
                sock = socket.socket()
                batch.append(sock)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", port))
            for sock in batch:
                sock.sendall(b"x")
            for sock in batch:
                if sock.recv(1) != b"x":
                    raise ConnectionError("closed by the proxy before the echo came back")
        except OSError as error:
            for sock in batch:
                sock.close()
            return f"{len(socks)} of {count} connections held: {error}"
        socks.extend(batch)
    return ""


def measure_memory(rig: Rig, target: Target, baseline: dict[str, int]) -> dict[str, float]:
    """BASELINE maps a target to its RSS before its first hold: memory an allocator keeps
    after the connections close and reuses the next time is part of what they cost."""
    pid = target.pid
    if not pid:
        raise BenchError("no proxy process")
    settle(pid)
    fds_before = tree_fds(pid)
    rss_before = baseline.setdefault(target.name, tree_rss_kib(pid))
    socks: list[socket.socket] = []
    try:
        error = hold_connections(target.hold_port, idle_connections(rig), socks)
        if not socks:
            raise BenchError(error or "no connection held")
        time.sleep(1.0)  # let the proxy finish whatever it does after the echo
        rss_after, fds_after = tree_rss_kib(pid), tree_fds(pid)
    finally:
        for sock in socks:
            sock.close()
    held = len(socks)
    if error:
        rig.notes.append(f"{target.name} memory: {error}")
    settle(pid, fds_before)
    return {"kib_per_conn": (rss_after - rss_before) / held,
            "fds_per_conn": (fds_after - fds_before) / held, "held": held}


class Memory(Section):
    name = "memory"
    summary = "5. proxy RSS per idle proxied connection, 10,000 held"
    backends = ("echo",)
    rows = (
        Row("memory.kib_per_conn", "idle connections: proxy RSS KiB/conn", 2),
        Row("memory.fds_per_conn", "idle connections: proxy fds/conn", 2),
    )

    def prepare(self, rig: Rig) -> None:
        held = idle_connections(rig)
        if held < rig.args.idle_conns:
            rig.notes.append(
                f"memory: the open-files limit here is {rig.nofile} and cannot be raised "
                f"(hard limit), so {held} idle connections were held instead of "
                f"{rig.args.idle_conns} (a proxy needs two descriptors per connection).")

    def run(self, rig: Rig) -> None:
        baseline: dict[str, int] = {}
        rig.interleaved("memory", ["haproxy", "gproxyd"],
                        lambda target: measure_memory(rig, target, baseline))


SECTION = Memory()
