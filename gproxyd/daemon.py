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


def drop_privileges(user: str, group: str) -> str | None:
    """Switch to `user` (and `group`, default: the user's primary group).

    Returns a description of the switch, or None when there was nothing to do.
    Raises PrivilegeError when the switch is asked for but impossible.
    """
    if not user and not group:
        return None
    entry, gid = _target(user, group)
    if os.getuid() == entry.pw_uid and os.getgid() == gid:
        return None
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(entry.pw_uid)
    except PermissionError as error:
        raise PrivilegeError(f"cannot switch to user {entry.pw_name} group {gid}: "
                             f"{error.strerror} (start as root to use user/group)") from None
    if os.getuid() == 0 and entry.pw_uid != 0:
        raise PrivilegeError("still running as root after dropping privileges")
    return f"running as user {entry.pw_name} (uid {entry.pw_uid}), gid {gid}"


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
