"""Integration tests run in-process backends as greenlets beside blocking-style clients."""
from gevent import monkey

monkey.patch_all()
