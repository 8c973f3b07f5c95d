"""Recording: sampled whole client requests of an http route, appended to its record file.

Two parts, for a route with `record = PATH`:

- `Recording`, one per client connection, fed by production's observer (observe.py) with
  the bytes written to production and the offsets where the request framer saw each
  request end. It decides at each request's first byte whether to keep it
  (record-sample), collects a kept one whole (head and body, as sent) and hands it to
  the Recorder with the wall-clock time its first byte was sent. Pipelined requests are
  separate records. A connection whose stream the framer gives up on, or that leaves
  HTTP (101 Upgrade, CONNECT), records nothing more.
- `Recorder`, one per route and process (owned by the route's Listener), writes them.
  The event loop only appends to a queue, bounded in memory (MAX_HELD bytes of sampled
  requests being collected or waiting, at most MAX_QUEUED waiting); past the bound a
  request is dropped and counted, never waited for. A request larger than MAX_REQUEST
  (or record-max-size) is skipped and counted. One OS thread masks the secrets
  (recordfile.mask_secrets, unless record-secrets = keep) and appends the records with
  recordfile.RecordWriter, which rotates the file.

Several writers of one file (workers = N, the old and new generation after a reload, two
routes naming the same file) take turns: a writer holds an flock on PATH.lock while it
appends a batch and while it rotates, and before each batch reopens PATH if another
writer rotated it meanwhile. So every record is written whole by one write (a kill -9
cannot tear one) and the file is rotated once, past record-max-size, whoever fills it.
A failed write (a full disk) loses that batch (counted in `errors`, logged once per
ERROR_LOG_INTERVAL) and the writer tries again RETRY seconds later; a record cut short by
the failure is cut off the file, so the records after it stay readable.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import re
import time
from time import monotonic
from typing import Callable

import gevent
from gevent.event import Event
from gevent.monkey import get_original

from .recordfile import (
    PLACEHOLDER,
    SECRET_FIELDS,
    RecordFileError,
    RecordWriter,
    encode,
    mask_secrets,
)
from .stats import RecordStats

log = logging.getLogger("gproxyd.record")

MAX_REQUEST = 16 * 1024 * 1024  # a sampled request larger than this is skipped (counted)
MAX_HELD = 64 * 1024 * 1024     # bytes of sampled requests in memory, per route and process
MAX_QUEUED = 65536              # requests waiting for the writer, per route and process
BATCH = 1024                    # requests the writer appends under one hold of the lock
RETRY = 1.0                     # seconds the writer waits after a failed write
ERROR_LOG_INTERVAL = 10.0       # seconds between two log lines about failing writes
STOP_TIMEOUT = 5.0              # seconds a stop waits for the writer to append what it holds
MODE = 0o640                    # the record file's and the lock file's (less the umask)

# The writer is an OS thread: it blocks in write(), flock() and sleep() without holding up
# the event loop, so it must use the functions gevent's monkey-patching replaced.
_start_thread = get_original("_thread", "start_new_thread")
_Queue = get_original("queue", "SimpleQueue")
_Empty = get_original("queue", "Empty")
_sleep = get_original("time", "sleep")

_OVERHEAD = len(encode(0.0, b""))  # a record's bytes besides the request's
_LINE_ENDS = frozenset(b"\r\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FIELD_NAME = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.S)


class RecordError(Exception):
    """The record file cannot be written; str() says which and why, with a hint."""


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


def unmasked_secret(request: bytes) -> bool:
    """Whether a secret header field of `request` (after mask_secrets) still has a value
    other than the placeholder: its head ends lines with a bare LF, or folds the field
    onto a continuation line. Such a request is not recorded."""
    end = _HEAD_END.search(request)
    head = request[:end.start()] if end else request
    in_secret = False
    for line in head.split(b"\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            if in_secret:
                return True
            continue
        field = _FIELD_NAME.match(line)
        in_secret = field is not None and field.group(1).lower() in SECRET_FIELDS
        if in_secret and field.group(2) != PLACEHOLDER:
            return True
    return False


class _Lock:
    """The flock on PATH.lock that the writers of PATH take turns with."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> "_Lock":
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


