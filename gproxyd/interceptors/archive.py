"""Where archived beanstalkd jobs wait until they are due: an SQLite file or a MySQL/MariaDB
database.

`open_store(url, owner)` returns a `Store`; both kinds share its methods and its tables,
all named gproxyd_archive_*:

    gproxyd_archive_meta      name -> value; schema_version is the tables' layout
    gproxyd_archive_jobs      a job a row: id (the row id), tube, pri, due, ttr, body,
                              created, claimed_by, claimed_until (0: not claimed)
    gproxyd_archive_injected  id (a row id) -> beanstalkd_id, injected (when): the jobs
                              already moved into beanstalkd

A job's archive id is ARCHIVE_BASE + its row id. Row ids are never reused (SQLite's
AUTOINCREMENT; InnoDB's AUTO_INCREMENT, whose counter survives restarts on every server
with SKIP LOCKED), so an archive id names one job for good, mapping included.

Moving jobs into beanstalkd may run in several processes and hosts sharing one store:
`claim_due()` leases the jobs it returns to its store's owner until the lease ends,
atomically against every other claimer, and a claimer that dies leaves its jobs to the
others once its leases run out. SQLite lets one writer in at a time (BEGIN IMMEDIATE);
MySQL locks the rows it is about to claim with SELECT ... FOR UPDATE SKIP LOCKED, so
that claimers skip each other's rows instead of waiting for them.

Every method blocks only the greenlet that calls it: SQLite's calls run in gevent's
threadpool, and PyMySQL speaks through gevent's sockets (the process is monkey-patched).
A Store has one connection; its callers take turns on it. A write is committed (SQLite:
synced to disk) when the method returns.
"""
from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import gevent
import pymysql
from gevent.lock import Semaphore
from gevent.monkey import get_original
from pymysql.constants import CLIENT, CR, ER

from ..settings import hide_password

# Archived ids are ARCHIVE_BASE + a row id. beanstalkd numbers its jobs from 1 up, one by
# one, in a uint64: at a million puts a second it would take 146,000 years to get here,
# so an id tells by itself whether the archive or beanstalkd has the job.
ARCHIVE_BASE = 1 << 62
SCHEMA_VERSION = 1

MAX_TUBE = 200               # bytes in a tube name (beanstalkd's limit)
SQLITE_BUSY_TIMEOUT = 10.0   # how long an SQLite write waits for another writer's lock
MYSQL_CONNECT_TIMEOUT = 10   # seconds
MYSQL_IO_TIMEOUT = 30        # seconds one query may take on the wire
MYSQL_LOCK_WAIT = 10         # seconds a statement waits for a row another transaction holds

_EXPECTED = "expected sqlite:////path/jobs.db or mysql://user:password@host:3306/database"
_JOB_COLUMNS = "id, tube, pri, due, ttr, body, created"


