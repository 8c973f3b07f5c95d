"""gproxyd: a gevent-based transparent TCP proxy daemon with shadow traffic."""

__version__ = "0.1.0"
