"""Arbiter: with `workers = N`, one master process supervising N worker processes.

The arbiter binds each TCP listen address N times with SO_REUSEPORT (the kernel spreads
new connections over the N sockets; a unix listen address is one socket shared by all),
starts N workers (`gproxyd --worker ...`, each serving its own socket of every route),
merges their stats for the admin endpoint, and replaces them on SIGHUP: a new worker
starts on the same socket before the old one drains, so a reload refuses nothing.
SIGTERM/SIGINT are passed on (each worker drains); a worker that dies is restarted.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Mapping

import gevent
from gevent import subprocess as gevent_subprocess
from gevent.event import Event
from gevent.fileobject import FileObject
from gevent.queue import Queue

from . import logs
from .admin import AdminServer
from .config import Config
from .listener import ListenError, adopt_listening, bind
from .master import describe_route, listen_key, load_or_keep, log_summaries, reloading
from .stats import RouteStats
from .systemd import sd_notify

log = logging.getLogger("gproxyd")

_READY_TIMEOUT = 30.0  # seconds a new worker may take to report in
_RESTART_DELAY = 1.0   # between restarts of a worker that keeps dying


def bind_group(route, count: int) -> list[socket.socket]:
    """`count` listening sockets on the route's address (SO_REUSEPORT), or one for unix."""
    if route.listen.family == socket.AF_UNIX:
        return [bind(route.listen)]
    return [bind(route.listen, reuse_port=True) for _ in range(count)]


class Worker:
    """One worker process: its slot, sockets, report pipe and the last stats it sent."""

    def __init__(self, slot: int, generation: int):
        self.slot, self.generation = slot, generation
        self.process: gevent_subprocess.Popen | None = None
        self.stats: dict = {}
        self.ready = Event()
        self.retiring = False
        self.reader: gevent.Greenlet | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0


