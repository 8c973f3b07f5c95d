"""Log set-up: where lines go (stderr or a file), their format, and reopening on SIGUSR1."""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime

_handler: logging.Handler | None = None


def timestamp(created: float) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset:
    2026-12-01T07:05:09.042+01:00 (a line read in another zone, or across a DST change,
    still says when it happened)."""
    moment = datetime.fromtimestamp(created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"{timestamp(record.created)} gproxyd[{record.process}] "
                f"{record.levelname.lower()}: {record.getMessage()}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    """One object a line: time, pid, level, logger, message, and the record's `fields`
    (a connection's route, client, bytes, ...) as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": timestamp(record.created), "pid": record.process,
                 "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if fields:
            entry.update((key, value) for key, value in fields.items() if key not in entry)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _open_handler(path: str) -> logging.Handler:
    if path == "-":
        return logging.StreamHandler(sys.stderr)
    _create(path)
    return logging.FileHandler(path, encoding="utf-8")


def _create(path: str) -> None:
    """Create the log file readable by its owner and group only (it may name clients);
    an existing file keeps its mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640))


def configure(settings) -> None:
    """Apply log-file, log-level and log-format; safe to call again on reload.

    Raises OSError if the log file cannot be opened (the caller reports it).
    """
    global _handler
    handler = _open_handler(settings.log_file)
    handler.setFormatter(_JsonFormatter() if settings.log_format == "json" else _TextFormatter())
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    _handler = handler
    handler.path = settings.log_file  # type: ignore[attr-defined]


def reopen() -> None:
    """Reopen the log file (after logrotate moved it away); nothing to do for stderr.
    Raises OSError if the file cannot be opened: the old one is kept."""
    if isinstance(_handler, logging.FileHandler):
        _create(_handler.baseFilename)
        stream = _handler._open()
        _handler.acquire()
        try:
            old, _handler.stream = _handler.stream, stream
            old.close()
        finally:
            _handler.release()


def log_fileno() -> int | None:
    """The log file's descriptor, to keep open across daemonizing."""
    stream = getattr(_handler, "stream", None)
    return stream.fileno() if stream is not None else None
