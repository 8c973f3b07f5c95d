"""Recording in the installed daemon: requests to nginx recorded as curl and raw sockets
sent them, a kill -9 while requests flow, workers = 2 sharing and rotating one file, a
file-size limit cutting a write short, and the start-up error for a path that cannot be
written. Files are read back with recordfile.RecordReader."""
from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import gevent
import pytest
import requests
from service import GLOBAL, children, free_port, gproxyd_command, route_section, wait_until

from gproxyd.protocols.http import RequestFramer
from gproxyd.recordfile import HEADER, PLACEHOLDER, RecordReader, encode

NGINX = """\
daemon off;
master_process off;
pid {home}/nginx.pid;
error_log {home}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {home}/body;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 8m;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """An nginx of the test's own answering every request 200: "127.0.0.1:PORT"."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(binary), "nginx is not installed (.ci/install-system-deps)"
    home = tmp_path / "nginx"
    home.mkdir()
    port = free_port()
    (home / "nginx.conf").write_text(NGINX.format(home=home, port=port))
    process = subprocess.Popen([binary, "-c", str(home / "nginx.conf"), "-p", str(home)],
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _accepts(port), what="nginx listening")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def config(port: int, production: str, path, admin: int | None = None, workers: int = 1,
           **keys: str) -> str:
    head = GLOBAL.replace("admin = off", f"admin = 127.0.0.1:{admin}" if admin else
                          "admin = off")
    if workers > 1:
        head = head.replace("[gproxyd]\n", f"[gproxyd]\nworkers = {workers}\n")
    if path:
        keys["record"] = str(path)
    return head + route_section("web", port, production, protocol="http", **keys)


def route_stats(admin: int) -> dict:
    return requests.get(f"http://127.0.0.1:{admin}/stats", timeout=5).json()["routes"]["web"]


def get(path: str, *fields: bytes) -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example\r\n" + \
        b"".join(field + b"\r\n" for field in fields) + b"\r\n"


def post(path: str, body: bytes) -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: example\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def answers(sock: socket.socket, count: int) -> None:
    """Read `count` of nginx's answers ("ok\\n", 2 bytes of body)."""
    data = b""
    while data.count(b"HTTP/1.1 200 OK") < count or not data.endswith(b"ok\n"):
        more = sock.recv(65536)
        assert more, "the connection closed"
        data += more


def whole_request(payload: bytes) -> bool:
    """Whether `payload` is exactly one complete HTTP request."""
    framer = RequestFramer()
    framer.ends = []
    return framer.feed(payload) == [payload.split(b" ", 1)[0].decode()] and \
        framer.ends == [len(payload)]


def read_all(path) -> tuple[list, int]:
    reader = RecordReader(str(path))
    found = list(reader)
    return found, reader.torn


def start(daemons, directory, text: str, **kwargs):
    directory.mkdir(exist_ok=True)
    return daemons(directory, text, **kwargs).start()


# --- 1. what is recorded -----------------------------------------------------------------

def test_curl_and_raw_requests_to_nginx_are_recorded_as_sent(tmp_path, daemons, nginx):
    path = tmp_path / "web.rec"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d", config(port, nginx, path, admin))
    url = f"http://127.0.0.1:{port}"
    upload = tmp_path / "upload"
    upload.write_bytes(bytes(range(256)) * 400)
    runs = [
        ["curl", "-sf", "-H", "Authorization: Bearer s3cr3t", "-b", "session=s3cr3t",
         f"{url}/curl-get"],
        ["curl", "-sf", "--data-binary", f"@{upload}", "-H", "Expect:", f"{url}/curl-post"],
        ["curl", "-sf", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}",
         "-H", "Expect:", f"{url}/curl-chunked"],
    ]
    for command in runs:
        done = subprocess.run(command, capture_output=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, b"ok\n"), done
    pipelined = [get("/raw-1"), post("/raw-2", b"body" * 1000), get("/raw-3")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(pipelined))
        answers(sock, 3)
    wait_until(lambda: route_stats(admin)["record"]["recorded"] == 6, what="6 recorded")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    found, torn = read_all(path)
    assert torn == 0
    assert [record.data for record in found[3:]] == pipelined
    first, second, third = (record.data for record in found[:3])
    assert first.startswith(b"GET /curl-get HTTP/1.1\r\n")
    assert b"\r\nAuthorization: " + PLACEHOLDER + b"\r\n" in first
    assert b"\r\nCookie: " + PLACEHOLDER + b"\r\n" in first
    assert b"s3cr3t" not in path.read_bytes()
    assert second.startswith(b"POST /curl-post HTTP/1.1\r\n")
    assert second.endswith(b"\r\n\r\n" + upload.read_bytes())
    assert third.startswith(b"POST /curl-chunked HTTP/1.1\r\n")
    assert all(whole_request(record.data) for record in found)
    assert [record.time for record in found] == sorted(record.time for record in found)
    assert os.stat(path).st_mode & 0o777 == 0o640


