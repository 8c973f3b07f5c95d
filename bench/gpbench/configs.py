"""The configuration files of nginx, haproxy and gproxyd as the benchmark writes them."""
from __future__ import annotations

SMALL_BODY = ("gproxyd benchmark small response body " * 3)[:100]

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /small {{ return 200 "{small}"; }}
        location = /1m {{ root {www}; }}
        # `return` reads and discards the request body, so keep-alive POSTs work.
        location = /post {{ return 200 "ok"; }}
    }}
}}
"""

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn {maxconn}
    maxpipes {maxpipes}

defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 15m
    timeout server 15m
"""

HAPROXY_PROXY = """\
listen {name}
    bind 127.0.0.1:{port}
    server backend 127.0.0.1:{backend}
"""

GPROXYD_GLOBAL = """\
[gproxyd]
admin = {admin}
log-level = warning
"""

GPROXYD_ROUTE = """\
[route {name}]
listen = 127.0.0.1:{listen}
production = 127.0.0.1:{production}
shadow-buffer = 4MiB
max-connections = 20000
idle-timeout = 15m"""

# (name, port it listens on, port it forwards to)
Listen = tuple[str, int, int]


def nginx_conf(prefix: str, port: int, www: str) -> str:
    """nginx on 127.0.0.1:PORT: /small, /1m (from WWW) and /post, everything under PREFIX."""
    return NGINX_CONF.format(prefix=prefix, port=port, www=www, small=SMALL_BODY)


def haproxy_conf(maxconn: int, maxpipes: int, splice: bool, listens: list[Listen]) -> str:
    lines = [HAPROXY_GLOBAL.format(maxconn=maxconn, maxpipes=maxpipes)]
    if splice:
        lines.append("    option splice-request\n    option splice-response\n")
    for name, port, backend in listens:
        lines.append(HAPROXY_PROXY.format(name=name, port=port, backend=backend))
    return "\n".join(lines)


def gproxyd_conf(global_lines: tuple[str, ...],
                 routes: list[tuple[str, int, int, tuple[str, ...]]],
                 admin: str = "off") -> str:
    """ROUTES are (name, listen port, production port, extra route lines); ADMIN is the
    admin endpoint (host:port), off unless a section reads /stats."""
    text = [GPROXYD_GLOBAL.format(admin=admin)
            + "".join(line + "\n" for line in global_lines)]
    for name, listen, production, lines in routes:
        text.append(GPROXYD_ROUTE.format(name=name, listen=listen, production=production))
        text.extend(line + "\n" for line in lines)
    return "\n".join(text)