class ArchiveError(Exception):
    """The store cannot be reached or used. str() says why in one line; open_store()'s
    errors name the URL (without its password), a Store's own do not (its caller knows
    which store it asked)."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int            # the archive id (ARCHIVE_BASE + row id)
    tube: str
    pri: int
    due: float         # unix time when it must be ready in beanstalkd
    ttr: int
    body: bytes
    created: float     # unix time of the put


def open_store(url: str, owner: str) -> Store:
    """The store at `url`: sqlite:////absolute/path.db, sqlite:///relative/path.db or
    mysql://user:password@host:port/database (port 3306 unless given; user and password
    URL-decoded; the password may be empty). `owner` names this claimer in claims: unique
    per process (e.g. hostname:pid).

    Creates the tables on first use (safe when several processes start at once); refuses
    tables of a newer schema version. Raises ArchiveError if the store cannot be reached
    or used.
    """
    shown = hide_password(url)
    try:
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///"):]
            if not path:
                raise _BadUrl("no file named")
            return _SqliteStore(shown, owner, path)
        if url.startswith("mysql://"):
            return _MysqlStore(shown, owner, _mysql_params(url))
        raise _BadUrl("unknown kind of store")
    except _BadUrl as error:
        raise ArchiveError(f"bad archive URL {shown!r}: {error} ({_EXPECTED})") from None
    except ArchiveError as error:
        raise ArchiveError(f"cannot open archive {shown}: {error}") from None


class _BadUrl(ArchiveError):
    pass


def _mysql_params(url: str) -> dict:
    # Split at the last @, as hide_password() does: a password may hold an unescaped
    # / or @, and no part of it may end up in an error message.
    credentials, at, place = url[len("mysql://"):].rpartition("@")
    user, _, password = credentials.partition(":")
    if not at or not user:
        raise _BadUrl("no user")
    netloc, _, database = place.partition("/")
    parts = urlsplit("//" + netloc)
    try:
        port = parts.port
    except ValueError:
        raise _BadUrl(f"bad port {netloc.rpartition(':')[2]!r}") from None
    if port == 0:
        raise _BadUrl("bad port '0'")
    if not parts.hostname:
        raise _BadUrl("no host")
    if not database:
        raise _BadUrl("no database")
    if any(character in database for character in "/?#"):
        raise _BadUrl(f"bad database {database!r}")
    return {"host": parts.hostname, "port": port or 3306, "user": unquote(user),
            "password": unquote(password), "database": unquote(database)}


def _row_id(job_id: int) -> int | None:
    return job_id - ARCHIVE_BASE if job_id > ARCHIVE_BASE else None


def _job(row) -> Job:
    row_id, tube, pri, due, ttr, body, created = row
    return Job(ARCHIVE_BASE + row_id, tube.decode(), int(pri), float(due), int(ttr),
               bytes(body), float(created))


class Store:
    """The archive: its jobs, their claims, and the ids of the jobs moved into beanstalkd.

    Made by open_store(); `url` is its URL without the password, `owner` the name its
    claims carry. Every method raises ArchiveError when the store cannot be reached or
    used. Meant for the greenlets of one thread; they take turns on its one connection.
    """
    _LOCK_ROWS = ""  # what a claim's SELECT needs to lock the rows it reads
    _INSERT_IGNORE = "INSERT OR IGNORE"

    def __init__(self, url: str, owner: str):
        self.url = url
        self.owner = owner

    def _transaction(self, work: Callable[[Any], Any], write: bool = True) -> Any:
        """work(cursor)'s result, run in one transaction and committed (its SQL has ?
        placeholders). `write`: the work writes (SQLite then takes the write lock first)."""
        raise NotImplementedError

    def close(self) -> None:
        """Closes the connection; later calls raise ArchiveError. Closing twice is fine."""
        raise NotImplementedError

    # --- jobs ---------------------------------------------------------------------------

    def put(self, tube: str, pri: int, due: float, ttr: int, body: bytes) -> int:
        """Archives a job; its archive id. Committed before it returns. ValueError for a
        tube name longer than 200 bytes."""
        name = tube.encode()
        if len(name) > MAX_TUBE:
            raise ValueError(f"tube name longer than {MAX_TUBE} bytes: {tube!r}")
        values = (name, pri, due, ttr, body, time.time())

        def work(cursor):
            cursor.execute("INSERT INTO gproxyd_archive_jobs (tube, pri, due, ttr, body, "
                           "created) VALUES (?, ?, ?, ?, ?, ?)", values)
            return cursor.lastrowid
        return ARCHIVE_BASE + self._transaction(work)

    def get(self, job_id: int) -> Job | None:
        """The archived job with that id (claimed or not), or None."""
        row_id = _row_id(job_id)
        if row_id is None:
            return None

        def work(cursor):
            cursor.execute(f"SELECT {_JOB_COLUMNS} FROM gproxyd_archive_jobs WHERE id = ?",
                           (row_id,))
            return cursor.fetchone()
        row = self._transaction(work, write=False)
        return None if row is None else _job(row)

    def delete(self, job_id: int) -> bool:
        """Removes an archived job, and the id's mapping if it was injected; True if the
        job was archived."""
        row_id = _row_id(job_id)
        if row_id is None:
            return False

        def work(cursor):
            cursor.execute("DELETE FROM gproxyd_archive_jobs WHERE id = ?", (row_id,))
            deleted = cursor.rowcount > 0
            cursor.execute("DELETE FROM gproxyd_archive_injected WHERE id = ?", (row_id,))
            return deleted
        return self._transaction(work)

    def kick(self, job_id: int, now: float) -> bool:
        """Makes an archived job due at `now` (one due earlier stays so); True if it is
        archived."""
        row_id = _row_id(job_id)
        if row_id is None:
            return False

        def work(cursor):
            cursor.execute("UPDATE gproxyd_archive_jobs SET due = CASE WHEN due > ? THEN ? "
                           "ELSE due END WHERE id = ?", (now, now, row_id))
            return cursor.rowcount > 0
        return self._transaction(work)

    # --- claims -------------------------------------------------------------------------

    def claim_due(self, horizon: float, now: float, limit: int, lease: float) -> list[Job]:
        """Up to `limit` jobs due by `horizon` that nobody holds a claim on at `now`
        (never claimed, released, or their lease over), the earliest due first, now
        claimed by this store's owner until now + lease. No other claimer gets them
        before then."""
        if limit <= 0:
            return []

        def work(cursor):
            cursor.execute(f"SELECT {_JOB_COLUMNS} FROM gproxyd_archive_jobs WHERE due <= ? "
                           f"AND claimed_until < ? ORDER BY due, id LIMIT ?{self._LOCK_ROWS}",
                           (horizon, now, limit))
            rows = cursor.fetchall()
            if rows:
                cursor.execute("UPDATE gproxyd_archive_jobs SET claimed_by = ?, "
                               f"claimed_until = ? WHERE id IN ({_marks(rows)})",
                               (self.owner, now + lease, *(row[0] for row in rows)))
            return rows
        return [_job(row) for row in self._transaction(work)]

    def release(self, job_ids: list[int]) -> None:
        """Gives back this owner's claims on those jobs (their injection failed): any
        claimer may take them again at once. Claims of other owners stay."""
        row_ids = [row_id for row_id in map(_row_id, job_ids) if row_id is not None]
        if not row_ids:
            return

        def work(cursor):
            cursor.execute("UPDATE gproxyd_archive_jobs SET claimed_by = NULL, "
                           f"claimed_until = 0 WHERE claimed_by = ? AND id IN "
                           f"({_marks(row_ids)})", (self.owner, *row_ids))
        self._transaction(work)

    # --- injected jobs ------------------------------------------------------------------

    def injected(self, job_id: int, beanstalkd_id: int, now: float) -> bool:
        """The job is in beanstalkd now, as beanstalkd_id: removes it from the archive and
        keeps the mapping of its archive id (both or neither). False if it was no longer
        archived (deleted meanwhile): then nothing is recorded, and the caller should
        delete beanstalkd's copy."""
        row_id = _row_id(job_id)
        if row_id is None:
            raise ValueError(f"not an archive id: {job_id}")

        def work(cursor):
            cursor.execute("DELETE FROM gproxyd_archive_jobs WHERE id = ?", (row_id,))
            if cursor.rowcount != 1:
                return False
            cursor.execute("REPLACE INTO gproxyd_archive_injected (id, beanstalkd_id, "
                           "injected) VALUES (?, ?, ?)", (row_id, beanstalkd_id, now))
            return True
        return self._transaction(work)

    def mapped(self, job_id: int) -> int | None:
        """The beanstalkd id an injected job got, or None (not injected, or forgotten)."""
        row_id = _row_id(job_id)
        if row_id is None:
            return None

        def work(cursor):
            cursor.execute("SELECT beanstalkd_id FROM gproxyd_archive_injected WHERE id = ?",
                           (row_id,))
            return cursor.fetchone()
        row = self._transaction(work, write=False)
        return None if row is None else int(row[0])

    def forget_mappings(self, older_than: float) -> int:
        """Drops the mappings of jobs injected before `older_than`; how many."""
        def work(cursor):
            cursor.execute("DELETE FROM gproxyd_archive_injected WHERE injected < ?",
                           (older_than,))
            return cursor.rowcount
        return self._transaction(work)

    # --- numbers ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Archived jobs per tube (claimed ones included), tubes without any left out."""
        def work(cursor):
            cursor.execute("SELECT tube, COUNT(*) FROM gproxyd_archive_jobs GROUP BY tube")
            return cursor.fetchall()
        return {tube.decode(): int(count)
                for tube, count in self._transaction(work, write=False)}

    def overdue(self, now: float) -> float:
        """How many seconds past its due time the earliest job nobody holds a claim on is
        at `now`; 0 when none is due."""
        def work(cursor):
            cursor.execute("SELECT due FROM gproxyd_archive_jobs WHERE due <= ? AND "
                           "claimed_until < ? ORDER BY due LIMIT 1", (now, now))
            return cursor.fetchone()
        row = self._transaction(work, write=False)
        return 0.0 if row is None else max(0.0, now - float(row[0]))

    # --- schema -------------------------------------------------------------------------

    _META = ""      # the meta table's CREATE TABLE IF NOT EXISTS
    _TABLES = ()    # the other tables' and indexes' CREATE ... IF NOT EXISTS

    def _create_schema(self, cursor) -> None:
        """Creates what is missing, in one transaction: starters racing each other end
        with the same tables. ArchiveError for a newer schema."""
        cursor.execute(self._META)
        cursor.execute("SELECT value FROM gproxyd_archive_meta WHERE name = ?",
                       ("schema_version",))
        row = cursor.fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise ArchiveError(f"its tables have schema version {row[0]}, newer than this "
                               f"gproxyd's ({SCHEMA_VERSION}): upgrade gproxyd")
        for statement in self._TABLES:
            cursor.execute(statement)
        if row is None:  # IGNORE: another starter may have written it meanwhile (MySQL)
            cursor.execute(f"{self._INSERT_IGNORE} INTO gproxyd_archive_meta (name, value) "
                           "VALUES (?, ?)", ("schema_version", str(SCHEMA_VERSION)))


