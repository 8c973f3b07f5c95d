"""interceptors/archive.py: both stores keep jobs, claims and mappings alike.

Every test that takes `url` runs twice: on an SQLite file in tmp_path, and on a database
of its own that it creates on the machine's MariaDB (root, no password, 127.0.0.1:3306)
and drops at its end. MariaDB not answering fails those tests; it never skips them.
Times given to the stores (due, now) are made up: nothing here waits for a clock.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
import time

import gevent
import pymysql
import pytest

from gproxyd.interceptors.archive import ARCHIVE_BASE, SCHEMA_VERSION, ArchiveError, open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
EXPECTED = "expected sqlite:////path/jobs.db or mysql://user:password@host:3306/database"
NOW = 1_800_000_000.0   # "now" for claims and dues


# --- fixtures -----------------------------------------------------------------------------

def _mariadb(**options) -> pymysql.connections.Connection:
    try:
        return pymysql.connect(**MARIADB, connect_timeout=5, autocommit=True, **options)
    except pymysql.MySQLError as error:
        pytest.fail(f"the machine's MariaDB (root, no password, 127.0.0.1:3306) does not "
                    f"answer: {error} (.ci/install-system-deps installs it; start it with "
                    "`service mariadb start`)", pytrace=False)


@pytest.fixture
def mysql_database():
    """A fresh database on the machine's MariaDB, dropped at the end."""
    admin = _mariadb()
    name = f"gproxyd_test_{secrets.token_hex(6)}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture(params=["sqlite", "mysql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/jobs.db"
    return f"mysql://root@127.0.0.1:3306/{request.getfixturevalue('mysql_database')}"


@pytest.fixture
def stores(url):
    """stores(owner='a') -> a Store opened on `url`; all are closed at the end."""
    opened = []

    def open_one(owner: str = "a"):
        opened.append(open_store(url, owner))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


class Raw:
    """Plain SQL on a store's database, beside the stores (sqlite3 or PyMySQL, each
    statement committed unless begin() started a transaction)."""

    def __init__(self, url: str):
        self.sqlite = url.startswith("sqlite:")
        if self.sqlite:
            self.connection = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        else:
            self.connection = _mariadb(database=url.rsplit("/", 1)[1])

    def execute(self, sql: str, params: tuple = ()) -> list:
        if self.sqlite:
            return self.connection.execute(sql, params).fetchall()
        with self.connection.cursor() as cursor:
            cursor.execute(sql.replace("?", "%s"), params)
            return list(cursor.fetchall())

    def hold(self, job_id: int) -> None:
        """Holds that job's row the way a claim in progress does: SQLite's write lock,
        MySQL's row lock, until end()."""
        if self.sqlite:
            self.execute("BEGIN IMMEDIATE")
        else:
            self.execute("BEGIN")
            self.execute("SELECT id FROM gproxyd_archive_jobs WHERE id = ? FOR UPDATE",
                         (job_id - ARCHIVE_BASE,))

    def end(self, commit: bool = False) -> None:
        self.execute("COMMIT" if commit else "ROLLBACK")

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def raw(url):
    opened = Raw(url)
    yield opened
    opened.close()


class Ticker:
    """A greenlet that counts 1 ms sleeps: it only advances while the hub runs."""

    def __init__(self):
        self.ticks = 0
        self._greenlet = gevent.spawn(self._run)

    def _run(self):
        while True:
            gevent.sleep(0.001)
            self.ticks += 1

    def wait(self, ticks: int) -> None:
        """Until `ticks` more ticks were counted (bounded)."""
        goal = self.ticks + ticks
        with gevent.Timeout(10, AssertionError(f"the hub ran {self.ticks} ticks, not {goal}")):
            while self.ticks < goal:
                gevent.sleep(0.001)

    def stop(self) -> None:
        self._greenlet.kill()


@pytest.fixture
def ticker():
    running = Ticker()
    yield running
    running.stop()


def _put(store, due: float = NOW, tube: str = "default", body: bytes = b"job") -> int:
    return store.put(tube, 1024, due, 60, body)


# --- jobs ---------------------------------------------------------------------------------

BODIES = [bytes(range(256)), b"", b"\r\nput 0 0 1 1\r\nx\r\n", os.urandom(64 * 1024)]


