"""systemd integration without dependencies: sd_notify() and the watchdog interval."""
from __future__ import annotations

import os
import socket


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; a no-op without NOTIFY_SOCKET.

    Returns whether a message was sent. Errors are swallowed: notification is advisory
    and must never take the daemon down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings if systemd asked for them (WatchdogSec=), else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2  # ping twice per period, as sd_watchdog_enabled(3) advises
    except ValueError:
        return None