def _marks(values) -> str:
    return ", ".join("?" * len(values))


# --- SQLite -------------------------------------------------------------------------------

def _outcome(function: Callable, args: tuple) -> tuple[bool, Any]:
    """(failed, result or exception) of function(*args), run in a pool thread: gevent's
    threadpool would print the traceback of an exception raised there, and an
    ArchiveError is no programming error."""
    try:
        return False, function(*args)
    except Exception as error:  # raised again in the calling greenlet
        return True, error


_os_lock = get_original("_thread", "allocate_lock")
_thread_sleep = get_original("time", "sleep")   # in a pool thread: blocks that thread only


class _SqliteStore(Store):
    """One sqlite3 connection, used in gevent's threadpool by one thread at a time.

    Greenlets wait for their turn on a gevent lock (so that waiting callers never occupy
    the pool's threads); the thread holds an OS lock on the connection besides, because
    a caller killed while its call runs leaves that call running in its thread.
    """
    _META = ("CREATE TABLE IF NOT EXISTS gproxyd_archive_meta (name TEXT PRIMARY KEY, "
             "value TEXT NOT NULL)")
    _TABLES = (
        "CREATE TABLE IF NOT EXISTS gproxyd_archive_jobs ("
        " id INTEGER PRIMARY KEY AUTOINCREMENT,"   # AUTOINCREMENT: ids are never reused
        " tube BLOB NOT NULL, pri INTEGER NOT NULL, due REAL NOT NULL, ttr INTEGER NOT NULL,"
        " body BLOB NOT NULL, created REAL NOT NULL, claimed_by TEXT,"
        " claimed_until REAL NOT NULL DEFAULT 0)",
        "CREATE INDEX IF NOT EXISTS gproxyd_archive_jobs_due ON gproxyd_archive_jobs (due)",
        "CREATE INDEX IF NOT EXISTS gproxyd_archive_jobs_tube ON gproxyd_archive_jobs (tube)",
        "CREATE TABLE IF NOT EXISTS gproxyd_archive_injected ("
        " id INTEGER PRIMARY KEY, beanstalkd_id INTEGER NOT NULL, injected REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS gproxyd_archive_injected_at"
        " ON gproxyd_archive_injected (injected)",
    )

    def __init__(self, url: str, owner: str, path: str):
        super().__init__(url, owner)
        self._path = path
        self._turn = Semaphore()
        self._connection_lock = _os_lock()
        self._db: sqlite3.Connection | None = None
        self._in_thread(self._connect)
        try:
            self._transaction(self._create_schema)
        except BaseException:
            self.close()
            raise

    def _in_thread(self, function: Callable, *args) -> Any:
        with self._turn:
            failed, result = gevent.get_hub().threadpool.apply(_outcome, (function, args))
        if not failed:
            return result
        if isinstance(result, sqlite3.Error):
            raise ArchiveError(self._describe(result)) from None
        raise result

    def _describe(self, error: sqlite3.Error) -> str:
        if isinstance(error, sqlite3.OperationalError) and "unable to open" in str(error):
            if os.path.isdir(self._path):
                return f"{error} ({self._path} is a directory)"
            where = os.path.dirname(os.path.abspath(self._path))
            return f"{error} (is {where} a directory this user may write to?)"
        return str(error)

    def _connect(self) -> None:
        db = sqlite3.connect(self._path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None,
                             check_same_thread=False)
        try:
            # WAL: readers and the writer do not block each other. FULL: a commit is
            # synced to disk before it returns (NORMAL could lose the last ones on a crash).
            mode = self._journal_mode_wal(db)
            if mode != "wal":
                raise ArchiveError(f"cannot use write-ahead logging there (journal mode "
                                   f"stays {mode!r})")
            db.execute("PRAGMA synchronous = FULL")
        except BaseException:
            db.close()
            raise
        with self._connection_lock:
            self._db = db

    @staticmethod
    def _journal_mode_wal(db: sqlite3.Connection) -> str:
        """Switches a new file to WAL; the mode it ends in. Processes starting at once on
        a new file race for this switch, and SQLite answers the loser "database is locked"
        at once, without its busy timeout (about one start in three of two workers): so
        the loser tries again, up to SQLITE_BUSY_TIMEOUT."""
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
        pause = 0.001
        while True:
            try:
                return db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() + pause > deadline:
                    raise
            _thread_sleep(pause)
            pause = min(pause * 2, 0.05)

    def _transaction(self, work: Callable[[Any], Any], write: bool = True) -> Any:
        return self._in_thread(self._run, work, write)

    def _run(self, work: Callable[[Any], Any], write: bool) -> Any:
        with self._connection_lock:
            db = self._db
            if db is None:
                raise ArchiveError("the archive is closed")
            # IMMEDIATE: a writer takes the write lock before it reads, so that what a
            # claim read is still true when it writes.
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(db.cursor())
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            return result

    def close(self) -> None:
        self._in_thread(self._disconnect)

    def _disconnect(self) -> None:
        with self._connection_lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()


