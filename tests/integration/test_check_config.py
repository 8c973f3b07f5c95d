"""`gproxyd --check-config` catches configs that parse but cannot run, and reports all of
a file's errors at once (like `haproxy -c`)."""
from __future__ import annotations

import subprocess

import pytest
from service import free_port, gproxyd_command


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    """--check-config of [gproxyd] with the admin endpoint off (unless `text` sets it),
    then `text`."""
    path = tmp_path / "gproxyd.conf"
    head = "[gproxyd]\n" if text.startswith("admin =") else "[gproxyd]\nadmin = off\n"
    path.write_text(head + text, encoding="utf-8")
    return subprocess.run(gproxyd_command() + ["--check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)


def route(name: str, listen: str, production: str, extra: str = "") -> str:
    return f"[route {name}]\nlisten = {listen}\nproduction = {production}\n{extra}"


P = free_port()
BAD = [
    ("wildcard-overlaps-loopback",
     route("a", f"0.0.0.0:{P}", "127.0.0.1:9") + route("b", f"127.0.0.1:{P}", "127.0.0.1:9"),
     f":7: listen: 127.0.0.1:{P} overlaps route a's listen address 0.0.0.0:{P} (expected one "
     "route per address and port)"),
    ("name-overlaps-address",
     route("a", f"localhost:{P}", "127.0.0.1:9") + route("b", f"127.0.0.1:{P}", "127.0.0.1:9"),
     f":7: listen: 127.0.0.1:{P} overlaps route a's listen address localhost:{P}"),
    ("admin-on-a-route",
     f"admin = 0.0.0.0:{P}\n" + route("a", f"127.0.0.1:{P}", "127.0.0.1:9"),
     f":2: admin: 0.0.0.0:{P} overlaps route a's listen address 127.0.0.1:{P} (expected the "
     "admin endpoint on an address and port of its own)"),
    ("listen-is-production",
     route("a", f"127.0.0.1:{P}", f"127.0.0.1:{P}"),
     f":5: production: 127.0.0.1:{P} is this route's own listen address 127.0.0.1:{P}: every "
     "connection would come back to gproxyd in a loop"),
    ("production-reaches-a-wildcard-listen",
     route("a", f"0.0.0.0:{P}", f"localhost:{P}"),
     f":5: production: localhost:{P} is this route's own listen address 0.0.0.0:{P}"),
    ("shadow-is-listen",
     route("a", f"127.0.0.1:{P}", "127.0.0.1:9", f"shadow = 127.0.0.1:{P}\n"),
     f":6: shadow: 127.0.0.1:{P} is this route's own listen address"),
    ("shadow-is-production",
     route("a", f"127.0.0.1:{P}", "127.0.0.1:9", "shadow = 127.0.0.1:9\n"),
     ":6: shadow: 127.0.0.1:9 is production itself: every request would reach production "
     "twice, doubling its side effects (expected a separate backend)"),
    ("connect-timeout-zero",
     route("a", f"127.0.0.1:{P}", "127.0.0.1:9", "connect-timeout = 0\n"),
     ":6: connect-timeout: bad duration '0' (expected more than 0, e.g. 5s)"),
    ("user-missing",
     "user = no-such-user-here\n" + route("a", f"127.0.0.1:{P}", "127.0.0.1:9"),
     ":3: user: no such user 'no-such-user-here' on this host"),
    ("unix-listen-in-missing-directory",
     route("a", "unix:/nonexistent-dir/gproxyd.sock", "127.0.0.1:9"),
     ":4: listen: directory /nonexistent-dir does not exist (expected the socket's "
     "directory to exist"),
    ("did-you-mean",
     route("a", f"127.0.0.1:{P}", "127.0.0.1:9", "shadow-sampel = 10%\n"),
     ":6: shadow-sampel: unknown key in [route a] (did you mean shadow-sample?)"),
    ("route-key-in-global",
     "shadow = 127.0.0.1:9\n" + route("a", f"127.0.0.1:{P}", "127.0.0.1:9"),
     ":3: shadow: unknown key in [gproxyd] (expected it in a [route NAME] section)"),
    ("listen-mode-on-tcp",
     route("a", f"127.0.0.1:{P}", "127.0.0.1:9", "listen-mode = 0660\n"),
     ":6: listen-mode: only a unix:/path listen address has a file mode and owner"),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_a_config_that_cannot_run_fails_the_check(tmp_path, text, expected):
    result = check(tmp_path, text)
    assert result.returncode == 78, result.stdout
    assert f"{tmp_path / 'gproxyd.conf'}{expected}" in result.stderr
    assert result.stderr.startswith("gproxyd: ")
    assert result.stdout == ""


def test_every_error_of_a_file_is_reported_in_one_run(tmp_path):
    text = ("log-level = loud\n"                                                  # line 3
            + route("a", f"127.0.0.1:{P}", "127.0.0.1:9", "shadow-sampel = 10%\n")  # 4-7
            + route("b", f"127.0.0.1:{P}", "127.0.0.1:9", "shadow = 127.0.0.1:9\n")  # 8-11
            + "this is not a key\n"                                                # 12
            + route("c", f"127.0.0.1:{free_port()}", "127.0.0.1:9",
                    "idle-timeout = soon\n"))                                       # 13-16
    result = check(tmp_path, text)
    assert result.returncode == 78
    lines = result.stderr.splitlines()
    path = tmp_path / "gproxyd.conf"
    assert [line.split(": ")[1:3] for line in lines] == [
        [f"{path}:12", "cannot parse 'this is not a key' (expected [section] or key = value)"],
        [f"{path}:7", "shadow-sampel"],
        [f"{path}:11", "shadow"],
        [f"{path}:16", "idle-timeout"],
        [f"{path}:3", "log-level"],
        [f"{path}:9", "listen"],
    ], result.stderr
    assert all(line.startswith("gproxyd: ") for line in lines)


def test_addresses_that_do_coexist_pass(tmp_path):
    """IPv6 listeners are IPv6-only, so [::]:P and 0.0.0.0:P are two sockets; a route
    whose production is another route's listen address is a chain, not a loop."""
    other = free_port()
    text = (route("v4", f"0.0.0.0:{P}", f"127.0.0.1:{other}")
            + route("v6", f"[::]:{P}", "127.0.0.1:9")
            + route("chained", f"127.0.0.1:{other}", "127.0.0.1:9",
                    f"shadow = 127.0.0.1:{free_port()}\n"))
    result = check(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "configuration OK, 3 route(s)" in result.stdout
