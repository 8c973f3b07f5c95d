"""Entry points: `gproxyd` (the daemon, --check-config, demo). Owns the exit codes."""
from __future__ import annotations

import os
import sys

from .config import ConfigError, build_parser, load_config

EX_OK = 0
EX_FAILURE = 1      # could not start or serve: a bind, privilege or log-file problem
EX_USAGE = 64
EX_CONFIG = 78      # sysexits.h EX_CONFIG: the configuration is wrong


def _fail(message: str, code: int) -> int:
    print(f"gproxyd: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, argv, os.environ)
    except ConfigError as error:
        return _fail(str(error), EX_CONFIG)
    if args.worker:
        return _serve_worker(config, argv, args.worker)
    if args.check_config:
        from .master import describe_route
        print(f"{config.path}: configuration OK, {len(config.routes)} route(s)")
        for route in config.routes:
            print(f"  {describe_route(route)}")
        return EX_OK
    return _serve(config, argv)


def _serve(config, argv: list[str]) -> int:
    """Bind, detach, drop privileges, then start gevent's loop and serve until stopped."""
    from . import logs
    from .daemon import PrivilegeError, daemon_context, drop_privileges
    from .listener import ListenError
    from .master import Master

    settings = config.settings
    try:
        logs.configure(settings)
    except OSError as error:
        return _fail(f"log-file: cannot open {settings.log_file}: {error.strerror}",
                     EX_FAILURE)
    from .arbiter import Arbiter
    supervisor = Arbiter if settings.workers > 1 else Master
    try:
        sockets = (Arbiter.bind_all(config, settings.workers) if settings.workers > 1
                   else Master.bind_all(config))
    except ListenError as error:
        return _fail(str(error), EX_FAILURE)
    context = None
    if settings.daemonize:
        # Detach before gevent creates its loop: libev's fds do not survive the fork.
        keep = [sock.fileno() for value in sockets.values()
                for sock in (value if isinstance(value, list) else [value])]
        keep.append(logs.log_fileno())
        context = daemon_context(settings.pid_file, [fd for fd in keep if fd is not None])
        context.open()
    elif settings.pid_file:
        from .daemon import PidFile
        context = PidFile(settings.pid_file)
        context.__enter__()
    import logging
    log = logging.getLogger("gproxyd")
    from gevent import monkey
    monkey.patch_all()
    try:  # again, now patched: hooks modules bind the gevent-friendly functions
        config = load_config(config.path, argv, os.environ)
    except ConfigError as error:
        return _fail(str(error), EX_CONFIG)
    # Build everything (and so import all it needs) while every file is still readable.
    master = supervisor(config, argv, os.environ, sockets)
    try:
        try:
            switched = drop_privileges(settings.user, settings.group)
        except PrivilegeError as error:
            log.error("%s; not serving as root", error)
            return _fail(str(error), EX_FAILURE)
        if switched:
            log.info("%s", switched)
        master.start()
        return master.run()
    finally:
        if context is not None:
            context.__exit__(None, None, None)


def _serve_worker(config, argv: list[str], spec: str) -> int:
    """A worker process started by the master (workers = N): no daemonizing, no binding."""
    from . import logs
    logs.configure(config.settings)
    from gevent import monkey
    monkey.patch_all()
    try:  # again, now patched: hooks modules bind the gevent-friendly functions
        config = load_config(config.path, argv, os.environ)
    except ConfigError as error:
        return _fail(str(error), EX_CONFIG)
    from .arbiter import run_worker
    return run_worker(config, argv, os.environ, spec)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
