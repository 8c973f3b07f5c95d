"""The daemon's lifecycle: start, signals, reload, drain, stop; one process or N workers.

The shape, for both modes (`workers = 1` and `workers = N`):

    Lifecycle        a process's main loop. Signal handlers only queue the signal; `run()`
    │                takes them one at a time and calls `handle_hup`, `handle_term`,
    │                `handle_int`, `handle_usr1` by name, until `halt(status)`.
    ├── MainProcess  the process systemd and the operator talk to: readiness, watchdog,
    │   │            the admin endpoint, the summary lines, and the one reload path
    │   │            (read the config again, stage what can fail, then switch; a bad
    │   │            reload keeps the running configuration and says why).
    │   ├── SingleProcess (single.py)  workers = 1: serves its own listeners.
    │   └── Arbiter       (arbiter.py) workers = N: supervises N worker processes, which
    │                     serve; it never imports the hooks itself.
    └── Worker       (worker.py)  one worker process under an Arbiter.

`bind_all()` binds every listen address (once, or once per worker with SO_REUSEPORT)
before daemonizing and dropping privileges; listeners are reconciled by listen address
(`listen_key`) on reload in either mode, and a reload leaves live connections alone
(with workers: the old generation serves them until they end). SIGTERM/SIGINT drain (a
second one stops at once) while the admin endpoint keeps answering (/healthz: 503
"draining"); SIGUSR1 reopens the log file; SIGHUP reloads, and the admin endpoint's
ReloadStatus says how the last reload went. Exit statuses come from exitcodes.

Imports go one way: the lifecycle uses config, listener, admin and hooks; nothing of
theirs imports the lifecycle.
"""
from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping

import gevent
from gevent import GreenletExit
from gevent.queue import Queue
from setproctitle import setproctitle

from .. import logs, shadow, watchdog
from ..admin import AdminServer, ReloadStatus
from ..checks import overlaps
from ..config import Config, ConfigError, Route, load_config
from ..dashboard import TokenError, read_token
from ..exitcodes import EX_CONFIG
from ..history import History, sample_forever
from ..hooks import HookLoadError
from ..listener import ListenError, bind
from ..report import summary_line
from ..settings import Address
from ..stats import ShadowMemoryStats
from ..systemd import sd_notify, watchdog_interval

log = logging.getLogger("gproxyd")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# The collector's youngest generation is collected after this many allocations of objects
# it tracks (Python's default is 700). A proxied connection's objects are freed by their
# reference counts, not by the collector, but with the default a collection came every
# ~45 connections and walked every live connection's objects: 4.4 us of a connection
# with a shadow (37 us of Python), 0.8 us of one without (#19).
YOUNG_COLLECTION_THRESHOLD = 10_000


class StartError(Exception):
    """The daemon cannot start serving; str() is the one-line message for the user,
    `status` the exit status (exitcodes)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ReloadError(Exception):
    """A reload cannot be applied; str() says why. The running configuration stays."""


# --- binding ---------------------------------------------------------------------------------

def listen_key(route: Route) -> tuple:
    """What identifies a listener across reloads: its listen address."""
    return route.listen.family, route.listen.sockaddr


@dataclass
class Sockets:
    """Listening sockets bound before daemonizing and dropping privileges.

    `routes`: listen key -> one socket per worker (SO_REUSEPORT; a unix address has one
    socket shared by all workers, and one process has one socket per address).
    """
    routes: dict[tuple, list[socket.socket]] = field(default_factory=dict)
    admin: socket.socket | None = None

    def socket_for(self, key: tuple, slot: int = 0) -> socket.socket:
        group = self.routes[key]
        return group[slot % len(group)]

    def filenos(self) -> list[int]:
        owned = [sock for group in self.routes.values() for sock in group]
        return [sock.fileno() for sock in owned + ([self.admin] if self.admin else [])]

    def close(self) -> None:
        for group in self.routes.values():
            for sock in group:
                sock.close()
        if self.admin is not None:
            self.admin.close()


def bind_all(routes: tuple[Route, ...] | list[Route], copies: int = 1,
             admin: Address | None = None,
             running: tuple[Route, ...] | list[Route] = ()) -> Sockets:
    """Bind each route's listen address `copies` times (more than one: SO_REUSEPORT, one
    socket per worker; a unix address once) and the admin address if given, with
    listen-mode and listen-owner for unix addresses.

    `running`: on a reload, the routes served now. The new addresses are bound before
    those close, so one that overlaps them fails: said as our own doing, not as "another
    process listens there". Raises ListenError naming the first address that fails;
    then nothing stays bound.
    """
    bound = Sockets()
    try:
        if admin is not None:
            try:
                bound.admin = bind(admin)
            except ListenError as error:
                raise ListenError(f"admin: {error}") from None
        for route in routes:
            serving = next((old for old in running if overlaps(route.listen, old.listen)),
                           None)
            if serving is not None:
                raise ListenError(
                    f"cannot listen on {route.listen}: gproxyd itself listens on "
                    f"{serving.listen} (route {serving.name} of the running configuration); "
                    "new addresses are bound before the old ones close, so an address that "
                    "overlaps one in use takes two reloads (remove it, then add the new "
                    "one) or a restart")
            if copies == 1 or route.listen.family == socket.AF_UNIX:
                bound.routes[listen_key(route)] = [bind(route.listen, mode=route.listen_mode,
                                                        owner=route.listen_owner)]
            else:
                bound.routes[listen_key(route)] = [bind(route.listen, reuse_port=True)
                                                   for _ in range(copies)]
    except ListenError:
        bound.close()
        raise
    return bound


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def set_process_title(title: str) -> None:
    """What ps and /proc/PID/cmdline show for this process (workers and arbiter)."""
    setproctitle(title)


def settle_collector() -> None:
    """Once serving: collect what start-up left over, keep everything it built (modules,
    config, routes, hooks) out of the collector's passes for good (gc.freeze: a full
    collection then walks what came since, not ~30,000 start-up objects), and collect
    the youngest generation every YOUNG_COLLECTION_THRESHOLD allocations. Garbage in
    reference cycles is still collected, after more allocations than by default."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])