def test_put_and_get_keep_every_field(stores):
    store = stores()
    before = time.time()
    puts = [("default", 0, NOW + 0.123456, 1, BODIES[0]),
            ("a-b_c+d;e$f(g).h/i", 2 ** 32 - 1, NOW + 3600, 2 ** 32 - 1, BODIES[1]),
            ("t" * 200, 1024, NOW - 86400.5, 120, BODIES[2]),
            ("big", 5, NOW, 60, BODIES[3])]
    ids = [store.put(*values) for values in puts]
    after = time.time()
    for job_id, (tube, pri, due, ttr, body) in zip(ids, puts, strict=False):
        job = store.get(job_id)
        assert (job.id, job.tube, job.pri, job.ttr, job.body) == (job_id, tube, pri, ttr, body)
        assert job.due == pytest.approx(due, abs=1e-6)
        assert before - 1e-3 <= job.created <= after + 1e-3


def test_a_tube_name_longer_than_200_bytes_is_refused(stores):
    with pytest.raises(ValueError, match="tube name longer than 200 bytes"):
        stores().put("t" * 201, 0, NOW, 60, b"")


def test_ids_start_above_archive_base_and_are_never_reused(stores):
    store = stores()
    ids = [_put(store) for _ in range(5)]
    assert ids[0] > ARCHIVE_BASE
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert store.delete(ids[-1])
    store.injected(ids[-2], 7, NOW)
    store.close()
    reopened = stores()
    assert _put(reopened) > ids[-1]  # the deleted and the injected ids stay theirs


def test_an_id_below_archive_base_is_not_archived(stores):
    store = stores()
    _put(store)
    for job_id in (1, 2 ** 32, ARCHIVE_BASE):
        assert store.get(job_id) is None
        assert store.delete(job_id) is False
        assert store.kick(job_id, NOW) is False
        assert store.mapped(job_id) is None


def test_delete_removes_a_job(stores):
    store = stores()
    kept, deleted = _put(store), _put(store)
    assert store.delete(deleted) is True
    assert store.get(deleted) is None
    assert store.delete(deleted) is False
    assert store.get(kept).id == kept
    assert store.counts() == {"default": 1}


def test_kick_makes_a_job_due_now(stores):
    store = stores()
    later, overdue = _put(store, NOW + 86400), _put(store, NOW - 100)
    assert store.kick(later, NOW) is True
    assert store.get(later).due == NOW
    assert store.kick(overdue, NOW) is True
    assert store.get(overdue).due == NOW - 100  # kicking never makes a job due later
    assert store.kick(later + 1000, NOW) is False
    assert [job.id for job in store.claim_due(NOW, NOW, 10, 60)] == [overdue, later]


# --- claims -------------------------------------------------------------------------------

def test_claim_due_takes_the_earliest_due_first_up_to_limit(stores):
    store = stores()
    dues = [NOW - 5, NOW + 30, NOW - 50, NOW + 10, NOW - 20, NOW + 500]
    ids = {due: _put(store, due) for due in dues}
    first = store.claim_due(NOW + 30, NOW, 3, 60)
    assert [job.due for job in first] == [NOW - 50, NOW - 20, NOW - 5]
    assert [job.id for job in first] == [ids[NOW - 50], ids[NOW - 20], ids[NOW - 5]]
    assert first[0].body == b"job" and first[0].tube == "default"
    rest = store.claim_due(NOW + 30, NOW, 3, 60)
    assert [job.due for job in rest] == [NOW + 10, NOW + 30]  # NOW + 500 is beyond the horizon
    assert store.claim_due(NOW + 30, NOW, 3, 60) == []
    assert store.claim_due(NOW + 1000, NOW, 0, 60) == []
    assert store.get(ids[NOW - 50]) == first[0]  # a claimed job is still archived


def test_equal_dues_are_claimed_in_put_order(stores):
    store = stores()
    ids = [_put(store, NOW) for _ in range(5)]
    assert [job.id for job in store.claim_due(NOW, NOW, 5, 60)] == ids


def test_a_claim_is_a_lease(stores):
    a, b = stores("a"), stores("b")
    job_id = _put(a, NOW - 10)
    assert [job.id for job in a.claim_due(NOW, NOW, 10, 60)] == [job_id]
    assert a.claim_due(NOW, NOW, 10, 60) == []            # its own claim holds too
    assert b.claim_due(NOW, NOW + 30, 10, 60) == []
    assert b.claim_due(NOW, NOW + 60, 10, 60) == []       # until the lease's very end
    assert [job.id for job in b.claim_due(NOW, NOW + 60.5, 10, 60)] == [job_id]
    assert a.claim_due(NOW, NOW + 61, 10, 60) == []       # now b's, until NOW + 120.5


