"""The hook API: a custom intercepting proxy in a few lines of Python.

A route's `hooks = dotted.module` or `hooks = /path/to/file.py` names a module (any
object works from Python: `gproxyd.Proxy(..., hooks=obj)`) defining any of:

    def on_connect(conn): ...
        Called once per client connection, before any byte is relayed and before
        production is connected. May set `conn.production` (one address or a list of
        addresses tried in order) to choose where this connection goes.

    def on_data(conn, data: bytes) -> bytes | None | tuple[bytes, list[str]] | dict:
        Every chunk the client sends. Return bytes to relay them (changed or not) to
        production and every shadow; None to drop them; (bytes, ["production", ...]) to
        send them only to the named backends; {backend: bytes} to send each backend its
        own bytes.

    def on_response(conn, backend: str, data: bytes) -> bytes | None:
        Every chunk a backend answers. For "production" the returned bytes go to the
        client (None drops them); for shadows the return value is ignored.

    def on_finish(conn, backend: str) -> None:
        A backend's side of the connection ended. For production it runs once, before
        the client is half-closed (conn.reply() still works), or when it was unreachable.

Backends are named "production" and each shadow as written in the config. Hooks run
in the connection's own greenlets: they may block in gevent-friendly ways (a database
query, an HTTP call) without stalling other connections. A hook that raises (anything:
SystemExit, KeyboardInterrupt and gevent.Timeout too) closes its connection; the
traceback is logged with route and client; the daemon keeps serving. A hook that holds
the event loop longer than hook-timeout (a CPU loop) is interrupted (watchdog.py) and
fails the same way.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import gevent
import greenlet
from greenlet import GreenletExit

from . import watchdog
from .config import ConfigError
from .settings import Address, BadValue, HookSpec, address
from .watchdog import HookTimeout

log = logging.getLogger("gproxyd.hooks")

HOOK_NAMES = ("on_connect", "on_data", "on_response", "on_finish")


@dataclass(frozen=True, eq=False)
class HookSet:
    """The hook functions found on one module or object; None where not defined."""
    source: str
    on_connect: Callable | None = None
    on_data: Callable | None = None
    on_response: Callable | None = None
    on_finish: Callable | None = None
    module_file: str = ""

    @classmethod
    def from_object(cls, obj: Any, source: str = "") -> "HookSet":
        functions = {name: getattr(obj, name, None) for name in HOOK_NAMES}
        for name, function in functions.items():
            if function is not None and not callable(function):
                raise BadValue(f"{name} in {source or obj!r} is not callable "
                               "(expected a function)")
        module_file = getattr(obj, "__file__", "") or getattr(
            sys.modules.get(getattr(type(obj), "__module__", ""), None), "__file__", "") or ""
        if not any(functions.values()):
            what = repr(source) if source else f"a {type(obj).__name__} object"
            raise BadValue(f"{what} defines no hook (expected on_connect, on_data, "
                           "on_response or on_finish)")
        return cls(source=source or repr(obj), module_file=module_file, **functions)

    def __str__(self) -> str:
        return self.source


class HookLoadError(ConfigError):
    """A route's hooks cannot be imported, or define no hook; str() is the whole
    message, naming the config's FILE:LINE."""


def load_route_hooks(routes) -> dict[str, HookSet]:
    """Import the hooks of every route that has some: {route name: HookSet}.

    Only a serving process calls this, after gevent's monkey-patching (hooks bind the
    patched functions), at start and again at every reload (a reload picks up edits).
    With hooks loaded, the process runs the watchdog (hook-timeout) from then on.
    """
    loaded: dict[str, HookSet] = {}
    for route in routes:
        if route.hooks is None:
            continue
        try:
            loaded[route.name] = _load(route.hooks)
        except BadValue as error:
            where = route.hooks.where if isinstance(route.hooks, HookSpec) else ""
            raise HookLoadError(where or route.where, "hooks", str(error)) from None
    if loaded:
        watchdog.watch(HookDispatch._call.__code__, _describe_call)
    return loaded


