"""The control protocol: pure decoding, then a real server on a Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from mcrd.control import (
    MAX_REQUEST,
    Access,
    Command,
    ControlError,
    ControlServer,
    Limits,
    Peer,
    ProtocolError,
    call,
    decode_request,
)
from mcrd.supervisor import add_counters, backoff_delay


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"not json\n", "bad-request"),
        (b"\xff\xfe\n", "bad-request"),
        (b"[1, 2]\n", "bad-request"),
        (b'{"command": "ping"}\n', "version"),
        (b'{"version": 2, "command": "ping"}\n', "version"),
        (b'{"version": 1}\n', "bad-request"),
        (b'{"version": 1, "command": 7}\n', "bad-request"),
        (b'{"version": 1, "command": "ping", "args": []}\n', "bad-request"),
    ],
)
def test_decode_rejects(line: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(line)
    assert info.value.code == code


def test_decode_accepts() -> None:
    assert decode_request(b'{"version": 1, "command": "stats"}\n') == ("stats", {})
    assert decode_request(b'{"version": 1, "command": "x", "args": {"a": 1}}') == ("x", {"a": 1})


def test_version_error_names_both_versions() -> None:
    with pytest.raises(ProtocolError, match="version 2 is not supported: this mcrd speaks version 1"):
        decode_request(b'{"version": 2, "command": "ping"}')


OPEN = Access(own_uid=os.geteuid())


@pytest.mark.parametrize(
    ("uid", "gids", "reads", "writes"),
    [
        (0, set(), True, True),  # root
        (990, set(), True, True),  # mcrd's own user
        (1000, set(), False, False),
        (1000, {50}, True, False),  # the socket's group
        (1000, {60}, True, True),  # the admin group
        (1000, {50, 60}, True, True),
    ],
)
def test_access(uid: int, gids: set[int], reads: bool, writes: bool) -> None:
    access = Access(own_uid=990, socket_gid=50, admin_gid=60, admin_group="mcradm")
    peer = Peer(1, uid, frozenset(gids))
    assert access.allows(peer, changes_state=False) == reads
    assert access.allows(peer, changes_state=True) == writes
    assert (
        access.refusal("add")
        == "permission denied: 'add' changes mcrd's state and needs root or a member of group 'mcradm'"
    )


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

    server = ControlServer(
        tmp_path / "ctl.sock",
        {"echo": Command(echo), "broken": Command(broken)},
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
        assert "known: broken, echo" in replies[2]["error"]["message"]
        assert call(path, "echo", {"n": 3}) == {"echo": {"n": 3}}

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


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert backoff_delay(30) == 10.0


def test_counters_add_across_worker_generations() -> None:
    out = {"destination": "d", "packets": 2, "bytes": 20, "errors": 1, "last_error": "ENOBUFS"}
    a = {
        "received": 3,
        "drops": {"fragment": 1},
        "rules": {"k": {"packets": 2, "bytes": 20, "outputs": [out]}},
    }
    b = {
        "received": 5,
        "drops": {"fragment": 2, "overflow": 1},
        "rules": {"k": {"packets": 4, "bytes": 40, "outputs": [{**out, "errors": 0, "last_error": ""}]}},
    }
    total = add_counters(a, b)
    assert total["received"] == 8
    assert total["drops"]["fragment"] == 3 and total["drops"]["overflow"] == 1
    assert total["rules"]["k"]["packets"] == 6
    assert total["rules"]["k"]["outputs"] == [
        {"destination": "d", "packets": 4, "bytes": 40, "errors": 1, "last_error": "ENOBUFS"}
    ]


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


def test_worker_stats_are_checked_before_use() -> None:
    from mcrd.supervisor import valid_stats

    out = {"destination": "d", "packets": 1, "bytes": 2, "errors": 0, "last_error": ""}
    good = {
        "received": 1,
        "drops": {"fragment": 0},
        "rules": {"k": {"packets": 1, "bytes": 2, "outputs": [out]}},
    }
    assert valid_stats(good)
    bads: list[Any] = [
        {"id": 3},
        {**good, "received": "1"},
        {**good, "received": -1},
        {**good, "drops": []},
        {**good, "rules": {"k": {"packets": True, "bytes": 0, "outputs": []}}},
        {**good, "rules": {"k": {"packets": 1, "bytes": 0, "outputs": [{**out, "errors": None}]}}},
        {**good, "rules": {"k": {"packets": 1, "bytes": 0}}},
        {**good, "rules": []},
        [],
    ]
    for bad in bads:
        assert not valid_stats(bad), bad


def test_deeply_nested_or_huge_numbers_are_bad_requests() -> None:
    for line in (b"[" * 100_000 + b"]" * 100_000, b'{"version": 1' + b"0" * 5000 + b"}"):
        with pytest.raises(ProtocolError) as info:
            decode_request(line)
        assert info.value.code == "bad-request"


def test_channel_garbage_is_refused_and_its_descriptors_closed() -> None:
    from mcrd import channel

    ours, theirs = channel.socketpair()
    with ours, theirs:
        before = len(os.listdir("/proc/self/fd"))
        with open("/dev/null") as passenger:
            socket.send_fds(theirs, [b"not json"], [passenger.fileno()])
        with pytest.raises(ValueError, match="not a JSON object"):
            channel.receive(ours)
        assert len(os.listdir("/proc/self/fd")) == before
        channel.send(theirs, {"op": "stats", "id": 1})
        assert channel.receive(ours) == ({"op": "stats", "id": 1}, [])
