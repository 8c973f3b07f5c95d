#!/usr/bin/env python3
"""Tiny loopback backends for the benchmark: `stall` accepts and never reads (the stalled
shadow); `echo` holds connections and echoes what it reads (the idle-connection holder).

    python3 bench/servers.py stall|echo

Binds 127.0.0.1 on a free port, prints `PORT <n>` on standard output once listening, then
serves until SIGTERM. SIGUSR1 resets every accepted connection (RST), so that what a
stalled run left queued in the kernel does not carry over into the next run. Standard
library only; one epoll loop, no threads.
"""
from __future__ import annotations

import errno
import resource
import select
import signal
import socket
import struct
import sys
import time

HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


def serve(kind: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    # The stalled server never asks for EPOLLIN: it must not read a byte, only notice
    # (EPOLLRDHUP) that the peer went away, so closed connections don't pile up.
    mask = select.EPOLLRDHUP | (select.EPOLLIN if kind == "echo" else 0)
    conns: dict[int, socket.socket] = {}
    reset_requested = []
    signal.signal(signal.SIGUSR1, lambda *_: reset_requested.append(True))

    def close(fd: int) -> None:
        conn = conns.pop(fd)
        poller.unregister(fd)
        conn.close()

    while True:
        if reset_requested:
            reset_requested.clear()
            for fd in list(conns):
                # Linger 0: close() sends RST and drops whatever is queued either way.
                conns[fd].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
                close(fd)
        for fd, events in poller.poll(0.2):
            if fd == listener.fileno():
                _accept_all(listener, poller, conns, mask)
                continue
            if fd not in conns:
                continue
            if events & select.EPOLLIN:
                try:
                    data = conns[fd].recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    try:
                        conns[fd].send(data)
                    except OSError:
                        pass
                    continue
                close(fd)
            elif events & HANGUP:
                close(fd)


def _accept_all(listener: socket.socket, poller: select.epoll,
                conns: dict[int, socket.socket], mask: int) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)  # out of descriptors: let closes catch up, don't spin
                return
            raise
        conn.setblocking(False)
        conns[conn.fileno()] = conn
        poller.register(conn.fileno(), mask)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("stall", "echo"):
        sys.exit("usage: servers.py stall|echo")
    try:
        serve(sys.argv[1])
    except KeyboardInterrupt:
        pass
