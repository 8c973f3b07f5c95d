"""What /proc tells about the processes and sockets being measured: CPU, RSS and
descriptors of a process tree, listening ports, and the kernel's queues towards a port."""
from __future__ import annotations

import os
import socket
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) "


def process_tree(pid: int) -> list[int]:
    """PID and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of the tree, seconds (a process's stat counts all its threads)."""
    user = system = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return user / CLK_TCK, system / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu_times(pid))


def tree_rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def tree_fds(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
    return total


def settle(pid: int, fds: int | None = None, timeout: float = 15.0) -> None:
    """Wait until the tree's descriptor count stops falling (or reaches FDS)."""
    deadline = time.monotonic() + timeout
    last = tree_fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = tree_fds(pid)
        if (fds is not None and now <= fds + 2) or (fds is None and now == last):
            return
        last = now


def is_listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:PORT or 0.0.0.0:PORT (no connection made,
    so backends such as iperf3 never see a stray client)."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                if parts[1] in wanted and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def shadow_queues(port: int) -> tuple[int, int, int]:
    """What the kernel buffers for the shadow at 127.0.0.1:PORT, before any of the proxy's
    own buffering, from /proc/net/tcp: (connections to PORT, bytes in all their send
    queues plus bytes unread at PORT's end, the most for one connection)."""
    wanted = f"0100007F:{port:04X}"
    by_connection: dict[str, int] = {}  # client-side address -> bytes queued both ends
    try:
        with open("/proc/net/tcp") as handle:
            next(handle)
            for line in handle:
                parts = line.split()
                tx_queue, rx_queue = (int(x, 16) for x in parts[4].split(":"))
                if parts[2] == wanted:
                    by_connection[parts[1]] = by_connection.get(parts[1], 0) + tx_queue
                elif parts[1] == wanted and parts[3] != "0A":
                    by_connection[parts[2]] = by_connection.get(parts[2], 0) + rx_queue
    except OSError:
        pass
    return (len(by_connection), sum(by_connection.values()),
            max(by_connection.values(), default=0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_port() -> int:
    """A 127.0.0.1 port that was bound and closed again: connecting to it is refused."""
    return free_port()
