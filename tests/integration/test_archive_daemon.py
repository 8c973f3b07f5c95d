"""The beanstalkd archive in the installed daemon: kill -9 before and during injection, a
fleet of two daemons sharing one MariaDB, 100,000 archived jobs, workers = 2 sharing one
SQLite file, --check-config and start-up errors for the archive keys, reload, and
gproxyctl stats. A beanstalkd of the test's own on a free port, greenstalk or raw
pipelined clients."""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from contextlib import closing
from pathlib import Path

import gevent
import greenstalk
import pymysql
import pytest
import requests
from service import GLOBAL, children, free_port, gproxyd_command, route_section, wait_until

from gproxyd.interceptors.archive import ARCHIVE_BASE
from gproxyd.interceptors.beanstalkd import BATCH, LEASE

# --- fixtures and helpers ---------------------------------------------------------------

def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def beanstalkd():
    """A beanstalkd of the test's own on a free port: "127.0.0.1:PORT"."""
    binary = shutil.which("beanstalkd")
    assert binary, "beanstalkd is not installed (.ci/install-system-deps installs it)"
    port = free_port()
    process = subprocess.Popen([binary, "-l", "127.0.0.1", "-p", str(port)])
    try:
        wait_until(lambda: _accepts(port), what="beanstalkd listening")
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def mariadb():
    """A fresh database on the machine's MariaDB (root, no password): its name, dropped
    after."""
    name = f"gproxyd_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = pymysql.connect(host="127.0.0.1", user="root", password="")
    except pymysql.err.OperationalError as error:
        pytest.fail(f"MariaDB on 127.0.0.1:3306 (root, no password) is not reachable: {error}")
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE {name}")
        admin.close()


@pytest.fixture
def memory_dir(tmp_path):
    """A directory on a tmpfs (/dev/shm) if there is one, else tmp_path: SQLite's
    synchronous=FULL then costs no disk sync, so the 100,000 puts measure gproxyd."""
    if not os.path.isdir("/dev/shm"):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="gproxyd-archive-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def jobs_config(port: int, beanstalkd: str, archive: str, admin: int | None = None,
                workers: int = 1, after: str = "1s", lead: str = "1s") -> str:
    head = GLOBAL
    if admin is not None:
        head = head.replace("admin = off", f"admin = 127.0.0.1:{admin}")
    if workers > 1:
        head = head.replace("log-level", f"workers = {workers}\nlog-level")
    return head + route_section("jobs", port, beanstalkd, protocol="beanstalkd",
                                archive=archive, archive_after=after, archive_lead=lead)


def start(daemons, directory: Path, config: str):
    directory.mkdir(parents=True, exist_ok=True)
    return daemons(directory, config).start()


def sigkill(daemon) -> None:
    daemon.process.kill()
    daemon.process.wait(timeout=10)


def client(address: str, tube: str = "default") -> greenstalk.Client:
    """A greenstalk client using and watching `tube`; no reply is waited for over 30 s."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    return greenstalk.Client(sock, use=tube, watch=tube, encoding=None)


def route_stats(admin: int, name: str = "jobs") -> dict:
    answer = requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["routes"][name]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def owner(pid: int) -> str:
    """The name a gproxyd process's claims carry."""
    return f"{socket.gethostname()}:{pid}"


def archived_rows(path: Path) -> list[tuple]:
    """(body, claimed_by, claimed_until) of every job an SQLite archive holds."""
    with closing(sqlite3.connect(path, timeout=10)) as db:
        return db.execute("SELECT body, claimed_by, claimed_until FROM gproxyd_archive_jobs"
                          ).fetchall()


def bodies(prefix: bytes, count: int) -> list[bytes]:
    return [b"%s-%06d" % (prefix, number) for number in range(count)]