class Arbiter:
    def __init__(self, config: Config, argv: list[str], env: Mapping[str, str],
                 sockets: dict):
        self.config = config
        self._argv, self._env = argv, env
        self._sockets = sockets          # listen key -> [socket per slot]; "admin" -> socket
        self._signals: Queue = Queue()
        self._workers: list[Worker] = []
        self._generation = 0
        self._stopping = False
        self._retired: dict[str, dict] = {}  # stats of workers that have exited, by route
        self._admin: AdminServer | None = None

    @staticmethod
    def bind_all(config: Config, count: int) -> dict:
        bound: dict = {}
        try:
            if config.settings.admin is not None:
                try:
                    bound["admin"] = bind(config.settings.admin)
                except ListenError as error:
                    raise ListenError(f"admin: {error}") from None
            for route in config.routes:
                bound[listen_key(route)] = bind_group(route, count)
        except ListenError:
            for value in bound.values():
                for sock in value if isinstance(value, list) else [value]:
                    sock.close()
            raise
        return bound

    # --- start and run -------------------------------------------------------------------

    def start(self) -> None:
        if "admin" in self._sockets:
            self._admin = AdminServer(self.config.settings.admin, self.stats,
                                      self._sockets.pop("admin"))
            self._admin.start()
            log.info("admin endpoint on http://%s/ (/stats, /metrics)",
                     self.config.settings.admin)
        for route in self.config.routes:
            log.info("%s", describe_route(route))
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            gevent.signal_handler(signum, self._signals.put, signum)
        workers = self._spawn_generation()
        if not self._all_ready(workers):
            raise RuntimeError("workers did not start; see the log above")
        gevent.spawn(log_summaries, lambda: self.config.settings, self.stats)
        log.info("gproxyd ready: %d route(s), %d workers", len(self.config.routes),
                 len(workers))
        sd_notify("READY=1\nSTATUS=serving")

    def run(self) -> int:
        while True:
            event = self._signals.get()
            if event == "stopped":
                log.info("gproxyd stopped")
                return 0
            if event == signal.SIGHUP and not self._stopping:
                self.reload()
            elif event == signal.SIGUSR1:
                logs.reopen()
                self._signal_workers(signal.SIGUSR1)
            elif event in (signal.SIGTERM, signal.SIGINT):
                if not self._stopping:
                    self._stopping = True
                    sd_notify("STOPPING=1")
                    log.info("%s: stopping; workers drain their connections for up to %.0fs "
                             "(send it again to stop at once)", signal.Signals(event).name,
                             self.config.settings.drain_timeout)
                    if self._admin is not None:
                        self._admin.stop()
                    gevent.spawn(self._wait_for_all_workers)
                else:
                    log.info("%s again: workers close all connections now",
                             signal.Signals(event).name)
                self._signal_workers(event)

    # --- workers -------------------------------------------------------------------------

    def _spawn_generation(self) -> list[Worker]:
        self._generation += 1
        workers = [self._spawn(slot, self._generation)
                   for slot in range(self.config.settings.workers)]
        self._workers.extend(workers)
        return workers

    def _spawn(self, slot: int, generation: int) -> Worker:
        worker = Worker(slot, generation)
        fds: dict[str, int] = {}
        for route in self.config.routes:
            group = self._sockets[listen_key(route)]
            fds[route.listen.text] = group[slot % len(group)].fileno()
        report_read, report_write = os.pipe()
        env = {key: value for key, value in self._env.items() if key != "NOTIFY_SOCKET"}
        command = [sys.executable, "-m", "gproxyd", "-c", self.config.path, *self._argv,
                   "--worker", json.dumps({"fds": fds, "report": report_write,
                                           "slot": slot})]
        worker.process = gevent_subprocess.Popen(
            command, env=env, pass_fds=[report_write, *fds.values()], close_fds=True)
        os.close(report_write)
        worker.reader = gevent.spawn(self._read_reports, worker, report_read)
        gevent.spawn(self._watch, worker)
        return worker

    def _read_reports(self, worker: Worker, fd: int) -> None:
        with FileObject(fd, "rb") as reports:
            for line in reports:
                try:
                    worker.stats = json.loads(line)
                except ValueError:
                    continue
                worker.ready.set()

    def _watch(self, worker: Worker) -> None:
        status = worker.process.wait()
        worker.reader.join(timeout=5)  # its last report may still be in the pipe
        self._workers.remove(worker)
        for name, numbers in worker.stats.items():
            kept = self._retired.setdefault(name, RouteStats())
            numbers = dict(numbers, active=0)
            kept.add(numbers)
        if self._stopping or worker.retiring:
            if self._stopping and not self._workers:
                self._signals.put("stopped")
            return
        log.error("worker %d (pid %d) exited with status %s; starting another", worker.slot,
                  worker.pid, status)
        gevent.sleep(_RESTART_DELAY)
        if not self._stopping:
            self._workers.append(self._spawn(worker.slot, worker.generation))

    def _all_ready(self, workers: list[Worker]) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT
        for worker in workers:
            if not worker.ready.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def _signal_workers(self, signum: int) -> None:
        for worker in list(self._workers):
            try:
                worker.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def _wait_for_all_workers(self) -> None:
        while self._workers:
            gevent.sleep(0.05)
        self._signals.put("stopped")

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; if it is good, replace the workers (see the module doc)."""
        with reloading():
            new = load_or_keep(self.config, self._argv, self._env)
            if new is not None:
                self._apply(new)

    def _apply(self, new: Config) -> None:
        if new.settings.workers != self.config.settings.workers:
            log.warning("reload: workers changed from %d to %d; that takes a restart",
                        self.config.settings.workers, new.settings.workers)
            new = Config(new.path, _with_workers(new.settings, self.config.settings.workers),
                         new.routes)
        old_sockets = self._sockets
        sockets = {}
        try:
            for route in new.routes:
                key = listen_key(route)
                sockets[key] = old_sockets.get(key) or bind_group(route, new.settings.workers)
        except ListenError as error:
            for key, group in sockets.items():
                if key not in old_sockets:
                    for sock in group:
                        sock.close()
            log.error("reload failed: %s; keeping the running configuration", error)
            return
        old_workers = list(self._workers)
        self.config, self._sockets = new, sockets
        fresh = self._spawn_generation()
        if not self._all_ready(fresh):
            log.error("reload: new workers did not report in; keeping the old ones too")
            return
        for worker in old_workers:
            worker.retiring = True
            worker.process.send_signal(signal.SIGTERM)
        for key, group in old_sockets.items():
            if key not in sockets:
                for sock in group:
                    sock.close()  # the old workers' copies close when they have drained
        log.info("reloaded %s: %d route(s); %d new workers, the old ones drain", new.path,
                 len(new.routes), len(fresh))

    # --- stats ---------------------------------------------------------------------------

    def stats(self) -> dict[str, RouteStats]:
        """Every route's stats, summed over live workers and those that have exited."""
        merged: dict[str, RouteStats] = {}
        for route in self.config.routes:
            merged[route.name] = RouteStats()
            if route.name in self._retired:
                merged[route.name].add(self._retired[route.name].export())
        for worker in list(self._workers):
            for name, numbers in worker.stats.items():
                merged.setdefault(name, RouteStats()).add(numbers)
        return merged


def _with_workers(settings, workers: int):
    from dataclasses import replace
    return replace(settings, workers=workers)


def run_worker(config: Config, argv: list[str], env: Mapping[str, str], spec: str) -> int:
    """The `--worker SPEC` side: serve the inherited sockets until told to stop."""
    from .master import Master
    details = json.loads(spec)
    sockets = {}
    for route in config.routes:
        fd = details["fds"].get(route.listen.text)
        if fd is None:
            log.error("worker: no socket for %s (config changed under the master?)",
                      route.listen)
            return 78
        sockets[listen_key(route)] = adopt_listening(fd)
    # Each worker asks the arbiter for nothing else: it ignores SIGHUP (it is replaced).
    master = Master(config, argv, env, sockets, report_fd=details["report"])
    master.start()
    return master.run()
