"""Arbiter: workers = N, one main process supervising N worker processes.

The arbiter binds each TCP listen address N times with SO_REUSEPORT (the kernel spreads
new connections over the N sockets; a unix listen address is one socket shared by all)
and starts N workers (`gproxyd --worker ...`, each serving its own socket of every
route, see worker.py). It never imports the hooks: the workers do. It serves the admin
endpoint with the workers' stats merged.

Supervision:
- Start: every worker must report in. One that cannot start (it says why on its pipe)
  stops the start: the arbiter exits with the worker's one-line message, EX_CONFIG when
  the worker's config or hooks cannot be loaded.
- Reload (SIGHUP): a new generation of workers starts on the same sockets and must report
  in before the old one is retired, so a reload refuses no connection; if a new worker
  cannot start, the reload fails and the old generation keeps serving. A retired worker
  (SIGUSR2, sent once) stops accepting and serves its live connections until they end,
  with no deadline, as one process does after a reload; then it exits. A later reload
  leaves it alone; a stop tells it to drain like the others. The process titles show it:
  `gproxyd: worker 0 [web] (draining)`.
- Heartbeat: a worker reports every REPORT_INTERVAL (0.5 s). One silent for HUNG_AFTER
  (3) intervals is hung: it is killed (SIGKILL) and restarted (a retired one is not
  restarted). A new worker that has not reported in within READY_TIMEOUT (30 s) is
  killed too.
- Crash: a worker that exits unasked is restarted after a back-off, RESTART_DELAY (0.25
  s) doubled for each crash within the last CRASH_WINDOW (60 s): 0.25, 0.5, 1, 2 s. The
  GIVE_UP_AFTER-th (5th) crash within the window makes the arbiter give up: it stops the
  other workers and exits EX_FAILURE. A worker that exits EX_CONFIG is not restarted
  (restarting cannot fix a configuration): the arbiter stops and exits EX_CONFIG.
- Stop (SIGTERM/SIGINT): the workers are told to drain (a second signal: to stop at
  once). A worker still running drain-timeout + KILL_GRACE (5 s) after it was told to
  stop is killed (SIGKILL); retired workers get that deadline once the arbiter stops,
  not before. The arbiter exits when every worker has.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Mapping

import gevent
from gevent import subprocess as gevent_subprocess
from gevent.event import AsyncResult, Event
from gevent.fileobject import FileObject

from ..config import Config
from ..exitcodes import EX_CONFIG, EX_FAILURE, EX_OK
from ..stats import RouteStats, ShadowMemoryStats
from . import (
    MainProcess,
    ReloadError,
    Sockets,
    StartError,
    bind_all,
    listen_key,
    set_process_title,
)
from .worker import REPORT_INTERVAL, WorkerSpec

log = logging.getLogger("gproxyd")

HUNG_AFTER = 3            # reports a worker may miss before it is taken for hung
_KEPT_SAMPLES = 10_000    # mismatch samples kept of exited workers, per route
READY_TIMEOUT = 30.0      # seconds a new worker may take to report in
RESTART_DELAY = 0.25      # seconds before the first restart; doubled for each recent crash
CRASH_WINDOW = 60.0       # seconds over which crashes are counted
GIVE_UP_AFTER = 5         # crashes within CRASH_WINDOW after which the arbiter stops
KILL_GRACE = 5.0          # seconds past drain-timeout before a stopping worker is killed


class WorkerProcess:
    """The arbiter's handle on one worker process: its pipe's news and its fate."""

    def __init__(self, slot: int, generation: int, process: gevent_subprocess.Popen):
        self.slot, self.generation, self.process = slot, generation, process
        self.stats: dict = {}
        self.shadow_memory: dict | None = None  # its last ShadowMemoryStats.export()
        self.failure = ""          # why it failed: its own one-line message, or how it exited
        self.ready = False         # it has reported in
        self.started = AsyncResult()  # True once it reports in; its failure if it exits first
        self.last_report = time.monotonic()
        self.told_to_stop = False
        self.retiring = False      # a newer generation serves; it exits when idle
        self.killed = False
        self.status: int | None = None
        self.exited = Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"


class Arbiter(MainProcess):
    """Supervises `workers` worker processes serving the Config (see the module doc)."""

    def __init__(self, config: Config, argv: list[str], env: Mapping[str, str],
                 sockets: Sockets):
        super().__init__(config, argv, env, sockets)
        self.count = config.settings.workers  # as bound: changing it takes a restart
        self.workers: list[WorkerProcess] = []
        self._generation = 0          # the newest generation started
        self._serving_generation = 0  # the generation that serves (restarts join it)
        self._starting: set[int] = set()  # generations whose start is being waited for
        self._crashes: deque[float] = deque()
        self._retired: dict[str, RouteStats] = {}  # stats of exited workers, by route
        self._retired_memory = ShadowMemoryStats()  # drops of exited workers' shadows
        self._exit_status = EX_OK

    # --- start ---------------------------------------------------------------------------

    def _set_title(self, draining: bool = False) -> None:
        set_process_title(f"gproxyd: master [{self.count} workers] -c {self.config.path}"
                          + (" (draining)" if draining else ""))

    def start_serving(self) -> str:
        self._set_title()
        gevent.spawn(self._watch_heartbeats)
        self._start_generation(self.config, self.sockets)
        return f"{len(self.config.routes)} route(s), {self.count} workers"

    def _start_generation(self, config: Config, sockets: Sockets) -> list[WorkerProcess]:
        """Start `count` workers and wait until each has reported in. If one cannot,
        stop the others and raise StartError with its message."""
        self._generation += 1
        generation = self._generation
        self._starting.add(generation)
        try:
            fresh = [self._spawn(slot, generation, config, sockets)
                     for slot in range(self.count)]
            failed = self._first_failure(fresh)
        finally:
            self._starting.discard(generation)
        if failed is None:
            self._serving_generation = generation
            return fresh
        for worker in fresh:
            if not worker.exited.is_set():
                self._tell_to_stop(worker)
        for worker in fresh:
            worker.exited.wait()  # bounded: _tell_to_stop kills at the deadline
        raise StartError(failed.started.get(),
                         EX_CONFIG if failed.status == EX_CONFIG else EX_FAILURE)

    @staticmethod
    def _first_failure(fresh: list[WorkerProcess]) -> WorkerProcess | None:
        """Wait until every worker has reported in (None) or one has failed (it).

        Bounded: a worker that does not report in within READY_TIMEOUT is killed."""
        pending = list(fresh)
        while pending:
            gevent.wait([worker.started for worker in pending], count=1)
            for worker in pending:
                if worker.started.ready() and worker.started.get() is not True:
                    return worker
            pending = [worker for worker in pending if not worker.started.ready()]
        return None

    def _spawn(self, slot: int, generation: int, config: Config,
               sockets: Sockets) -> WorkerProcess:
        fds = {route.listen.text: sockets.socket_for(listen_key(route), slot).fileno()
               for route in config.routes}
        report_read, report_write = os.pipe()
        spec = WorkerSpec(slot, report_write, fds)
        env = {key: value for key, value in self._env.items() if key != "NOTIFY_SOCKET"}
        command = [sys.executable, "-m", "gproxyd", "-c", config.path, *self._argv,
                   "--worker", spec.encode()]
        process = gevent_subprocess.Popen(command, env=env, close_fds=True,
                                          pass_fds=[report_write, *fds.values()])
        os.close(report_write)
        worker = WorkerProcess(slot, generation, process)
        self.workers.append(worker)
        reader = gevent.spawn(self._read_reports, worker, report_read)
        gevent.spawn(self._wait_for_exit, worker, reader)
        return worker

    def _read_reports(self, worker: WorkerProcess, fd: int) -> None:
        with FileObject(fd, "rb") as reports:
            for line in reports:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                worker.last_report = time.monotonic()
                if "failed" in report:
                    worker.failure = report["failed"]
                elif "stats" in report:
                    worker.stats = report["stats"]
                    worker.shadow_memory = report.get("shadow_memory")
                    if not worker.ready:
                        worker.ready = True
                        worker.started.set(True)

    # --- a worker's end ------------------------------------------------------------------

    def _wait_for_exit(self, worker: WorkerProcess, reader: gevent.Greenlet) -> None:
        worker.status = worker.process.wait()
        reader.join(timeout=5)  # its last report may still be in the pipe
        self.workers.remove(worker)
        for name, numbers in worker.stats.items():
            # Samples of exited workers: as many as any route may show (stats() trims).
            retired = self._retired.setdefault(
                name, RouteStats(samples=deque(maxlen=_KEPT_SAMPLES)))
            retired.add(dict(numbers, active=0))
        if worker.shadow_memory is not None:  # it holds nothing now; its drops stay counted
            self._retired_memory.add(dict(worker.shadow_memory, limit=0, queued=0,
                                          high_water=0, send_buffers=0))
        if not worker.failure:
            worker.failure = f"{worker} exited with status {worker.status}" + (
                "" if worker.ready else " before it reported in")
        worker.exited.set()
        if not worker.ready:
            worker.started.set(worker.failure)
        if worker.retiring and worker.status == EX_OK and not worker.told_to_stop:
            log.info("%s, retired by a reload, exited: its last connection ended", worker)
        if worker.told_to_stop or worker.retiring or self.stopping:
            if self.stopping and not self.workers:
                self._stopped()
        elif worker.generation in self._starting:
            pass  # _start_generation judges its own workers
        elif worker.status == EX_CONFIG:
            log.error("%s cannot start: %s; restarting it cannot fix the configuration: "
                      "stopping", worker, worker.failure)
            self.stop(EX_CONFIG, "a worker cannot start")
        else:
            self._restart_later(worker)

    def _restart_later(self, worker: WorkerProcess) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes[0] < now - CRASH_WINDOW:
            self._crashes.popleft()
        if len(self._crashes) >= GIVE_UP_AFTER:
            log.error("%s exited with status %s: %d worker crashes within %.0fs; giving up",
                      worker, worker.status, len(self._crashes), CRASH_WINDOW)
            self.stop(EX_FAILURE, "giving up")
            return
        delay = RESTART_DELAY * 2 ** (len(self._crashes) - 1)
        log.error("%s exited with status %s; starting another in %gs", worker,
                  worker.status, delay)
        gevent.spawn_later(delay, self._restart, worker)

    def _restart(self, worker: WorkerProcess) -> None:
        # A reload or a stop since the crash has made the restart moot.
        if not self.stopping and worker.generation == self._serving_generation:
            self._spawn(worker.slot, worker.generation, self.config, self.sockets)

    def _watch_heartbeats(self) -> None:
        """Forever: kill the workers that stopped reporting (their exit restarts them)."""
        while True:
            gevent.sleep(REPORT_INTERVAL)
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.told_to_stop or worker.killed or self.stopping:
                    continue  # a stopping worker has its kill deadline instead
                silence = now - worker.last_report
                if worker.ready and silence > HUNG_AFTER * REPORT_INTERVAL:
                    log.error("%s sent no report for %.1fs: hung; killing it", worker,
                              silence)
                    self._kill(worker)
                elif not worker.ready and silence > READY_TIMEOUT:
                    worker.failure = (f"{worker} did not report in within "
                                      f"{READY_TIMEOUT:.0f}s")
                    log.error("%s; killing it", worker.failure)
                    self._kill(worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """SIGUSR2: stop accepting, serve the live connections until they end, exit.

        Once only, and never to a worker told to stop: it keeps its connections as long
        as they last (a reload in one process does too); only a stop gives it a deadline."""
        if worker.retiring or worker.told_to_stop:
            return
        worker.retiring = True
        self._signal(worker, signal.SIGUSR2)

    def _tell_to_stop(self, worker: WorkerProcess) -> None:
        """SIGTERM: drain and exit; SIGKILL if it is still running at the deadline.

        Once only: a second SIGTERM would make the worker close its connections at once."""
        if worker.told_to_stop:
            return
        worker.told_to_stop = True
        self._signal(worker, signal.SIGTERM)
        gevent.spawn(self._kill_at_deadline, worker)

    def _kill_at_deadline(self, worker: WorkerProcess) -> None:
        grace = self.config.settings.drain_timeout + KILL_GRACE
        if not worker.exited.wait(grace):
            log.error("%s still running %gs after it was told to stop (drain-timeout + "
                      "%gs); killing it", worker, grace, KILL_GRACE)
            self._kill(worker)

    def _kill(self, worker: WorkerProcess) -> None:
        worker.killed = True
        self._signal(worker, signal.SIGKILL)

    @staticmethod
    def _signal(worker: WorkerProcess, signum: int) -> None:
        try:
            worker.process.send_signal(signum)
        except ProcessLookupError:
            pass  # it has exited; its watcher has the news

    # --- signals -------------------------------------------------------------------------

    def handle_usr1(self) -> None:
        super().handle_usr1()
        for worker in list(self.workers):
            self._signal(worker, signal.SIGUSR1)

    def stop(self, status: int, reason: str) -> None:
        """Stop every worker (they drain) and exit with `status` once they are gone."""
        if not self.stopping:
            self.stopping = True
            self._exit_status = status
            self.begin_stop(reason)

    def drain(self, reason: str) -> None:
        log.info("%s: stopping; workers drain their connections for up to %gs "
                 "(send it again to stop at once)", reason,
                 self.config.settings.drain_timeout)
        self._set_title(draining=True)
        for worker in list(self.workers):
            self._tell_to_stop(worker)
        if not self.workers:
            self._stopped()

    def stop_now(self, name: str) -> None:
        log.info("%s again: workers close all connections now", name)
        for worker in list(self.workers):
            self._signal(worker, signal.SIGTERM)

    def _stopped(self) -> None:
        log.info("gproxyd stopped")
        self.halt(self._exit_status)

    # --- reload --------------------------------------------------------------------------

    def stage(self, new: Config) -> tuple[Sockets, list[WorkerProcess]]:
        """Bind the added listen addresses and start the new generation on the kept and
        added sockets; the old generation serves on meanwhile."""
        if new.settings.workers != self.count:
            log.warning("reload: workers changed from %d to %d; that takes a restart",
                        self.count, new.settings.workers)
        wanted = {listen_key(route) for route in new.routes}
        added = bind_all([route for route in new.routes
                          if listen_key(route) not in self.sockets.routes], self.count,
                         running=self.config.routes)
        kept = {key: group for key, group in self.sockets.routes.items() if key in wanted}
        sockets = Sockets(routes={**kept, **added.routes})
        try:
            fresh = self._start_generation(new, sockets)
        except StartError as error:
            added.close()
            raise ReloadError(str(error)) from None
        return sockets, fresh

    def switch(self, new: Config, staged: tuple[Sockets, list[WorkerProcess]]) -> None:
        sockets, fresh = staged
        for worker in list(self.workers):
            if worker.generation != self._serving_generation:
                self._retire(worker)
        for key, group in self.sockets.routes.items():
            if key not in sockets.routes:
                for sock in group:
                    sock.close()  # the retired workers' copies close as they stop accepting
        self.sockets = sockets
        log.info("reloaded %s: %d route(s); %d new workers; the old ones accept no more "
                 "and serve their live connections until they end", new.path,
                 len(new.routes), len(fresh))

    # --- stats ---------------------------------------------------------------------------

    def shadow_memory(self) -> ShadowMemoryStats:
        """Summed over the live workers (each has its own shadow-memory), plus the drops
        of those that have exited."""
        merged = ShadowMemoryStats()
        merged.add(self._retired_memory.export())
        for worker in list(self.workers):
            if worker.shadow_memory is not None:
                merged.add(worker.shadow_memory)
        return merged

    def stats(self) -> dict[str, RouteStats]:
        """Every route's stats, summed over live workers and those that have exited."""
        merged: dict[str, RouteStats] = {}
        for route in self.config.routes:
            # The route's own cap on mismatch samples, not each worker's times N.
            merged[route.name] = RouteStats(samples=deque(maxlen=route.compare_samples))
            if route.name in self._retired:
                merged[route.name].add(self._retired[route.name].export())
        for worker in list(self.workers):
            for name, numbers in worker.stats.items():
                merged.setdefault(name, RouteStats()).add(numbers)
        return merged
