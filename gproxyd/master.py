"""Master: owns the listeners and runs the process's lifecycle.

Signal handlers only queue the signal; `run()` dispatches them one at a time:
SIGHUP reloads (a bad config keeps the running one), SIGUSR1 reopens the log file,
SIGTERM/SIGINT drain and stop (a second one stops at once).
"""
from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from typing import Callable, Mapping

import gevent
from gevent.queue import Queue

from . import logs
from .admin import AdminServer
from .config import Config, ConfigError, Route, load_config
from .listener import Listener, ListenError, bind
from .report import summary_line
from .systemd import sd_notify, watchdog_interval

log = logging.getLogger("gproxyd")

_DRAINED = "drained"


def listen_key(route: Route):
    """What identifies a listener across reloads: its listen address."""
    return route.listen.family, route.listen.sockaddr


@contextmanager
def reloading():
    """Tell systemd a reload is under way, and when it is over (however it went)."""
    sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % int(time.monotonic() * 1e6))
    try:
        yield
    finally:
        sd_notify("READY=1\nSTATUS=serving")


def load_or_keep(config: Config, argv: list[str], env: Mapping[str, str]) -> Config | None:
    """The config file read again, or None (logged) if it is bad: keep the running one."""
    try:
        return load_config(config.path, argv, env)
    except ConfigError as error:
        log.error("reload failed: %s; keeping the running configuration", error)
        return None


def log_summaries(settings_of: Callable[[], object], stats_of: Callable[[], dict]) -> None:
    """Forever: every stats-interval, one summary line per route (0: none)."""
    while True:
        interval = settings_of().stats_interval
        gevent.sleep(interval or 60)
        if interval:
            for name, stats in stats_of().items():
                log.info("%s", summary_line(name, stats.snapshot()))


def describe_route(route: Route) -> str:
    shadows = ", ".join(a.text for a in route.shadow) or "none"
    return (f"route {route.name}: {route.listen} -> production {route.production}, "
            f"shadows {shadows}, protocol {route.protocol}")


