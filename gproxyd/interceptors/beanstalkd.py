"""The beanstalkd archive: far-future jobs kept in a database, moved into beanstalkd when due.

Two parts, both per route with `archive` set:

- `Interception`, one per client connection, replaces the plain relay. It reads the
  client's commands (protocols.beanstalkd.CommandReader) and, in order:
  a `put` delayed longer than archive-after is stored in the archive (committed before
  the client reads `INSERTED <id>`) and never reaches beanstalkd; `peek`, `delete`,
  `stats-job`, `kick-job` (and the other id commands) on an archived id are answered
  from the archive, or, once the job was moved into beanstalkd, passed on with
  beanstalkd's id in its place; `stats` and `stats-tube` answers get the archived jobs
  added to current-jobs-delayed and total-jobs. Everything else goes to beanstalkd byte
  for byte. Replies reach the client in the order of its commands, whoever answers
  them (`_Slot`s). A stream the reader cannot follow is passed through untouched from
  there on (beanstalkd answers it).
- `Archive`, one per route and process (owned by the route's Listener), holds the
  store and runs the injector: every tick it claims the jobs due within archive-lead
  (claims are leases, so several processes or hosts may share one store), puts each
  into beanstalkd (`use`, `put` with the delay that remains, same pri and ttr) and only
  after `INSERTED` removes it from the archive (keeping the id's mapping): at least
  once, and exactly once unless gproxyd dies between the two.

Archived ids are archive.ARCHIVE_BASE (2**62) + the store's row id: beanstalkd counts its
ids up from 1 and never gets there.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event
from gevent.lock import Semaphore

from ..protocols.beanstalkd import MAX_JOB_SIZE, Command, CommandReader, ReplyReader, put_args
from ..settings import hide_password
from ..stats import RouteStats
from .archive import ARCHIVE_BASE, ArchiveError, Store, open_store

log = logging.getLogger("gproxyd.archive")

TICK = 1.0            # how often the injector looks for due jobs (at most)
# How often the archive's counts are read again (a scan of the whole archive: 65 ms at a
# million jobs, and puts wait behind it); this process's puts are added in between.
RECOUNT = 10.0
BATCH = 100           # jobs claimed at once
LEASE = 60.0          # a claim's lifetime: a claimer that dies leaves its jobs to others then
MAPPING_DAYS = 7      # how long an injected job's archive id keeps working
RETRY_MAX = 10.0      # longest wait between two tries while beanstalkd is unreachable
_ID_COMMANDS = frozenset({"peek", "delete", "stats-job", "kick-job", "release", "bury",
                          "touch", "reserve-job"})
_TUBE_NAME = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       b"-+/;.$_()")


def valid_tube(name: str) -> bool:
    """A tube name as beanstalkd accepts it (protocol.txt, "names")."""
    raw = name.encode("ascii", "replace")
    return 0 < len(raw) <= 200 and raw[:1] != b"-" and all(byte in _TUBE_NAME for byte in raw)


# --- the archive service --------------------------------------------------------------------

class Archive:
    """A route's store and its injector. `start()` opens the store (ArchiveError if it
    cannot) and starts injecting; `stop_injecting()` ends the injector (sessions may
    still use the store); `stop()` ends both, once no session uses it."""

    def __init__(self, route, stats: RouteStats):
        self.route = route
        self.stats = stats
        self.url = hide_password(route.archive)
        self.store: Store | None = None
        self.counts: dict[str, int] = {}  # archived jobs per tube, as of the last tick
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._injector: gevent.Greenlet | None = None
        self._wake = Event()
        self._down_since = 0.0  # beanstalkd unreachable since (0: reachable)
        self._counted = 0.0     # when the counts were last read from the store

    def start(self) -> None:
        self.store = open_store(self.route.archive, self._owner)
        self._refresh()
        self._injector = gevent.spawn(self._inject_forever)

    def stop_injecting(self) -> None:
        if self._injector is not None:
            self._injector.kill()
            self._injector = None

    def stop(self) -> None:
        self.stop_injecting()
        if self.store is not None:
            self.store.close()
            self.store = None

    def counted(self, tube: str, change: int) -> None:
        """A job came into the archive (+1) or left it (-1) through this process: the
        counts follow at once, between two reads of the store's."""
        count = max(0, self.counts.get(tube, 0) + change)
        self.counts[tube] = count
        self.stats.archived = max(0, self.stats.archived + change)

    def wake(self) -> None:
        """Look for due jobs now (a kick-job made one due)."""
        self._wake.set()

    # --- the injector ---------------------------------------------------------------------

    def _inject_forever(self) -> None:
        delay = TICK
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            try:
                delay = TICK if self._inject_due() else min(RETRY_MAX, max(TICK, delay * 2))
                if time.monotonic() - self._counted >= RECOUNT:
                    self._refresh()
            except ArchiveError as error:
                log.warning("route %s: archive %s: %s", self.route.name, self.url, error)
                delay = min(RETRY_MAX, max(TICK, delay * 2))

    def _inject_due(self) -> bool:
        """Move the jobs due within archive-lead into beanstalkd; False if it was
        unreachable (the jobs stay archived: tried again after a back-off)."""
        now = time.time()
        jobs = self.store.claim_due(now + self.route.archive_lead, now, BATCH, LEASE)
        if not jobs:
            return True
        try:
            connection = _Producer(self.route.production, self.route.connect_timeout)
        except OSError as error:
            self.store.release([job.id for job in jobs])
            self.stats.inject_failures += len(jobs)
            self._unreachable(error)
            return False
        try:
            for index, job in enumerate(jobs):
                delay = max(0, int(job.due - time.time() + 0.5))
                try:
                    beanstalkd_id = connection.put(job.tube, job.pri, delay, job.ttr, job.body)
                except OSError as error:
                    self.store.release([job.id for job in jobs[index:]])
                    self.stats.inject_failures += len(jobs) - index
                    self._unreachable(error)
                    return False
                if self.store.injected(job.id, beanstalkd_id, time.time()):
                    self.stats.injected_total += 1
                    self.counted(job.tube, -1)
                else:  # deleted by its producer while it was being moved
                    connection.delete(beanstalkd_id)
        finally:
            connection.close()
        if self._down_since:
            log.info("route %s: beanstalkd %s reachable again after %.0fs; archived jobs "
                     "are injected", self.route.name, self.route.production,
                     time.time() - self._down_since)
            self._down_since = 0.0
        if len(jobs) == BATCH:
            self._wake.set()  # more may be due
        return True

    def _unreachable(self, error: OSError) -> None:
        if not self._down_since:  # once per outage, not per job
            self._down_since = time.time()
            log.warning("route %s: cannot move due jobs into beanstalkd %s: %s; they stay "
                        "archived and are tried again", self.route.name,
                        self.route.production, error.strerror or error)

    def _refresh(self) -> None:
        self._counted = time.monotonic()
        self.counts = self.store.counts()
        self.stats.archived = sum(self.counts.values())
        self.stats.overdue_seconds = self.store.overdue(time.time())
        self.store.forget_mappings(time.time() - MAPPING_DAYS * 86400)


