"""Supervisor and channel tests that lived beside the control protocol's.

The protocol's own tests are in tests/unit/test_control_protocol.py and
tests/component/test_control_server.py.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from mcrd.supervisor import add_counters, backoff_delay


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