class Master:
    """Runs the listeners of one Config; reconciles them with a new one on reload."""

    def __init__(self, config: Config, argv: list[str], env: Mapping[str, str],
                 sockets: dict | None = None, report_fd: int | None = None):
        self.config = config
        # Set in a worker process (workers = N): stats go to the arbiter through this
        # pipe, the arbiter does the admin endpoint, reloads and readiness.
        self._report_fd = report_fd
        self._argv, self._env = argv, env
        self._signals: Queue = Queue()  # also creates gevent's hub, before any privilege drop
        self.listeners: dict = {}
        self._stopping = False
        self._prebound = sockets or {}
        self._retiring: set[Listener] = set()
        self._admin: AdminServer | None = None
        self._reporter: gevent.Greenlet | None = None

    # --- start ---------------------------------------------------------------------------

    @staticmethod
    def bind_all(config: Config, admin: bool = True) -> dict:
        """Bind every route's listen address and the admin address (under the key
        "admin"), before daemonizing or dropping privileges.

        Raises ListenError naming the first address that fails; binds nothing then.
        """
        bound: dict = {}
        try:
            if admin and config.settings.admin is not None:
                try:
                    bound["admin"] = bind(config.settings.admin)
                except ListenError as error:
                    raise ListenError(f"admin: {error}") from None
            for route in config.routes:
                bound[listen_key(route)] = bind(route.listen)
        except ListenError:
            for sock in bound.values():
                sock.close()
            raise
        return bound

    def start(self) -> None:
        sockets = self._prebound or self.bind_all(self.config)
        if "admin" in sockets and self._report_fd is None:
            self._start_admin(self.config.settings.admin, sockets["admin"])
        for route in self.config.routes:
            listener = Listener(route, sock=sockets[listen_key(route)])
            listener.start()
            self.listeners[listen_key(route)] = listener
            log.info("%s", describe_route(route))
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            gevent.signal_handler(signum, self._signals.put, signum)
        if self._report_fd is not None:
            self._reporter = gevent.spawn(self._report_to_arbiter)
            return
        interval = watchdog_interval()
        if interval:
            gevent.spawn(self._watchdog, interval)
        self._reporter = gevent.spawn(log_summaries, lambda: self.config.settings, self.stats)
        log.info("gproxyd ready: %d route(s)", len(self.listeners))
        sd_notify("READY=1\nSTATUS=serving")

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        while True:
            event = self._signals.get()
            if event == _DRAINED:
                if self._report_fd is not None:
                    self.send_report()  # the last numbers, so the arbiter's totals add up
                log.info("gproxyd stopped")
                return 0
            if event == signal.SIGHUP:
                if self._report_fd is None:  # a worker is replaced, not reloaded
                    self.reload()
            elif event == signal.SIGUSR1:
                logs.reopen()
                log.info("log file reopened")
            elif event in (signal.SIGTERM, signal.SIGINT):
                if self._stopping:
                    self._stop_now(event)
                else:
                    self._begin_stop(event)

    def stats(self) -> dict:
        """{route name: RouteStats} of the serving listeners, for the admin endpoint."""
        return {listener.route.name: listener.stats for listener in self.listeners.values()}

    def _start_admin(self, address, sock=None) -> None:
        self._admin = AdminServer(address, self.stats, sock)
        self._admin.start()
        log.info("admin endpoint on http://%s/ (/stats, /metrics)", address)

    def _report_to_arbiter(self) -> None:
        """A worker's line to its arbiter: its stats twice a second; EOF means orphaned."""
        from gevent import os as gevent_os
        gevent_os.make_nonblocking(self._report_fd)
        while self.send_report():
            gevent.sleep(0.5)
        if not self._stopping:
            log.warning("worker: the master process is gone; stopping")
            self._signals.put(signal.SIGTERM)

    def send_report(self) -> bool:
        """Send this worker's stats to the arbiter; False if the arbiter is gone."""
        import json

        from gevent import os as gevent_os
        line = json.dumps({name: stats.export() for name, stats in self.stats().items()})
        data = memoryview(line.encode() + b"\n")
        try:
            while data:
                data = data[gevent_os.nb_write(self._report_fd, data):]
        except OSError:
            return False
        return True

    def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            gevent.sleep(interval)

    # --- stop ----------------------------------------------------------------------------

    def _begin_stop(self, signum: int) -> None:
        self._stopping = True
        sd_notify("STOPPING=1")
        timeout = self.config.settings.drain_timeout
        live = sum(len(listener.sessions) for listener in self._all_listeners())
        log.info("%s: stopping; draining %d live connection(s) for up to %.0fs "
                 "(send it again to stop at once)", signal.Signals(signum).name, live, timeout)
        for listener in self.listeners.values():
            listener.close()
        if self._admin is not None:
            self._admin.stop()
        gevent.spawn(self._drain, timeout)

    def _all_listeners(self) -> list[Listener]:
        return list(self.listeners.values()) + list(self._retiring)

    def _drain(self, timeout: float) -> None:
        drains = [gevent.spawn(listener.drain, timeout) for listener in self._all_listeners()]
        gevent.joinall(drains)
        aborted = sum(drain.value or 0 for drain in drains)
        if aborted:
            log.warning("drain-timeout passed: closed %d connection(s)", aborted)
        self._signals.put(_DRAINED)

    def _stop_now(self, signum: int) -> None:
        log.info("%s again: closing all connections now", signal.Signals(signum).name)
        for listener in self._all_listeners():
            for session in list(listener.sessions):
                session.abort("stopped")

    def _replace_admin(self, address) -> None:
        if self._admin is not None:
            self._admin.stop()
            self._admin = None
        if address is not None:
            try:
                self._start_admin(address)
            except ListenError as error:
                log.error("reload: admin: %s; the admin endpoint is off", error)

    def _retire(self, listener: Listener) -> None:
        """A removed route: its live connections finish in their own time."""
        self._retiring.add(listener)

        def wait_then_forget():
            listener.drain(None)
            self._retiring.discard(listener)
        gevent.spawn(wait_then_forget)

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config; apply it if it is good, keep the running one if not."""
        with reloading():
            new = load_or_keep(self.config, self._argv, self._env)
            if new is not None:
                self._apply(new)

    def _apply(self, new: Config) -> None:
        new_keys = {listen_key(route): route for route in new.routes}
        added = [route for key, route in new_keys.items() if key not in self.listeners]
        try:
            sockets = self.bind_all(Config(new.path, new.settings, tuple(added)), admin=False)
        except ListenError as error:
            log.error("reload failed: %s; keeping the running configuration", error)
            return
        if new.settings.admin != self.config.settings.admin:
            self._replace_admin(new.settings.admin)
        if new.settings != self.config.settings:
            try:
                logs.configure(new.settings)
            except OSError as error:
                log.error("reload: cannot open log file %s: %s; keeping the old log",
                          new.settings.log_file, error.strerror)
        removed, changed = [], []
        for key, listener in list(self.listeners.items()):
            if key not in new_keys:
                del self.listeners[key]
                listener.close()
                self._retire(listener)
                removed.append(listener.route.name)
            elif new_keys[key] != listener.route:
                listener.update(new_keys[key])
                changed.append(new_keys[key].name)
        for route in added:
            listener = Listener(route, sock=sockets[listen_key(route)])
            listener.start()
            self.listeners[listen_key(route)] = listener
        self.config = new
        log.info("reloaded %s: %d route(s); added: %s; changed: %s; removed: %s",
                 new.path, len(self.listeners), ", ".join(r.name for r in added) or "none",
                 ", ".join(changed) or "none", ", ".join(removed) or "none")