def describe_route(route: Route) -> str:
    shadows = ", ".join(a.text for a in route.shadow) or "none"
    return (f"route {route.name}: {route.listen} -> production {route.production}, "
            f"shadows {shadows}, protocol {route.protocol}")


# --- the main loop ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Halt:
    status: int


class Lifecycle:
    """A process's main loop: queued signals dispatched to `handle_<name>` methods.

    A subclass implements `begin_stop(name)` (the first SIGTERM/SIGINT) and
    `stop_now(name)` (the second), and calls `halt(status)` when it is done.
    """

    def __init__(self, config: Config):
        self.config = config
        self._queue: Queue = Queue()  # also creates gevent's hub, before any privilege drop
        self.stopping = False
        # A daemon stops by its signals only: SystemExit or KeyboardInterrupt raised in a
        # greenlet (one a hook spawned: gevent.spawn(sys.exit)) ends that greenlet and is
        # printed with its traceback, instead of ending the process from the hub.
        hub = gevent.get_hub()
        hub.SYSTEM_ERROR = (SystemError,)
        hub.NOT_ERROR = (GreenletExit,)
        shadow.LINGERING.limit = config.settings.shadow_max_connections
        shadow.BUDGET.limit = config.settings.shadow_memory
        watchdog.configure(config.settings.hook_timeout)

    def install_signal_handlers(self) -> None:
        for signum in HANDLED_SIGNALS:
            gevent.signal_handler(signum, self._queue.put, signum)

    def run(self) -> int:
        """Dispatch signals until halted; returns the exit status."""
        while True:
            event = self._queue.get()
            if isinstance(event, _Halt):
                return event.status
            name = signal.Signals(event).name  # "SIGHUP" -> handle_hup
            getattr(self, "handle_" + name[3:].lower())()

    def halt(self, status: int) -> None:
        """End `run()` with `status` once the signals queued before are handled."""
        self._queue.put(_Halt(status))

    def handle_usr1(self) -> None:
        try:
            logs.reopen()
        except OSError as error:
            log.error("SIGUSR1: cannot reopen the log file: %s; writing on to the old one",
                      error.strerror or error)
            return
        log.info("log file reopened")

    def handle_term(self) -> None:
        self._stop_signal("SIGTERM")

    def handle_int(self) -> None:
        self._stop_signal("SIGINT")

    def _stop_signal(self, name: str) -> None:
        if self.stopping:
            self.stop_now(name)
        else:
            self.stopping = True
            self.begin_stop(name)

    def begin_stop(self, name: str) -> None:
        raise NotImplementedError

    def stop_now(self, name: str) -> None:
        raise NotImplementedError