class Lines:
    """Reply lines from a socket, read in large chunks."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def take(self, count: int) -> list[bytes]:
        while self.buffer.count(b"\r\n") < count:
            data = self.sock.recv(262144)
            if not data:
                raise AssertionError(f"closed with {count} replies owed: {self.buffer[-200:]!r}")
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\r\n", count)
        return lines


def put_pipelined(port: int, tube: bytes, payloads: list[bytes], delay: int,
                  window: int = 500) -> list[int]:
    """Put `payloads` on one connection, `window` commands sent before their replies are
    read; the ids."""
    ids = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = Lines(sock)
        sock.sendall(b"use %s\r\n" % tube)
        assert replies.take(1) == [b"USING %s" % tube]
        for start_at in range(0, len(payloads), window):
            chunk = payloads[start_at:start_at + window]
            sock.sendall(b"".join(b"put 100 %d 60 %d\r\n%s\r\n" % (delay, len(body), body)
                                  for body in chunk))
            for reply in replies.take(len(chunk)):
                word, _, job_id = reply.partition(b" ")
                assert word == b"INSERTED", reply
                ids.append(int(job_id))
    return ids


def put_all(port: int, tube: bytes, payloads: list[bytes], delay: int,
            connections: int = 4) -> list[int]:
    """put_pipelined over `connections` connections at once (greenlets); every id."""
    shares = [payloads[number::connections] for number in range(connections)]
    puts = [gevent.spawn(put_pipelined, port, tube, share, delay) for share in shares]
    gevent.joinall(puts, timeout=50, raise_error=True)
    assert all(put.successful() for put in puts), "puts still running after 50s"
    return [job_id for put in puts for job_id in put.value]


def reserve_all(consumer: greenstalk.Client, count: int, timeout: float = 10) -> Counter:
    """The bodies of `count` jobs reserved (left reserved: their ttr outlives the test)."""
    got = Counter()
    for _ in range(count):
        got[consumer.reserve(timeout=timeout).body] += 1
    return got


def nothing_more(consumer: greenstalk.Client) -> None:
    with pytest.raises(greenstalk.TimedOutError):
        consumer.reserve(timeout=0)


# --- 1. kill -9 before the jobs are due --------------------------------------------------

def test_kill_before_due_every_job_arrives_once_after_restart(tmp_path, daemons, beanstalkd):
    """50 jobs due in 6 s, archived; gproxyd SIGKILLed at once (no job claimed yet) and
    started again on the same file: beanstalkd gets each job exactly once."""
    store = tmp_path / "jobs.db"
    port = free_port()
    config = jobs_config(port, beanstalkd, f"sqlite:///{store}")
    first = start(daemons, tmp_path / "first", config)
    payloads = bodies(b"early", 50)
    producer = client(f"127.0.0.1:{port}", "early")
    ids = [producer.put(body, delay=6, ttr=60) for body in payloads]
    assert all(job_id > ARCHIVE_BASE for job_id in ids) and len(set(ids)) == 50
    sigkill(first)
    producer.close()
    rows = archived_rows(store)
    assert sorted(body for body, _, _ in rows) == payloads
    assert all(until == 0 for _, _, until in rows), "a job was claimed before the kill"
    consumer = client(beanstalkd, "early")
    assert consumer.stats_tube("early")["total-jobs"] == 0

    start(daemons, tmp_path / "second", config)
    got = reserve_all(consumer, 50, timeout=15)
    assert sorted(got) == payloads and set(got.values()) == {1}
    wait_until(lambda: archived_rows(store) == [], what="the archive empty")
    assert consumer.stats_tube("early")["total-jobs"] == 50
    nothing_more(consumer)
    consumer.close()


# --- 2. kill -9 while injecting ------------------------------------------------------------

def test_kill_during_injection_loses_nothing_and_duplicates_only_jobs_in_flight(
        tmp_path, daemons, beanstalkd):
    """2,000 jobs come due together; gproxyd is SIGKILLed while it moves them into
    beanstalkd and started again. Every job arrives; the duplicates are exactly the jobs
    beanstalkd had taken whose removal from the archive the kill prevented: at most one
    batch, and all among the jobs the dead process held a claim on.

    The dead process's claims are 60 s leases: the new process must leave those jobs
    alone while the rest are moved; then the test makes the leases run out (it sets
    their end to the past in the file) instead of waiting a minute."""
    total = 2000
    store = tmp_path / "jobs.db"
    port = free_port()
    config = jobs_config(port, beanstalkd, f"sqlite:///{store}")
    first = start(daemons, tmp_path / "first", config)
    payloads = bodies(b"burst", total)
    began = time.monotonic()
    ids = put_all(port, b"burst", payloads, delay=4)
    put_seconds = time.monotonic() - began
    assert len(set(ids)) == total and min(ids) > ARCHIVE_BASE

    watcher = client(beanstalkd, "burst")
    wait_until(lambda: watcher.stats_tube("burst")["total-jobs"] >= 350, timeout=15,
               interval=0.002, what="injection under way")
    sigkill(first)
    in_beanstalkd = watcher.stats_tube("burst")["total-jobs"]
    rows = archived_rows(store)
    now = time.time()
    held = {body for body, by, until in rows if until > now}
    assert {by for body, by, until in rows if until > now} <= {owner(first.pid)}
    assert all(until > now + LEASE - 15 for _, _, until in rows if until > now)
    assert 0 < in_beanstalkd < total, f"{in_beanstalkd} injected at the kill"
    in_flight = in_beanstalkd + len(rows) - total  # in beanstalkd and still archived
    assert 0 <= in_flight <= len(held) <= BATCH

    start(daemons, tmp_path / "second", config)
    # The jobs nobody holds are moved; the dead process's leases are respected.
    wait_until(lambda: {body for body, _, _ in archived_rows(store)} == held, timeout=15,
               what="every job but the leased ones moved")
    with closing(sqlite3.connect(store, timeout=10)) as db:
        db.execute("UPDATE gproxyd_archive_jobs SET claimed_until = ? WHERE claimed_by = ?",
                   (time.time() - 1, owner(first.pid)))
        db.commit()
    wait_until(lambda: archived_rows(store) == [], timeout=15, what="the archive empty")

    arrived = watcher.stats_tube("burst")["total-jobs"]
    got = reserve_all(watcher, arrived)
    nothing_more(watcher)
    watcher.close()
    duplicates = {body: count for body, count in got.items() if count > 1}
    print(f"\narchive kill -9 during injection: puts {total / put_seconds:.0f}/s; "
          f"{in_beanstalkd} in beanstalkd at the kill, {len(held)} leased by the dead "
          f"process, {arrived - total} duplicates")
    assert set(got) == set(payloads)
    assert arrived - total == sum(count - 1 for count in duplicates.values()) == in_flight
    assert set(duplicates) <= held and set(duplicates.values()) <= {2}
    assert arrived - total <= BATCH


# --- 3. a fleet sharing one MariaDB ------------------------------------------------------

def test_two_daemons_sharing_mariadb_inject_every_job_once(tmp_path, mariadb, daemons,
                                                           beanstalkd):
    """Two daemons on different ports, one MariaDB database, one beanstalkd; 1,000 jobs
    due in 4 s, half put through each: beanstalkd gets every job exactly once (claims
    with SKIP LOCKED), and the daemons' injected_total add up to 1,000."""
    total = 1000
    url = f"mysql://root:@127.0.0.1:3306/{mariadb}"
    ports, admins = [free_port(), free_port()], [free_port(), free_port()]
    for name, port, admin in zip("ab", ports, admins, strict=True):
        start(daemons, tmp_path / name, jobs_config(port, beanstalkd, url, admin=admin))
    payloads = bodies(b"fleet", total)
    halves = [payloads[:total // 2], payloads[total // 2:]]
    began = time.monotonic()
    puts = [gevent.spawn(put_all, port, b"fleet", half, 4, 2)
            for port, half in zip(ports, halves, strict=True)]
    gevent.joinall(puts, timeout=50, raise_error=True)
    put_seconds = time.monotonic() - began
    ids = [job_id for put in puts for job_id in put.value]
    assert len(set(ids)) == total and min(ids) > ARCHIVE_BASE

    def injected() -> list[int]:
        return [route_stats(admin)["archive"]["injected_total"] for admin in admins]
    wait_until(lambda: sum(injected()) >= total, timeout=30, interval=0.1,
               what=f"{total} injections")
    split = injected()
    consumer = client(beanstalkd, "fleet")
    got = reserve_all(consumer, total)
    assert sorted(got) == payloads and set(got.values()) == {1}
    nothing_more(consumer)
    assert consumer.stats_tube("fleet")["total-jobs"] == total
    consumer.close()
    for admin in admins:
        archive = route_stats(admin)["archive"]
        assert archive["store"] == f"mysql://root:***@127.0.0.1:3306/{mariadb}"
        assert archive["archived_total"] == total // 2 and archive["inject_failures"] == 0
    assert sum(injected()) == total
    print(f"\narchive fleet on MariaDB: puts {total / put_seconds:.0f}/s; injected "
          f"{split[0]} + {split[1]}")
    assert min(split) > 0, f"one daemon injected everything: {split}"


# --- 4. 100,000 archived jobs --------------------------------------------------------------

def test_a_hundred_thousand_archived_jobs_stay_out_of_beanstalkd(memory_dir, tmp_path,
                                                                  daemons, beanstalkd):
    """100,000 puts a week ahead, pipelined over 4 connections: none reaches beanstalkd,
    stats through gproxyd counts them all as delayed, and gproxyd's memory does not grow
    with the number archived (VmRSS after 10,000 and after 100,000)."""
    total, first_part = 100_000, 10_000
    port = free_port()
    daemon = start(daemons, tmp_path, jobs_config(port, beanstalkd,
                                                  f"sqlite:///{memory_dir}/jobs.db",
                                                  after="1h", lead="1m"))
    payloads = bodies(b"far", total)
    began = time.monotonic()
    put_all(port, b"far", payloads[:first_part], delay=7 * 86400)
    rss_small = rss_kib(daemon.pid)
    put_all(port, b"far", payloads[first_part:], delay=7 * 86400)
    seconds = time.monotonic() - began
    rss_large = rss_kib(daemon.pid)

    direct = client(beanstalkd, "far")
    proxied = client(f"127.0.0.1:{port}", "far")
    assert direct.stats()["current-jobs-delayed"] == 0
    assert direct.stats_tube("far")["total-jobs"] == 0
    assert proxied.stats()["current-jobs-delayed"] == total
    tube = proxied.stats_tube("far")
    assert (tube["current-jobs-delayed"], tube["total-jobs"]) == (total, total)
    direct.close()
    proxied.close()
    print(f"\narchive 100k: {total / seconds:.0f} puts/s; VmRSS {rss_small / 1024:.1f} MiB "
          f"after {first_part}, {rss_large / 1024:.1f} MiB after {total}")
    assert rss_large < rss_small + 30 * 1024


# --- 5. workers = 2 on one SQLite file ------------------------------------------------------

def test_two_workers_share_the_sqlite_archive(tmp_path, daemons, beanstalkd):
    """workers = 2: puts through both workers are archived in one SQLite file, both
    injectors claim from it, every job reaches beanstalkd exactly once, and the merged
    /stats count each put and each injection once. 16 connections: all on one worker has
    probability 2**-15."""
    total, connections = 400, 16
    store = tmp_path / "jobs.db"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d", jobs_config(port, beanstalkd, f"sqlite:///{store}",
                                                       admin=admin, workers=2))
    workers = children(daemon.pid)
    assert len(workers) == 2
    payloads = bodies(b"pair", total)
    # One connection a share: the kernel spreads them over the two workers.
    shares = [payloads[number::connections] for number in range(connections)]
    puts = [gevent.spawn(put_pipelined, port, b"pair", share, 3) for share in shares]
    gevent.joinall(puts, timeout=30, raise_error=True)
    assert min(job_id for put in puts for job_id in put.value) > ARCHIVE_BASE

    consumer = client(beanstalkd, "pair")
    got = reserve_all(consumer, total, timeout=15)
    assert sorted(got) == payloads and set(got.values()) == {1}
    wait_until(lambda: archived_rows(store) == [], what="the archive empty")
    # Workers report twice a second; `archived` is what each saw at its last look.
    seen = {}

    def merged():
        archive = seen["archive"] = route_stats(admin)["archive"]
        return (archive["archived_total"], archive["injected_total"], archive["archived"],
                archive["inject_failures"]) == (total, total, 0, 0)
    try:
        wait_until(merged, what="merged numbers")
    except AssertionError as error:
        raise AssertionError(f"{error}; last /stats archive: {seen}") from None
    nothing_more(consumer)
    assert consumer.stats_tube("pair")["total-jobs"] == total
    consumer.close()
    # Both workers took puts: each connection's close line names the worker's pid.
    wait_until(lambda: daemon.log().count("info: route=jobs client=") >= connections,
               what="a close line per connection")
    logged_by = {int(line.split("gproxyd[", 1)[1].split("]", 1)[0])
                 for line in daemon.log().splitlines() if "info: route=jobs client=" in line}
    assert logged_by == set(workers)


