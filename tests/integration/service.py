"""Drive the installed `gproxyd` command as a subprocess, the way an operator would."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
from gevent.server import StreamServer


def gproxyd_command() -> list[str]:
    """The installed console script next to this interpreter (the venv's), else PATH."""
    beside = Path(sys.executable).with_name("gproxyd")
    found = str(beside) if beside.exists() else shutil.which("gproxyd")
    assert found, "the gproxyd console script is not installed (pip install .)"
    return [found]


def send_and_read_to_eof(sock: socket.socket, payload: bytes) -> bytes:
    """On a connected socket: send `payload` and half-close (in a greenlet, so a large one
    cannot deadlock against the echo), and read what comes back until EOF."""
    from backends import recv_to_eof
    sender = gevent.spawn(lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    answer = recv_to_eof(sock)
    sender.get(timeout=20)
    return answer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        gevent.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (state, ppid, ...), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The pids of `pid`'s running children, ascending."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class TaggedEcho:
    """A backend answering every chunk with `TAG:` + the chunk; counts connections."""

    def __init__(self, tag: bytes, port: int = 0):
        self.tag = tag
        self.connections = 0
        self.server = StreamServer(("127.0.0.1", port), self._handle)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _handle(self, sock, _address):
        self.connections += 1
        with sock:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(self.tag + b":" + data)

    def stop(self):
        self.server.stop(timeout=1)


def exchange(port: int, payload: bytes = b"ping", timeout: float = 5.0,
             host: str = "127.0.0.1") -> bytes:
    """One request on a new connection: send, half-close, read everything."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def live_connection(port: int, tag: bytes = b"a", first: bytes = b"1") -> socket.socket:
    """A connection through the proxy to a TaggedEcho, proven open by one exchange."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(first)
    assert sock.recv(100) == tag + b":" + first
    return sock


class NotifySocket:
    """A NOTIFY_SOCKET the way systemd offers one: a unix datagram socket."""

    def __init__(self):
        # Abstract namespace: reachable after the daemon drops privileges, no file to clean.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(f"\0gproxyd-test-{os.getpid()}-{id(self)}")
        self.path = "@" + self.sock.getsockname()[1:].decode()
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        self.sock.setblocking(False)
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait_for(self, state: str, timeout: float = 10.0, after: int = 0) -> int:
        """Wait for a message containing `state` at index >= after; returns its index."""
        def seen():
            for index, message in enumerate(self.collect()):
                if index >= after and state in message.split("\n"):
                    return index + 1
            return None
        return wait_until(seen, timeout, what=f"sd_notify {state!r}") - 1

    def close(self):
        self.sock.close()


class Daemon:
    """A gproxyd subprocess with its config file, log file and notify socket."""

    def __init__(self, directory: Path, config: str, extra_args: list[str] | None = None,
                 env: dict | None = None):
        self.directory = directory
        self.config_path = directory / "gproxyd.conf"
        self.log_path = directory / "gproxyd.log"
        self.write_config(config)
        self.notify = NotifySocket()
        self.env = dict(os.environ, NOTIFY_SOCKET=self.notify.path, **(env or {}))
        self.args = gproxyd_command() + ["-c", str(self.config_path),
                                         "--log-file", str(self.log_path)] + (extra_args or [])
        self.process: subprocess.Popen | None = None

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def start(self, wait_ready: bool = True, preexec_fn=None) -> "Daemon":
        self.process = subprocess.Popen(self.args, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, preexec_fn=preexec_fn)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until READY=1; a daemon that exits or stays silent fails the test with its
        exit status, its stderr and the end of its log (what it said about why)."""
        def ready_or_gone():
            return self.process.poll() is not None or any(
                "READY=1" in message.split("\n") for message in self.notify.collect())
        try:
            wait_until(ready_or_gone, what="sd_notify 'READY=1'")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self._last_words()}") from None
        if self.process.poll() is not None:
            raise AssertionError(f"gproxyd exited with status {self.process.returncode} "
                                 f"before it was ready\n{self._last_words()}")

    def _last_words(self) -> str:
        stderr = ""
        if self.process.poll() is not None:
            stderr = self.process.stderr.read().decode(errors="replace")
        return f"stderr: {stderr[-2000:]!r}\nlog, its end: {self.log()[-3000:]}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def reload(self) -> None:
        """SIGHUP, and wait until the daemon says it is ready again."""
        after = len(self.notify.collect())
        self.signal(signal.SIGHUP)
        index = self.notify.wait_for("RELOADING=1", after=after)
        self.notify.wait_for("READY=1", after=index + 1)

    def wait(self, timeout: float = 15.0) -> int:
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        """Until the log holds `text` (at least `count` times)."""
        wait_until(lambda: self.log().count(text) >= count, timeout,
                   what=f"log line {text!r}" + (f" {count} times" if count > 1 else ""))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process:
            for stream in (self.process.stdout, self.process.stderr):
                stream.close()
        self.notify.close()


def route_section(name: str, port: int, production: str, **keys: str) -> str:
    lines = [f"[route {name}]", f"listen = 127.0.0.1:{port}", f"production = {production}"]
    lines += [f"{key.replace('_', '-')} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n\n"


GLOBAL = "[gproxyd]\nadmin = off\nlog-level = info\ndrain-timeout = 10s\n\n"
