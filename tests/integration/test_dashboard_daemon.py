"""The dashboard as the daemon serves it, with workers = 2: GET /, /stats/history merged
over the workers, shadow-memory in /stats, and who may ask (admin-allow, admin-token),
tried from a network namespace this test creates, so that a client is not on loopback;
a reload changes both; a bad token file stops the start with 78."""
from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import requests
from http_backend import HTTPServer
from prometheus_client.parser import text_string_to_metric_families
from service import GLOBAL, free_port, route_section, wait_until

from gproxyd.exitcodes import EX_CONFIG

TOKEN = "3f1c9a7e5b2d4f608a1e3c5b7d9f0a2c"
OTHER_TOKEN = "b7d9f0a2c3f1c9a7e5b2d4f608a1e3c5"


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture
def namespace():
    """A network namespace joined to this one by a veth pair: (name, the address of our
    end, which the namespace's clients reach us at). Removed at the end."""
    name = f"gpdash{uuid.uuid4().hex[:6]}"
    ours, theirs = f"{name}h", f"{name}n"
    run("ip", "netns", "add", name)
    try:
        run("ip", "link", "add", ours, "type", "veth", "peer", "name", theirs, "netns", name)
        run("ip", "addr", "add", "10.231.7.1/30", "dev", ours)
        run("ip", "link", "set", ours, "up")
        run("ip", "netns", "exec", name, "ip", "addr", "add", "10.231.7.2/30", "dev", theirs)
        run("ip", "netns", "exec", name, "ip", "link", "set", theirs, "up")
        run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, "10.231.7.1"
    finally:
        run("ip", "link", "del", ours, check=False)
        run("ip", "netns", "del", name, check=False)


def from_namespace(namespace: str, url: str, *headers: str) -> int:
    """The HTTP status a client in `namespace` gets for GET `url` (curl)."""
    command = ["ip", "netns", "exec", namespace, "curl", "-s", "-o", "/dev/null",
               "-w", "%{http_code}", "--max-time", "10"]
    for header in headers:
        command += ["-H", header]
    return int(run(*command, url).stdout)


def config(port: int, admin_port: int, production: str, shadow: str, token_file,
           allow: str) -> str:
    return (GLOBAL.replace("admin = off", f"admin = 0.0.0.0:{admin_port}")
            + f"workers = 2\nadmin-allow = {allow}\nadmin-token = {token_file}\n\n"
            + route_section("web", port, production, shadow=shadow, protocol="http"))


