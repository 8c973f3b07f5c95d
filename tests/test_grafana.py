"""etc/grafana/gproxyd.json and etc/prometheus/gproxyd-alerts.yml: promtool (Debian's
prometheus package) checks the rules, fires each alert on series made for it and not on
healthy ones, and parses every query of the board; every metric either names is one that
/metrics exports, with the labels it uses, as rendered by the admin endpoint after real
traffic through a route with a shadow."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from backends import wait_until

from gproxyd.admin import AdminServer, ReloadStatus
from gproxyd.listener import bind
from gproxyd.settings import address

REPO = Path(__file__).resolve().parents[1]
BOARD = REPO / "etc/grafana/gproxyd.json"
ALERTS = REPO / "etc/prometheus/gproxyd-alerts.yml"
# Labels Prometheus adds itself when it scrapes, and the histogram's bucket bound.
ADDED_LABELS = {"instance", "job", "le"}
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$route": ".*", "$backend": ".*"}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, ("promtool is not installed (apt-get install prometheus; "
                   ".ci/install-system-deps test installs it)")
    return found


def board_queries() -> list[str]:
    board = json.loads(BOARD.read_text())
    queries = [target["expr"] for panel in board["panels"]
               for target in panel.get("targets", [])]
    queries += [variable["query"]["query"] for variable in board["templating"]["list"]
                if variable["type"] == "query"]
    return queries


def alert_queries() -> list[str]:
    # The rules file is YAML; its expressions are the `expr: |` blocks.
    text = ALERTS.read_text()
    return [" ".join(block.split()) for block in
            re.findall(r"expr: \|\n((?:          .*\n)+)", text)]


@pytest.fixture
def exported(proxy, json_servers) -> dict[str, set[str]]:
    """{sample name: label names} of /metrics after real traffic."""
    production = json_servers()
    candidate = json_servers(price_of=lambda item: 11 if item == 3 else 10)
    route = proxy(production, shadow=[candidate], protocol="http")
    session = requests.Session()
    host, port = route.sockaddr
    for item in range(10):
        assert session.get(f"http://{host}:{port}/items/{item}", timeout=5).ok
    listening = bind(address("127.0.0.1:0", lowest_port=0))
    admin = AdminServer(address(f"127.0.0.1:{listening.getsockname()[1]}"),
                        lambda: {"web": route.stats}, listening,
                        reload_status=ReloadStatus("/etc/gproxyd/gproxyd.conf"))
    admin.start()
    try:
        wait_until(lambda: route.stats.shadows[candidate.address].compared >= 10,
                   timeout=10, what="the shadow's answers compared")
        text = requests.get(f"http://{admin.address}/metrics", timeout=5).text
    finally:
        admin.stop()
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("{")
            labels = set(re.findall(r'(\w+)="', rest.partition("}")[0])) if rest else set()
            found.setdefault(name.split()[0], set()).update(labels)
    return found


def names_and_labels(query: str) -> tuple[set[str], set[str]]:
    """The gproxyd_ metrics a PromQL query names, and the label names it uses."""
    metrics = set(re.findall(r"\b(gproxyd_[a-z0-9_]+)\b", query))
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", query):
        labels.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", query):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    for label_values in re.findall(r"label_values\([^,]*,\s*(\w+)\)", query):
        labels.add(label_values)
    return metrics, labels


@pytest.mark.parametrize("which", ["board", "alerts"])
def test_every_metric_and_label_used_is_exported(exported, which):
    queries = board_queries() if which == "board" else alert_queries()
    assert len(queries) >= (10 if which == "board" else 4)
    for query in queries:
        metrics, labels = names_and_labels(query)
        assert metrics, query
        for metric in metrics:
            assert metric in exported, f"{metric} (in {query!r}) is not in /metrics"
        available = set().union(*(exported[metric] for metric in metrics)) | ADDED_LABELS
        assert labels <= available, (query, labels - available)


def test_board_has_a_variable_per_route_and_backend():
    board = json.loads(BOARD.read_text())
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert {"datasource", "instance", "route", "backend"} <= set(variables)
    assert "route)" in variables["route"]["query"]["query"]
    assert "backend)" in variables["backend"]["query"]["query"]
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            if "backend" in names_and_labels(target["expr"])[1]:
                assert 'backend=~"$backend"' in target["expr"], target["expr"]
            assert 'route=~"$route"' in target["expr"] or "config" in target["expr"], \
                target["expr"]


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_board_queries_parse(tmp_path):
    """Each query, its Grafana variables given values, as a recording rule promtool checks."""
    rules = []
    for number, query in enumerate(board_queries()):
        if query.startswith("label_values("):
            continue
        for variable, value in VARIABLES.items():
            query = query.replace(variable, value)
        rules.append({"record": f"gproxyd:board_query_{number}", "expr": query})
    path = tmp_path / "board-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "board", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def series(name: str, labels: dict, values: str) -> dict:
    text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def buckets(backend: str, where: dict, per_minute: dict[str, int]) -> list[dict]:
    """gproxyd_request_duration_seconds_bucket series counting up by `per_minute`
    (bucket bound -> requests at or below it each minute)."""
    return [series("gproxyd_request_duration_seconds_bucket",
                   dict(where, backend=backend, le=bound), f"0+{count}x40")
            for bound, count in per_minute.items()]


def annotations(alert: str, labels: dict, value: str) -> dict:
    """The alert's summary and description as Prometheus renders them for `labels`,
    with `value` for {{ $value | ... }}."""
    text = ALERTS.read_text()
    block = text[text.index(f"- alert: {alert}\n"):]
    rendered = {}
    for key in ("summary", "description"):
        template = re.search(rf'{key}: "(.*)"', block).group(1)
        template = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
        rendered[key] = re.sub(r"\{\{ \$value [^}]*\}\}", value, template)
    return rendered


def test_alerts_fire_on_trouble_and_not_on_health(tmp_path):
    """promtool test rules: 40 minutes of series per case; each alert fires where its
    trouble is, and nothing fires for the healthy route."""
    bad = {"instance": "a:9901", "job": "gproxyd", "route": "bad"}
    good = {"instance": "a:9901", "job": "gproxyd", "route": "good"}
    shadow = "10.0.0.6:80"
    fast = {"0.01": 600, "0.025": 600, "0.05": 600, "+Inf": 600}
    slow = {"0.01": 0, "0.025": 300, "0.05": 600, "+Inf": 600}  # p99 near 50 ms, not 10
    inputs = [
        # production: refuses every connect on "bad", serves on "good"
        series("gproxyd_connect_failures_total", dict(bad, backend="production"), "0+60x40"),
        series("gproxyd_requests_total", dict(bad, backend="production"), "0+0x40"),
        series("gproxyd_connect_failures_total", dict(good, backend="production"), "0+0x40"),
        series("gproxyd_requests_total", dict(good, backend="production"), "0+600x40"),
        # the shadow: drops 5% of its connections, 5% of answers differ, slower, on "bad"
        series("gproxyd_shadow_mirrored_total", dict(bad, backend=shadow), "0+100x40"),
        series("gproxyd_shadow_dropped_total", dict(bad, backend=shadow), "0+5x40"),
        series("gproxyd_shadow_compared_total", dict(bad, backend=shadow), "0+600x40"),
        series("gproxyd_shadow_mismatches_total", dict(bad, backend=shadow), "0+30x40"),
        series("gproxyd_requests_total", dict(bad, backend=shadow), "0+600x40"),
        *buckets("production", bad, fast), *buckets(shadow, bad, slow),
        series("gproxyd_shadow_mirrored_total", dict(good, backend=shadow), "0+100x40"),
        series("gproxyd_shadow_dropped_total", dict(good, backend=shadow), "0+0x40"),
        series("gproxyd_shadow_compared_total", dict(good, backend=shadow), "0+600x40"),
        series("gproxyd_shadow_mismatches_total", dict(good, backend=shadow), "0+0x40"),
        series("gproxyd_requests_total", dict(good, backend=shadow), "0+600x40"),
        *buckets("production", good, fast), *buckets(shadow, good, fast),
    ]

    def fired(name: str, labels: dict, value: str = "") -> dict:
        severity = "critical" if "Unreachable" in name else "warning"
        return {"eval_time": "35m", "alertname": name,
                "exp_alerts": [{"exp_labels": dict(labels, severity=severity),
                                "exp_annotations": annotations(name, labels, value)}]}

    where = {"instance": "a:9901"}
    tests = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": inputs,
        "alert_rule_test": [
            fired("GproxydProductionUnreachable", dict(where, route="bad")),
            fired("GproxydShadowDropping", dict(where, route="bad", backend=shadow), "5%"),
            fired("GproxydCandidateP99Regression", dict(where, route="bad", backend=shadow),
                  "49.5ms"),  # the slow buckets' p99: 25 ms + 0.98 x 25 ms
            fired("GproxydMismatchRate", dict(where, route="bad", backend=shadow), "5%"),
            # Before their `for` has passed, none of them fires yet.
            {"eval_time": "5m", "alertname": "GproxydCandidateP99Regression",
             "exp_alerts": []},
        ]}]}
    path = tmp_path / "gproxyd-alerts-test.yml"
    path.write_text(json.dumps(tests))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
