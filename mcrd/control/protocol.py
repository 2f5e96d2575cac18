"""The control protocol, version 1: JSON requests and replies, one per line.

Each request is one JSON object on one line:
    {"version": 1, "command": "stats", "args": {}}
and gets exactly one reply line:
    {"version": 1, "ok": true, "result": {...}}
    {"version": 1, "ok": false, "error": {"code": "unknown-command", "message": "..."}}
A connection may carry any number of requests in turn. Garbage, an unknown
command or another protocol version gets an error reply, never a crash; a
request over MAX_REQUEST bytes gets one and the connection is closed.

Pure: bytes in, values out, and the one error class both sides use. Must not
import asyncio, sockets or pydantic: mcrctl imports it and must start fast.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
MAX_REQUEST = 1 << 20  # room for `config check` of a large rule file


class ControlError(Exception):
    """An error reply, on either side: `code` is one of the codes in
    docs/protocol.md, `message` is for a human.

    mcrd raises it in a command handler to answer with that error; the client
    raises it when mcrd answered with one, or when the reply is not a reply
    (code `bad-reply`) or never came (code `connection`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_request(command: str, args: dict[str, Any] | None = None) -> bytes:
    request = {"version": PROTOCOL_VERSION, "command": command, "args": args or {}}
    return json.dumps(request).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """(command, args) of one request line; ControlError for anything else."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # also absurd nesting or numbers
        raise ControlError("bad-request", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ControlError("bad-request", "request must be a JSON object")
    version = request.get("version")
    if version != PROTOCOL_VERSION:
        raise ControlError(
            "version",
            f"protocol version {version!r} is not supported: this mcrd speaks version {PROTOCOL_VERSION}",
        )
    command = request.get("command")
    if not isinstance(command, str):
        raise ControlError("bad-request", "'command' must be a string")
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise ControlError("bad-request", "'args' must be an object")
    return command, args


def encode_result(result: Any) -> bytes:
    return json.dumps({"version": PROTOCOL_VERSION, "ok": True, "result": result}).encode() + b"\n"


def encode_error(code: str, message: str) -> bytes:
    reply = {"version": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}}
    return json.dumps(reply).encode() + b"\n"


def decode_reply(line: bytes) -> Any:
    """The result of one reply line; ControlError for an error reply, and
    ControlError("bad-reply") for a line that is not a reply at all."""
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError("bad-reply", f"the reply is not valid JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise ControlError("bad-reply", "the reply is not a JSON object")
    if not reply.get("ok"):
        error = reply.get("error")
        if not isinstance(error, dict):
            raise ControlError("bad-reply", "an error reply without an error object")
        raise ControlError(str(error.get("code", "error")), str(error.get("message", "request failed")))
    return reply.get("result")
