"""Dropping every privilege a worker does not need, which is all of them.

A worker gets its sockets already open from the supervisor, so it runs as an
unprivileged user with no capabilities (effective, permitted, inheritable,
ambient and bounding all empty) and no_new_privs, before it reads its first
message. Works whether the supervisor is root or an unprivileged user holding
ambient capabilities (as under systemd's AmbientCapabilities=).

Also the one place that looks up users and groups by name or number and
reads a process's credentials from /proc. Must not depend on asyncio or on
any other part of mcrd: the worker imports it before it drops privileges.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
from pathlib import Path

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def resolve_identity(user: str, group: str | None) -> tuple[int, int]:
    """(uid, gid) for a user name or number and an optional group name or number.

    Without a group, the user's primary group. Raises ValueError with a clear
    message for names that do not exist.
    """
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user {user!r}") from None
    if group is None:
        return entry.pw_uid, entry.pw_gid
    return entry.pw_uid, group_id(group)


def group_id(group: str, what: str = "") -> int:
    """The gid of a group name or number; ValueError naming it (and `what`
    it was given for) when there is no such group."""
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group {group!r}" + (f" ({what})" if what else "")) from None


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid:gid with no supplementary groups and no capabilities, for good."""
    try:
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except OSError:  # /proc/sys hidden (systemd's ProcSubset=pid): try them all
        last_cap = 63
    for cap in range(last_cap + 1):  # needs CAP_SETPCAP, which root still has here
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            # EINVAL: past the last capability. EPERM: no CAP_SETPCAP (mcrd runs
            # as its own user): the bounding set stays, but capset below still
            # empties every set that could be used, and no_new_privs keeps it so.
            break
    if os.getuid() == 0 or os.geteuid() == 0 or (os.getgid(), os.getuid()) != (gid, uid):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


CREDENTIALS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def process_credentials(pid: int) -> dict[str, str]:
    """The identity and capability lines of /proc/PID/status; OSError when
    the process is gone."""
    result = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in CREDENTIALS:
            result[key] = value.strip()
    return result


def process_groups(pid: int) -> set[int]:
    """The supplementary groups of a process; empty when it is gone."""
    try:
        return {int(g) for g in process_credentials(pid).get("Groups", "").split()}
    except OSError:
        return set()