def test_release_gives_only_ones_own_claims_back(stores, raw):
    a, b = stores("a"), stores("b")
    ids = [_put(a, NOW - 10) for _ in range(3)]
    assert len(a.claim_due(NOW, NOW, 2, 60)) == 2
    b.release(ids)                                         # not b's to release
    assert [job.id for job in b.claim_due(NOW, NOW, 10, 60)] == [ids[2]]
    a.release(ids[:2] + [5])
    assert [job.id for job in b.claim_due(NOW, NOW, 10, 60)] == ids[:2]
    a.release([])
    assert raw.execute("SELECT claimed_by, COUNT(*) FROM gproxyd_archive_jobs "
                       "GROUP BY claimed_by") == [("b", 3)]


def test_two_owners_claiming_at_once_get_every_job_exactly_once(stores, raw):
    """Each round starts three claims per store at once (each store takes them in turn,
    the two stores side by side: SQLite in two pool threads, MySQL on two connections),
    so that every round the two owners' claims meet in the database."""
    a, b = stores("a"), stores("b")
    ids = [_put(a, NOW - 2000 + number, body=b"%d" % number) for number in range(1000)]
    claimed = {"a": [], "b": []}

    def claim(store):
        claimed[store.owner].extend(job.id for job in store.claim_due(NOW, NOW, 7, 600))

    while True:
        before = len(claimed["a"]) + len(claimed["b"])
        gevent.joinall([gevent.spawn(claim, store) for store in (a, b, a, b, a, b)],
                       raise_error=True)
        if len(claimed["a"]) + len(claimed["b"]) == before:
            break
    everything = claimed["a"] + claimed["b"]
    assert len(everything) == len(set(everything)) == 1000
    assert sorted(everything) == ids
    assert len(claimed["a"]) >= 250 and len(claimed["b"]) >= 250  # they took turns
    assert dict(raw.execute("SELECT claimed_by, COUNT(*) FROM gproxyd_archive_jobs GROUP BY "
                            "claimed_by")) == {"a": len(claimed["a"]), "b": len(claimed["b"])}


def test_mysql_claims_skip_rows_another_claim_is_locking(mysql_database):
    """SKIP LOCKED: a claim in progress elsewhere is passed over, never waited for."""
    url = f"mysql://root@127.0.0.1/{mysql_database}"
    store, other = open_store(url, "a"), Raw(url)
    try:
        ids = [_put(store, NOW - 100 + number) for number in range(6)]
        other.execute("BEGIN")
        other.execute("SELECT id FROM gproxyd_archive_jobs ORDER BY due LIMIT 2 FOR UPDATE")
        with gevent.Timeout(5, AssertionError("the claim waited for the locked rows")):
            assert [job.id for job in store.claim_due(NOW, NOW, 3, 60)] == ids[2:5]
        other.end()
        assert [job.id for job in store.claim_due(NOW, NOW, 3, 60)] == ids[:2] + ids[5:]
    finally:
        store.close()
        other.close()


def test_sqlite_claims_wait_for_another_writer(tmp_path, ticker):
    """BEGIN IMMEDIATE: a claim waits while another process writes, then sees its claims."""
    url = f"sqlite:///{tmp_path}/jobs.db"
    store, other = open_store(url, "a"), Raw(url)
    try:
        ids = [_put(store, NOW - 100 + number) for number in range(6)]
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE gproxyd_archive_jobs SET claimed_by = 'b', claimed_until = ? "
                      "WHERE id IN (?, ?)", (NOW + 60, ids[0] - ARCHIVE_BASE,
                                             ids[1] - ARCHIVE_BASE))
        claim = gevent.spawn(store.claim_due, NOW, NOW, 3, 60)
        ticker.wait(20)
        assert not claim.ready()
        other.end(commit=True)
        assert [job.id for job in claim.get(timeout=10)] == ids[2:5]
    finally:
        store.close()
        other.close()


# --- injected jobs ------------------------------------------------------------------------