def _load(hooks) -> HookSet:
    if isinstance(hooks, HookSet):
        return hooks
    if isinstance(hooks, HookSpec):
        return load_hooks(hooks.text)
    return HookSet.from_object(hooks)  # gproxyd.Proxy(hooks=obj)


def load_hooks(text: str) -> HookSet:
    """Import (again, on every call) the module named by a route's `hooks` value."""
    spec = text.strip()
    try:
        if HookSpec(spec).is_file:
            module = _import_file(spec)
        else:
            module = importlib.import_module(spec)
            module = importlib.reload(module)  # a reload picks up edits
    except BadValue:
        raise
    except BaseException as error:  # anything the module's own code raised while importing,
        # sys.exit() and KeyboardInterrupt too: they must not end the daemon on a reload
        if _thrown_in(error):
            raise  # the greenlet is being killed: not the module's doing
        where = _where_in_module(error, spec)
        raise BadValue(f"cannot import {spec!r}: {_name(error)}{where} "
                       "(expected a module path or a .py file defining on_connect, on_data, "
                       "on_response or on_finish)") from None
    return HookSet.from_object(module, spec)


def check_hooks_in_child(routes) -> list[str]:
    """Import every route's hooks in a child process, as a serving process would (after
    monkey-patching); the error messages, none when all import. --check-config uses it:
    the checking process itself never runs user code.

    The child reports each import as a JSON line on its stdout, its own output going to
    stderr: what a module prints is no verdict, and a module whose import ends the child
    (os._exit(), a crash) is named with its FILE:LINE all the same."""
    specs = [[route.hooks.text, route.hooks.where or route.where] for route in routes
             if isinstance(route.hooks, HookSpec)]
    if not specs:
        return []
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from gproxyd.hooks import _check_main; "
                               "sys.exit(_check_main())"],
        input=json.dumps(specs), capture_output=True, text=True)
    errors, importing = [], None
    for line in child.stdout.splitlines():
        try:
            state, index, *message = json.loads(line)
            where = specs[index][1]
        except (ValueError, TypeError, IndexError):
            continue
        importing = index if state == "importing" else None
        if state == "failed":
            errors.append(f"{where}: hooks: {message[0]}")
    if child.returncode and importing is not None:
        text, where = specs[importing]
        errors.append(f"{where}: hooks: cannot import {text!r}: its import ended the process "
                      f"importing it ({_exit_status(child.returncode)})")
    elif child.returncode and not errors:
        last = (child.stderr.strip().splitlines() or [""])[-1]
        errors.append(f"hooks: the checking process failed "
                      f"({_exit_status(child.returncode)}): {last}")
    return errors


def _exit_status(returncode: int) -> str:
    return (f"exit status {returncode}" if returncode > 0
            else f"killed by signal {-returncode}")


def _check_main() -> int:
    """The child of check_hooks_in_child(): [[spec, FILE:LINE], ...] on stdin; on stdout,
    ["importing", i] before each import, then ["ok", i] or ["failed", i, message]."""
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the modules print, from Python or C, goes to stderr
    sys.stdout = sys.stderr
    from gevent import monkey
    monkey.patch_all()
    failed = 0
    for index, (text, _where) in enumerate(json.load(sys.stdin)):
        print(json.dumps(["importing", index]), file=report, flush=True)
        try:
            load_hooks(text)
        except BadValue as error:
            print(json.dumps(["failed", index, str(error)]), file=report, flush=True)
            failed += 1
        else:
            print(json.dumps(["ok", index]), file=report, flush=True)
    return 1 if failed else 0


def _import_file(path: str):
    if not os.path.isfile(path):
        raise BadValue(f"no such hooks file {path!r} (expected a readable .py file)")
    name = "gproxyd_hooks_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    # Compiled from the source every time: the bytecode cache trusts mtime and size.
    with open(path, "rb") as handle:
        code = compile(handle.read(), path, "exec", dont_inherit=True)
    exec(code, module.__dict__)
    return module


def _where_in_module(error: Exception, spec: str) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if "importlib" not in frame.filename
           and frame.filename != __file__]
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    return f" at {own[-1].filename}:{own[-1].lineno}" if own else ""


