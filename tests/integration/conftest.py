"""Integration tests run in-process backends as greenlets beside blocking-style clients."""
from gevent import monkey

monkey.patch_all()

import pytest  # noqa: E402
from service import Daemon  # noqa: E402


@pytest.fixture
def daemons():
    """daemons(directory, config, **options) -> a Daemon, stopped at the end of the test."""
    started = []

    def make(directory, config, **kwargs):
        daemon = Daemon(directory, config, **kwargs)
        started.append(daemon)
        return daemon
    yield make
    for daemon in started:
        daemon.stop()