def test_injected_moves_a_job_out_and_keeps_its_mapping(stores):
    store = stores()
    moved, kept = _put(store, NOW - 10, tube="mail"), _put(store, NOW - 5, tube="mail")
    assert [job.id for job in store.claim_due(NOW, NOW, 1, 60)] == [moved]
    store.injected(moved, 4711, NOW)
    assert store.get(moved) is None
    assert store.mapped(moved) == 4711
    assert store.mapped(kept) is None
    assert store.counts() == {"mail": 1}
    assert [job.id for job in store.claim_due(NOW, NOW + 1000, 10, 60)] == [kept]
    assert store.delete(moved) is False   # no longer archived, and its mapping is forgotten
    assert store.mapped(moved) is None


def test_forget_mappings_drops_the_old_ones(stores):
    store = stores()
    ids = [_put(store) for _ in range(3)]
    for job_id, when in zip(ids, (NOW - 300, NOW - 200, NOW - 100), strict=False):
        store.injected(job_id, job_id - ARCHIVE_BASE + 1000, when)
    assert store.forget_mappings(NOW - 150) == 2
    assert [store.mapped(job_id) for job_id in ids] == [None, None, ids[2] - ARCHIVE_BASE + 1000]
    assert store.forget_mappings(NOW - 150) == 0


# --- numbers ------------------------------------------------------------------------------

def test_counts_are_per_tube(stores):
    store = stores()
    assert store.counts() == {}
    for tube in ("mail", "mail", "sms", "Mail", "mail"):
        _put(store, tube=tube)
    claimed = store.claim_due(NOW, NOW, 1, 60)[0]
    assert store.counts() == {"mail": 3, "sms": 1, "Mail": 1}  # claimed ones count
    store.injected(claimed.id, 1, NOW)
    assert store.counts() == {"mail": 2, "sms": 1, "Mail": 1}


def test_overdue_is_the_oldest_unclaimed_jobs_lateness(stores):
    store = stores()
    assert store.overdue(NOW) == 0
    _put(store, NOW + 60)
    assert store.overdue(NOW) == 0                     # not due yet
    _put(store, NOW - 30)
    _put(store, NOW - 10)
    assert store.overdue(NOW) == pytest.approx(30)
    store.claim_due(NOW - 20, NOW, 1, 60)              # the one 30 s late is claimed
    assert store.overdue(NOW) == pytest.approx(10)
    assert store.overdue(NOW + 61) == pytest.approx(91)  # its lease ran out


# --- durability, reopening, schema --------------------------------------------------------

READER = """
import sys
from gproxyd.interceptors.archive import open_store
store = open_store(sys.argv[1], "reader")
job = store.get(int(sys.argv[2]))
print(job.tube, job.pri, job.ttr, job.body.hex())
store.close()
"""


