"""`gproxyd demo`: a self-contained tour — production, a slower candidate, gproxyd between.

Starts a small HTTP production server and a deliberately slower candidate on free
loopback ports, puts a gproxyd route in front of production with the candidate as its
shadow, sends real HTTP traffic through it and prints what each side saw.
"""
from __future__ import annotations

import argparse
import http.client
import os
import tempfile
import time


def _backend(name: str, delay: float):
    """A keep-alive HTTP/1.1 server on a free port; returns (server, port)."""
    from gevent.pywsgi import WSGIServer

    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        environ["wsgi.input"].read(length)
        if delay:
            time.sleep(delay)  # monkey-patched: only this request waits
        body = f'{{"served_by": "{name}", "path": "{environ["PATH_INFO"]}"}}\n'.encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    from gevent import socket
    listening = socket.socket()
    # Linux hands TCP_NODELAY down to accepted sockets; without it pywsgi's separate
    # header and body writes meet delayed ACKs and every answer takes 40 ms.
    listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    server = WSGIServer(listening, app, log=None, error_log=None)
    server.start()
    return server, server.server_port


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _client(port: int, requests: int, pause: float, latencies: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for number in range(requests):
        time.sleep(pause)
        started = time.perf_counter()
        conn.request("GET", f"/item/{number}")
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        assert response.status == 200
    conn.close()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gproxyd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--clients", type=int, default=4, help="concurrent keep-alive clients")
    parser.add_argument("--candidate-delay", type=float, default=0.002,
                        help="seconds the candidate adds to every answer")
    parser.add_argument("--pause", type=float, default=0.005,
                        help="seconds each client waits between requests (a candidate "
                             "slower than the request rate builds a queue)")
    parser.add_argument("--serve", action="store_true",
                        help="after the tour, keep serving until Ctrl-C (try it with curl)")
    args = parser.parse_args(argv)

    from gevent import monkey
    monkey.patch_all()
    import logging

    import gevent

    from .config import load_config
    from .listener import Listener
    from .report import table

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    production, production_port = _backend("production", 0.0)
    candidate, candidate_port = _backend("candidate", args.candidate_delay)
    listen_port = _free_port()
    config_text = (f"[gproxyd]\nadmin = off\n\n[route demo]\nlisten = 127.0.0.1:{listen_port}\n"
                   f"production = 127.0.0.1:{production_port}\n"
                   f"shadow = 127.0.0.1:{candidate_port}\nprotocol = http\n"
                   # Each server names itself in its answers: that field is expected to
                   # differ; everything else is compared.
                   "compare-ignore-fields = $.served_by\n")
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "gproxyd.conf")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        route = load_config(path, [], {}).routes[0]
    print("gproxyd demo: this config, with production and a slower candidate "
          f"(+{args.candidate_delay * 1000:.0f} ms) on loopback:\n")
    print("    " + config_text.replace("\n", "\n    "))
    listener = Listener(route)
    listener.start()

    latencies: list[float] = []
    before = {"routes": {route.name: listener.stats.snapshot()}}
    started = time.perf_counter()
    clients = [gevent.spawn(_client, listen_port, args.requests, args.pause, latencies)
               for _ in range(args.clients)]
    gevent.joinall(clients, raise_error=True)
    elapsed = time.perf_counter() - started
    listener.close()
    listener.drain(10)

    print(f"sent {len(latencies)} HTTP requests over {args.clients} keep-alive connections "
          f"in {elapsed:.2f}s ({len(latencies) / elapsed:.0f} req/s); every answer came from "
          f"production: p50 {_percentile(latencies, 0.5) * 1000:.2f} ms, "
          f"p99 {_percentile(latencies, 0.99) * 1000:.2f} ms as the client saw it\n")
    print("what gproxyd measured on both sides (with --serve, gproxyctl stats shows the "
          "same live):\n")
    document = {"routes": {route.name: listener.stats.snapshot()}}
    print(table(document, before, elapsed))
    if args.serve:
        from .admin import AdminServer
        from .history import History, sample_forever
        from .settings import address
        # The numbers go on from the tour's, and the admin endpoint shows them live.
        listener = Listener(route, stats=listener.stats)
        listener.start()
        source = lambda: {route.name: listener.stats}  # noqa: E731
        history = History()
        sampler = gevent.spawn(sample_forever, history, source)
        admin = AdminServer(address(f"127.0.0.1:{_free_port()}"), source, history=history)
        admin.start()
        print(f"\nserving on 127.0.0.1:{listen_port}: curl http://127.0.0.1:{listen_port}/\n"
              f"the dashboard: http://{admin.address}/ (production and the candidate, live)\n"
              f"live numbers: gproxyctl stats --admin {admin.address} --watch "
              f"(or curl http://{admin.address}/stats); Ctrl-C stops")
        try:
            gevent.wait()
        except KeyboardInterrupt:
            pass
        sampler.kill()
        admin.stop()
    production.stop()
    candidate.stop()
    return 0