@contextmanager
def reloading():
    """Tell systemd a reload is under way, and when it is over (however it went)."""
    sd_notify("RELOADING=1\nMONOTONIC_USEC=%d" % int(time.monotonic() * 1e6))
    try:
        yield
    finally:
        sd_notify("READY=1\nSTATUS=serving")


class MainProcess(Lifecycle):
    """The process systemd and the operator talk to (SingleProcess or Arbiter).

    It owns the admin endpoint and the history its dashboard shows (sampled every second
    from `stats()` while the endpoint is on: merged over workers, as /stats), notifies
    readiness, pings the watchdog, logs the summary lines, and reloads on SIGHUP: the
    config is read again, `stage(new)` prepares everything that can fail without
    changing what serves, then the settings and
    `switch(new, staged)` apply it. A subclass implements `start_serving()`, `stage()`,
    `switch()` and `stats()`.
    """

    def __init__(self, config: Config, argv: list[str], env: Mapping[str, str],
                 sockets: Sockets):
        """Built before privileges are dropped (see keep_pid_file)."""
        super().__init__(config)
        self._argv, self._env = argv, env
        self.sockets = sockets
        self._admin: AdminServer | None = None
        self.reload_status = ReloadStatus(config.path)
        self.history = History()
        self._sampler: gevent.Greenlet | None = None
        self._admin_token = ""  # admin-token's token, read at start and on reload
        settings = config.settings
        if settings.pid_file and (settings.user or settings.group) and os.geteuid() == 0:
            keep_pid_file(settings.pid_file)

    def start(self) -> None:
        """Start the admin endpoint and serving; raises StartError if serving cannot start."""
        self.reload_status.time = time.time()
        try:
            self._admin_token = read_token(self.config.settings.admin_token)
        except TokenError as error:
            raise StartError(str(error), EX_CONFIG) from None
        if self.sockets.admin is not None:
            self._start_admin(self.config.settings.admin, self.sockets.admin)
            self.sockets.admin = None  # the admin server owns it now
        for route in self.config.routes:
            log.info("%s", describe_route(route))
        # Before serving starts, so a SIGTERM while workers start is queued, not fatal.
        self.install_signal_handlers()
        ready = self.start_serving()
        interval = watchdog_interval()
        if interval:
            gevent.spawn(self._watchdog, interval)
        gevent.spawn(self._log_summaries)
        settle_collector()
        log.info("gproxyd ready: %s", ready)
        sd_notify("READY=1\nSTATUS=serving")

    def start_serving(self) -> str:
        """Start serving the config; returns what is serving, for the ready line."""
        raise NotImplementedError

    def stats(self) -> dict:
        """{route name: RouteStats}, for the admin endpoint and the summary lines."""
        raise NotImplementedError

    def shadow_memory(self) -> ShadowMemoryStats:
        """What waits for shadows in this process (shadow-memory), for the admin
        endpoint; the arbiter sums its workers'."""
        return shadow.memory_stats()

    def begin_stop(self, name: str) -> None:
        sd_notify("STOPPING=1")
        # The admin endpoint answers on while connections drain: /stats shows them
        # finishing, /healthz says "draining" (503) so a load balancer takes us out.
        if self._admin is not None:
            self._admin.draining = True
        self.drain(name)

    def drain(self, reason: str) -> None:
        """Stop accepting, let live connections finish (drain-timeout), then `halt()`."""
        raise NotImplementedError

    def halt(self, status: int) -> None:
        """The admin endpoint goes last, when nothing is left to drain."""
        self._stop_admin()
        super().halt(status)

    # --- reload --------------------------------------------------------------------------

    def handle_hup(self) -> None:
        if self.stopping:
            log.info("SIGHUP: ignored while stopping")
            return
        with reloading():
            self.reload()

    def reload(self) -> None:
        """Re-read the config; apply it if it is good, keep the running one if not."""
        try:
            new = load_config(self.config.path, self._argv, self._env)
            token = read_token(new.settings.admin_token)
            staged = self.stage(new)
        except (ConfigError, TokenError, HookLoadError, ListenError, ReloadError) as error:
            log.error("reload failed: %s; keeping the running configuration", error)
            self.reload_status.failed(str(error))
            return
        self._admin_token = token
        self._apply_settings(new)
        self.switch(new, staged)
        self.config = new
        self.reload_status.succeeded(new.path)

    def stage(self, new: Config):
        """Prepare `new` (import, bind, start) without changing what serves; raise
        ConfigError, HookLoadError, ListenError or ReloadError if it cannot be applied."""
        raise NotImplementedError

    def switch(self, new: Config, staged) -> None:
        """Serve `new` from now on (what `stage` prepared); nothing here may fail."""
        raise NotImplementedError

    def _apply_settings(self, new: Config) -> None:
        shadow.LINGERING.limit = new.settings.shadow_max_connections
        shadow.BUDGET.limit = new.settings.shadow_memory
        watchdog.configure(new.settings.hook_timeout)
        if new.settings.admin != self.config.settings.admin:
            self._stop_admin()
            if new.settings.admin is not None:
                try:
                    self._start_admin(new.settings.admin)
                except ListenError as error:
                    log.error("reload: admin: %s; the admin endpoint is off", error)
        if new.settings != self.config.settings:
            try:
                logs.configure(new.settings)
            except OSError as error:
                log.error("reload: cannot open log file %s: %s; keeping the old log",
                          new.settings.log_file, error.strerror)

    # --- what runs beside the loop -------------------------------------------------------

    def _start_admin(self, address: Address, sock: socket.socket | None = None) -> None:
        self._admin = AdminServer(address, self.stats, sock,
                                  reload_status=self.reload_status, history=self.history,
                                  access=self._admin_access,
                                  shadow_memory=self.shadow_memory)
        self._admin.start()
        if self._sampler is None:
            self._sampler = gevent.spawn(sample_forever, self.history, self.stats)
        if address.family != socket.AF_UNIX and not _is_loopback(address.host) \
                and not self.config.settings.admin_allow:
            log.warning("admin endpoint on %s answers loopback clients only (403 to others): "
                        "set admin-allow (and admin-token) to let other hosts in", address)
        log.info("admin endpoint on http://%s/ (the dashboard; /stats, /metrics)", address)

    def _admin_access(self) -> tuple:
        """admin-allow's networks and admin-token's token, as they are now."""
        return self.config.settings.admin_allow, self._admin_token

    def _stop_admin(self) -> None:
        if self._admin is not None:
            self._admin.stop()
            self._admin = None
        if self._sampler is not None:
            self._sampler.kill(block=False)
            self._sampler = None

    def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify("WATCHDOG=1")
            gevent.sleep(interval)

    def _log_summaries(self) -> None:
        """Forever: every stats-interval, one summary line per route (0: none)."""
        while True:
            interval = self.config.settings.stats_interval
            gevent.sleep(interval or 60)
            if interval:
                for name, stats in self.stats().items():
                    log.info("%s", summary_line(name, stats.snapshot()))