def test_the_daemons_dashboard_history_and_access(tmp_path, daemons, namespace):
    netns, our_address = namespace
    production, shadow = HTTPServer(), HTTPServer()
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    port, admin_port = free_port(), free_port()
    daemon = daemons(tmp_path, config(port, admin_port, production.address, shadow.address,
                                      token_file, "10.231.7.0/30")).start()
    local = f"http://127.0.0.1:{admin_port}"

    page = requests.get(local + "/", timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert b"dashboard/app.js" in page.content
    assert requests.get(local + "/dashboard/app.js", timeout=5).status_code == 200

    with requests.Session() as client:
        for number in range(60):
            assert client.get(f"http://127.0.0.1:{port}/items/{number}", timeout=5).ok

    def settled() -> dict | None:
        """/stats and /stats/history once the history holds every request /stats
        counts (the workers report, then the arbiter samples, about once a second)."""
        stats = requests.get(local + "/stats", timeout=5).json()
        history = requests.get(local + "/stats/history?route=web&since=120",
                               timeout=5).json()
        backends = history["routes"]["web"]
        counted = {name: sum(point["requests"] for point in kept["points"])
                   for name, kept in backends.items()}
        route = stats["routes"]["web"]
        if route["production"]["requests"] == 60 and counted.get("production") == 60 and \
                counted.get(shadow.address) == route["shadows"][shadow.address]["requests"] == 60:
            return {"stats": stats, "history": history}
        return None

    found = wait_until(settled, timeout=20, interval=0.5, what="history of 60 requests")
    backends = found["history"]["routes"]["web"]
    assert backends["production"]["role"] == "production"
    assert backends[shadow.address]["role"] == "candidate"
    assert found["history"]["step"] == 1.0
    assert all(point["p50_ms"] > 0 for point in backends["production"]["points"]
               if point["requests"])
    memory = found["stats"]["shadow_memory"]
    assert memory["limit"] == 2 * 256 * 2 ** 20  # two workers, each its own shadow-memory
    assert set(memory["drops"]) >= {"over-buffer", "over-budget", "shadow-failed"}
    metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(
                   requests.get(local + "/metrics", timeout=5).text)
               for sample in family.samples}
    assert metrics[("gproxyd_shadow_memory_limit_bytes", ())] == 2 * 256 * 2 ** 20
    assert metrics[("gproxyd_shadow_drops_total", (("backend", shadow.address),
                                                   ("cause", "over-budget"),
                                                   ("route", "web")))] == 0

    def reload_status() -> dict:
        return requests.get(local + "/stats", timeout=5).json()["reload"]

    # Not on loopback: from admin-allow's network, and with the token.
    remote = f"http://{our_address}:{admin_port}"
    assert from_namespace(netns, remote + "/stats") == 403
    assert from_namespace(netns, remote + "/stats", f"Authorization: Bearer {TOKEN}") == 200
    assert from_namespace(netns, remote + "/stats", "Authorization: Bearer wrongwrongwrong1") \
        == 403
    assert from_namespace(netns, remote + "/healthz") == 200  # load balancers need no token
    assert from_namespace(netns, remote + "/", f"Authorization: Bearer {TOKEN}") == 200
    ctl = run("ip", "netns", "exec", netns, str(daemon.args[0]).replace("gproxyd", "gproxyctl"),
              "stats", "--json", "--admin", f"{our_address}:{admin_port}", "--admin-token",
              str(token_file), check=False)
    assert ctl.returncode == 0, ctl.stderr
    assert json.loads(ctl.stdout)["routes"]["web"]["production"]["requests"] == 60
    refused = run("ip", "netns", "exec", netns,
                  str(daemon.args[0]).replace("gproxyd", "gproxyctl"), "stats", "--json",
                  "--admin", f"{our_address}:{admin_port}", check=False)
    assert refused.returncode != 0 and "admin-allow" in refused.stderr

    # A reload reads the token again and takes the new admin-allow.
    token_file.write_text(OTHER_TOKEN + "\n")
    daemon.reload()
    assert from_namespace(netns, remote + "/stats", f"Authorization: Bearer {TOKEN}") == 403
    assert from_namespace(netns, remote + "/stats",
                          f"Authorization: Bearer {OTHER_TOKEN}") == 200
    daemon.write_config(config(port, admin_port, production.address, shadow.address,
                               token_file, "192.0.2.0/24"))
    daemon.reload()
    assert from_namespace(netns, remote + "/stats",
                          f"Authorization: Bearer {OTHER_TOKEN}") == 403
    assert requests.get(local + "/stats", timeout=5).status_code == 200  # loopback: always

    # A token file that cannot be used fails the reload, and the running one stays.
    token_file.write_text("short\n")
    daemon.reload()
    # (/stats may be the copy rendered before the reload, up to a second old)
    wait_until(lambda: not reload_status()["ok"], what="the failed reload in /stats")
    assert "admin-token" in reload_status()["error"]
    daemon.write_config(config(port, admin_port, production.address, shadow.address,
                               token_file.with_name("missing"), "10.231.7.0/30"))
    token_file.write_text(OTHER_TOKEN + "\n")
    daemon.reload()
    assert from_namespace(netns, remote + "/stats",
                          f"Authorization: Bearer {OTHER_TOKEN}") == 403  # admin-allow kept


def test_a_token_file_that_cannot_be_used_stops_the_start_with_78(tmp_path, daemons):
    token_file = tmp_path / "admin.token"
    token_file.write_text("too-short\n")
    daemon = daemons(tmp_path, GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{free_port()}")
                     + f"admin-token = {token_file}\n\n"
                     + route_section("web", free_port(), "127.0.0.1:9"))
    daemon.start(wait_ready=False)
    assert daemon.wait() == EX_CONFIG
    error = daemon.process.stderr.read().decode()
    assert "admin-token" in error and str(token_file) in error and "16" in error
