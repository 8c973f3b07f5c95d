"""Worker: one worker process under an Arbiter (workers = N), and the pipe it reports on.

The arbiter starts `gproxyd -c FILE --worker SPEC` with the listening sockets and the
write end of a pipe inherited. The worker monkey-patches, reads the config, imports the
hooks, serves its sockets and writes one JSON line on the pipe every REPORT_INTERVAL:
`{"stats": ...}` (its numbers; also the arbiter's heartbeat). A worker that cannot start
writes `{"failed": "one-line message"}` instead and exits (EX_CONFIG for a configuration
problem): the arbiter shows that message, the worker's stderr shows nothing.

Signals from the arbiter: SIGUSR2 retires the worker after a reload (stop accepting,
exit once the last connection has ended, however long that takes); SIGTERM drains
(drain-timeout; a second one closes everything at once); SIGUSR1 reopens the log file.
Its process title says which worker it is and whether it drains:
`gproxyd: worker 0 [web,api] (draining)`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
from dataclasses import dataclass

import gevent

from .. import logs, shadow
from ..config import Config
from ..exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from ..hooks import HookLoadError, HookSet, load_route_hooks
from ..listener import adopt_listening
from . import Lifecycle, StartError, listen_key, set_process_title, settle_collector
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
    every REPORT_INTERVAL until it exits; retires on SIGUSR2; drains on SIGTERM (a second
    one: at once)."""

    def __init__(self, config: Config, spec: WorkerSpec,
                 sockets: dict[tuple, socket.socket], hooks: dict[str, HookSet]):
        super().__init__(config)
        self.slot = spec.slot
        self._report_fd = spec.report_fd
        self._sockets = sockets
        self._hooks = hooks
        self.listeners = Listeners()
        self.retiring = False

    def start(self) -> None:
        self.listeners.start(self.config.routes, self._sockets, self._hooks)
        self.install_signal_handlers()
        self._set_title()
        gevent.spawn(self._report_until_orphaned)
        settle_collector()

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        gevent.signal_handler(signal.SIGUSR2, self._queue.put, signal.SIGUSR2)

    def _set_title(self, draining: bool = False) -> None:
        routes = ",".join(route.name for route in self.config.routes)
        set_process_title(f"gproxyd: worker {self.slot} [{routes}]"
                          + (" (draining)" if draining else ""))

    def handle_hup(self) -> None:
        """Nothing: the arbiter reloads by starting new workers; this one keeps the config
        its sockets were bound for (a SIGHUP to the whole process group lands here too)."""

    def handle_usr2(self) -> None:
        """Retire: a newer generation serves. Stop accepting and exit once the last live
        connection has ended, with no deadline: a reload in one process leaves live
        connections alone, and so does a reload with workers. A SIGTERM later (the
        daemon stops) still drains within drain-timeout."""
        if self.stopping or self.retiring:
            return
        self.retiring = True
        self.listeners.close(remove_paths=False)  # the new generation serves them
        self._set_title(draining=True)
        live = self.listeners.live_connections()
        if live:
            log.info("worker %d: retired by a reload: accepting no more; its %d live "
                     "connection(s) go on until they end", self.slot, live)
        gevent.spawn(self._stop_when_idle)

    def _stop_when_idle(self) -> None:
        while self.listeners.live_connections() and not self.stopping:
            gevent.sleep(REPORT_INTERVAL)
        if not self.stopping:
            self._queue.put(signal.SIGTERM)  # nothing is left but lingering shadows

    def begin_stop(self, name: str) -> None:
        if not self.retiring:
            self.listeners.close()
        self._set_title(draining=True)
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
        data = memoryview(json.dumps({"stats": stats,
                                      "shadow_memory": shadow.memory_stats().export()}
                                     ).encode() + b"\n")
        try:
            while data:
                data = data[gevent_os.nb_write(self._report_fd, data):]
        except OSError:
            return False
        return True