# --- 2. a kill -9 -----------------------------------------------------------------------------

def test_a_kill_9_while_requests_flow_leaves_every_complete_record_readable(
        tmp_path, daemons, nginx):
    path = tmp_path / "web.rec"
    port = free_port()
    daemon = start(daemons, tmp_path / "d", config(port, nginx, path))
    sent = set()

    def client(number: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for burst in range(10_000):
                    batch = [post(f"/c{number}/{burst}/{index}", b"b" * (97 * index))
                             for index in range(8)]
                    sent.update(batch)
                    sock.sendall(b"".join(batch))
                    answers(sock, 8)
        except (OSError, AssertionError):
            return  # the daemon was killed
    clients = [gevent.spawn(client, number) for number in range(8)]
    wait_until(lambda: path.exists() and path.stat().st_size > 2_000_000, timeout=30,
               what="2 MB recorded")
    daemon.signal(signal.SIGKILL)
    assert daemon.wait() == -signal.SIGKILL
    gevent.joinall(clients, timeout=15)
    found, torn = read_all(path)
    assert len(found) > 1000
    assert all(record.data in sent for record in found)
    assert all(whole_request(record.data) for record in found)
    # Every byte is a header, a whole record or the torn tail: nothing torn in the middle.
    assert len(HEADER) + sum(len(encode(0, record.data)) for record in found) + torn == \
        path.stat().st_size


# --- 3. workers = 2 ------------------------------------------------------------------------------

def test_two_workers_record_to_one_file_and_rotate_it_together(tmp_path, daemons, nginx):
    """workers = 2, record-max-size = 16KiB: both workers' requests are all in the files,
    each once, no file torn or rotated twice over, and /stats adds both workers' numbers.
    16 connections: all on one worker has probability 2**-15."""
    path = tmp_path / "web.rec"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d",
                   config(port, nginx, path, admin, workers=2, record_max_size="16KiB",
                          record_keep="1000"))
    workers = children(daemon.pid)
    assert len(workers) == 2
    connections, bursts = 16, 10
    sent = []

    def client(number: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for burst in range(bursts):
                batch = [get(f"/c{number}/{burst}/{index}") for index in range(10)]
                sock.sendall(b"".join(batch))
                answers(sock, 10)
                sent.extend(batch)
    gevent.joinall([gevent.spawn(client, number) for number in range(connections)],
                   timeout=60, raise_error=True)
    total = connections * bursts * 10
    seen = {}

    def merged() -> bool:
        seen.update(route_stats(admin)["record"])
        return seen["recorded"] == total
    wait_until(merged, what=f"{total} recorded in the merged /stats")
    assert {key: value for key, value in seen.items() if key != "bytes"} == {
        "file": str(path), "recorded": total, "dropped": 0, "skipped": 0, "errors": 0}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    files = [name for name in tmp_path.glob("web.rec*") if name.suffix != ".lock"]
    rotated = [name for name in files if name.suffix[1:].isdigit()]
    found = []
    for name in files:
        records, torn = read_all(name)
        assert torn == 0, name
        found += [record.data for record in records]
    assert sorted(found) == sorted(sent)
    assert len(rotated) >= 5
    assert all(name.stat().st_size >= 16384 for name in rotated)
    # Both workers served (and so recorded): each connection's close line names its pid.
    logged_by = {int(line.split("gproxyd[", 1)[1].split("]", 1)[0])
                 for line in daemon.log().splitlines() if "info: route=web client=" in line}
    assert logged_by == set(workers)


# --- 4. reload -------------------------------------------------------------------------------

def test_a_reload_moves_the_recording_then_ends_it(tmp_path, daemons, nginx):
    """SIGHUP with another record path: requests beginning after it go to the new file,
    also on a connection accepted before; the old file keeps what came before. SIGHUP
    without record: /stats shows record null and nothing more is recorded."""
    first, moved = tmp_path / "first.rec", tmp_path / "moved.rec"
    port, admin = free_port(), free_port()
    daemon = start(daemons, tmp_path / "d", config(port, nginx, first, admin))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        def exchange(path: str) -> None:
            sock.sendall(get(path))
            answers(sock, 1)
        exchange("/1")
        daemon.write_config(config(port, nginx, moved, admin))
        daemon.reload()
        exchange("/2")
        wait_until(lambda: route_stats(admin)["record"] == {
            "file": str(moved), "recorded": 2, "dropped": 0, "skipped": 0, "errors": 0,
            "bytes": len(encode(0, get("/1"))) + len(encode(0, get("/2")))},
            what="the second request in the new file")
        daemon.write_config(config(port, nginx, "", admin))
        daemon.reload()
        exchange("/3")
        wait_until(lambda: route_stats(admin)["record"] is None, what="record null")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert [record.data for record in read_all(first)[0]] == [get("/1")]
    assert [record.data for record in read_all(moved)[0]] == [get("/2")]


# --- 5. failures ------------------------------------------------------------------------

def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_write_cut_short_by_the_file_size_limit_is_cut_off_and_logged_once(
        tmp_path, daemons, nginx):
    """RLIMIT_FSIZE = 256 KiB: the write that reaches it is cut short (then EFBIG, as on a
    full disk); the part written is cut off, so the file stays readable to its end; the
    lost requests are counted in errors, logged once; every request is answered."""
    path = tmp_path / "web.rec"
    port, admin = free_port(), free_port()
    directory = tmp_path / "d"
    directory.mkdir()
    daemon = daemons(directory, config(port, nginx, path, admin))
    daemon.start(preexec_fn=_limit_file_size(256 * 1024))
    total = 400
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for number in range(total):
            sock.sendall(post(f"/items/{number}", b"x" * 1000))
            answers(sock, 1)
    wait_until(lambda: route_stats(admin)["record"]["recorded"]
               + route_stats(admin)["record"]["errors"] == total, what="all written or lost")
    numbers = route_stats(admin)["record"]
    assert numbers["errors"] > 0 and numbers["recorded"] > 200
    found, torn = read_all(path)
    assert torn == 0
    assert len(found) == numbers["recorded"]
    assert [record.data for record in found] == [post(f"/items/{number}", b"x" * 1000)
                                                 for number in range(len(found))]
    assert daemon.log().count("cannot write") == 1
    assert f"route web: record: cannot write {path}: File too large" in daemon.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_record_file_that_cannot_be_opened_stops_the_start(tmp_path, workers):
    path = tmp_path / "missing" / "web.rec"
    conf = tmp_path / "gproxyd.conf"
    conf.write_text(config(free_port(), "127.0.0.1:9", path, workers=workers))
    log = tmp_path / "gproxyd.log"
    result = subprocess.run(gproxyd_command() + ["-c", str(conf), "--log-file", str(log)],
                            capture_output=True, text=True, timeout=30)
    problem = (f"route web: record: cannot open {path}: {path.parent} is not a directory "
               "(expected an existing directory gproxyd's user may write to)")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"gproxyd: {problem}\n"


@pytest.fixture
def open_home(request) -> Path:
    """A directory others may enter (pytest's are root's alone), removed after the test."""
    home = Path(tempfile.mkdtemp(prefix="gproxyd-record-"))
    os.chmod(home, 0o755)
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    return home


def test_after_a_privilege_drop_the_user_creates_and_rotates_the_file(open_home, daemons,
                                                                       nginx):
    """user = nobody: the record file is opened after the drop, so it is nobody's, mode
    0640, and nobody rotates it in a directory of its own."""
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    nobody = pwd.getpwnam("nobody")
    records = open_home / "records"
    records.mkdir(mode=0o750)
    os.chown(records, nobody.pw_uid, nobody.pw_gid)
    path = records / "web.rec"
    port = free_port()
    text = config(port, nginx, path, record_max_size="1KiB", record_keep="2").replace(
        "[gproxyd]\n", "[gproxyd]\nuser = nobody\n")
    daemon = daemons(open_home, text).start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for number in range(40):
            sock.sendall(get(f"/items/{number}"))
            answers(sock, 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    for name in (path, records / "web.rec.1", records / "web.rec.2"):
        info = name.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (nobody.pw_uid, 0o640), name
        assert read_all(name)[1] == 0
    assert not (records / "web.rec.3").exists()


def test_a_directory_the_user_cannot_write_stops_the_start(open_home, daemons):
    assert os.getuid() == 0, "this test checks the root -> user switch; run the suite as root"
    records = open_home / "records"
    records.mkdir(mode=0o755)  # root's: nobody may read it, not create files in it
    text = config(free_port(), "127.0.0.1:9", records / "web.rec").replace(
        "[gproxyd]\n", "[gproxyd]\nuser = nobody\n")
    daemon = daemons(open_home, text).start(wait_ready=False)
    assert daemon.wait() == 1
    assert daemon.process.stderr.read().decode() == (
        f"gproxyd: route web: record: cannot write in {records}: Permission denied (the "
        "directory must belong to gproxyd's user: the record file is created and rotated "
        "there)\n")