# --- 6. --check-config and start-up errors ------------------------------------------------

# GLOBAL is 5 lines: [route jobs] is line 6, listen 7, production 8, the keys from 9 on.
BAD_ARCHIVE_KEYS = [
    ({"protocol": "http", "archive": "sqlite:///jobs.db"}, 10,
     "archive: jobs are archived from beanstalkd traffic (expected protocol = beanstalkd)"),
    ({"protocol": "beanstalkd", "archive": "mysql://root:s3cr3t@db.example/jobs/x"}, 10,
     "archive: bad archive 'mysql://root:***@db.example/jobs/x' (expected "
     "sqlite:////path/jobs.db or mysql://user:password@host:3306/database)"),
    ({"protocol": "beanstalkd", "archive": "postgres://root:s3cr3t@db.example/jobs"}, 10,
     "archive: bad archive 'postgres://root:***@db.example/jobs' (expected "
     "sqlite:////path/jobs.db or mysql://user:password@host:3306/database)"),
    ({"protocol": "beanstalkd", "shadow": "127.0.0.1:9002", "archive": "sqlite:///jobs.db"},
     11, "archive: a route with an archive answers some commands itself, so shadows would "
     "not see what production sees (expected no shadow or baseline with archive)"),
]


@pytest.mark.parametrize("keys, line, problem", BAD_ARCHIVE_KEYS,
                         ids=["http-route", "bad-mysql-url", "unknown-kind", "shadow"])