# --- MySQL / MariaDB ----------------------------------------------------------------------

class _QmarkCursor(pymysql.cursors.Cursor):
    """Takes ? placeholders, as sqlite3 does, so that both stores share their SQL (which
    has no other ? and no %)."""

    def execute(self, query, args=None):
        return super().execute(query.replace("?", "%s"), args)


_CONNECTION_LOST = frozenset({
    CR.CR_SERVER_GONE_ERROR, CR.CR_SERVER_LOST, CR.CR_SERVER_LOST_EXTENDED,
    1927,   # MariaDB's ER_CONNECTION_KILLED
    4031,   # MySQL's ER_CLIENT_INTERACTION_TIMEOUT: closed by the server after wait_timeout
})


def _code(error: pymysql.MySQLError) -> int:
    return error.args[0] if error.args and isinstance(error.args[0], int) else 0


def _lost(error: pymysql.MySQLError) -> bool:
    # InterfaceError: PyMySQL found the connection closed already.
    return isinstance(error, pymysql.err.InterfaceError) or _code(error) in _CONNECTION_LOST


def _describe_mysql(error: pymysql.MySQLError) -> str:
    if isinstance(error, pymysql.err.InterfaceError):
        return "the connection was closed"
    code = _code(error)
    message = error.args[1] if len(error.args) > 1 else str(error)
    if code == ER.BAD_DB_ERROR:
        return f"{message} (create the database first, or name another)"
    return f"{message} (MySQL error {code})" if code else str(message)


