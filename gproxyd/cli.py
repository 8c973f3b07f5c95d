"""Entry points: `gproxyd` (the daemon, --check-config, demo, and a worker's --worker)."""
from __future__ import annotations

import os
import sys

from .config import ConfigError, build_parser, load_config
from .exitcodes import EX_CONFIG, EX_FAILURE, EX_OK


def _fail(message: str, code: int) -> int:
    print(f"gproxyd: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.worker:
        # A worker never daemonizes: patch before anything imports the modules that run
        # (and before its hooks are imported, so that they bind gevent's functions).
        from gevent import monkey
        monkey.patch_all()
    try:
        config = load_config(args.config, argv, os.environ)
    except ConfigError as error:
        if args.worker:  # its arbiter shows the message
            from .lifecycle.worker import report_start_failure
            return report_start_failure(args.worker, str(error), EX_CONFIG)
        return _fail(str(error), EX_CONFIG)
    if args.worker:
        from .lifecycle.worker import serve_worker
        return serve_worker(config, args.worker)
    if args.check_config:
        return _check(config)
    return _serve(config, argv)


def _check(config) -> int:
    """--check-config: the config, and the hooks imported in a child process (this one
    runs no user code)."""
    from .hooks import check_hooks_in_child
    from .lifecycle import describe_route
    errors = check_hooks_in_child(config.routes)
    for error in errors:
        print(f"gproxyd: {error}", file=sys.stderr)
    if errors:
        return EX_CONFIG
    print(f"{config.path}: configuration OK, {len(config.routes)} route(s)")
    for route in config.routes:
        print(f"  {describe_route(route)}")
    return EX_OK


def _serve(config, argv: list[str]) -> int:
    """Bind, detach, drop privileges, then start gevent's loop and serve until stopped."""
    import logging

    from . import logs
    from .daemon import PrivilegeError, daemon_context, drop_privileges, hand_over
    from .hooks import HookLoadError, load_route_hooks
    from .lifecycle import StartError, bind_all
    from .listener import ListenError

    settings = config.settings
    try:
        logs.configure(settings)
        if settings.log_file != "-":
            hand_over(settings.log_file, settings.user, settings.group)
    except OSError as error:
        return _fail(f"log-file: cannot open {settings.log_file}: {error.strerror}",
                     EX_FAILURE)
    except PrivilegeError as error:
        return _fail(str(error), EX_FAILURE)
    try:
        sockets = bind_all(config.routes, settings.workers, settings.admin)
    except ListenError as error:
        return _fail(str(error), EX_FAILURE)
    context = None
    if settings.daemonize:
        # Detach before gevent creates its loop: libev's fds do not survive the fork.
        keep = sockets.filenos() + [logs.log_fileno()]
        context = daemon_context(settings.pid_file, [fd for fd in keep if fd is not None])
        context.open()
    elif settings.pid_file:
        from .daemon import PidFile
        context = PidFile(settings.pid_file)
        context.__enter__()
    log = logging.getLogger("gproxyd")
    from gevent import monkey
    monkey.patch_all()
    try:
        # Build everything (and so import all it needs, the hooks too: after the patching,
        # so they bind gevent's functions) while every file is still readable.
        if settings.workers > 1:
            from .lifecycle.arbiter import Arbiter
            main_process = Arbiter(config, argv, os.environ, sockets)
        else:
            from .lifecycle.single import SingleProcess
            main_process = SingleProcess(config, argv, os.environ, sockets,
                                         load_route_hooks(config.routes))
        try:
            switched = drop_privileges(settings.user, settings.group)
        except PrivilegeError as error:
            log.error("%s; not serving as root", error)
            return _fail(str(error), EX_FAILURE)
        if switched:
            log.info("%s", switched)
        main_process.start()
        return main_process.run()
    except HookLoadError as error:
        log.error("%s", error)
        return _fail(str(error), EX_CONFIG)
    except StartError as error:
        log.error("%s", error)
        return _fail(str(error), error.status)
    finally:
        if context is not None:
            context.__exit__(None, None, None)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
