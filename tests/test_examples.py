"""examples/: each example proxy against in-process backends over real loopback sockets.

The examples are imported by file path (as `hooks = examples/NAME.py` would), driven
through their own command line (`build(argv)`), and, where a config file can use them,
loaded from a config file too. Every wait is bounded.
"""
import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import backends
import gevent
import pytest
from backends import received, recording, recv_exactly, recv_to_eof, unused_port, wait_until
from gevent.event import Event

import gproxyd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
NAMES = ("line_interceptor", "duplex_http", "selective_forward", "smtp_whitelist",
         "port_forward", "balancer")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"gproxyd_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so a failing hook's traceback is trimmed to it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run():
    """run(proxy) starts a gproxyd.Proxy and returns it; all are stopped at the end."""
    running = []

    def start(proxy):
        running.append(proxy.start())
        return proxy

    yield start
    for proxy in running:
        proxy.stop(timeout=1)


def connect(proxy, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def recv_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise AssertionError(f"EOF after {line!r}")
        line += data
    return line


# --- every example is a runnable script ----------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_example_runs_as_a_script(name):
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--listen" in result.stdout


def test_port_forward_script_forwards_a_port(serve):
    production = serve(backends.echo)
    port = unused_port()
    script = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "port_forward.py"), "--listen", f"127.0.0.1:{port}",
         "--production", production.address],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answered():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except ConnectionRefusedError:
                return None
            sock.sendall(b"ping")
            return recv_exactly(sock, 4)
        assert wait_until(answered, timeout=20, what="port_forward.py serving") == b"ping"
    finally:
        script.terminate()  # SIGTERM: the script stops like any Python program
        script.wait(timeout=10)


def test_port_forward_relays_both_ways_and_passes_half_close_on(serve, run):
    production = serve(backends.sink(reply_at_eof=b"got it"))
    proxy = run(load_example("port_forward").build(
        ["--listen", "127.0.0.1:0", "--production", production.address]))
    client = connect(proxy)
    client.sendall(b"x" * 100_000)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(client) == b"got it"
    assert production.conns[0].received == 100_000


# --- line_interceptor ----------------------------------------------------------------------

def chunked_server(*chunks: bytes):
    """A handler: read one line, then send `chunks` one by one, a pause between, and close."""
    def handle(conn):
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.data = conn.sock.recv(65536)
        for chunk in chunks:
            conn.sock.sendall(chunk)
            gevent.sleep(0.05)  # a separate read at the proxy
    return handle


def test_line_interceptor_rewrites_a_word_split_across_chunks(serve, run):
    module = load_example("line_interceptor")
    seen = []

    class Recording(module.LineInterceptor):
        def on_response(self, conn, backend, data):
            seen.append(data)
            return super().on_response(conn, backend, data)

    production = serve(chunked_server(b"Hello world\nsay He", b"llo again\n",
                                      b"Hello\nbye\n"))
    proxy = run(gproxyd.Proxy(listen="127.0.0.1:0", production=production.address,
                              hooks=Recording()))
    client = connect(proxy)
    client.sendall(b"GET\n")
    assert recv_to_eof(client) == b"Jello world\nsay Jello again\nJello\nbye\n"
    assert b"say He" in seen[0] and seen[1].startswith(b"llo"), \
        f"the word was not split across chunks: {seen}"


def test_line_interceptor_command_line_words(serve, run):
    production = serve(chunked_server(b"Hello, Hello\n"))
    proxy = run(load_example("line_interceptor").build(
        ["--listen", "127.0.0.1:0", "--production", production.address,
         "--old", "Hello", "--new", "Bye"]))
    client = connect(proxy)
    client.sendall(b"GET\n")
    assert recv_to_eof(client) == b"Bye, Bye\n"


def test_line_interceptor_hands_on_an_unfinished_last_line(serve, run):
    """Production's last line has no newline: on_finish passes it on, rewritten."""
    production = serve(chunked_server(b"Hello\nHel", b"lo"))
    proxy = run(load_example("line_interceptor").build(
        ["--listen", "127.0.0.1:0", "--production", production.address]))
    client = connect(proxy)
    client.sendall(b"GET\n")
    assert recv_to_eof(client) == b"Jello\nJello"


