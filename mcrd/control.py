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
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("mcrd.control")

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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


class ControlServer:
    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        claim_socket_path(self.path)
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 0.5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        writer.write(encode_error("bad-request", "request must end with a newline"))
                    break
                except asyncio.LimitOverrunError:
                    writer.write(encode_error("too-large", f"request exceeds {MAX_REQUEST} bytes"))
                    break
                writer.write(await self.dispatch(line))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()

    async def dispatch(self, line: bytes) -> bytes:
        try:
            command, args = decode_request(line)
        except ProtocolError as exc:
            return encode_error(exc.code, exc.message)
        handler = self.handlers.get(command)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return encode_error("unknown-command", f"unknown command {command!r} (known: {known})")
        try:
            return encode_result(await handler(args))
        except ProtocolError as exc:
            return encode_error(exc.code, exc.message)
        except Exception:
            log.exception("control command %r failed", command)
            return encode_error("internal", f"command {command!r} failed inside mcrd; see its log")


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a crash, but never steal a live one."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
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