def _name(error: BaseException) -> str:
    """`Type: message`, or `Type` alone when there is no message."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _thrown_in(error: BaseException) -> bool:
    """A GreenletExit thrown into the greenlet while it waited (Greenlet.kill()), not one
    raised by the code that ran: it was raised in a frame of gevent's or greenlet's."""
    if not isinstance(error, GreenletExit):
        return False
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    if innermost is None:
        return True  # no frame of the code's own
    return innermost.tb_frame.f_code.co_filename.startswith(_SWITCHING_CODE)


# Where the frames of a greenlet switch come from: gevent's and greenlet's sources, and
# the names Cython gives gevent's compiled modules ("src/gevent/_waiter.py").
_SWITCHING_CODE = tuple(os.path.dirname(package.__file__) + os.sep
                        for package in (gevent, greenlet)) + ("src/gevent/",)


def hook_failure(hooks: HookSet, name: str, route: str, client: str, error: BaseException):
    """Log a failing hook with its traceback trimmed to the hook module's own frames (all
    frames below the hook call for a hook interrupted by the watchdog: the loop it was
    stuck in may be in a library)."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, HookTimeout):
        own = frames[1:] or frames
    else:
        own = [frame for frame in frames if frame.filename == hooks.module_file] or frames[-1:]
    trace = "".join(traceback.format_list(own)).rstrip()
    log.error("route %s client %s: hook %s (%s) failed, closing the connection: %s\n%s",
              route, client, name, hooks.source, _name(error), trace)


def _describe_call(frame) -> str:
    """For the watchdog: which hook a HookDispatch._call frame is calling, for whom."""
    local = frame.f_locals
    dispatch = local.get("self")
    if not isinstance(dispatch, HookDispatch):
        return "a hook"
    return (f"route {dispatch._route} client {dispatch._peer}: hook {local.get('name')} "
            f"({dispatch.hooks.source})")


class Connection:
    """What a hook sees as `conn`: one client connection.

    Attributes: `route` (the route's name), `client` (the client's address as text),
    `backends` (["production", shadow names...]), `state` (a dict the hooks may use
    for per-connection state), `production` (settable in on_connect: an address, or a
    list of addresses tried in order until one accepts; afterwards, the one that did).
    """
    __slots__ = ("route", "client", "backends", "state", "production", "_reply", "_close")

    def __init__(self, route: str, client: str, backends: list[str], production,
                 reply: Callable[[bytes], None], close: Callable[[], None]):
        self.route = route
        self.client = client
        self.backends = backends
        self.state: dict = {}
        self.production = production
        self._reply, self._close = reply, close

    def reply(self, data: bytes) -> None:
        """Write `data` to the client now (as if production had said it)."""
        self._reply(data)

    def close(self) -> None:
        """Close the connection: client, production and shadows."""
        self._close()

    def __repr__(self) -> str:
        return f"<Connection route={self.route} client={self.client}>"


_FAILED = object()  # what a hook call returns when the hook raised