def test_check_config_names_the_bad_archive_key(tmp_path, keys, line, problem):
    config = tmp_path / "gproxyd.conf"
    config.write_text(GLOBAL + route_section("jobs", free_port(), "127.0.0.1:9001", **keys))
    result = subprocess.run(gproxyd_command() + ["--check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr == f"gproxyd: {config}:{line}: {problem}\n"
    assert "s3cr3t" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unreachable_mysql_archive_stops_the_start(tmp_path, workers):
    config = tmp_path / "gproxyd.conf"
    config.write_text(jobs_config(free_port(), "127.0.0.1:9001",
                                  "mysql://root:s3cr3t@127.0.0.1:1/x", workers=workers))
    log = tmp_path / "gproxyd.log"
    result = subprocess.run(gproxyd_command() + ["-c", str(config), "--log-file", str(log)],
                            capture_output=True, text=True, timeout=30)
    problem = ("route jobs: archive: cannot open archive mysql://root:***@127.0.0.1:1/x: "
               "Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection refused) "
               "(MySQL error 2003)")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"gproxyd: {problem}\n"
    assert f" error: {problem}\n" in log.read_text()
    assert "s3cr3t" not in log.read_text()


# --- 7. reload ----------------------------------------------------------------------------

def test_reload_changes_archive_after_and_keeps_the_store_it_cannot_replace(
        tmp_path, daemons, beanstalkd):
    store = tmp_path / "jobs.db"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d", jobs_config(
        port, beanstalkd, f"sqlite:///{store}", admin=admin, after="1h"))
    before = client(f"127.0.0.1:{port}", "mix")
    assert before.put(b"ten minutes", delay=600) < ARCHIVE_BASE  # not delayed enough

    daemon.write_config(jobs_config(port, beanstalkd, f"sqlite:///{store}", admin=admin,
                                    after="5m"))
    daemon.reload()
    after = client(f"127.0.0.1:{port}", "mix")
    assert after.put(b"archived now", delay=600) > ARCHIVE_BASE
    # A connection accepted before the reload keeps its settings, and is served.
    assert before.put(b"still relayed", delay=600) < ARCHIVE_BASE

    unopenable = "mysql://root:s3cr3t@127.0.0.1:1/x"
    daemon.write_config(jobs_config(port, beanstalkd, unopenable, admin=admin, after="5m"))
    daemon.reload()
    daemon.wait_log("cannot open archive mysql://root:***@127.0.0.1:1/x")
    last = client(f"127.0.0.1:{port}", "mix")
    kept = last.put(b"in the old store", delay=600)
    assert kept > ARCHIVE_BASE and last.peek(kept).body == b"in the old store"
    assert sorted(body for body, _, _ in archived_rows(store)) == [b"archived now",
                                                                   b"in the old store"]
    line = next(line for line in daemon.log().splitlines() if "cannot open archive" in line)
    assert " error: " in line and line.endswith(f"; keeping sqlite:///{store}"), line
    assert "s3cr3t" not in daemon.log()
    assert route_stats(admin)["archive"]["store"] == f"sqlite:///{store}"
    assert route_stats(admin)["archive"]["archived_total"] == 2
    direct = client(beanstalkd, "mix")
    assert direct.stats_tube("mix")["total-jobs"] == 2
    for connection in (before, after, last, direct):
        connection.close()
    assert daemon.process.poll() is None


