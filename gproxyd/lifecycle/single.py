"""SingleProcess: workers = 1, the main process serves its listeners itself."""
from __future__ import annotations

import logging
from typing import Mapping

import gevent

from ..config import Config
from ..exitcodes import EX_OK
from ..hooks import HookSet, load_route_hooks
from . import MainProcess, Sockets, bind_all
from .serving import Listeners

log = logging.getLogger("gproxyd")


class SingleProcess(MainProcess):
    """Serves one Config's routes in this process; reconciles them with a new one on
    SIGHUP. `hooks` were imported by the caller, after gevent's monkey-patching."""

    def __init__(self, config: Config, argv: list[str], env: Mapping[str, str],
                 sockets: Sockets, hooks: dict[str, HookSet]):
        super().__init__(config, argv, env, sockets)
        self._initial_hooks = hooks
        self.listeners = Listeners()

    def start_serving(self) -> str:
        bound = {key: self.sockets.socket_for(key) for key in self.sockets.routes}
        self.listeners.start(self.config.routes, bound, self._initial_hooks)
        return f"{len(self.config.routes)} route(s)"

    def stats(self) -> dict:
        return self.listeners.stats()

    # --- reload --------------------------------------------------------------------------

    def stage(self, new: Config) -> tuple[dict, dict]:
        """Import the new hooks (again: a reload picks up edits), then bind the added
        listen addresses; either failing leaves everything as it was."""
        hooks = load_route_hooks(new.routes)
        added = bind_all(self.listeners.added_routes(new.routes),
                         running=self.config.routes)
        return hooks, {key: group[0] for key, group in added.routes.items()}

    def switch(self, new: Config, staged: tuple[dict, dict]) -> None:
        hooks, sockets = staged
        changes = self.listeners.reconcile(new.routes, sockets, hooks)
        log.info("reloaded %s: %d route(s); %s", new.path, len(new.routes), changes)

    # --- stop ----------------------------------------------------------------------------

    def drain(self, reason: str) -> None:
        timeout = self.config.settings.drain_timeout
        log.info("%s: stopping; draining %d live connection(s) for up to %gs "
                 "(send it again to stop at once)", reason,
                 self.listeners.live_connections(), timeout)
        self.listeners.close()
        gevent.spawn(self._drain_then_halt, timeout)

    def _drain_then_halt(self, timeout: float) -> None:
        aborted = self.listeners.drain(timeout)
        if aborted:
            log.warning("drain-timeout passed: closed %d connection(s)", aborted)
        log.info("gproxyd stopped")
        self.halt(EX_OK)

    def stop_now(self, name: str) -> None:
        log.info("%s again: closing all connections now", name)
        self.listeners.abort_all("stopped")
