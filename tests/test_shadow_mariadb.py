"""A MariaDB shadow under server-side prepared statements is reported `diverged`.

Prepared-statement ids are numbered by the server, per connection thread (and threads are
reused): the id production hands the client means nothing to the shadow, which answers
each EXECUTE with an error. The test leaves the shadow's one cached thread at id 200, so
the two numberings differ (unless production's thread stands at exactly 200).
Production is the machine's MariaDB (root, no password, database `test`); the shadow is
a second mariadbd this module starts (with --skip-grant-tables: it takes the mirrored
login as it is).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile

import mysql.connector
import pytest
from backends import unused_port, wait_for_lines, wait_until

PRODUCTION = ("127.0.0.1", 3306)


def _connect(host: str, port: int, **options):
    return mysql.connector.connect(host=host, port=port, user="root", password="",
                                   connection_timeout=10, **options)


def _answers(port: int) -> bool:
    try:
        _connect("127.0.0.1", port).close()
        return True
    except mysql.connector.Error:
        return False


@pytest.fixture(scope="module")
def shadow_mariadb():
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    assert install, "mariadb-install-db is missing (.ci/install-system-deps installs it)"
    home = tempfile.mkdtemp(prefix="gproxyd-mariadb-", dir="/tmp")
    port = unused_port()
    subprocess.run([install, "--no-defaults", f"--datadir={home}/data", "--user=root",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True, timeout=120)
    process = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={home}/data", f"--socket={home}/sock",
         f"--port={port}", "--bind-address=127.0.0.1", "--user=root",
         "--skip-grant-tables", "--skip-log-bin", "--innodb-buffer-pool-size=16M",
         "--thread-cache-size=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(port), timeout=60, what="the shadow mariadbd up")
        setup = _connect("127.0.0.1", port)
        setup.cursor().execute("CREATE DATABASE IF NOT EXISTS test")
        setup.close()
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def _skew(shadow: str) -> None:
    """Leave the shadow's one cached connection thread at statement id 200: the next
    connection (the mirrored one) is numbered from 201, where production numbers it
    from wherever its thread is (ids count per thread; a failed prepare counts too)."""
    host, port = shadow.rsplit(":", 1)
    connection = _connect(host, int(port))
    for number in range(200):
        cursor = connection.cursor(prepared=True)
        cursor.execute(f"SELECT {number} + %s", (1,))
        cursor.fetchall()
        cursor.close()
    connection.close()


def test_prepared_statements_make_a_mariadb_shadow_diverged(proxy, caplog, shadow_mariadb):
    _skew(shadow_mariadb)
    proxied = proxy("%s:%d" % PRODUCTION, shadow=[shadow_mariadb])
    client = _connect(*proxied.sockaddr[:2], database="test")
    cursor = client.cursor(prepared=True)
    rows = 0
    for number in range(40):
        cursor.execute("SELECT REPEAT(%s, 1000) FROM seq_1_to_50", (str(number % 10),))
        rows += len(cursor.fetchall())
    client.close()
    assert rows == 40 * 50  # production answered every EXECUTE

    line, = wait_for_lines(caplog, timeout=15)
    assert line["shadows"] == {shadow_mariadb: "diverged"}, line
    assert line["why"][shadow_mariadb].startswith("answered-"), line
    stats = proxied.stats.shadows[shadow_mariadb]
    assert stats.outcomes == {"diverged": 1}
    assert stats.bytes_received < proxied.stats.production.bytes_received / 2