def _open_lock(path: str) -> tuple[_Lock, RecordWriter, tuple[int, int]]:
    """The lock, the record file opened under it, and that file's (device, inode)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise RecordError(f"cannot open {path}: {directory} is not a directory (expected "
                          "an existing directory gproxyd's user may write to)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RecordError(f"cannot write in {directory}: Permission denied (the directory "
                          "must belong to gproxyd's user: the record file is created and "
                          "rotated there)")
    try:
        lock = _Lock(os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, MODE))
    except OSError as error:
        raise RecordError(f"cannot open {path}.lock: {_describe(error)}") from None
    try:
        with lock:
            writer = RecordWriter(path, 1 << 62, 0, MODE)
            status = os.stat(path)
    except OSError as error:
        lock.close()
        hint = " (the file must belong to gproxyd's user)" \
            if error.errno in (errno.EACCES, errno.EPERM) else ""
        raise RecordError(f"cannot open {path}: {_describe(error)}{hint}") from None
    except RecordFileError as error:
        lock.close()
        raise RecordError(str(error)) from None
    return lock, writer, (status.st_dev, status.st_ino)


def _outcome(function: Callable, *args) -> tuple[bool, object]:
    """(failed, result or exception), so that gevent's threadpool prints no traceback."""
    try:
        return False, function(*args)
    except Exception as error:  # raised again in the calling greenlet
        return True, error


