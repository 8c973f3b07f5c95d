"""The beanstalkd archive with a real beanstalkd and a real client (greenstalk): far-future
puts kept in the archive, answered from it, moved into beanstalkd when due."""
from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import uuid

import greenstalk
import pymysql
import pytest
from backends import recv_exactly, unused_port, wait_until

from gproxyd.interceptors.archive import ARCHIVE_BASE


@pytest.fixture
def beanstalkd():
    """A beanstalkd of the test's own on a free port: "127.0.0.1:PORT"."""
    binary = shutil.which("beanstalkd")
    assert binary, "beanstalkd is not installed (.ci/install-system-deps installs it)"
    port = unused_port()
    process = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port)])
    wait_until(lambda: _accepts(port), what="beanstalkd listening")
    yield f"127.0.0.1:{port}"
    process.kill()
    process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def mariadb_url():
    """A fresh database on the machine's MariaDB (root, no password), dropped after."""
    name = f"gproxyd_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = pymysql.connect(host="127.0.0.1", user="root", password="")
    except pymysql.err.OperationalError as error:
        pytest.fail(f"MariaDB on 127.0.0.1:3306 (root, no password) is not reachable: {error}")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    yield f"mysql://root@127.0.0.1:3306/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE {name}")
    admin.close()


@pytest.fixture(params=["sqlite", "mysql"])
def archive_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return request.getfixturevalue("mariadb_url")


def client(where, tube: str = "default") -> greenstalk.Client:
    host, port = where if isinstance(where, tuple) else where.rsplit(":", 1)
    return greenstalk.Client((host, int(port)), use=tube, watch=tube, encoding=None)


def through(proxied, tube: str = "default") -> greenstalk.Client:
    return client(tuple(proxied.sockaddr), tube)


def archiving(proxy, beanstalkd, archive_url, **options):
    options.setdefault("archive_after", "10m")
    options.setdefault("archive_lead", "30s")
    return proxy(beanstalkd, protocol="beanstalkd", archive=archive_url, **options)


def test_a_far_future_put_is_archived_and_answered_from_the_archive(proxy, beanstalkd,
                                                                     archive_url):
    proxied = archiving(proxy, beanstalkd, archive_url)
    producer = through(proxied, "mail")
    direct = client(beanstalkd, "mail")
    near = producer.put(b"soon", priority=5, delay=60, ttr=30)
    far = producer.put(b"\x00later\r\n\xff", priority=7, delay=86400, ttr=120)
    assert near < ARCHIVE_BASE <= far
    # beanstalkd holds the near job only; through gproxyd both are counted.
    assert direct.stats_tube("mail")["current-jobs-delayed"] == 1
    assert producer.stats_tube("mail")["current-jobs-delayed"] == 2
    assert producer.stats_tube("mail")["total-jobs"] == 2
    assert producer.stats()["current-jobs-delayed"] == direct.stats()["current-jobs-delayed"] + 1
    assert producer.peek(far).body == b"\x00later\r\n\xff"
    stats = producer.stats_job(far)
    assert (stats["id"], stats["tube"], stats["state"], stats["pri"], stats["ttr"]) == (
        far, "mail", "delayed", 7, 120)
    assert 86390 <= stats["time-left"] <= 86400
    with pytest.raises(greenstalk.NotFoundError):
        direct.peek(far)
    producer.delete(far)
    with pytest.raises(greenstalk.NotFoundError):
        producer.peek(far)
    with pytest.raises(greenstalk.NotFoundError):
        producer.delete(far)
    assert proxied.stats.archived_total == 1


def test_a_kicked_job_moves_into_beanstalkd_and_keeps_its_id(proxy, beanstalkd, archive_url):
    proxied = archiving(proxy, beanstalkd, archive_url)
    producer = through(proxied, "reports")
    job_id = producer.put(b"monthly", priority=3, delay=7 * 86400, ttr=42)
    producer.kick_job(job_id)
    consumer = client(beanstalkd, "reports")
    job = consumer.reserve(timeout=10)
    assert job.body == b"monthly" and job.id < ARCHIVE_BASE
    stats = consumer.stats_job(job.id)
    assert (stats["tube"], stats["pri"], stats["ttr"], stats["state"]) == (
        "reports", 3, 42, "reserved")
    # The producer's id still names the job, now that beanstalkd holds it.
    assert producer.peek(job_id).body == b"monthly"
    assert producer.stats_job(job_id)["id"] == job_id
    consumer.release(job)
    producer.delete(job_id)
    with pytest.raises(greenstalk.NotFoundError):
        consumer.peek(job.id)
    wait_until(lambda: proxied.stats.injected_total == 1, what="the injection counted")


def test_due_jobs_are_injected_with_the_delay_that_remains(proxy, beanstalkd, archive_url):
    proxied = archiving(proxy, beanstalkd, archive_url, archive_after="1s",
                        archive_lead="1s")
    producer = through(proxied, "due")
    ids = [producer.put(b"job %d" % number, priority=number, delay=3, ttr=10)
           for number in range(5)]
    assert all(job_id >= ARCHIVE_BASE for job_id in ids)
    consumer = client(beanstalkd, "due")
    got = []
    for _ in ids:
        job = consumer.reserve(timeout=15)
        got.append(job.body)
        consumer.delete(job)
    assert sorted(got) == [b"job %d" % number for number in range(5)]
    # Counted once the archive has let go of it, just after beanstalkd took it.
    wait_until(lambda: proxied.stats.injected_total == 5, what="5 injections counted")
    wait_until(lambda: proxied.stats.archived == 0, what="the archive empty")


