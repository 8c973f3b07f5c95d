#!/usr/bin/env python3
"""Does `gproxyctl replay` measure what httperf measures? Both, in turn, against the same
server at the same fixed rates; their achieved request rates and median latencies.

    .venv/bin/python bench/replay_vs_httperf.py [--duration 5] [--fast 200,500,1000]
                                                 [--delayed 100,300] [--delay-ms 20]

`fast`: nginx answering `return 200` (skipped, with a note, if nginx is not installed);
`delayed`: a gevent server here answering each request DELAY-MS late, so that both tools
see a latency well above httperf's 1 ms histogram bins (its median is a bin's middle, so
sub-millisecond medians cannot be compared).
httperf opens a connection per request (--num-calls 1); so does the replay compared with
it, from a recording whose request says Connection: close. A third run, keep-alive (the
replay's usual way), is shown for its p50.
Prints one line per (server, rate): both request rates, the replay's p50 and httperf's
connection-time median, and the differences.
Needs httperf (Debian: apt-get install httperf).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from gproxyd.recordfile import RecordWriter

GPROXYCTL = os.path.join(os.path.dirname(sys.executable), "gproxyctl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {timeout:g} s")


def serve_delayed(port: int, delay_ms: float) -> None:
    """The delayed server (runs in a child process): keep-alive HTTP/1.1, every answer
    DELAY_MS late, requests of different connections concurrently."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.server import StreamServer

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello\n"

    def handle(sock, _peer):
        pending = b""
        while True:
            while b"\r\n\r\n" not in pending:
                data = sock.recv(65536)
                if not data:
                    sock.close()
                    return
                pending += data
            head, _, pending = pending.partition(b"\r\n\r\n")
            gevent.sleep(delay_ms / 1000.0)
            sock.sendall(answer)
            if re.search(rb"\nconnection:\s*close", head, re.I):
                sock.close()
                return

    server = StreamServer(("127.0.0.1", port), handle, backlog=4096)
    server.serve_forever()


def start_delayed(delay_ms: float) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-delayed",
                                str(port), str(delay_ms)])
    _wait_listening(port)
    return process, port


def start_nginx(directory: str) -> tuple[subprocess.Popen, int] | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if nginx is None:
        return None
    port = _free_port()
    config = os.path.join(directory, "nginx.conf")
    with open(config, "w") as handle:
        handle.write(f"""worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {directory}/body;
  proxy_temp_path {directory}/proxy;
  fastcgi_temp_path {directory}/fastcgi;
  uwsgi_temp_path {directory}/uwsgi;
  scgi_temp_path {directory}/scgi;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello\\n"; }} }}
}}
""")
    process = subprocess.Popen([nginx, "-c", config, "-p", directory],
                               stderr=subprocess.DEVNULL)
    _wait_listening(port)
    return process, port


def run_replay(port: int, rate: float, duration: float, directory: str,
               close: bool) -> dict:
    """One replay run; CLOSE: from a recording whose request says Connection: close, so
    that, like httperf --num-calls 1, every request opens a connection of its own."""
    if close:
        source = os.path.join(directory, "close.rec")
        if not os.path.exists(source):
            writer = RecordWriter(source, max_size=1 << 20, keep=1)
            writer.append(time.time(), f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                       "Connection: close\r\n\r\n".encode())
            writer.close()
        inputs = [source]
    else:
        source = os.path.join(directory, "urls.txt")
        with open(source, "w") as handle:
            handle.write("/\n")
        inputs = ["--urls", source]
    out = os.path.join(directory, "replay.json")
    command = [GPROXYCTL, "replay", *inputs, "--target", f"127.0.0.1:{port}",
               "--rates", f"{rate:g}", "--runs", "1", "--duration", f"{duration:g}s",
               "--json", out]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as handle:
        (row,) = json.load(handle)
    return row


def run_httperf(port: int, rate: float, duration: float) -> dict:
    command = ["httperf", "--server", "127.0.0.1", "--port", str(port), "--uri", "/",
               "--rate", f"{rate:g}", "--num-conns", str(int(rate * duration)),
               "--num-calls", "1", "--timeout", "5"]
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout

    def number(pattern: str) -> float:
        match = re.search(pattern, text)
        if match is None:
            raise SystemExit(f"httperf's output has no {pattern!r}:\n{text}")
        return float(match.group(1))
    return {"request_rate": number(r"Request rate: ([0-9.]+) req/s"),
            "median_ms": number(r"Connection time \[ms\]: min [0-9.]+ avg [0-9.]+ max "
                                r"[0-9.]+ median ([0-9.]+)")}


def _difference(ours: float, theirs: float) -> str:
    return f"{(ours - theirs) / theirs * 100:+.1f}%" if theirs else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--fast", default="200,500,1000", help="rates against nginx")
    parser.add_argument("--delayed", default="100,300", help="rates against the delayed "
                                                              "server")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--serve-delayed", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_delayed:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_delayed(int(args.serve_delayed[0]), float(args.serve_delayed[1]))
        return 0
    if shutil.which("httperf") is None:
        print("httperf is not installed (Debian: apt-get install httperf)", file=sys.stderr)
        return 1
    print(f"{'server':<14} {'rate':>6}  {'replay req/s':>12} {'httperf req/s':>13} "
          f"{'diff':>7}  {'replay p50':>10} {'httperf median':>14} {'diff':>7}  "
          f"{'replay p50 keep-alive':>21}")
    with tempfile.TemporaryDirectory(prefix="replay-vs-httperf-") as directory:
        plans = []
        nginx = start_nginx(directory)
        if nginx is None:
            print("(nginx not installed: no fast-server rows)")
        else:
            plans.append(("nginx", nginx, args.fast))
        plans.append((f"delay {args.delay_ms:g} ms", start_delayed(args.delay_ms),
                      args.delayed))
        try:
            for name, (_, port), rates in plans:
                for rate in (float(text) for text in rates.split(",") if text):
                    ours = run_replay(port, rate, args.duration, directory, close=True)
                    theirs = run_httperf(port, rate, args.duration)
                    kept = run_replay(port, rate, args.duration, directory, close=False)
                    print(f"{name:<14} {rate:>6g}  {ours['achieved_rate']:>12.1f} "
                          f"{theirs['request_rate']:>13.1f} "
                          f"{_difference(ours['achieved_rate'], theirs['request_rate']):>7}  "
                          f"{ours['p50_ms']:>10.2f} {theirs['median_ms']:>14.1f} "
                          f"{_difference(ours['p50_ms'], theirs['median_ms']):>7}  "
                          f"{kept['p50_ms']:>21.2f}", flush=True)
        finally:
            for _, (process, _), _ in plans:
                process.terminate()
                process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
