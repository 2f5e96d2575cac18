"""Messages between the supervisor and a worker.

One JSON object per SOCK_SEQPACKET message, file descriptors alongside as
SCM_RIGHTS. JSON rather than pickle: the worker runs with less privilege than
the supervisor, and nothing it sends may execute code in the supervisor.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_MESSAGE = 4 << 20
MAX_FDS = 250  # SCM_MAX_FD is 253


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A channel pair with room for large messages (a worker with many rules)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (ours, theirs):
        for force, plain in ((32, socket.SO_SNDBUF), (33, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, MAX_MESSAGE)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, MAX_MESSAGE)
    return ours, theirs


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None at end of stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    try:
        message = json.loads(data)
        if not isinstance(message, dict):
            raise ValueError("channel message is not an object")
    except (ValueError, RecursionError):
        for fd in fds:  # not leaked with the garbage they came with
            socket.close(fd)
        raise ValueError("channel message is not a JSON object") from None
    return message, fds
