"""Becoming a Unix daemon: detaching with python-daemon, pid file, dropping privileges."""
from __future__ import annotations

import errno
import grp
import os
import pwd


class PrivilegeError(Exception):
    """Privileges could not be dropped as configured; the daemon must not go on."""


def user_entry(user: str) -> pwd.struct_passwd:
    """The passwd entry of a user name or numeric id; KeyError if this host has none
    (the one lookup that user, listen-owner and --check-config share)."""
    return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)


def group_id(group: str) -> int:
    """The id of a group name or numeric id; KeyError if this host has no such group."""
    return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid


def _target(user: str, group: str) -> tuple[pwd.struct_passwd, int]:
    """The user entry and group id `user` and `group` name (defaults: ours, its group)."""
    try:
        entry = user_entry(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise PrivilegeError(f"user: no such user {user!r}") from None
    try:
        gid = group_id(group) if group else entry.pw_gid
    except KeyError:
        raise PrivilegeError(f"group: no such group {group!r}") from None
    return entry, gid


def hand_over(path: str, user: str, group: str) -> None:
    """Give a file we created as root (the log) to the user we are about to become, so
    that it can still reopen it (SIGUSR1, after logrotate). Nothing to do unless root
    drops to someone else."""
    if (not user and not group) or os.getuid() != 0:
        return
    entry, gid = _target(user, group)
    try:
        os.chown(path, entry.pw_uid, gid)
    except OSError as error:
        raise PrivilegeError(f"cannot give {path} to user {entry.pw_name}: "
                             f"{error.strerror}") from None


def drop_privileges(user: str, group: str, keep: tuple[int, ...] = ()) -> str | None:
    """Switch to `user` (and `group`, default: the user's primary group), keeping the
    capabilities in `keep` (CAP_* numbers: see capabilities_needed) and no other.

    Returns a description of the switch, or None when there was nothing to do.
    Raises PrivilegeError when the switch is asked for but impossible.
    """
    if not user and not group:
        return None
    entry, gid = _target(user, group)
    if os.getuid() == entry.pw_uid and os.getgid() == gid:
        return None
    try:
        if keep:
            _prctl(_PR_SET_KEEPCAPS, 1)  # setuid() keeps the permitted set, not all of it
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(entry.pw_uid)
    except PermissionError as error:
        raise PrivilegeError(f"cannot switch to user {entry.pw_name} group {gid}: "
                             f"{error.strerror} (start as root to use user/group)") from None
    if os.getuid() == 0 and entry.pw_uid != 0:
        raise PrivilegeError("still running as root after dropping privileges")
    kept = ""
    if keep:
        _keep_only(keep)
        kept = ", keeping " + ", ".join(_CAPABILITY_NAMES[number] for number in keep)
    return f"running as user {entry.pw_name} (uid {entry.pw_uid}), gid {gid}{kept}"


# --- capabilities kept across the drop (transparent mode) -----------------------------
# From <linux/capability.h> and <linux/prctl.h>; the standard library has no capset().
CAP_NET_ADMIN = 12
_CAPABILITY_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN"}
_PR_SET_KEEPCAPS = 8
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAPABILITY_VERSION_3 = 0x20080522


def capabilities_needed(routes) -> tuple[int, ...]:
    """What serving `routes` needs after the drop: CAP_NET_ADMIN for IP_TRANSPARENT
    (source = client on each production connection, listen-transparent on listeners
    set up after the drop); nothing otherwise. Decided at start: a reload that adds such
    a route to a daemon started without one needs a restart."""
    if any(route.source == "client" or route.listen_transparent for route in routes):
        return (CAP_NET_ADMIN,)
    return ()


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, *arguments: int) -> None:
    import ctypes
    if _libc().prctl(option, *(ctypes.c_ulong(value) for value in arguments),
                     *(ctypes.c_ulong(0) for _ in range(4 - len(arguments)))) != 0:
        code = ctypes.get_errno()
        raise PrivilegeError(f"prctl({option}): {os.strerror(code)}")


def _keep_only(keep: tuple[int, ...]) -> None:
    """After setuid() under PR_SET_KEEPCAPS: make `keep` the permitted, effective and
    inheritable sets (everything else is dropped for good), and ambient, so that
    worker processes started with exec() have them too."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    mask = [0, 0]
    for number in keep:
        mask[number // 32] |= 1 << (number % 32)
    data = (Data * 2)(*(Data(part, part, part) for part in mask))
    if _libc().capset(ctypes.byref(Header(_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise PrivilegeError(f"cannot keep {', '.join(_CAPABILITY_NAMES[n] for n in keep)} "
                             f"after dropping privileges: {os.strerror(ctypes.get_errno())}")
    for number in keep:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, number)
    _prctl(_PR_SET_KEEPCAPS, 0)


class PidFile:
    """A pid file written after the fork and removed at exit (python-daemon's pidfile API)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        # Written as root, often in a shared directory: a symlink planted at the path
        # must not make us overwrite what it points to (O_NOFOLLOW: ELOOP instead).
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise PrivilegeError(f"pid-file: {self.path} is a symbolic link (expected a "
                                     "regular file or nothing)") from None
            raise PrivilegeError(f"pid-file: cannot write {self.path}: "
                                 f"{error.strerror}") from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
        return self

    def __exit__(self, *exc_info):
        try:
            os.unlink(self.path)
        except OSError:
            pass
        return False


def daemon_context(pid_file: str, keep_fds: list[int]):
    """A python-daemon DaemonContext that keeps our listening sockets and log file open."""
    import daemon
    return daemon.DaemonContext(files_preserve=keep_fds, detach_process=True,
                                pidfile=PidFile(pid_file) if pid_file else None,
                                working_directory="/", umask=0o022,
                                signal_map={})
