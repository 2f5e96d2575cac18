"""The server side of the control socket: who may connect, who may do what,
and one conversation per client, on mcrd's asyncio loop.

Owns the socket file (claiming it from a crashed predecessor, never from a
live one), peer credentials, access rules and per-client limits. Knows
nothing of rules or reloads: commands come in as a name -> `Command` map.
Must not be imported by mcrctl (it pulls in asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcrd.control.protocol import MAX_REQUEST, ControlError, decode_request, encode_error, encode_result
from mcrd.privdrop import process_groups

log = logging.getLogger("mcrd.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    """A command's handler, and whether running it changes mcrd's state
    (which decides who may)."""

    handler: Handler
    changes_state: bool = False


@dataclass(frozen=True)
class Peer:
    """A connected client, as the kernel vouches for it."""

    pid: int
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class Access:
    """Who may do what. Root and mcrd's own user may do everything; members
    of the admin group may change state; members of the socket group may
    read. The socket's file mode keeps everyone else from connecting at all."""

    own_uid: int
    socket_gid: int | None = None
    admin_gid: int | None = None
    admin_group: str | None = None

    def allows(self, peer: Peer, changes_state: bool) -> bool:
        if peer.uid in (0, self.own_uid):
            return True
        if self.admin_gid is not None and self.admin_gid in peer.gids:
            return True
        return not changes_state and self.socket_gid is not None and self.socket_gid in peer.gids

    def refusal(self, command: str, changes_state: bool = True) -> str:
        if not changes_state:
            return f"permission denied: {command!r} needs root or a member of the control socket's group"
        who = "root" + (f" or a member of group {self.admin_group!r}" if self.admin_group else "")
        return f"permission denied: {command!r} changes mcrd's state and needs {who}"


@dataclass(frozen=True)
class Limits:
    """How much the clients may take: connections at once, and seconds for a
    complete request (and for an idle connection). Read per client, so a
    reload can change them."""

    max_clients: int = 32
    client_timeout: float = 5.0


SO_PEERGROUPS = 59


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python's limit: 256 groups
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:  # more groups than that, or a kernel before 4.13
        gids.update(process_groups(pid))
    return Peer(pid, uid, frozenset(gids))


class ControlServer:
    """mcrd's end of the control socket: answers each request line with one
    reply line, checking access per command, and turns every failure of a
    handler into an error reply (ControlError as itself, anything else as
    `internal`, logged). One client's garbage never affects another."""

    def __init__(
        self, path: Path, commands: Mapping[str, Command], access: Access, limits: Limits = Limits()
    ) -> None:
        self.path = path
        self.commands = commands
        self.access = access
        self.limits = limits
        self.server: asyncio.Server | None = None
        self.clients = 0

    async def start(self) -> None:
        claim_socket_path(self.path, self.access.socket_gid)
        old = os.umask(0o077)  # no window in which the socket is more open than we make it
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        if self.access.socket_gid is not None:
            os.chown(self.path, -1, self.access.socket_gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            limit = self.limits.max_clients
            if self.clients > limit:
                log.warning("control: refusing a client: %d already connected", limit)
                writer.write(encode_error("busy", f"too many clients: at most {limit} at once"))
                return
            peer = peer_of(writer.get_extra_info("socket"))
            await self._converse(reader, writer, peer)
        except (ConnectionError, OSError):
            pass
        finally:
            self.clients -= 1
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.drain()
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        while True:
            timeout = self.limits.client_timeout
            try:
                async with asyncio.timeout(timeout):
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                writer.write(encode_error("timeout", f"no complete request within {timeout:g}s"))
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    writer.write(encode_error("bad-request", "request must end with a newline"))
                return
            except asyncio.LimitOverrunError:
                writer.write(encode_error("too-large", f"request exceeds {MAX_REQUEST} bytes"))
                return
            writer.write(await self.dispatch(line, peer))
            async with asyncio.timeout(timeout):
                await writer.drain()

    async def dispatch(self, line: bytes, peer: Peer) -> bytes:
        try:
            name, args = decode_request(line)
        except ControlError as exc:
            return encode_error(exc.code, exc.message)
        command = self.commands.get(name)
        if command is None:
            known = ", ".join(sorted(self.commands))
            return encode_error("unknown-command", f"unknown command {name!r} (known: {known})")
        if not self.access.allows(peer, command.changes_state):
            log.warning("control: refused %r to uid %d (pid %d)", name, peer.uid, peer.pid)
            return encode_error("permission-denied", self.access.refusal(name, command.changes_state))
        try:
            return encode_result(await command.handler(args))
        except ControlError as exc:
            return encode_error(exc.code, exc.message)
        except Exception:
            log.exception("control command %r failed", name)
            return encode_error("internal", f"command {name!r} failed inside mcrd; see its log")


def claim_socket_path(path: Path, gid: int | None = None) -> None:
    """Create the socket's directory if needed; remove a stale socket left by
    a crash, but never steal a live one."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o750 if gid is not None else 0o700, parents=True)
        if gid is not None:
            os.chown(path.parent, -1, gid)
    elif (
        gid is not None
        and path.parent.stat().st_uid == os.geteuid()
        and not path.parent.stat().st_mode & 0o002
    ):
        # e.g. systemd's RuntimeDirectory=: ours, but not yet the group's
        os.chown(path.parent, -1, gid)
        os.chmod(path.parent, path.parent.stat().st_mode | 0o050)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)
    else:
        raise OSError(errno.EADDRINUSE, f"another mcrd is already listening on {path}")
    finally:
        probe.close()
