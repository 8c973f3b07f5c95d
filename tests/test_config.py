"""load_config: tables of good configs with their values, and of bad ones with the exact message."""
from __future__ import annotations

import errno
import os
import socket

import pytest

from gproxyd.config import ConfigError, load_config
from gproxyd.settings import GLOBAL_BY_NAME, GLOBAL_OPTIONS, ROUTE_BY_NAME, ROUTE_OPTIONS

ROUTE = "[route web]\nlisten = 127.0.0.1:8080\nproduction = 127.0.0.1:8081\n"


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "gproxyd.conf"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _lookup(config, dotted: str):
    """'settings.log_level' or 'web.listen.port' (a route by name) -> the value."""
    first, *rest = dotted.split(".")
    if first == "settings":
        value = config.settings
    else:
        (value,) = [route for route in config.routes if route.name == first]
    for attr in rest:
        value = getattr(value, attr)
    return value


# --- good configs ----------------------------------------------------------------------

MiB = 1024 ** 2

GOOD = [
    # id, file text, argv, env, {dotted attribute: expected value}
    ("spot-defaults", ROUTE, [], {},
     {"settings.admin.sockaddr": ("127.0.0.1", 9901), "settings.log_file": "-",
      "settings.log_level": "info", "settings.drain_timeout": 30.0, "settings.user": "",
      "settings.shadow_memory": 256 * MiB,
      "web.shadow": (), "web.shadow_sample": 1.0, "web.shadow_buffer": 64 * MiB,
      "web.idle_timeout": 900.0, "web.max_connections": 10000, "web.protocol": "tcp"}),
    ("route-fields", ROUTE, [], {},
     {"web.name": "web", "web.listen.family": socket.AF_INET,
      "web.listen.sockaddr": ("127.0.0.1", 8080), "web.production.port": 8081,
      "web.listen.text": "127.0.0.1:8080"}),
    ("duration-ms", ROUTE + "connect-timeout = 250ms\n", [], {}, {"web.connect_timeout": 0.25}),
    ("duration-s", ROUTE + "connect-timeout = 5s\n", [], {}, {"web.connect_timeout": 5.0}),
    ("duration-m", ROUTE + "idle-timeout = 15m\n", [], {}, {"web.idle_timeout": 900.0}),
    ("duration-h", ROUTE + "idle-timeout = 1h\n", [], {}, {"web.idle_timeout": 3600.0}),
    ("duration-bare-seconds", ROUTE + "shadow-linger = 2\n", [], {}, {"web.shadow_linger": 2.0}),
    ("duration-fraction", ROUTE + "shadow-linger = 1.5s\n", [], {}, {"web.shadow_linger": 1.5}),
    ("duration-zero", "[gproxyd]\nstats-interval = 0\n" + ROUTE, [], {},
     {"settings.stats_interval": 0.0}),
    ("size-kib", ROUTE + "shadow-buffer = 512KiB\n", [], {}, {"web.shadow_buffer": 512 * 1024}),
    ("size-mib", ROUTE + "shadow-buffer = 16MiB\n", [], {}, {"web.shadow_buffer": 16 * MiB}),
    ("size-gib", ROUTE + "shadow-buffer = 1GiB\n", [], {}, {"web.shadow_buffer": 1024 * MiB}),
    ("size-bytes", ROUTE + "shadow-buffer = 65536\n", [], {}, {"web.shadow_buffer": 65536}),
    ("size-space-and-case", ROUTE + "shadow-buffer = 2 mib\n", [], {},
     {"web.shadow_buffer": 2 * MiB}),
    ("observe-max-header-default", ROUTE + "protocol = http\n", [], {},
     {"web.observe_max_header": 16 * 1024}),
    ("observe-max-header", ROUTE + "protocol = http\nobserve-max-header = 32KiB\n", [], {},
     {"web.observe_max_header": 32 * 1024}),
    ("observe-max-header-bytes", ROUTE + "observe-max-header = 8192\n", [], {},
     {"web.observe_max_header": 8192}),
    ("percent", ROUTE + "shadow-sample = 12.5%\n", [], {}, {"web.shadow_sample": 0.125}),
    ("percent-as-fraction", ROUTE + "shadow-sample = 0.5\n", [], {}, {"web.shadow_sample": 0.5}),
    ("ipv6-listen",
     "[route v6]\nlisten = [::1]:8080\nproduction = [2001:db8::5]:80\n", [], {},
     {"v6.listen.family": socket.AF_INET6, "v6.listen.sockaddr": ("::1", 8080),
      "v6.production.host": "2001:db8::5", "v6.production.text": "[2001:db8::5]:80"}),
    ("ipv6-any", "[route v6]\nlisten = [::]:8080\nproduction = 127.0.0.1:80\n", [], {},
     {"v6.listen.sockaddr": ("::", 8080)}),
    ("host-name", "[route web]\nlisten = 127.0.0.1:8080\nproduction = backend.internal:80\n",
     [], {}, {"web.production.host": "backend.internal", "web.production.numeric": False}),
    ("unix-listen-and-production",
     "[route sock]\nlisten = unix:/tmp/gproxyd-in.sock\nproduction = unix:/run/app/app.sock\n",
     [], {},
     {"sock.listen.family": socket.AF_UNIX, "sock.listen.sockaddr": "/tmp/gproxyd-in.sock",
      "sock.production.path": "/run/app/app.sock"}),
    ("shadow-one", ROUTE + "shadow = 127.0.0.1:8082\n", [], {},
     {"web.shadow": ("127.0.0.1:8082",)}),
    ("shadow-list", ROUTE + "shadow = 127.0.0.1:8082, [::1]:8083,unix:/run/s.sock\n", [], {},
     {"web.shadow": ("127.0.0.1:8082", "[::1]:8083", "unix:/run/s.sock")}),
    ("shadow-trailing-comma", ROUTE + "shadow = 127.0.0.1:8082,\n", [], {},
     {"web.shadow": ("127.0.0.1:8082",)}),
    ("shadow-empty", ROUTE + "shadow =\n", [], {}, {"web.shadow": ()}),
    ("admin-off", "[gproxyd]\nadmin = off\n" + ROUTE, [], {}, {"settings.admin": None}),
    ("choice-case", ROUTE + "protocol = HTTP\n", [], {}, {"web.protocol": "http"}),
    ("comments-and-colon-syntax",
     "; a comment\n# another\n[gproxyd]   ; trailing\n  Log-Level: warning  # why\n\n"
     "[route web]\nlisten = 127.0.0.1:8080 ; public\nproduction = 127.0.0.1:8081\n", [], {},
     {"settings.log_level": "warning", "web.listen.port": 8080}),
    ("two-routes-in-order",
     ROUTE + "[route api]\nlisten = 127.0.0.1:9090\nproduction = 127.0.0.1:9091\n", [], {},
     {"api.listen.port": 9090, "web.production.port": 8081}),
    ("same-port-other-host",
     ROUTE + "[route lo2]\nlisten = 127.0.0.2:8080\nproduction = 127.0.0.1:8081\n", [], {},
     {"lo2.listen.sockaddr": ("127.0.0.2", 8080)}),
    # Precedence: defaults < file < environment < command line.
    ("precedence-default", ROUTE, [], {}, {"settings.log_level": "info"}),
    ("precedence-file", "[gproxyd]\nlog-level = warning\n" + ROUTE, [], {},
     {"settings.log_level": "warning"}),
    ("precedence-env-over-file", "[gproxyd]\nlog-level = warning\n" + ROUTE, [],
     {"GPROXYD_LOG_LEVEL": "error"}, {"settings.log_level": "error"}),
    ("precedence-flag-over-env", "[gproxyd]\nlog-level = warning\n" + ROUTE,
     ["--log-level", "debug"], {"GPROXYD_LOG_LEVEL": "error"}, {"settings.log_level": "debug"}),
    ("precedence-flag-equals", ROUTE, ["--log-level=debug"], {}, {"settings.log_level": "debug"}),
    ("env-only", ROUTE, [], {"GPROXYD_DRAIN_TIMEOUT": "2m"}, {"settings.drain_timeout": 120.0}),
    ("env-other-vars-ignored", ROUTE, [], {"HOME": "/root", "GPROXYD_NOT_AN_OPTION": "x"},
     {"settings.log_level": "info"}),
    ("flag-ipv6-admin", ROUTE, ["--admin", "[::1]:9901"], {},
     {"settings.admin.sockaddr": ("::1", 9901)}),
    ("flag-config-is-not-an-option", ROUTE, ["-c", "/elsewhere.conf", "--check-config"], {},
     {"settings.log_level": "info"}),
    ("boolean-file", "[gproxyd]\ndaemonize = yes\nlog-file = /tmp/g.log\n" + ROUTE, [], {},
     {"settings.daemonize": True}),
    ("boolean-bare-flag", ROUTE, ["--daemonize", "--log-file", "/tmp/g.log"], {},
     {"settings.daemonize": True}),
    ("boolean-flag-over-file", "[gproxyd]\ndaemonize = yes\n" + ROUTE, ["--daemonize", "no"],
     {}, {"settings.daemonize": False}),
    ("boolean-env", ROUTE, [], {"GPROXYD_DAEMONIZE": "on", "GPROXYD_LOG_FILE": "/tmp/g.log"},
     {"settings.daemonize": True}),
]