def test_line_interceptor_passes_an_endless_line_on_as_it_comes(serve, run):
    """No newline in sight (binary data): held back only up to MAX_LINE, not to the end."""
    def endless(conn):
        conn.sock.recv(65536)
        conn.sock.sendall(b"Hello" + b"x" * (256 * 1024))
        conn.read_to_eof()  # holds the connection open until the client is done

    proxy = run(load_example("line_interceptor").build(
        ["--listen", "127.0.0.1:0", "--production", serve(endless).address]))
    client = connect(proxy)
    client.sendall(b"GET\n")
    data = recv_exactly(client, 5 + 256 * 1024)
    assert data.startswith(b"Jello") and data.count(b"x") == 256 * 1024


def test_line_interceptor_from_a_config_file(serve, proxy):
    production = serve(chunked_server(b"Hello from config\n"))
    proxied = proxy(production.address, hooks=str(EXAMPLES / "line_interceptor.py"))
    client = proxied.connect()
    client.sendall(b"GET\n")
    assert recv_to_eof(client) == b"Jello from config\n"


# --- duplex_http ---------------------------------------------------------------------------

def http_server(name: str, delay: float = 0.0):
    """A handler: HTTP/1.1 requests (Content-Length bodies) until EOF; each answered with
    `name` after `delay`. conn.requests holds each request's head and body."""
    def handle(conn):
        conn.requests = []
        reader = conn.sock.makefile("rb")
        while True:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = reader.readline()
                if not line:
                    conn.eof.set()
                    return
                head += line
            length = re.search(rb"(?im)^Content-Length:\s*(\d+)", head)
            body = reader.read(int(length.group(1))) if length else b""
            conn.requests.append((head, body))
            gevent.sleep(delay)
            answer = name.encode()
            conn.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(answer), answer))
    return handle