class _MysqlStore(Store):
    """One PyMySQL connection (autocommit off, READ COMMITTED), its callers taking turns.

    A connection lost before a transaction's commit was sent (the server restarted, or
    closed it while idle) is replaced and the transaction run again, once; lost during
    the commit, whether it was made is unknown, and that is the ArchiveError. A caller
    killed mid-query leaves the connection in an unknown state: it is dropped.
    """
    _LOCK_ROWS = " FOR UPDATE SKIP LOCKED"
    _INSERT_IGNORE = "INSERT IGNORE"
    _META = ("CREATE TABLE IF NOT EXISTS gproxyd_archive_meta ("
             " name VARCHAR(64) NOT NULL PRIMARY KEY, value VARCHAR(255) NOT NULL"
             ") ENGINE=InnoDB")
    _TABLES = (
        "CREATE TABLE IF NOT EXISTS gproxyd_archive_jobs ("
        " id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
        " tube VARBINARY(200) NOT NULL, pri BIGINT NOT NULL, due DOUBLE NOT NULL,"
        " ttr BIGINT NOT NULL, body LONGBLOB NOT NULL, created DOUBLE NOT NULL,"
        " claimed_by VARCHAR(255) NULL, claimed_until DOUBLE NOT NULL DEFAULT 0,"
        " KEY gproxyd_archive_jobs_due (due), KEY gproxyd_archive_jobs_tube (tube)"
        ") ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS gproxyd_archive_injected ("
        " id BIGINT NOT NULL PRIMARY KEY, beanstalkd_id BIGINT UNSIGNED NOT NULL,"
        " injected DOUBLE NOT NULL, KEY gproxyd_archive_injected_at (injected)"
        ") ENGINE=InnoDB",
    )

    def __init__(self, url: str, owner: str, params: dict):
        super().__init__(url, owner)
        self._params = params
        self._turn = Semaphore()
        self._connection: pymysql.connections.Connection | None = None
        self._closed = False
        try:
            self._transaction(self._create_schema)
        except BaseException:
            self.close()
            raise

    def _create_schema(self, cursor) -> None:
        super()._create_schema(cursor)
        try:
            cursor.execute(f"SELECT id FROM gproxyd_archive_jobs WHERE id = 0{self._LOCK_ROWS}")
        except pymysql.err.ProgrammingError as error:
            if _code(error) != ER.PARSE_ERROR:
                raise
            raise ArchiveError("this server cannot SELECT ... FOR UPDATE SKIP LOCKED, which "
                               "claims need (MySQL 8.0 or MariaDB 10.6 and later can)") from None

    def _connect(self) -> pymysql.connections.Connection:
        connection = pymysql.connect(
            **self._params, autocommit=False, charset="utf8mb4", cursorclass=_QmarkCursor,
            connect_timeout=MYSQL_CONNECT_TIMEOUT, read_timeout=MYSQL_IO_TIMEOUT,
            write_timeout=MYSQL_IO_TIMEOUT,
            client_flag=CLIENT.FOUND_ROWS)  # rowcount: rows matched, not rows changed
        try:
            with connection.cursor() as cursor:
                # A claim then locks only the rows it reads: REPEATABLE READ would lock
                # the gaps between them too, and puts would wait for claims.
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cursor.execute("SET SESSION innodb_lock_wait_timeout = ?", (MYSQL_LOCK_WAIT,))
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.open:
            try:
                connection.close()
            except (pymysql.MySQLError, OSError):
                pass  # it is gone either way

    def _transaction(self, work: Callable[[Any], Any], write: bool = True) -> Any:
        with self._turn:
            if self._closed:
                raise ArchiveError("the archive is closed")
            for last_try in (False, True):
                committing = False
                try:
                    connection = self._connection or self._connect()
                    with connection.cursor() as cursor:
                        result = work(cursor)
                    committing = True
                    connection.commit()
                    return result
                except pymysql.MySQLError as error:
                    lost = _lost(error)
                    self._abandon(lost)
                    # Deadlock: InnoDB rolled the whole transaction back; lost before the
                    # commit: the server rolls it back. Either way, nothing was done.
                    if last_try or committing or not (lost or _code(error) == ER.LOCK_DEADLOCK):
                        if lost and committing:
                            raise ArchiveError("the connection was lost while committing: "
                                               "the change may or may not have been made"
                                               ) from None
                        raise ArchiveError(_describe_mysql(error)) from None
                except ArchiveError:
                    self._abandon(False)
                    raise
                except BaseException:
                    self._drop()
                    raise

    def _abandon(self, lost: bool) -> None:
        if lost or self._connection is None:
            self._drop()
            return
        try:
            self._connection.rollback()
        except (pymysql.MySQLError, OSError):
            self._drop()

    def close(self) -> None:
        with self._turn:
            self._closed = True
            self._drop()