@pytest.mark.parametrize("text, argv, env, expected", [case[1:] for case in GOOD],
                         ids=[case[0] for case in GOOD])
def test_good_config(tmp_path, text, argv, env, expected):
    config = load_config(_write(tmp_path, text), argv, env)
    got = {key: _lookup(config, key) for key in expected}
    # Address lists compare by the text the user wrote.
    got = {key: tuple(map(str, value)) if key.endswith(".shadow") else value
           for key, value in got.items()}
    assert got == expected


def test_every_unset_option_gets_its_registry_default(tmp_path):
    config = load_config(_write(tmp_path, ROUTE), [], {})
    for option in GLOBAL_OPTIONS:
        assert getattr(config.settings, option.attr) == option.parse(option.default), option.name
    (route,) = config.routes
    for option in ROUTE_OPTIONS:
        if option.default is not None:
            assert getattr(route, option.attr) == option.parse(option.default), option.name


def test_config_knows_its_path_and_where_each_route_starts(tmp_path):
    path = _write(tmp_path, "[gproxyd]\n\n" + ROUTE)
    config = load_config(path, [], {})
    assert config.path == path
    assert config.routes[0].where == f"{path}:3"


def test_env_parameter_replaces_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GPROXYD_LOG_LEVEL", "error")
    path = _write(tmp_path, ROUTE)
    assert load_config(path, [], {}).settings.log_level == "info"
    assert load_config(path, []).settings.log_level == "error"