def test_a_put_is_committed_when_it_returns(stores, url):
    store = stores()
    job_id = store.put("durable", 7, NOW, 60, bytes(range(256)))
    reader = subprocess.run([sys.executable, "-c", READER, url, str(job_id)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                            text=True, timeout=30)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.split() == ["durable", "7", "60", bytes(range(256)).hex()]


def test_sqlite_keeps_a_write_ahead_log(tmp_path):
    url = f"sqlite:///{tmp_path}/jobs.db"
    open_store(url, "a").close()
    other = Raw(url)
    assert other.execute("PRAGMA journal_mode") == [("wal",)]
    other.close()


def test_reopening_keeps_jobs_claims_and_mappings(stores):
    store = stores("a")
    claimed, kept, moved = _put(store, NOW - 3), _put(store, NOW - 2), _put(store, NOW - 1)
    store.claim_due(NOW, NOW - 2, 1, 60)   # until NOW + 58
    store.injected(moved, 99, NOW)
    store.close()
    again = stores("b")
    assert again.get(kept).body == b"job"
    assert again.mapped(moved) == 99
    assert [job.id for job in again.claim_due(NOW, NOW, 10, 60)] == [kept]
    assert [job.id for job in again.claim_due(NOW, NOW + 59, 10, 60)] == [claimed]


def test_a_newer_schema_is_refused(stores, url, raw):
    _put(stores())
    raw.execute("UPDATE gproxyd_archive_meta SET value = ? WHERE name = ?",
                (str(SCHEMA_VERSION + 1), "schema_version"))
    with pytest.raises(ArchiveError) as refused:
        open_store(url, "b")
    assert str(refused.value) == (f"cannot open archive {url}: its tables have schema version "
                                  f"{SCHEMA_VERSION + 1}, newer than this gproxyd's "
                                  f"({SCHEMA_VERSION}): upgrade gproxyd")
    assert raw.execute("SELECT COUNT(*) FROM gproxyd_archive_jobs") == [(1,)]


def test_starting_at_once_creates_the_schema_once(url, raw):
    opening = [gevent.spawn(open_store, url, f"owner{number}") for number in range(6)]
    gevent.joinall(opening, timeout=30, raise_error=True)
    stores = [greenlet.value for greenlet in opening]
    try:
        ids = [_put(store) for store in stores]
        assert len(set(ids)) == 6
        assert raw.execute("SELECT name, value FROM gproxyd_archive_meta") == [
            ("schema_version", str(SCHEMA_VERSION))]
    finally:
        for store in stores:
            store.close()


PROCESSES_OPENING = """
import os, sys, tempfile
from gproxyd.interceptors.archive import ArchiveError, open_store
failures = []
for round in range(int(sys.argv[2])):
    url = f"sqlite:///{tempfile.mkdtemp(dir=sys.argv[1])}/jobs.db"
    go_read, go_write = os.pipe()
    children = []
    for owner in ("a", "b"):
        child = os.fork()
        if child == 0:
            os.read(go_read, 1)
            try:
                open_store(url, owner).close()
            except ArchiveError as error:
                print(error, flush=True)
                os._exit(1)
            os._exit(0)
        children.append(child)
    os.write(go_write, b"go")
    for child in children:
        failures.append(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
print("failed", sum(code != 0 for code in failures), "of", len(failures))
"""


def test_processes_opening_a_new_sqlite_file_at_once_all_open_it(tmp_path):
    """Two processes (two workers) starting at once on a new file race to switch it to
    WAL; SQLite answers the loser "database is locked" without waiting (a third of the
    rounds before the retry). 40 rounds: every open succeeds."""
    run = subprocess.run([sys.executable, "-c", PROCESSES_OPENING, str(tmp_path), "40"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "failed 0 of 80", run.stdout


def test_a_closed_store_says_so(stores):
    store = stores()
    store.close()
    with pytest.raises(ArchiveError, match="^the archive is closed$"):
        store.get(ARCHIVE_BASE + 1)
    store.close()


# --- bad URLs, unreachable stores ---------------------------------------------------------

@pytest.mark.parametrize("url, error", [
    ("", "bad archive URL '': unknown kind of store"),
    ("sqlite:///", "bad archive URL 'sqlite:///': no file named"),
    ("sqlite://relative.db", "bad archive URL 'sqlite://relative.db': unknown kind of store"),
    ("postgresql://me:secret@db/jobs",
     "bad archive URL 'postgresql://me:***@db/jobs': unknown kind of store"),
    ("mysql://127.0.0.1/jobs", "bad archive URL 'mysql://127.0.0.1/jobs': no user"),
    ("mysql://:secret@127.0.0.1/jobs", "bad archive URL 'mysql://:***@127.0.0.1/jobs': no user"),
    ("mysql://root:secret@127.0.0.1:port/jobs",
     "bad archive URL 'mysql://root:***@127.0.0.1:port/jobs': bad port 'port'"),
    ("mysql://root:se:cr/et@127.0.0.1:70000/jobs",
     "bad archive URL 'mysql://root:***@127.0.0.1:70000/jobs': bad port '70000'"),
    ("mysql://root:secret@127.0.0.1:0/jobs",
     "bad archive URL 'mysql://root:***@127.0.0.1:0/jobs': bad port '0'"),
    ("mysql://root:secret@:3306/jobs", "bad archive URL 'mysql://root:***@:3306/jobs': no host"),
    ("mysql://root:secret@127.0.0.1:3306",
     "bad archive URL 'mysql://root:***@127.0.0.1:3306': no database"),
    ("mysql://root:secret@127.0.0.1/",
     "bad archive URL 'mysql://root:***@127.0.0.1/': no database"),
    ("mysql://root:secret@127.0.0.1/a/b",
     "bad archive URL 'mysql://root:***@127.0.0.1/a/b': bad database 'a/b'"),
])
def test_bad_urls(url, error):
    with pytest.raises(ArchiveError) as refused:
        open_store(url, "a")
    assert str(refused.value) == f"{error} ({EXPECTED})"


def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(ArchiveError) as refused:
        open_store("mysql://root:secret@127.0.0.1:1/jobs", "a")
    assert str(refused.value) == (
        "cannot open archive mysql://root:***@127.0.0.1:1/jobs: Can't connect to MySQL server "
        "on '127.0.0.1' ([Errno 111] Connection refused) (MySQL error 2003)")


def test_mysql_refusals_say_why(mysql_database):
    with pytest.raises(ArchiveError) as refused:
        open_store("mysql://gproxyd_nobody:p@ss/w:rd@127.0.0.1/test", "a")
    assert str(refused.value).startswith(
        "cannot open archive mysql://gproxyd_nobody:***@127.0.0.1/test: Access denied for user "
        "'gproxyd_nobody'@")
    assert "p@ss" not in str(refused.value)
    with pytest.raises(ArchiveError) as refused:
        open_store(f"mysql://root@127.0.0.1/{mysql_database}_missing", "a")
    assert str(refused.value) == (
        f"cannot open archive mysql://root@127.0.0.1/{mysql_database}_missing: Unknown "
        f"database '{mysql_database}_missing' (create the database first, or name another)")


def test_mysql_user_and_password_are_url_decoded(mysql_database):
    admin = _mariadb()
    user = f"gproxyd_{secrets.token_hex(4)}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'p@ss/w:rd'")
        cursor.execute(f"GRANT ALL ON {mysql_database}.* TO '{user}'@'%'")
    try:
        for password in ("p%40ss%2Fw%3Ard", "p@ss/w:rd"):   # escaped or not: the last @ ends it
            store = open_store(f"mysql://{user}:{password}@127.0.0.1/{mysql_database}", "a")
            assert store.url == f"mysql://{user}:***@127.0.0.1/{mysql_database}"
            assert store.get(_put(store)).tube == "default"
            store.close()
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP USER '{user}'@'%'")
        admin.close()


def _missing_directory(tmp) -> str:
    return f"{tmp}/no/such/dir/jobs.db"


def _a_directory(tmp) -> str:
    return str(tmp)


def _not_a_database(tmp) -> str:
    (tmp / "junk.db").write_bytes(b"not a database" * 100)
    return f"{tmp}/junk.db"


@pytest.mark.parametrize("path, error", [
    (_missing_directory,
     "unable to open database file (is {tmp}/no/such/dir a directory this user may write to?)"),
    (_a_directory, "unable to open database file ({tmp} is a directory)"),
    (_not_a_database, "file is not a database"),
])
def test_sqlite_refusals_say_why(tmp_path, path, error):
    url = f"sqlite:///{path(tmp_path)}"
    with pytest.raises(ArchiveError) as refused:
        open_store(url, "a")
    assert str(refused.value) == f"cannot open archive {url}: {error.format(tmp=tmp_path)}"


# --- connections --------------------------------------------------------------------------

def test_mysql_reconnects_once_after_losing_its_connection(mysql_database):
    url = f"mysql://root@127.0.0.1/{mysql_database}"
    store, admin = open_store(url, "a"), Raw(url)
    try:
        first = _put(store)
        ids = admin.execute("SELECT id FROM information_schema.processlist WHERE db = ? AND "
                            "id <> CONNECTION_ID()", (mysql_database,))
        assert len(ids) == 1
        admin.execute(f"KILL {ids[0][0]}")
        assert store.get(first).id == first
        assert store.get(_put(store)) is not None
    finally:
        store.close()
        admin.close()


def test_a_caller_killed_mid_call_leaves_the_store_usable(stores, raw, ticker):
    store = stores()
    job_id = _put(store)
    raw.hold(job_id)
    deleting = gevent.spawn(store.delete, job_id)
    ticker.wait(20)
    assert not deleting.ready()
    deleting.kill()
    raw.end()
    if raw.sqlite:
        assert store.get(job_id) is None       # the killed call ran on in its thread
    else:
        assert store.get(job_id).id == job_id  # its connection was dropped: rolled back
    assert store.get(_put(store)).body == b"job"


def test_sqlite_calls_leave_the_hub_running(tmp_path, ticker):
    """A put waiting for SQLite's write lock waits in a pool thread: the hub ticks on."""
    url = f"sqlite:///{tmp_path}/jobs.db"
    store, other = open_store(url, "a"), Raw(url)
    try:
        other.execute("BEGIN IMMEDIATE")
        putting = gevent.spawn(store.put, "default", 0, NOW, 60, os.urandom(1 << 20))
        ticker.wait(20)   # would never get there if the put held the hub
        assert not putting.ready()
        other.end(commit=True)
        assert store.get(putting.get(timeout=10)) is not None
    finally:
        store.close()
        other.close()
