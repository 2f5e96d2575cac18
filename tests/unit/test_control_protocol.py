"""The control protocol's pure part: decoding requests and replies, and the
access rules. No sockets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mcrd.control.protocol import (
    PROTOCOL_VERSION,
    ControlError,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
)
from mcrd.control.server import Access, Peer


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
    with pytest.raises(ControlError) as info:
        decode_request(line)
    assert info.value.code == code


def test_decode_accepts() -> None:
    assert decode_request(b'{"version": 1, "command": "stats"}\n') == ("stats", {})
    assert decode_request(b'{"version": 1, "command": "x", "args": {"a": 1}}') == ("x", {"a": 1})
    assert decode_request(encode_request("x", {"a": 1})) == ("x", {"a": 1})


def test_version_error_names_both_versions() -> None:
    with pytest.raises(ControlError, match="version 2 is not supported: this mcrd speaks version 1"):
        decode_request(b'{"version": 2, "command": "ping"}')


def test_deeply_nested_or_huge_numbers_are_bad_requests() -> None:
    for line in (b"[" * 100_000 + b"]" * 100_000, b'{"version": 1' + b"0" * 5000 + b"}"):
        with pytest.raises(ControlError) as info:
            decode_request(line)
        assert info.value.code == "bad-request"


def test_replies_decode_to_results_or_errors() -> None:
    assert decode_reply(encode_result({"n": 1})) == {"n": 1}
    with pytest.raises(ControlError) as info:
        decode_reply(encode_error("invalid", "no good"))
    assert (info.value.code, info.value.message) == ("invalid", "no good")


@pytest.mark.parametrize("line", [b"<html>\n", b"[1]\n", b'{"version": 1, "ok": false}\n'])
def test_a_malformed_reply_is_a_bad_reply_not_a_crash(line: bytes) -> None:
    with pytest.raises(ControlError) as info:
        decode_reply(line)
    assert info.value.code == "bad-reply"


def test_the_protocol_version_is_one() -> None:
    assert PROTOCOL_VERSION == 1


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


def test_mcrctl_imports_no_asyncio_and_no_pydantic() -> None:
    # mcrctl promises to start fast; asyncio alone was two thirds of its import time
    probe = "import sys, mcrd.ctl; print(sorted(m for m in ('asyncio', 'pydantic') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env={**os.environ}
    )
    assert out.stdout.strip() == "[]"
