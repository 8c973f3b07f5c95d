"""Worker: one worker process under an Arbiter (workers = N), and the pipe it reports on.

The arbiter starts `gproxyd -c FILE --worker SPEC` with the listening sockets and the
write end of a pipe inherited. The worker monkey-patches, reads the config, imports the
hooks, serves its sockets and writes one JSON line on the pipe every REPORT_INTERVAL:
`{"stats": ...}` (its numbers; also the arbiter's heartbeat). A worker that cannot start
writes `{"failed": "one-line message"}` instead and exits (EX_CONFIG for a configuration
problem): the arbiter shows that message, the worker's stderr shows nothing.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
from dataclasses import dataclass

import gevent

from .. import logs
from ..config import Config
from ..exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from ..hooks import HookLoadError, HookSet, load_route_hooks
from ..listener import adopt_listening
from . import Lifecycle, StartError, listen_key
from .serving import Listeners

log = logging.getLogger("gproxyd")

REPORT_INTERVAL = 0.5  # seconds between a worker's reports to the arbiter


@dataclass(frozen=True)
class WorkerSpec:
    """What the arbiter tells a worker on its command line (`--worker SPEC`)."""
    slot: int
    report_fd: int            # the write end of the report pipe
    fds: dict[str, int]       # listen address as written -> inherited listening socket

    def encode(self) -> str:
        return json.dumps({"slot": self.slot, "report": self.report_fd, "fds": self.fds})

    @classmethod
    def decode(cls, text: str) -> "WorkerSpec":
        fields = json.loads(text)
        return cls(fields["slot"], fields["report"], fields["fds"])


def report_start_failure(spec: str, message: str, status: int) -> int:
    """Tell the arbiter why this worker cannot start; returns `status` to exit with."""
    line = json.dumps({"failed": message}).encode() + b"\n"
    try:
        os.write(WorkerSpec.decode(spec).report_fd, line)  # still blocking: nothing started
    except OSError:
        pass  # the arbiter is gone: nobody is left to tell
    return status


def serve_worker(config: Config, spec_text: str) -> int:
    """The `--worker SPEC` side, after gevent's monkey-patching: serve the inherited
    sockets until told to stop. Every start failure goes to the arbiter as one line
    (report_start_failure)."""
    spec = WorkerSpec.decode(spec_text)
    try:
        logs.configure(config.settings)
    except OSError as error:
        return report_start_failure(spec_text, f"log-file: cannot open "
                                    f"{config.settings.log_file}: {error.strerror}", EX_FAILURE)
    sockets = {}
    for route in config.routes:
        fd = spec.fds.get(route.listen.text)
        if fd is None:
            return report_start_failure(
                spec_text, f"{route.where}: listen: {route.listen} is not among the arbiter's "
                "sockets (the config file changed since it was read; reload it)", EX_CONFIG)
        sockets[listen_key(route)] = adopt_listening(fd)
    try:
        hooks = load_route_hooks(config.routes)
    except HookLoadError as error:
        return report_start_failure(spec_text, str(error), EX_CONFIG)
    worker = Worker(config, spec, sockets, hooks)
    try:
        worker.start()
    except StartError as error:  # a route's archive cannot be opened
        return report_start_failure(spec_text, str(error), error.status)
    except Exception as error:  # a bug of ours: one line for the user, the trace for us
        log.debug("worker %d: start failed", spec.slot, exc_info=True)
        return report_start_failure(spec_text, f"worker {spec.slot}: cannot start: "
                                    f"{type(error).__name__}: {error}", EX_FAILURE)
    return worker.run()


class Worker(Lifecycle):
    """Serves the inherited sockets with the hooks it imported; reports to the arbiter
    every REPORT_INTERVAL until it exits; drains on SIGTERM (a second one: at once)."""

    def __init__(self, config: Config, spec: WorkerSpec,
                 sockets: dict[tuple, socket.socket], hooks: dict[str, HookSet]):
        super().__init__(config)
        self.slot = spec.slot
        self._report_fd = spec.report_fd
        self._sockets = sockets
        self._hooks = hooks
        self.listeners = Listeners()

    def start(self) -> None:
        self.listeners.start(self.config.routes, self._sockets, self._hooks)
        self.install_signal_handlers()
        gevent.spawn(self._report_until_orphaned)

    def handle_hup(self) -> None:
        """Nothing: the arbiter reloads by starting new workers; this one keeps the config
        its sockets were bound for (a SIGHUP to the whole process group lands here too)."""

    def begin_stop(self, name: str) -> None:
        self.listeners.close()
        gevent.spawn(self._drain_then_halt)

    def _drain_then_halt(self) -> None:
        aborted = self.listeners.drain(self.config.settings.drain_timeout)
        if aborted:
            log.warning("worker %d: drain-timeout passed: closed %d connection(s)",
                        self.slot, aborted)
        self._send_report()  # the last numbers, so the arbiter's totals add up
        self.halt(EX_OK)

    def stop_now(self, name: str) -> None:
        self.listeners.abort_all("stopped")

    def _report_until_orphaned(self) -> None:
        """Report twice a second; a closed pipe means the arbiter is gone: stop."""
        from gevent import os as gevent_os
        gevent_os.make_nonblocking(self._report_fd)
        while self._send_report():
            gevent.sleep(REPORT_INTERVAL)
        if not self.stopping:
            log.warning("worker %d: the arbiter is gone; stopping", self.slot)
            self._queue.put(signal.SIGTERM)

    def _send_report(self) -> bool:
        """Send this worker's stats to the arbiter; False if the arbiter is gone."""
        from gevent import os as gevent_os
        stats = {name: numbers.export() for name, numbers in self.listeners.stats().items()}
        data = memoryview(json.dumps({"stats": stats}).encode() + b"\n")
        try:
            while data:
                data = data[gevent_os.nb_write(self._report_fd, data):]
        except OSError:
            return False
        return True