class Recorder:
    """A route's record file and the thread that writes it.

    The event loop calls everything here except `_write_forever` (the thread's). `start()`
    opens the file (RecordError if it cannot), `configure()` applies a reload that keeps
    the path, `stop()` appends what is queued and closes. Counters go to `stats`."""

    def __init__(self, route, stats: RecordStats):
        self.path = route.record
        self.stats = stats
        self.name = route.name
        self.configure(route)
        self.max_held, self.max_queued = MAX_HELD, MAX_QUEUED
        self._random = random.Random()
        self._clock_offset = time.time() - monotonic()  # wall-clock minus monotonic time
        self._clock_read = monotonic()
        self._queue = _Queue()
        self._stopped = False
        # Bytes held: collected by connections, and queued in minus written out. Each
        # counter has one writer (the loop, or the thread), so no lock is needed.
        self._collecting = 0
        self._queued_bytes = self._queued = 0   # the loop's
        self._taken_bytes = self._taken = 0     # the thread's
        # The thread's totals, and what of them the loop has brought to stats.
        self._written = self._written_bytes = self._failed = self._unmaskable = 0
        self._brought = (0, 0, 0, 0)
        self._failure = ""       # the latest write failure, "" once writing works again
        self._failure_logged = ""
        self._failure_log_time = -ERROR_LOG_INTERVAL
        self._thread_done = False
        self._finished = Event()
        self._progress = None    # the loop's async watcher the thread wakes
        self._lock: _Lock | None = None
        self._writer: RecordWriter | None = None
        self._file_id = (0, 0)

    def configure(self, route) -> None:
        """Sampling, masking and rotation as `route` says (its record path is ours);
        a reload that keeps the path changes them in place."""
        self.share = route.record_sample
        self.mask = route.record_secrets == "mask"
        self.largest = min(MAX_REQUEST, route.record_max_size)
        self._limits = (route.record_max_size, route.record_keep)  # one tuple: read whole

    def start(self) -> None:
        """Open the record file (in a pool thread: it may wait for another writer's
        turn) and start the writer thread. Raises RecordError."""
        failed, result = gevent.get_hub().threadpool.apply(_outcome, (_open_lock, self.path))
        if failed:
            raise result
        self._lock, self._writer, self._file_id = result
        self._progress = gevent.get_hub().loop.async_()
        self._progress.ref = False  # an idle recorder keeps no loop running
        self._progress.start(self._bring_progress)
        _start_thread(self._write_forever, ())

    # --- the event loop's side -------------------------------------------------------------

    def wants(self) -> bool:
        """Whether to record the request beginning now (record-sample)."""
        share = self.share
        return not self._stopped and (share >= 1.0 or share > 0.0
                                      and self._random.random() < share)

    def wall_time(self, sending: float) -> float:
        """The Unix time of the monotonic time `sending` (0: now). The offset between the
        clocks is read again once a second, so times taken within a second keep their
        order and a step of the wall clock is followed."""
        now = monotonic()
        if now - self._clock_read >= 1.0:
            self._clock_read = now
            self._clock_offset = time.time() - now
        return (sending or now) + self._clock_offset

    def reserve(self, size: int) -> bool:
        """Room for `size` more bytes of a request being collected; False (counted as
        dropped) when the memory bound is reached."""
        if self._collecting + self._queued_bytes - self._taken_bytes + size > self.max_held:
            self.stats.dropped += 1
            return False
        self._collecting += size
        return True

    def release(self, size: int) -> None:
        """A request being collected was given up: its bytes are free."""
        self._collecting -= size

    def skip(self, size: int) -> None:
        """A request being collected grew past `largest`."""
        self._collecting -= size
        self.stats.skipped += 1

    def submit(self, started: float, request: bytearray) -> None:
        """Queue a whole request (its bytes reserved while it was collected), or drop it."""
        size = len(request)
        self._collecting -= size
        if self._stopped or self._queued - self._taken >= self.max_queued:
            self.stats.dropped += 1
            return
        self._queued += 1
        self._queued_bytes += size
        self._queue.put((started, request))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Take no more requests; wait up to `timeout` for the writer to append the
        queued ones and close the file."""
        if self._stopped:
            return
        self._stopped = True
        if self._progress is None:  # never started
            return
        self._queue.put(None)
        if not self._finished.wait(timeout):
            log.warning("route %s: record: the writer did not finish %s within %gs; "
                        "%d queued request(s) may be lost", self.name, self.path, timeout,
                        self._queued - self._taken)
            return
        self._bring_progress()
        self._progress.close()

    def _bring_progress(self) -> None:
        """The thread wrote, failed or finished: bring its numbers to stats, say what
        went wrong (once per ERROR_LOG_INTERVAL) or that it works again."""
        now = (self._written, self._written_bytes, self._failed, self._unmaskable)
        before, self._brought = self._brought, now
        stats = self.stats
        stats.recorded += now[0] - before[0]
        stats.bytes += now[1] - before[1]
        stats.errors += now[2] - before[2]
        stats.skipped += now[3] - before[3]
        failure = self._failure
        if failure and monotonic() - self._failure_log_time >= ERROR_LOG_INTERVAL:
            self._failure_log_time = monotonic()
            self._failure_logged = failure
            log.error("route %s: record: %s; sampled requests are lost until it works "
                      "again (%d so far)", self.name, failure, stats.errors)
        elif not failure and self._failure_logged:
            self._failure_logged = ""
            log.info("route %s: record: writing %s again", self.name, self.path)
        if self._thread_done:
            self._finished.set()

    # --- the writer thread -----------------------------------------------------------------

    def _write_forever(self) -> None:
        queue = self._queue
        try:
            while True:
                batch = [queue.get()]
                while len(batch) < BATCH:
                    try:
                        batch.append(queue.get_nowait())
                    except _Empty:
                        break
                ending = batch[-1] is None
                requests = [item for item in batch if item is not None]
                if requests:
                    self._append(requests)
                    self._taken += len(requests)
                    self._taken_bytes += sum(len(request) for _, request in requests)
                    self._progress.send()
                if ending:
                    return
                if self._failure:
                    _sleep(RETRY)
        finally:
            if self._writer is not None:
                self._writer.close()
            if self._lock is not None:
                self._lock.close()
            self._thread_done = True
            self._progress.send()

    def _append(self, requests: list) -> None:
        """Append a batch under the lock; a failure loses the rest of the batch."""
        done = 0
        try:
            with self._lock:
                writer = self._current_writer()
                for started, request in requests:
                    payload = bytes(request)
                    if self.mask:
                        payload = mask_secrets(payload)
                        if unmasked_secret(payload):
                            self._unmaskable += 1
                            done += 1
                            continue
                    before = writer.size
                    try:
                        writer.append(started, payload)
                    except OSError:
                        self._cut_torn_record(before)
                        raise
                    if writer.size < before:  # it rotated: a new file from here on
                        self._file_id = self._stat_id()
                    self._written += 1
                    self._written_bytes += _OVERHEAD + len(payload)
                    done += 1
        except (OSError, RecordFileError) as error:
            self._failed += len(requests) - done
            self._failure = f"cannot write {self.path}: " + (
                _describe(error) if isinstance(error, OSError) else str(error))
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            return
        self._failure = ""

    def _stat_id(self) -> tuple[int, int]:
        status = os.stat(self.path)
        return status.st_dev, status.st_ino

    def _current_writer(self) -> RecordWriter:
        """The writer of the file now at PATH (reopened if another writer rotated it or
        it was removed), knowing its size as it is now; under the lock."""
        max_size, keep = self._limits
        try:
            current = self._stat_id()
        except FileNotFoundError:
            current = None
        writer = self._writer
        if writer is not None and current != self._file_id:
            writer.close()
            writer = self._writer = None
        if writer is None:
            writer = self._writer = RecordWriter(self.path, max_size, keep, MODE)
            self._file_id = self._stat_id()
        else:
            writer.size = os.stat(self.path).st_size  # with the other writers' records
        writer.max_size, writer.keep = max_size, keep
        return writer

    def _cut_torn_record(self, size: int) -> None:
        """A write that failed part-way left part of a record at the end of the file:
        readers would stop there, before every record appended later. Cut it off."""
        try:
            if self._stat_id() == self._file_id and os.stat(self.path).st_size > size:
                os.truncate(self.path, size)
        except OSError:
            pass  # nothing more to do: the reader stops at the torn record


class Recording:
    """One client connection's requests to production, cut whole and handed to the
    route's Recorder. `recorder_of()` names the route's recorder now (None: recording
    is off), asked at each request's first byte, so a reload that moves or ends the
    recording applies to the requests that begin after it. Runs in the event loop."""

    __slots__ = ("_recorder_of", "_recorder", "_active", "_request", "_started")

    def __init__(self, recorder_of: Callable[[], Recorder | None]):
        self._recorder_of = recorder_of
        self._recorder: Recorder | None = None
        self._active = False       # some of a request has been seen, not all of it
        self._request: bytearray | None = None  # the sampled request being collected
        self._started = 0.0

    def feed(self, data, ends: list[int], in_request: bool, sending: float) -> None:
        """`data` was written to production from `sending` (time.monotonic()) on; the
        framer saw requests end at the offsets `ends` in it, and `in_request` says
        whether it is in the middle of one after `data`."""
        start = 0
        for end in ends:
            self._take(data, start, end, sending)
            self._finish()
            start = end
        if in_request and start < len(data):
            self._take(data, start, len(data), sending)

    def stop(self) -> None:
        """The connection ends or leaves HTTP: a request still incomplete is not recorded."""
        if self._request is not None:
            self._recorder.release(len(self._request))
            self._request = None
        self._active = False
        self._recorder_of = _off

    def _take(self, data, start: int, end: int, sending: float) -> None:
        if not self._active:
            # Blank lines between requests belong to none (the framer skips them too).
            while start < end and data[start] in _LINE_ENDS:
                start += 1
            if start == end:
                return
            self._begin(sending)
        request = self._request
        if request is not None:
            size = end - start
            recorder = self._recorder
            if len(request) + size > recorder.largest:
                recorder.skip(len(request))
                self._request = None
            elif not recorder.reserve(size):
                recorder.release(len(request))
                self._request = None
            else:
                request += data[start:end]

    def _begin(self, sending: float) -> None:
        self._active = True
        recorder = self._recorder_of()
        if recorder is not None and recorder.wants():
            self._recorder = recorder
            self._request = bytearray()
            self._started = recorder.wall_time(sending)

    def _finish(self) -> None:
        self._active = False
        request = self._request
        if request is not None:
            self._request = None
            self._recorder.submit(self._started, request)


def _off() -> None:
    """The recorder of a connection that records no more."""
    return None

