"""gproxyd: a gevent-based transparent TCP proxy daemon with shadow traffic."""

__version__ = "0.1.0"

__all__ = ["Proxy", "__version__"]


def __getattr__(name: str):
    # Lazy: the daemon's command line must not build gevent objects before it forks.
    if name == "Proxy":
        from .proxy import Proxy
        return Proxy
    raise AttributeError(f"module 'gproxyd' has no attribute {name!r}")