def test_config_is_frozen(tmp_path):
    config = load_config(_write(tmp_path, ROUTE), [], {})
    with pytest.raises(AttributeError):
        config.routes[0].listen = None
    with pytest.raises(AttributeError):
        config.settings.log_level = "debug"


# --- bad configs: the exact message ----------------------------------------------------

ROUTE_KEYS = ", ".join(sorted(ROUTE_BY_NAME))
GLOBAL_KEYS = ", ".join(sorted(GLOBAL_BY_NAME))
DURATION_EXPECTED = "(expected a number with ms, s, m or h, e.g. 5s)"

BAD = [
    # id, file text, argv, env, message ({path} is the config file)
    ("unknown-section", "[gproxyd]\n[routes web]\n" + ROUTE[12:], [], {},
     "{path}:2: unknown section [routes web] (expected [gproxyd] or [route NAME], NAME of "
     "letters, digits, '-', '_' or '.')"),
    ("route-without-name", "[route]\nlisten = 127.0.0.1:8080\n", [], {},
     "{path}:1: unknown section [route] (expected [gproxyd] or [route NAME], NAME of "
     "letters, digits, '-', '_' or '.')"),
    ("unknown-route-key", ROUTE + "timeout = 5s\n", [], {},
     "{path}:4: timeout: unknown key in [route web] (did you mean idle-timeout?)"),
    ("unknown-key-far-from-any", ROUTE + "colour = blue\n", [], {},
     "{path}:4: colour: unknown key in [route web] (expected one of: " + ROUTE_KEYS + ")"),
    ("unknown-global-key", "[gproxyd]\nlisten = 127.0.0.1:80\n" + ROUTE, [], {},
     "{path}:2: listen: unknown key in [gproxyd] (expected it in a [route NAME] section)"),
    ("key-outside-section", "log-level = debug\n" + ROUTE, [], {},
     "{path}:1: log-level: key outside any section (expected it under [gproxyd] or "
     "[route NAME])"),
    ("not-key-value", ROUTE + "shadow 127.0.0.1:8082\n", [], {},
     "{path}:4: cannot parse 'shadow 127.0.0.1:8082' (expected [section] or key = value)"),
    ("bad-address", "[route web]\nlisten = 8080\nproduction = 127.0.0.1:8081\n", [], {},
     "{path}:2: listen: bad address '8080' (expected host:port, [ipv6]:port or unix:/path)"),
    ("bad-port", "[route web]\nlisten = 127.0.0.1:notaport\nproduction = 127.0.0.1:8081\n",
     [], {}, "{path}:2: listen: bad port 'notaport' (expected 1-65535)"),
    ("port-zero", "[route web]\nlisten = 127.0.0.1:0\nproduction = 127.0.0.1:8081\n", [], {},
     "{path}:2: listen: bad port '0' (expected 1-65535)"),
    ("port-too-big", "[route web]\nlisten = 127.0.0.1:8080\nproduction = 127.0.0.1:65536\n",
     [], {}, "{path}:3: production: bad port '65536' (expected 1-65535)"),
    ("bad-host", "[route web]\nlisten = 127.0.0.1:8080\nproduction = back_end:80\n", [], {},
     "{path}:3: production: bad host 'back_end' (expected an IP address or a host name)"),
    ("ipv6-without-port", "[route web]\nlisten = [::1]\nproduction = 127.0.0.1:8081\n", [], {},
     "{path}:2: listen: bad address '[::1]' (expected [ipv6]:port)"),
    ("unix-relative", "[route web]\nlisten = unix:gproxyd.sock\nproduction = 127.0.0.1:8081\n",
     [], {}, "{path}:2: listen: bad unix socket address 'unix:gproxyd.sock' "
             "(expected unix:/absolute/path)"),
    ("bad-shadow-in-list", ROUTE + "shadow = 127.0.0.1:8082, 127.0.0.1:x\n", [], {},
     "{path}:4: shadow: bad port 'x' (expected 1-65535)"),
    ("bad-duration", ROUTE + "idle-timeout = 5 days\n", [], {},
     "{path}:4: idle-timeout: bad duration '5 days' " + DURATION_EXPECTED),
    ("duration-unknown-unit", ROUTE + "connect-timeout = 5sec\n", [], {},
     "{path}:4: connect-timeout: bad duration '5sec' " + DURATION_EXPECTED),
    ("negative-duration", "[gproxyd]\ndrain-timeout = -1s\n" + ROUTE, [], {},
     "{path}:2: drain-timeout: bad duration '-1s' " + DURATION_EXPECTED),
    ("bad-size", ROUTE + "shadow-buffer = 4 megs\n", [], {},
     "{path}:4: shadow-buffer: bad size '4 megs' (expected bytes with KiB, MiB or GiB, "
     "e.g. 4MiB)"),
    ("bad-observe-max-header", ROUTE + "observe-max-header = 16 kilobytes\n", [], {},
     "{path}:4: observe-max-header: bad size '16 kilobytes' (expected bytes with KiB, MiB "
     "or GiB, e.g. 4MiB)"),
    ("bad-percent", ROUTE + "shadow-sample = 150%\n", [], {},
     "{path}:4: shadow-sample: bad share '150%' (expected 0% to 100%)"),
    ("bad-number", ROUTE + "max-connections = 0\n", [], {},
     "{path}:4: max-connections: bad number '0' (expected a whole number >= 1)"),
    ("bad-choice", ROUTE + "protocol = mysql\n", [], {},
     "{path}:4: protocol: bad value 'mysql' (expected one of: tcp, http, redis, beanstalkd)"),
    ("archive-bad-url", ROUTE + "protocol = beanstalkd\narchive = mysql://root:s3cret@db\n",
     [], {}, "{path}:5: archive: bad archive 'mysql://root:***@db' (expected "
             "sqlite:////path/jobs.db or mysql://user:password@host:3306/database)"),
    ("archive-on-http", ROUTE + "protocol = http\narchive = sqlite:////tmp/jobs.db\n", [], {},
     "{path}:5: archive: jobs are archived from beanstalkd traffic (expected protocol = "
     "beanstalkd)"),
    ("archive-with-shadow", ROUTE + "protocol = beanstalkd\nshadow = 127.0.0.1:11302\n"
     "archive = sqlite:////tmp/jobs.db\n", [], {},
     "{path}:6: archive: a route with an archive answers some commands itself, so shadows "
     "would not see what production sees (expected no shadow or baseline with archive)"),
    ("bad-boolean", "[gproxyd]\ndaemonize = maybe\n" + ROUTE, [], {},
     "{path}:2: daemonize: bad boolean 'maybe' (expected yes or no)"),
    ("bad-global-value-in-file", "[gproxyd]\nlog-format = xml\n" + ROUTE, [], {},
     "{path}:2: log-format: bad value 'xml' (expected one of: text, json)"),
    ("empty-log-file", "[gproxyd]\nlog-file =\n" + ROUTE, [], {},
     "{path}:2: log-file: empty value (expected some text)"),
    ("duplicate-listen",
     ROUTE + "[route api]\nlisten = 127.0.0.1:8080\nproduction = 127.0.0.1:9091\n", [], {},
     "{path}:5: listen: 127.0.0.1:8080 is route web's listen address 127.0.0.1:8080 (expected "
     "one route per address and port)"),
    ("duplicate-listen-ipv6-spelling",
     "[route a]\nlisten = [::1]:80\nproduction = 127.0.0.1:81\n"
     "[route b]\nlisten = [0:0::1]:80\nproduction = 127.0.0.1:82\n", [], {},
     "{path}:5: listen: [0:0::1]:80 is route a's listen address [::1]:80 (expected one route "
     "per address and port)"),
    ("missing-production", "[gproxyd]\n[route web]\nlisten = 127.0.0.1:8080\n", [], {},
     "{path}:2: production: missing in [route web] (expected production = address)"),
    ("missing-listen", "[route web]\nproduction = 127.0.0.1:8081\n", [], {},
     "{path}:1: listen: missing in [route web] (expected listen = address)"),
    ("key-given-twice", ROUTE + "listen = 127.0.0.1:9090\n", [], {},
     "{path}:4: listen: given twice in [route web] (first on line 2)"),
    ("key-given-twice-other-case", "[gproxyd]\nlog-level = info\nLOG-LEVEL = debug\n" + ROUTE,
     [], {}, "{path}:3: log-level: given twice in [gproxyd] (first on line 2)"),
    ("global-section-twice", "[gproxyd]\n" + ROUTE + "[gproxyd]\n", [], {},
     "{path}:5: section [gproxyd] given twice (first on line 1)"),
    ("route-twice", ROUTE + "[route web]\nlisten = 127.0.0.1:9090\n", [], {},
     "{path}:4: route 'web' given twice (first on line 1; expected each route name once)"),
    ("no-routes", "[gproxyd]\nlog-level = info\n", [], {},
     "{path}: no [route NAME] section (expected at least one route)"),
    ("empty-file", "", [], {},
     "{path}: no [route NAME] section (expected at least one route)"),
    ("bad-env-value", ROUTE, [], {"GPROXYD_DRAIN_TIMEOUT": "soon"},
     "GPROXYD_DRAIN_TIMEOUT: drain-timeout: bad duration 'soon' " + DURATION_EXPECTED),
    ("bad-env-beats-good-file", "[gproxyd]\nlog-level = info\n" + ROUTE, [],
     {"GPROXYD_LOG_LEVEL": "loud"},
     "GPROXYD_LOG_LEVEL: log-level: bad value 'loud' (expected one of: debug, info, warning, "
     "error)"),
    ("bad-env-address", ROUTE, [], {"GPROXYD_ADMIN": "localhost"},
     "GPROXYD_ADMIN: admin: bad address 'localhost' (expected host:port, [ipv6]:port or "
     "unix:/path)"),
    ("bad-flag-value", ROUTE, ["--log-level", "loud"], {},
     "--log-level: log-level: bad value 'loud' (expected one of: debug, info, warning, error)"),
    ("bad-flag-equals", ROUTE, ["--admin=127.0.0.1:notaport"], {},
     "--admin: admin: bad port 'notaport' (expected 1-65535)"),
    ("bad-flag-beats-good-env", ROUTE, ["--drain-timeout", "x"],
     {"GPROXYD_DRAIN_TIMEOUT": "5s"},
     "--drain-timeout: drain-timeout: bad duration 'x' " + DURATION_EXPECTED),
    ("bad-flag-boolean", ROUTE, ["--daemonize=sometimes"], {},
     "--daemonize: daemonize: bad boolean 'sometimes' (expected yes or no)"),
]