# --- the pid file, with user = ------------------------------------------------------------

# Run by a process that keeps root's privileges: it waits for EOF on its stdin (the
# daemon holds the write end; it closes when the daemon exits, however it exits), then
# removes the pid file if it still names the daemon. Signals are ignored so that a Ctrl-C
# or a signal to the process group does not end it before the daemon.
_PID_FILE_KEEPER = """\
import os, signal, stat, sys
for name in ("SIGHUP", "SIGINT", "SIGTERM", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
path, pid = sys.argv[1], sys.argv[2]
try:
    from setproctitle import setproctitle
    setproctitle("gproxyd: pid-file keeper for " + pid + " " + path)
except ImportError:
    pass
while os.read(0, 512):
    pass
try:
    if stat.S_ISREG(os.lstat(path).st_mode):
        with open(path, "rb") as handle:
            if handle.read(64).strip() == pid.encode():
                os.unlink(path)
except OSError:
    pass
"""


def keep_pid_file(path: str) -> None:
    """Have the pid file removed when this process exits, though by then it runs as a
    user that may not remove it (the file was written by root, often in a root-owned
    directory such as /run): a small process started now, with root's privileges, waits
    for this one to exit and removes the file. Call it before dropping privileges."""
    waiting_end, held_end = os.pipe()  # both close-on-exec: workers do not inherit them
    try:
        command = [sys.executable, "-I", "-c", _PID_FILE_KEEPER, path, str(os.getpid())]
        subprocess.Popen(command, stdin=waiting_end, stdout=subprocess.DEVNULL,
                         close_fds=True, start_new_session=True)
    except OSError as error:
        os.close(held_end)
        log.warning("pid-file: cannot start the process that removes %s at exit (%s); it "
                    "will be left behind", path, error.strerror or error)
    finally:
        os.close(waiting_end)
    # Once the keeper runs, `held_end` stays open and unwritten until this process exits:
    # the kernel closing it is the keeper's EOF.
