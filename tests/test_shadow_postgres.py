"""A PostgreSQL shadow behind a route, driven by pgbench and psql at default settings.

Production is the machine's PostgreSQL (127.0.0.1:5432, trust authentication for
127.0.0.1); the shadow is a second instance this module creates with initdb. pgbench
connects with sslmode=prefer: an 8-byte SSLRequest, production's 'N', then the
StartupMessage. A shadow that got both in one write refused the connection ("received
unencrypted data after SSL request") while gproxyd logged it `done`.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid

import pytest
from backends import unused_port, wait_for_lines

PRODUCTION = "127.0.0.1:5432"
RUNS = 5          # pgbench runs per write-delay setting
CLIENTS = 8       # pgbench connections per run
TRANSACTIONS = 20  # per connection


def _as_postgres(*command: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True,
                          capture_output=True, text=True, timeout=60, **options)


@pytest.fixture(scope="module")
def shadow_postgres():
    """A second PostgreSQL on a free port with trust authentication, for the module."""
    initdb = shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb"
    pg_ctl = os.path.join(os.path.dirname(os.path.realpath(initdb)), "pg_ctl")
    home = tempfile.mkdtemp(prefix="gproxyd-pg-", dir="/tmp")
    postgres = pwd.getpwnam("postgres")
    os.chown(home, postgres.pw_uid, postgres.pw_gid)
    data = os.path.join(home, "data")
    port = unused_port()
    _as_postgres(initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    _as_postgres(pg_ctl, "-D", data, "-w", "-l", os.path.join(home, "log"), "-o",
                 f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"127.0.0.1:{port}", os.path.join(home, "log")
    finally:
        _as_postgres(pg_ctl, "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(home, ignore_errors=True)


def _psql(address: str, database: str, sql: str) -> str:
    host, port = address.rsplit(":", 1)
    return subprocess.run(["psql", "-h", host, "-p", port, "-U", "postgres", "-d", database,
                           "-Atc", sql], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()


def _pgbench(address: str, database: str, *args: str) -> str:
    host, port = address.rsplit(":", 1)
    return subprocess.run(["pgbench", "-h", host, "-p", port, "-U", "postgres", *args,
                           database], check=True, capture_output=True, text=True,
                          timeout=120).stdout


@pytest.fixture
def database(shadow_postgres):
    """The same fresh pgbench database on production and on the shadow."""
    shadow, _ = shadow_postgres
    name = "gproxyd_" + uuid.uuid4().hex[:12]
    for address in (PRODUCTION, shadow):
        _psql(address, "postgres", f"CREATE DATABASE {name}")
        _pgbench(address, name, "-i", "-s", "1", "-q")
    yield name
    for address in (PRODUCTION, shadow):
        _psql(address, "postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.parametrize("write_delay", ["0", "5ms"])
def test_pgbench_through_a_route_commits_as_much_on_the_shadow(
        proxy, caplog, shadow_postgres, database, write_delay):
    shadow, shadow_log = shadow_postgres
    proxied = proxy(PRODUCTION, shadow=[shadow], shadow_write_delay=write_delay)
    route = "%s:%d" % proxied.sockaddr[:2]
    refused_before = open(shadow_log).read().count("unencrypted data after SSL request")

    for _ in range(RUNS):
        output = _pgbench(route, database, "-c", str(CLIENTS), "-t", str(TRANSACTIONS))
        processed = re.search(r"number of transactions actually processed: (\d+)", output)
        assert int(processed.group(1)) == CLIENTS * TRANSACTIONS, output
    assert _psql(route, database, "SELECT 1") == "1"  # psql, default sslmode too

    connections = RUNS * (CLIENTS + 1) + 1  # pgbench opens one more per run; psql one
    lines = wait_for_lines(caplog, connections, timeout=30)
    states = [line["shadows"][shadow] for line in lines]
    assert states == ["done"] * len(lines), [line for line in lines
                                             if line["shadows"][shadow] != "done"]
    # pgbench empties pgbench_history before each run: the last run's transactions.
    history = "SELECT count(*) FROM pgbench_history"
    assert _psql(shadow, database, history) == _psql(PRODUCTION, database, history) \
        == str(CLIENTS * TRANSACTIONS)
    # Every run's transactions moved money between the same accounts on both.
    balances = "SELECT sum(abalance), count(*) FILTER (WHERE abalance <> 0) FROM " \
               "pgbench_accounts"
    assert _psql(shadow, database, balances) == _psql(PRODUCTION, database, balances)
    assert open(shadow_log).read().count("unencrypted data after SSL request") \
        == refused_before
    stats = proxied.stats.shadows[shadow]
    assert stats.outcomes == {"done": len(lines)}
    assert stats.turn_timeouts == 0
