"""Listeners: the listeners of one serving process (SingleProcess or Worker), by address."""
from __future__ import annotations

import logging
import socket

import gevent

from ..config import Route
from ..exitcodes import EX_CONFIG, EX_FAILURE
from ..hooks import HookSet
from ..interceptors.archive import ArchiveError
from ..listener import Listener
from ..record import RecordError
from ..tls import TLSProblem
from . import StartError, describe_route, listen_key

log = logging.getLogger("gproxyd")


class Listeners:
    """Owns a process's listeners, keyed by listen address, and the removed ones still
    finishing their connections. The hooks are imported by the caller, after gevent's
    monkey-patching (hooks.load_route_hooks), and handed in here."""

    def __init__(self):
        self.serving: dict[tuple, Listener] = {}
        self._retiring: set[Listener] = set()

    def start(self, routes: tuple[Route, ...], sockets: dict[tuple, socket.socket],
              hooks: dict[str, HookSet]) -> None:
        """Serve each route on its socket (`sockets`: listen key -> bound socket).
        Raises StartError if a route's archive, record or TLS files cannot be opened."""
        for route in routes:
            try:
                self._add(route, sockets[listen_key(route)], hooks)
            except ArchiveError as error:
                raise StartError(f"route {route.name}: archive: {error}", EX_FAILURE) from None
            except RecordError as error:
                raise StartError(f"route {route.name}: record: {error}", EX_FAILURE) from None
            except TLSProblem as problem:  # readable at --check-config, not as our user
                raise StartError(f"route {route.name}: {problem}", EX_CONFIG) from None

    def _add(self, route: Route, sock: socket.socket, hooks: dict[str, HookSet],
             archive_required: bool = True) -> None:
        listener = Listener(route, sock=sock, hooks=hooks.get(route.name))
        listener.start(archive_required)
        self.serving[listen_key(route)] = listener

    def added_routes(self, routes: tuple[Route, ...]) -> list[Route]:
        """The routes whose listen address nothing serves yet: they need a socket."""
        return [route for route in routes if listen_key(route) not in self.serving]

    def reconcile(self, routes: tuple[Route, ...], sockets: dict[tuple, socket.socket],
                  hooks: dict[str, HookSet]) -> str:
        """Serve `routes` from now on, by listen address: a kept address keeps its
        listener (new connections take the new route and hooks, live ones keep theirs),
        a removed one stops accepting and finishes its connections, an added one starts
        on its socket from `sockets`. Returns a summary of the changes for the log."""
        wanted = {listen_key(route): route for route in routes}
        added = self.added_routes(routes)
        removed, changed = [], []
        for key, listener in list(self.serving.items()):
            route = wanted.get(key)
            if route is None:
                del self.serving[key]
                listener.close()
                self._retire(listener)
                removed.append(listener.route.name)
                continue
            if route != listener.route:
                changed.append(route.name)
            # Also when the route is unchanged: the hooks were imported again.
            listener.update(route, hooks=hooks.get(route.name))
        for route in added:  # a reload must not fail here: an archive may be missing
            self._add(route, sockets[listen_key(route)], hooks, archive_required=False)
            log.info("%s", describe_route(route))
        return (f"added: {', '.join(r.name for r in added) or 'none'}; "
                f"changed: {', '.join(changed) or 'none'}; "
                f"removed: {', '.join(removed) or 'none'}")

    def _retire(self, listener: Listener) -> None:
        """A removed route: its live connections finish in their own time."""
        self._retiring.add(listener)

        def wait_then_forget():
            listener.drain(None)
            self._retiring.discard(listener)
        gevent.spawn(wait_then_forget)

    def stats(self) -> dict:
        """{route name: RouteStats} of the serving listeners."""
        return {listener.route.name: listener.stats for listener in self.serving.values()}

    def _all(self) -> list[Listener]:
        return list(self.serving.values()) + list(self._retiring)

    def live_connections(self) -> int:
        return sum(len(listener.sessions) for listener in self._all())

    def close(self, remove_paths: bool = True) -> None:
        """Stop accepting on every address; live connections go on. `remove_paths`:
        False leaves unix socket files for the processes that go on serving them."""
        for listener in self.serving.values():
            listener.close(remove_paths)

    def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for live connections, then close the rest; returns how
        many had to be closed."""
        drains = [gevent.spawn(listener.drain, timeout) for listener in self._all()]
        gevent.joinall(drains)
        return sum(drain.value or 0 for drain in drains)

    def abort_all(self, reason: str) -> None:
        for listener in self._all():
            for session in list(listener.sessions):
                session.abort(reason)
