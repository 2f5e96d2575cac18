"""The control protocol: JSON requests and replies on a Unix stream socket.

Each request is one JSON object on one line:
    {"version": 1, "command": "stats", "args": {}}
and gets exactly one reply line:
    {"version": 1, "ok": true, "result": {...}}
    {"version": 1, "ok": false, "error": {"code": "unknown-command", "message": "..."}}
A connection may carry any number of requests in turn. Garbage, an unknown
command or another protocol version gets an error reply, never a crash; a
request over MAX_REQUEST bytes gets one and the connection is closed.

`decode_request` and the reply encoders are pure; `ControlServer` and `call`
are the I/O around them (server side in mcrd, client side in mcrctl).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mcrd.control")

PROTOCOL_VERSION = 1
MAX_REQUEST = 1 << 20  # room for `config check` of a large rule file

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # also absurd nesting or numbers
        raise ProtocolError("bad-request", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("bad-request", "request must be a JSON object")
    version = request.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version",
            f"protocol version {version!r} is not supported: this mcrd speaks version {PROTOCOL_VERSION}",
        )
    command = request.get("command")
    if not isinstance(command, str):
        raise ProtocolError("bad-request", "'command' must be a string")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("bad-request", "'args' must be an object")
    return command, args


def encode_result(result: Any) -> bytes:
    return json.dumps({"version": PROTOCOL_VERSION, "ok": True, "result": result}).encode() + b"\n"


def encode_error(code: str, message: str) -> bytes:
    reply = {"version": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}}
    return json.dumps(reply).encode() + b"\n"


@dataclass(frozen=True)
class Command:
    handler: Handler
    changes_state: bool = False


@dataclass(frozen=True)
class Peer:
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
    max_clients: int = 32
    client_timeout: float = 5.0  # for a complete request, and for an idle connection


SO_PEERGROUPS = 59


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    gids = {gid}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python's limit: 256 groups
        gids.update(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:  # more groups than that, or a kernel before 4.13
        gids.update(_proc_groups(pid))
    return Peer(pid, uid, frozenset(gids))


def _proc_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
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
            if self.clients > self.limits.max_clients:
                log.warning("control: refusing a client: %d already connected", self.limits.max_clients)
                writer.write(
                    encode_error("busy", f"too many clients: at most {self.limits.max_clients} at once")
                )
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
            try:
                async with asyncio.timeout(self.limits.client_timeout):
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                writer.write(
                    encode_error("timeout", f"no complete request within {self.limits.client_timeout:g}s")
                )
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    writer.write(encode_error("bad-request", "request must end with a newline"))
                return
            except asyncio.LimitOverrunError:
                writer.write(encode_error("too-large", f"request exceeds {MAX_REQUEST} bytes"))
                return
            writer.write(await self.dispatch(line, peer))
            async with asyncio.timeout(self.limits.client_timeout):
                await writer.drain()

    async def dispatch(self, line: bytes, peer: Peer) -> bytes:
        try:
            name, args = decode_request(line)
        except ProtocolError as exc:
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
        except ProtocolError as exc:
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


class ControlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def call(path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Send one request and return its result; raise ControlError for an error reply."""
    request = {"version": PROTOCOL_VERSION, "command": command, "args": args or {}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # mcrd may answer and close before reading (busy, too large): read its answer then
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(json.dumps(request).encode() + b"\n")

        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ControlError("connection", "mcrd closed the connection without a reply")
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        error = reply.get("error", {})
        raise ControlError(error.get("code", "error"), error.get("message", "request failed"))
    return reply.get("result")
