#!/usr/bin/env python3
"""A balancing proxy: each connection goes to one of several production backends.

--strategy round-robin takes the backends in turn; least-connections takes the one
with the fewest connections open through this proxy. Either way on_connect sets
`conn.production` to a list of every backend in order of preference, and the session
tries them in that order: a dead backend costs the client a refused connect attempt,
never its connection.

A health check greenlet connects to each backend every --check-interval seconds, and
backends that did not answer go to the end of the list until they answer again.

    python3 examples/balancer.py --listen 127.0.0.1:8080 \\
        --backend 127.0.0.1:8081 --backend 127.0.0.1:8082 --strategy least-connections

The backends are given on the command line, so this one is a script (or a
`gproxyd.Proxy(..., hooks=Balancer([...]))` in Python), not a config file `hooks =`.
"""
if __name__ == "__main__":  # as a script, patch first
    from gevent import monkey; monkey.patch_all()  # noqa: E702

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402

log = logging.getLogger("gproxyd.examples.balancer")

STRATEGIES = ("round-robin", "least-connections")


class Balancer:
    """Hooks choosing a production backend per connection.

    `active[backend]` counts the connections this proxy has open to each backend: it
    goes up in on_connect and down in on_finish(conn, "production"). `down` holds the
    backends the last health check could not reach.
    """

    def __init__(self, backends: list[str], strategy: str = "round-robin",
                 check_interval: float = 2.0):
        if strategy not in STRATEGIES:
            raise ValueError(f"bad strategy {strategy!r} (expected one of: "
                             f"{', '.join(STRATEGIES)})")
        if not backends:
            raise ValueError("no backends (expected at least one host:port)")
        self.backends = list(backends)
        self.strategy = strategy
        self.check_interval = check_interval
        self.active = {backend: 0 for backend in self.backends}
        self.down: set[str] = set()
        self._turn = itertools.count()
        self._checker: gevent.Greenlet | None = None

    # --- the hooks ---------------------------------------------------------------------

    def on_connect(self, conn) -> None:
        order = self.preference()
        conn.production = order
        # Counted against the first choice: the hook API does not say which address of
        # the list accepted, so while a backend is down and the health check has not
        # seen it yet, its count is off until those connections end.
        conn.state["backend"] = order[0]
        self.active[order[0]] += 1

    def on_finish(self, conn, backend: str) -> None:
        if backend == "production":
            self.active[conn.state["backend"]] -= 1

    def preference(self) -> list[str]:
        """Every backend, best first: live ones by the strategy, then the ones down."""
        live = [backend for backend in self.backends if backend not in self.down]
        if live:
            turn = next(self._turn) % len(live)
            live = live[turn:] + live[:turn]  # a rotating start spreads the ties
            if self.strategy == "least-connections":
                live.sort(key=self.active.__getitem__)  # stable: ties keep their turn
        return live + [backend for backend in self.backends if backend in self.down]

    # --- health checks ----------------------------------------------------------------

    def check(self, timeout: float = 1.0) -> None:
        """Try a connection to every backend (concurrently); note which are down."""
        probes = {backend: gevent.spawn(_answers, backend, timeout) for backend in self.backends}
        gevent.joinall(list(probes.values()))
        down = {backend for backend, probe in probes.items() if not probe.value}
        for backend in down - self.down:
            log.warning("backend %s is down", backend)
        for backend in self.down - down:
            log.info("backend %s is up again", backend)
        self.down = down

    def start_checks(self, timeout: float = 1.0) -> None:
        """Check now, then every `check_interval` seconds in a greenlet of its own."""
        self.check(timeout)

        def loop():
            while True:
                gevent.sleep(self.check_interval)
                self.check(timeout)
        self._checker = gevent.spawn(loop)

    def stop_checks(self) -> None:
        if self._checker is not None:
            self._checker.kill()
            self._checker = None


def _answers(backend: str, timeout: float) -> bool:
    host, _, port = backend.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError:
        return False
    return True


def build(argv: list[str] | None = None):
    """The proxy the command line asks for (not started), and its Balancer."""
    import gproxyd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="where clients connect")
    parser.add_argument("--backend", action="append", default=None,
                        help="a production backend (repeat; default 127.0.0.1:8081 and "
                             "127.0.0.1:8082)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="round-robin")
    parser.add_argument("--check-interval", type=float, default=2.0,
                        help="seconds between health checks")
    args = parser.parse_args(argv)
    balancer = Balancer(args.backend or ["127.0.0.1:8081", "127.0.0.1:8082"], args.strategy,
                        args.check_interval)
    # `production` is required by a route; on_connect replaces it on every connection.
    proxy = gproxyd.Proxy(listen=args.listen, production=balancer.backends[0],
                          name="balancer", hooks=balancer)
    return proxy, balancer


def main(argv: list[str] | None = None) -> None:
    proxy, balancer = build(argv)
    balancer.start_checks()
    proxy.serve_forever()


if __name__ == "__main__":
    main()