@pytest.mark.parametrize("text, argv, env, message", [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_config(tmp_path, text, argv, env, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, argv, env)
    assert str(caught.value) == message.format(path=path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.conf")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], {})
    assert str(caught.value) == f"{path}: cannot read config file: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path), [], {})
    assert str(caught.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path, ROUTE)
    (tmp_path / "gproxyd.conf").chmod(0)
    try:
        open(path).close()
    except PermissionError:
        pass
    else:  # root reads it anyway: make the OS say no
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        monkeypatch.setattr("gproxyd.config.open", refuse, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], {})
    assert str(caught.value) == f"{path}: cannot read config file: Permission denied"


def test_not_utf8(tmp_path):
    path = tmp_path / "gproxyd.conf"
    path.write_bytes(ROUTE.encode() + b"; caf\xe9\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [], {})
    assert str(caught.value) == f"{path}: cannot read config file: not UTF-8 text"


def test_error_parts_are_kept(tmp_path):
    path = _write(tmp_path, "[route web]\nlisten = 127.0.0.1:notaport\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], {})
    assert (caught.value.where, caught.value.key, caught.value.problem) == \
        (f"{path}:2", "listen", "bad port 'notaport' (expected 1-65535)")


def test_inline_comment_after_empty_value(tmp_path):
    config = load_config(_write(tmp_path, ROUTE + "shadow =    ; none yet\n"), [], {})
    assert config.routes[0].shadow == ()


def test_abbreviated_flag_is_not_taken_for_an_option(tmp_path):
    # cli.main rejects the unknown flag with exit 64; load_config must not apply it
    # (nor blame it on GPROXYD_LOG_LEVEL).
    config = load_config(_write(tmp_path, ROUTE), ["--log-l", "debug"], {})
    assert config.settings.log_level == "info"


def test_hooks_someone_else_could_have_written_are_refused(tmp_path):
    """Hooks run with gproxyd's privileges: a file another user could change is refused,
    at load (and so by --check-config and on reload)."""
    import pwd
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def on_data(conn, data):\n    return data\n")
    path = tmp_path / "gproxyd.conf"
    path.write_text(f"[route web]\nlisten = 127.0.0.1:8080\nproduction = 127.0.0.1:8081\n"
                    f"hooks = {hooks}\n")
    assert load_config(str(path), [], {}).routes[0].hooks is not None
    expected = (f"{path}:4: hooks: untrusted hooks file '{hooks}': {{}} (expected a file only "
                "root or gproxyd's own user can change: it runs with gproxyd's privileges)")
    os.chmod(hooks, 0o646)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [], {})
    assert str(caught.value) == expected.format("writable by every user")
    os.chmod(hooks, 0o644)
    os.chmod(tmp_path, 0o777)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [], {})
    assert str(caught.value) == expected.format("in a directory every user may write to")
    os.chmod(tmp_path, 0o1777)  # sticky, like /tmp: others cannot replace our file
    assert load_config(str(path), [], {}).routes[0].hooks is not None
    os.chmod(tmp_path, 0o755)
    assert os.getuid() == 0, "giving the file to another user takes root; run the suite as root"
    nobody = pwd.getpwnam("nobody")
    os.chown(hooks, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), [], {})
    assert str(caught.value) == expected.format(f"owned by uid {nobody.pw_uid}")
