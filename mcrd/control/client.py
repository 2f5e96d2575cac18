"""The client side of the control socket, for mcrctl and scripts.

Blocking sockets only: must not import asyncio (mcrctl starts with this and
nothing heavier), nor anything from the daemon's side.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any

from mcrd.control.protocol import ControlError, decode_reply, encode_request


def call(path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """Send one request and return its result.

    ControlError for an error reply, a malformed reply (`bad-reply`) or none
    (`connection`); OSError when mcrd cannot be reached at all.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # mcrd may answer and close before reading (busy, too large): read its answer then
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode_request(command, args))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ControlError("connection", "mcrd closed the connection without a reply")
            data += chunk
    return decode_reply(data)
