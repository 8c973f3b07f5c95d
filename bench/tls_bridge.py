"""The TLS terminator alone, two ways, by its CPU per round trip (issue #20): gproxyd's
Bridge (gproxyd/tls.py: memory BIOs driven by libev callbacks) against gevent's SSLSocket
pumped by two greenlets; behind each, the same echo on the plaintext end of a unix socket
pair, as a session would be.

    .venv/bin/python bench/tls_bridge.py [--rounds 3] [--connections 20] [--trips 2000]

Each round runs both modes, one after the other, each in a fresh server process; a client
process makes CONNECTIONS TLS connections and TRIPS round trips of 100 bytes on each. The
server's CPU (user + system, getrusage) over the client's run, divided by the round trips,
is what is printed, with the medians at the end. It makes its own self-signed certificate
with the openssl command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

SERVER = r'''
from gevent import monkey; monkey.patch_all()
import _socket, resource, socket, ssl, sys
import gevent
from gevent.server import StreamServer
from gproxyd.channel import Channel
from gproxyd.tls import Bridge

mode, cert, key = sys.argv[1:4]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
live = set()  # the session ends: a session holds its channel, so must this echo

def echo(channel):
    live.add(channel)
    try:
        while True:
            try:
                data = channel.sock.recv(65536)
            except BlockingIOError:
                channel.wait_readable()
                continue
            if not data:
                return
            channel.flush(data)
    finally:
        channel.close()
        live.discard(channel)

def with_bridge(sock, _peer):
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=True)
    raw = Channel(_socket.socket(fileno=sock.detach()))
    Bridge(raw, sslobj, incoming, outgoing, 5.0,
           lambda plain, error: plain is not None and gevent.spawn(echo, plain))

def with_gevent_ssl(sock, _peer):
    secured = context.wrap_socket(sock, server_side=True)
    ours, theirs = _socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    gevent.spawn(echo, Channel(theirs))
    ours = socket.socket(fileno=ours.detach())

    def up():
        while True:
            data = secured.recv(65536)
            if not data:
                ours.shutdown(socket.SHUT_WR)
                return
            ours.sendall(data)

    def down():
        while True:
            data = ours.recv(65536)
            if not data:
                return
            secured.sendall(data)
    gevent.spawn(up)
    gevent.spawn(down)

server = StreamServer(("127.0.0.1", 0), with_bridge if mode == "bridge" else with_gevent_ssl)
server.start()
print(server.server_port, flush=True)
for _ in range(2):  # a line in, the CPU seconds so far out (the reads off the hub)
    gevent.get_hub().threadpool.apply(sys.stdin.readline)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(usage.ru_utime + usage.ru_stime, flush=True)
'''

CLIENT = r'''
from gevent import monkey; monkey.patch_all()
import socket, ssl, sys
import gevent
port, connections, trips = map(int, sys.argv[1:4])
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE

def one():
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        for _ in range(trips):
            sock.sendall(b"x" * 100)
            got = 0
            while got < 100:
                data = sock.recv(65536)
                if not data:
                    raise SystemExit("the server closed early")
                got += len(data)

gevent.joinall([gevent.spawn(one) for _ in range(connections)], raise_error=True)
'''


def certificate(directory: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True,
                   capture_output=True, timeout=60)
    return cert, key


def one_run(mode: str, cert: str, key: str, connections: int, trips: int) -> float:
    """CPU microseconds of the server per round trip."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    server = subprocess.Popen([sys.executable, "-c", SERVER, mode, cert, key], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        server.stdin.write("\n")
        server.stdin.flush()
        before = float(server.stdout.readline())
        subprocess.run([sys.executable, "-c", CLIENT, str(port), str(connections),
                        str(trips)], check=True, timeout=600)
        server.stdin.write("\n")
        server.stdin.flush()
        after = float(server.stdout.readline())
    finally:
        server.kill()
        server.wait(timeout=10)
    return (after - before) * 1e6 / (connections * trips)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--trips", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"bridge": [], "gevent-ssl": []}
    with tempfile.TemporaryDirectory() as directory:
        cert, key = certificate(directory)
        for round_ in range(args.rounds):
            for mode in results:
                started = time.monotonic()
                cpu = one_run(mode, cert, key, args.connections, args.trips)
                results[mode].append(cpu)
                print(f"round {round_ + 1} {mode:10} {cpu:6.1f} us CPU per round trip "
                      f"({time.monotonic() - started:.1f} s)")
    for mode, values in results.items():
        print(f"median {mode:10} {statistics.median(values):6.1f} us CPU per round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