def test_a_reload_keeping_the_old_store_applies_the_new_archive_after(tmp_path, daemons,
                                                                      beanstalkd):
    store = tmp_path / "jobs.db"
    port = free_port()
    daemon = start(daemons, tmp_path / "d", jobs_config(port, beanstalkd, f"sqlite:///{store}",
                                                       after="5m"))
    daemon.write_config(jobs_config(port, beanstalkd, "mysql://root:s3cr3t@127.0.0.1:1/x",
                                    after="20m"))
    daemon.reload()
    daemon.wait_log("cannot open archive mysql://root:***@127.0.0.1:1/x")
    producer = client(f"127.0.0.1:{port}", "mix")
    try:
        assert producer.put(b"ten minutes", delay=600) < ARCHIVE_BASE  # 600 s < 20m
    finally:
        producer.close()


def test_a_connection_accepted_before_the_archive_moved_is_still_served(tmp_path, daemons,
                                                                         beanstalkd):
    """README: a session keeps the route it was accepted with; listener.py: live
    sessions keep the store they use."""
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    port = free_port()
    daemon = start(daemons, tmp_path / "d", jobs_config(port, beanstalkd, f"sqlite:///{one}",
                                                       after="5m"))
    early = client(f"127.0.0.1:{port}", "moved")
    first = early.put(b"before the move", delay=600)
    daemon.write_config(jobs_config(port, beanstalkd, f"sqlite:///{two}", after="5m"))
    daemon.reload()
    later = client(f"127.0.0.1:{port}", "moved")
    assert later.put(b"after the move", delay=600) > ARCHIVE_BASE
    assert [body for body, _, _ in archived_rows(two)] == [b"after the move"]
    later.close()
    try:
        assert early.put(b"early again", delay=600) > ARCHIVE_BASE
        assert early.peek(first).body == b"before the move"
    finally:
        early.close()
    assert sorted(body for body, _, _ in archived_rows(one)) == [b"before the move",
                                                                 b"early again"]


# --- 8. gproxyctl stats ---------------------------------------------------------------------

def test_gproxyctl_stats_shows_the_archive(tmp_path, daemons, beanstalkd):
    store = tmp_path / "jobs.db"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d", jobs_config(port, beanstalkd,
                                                       f"sqlite:///{store}", admin=admin))
    producer = client(f"127.0.0.1:{port}", "ctl")
    for number in range(3):
        producer.put(b"later %d" % number, delay=3600)
    producer.put(b"soon", delay=2)
    producer.close()
    wait_until(lambda: route_stats(admin)["archive"]["injected_total"] == 1
               and route_stats(admin)["archive"]["archived"] == 3, timeout=15,
               what="one job moved, three archived")
    ctl = Path(gproxyd_command()[0]).with_name("gproxyctl")
    result = subprocess.run([str(ctl), "stats", "-c", str(daemon.config_path), "--interval",
                             "0.1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("  archive: ")]
    assert lines == [f"  archive: 3 jobs archived now, 4 archived and 1 moved into beanstalkd "
                     f"since start, 0 failed moves, oldest overdue 0s (sqlite:///{store})"]
