"""Entry points: `gproxyd` (the daemon, --check-config, demo, and a worker's --worker)."""
from __future__ import annotations

import os
import sys

from .config import ConfigError, build_parser, load_config
from .exitcodes import EX_CONFIG, EX_FAILURE, EX_OK

# With daemonize: the write end of a pipe the caller (the process the user started)
# reads until the daemon is serving or has failed (see _detach).
_caller: int | None = None


def _fail(message: str, code: int) -> int:
    for line in message.splitlines():  # several config errors: one line each
        print(f"gproxyd: {line}", file=sys.stderr)
    _tell_caller(f"{code} {message}")
    return code


def _tell_caller(outcome: str) -> None:
    """Hand the caller its exit status and message ("0" once serving), once."""
    global _caller
    if _caller is not None:
        os.write(_caller, outcome.encode(errors="replace")[:4000])
        os.close(_caller)
        _caller = None


def _detach(context) -> int | None:
    """Daemonize; in the caller, wait for the daemon to serve or fail and return the exit
    status it sent (with its message on stderr). Returns None in the daemon."""
    global _caller
    readable, _caller = os.pipe()
    if os.fork():
        os.close(_caller)
        _caller = None
        with os.fdopen(readable, "rb") as pipe:
            outcome = pipe.read().decode(errors="replace")
        code, _, message = outcome.partition(" ")
        if not code.isdigit():
            print("gproxyd: the daemon exited before it was serving (see its log file)",
                  file=sys.stderr)
            return EX_FAILURE
        if message:
            print(f"gproxyd: {message}", file=sys.stderr)
        return int(code)
    os.close(readable)
    context.files_preserve = [*context.files_preserve, _caller]
    from .daemon import PrivilegeError
    try:
        context.open()
    except PrivilegeError as error:  # the pid file: written by the detached daemon
        _tell_caller(f"{EX_FAILURE} {error}")
        os._exit(EX_FAILURE)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from .demo import main as demo
        return demo(argv[1:])
    args = build_parser().parse_args(argv)
    if not os.path.isabs(args.config):
        # Reloads, workers and a daemon (which runs in /) read it again: by its full path.
        args.config = os.path.abspath(args.config)
        argv = _with_config(argv, args.config)
        os.environ.pop("GPROXYD_CONFIG", None)
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


def _raise_open_files_limit() -> None:
    """A proxy holds two descriptors a connection, more with shadows: take all the
    open-files limit allows (the soft limit up to the hard one), as nginx and haproxy
    do. Workers inherit it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # a hard limit beyond what the kernel allows: keep the soft one


def _with_config(argv: list[str], path: str) -> list[str]:
    """`argv` with its -c/--config value replaced by `path` (or added)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-c", "--config"):
            skip = True
            continue
        if arg.startswith("--config=") or (arg.startswith("-c") and len(arg) > 2
                                             and not arg.startswith("--")):
            continue
        out.append(arg)
    return ["-c", path, *out]


# Not needed by a serving daemon: gproxyctl's, the demo's, and their large optional
# dependencies (matplotlib, locust).
_NOT_SERVING = ("gproxyd.replay", "gproxyd.demo", "gproxyd.ctl", "gproxyd.__main__")


def _import_while_privileged() -> None:
    """Import every module a serving process may import later, before privileges are
    dropped: the user gproxyd becomes may not be able to read the installation (a Python
    under /root), and an import failing mid-connection is a crash. The stdlib's own lazy
    imports on the serving path come too (the IDNA codec, for host names)."""
    import importlib
    import pkgutil

    import gproxyd
    for module in pkgutil.walk_packages(gproxyd.__path__, "gproxyd."):
        if not module.name.startswith(_NOT_SERVING):
            importlib.import_module(module.name)
    importlib.import_module("encodings.idna")


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
    from .daemon import (
        PrivilegeError,
        capabilities_needed,
        daemon_context,
        drop_privileges,
        hand_over,
    )
    from .hooks import HookLoadError, load_route_hooks
    from .lifecycle import StartError, bind_all, listen_key
    from .listener import ListenError
    from .transparent import listen_transparently

    settings = config.settings
    _raise_open_files_limit()
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
    for route in config.routes:  # while privileged: IP_TRANSPARENT needs CAP_NET_ADMIN
        for sock in sockets.routes[listen_key(route)] if route.listen_transparent else ():
            problem = listen_transparently(sock, route.listen)
            if problem:
                return _fail(problem, EX_FAILURE)
    context = None
    if settings.daemonize:
        # Detach before gevent creates its loop: libev's fds do not survive the fork.
        keep = sockets.filenos() + [logs.log_fileno()]
        context = daemon_context(settings.pid_file, [fd for fd in keep if fd is not None])
        status = _detach(context)
        if status is not None:  # the caller, told how the start went
            return status
    elif settings.pid_file:
        from .daemon import PidFile
        try:
            context = PidFile(settings.pid_file).__enter__()
        except PrivilegeError as error:
            return _fail(str(error), EX_FAILURE)
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
        if settings.user or settings.group:
            _import_while_privileged()
        try:
            switched = drop_privileges(settings.user, settings.group,
                                       capabilities_needed(config.routes))
        except PrivilegeError as error:
            log.error("%s; not serving as root", error)
            return _fail(str(error), EX_FAILURE)
        if switched:
            log.info("%s", switched)
        main_process.start()
        _tell_caller("0")
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
