"""gproxyd/replay/locust.py: a Locust master and two local workers replay a recording
against a real server, headless, for a few seconds; the server and Locust's CSV stats
both show the requests."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import gevent
import pytest
from http_backend import HTTPServer

import gproxyd.replay
from gproxyd.recordfile import RecordWriter

LOCUST = os.path.join(os.path.dirname(sys.executable), "locust")
LOCUSTFILE = os.path.join(os.path.dirname(gproxyd.replay.__file__), "locust.py")
RECORDED = [b"GET /a HTTP/1.1\r\nHost: shop.example\r\n\r\n",
            b"GET /b?page=2 HTTP/1.1\r\nHost: shop.example\r\n\r\n",
            b"GET /c HTTP/1.1\r\nHost: shop.example\r\n\r\n"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server():
    started = HTTPServer()
    yield started
    started.stop()


def test_a_master_and_two_workers_replay_a_recording(tmp_path, server):
    recording = tmp_path / "requests.rec"
    writer = RecordWriter(str(recording), max_size=1 << 20, keep=1)
    for number, request in enumerate(RECORDED):
        writer.append(1000.0 + number, request)
    writer.close()
    master_port = _free_port()
    common = ["-f", LOCUSTFILE]
    master = subprocess.Popen(
        [LOCUST, *common, "--master", "--master-bind-host", "127.0.0.1",
         "--master-bind-port", str(master_port), "--headless", "--expect-workers", "2",
         "-u", "4", "-r", "4", "--run-time", "3s", "--host",
         f"http://{server.address}", "--replay-file", str(recording),
         "--replay-rate", "5", "--csv", str(tmp_path / "stats"), "--only-summary"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    workers = [subprocess.Popen(
        [LOCUST, *common, "--worker", "--master-host", "127.0.0.1", "--master-port",
         str(master_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path) for _ in range(2)]
    try:
        output, _ = master.communicate(timeout=40)
        for worker in workers:
            worker.wait(timeout=10)
    finally:
        for process in (master, *workers):
            if process.poll() is None:
                process.kill()
    assert master.returncode == 0, output
    with open(tmp_path / "stats_stats.csv", newline="") as handle:
        stats = {row["Name"]: row for row in csv.DictReader(handle)}
    total = int(stats["Aggregated"]["Request Count"])
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    # 4 users x 5 requests/s x 3 s: about 60, started as the users spawn.
    assert 20 <= total <= 70, output
    assert {"/a", "/b", "/c"} <= set(stats)  # named by path, the query left out
    # Every request Locust counted reached the server, as recorded (Host included).
    gevent.sleep(0.1)
    heads = [request for _, request in server.requests]
    assert len(heads) >= total
    assert set(heads) == set(RECORDED)
