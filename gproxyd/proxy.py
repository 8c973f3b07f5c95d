"""`gproxyd.Proxy`: one route as a library object, for one-file proxy scripts.

    from gevent import monkey; monkey.patch_all()
    import gproxyd

    class Upper:
        def on_data(self, conn, data):
            return data.upper()

    gproxyd.Proxy(listen="127.0.0.1:8080", production="127.0.0.1:8081",
                  hooks=Upper()).serve_forever()
"""
from __future__ import annotations

import logging
from typing import Any

from .config import make_route
from .hooks import load_route_hooks
from .listener import Listener


class Proxy:
    """A listener for one route, built from keyword options (the route keys, with '_')."""

    def __init__(self, listen: str, production: str, name: str = "proxy", **options: Any):
        self.route = make_route(name, listen=listen, production=production, **options)
        self.hooks = load_route_hooks([self.route]).get(name)  # HookLoadError: ConfigError
        self._listener: Listener | None = None

    @property
    def address(self):
        """The bound (host, port) or unix path, once started."""
        return self._listener.bound if self._listener else None

    @property
    def stats(self):
        return self._listener.stats if self._listener else None

    def start(self) -> "Proxy":
        """Bind and start accepting (returns at once; gevent runs the connections)."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        self._listener = Listener(self.route, hooks=self.hooks)
        self._listener.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting and give live connections `timeout` seconds to finish."""
        if self._listener is not None:
            self._listener.close()
            self._listener.drain(timeout)
            self._listener = None

    def serve_forever(self) -> None:
        """Start, and serve until interrupted (Ctrl-C)."""
        import gevent
        self.start()
        try:
            gevent.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