class _Producer:
    """A blocking (gevent-cooperative) beanstalkd connection used to inject jobs."""

    def __init__(self, address, timeout: float):
        self._sock = socket.socket(address.family, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(address.sockaddr)
        except OSError:
            self._sock.close()
            raise
        self._replies = ReplyReader()
        self._pending: deque[bytes] = deque()
        self._tube = "default"

    def put(self, tube: str, pri: int, delay: int, ttr: int, body: bytes) -> int:
        if tube != self._tube:
            self._ask(f"use {tube}\r\n".encode(), b"USING ")
            self._tube = tube
        reply = self._ask(b"put %d %d %d %d\r\n%s\r\n" % (pri, delay, ttr, len(body), body),
                          b"INSERTED ")
        return int(reply.split()[1])

    def delete(self, beanstalkd_id: int) -> None:
        self._ask(b"delete %d\r\n" % beanstalkd_id, b"")

    def _ask(self, command: bytes, expected: bytes) -> bytes:
        self._sock.sendall(command)
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionResetError("beanstalkd closed the connection")
            self._pending.extend(self._replies.feed(data))
        reply = self._pending.popleft()
        if not reply.startswith(expected):
            raise OSError(f"beanstalkd answered {reply[:60]!r} to {command.split()[0]!r}")
        return reply

    def close(self) -> None:
        self._sock.close()


# --- one client connection ---------------------------------------------------------------------

class _Slot:
    """One reply owed to the client, in command order: bytes ready, or beanstalkd's
    next reply (through `rewrite`, if any)."""
    __slots__ = ("reply", "rewrite")

    def __init__(self, reply: bytes | None = None, rewrite: Callable | None = None):
        self.reply = reply
        self.rewrite = rewrite


class Interception:
    """A client connection on a route with an archive. `from_client(chunk)` returns the
    bytes for beanstalkd (None: nothing); `from_production(chunk)` takes beanstalkd's
    replies. Both run in the session's greenlets (store calls block them, never the
    hub); `write(bytes)` sends to the client, called under one lock."""

    def __init__(self, archive: Archive, write: Callable[[bytes], None]):
        self.archive = archive
        self.route = archive.route
        self._write = write
        self._commands = CommandReader(MAX_JOB_SIZE)
        self._replies = ReplyReader()
        self._slots: deque[_Slot] = deque()
        self._lock = Semaphore()
        self._tube = "default"
        self._streaming = False  # the reader gave up: every reply from here on is passed

    # --- client -> beanstalkd -------------------------------------------------------------

    def from_client(self, chunk) -> bytes | None:
        forward: list[bytes] = []
        for item in self._commands.feed(chunk):
            if isinstance(item, Command):
                self._command(item, forward)
            else:
                if not self._streaming:
                    self._streaming = True
                    self._owe(_Slot(rewrite=_STREAM))
                forward.append(item)
        self._deliver()
        return b"".join(forward) or None

    def _command(self, command: Command, forward: list) -> None:
        name = command.name
        if self._streaming:
            forward.append(command.raw)
            return
        if name == "put":
            args = put_args(command)
            if args is not None and args[1] > self.route.archive_after:
                self._archive(args, command.body)
                return
        elif name == "use" and len(command.args) == 1 and valid_tube(command.args[0]):
            self._tube = command.args[0]
        elif name in _ID_COMMANDS and len(command.args) == 1 and _archived(command.args[0]):
            self._archived_id(command, int(command.args[0]), forward)
            return
        elif name == "stats" or name == "stats-tube":
            forward.append(command.raw)
            tube = command.args[0] if name == "stats-tube" and command.args else None
            self._owe(_Slot(rewrite=lambda reply: self._add_archived(reply, name, tube)))
            return
        forward.append(command.raw)
        if name != "quit":  # beanstalkd closes without a reply
            self._owe(_Slot())

    def _archive(self, args: tuple[int, int, int, int], body: bytes) -> None:
        pri, delay, ttr, _size = args
        try:
            job_id = self.archive.store.put(self._tube, pri, time.time() + delay, ttr, body)
        except ArchiveError as error:
            log.warning("route %s: archive %s: %s: put answered INTERNAL_ERROR",
                        self.route.name, self.archive.url, error)
            self._owe(_Slot(b"INTERNAL_ERROR\r\n"))
            return
        self.archive.counted(self._tube, +1)
        self.archive.stats.archived_total += 1
        self._owe(_Slot(b"INSERTED %d\r\n" % job_id))

    def _archived_id(self, command: Command, job_id: int, forward: list) -> None:
        store = self.archive.store
        name = command.name
        try:
            job = store.get(job_id)
            if job is None:
                mapped = store.mapped(job_id)
                if mapped is not None:  # in beanstalkd now, under another id
                    forward.append(f"{name} {mapped}\r\n".encode())
                    self._owe(_Slot(rewrite=lambda reply: _renamed(reply, mapped, job_id)))
                    if name == "delete":  # gone either way: the mapping too
                        store.delete(job_id)
                    return
                self._owe(_Slot(b"NOT_FOUND\r\n"))
                return
            if name == "peek":
                reply = b"FOUND %d %d\r\n%s\r\n" % (job_id, len(job.body), job.body)
            elif name == "delete":
                deleted = store.delete(job_id)
                if deleted:
                    self.archive.counted(job.tube, -1)
                reply = b"DELETED\r\n" if deleted else b"NOT_FOUND\r\n"
            elif name == "stats-job":
                reply = _ok(_job_stats(job))
            elif name == "kick-job":
                reply = b"KICKED\r\n" if store.kick(job_id, time.time()) else b"NOT_FOUND\r\n"
                self.archive.wake()
            else:  # release, bury, touch, reserve-job: only for reserved jobs
                reply = b"NOT_FOUND\r\n"
        except ArchiveError as error:
            log.warning("route %s: archive %s: %s: %s answered INTERNAL_ERROR",
                        self.route.name, self.archive.url, error, name)
            reply = b"INTERNAL_ERROR\r\n"
        self._owe(_Slot(reply))

    # --- beanstalkd -> client -------------------------------------------------------------

    def from_production(self, chunk) -> None:
        replies = self._replies
        for reply in replies.feed(chunk):
            if replies.passthrough:
                self._garbled(reply)
            else:
                self._answer(reply)
        self._deliver()

    def _garbled(self, data: bytes) -> None:
        """beanstalkd sent what is not a reply (it never should): its bytes go to the
        client as they are, after the replies owed before, and no slot waits any more."""
        for slot in self._slots:
            if slot.reply is None:
                slot.reply, data = data, b""
        if data:
            self._owe(_Slot(data))

    def _answer(self, reply: bytes) -> None:
        """Beanstalkd's next reply goes to the first slot waiting for one."""
        for slot in self._slots:
            if slot.reply is None:
                if slot.rewrite is _STREAM:  # every reply from here on, as it is
                    self._slots.insert(self._slots.index(slot), _Slot(reply))
                    return
                slot.reply = slot.rewrite(reply) if slot.rewrite is not None else reply
                return
        log.warning("route %s: beanstalkd sent a reply nobody asked for: %r",
                    self.route.name, reply[:60])

    # --- ordering -------------------------------------------------------------------------

    def _owe(self, slot: _Slot) -> None:
        self._slots.append(slot)

    def _deliver(self) -> None:
        """Write the replies that are ready, in command order."""
        with self._lock:
            ready = []
            slots = self._slots
            while slots and slots[0].reply is not None:
                ready.append(slots.popleft().reply)
            if ready:
                self._write(b"".join(ready))

    def _add_archived(self, reply: bytes, name: str, tube: str | None) -> bytes:
        counts = self.archive.counts
        archived = counts.get(tube, 0) if tube is not None else sum(counts.values())
        if name == "stats-tube" and reply == b"NOT_FOUND\r\n" and archived:
            return _ok(_tube_stats(tube, archived))
        if not archived or not reply.startswith(b"OK "):
            return reply
        return _ok(_added(_body(reply), archived))


_STREAM = object()  # a slot taking every reply from there on (the reader gave up)


def _archived(word: str) -> bool:
    return word.isdigit() and int(word) >= ARCHIVE_BASE


def _renamed(reply: bytes, beanstalkd_id: int, job_id: int) -> bytes:
    """beanstalkd's answer about its id, as about the archive id the client holds."""
    head, sep, rest = reply.partition(b"\r\n")
    words = head.split(b" ")
    if len(words) >= 2 and words[1] == b"%d" % beanstalkd_id:  # FOUND <id> <bytes>
        words[1] = b"%d" % job_id
        return b" ".join(words) + sep + rest
    if head.startswith(b"OK "):  # stats-job: "id: <id>" in its YAML
        body = _body(reply).replace(b"\nid: %d\n" % beanstalkd_id, b"\nid: %d\n" % job_id, 1)
        return _ok(body)
    return reply


def _body(reply: bytes) -> bytes:
    return reply.partition(b"\r\n")[2][:-2]


def _ok(body: bytes) -> bytes:
    return b"OK %d\r\n%s\r\n" % (len(body), body)


def _added(body: bytes, archived: int) -> bytes:
    """A stats YAML body with `archived` jobs added to current-jobs-delayed and total-jobs."""
    lines = body.split(b"\n")
    for index, line in enumerate(lines):
        key, sep, value = line.partition(b": ")
        if sep and key in (b"current-jobs-delayed", b"total-jobs") and value.isdigit():
            lines[index] = key + sep + b"%d" % (int(value) + archived)
    return b"\n".join(lines)


def _job_stats(job) -> bytes:
    now = time.time()
    fields = [("id", job.id), ("tube", job.tube), ("state", "delayed"), ("pri", job.pri),
              ("age", int(now - job.created)), ("delay", int(job.due - job.created + 0.5)),
              ("ttr", job.ttr), ("time-left", max(0, int(job.due - now))), ("file", 0),
              ("reserves", 0), ("timeouts", 0), ("releases", 0), ("buries", 0), ("kicks", 0)]
    return ("---\n" + "".join(f"{key}: {value}\n" for key, value in fields)).encode()


def _tube_stats(tube: str, archived: int) -> bytes:
    fields = [("name", tube), ("current-jobs-urgent", 0), ("current-jobs-ready", 0),
              ("current-jobs-reserved", 0), ("current-jobs-delayed", archived),
              ("current-jobs-buried", 0), ("total-jobs", archived), ("current-using", 0),
              ("current-watching", 0), ("current-waiting", 0), ("cmd-delete", 0),
              ("cmd-pause-tube", 0), ("pause", 0), ("pause-time-left", 0)]
    return ("---\n" + "".join(f"{key}: {value}\n" for key, value in fields)).encode()
