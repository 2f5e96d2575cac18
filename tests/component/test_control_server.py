"""The control server on a real Unix socket, with the real client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mcrd.control.client import call
from mcrd.control.protocol import MAX_REQUEST, ControlError
from mcrd.control.server import Access, Command, ControlServer, Limits

OPEN = Access(own_uid=os.geteuid())


def _exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


async def _with_server(tmp_path: Path, body: Any) -> Any:
    async def echo(args: dict[str, Any]) -> Any:
        return {"echo": args}

    async def broken(_: dict[str, Any]) -> Any:
        raise RuntimeError("boom")

    async def refuses(_: dict[str, Any]) -> Any:
        raise ControlError("invalid", "not like that")

    server = ControlServer(
        tmp_path / "ctl.sock",
        {"echo": Command(echo), "broken": Command(broken), "refuses": Command(refuses)},
        OPEN,
        Limits(max_clients=4, client_timeout=0.5),
    )
    await server.start()
    try:
        return await asyncio.to_thread(body, tmp_path / "ctl.sock")
    finally:
        await server.close()


def test_server_answers_each_request_once_and_survives_garbage(tmp_path: Path) -> None:
    def body(path: Path) -> None:
        replies = _exchange(
            path,
            b'{"version":1,"command":"echo","args":{"n":1}}\n'
            b"garbage\n"
            b'{"version":1,"command":"nope"}\n'
            b'{"version":1,"command":"broken"}\n'
            b'{"version":1,"command":"echo","args":{"n":2}}\n',
        )
        assert [r["ok"] for r in replies] == [True, False, False, False, True]
        assert replies[0]["result"] == {"echo": {"n": 1}} and replies[4]["result"] == {"echo": {"n": 2}}
        assert [r["error"]["code"] for r in replies[1:4]] == ["bad-request", "unknown-command", "internal"]
        assert "known: broken, echo, refuses" in replies[2]["error"]["message"]
        assert call(path, "echo", {"n": 3}) == {"echo": {"n": 3}}
        with pytest.raises(ControlError) as info:
            call(path, "refuses")
        assert (info.value.code, info.value.message) == ("invalid", "not like that")

    asyncio.run(_with_server(tmp_path, body))


def test_oversized_and_unterminated_requests(tmp_path: Path) -> None:
    def body(path: Path) -> None:
        (reply,) = _exchange(path, b"x" * (MAX_REQUEST + 10) + b"\n")
        assert reply["error"]["code"] == "too-large"
        (reply,) = _exchange(path, b'{"version":1,"command":"echo"}')
        assert reply["error"]["code"] == "bad-request"
        with pytest.raises(ControlError, match="unknown command"):
            call(path, "nope")

    asyncio.run(_with_server(tmp_path, body))


def test_a_live_socket_is_never_stolen_but_a_stale_one_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = ControlServer(tmp_path / "ctl.sock", {}, OPEN)
        await first.start()
        with pytest.raises(OSError, match="another mcrd is already listening"):
            await ControlServer(tmp_path / "ctl.sock", {}, OPEN).start()
        await first.close()
        assert not (tmp_path / "ctl.sock").exists()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "ctl.sock"))
        stale.close()  # a socket file with nobody behind it, as after a crash
        second = ControlServer(tmp_path / "ctl.sock", {}, OPEN)
        await second.start()
        await second.close()

    asyncio.run(scenario())


def test_slow_clients_time_out_and_too_many_are_turned_away(tmp_path: Path) -> None:
    def body(path: Path) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.connect(str(path))
            slow.sendall(b'{"version": 1, "comm')  # and nothing more
            began = time.monotonic()
            slow.settimeout(5)
            reply = json.loads(slow.recv(65536))
            assert reply["error"]["code"] == "timeout"
            assert 0.4 < time.monotonic() - began < 3
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for s in held:
            s.connect(str(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(5)
            extra.connect(str(path))
            assert json.loads(extra.recv(65536))["error"]["code"] == "busy"
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while True:  # the server notices the closed connections on its next turn
            try:
                call(path, "echo", {})
                break
            except ControlError:
                assert time.monotonic() < deadline
        for _ in range(500):  # rapid connections, each answered
            assert call(path, "echo", {}) == {"echo": {}}

    asyncio.run(_with_server(tmp_path, body))


def test_a_malformed_reply_is_a_bad_reply(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        async def serve_garbage() -> None:
            conn, _ = await asyncio.to_thread(listener.accept)
            with conn:
                conn.recv(65536)
                conn.sendall(b"<html>not mcrd</html>\n")

        async def scenario() -> None:
            server = asyncio.create_task(serve_garbage())
            with pytest.raises(ControlError) as info:
                await asyncio.to_thread(call, path, "ping")
            assert info.value.code == "bad-reply"
            await server

        asyncio.run(scenario())