def test_pipelined_commands_get_their_replies_in_order(proxy, beanstalkd, tmp_path):
    proxied = archiving(proxy, beanstalkd, f"sqlite:///{tmp_path}/jobs.db")
    sock = proxied.connect()
    sock.sendall(b"use pipe\r\nput 1 3600 10 3\r\nabc\r\nput 2 0 10 3\r\nxyz\r\n"
                 b"put 3 7200 10 1\r\nq\r\nlist-tube-used\r\n")
    replies = b""
    while replies.count(b"\r\n") < 5:
        replies += sock.recv(4096)
    lines = replies.split(b"\r\n")
    assert lines[0] == b"USING pipe"
    assert int(lines[1].split()[1]) >= ARCHIVE_BASE and lines[1].startswith(b"INSERTED ")
    assert lines[2].startswith(b"INSERTED ") and int(lines[2].split()[1]) < ARCHIVE_BASE
    assert lines[3].startswith(b"INSERTED ") and int(lines[3].split()[1]) >= ARCHIVE_BASE
    assert lines[4] == b"USING pipe"
    sock.close()


@pytest.mark.parametrize("stream, reply", [
    (b"put 1 3600 10 3\r\nabcd\r\n", b"EXPECTED_CRLF\r\n"),        # wrong byte count
    (b"put 1 3600 10 x\r\n", b"BAD_FORMAT\r\n"),                    # bad arguments
    (b"put 1 3600 10 70000\r\n" + b"z" * 70000 + b"\r\n", b"JOB_TOO_BIG\r\n"),
    (b"bogus-command\r\n", b"UNKNOWN_COMMAND\r\n"),
])
def test_bad_input_gets_beanstalkds_own_answer_and_nothing_is_archived(
        proxy, beanstalkd, tmp_path, stream, reply):
    proxied = archiving(proxy, beanstalkd, f"sqlite:///{tmp_path}/jobs.db")
    sock = proxied.connect()
    sock.sendall(stream)
    assert recv_exactly(sock, len(reply)) == reply
    sock.close()
    assert proxied.stats.archived_total == 0
    # The daemon keeps serving.
    assert through(proxied).put(b"ok", delay=3600) >= ARCHIVE_BASE


def test_a_client_vanishing_mid_body_archives_nothing(proxy, beanstalkd, tmp_path):
    proxied = archiving(proxy, beanstalkd, f"sqlite:///{tmp_path}/jobs.db")
    sock = proxied.connect()
    sock.sendall(b"put 1 3600 10 100\r\nonly part of it")
    sock.close()
    wait_until(lambda: proxied.stats.active == 0, what="the session ended")
    rows = sqlite3.connect(f"{tmp_path}/jobs.db").execute(
        "SELECT COUNT(*) FROM gproxyd_archive_jobs").fetchone()[0]
    assert rows == 0 and proxied.stats.archived_total == 0


def test_a_store_that_fails_answers_internal_error(proxy, beanstalkd, tmp_path):
    proxied = archiving(proxy, beanstalkd, f"sqlite:///{tmp_path}/jobs.db")
    producer = through(proxied)
    assert producer.put(b"stored", delay=3600) >= ARCHIVE_BASE
    sqlite3.connect(f"{tmp_path}/jobs.db").execute("DROP TABLE gproxyd_archive_jobs")
    sock = proxied.connect()
    sock.sendall(b"put 1 3600 10 3\r\nabc\r\nput 1 0 10 3\r\nxyz\r\n")
    assert recv_exactly(sock, len(b"INTERNAL_ERROR\r\n")) == b"INTERNAL_ERROR\r\n"
    assert sock.recv(100).startswith(b"INSERTED ")  # the next command is still served
    sock.close()


def test_beanstalkd_down_keeps_due_jobs_archived_until_it_is_back(proxy, tmp_path):
    port = unused_port()
    binary = shutil.which("beanstalkd")
    first = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port)])
    try:
        wait_until(lambda: _accepts(port), what="beanstalkd listening")
        proxied = archiving(proxy, f"127.0.0.1:{port}", f"sqlite:///{tmp_path}/jobs.db",
                            archive_after="1s", archive_lead="1s")
        through(proxied, "later").put(b"keep me", delay=3)
    finally:
        first.kill()
        first.wait(timeout=10)
    wait_until(lambda: proxied.stats.inject_failures > 0, timeout=15,
               what="an injection tried while beanstalkd is down")
    assert proxied.stats.archived == 1 and proxied.stats.injected_total == 0
    second = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port)])
    try:
        wait_until(lambda: _accepts(port), what="beanstalkd listening again")
        job = client(f"127.0.0.1:{port}", "later").reserve(timeout=40)
        assert job.body == b"keep me"
    finally:
        second.kill()
        second.wait(timeout=10)


def test_gproxyctl_and_the_log_line_show_the_archive(proxy, beanstalkd, tmp_path):
    from gproxyd.report import summary_line, table
    proxied = archiving(proxy, beanstalkd, f"sqlite:///{tmp_path}/jobs.db")
    through(proxied).put(b"x", delay=3600)
    snapshot = proxied.stats.snapshot()
    assert snapshot["archive"]["archived_total"] == 1
    wait_until(lambda: proxied.stats.snapshot()["archive"]["archived"] == 1,
               what="the injector's count")
    shown = table({"routes": {"jobs": proxied.stats.snapshot()}})
    assert "archive: 1 jobs archived now, 1 archived and 0 moved into beanstalkd" in shown
    assert "archive: archived=1 archived_total=1 injected_total=0" in summary_line(
        "jobs", proxied.stats.snapshot())