class HookDispatch:
    """One connection's hooks: calls them, checks what they return, routes the result.

    A hook that raises, or returns a value of the wrong type, is logged (hook_failure)
    and its connection closed through `abort(reason)`; the daemon goes on. Everything
    runs in the connection's own greenlets: a hook may block.
    """
    __slots__ = ("hooks", "conn", "_route", "_peer", "_abort", "_backends")

    def __init__(self, hooks: HookSet, route: str, peer: str, production: str,
                 shadows: list[str], reply: Callable[[bytes], None],
                 abort: Callable[[str], None]):
        self.hooks = hooks
        self._route, self._peer = route, peer
        self._abort = abort
        self._backends = ["production"] + shadows
        self.conn = Connection(route, peer, list(self._backends), production, reply,
                               lambda: abort("closed by hook"))

    @property
    def sees_client_data(self) -> bool:
        return self.hooks.on_data is not None

    def connect(self, default: Address) -> list[Address] | None:
        """on_connect: the production addresses to try, in order (`default` unless the
        hook chose others); None if the hook failed, closed the connection or chose an
        address that does not parse."""
        if self.hooks.on_connect is not None:
            if self._call("on_connect", self.hooks.on_connect, self.conn) is _FAILED:
                return None
        chosen = self.conn.production
        if chosen == default.text:
            return [default]
        try:
            addresses = [address(text) for text in ([chosen] if isinstance(chosen, str)
                                                     else list(chosen))]
            if not addresses:
                raise BadValue("an empty list (expected at least one address)")
        except (BadValue, TypeError) as error:
            self.refuse(f"hook on_connect set a bad production: {error}")
            return None
        return addresses

    def refuse(self, reason: str) -> None:
        """What a hook asked for cannot be done: log it and close the connection."""
        log.error("route %s client %s: %s", self._route, self._peer, reason)
        self._abort(reason)

    def client_data(self, chunk) -> dict[str, bytes]:
        """on_data: {backend name: bytes to send it}; backends not named get nothing."""
        result = self._call("on_data", self.hooks.on_data, self.conn, bytes(chunk))
        if result is None or result is _FAILED:
            return {}
        if not self._check("on_data", result, bytes, bytearray, tuple, dict):
            return {}
        if isinstance(result, dict):
            return {name: data for name, data in result.items() if data}
        targets = self._backends
        if isinstance(result, tuple):
            if len(result) != 2:  # not (bytes, [backend, ...]): fails the check, logged
                self._check("on_data", result, bytes, bytearray, dict)
                return {}
            result, targets = result
        return dict.fromkeys(targets, result) if result else {}

    def response(self, backend: str, chunk):
        """on_response: for production, the bytes to give the client (None: nothing);
        for a shadow, None (what the hook returns is ignored)."""
        if self.hooks.on_response is None:
            return chunk if backend == "production" else None
        result = self._call("on_response", self.hooks.on_response, self.conn, backend,
                            bytes(chunk))
        if backend != "production" or result is _FAILED:
            return None
        return result if self._check("on_response", result, bytes) else None

    def finish(self, backend: str) -> None:
        """on_finish(conn, backend)."""
        if self.hooks.on_finish is not None:
            self._call("on_finish", self.hooks.on_finish, self.conn, backend)

    def _call(self, name: str, hook: Callable, *args):
        # The watchdog recognises a running hook by this function's frame (and reads
        # `self` and `name` from it): keep them its own locals.
        try:
            return hook(*args)
        except BaseException as error:  # a user hook: anything may come out of it, even
            # SystemExit, KeyboardInterrupt, a gevent.Timeout or GreenletExit (the
            # session arms no timeout around a hook): only its connection ends
            if _thrown_in(error):
                raise  # the session's greenlet is being killed
            if isinstance(error, HookTimeout):
                error.args = (watchdog.interruption(),)
            hook_failure(self.hooks, name, self._route, self._peer, error)
            self._abort(f"hook {name} failed: {type(error).__name__}")
            return _FAILED

    def stray(self, error: BaseException) -> None:
        """Something came out of one of the session's hooked greenlets between hook
        calls: a gevent.Timeout a hook started and did not cancel, an exception a hook
        threw into this greenlet. It closes this connection only (reaching gevent's
        hub, a SystemExit would end the process)."""
        if isinstance(error, Exception):
            # not a hook's leftover as far as we can tell: the whole trace, for us
            trace = "".join(traceback.format_tb(error.__traceback__)).rstrip()
            log.error("route %s client %s: %s, closing the connection\n%s", self._route,
                      self._peer, _name(error), trace)
            self._abort(f"failed: {type(error).__name__}")
            return
        # Where it landed says nothing about the hook that left it: no trace.
        log.error("route %s client %s: hooks (%s): %s came out of the connection's "
                  "greenlet after a hook returned (a gevent.Timeout it started and did "
                  "not cancel?), closing the connection", self._route, self._peer,
                  self.hooks.source, _name(error))
        self._abort(f"hook failed: {type(error).__name__}")

    def _check(self, name: str, value, *types) -> bool:
        if value is None or isinstance(value, types):
            return True
        error = TypeError(f"{name} returned {type(value).__name__} (expected "
                          f"{' or '.join(t.__name__ for t in types)} or None)")
        hook_failure(self.hooks, name, self._route, self._peer, error)
        self._abort(f"hook {name} failed: TypeError")
        return False