def test_duplex_http_mirrors_requests_tags_them_and_times_each_backend(serve, run):
    module = load_example("duplex_http")
    production = serve(http_server("production"))
    shadow = serve(http_server("shadow", delay=0.2))
    reports = {}
    finished = Event()

    def report(conn, backend, first, last):
        reports[backend] = (first, last)
        if len(reports) == 2:
            finished.set()

    proxy = run(gproxyd.Proxy(listen="127.0.0.1:0", production=production.address,
                              shadow=[shadow.address],
                              hooks=module.DuplexHTTP("gproxyd-test", report)))
    client = connect(proxy)
    body = b"User-Agent: not a header\r\n\r\n"  # in a body: passed on untouched
    # The head arrives in two pieces, split inside the User-Agent header.
    client.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nUser-Ag")
    gevent.sleep(0.05)
    client.sendall(b"ent: curl/8.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                   + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nproduction"
    assert recv_exactly(client, 2 * len(expected)) == 2 * expected
    client.close()

    assert finished.wait(timeout=10), f"on_finish reports so far: {reports}"
    for server, agent, get_head_expected in (
            (production, b"curl/8.0", b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"),
            (shadow, b"gproxyd-test",
             b"GET /b HTTP/1.1\r\nUser-Agent: gproxyd-test\r\nHost: x\r\n\r\n")):
        wait_until(lambda server=server: len(getattr(server.conns[0], "requests", [])) == 2)
        (post_head, post_body), (get_head, _) = server.conns[0].requests
        assert post_head == (b"POST /a HTTP/1.1\r\nHost: x\r\nUser-Agent: " + agent
                             + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert post_body == body
        assert get_head == get_head_expected
    first, last = reports["production"]
    assert 0 <= first <= last
    shadow_first, shadow_last = reports[shadow.address]
    assert 0.2 <= shadow_first <= shadow_last  # the shadow waited 0.2 s per request


def test_duplex_http_from_a_config_file(serve, proxy, caplog):
    production = serve(http_server("production"))
    shadow = serve(http_server("shadow"))
    proxied = proxy(production.address, shadow=[shadow.address],
                    hooks=str(EXAMPLES / "duplex_http.py"))
    client = proxied.connect()
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert recv_exactly(client, 49).endswith(b"\r\n\r\nproduction")
    client.close()
    wait_until(lambda: len(getattr(shadow.conns[0], "requests", [])) == 1
               if shadow.conns else False)
    assert b"User-Agent: gproxyd-duplex\r\n" in shadow.conns[0].requests[0][0]
    timed = wait_until(lambda: [r.getMessage() for r in caplog.records
                                if "answered in" in r.getMessage()]
                       if len([r for r in caplog.records if "answered in" in r.getMessage()])
                       == 2 else None)
    assert any(f": {shadow.address} answered in" in line for line in timed)
    assert any(": production answered in" in line for line in timed)


# --- selective_forward ---------------------------------------------------------------------

def test_selective_forward_mirrors_only_the_chosen_commands(serve, run):
    production, shadow = serve(recording()), serve(recording())
    module = load_example("selective_forward")
    proxy = run(module.build(["--listen", "127.0.0.1:0", "--production", production.address,
                              "--shadow", shadow.address]))
    client = connect(proxy)
    sent = b""
    for chunk in (b"GET a\r\n", b"DEL a\r\n", b"SE", b"T b 1\r\n", b"get c\r\nDEL c\r\n",
                  b"FLUSHALL\r\n"):
        client.sendall(chunk)
        sent += chunk
        if sent.endswith(b"\n"):  # one chunk at a time: the proxy has passed it on
            wait_until(lambda sent=sent: received(production) == sent,
                       what=f"production got {sent!r}")
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: production.conns[0].eof.is_set())
    wait_until(lambda: shadow.conns and shadow.conns[0].eof.is_set(), what="shadow's EOF")
    assert received(production) == sent
    # "get c" shared its chunk with a DEL: production only.
    assert received(shadow) == b"GET a\r\nSET b 1\r\n"


def test_selective_forward_sends_an_endless_line_to_production_alone(serve, run):
    production, shadow = serve(recording()), serve(recording())
    proxy = run(load_example("selective_forward").build(
        ["--listen", "127.0.0.1:0", "--production", production.address,
         "--shadow", shadow.address]))
    client = connect(proxy)
    start = b"SET big " + b"v" * (128 * 1024)
    client.sendall(start)  # no newline yet: passed on all the same, past 64 KiB
    wait_until(lambda: received(production) == start, what="the long line's start")
    long_set = start + b"v" * 1000 + b"\r\n"
    client.sendall(long_set[len(start):])
    wait_until(lambda: received(production) == long_set, what="the long line at production")
    client.sendall(b"GET big\r\n")
    wait_until(lambda: received(production) == long_set + b"GET big\r\n")
    client.close()
    wait_until(lambda: shadow.conns and shadow.conns[0].eof.is_set(), what="shadow's EOF")
    assert received(shadow) == b"GET big\r\n"


def test_selective_forward_from_a_config_file(serve, proxy):
    production, shadow = serve(recording()), serve(recording())
    proxied = proxy(production.address, shadow=[shadow.address],
                    hooks=str(EXAMPLES / "selective_forward.py"))
    client = proxied.connect()
    client.sendall(b"SET k v\r\n")
    wait_until(lambda: received(production) == b"SET k v\r\n")
    client.sendall(b"DEL k\r\n")
    wait_until(lambda: received(production) == b"SET k v\r\nDEL k\r\n")
    client.close()
    wait_until(lambda: shadow.conns and shadow.conns[0].eof.is_set(), what="shadow's EOF")
    assert received(shadow) == b"SET k v\r\n"


# --- smtp_whitelist ------------------------------------------------------------------------

EHLO_ANSWER = b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 CHUNKING\r\n"


def fake_smtp(conn):
    """A line-based fake mail server: 250 to everything (354 to DATA, 221 to QUIT; EHLO
    lists extensions). conn.commands and conn.message record what it received."""
    conn.commands, conn.message = [], b""
    reader = conn.sock.makefile("rb")
    conn.sock.sendall(b"220 fake.example ESMTP\r\n")
    while True:
        line = reader.readline()
        if not line:
            conn.eof.set()
            return
        conn.commands.append(line)
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"EHLO":
            conn.sock.sendall(EHLO_ANSWER)
        elif verb == b"DATA":
            conn.sock.sendall(b"354 go ahead\r\n")
            while True:
                body_line = reader.readline()
                if body_line in (b".\r\n", b""):
                    break
                conn.message += body_line
            conn.sock.sendall(b"250 2.0.0 queued\r\n")
        elif verb == b"QUIT":
            conn.sock.sendall(b"221 bye\r\n")
            return
        else:
            conn.sock.sendall(b"250 2.1.0 ok\r\n")


def smtp_answer(sock: socket.socket) -> bytes:
    """One (multi-line) SMTP answer."""
    answer = recv_line(sock)
    while answer.splitlines()[-1][3:4] == b"-":
        answer += recv_line(sock)
    return answer


REFUSAL = b"550 5.1.1 recipient not allowed\r\n"


def test_smtp_whitelist_refuses_unlisted_recipients_itself(serve, run):
    server = serve(fake_smtp)
    proxy = run(load_example("smtp_whitelist").build(
        ["--listen", "127.0.0.1:0", "--production", server.address,
         "--allow", "alice@example.com,bob@example.com"]))
    client = connect(proxy)
    assert smtp_answer(client) == b"220 fake.example ESMTP\r\n"
    client.sendall(b"EHLO me\r\n")
    # STARTTLS and CHUNKING are taken out; the answer still ends properly.
    assert smtp_answer(client) == b"250-fake.example\r\n250 PIPELINING\r\n"
    exchange = [(b"MAIL FROM:<me@example.org>\r\n", b"250 2.1.0 ok\r\n"),
                (b"RCPT TO:<Alice@Example.com>\r\n", b"250 2.1.0 ok\r\n"),
                (b"RCPT TO:<mallory@evil.example>\r\n", REFUSAL),
                (b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n"),
                (b"DATA\r\n", b"354 go ahead\r\n")]
    for command, answer in exchange:
        client.sendall(command)
        assert smtp_answer(client) == answer, command
    # In the message itself nothing is a command: it all passes.
    client.sendall(b"Subject: hi\r\n\r\nRCPT TO:<mallory@evil.example>\r\n.\r\n")
    assert smtp_answer(client) == b"250 2.0.0 queued\r\n"
    client.sendall(b"QUIT\r\n")
    assert smtp_answer(client) == b"221 bye\r\n"

    commands = server.conns[0].commands
    assert commands == [b"EHLO me\r\n", b"MAIL FROM:<me@example.org>\r\n",
                        b"RCPT TO:<Alice@Example.com>\r\n", b"DATA\r\n", b"QUIT\r\n"]
    assert server.conns[0].message == b"Subject: hi\r\n\r\nRCPT TO:<mallory@evil.example>\r\n"


def test_smtp_whitelist_answers_pipelined_commands_in_order(serve, run):
    server = serve(fake_smtp)
    proxy = run(load_example("smtp_whitelist").build(
        ["--listen", "127.0.0.1:0", "--production", server.address,
         "--allow", "alice@example.com"]))
    client = connect(proxy)
    # Sent before even the greeting arrived: every answer must still come in its turn.
    client.sendall(b"EHLO me\r\nMAIL FROM:<me@example.org>\r\nRCPT TO:<eve@example.com>\r\n"
                   b"RCPT TO:<alice@example.com>\r\nRCPT TO:<mallory@example.com>\r\n")
    expected = (b"220 fake.example ESMTP\r\n250-fake.example\r\n250 PIPELINING\r\n"
                b"250 2.1.0 ok\r\n" + REFUSAL + b"250 2.1.0 ok\r\n" + REFUSAL)
    assert recv_exactly(client, len(expected)) == expected
    assert server.conns[0].commands == [b"EHLO me\r\n", b"MAIL FROM:<me@example.org>\r\n",
                                        b"RCPT TO:<alice@example.com>\r\n"]


def test_smtp_whitelist_reads_commands_after_a_lax_end_of_message(serve, run):
    """SMTP smuggling: a message ended by a bare-LF "." (which a lax server accepts)
    followed by a RCPT: the proxy takes it as a command and refuses it."""
    server = serve(fake_smtp)
    proxy = run(load_example("smtp_whitelist").build(
        ["--listen", "127.0.0.1:0", "--production", server.address,
         "--allow", "alice@example.com"]))
    client = connect(proxy)
    assert smtp_answer(client).startswith(b"220 ")
    client.sendall(b"DATA\r\n")
    assert smtp_answer(client) == b"354 go ahead\r\n"
    client.sendall(b"hi\n.\nRCPT TO:<eve@example.com>\r\n.\r\n")
    assert smtp_answer(client) == b"250 2.0.0 queued\r\n"
    assert smtp_answer(client) == REFUSAL
    client.sendall(b"QUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    recv_to_eof(client)
    wait_until(lambda: server.conns[0].done.is_set(), what="the fake server done")
    assert b"eve@" not in b"".join(server.conns[0].commands) + server.conns[0].message


def test_smtp_whitelist_closes_on_an_endless_line(serve, run):
    server = serve(fake_smtp)
    proxy = run(load_example("smtp_whitelist").build(
        ["--listen", "127.0.0.1:0", "--production", server.address]))
    client = connect(proxy)
    assert smtp_answer(client).startswith(b"220 ")
    client.sendall(b"RCPT TO:<" + b"a" * (128 * 1024))
    assert recv_to_eof(client) == b"500 5.5.2 line too long\r\n"
    assert server.conns[0].commands == []


def test_smtp_whitelist_from_a_config_file(serve, proxy, monkeypatch):
    monkeypatch.setenv("GPROXYD_SMTP_WHITELIST", "alice@example.com")
    server = serve(fake_smtp)
    proxied = proxy(server.address, hooks=str(EXAMPLES / "smtp_whitelist.py"))
    client = proxied.connect()
    assert smtp_answer(client).startswith(b"220 ")
    client.sendall(b"RCPT TO:<bob@example.com>\r\n")
    assert smtp_answer(client) == REFUSAL
    client.sendall(b"RCPT TO:<alice@example.com>\r\n")
    assert smtp_answer(client) == b"250 2.1.0 ok\r\n"
    assert server.conns[0].commands == [b"RCPT TO:<alice@example.com>\r\n"]


# --- balancer ------------------------------------------------------------------------------

def named(name: str):
    """A handler: answer each line with `name`, until the client's EOF."""
    def handle(conn):
        reader = conn.sock.makefile("rb")
        while reader.readline():
            conn.sock.sendall(name.encode() + b"\n")
        conn.eof.set()
    return handle


@pytest.fixture
def three_backends(serve):
    """Backends A and B answering their name, and a dead one (stopped: refuses)."""
    a, b, dead = serve(named("A")), serve(named("B")), serve(named("dead"))
    dead.stop()
    return a, b, dead


def balancer_for(run, backends_, strategy):
    module = load_example("balancer")
    argv = ["--listen", "127.0.0.1:0", "--strategy", strategy]
    for backend in backends_:
        argv += ["--backend", backend.address]
    proxy, balancer = module.build(argv)
    return run(proxy), balancer


def ask(proxy) -> tuple[socket.socket, bytes]:
    """Connect through the balancer; returns the open socket and who answered."""
    sock = connect(proxy)
    sock.sendall(b"who?\n")
    return sock, recv_line(sock).strip()


def test_balancer_round_robin_alternates_over_the_live_backends(three_backends, run):
    a, b, dead = three_backends
    proxy, balancer = balancer_for(run, [a, dead, b], "round-robin")
    balancer.check(timeout=2)
    assert balancer.down == {dead.address}

    answers = []
    for _ in range(6):
        sock, name = ask(proxy)
        sock.close()
        answers.append(name)
    assert set(answers) == {b"A", b"B"}
    assert all(one != two for one, two in zip(answers, answers[1:], strict=False)), answers


def test_balancer_skips_a_dead_backend_it_was_not_told_about(three_backends, run):
    """No health check yet: the dead backend is first choice for some connections, and
    the session falls through to the next address; no client connection fails."""
    a, b, dead = three_backends
    proxy, balancer = balancer_for(run, [dead, a, b], "round-robin")
    answers = []
    for _ in range(3):  # each backend has a turn at the head of the list
        sock, name = ask(proxy)
        sock.close()
        answers.append(name)
    assert sorted(answers) == [b"A", b"A", b"B"]


def test_balancer_least_connections_sends_new_connections_to_the_idle_backend(
        three_backends, run):
    a, b, dead = three_backends
    proxy, balancer = balancer_for(run, [a, b, dead], "least-connections")
    balancer.check(timeout=2)

    held, busy = ask(proxy)  # stays open
    for _ in range(3):
        sock, name = ask(proxy)
        assert name != busy, "a new connection went to the backend that is busy"
        sock.close()
        idle = a.address if name == b"A" else b.address
        wait_until(lambda idle=idle: balancer.active[idle] == 0,
                   what="on_finish counted the close")
    # Now both have one: a second held connection goes to the other one.
    other, second = ask(proxy)
    assert second != busy
    held.close()
    other.close()
    wait_until(lambda: not any(balancer.active.values()),
               what=f"every connection counted out: {balancer.active}")


def test_balancer_health_check_notices_a_backend_coming_back(serve, run):
    a = serve(named("A"))
    port = unused_port()
    dead = f"127.0.0.1:{port}"
    module = load_example("balancer")
    balancer = module.Balancer([a.address, dead])
    balancer.check(timeout=2)
    assert balancer.down == {dead}
    back = backends.Backend(named("B"), port=port)
    try:
        balancer.check(timeout=2)
        assert balancer.down == set()
    finally:
        back.stop()


def test_balancer_rejects_a_bad_strategy():
    module = load_example("balancer")
    with pytest.raises(ValueError, match="bad strategy 'random'"):
        module.Balancer(["127.0.0.1:1"], "random")
