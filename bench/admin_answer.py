"""What one admin answer costs the event loop, in-process: an AdminServer with 13 routes
(a shadow each, 3,000 latencies in every histogram), a client on one kept-alive
connection asking /healthz, /metrics and /stats 1,000 times each, back to back (after 50
to warm up and render; renders are kept for the whole run, so only answers are measured).

Prints, per path, the loop CPU charged to the endpoint's LoopBudget (its median and mean
charge; an answer is charged in about three parts: reading, waiting its turn, answering)
and the thread's CPU per request and answer, the client's share included.

    .venv/bin/python bench/admin_answer.py
"""
from gevent import monkey

monkey.patch_all()

import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from gproxyd.admin import AdminServer  # noqa: E402
from gproxyd.listener import bind  # noqa: E402
from gproxyd.settings import address  # noqa: E402
from gproxyd.stats import RouteStats  # noqa: E402


def routes() -> dict[str, RouteStats]:
    rng = random.Random(1)
    found = {}
    for number in range(13):
        stats = found[f"r{number}"] = RouteStats(total=100)
        shadow = stats.shadow("127.0.0.1:8082")
        for _ in range(3000):
            production = rng.lognormvariate(-7, 1.5)
            stats.production.record(production)
            shadow.record(production * rng.uniform(0.8, 1.5))
    return found


data = routes()
listening = bind(address("127.0.0.1:0", lowest_port=0))
admin = AdminServer(address(f"127.0.0.1:{listening.getsockname()[1]}"), lambda: data,
                    listening, loop_share=1.0, loop_burst=10.0, max_age=3600)
spent = []
charge = admin.budget.spend


def spend(seconds: float) -> None:
    spent.append(seconds)
    charge(seconds)


admin.budget.spend = spend
admin.start()


def run(path: str, count: int) -> None:
    sock = socket.create_connection(("127.0.0.1", admin.address.port))
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for _ in range(count):
        sock.sendall(request)
        received = b""
        while True:
            received += sock.recv(1 << 20)
            head, blank, body = received.partition(b"\r\n\r\n")
            if blank:
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if len(body) >= length:
                    break
    sock.close()


for path in ("/healthz", "/metrics", "/stats"):
    run(path, 50)  # warm, render
    spent.clear()
    cpu = time.thread_time()
    run(path, 1000)
    total = time.thread_time() - cpu
    print(f"{path}: budget charges median {statistics.median(spent) * 1e6:.0f} us, mean "
          f"{statistics.mean(spent) * 1e6:.0f} us ({len(spent)} charges, "
          f"{sum(spent) / 1000 * 1e6:.0f} us an answer); thread CPU per request and answer "
          f"(server and client) {total / 1000 * 1e6:.0f} us")
admin.stop()
