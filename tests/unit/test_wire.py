"""The supervisor-to-worker channel (mcrd.wire): garbage refused without leaking
the descriptors that came with it, and the `configure` message round-tripping
through JSON, with the equality the supervisor relies on to skip re-sending."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest

from mcrd import wire
from mcrd.wire import Configure, OutputConfig, RuleConfig


@pytest.fixture
def channel() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = wire.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'"configure"', b"null", b"\xff\xfe", b"{"])
def test_garbage_is_refused_and_its_descriptors_closed(
    channel: tuple[socket.socket, socket.socket], garbage: bytes
) -> None:
    ours, theirs = channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        socket.send_fds(theirs, [garbage], [devnull])
    finally:
        os.close(devnull)
    before = open_fds()
    with pytest.raises(ValueError, match="not a JSON object"):
        wire.receive(ours)
    assert open_fds() == before  # the descriptor that came with the garbage is not leaked
    # the channel still works
    wire.send(theirs, {"op": "stats", "id": 3})
    assert wire.receive(ours) == ({"op": "stats", "id": 3}, [])


def test_descriptors_arrive_with_a_good_message(channel: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = channel
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        wire.send(theirs, {"op": "configure"}, [devnull])
    finally:
        os.close(devnull)
    got = wire.receive(ours)
    assert got is not None
    message, fds = got
    try:
        assert message == {"op": "configure"}
        assert len(fds) == 1
        assert os.path.samefile(f"/proc/self/fd/{fds[0]}", os.devnull)
    finally:
        for fd in fds:
            os.close(fd)


def test_end_of_stream_is_none(channel: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = channel
    theirs.close()
    assert wire.receive(ours) is None


def configure(generation: int = 1, pps: int | None = None) -> Configure:
    return Configure(
        frame_size=2048,
        frame_count=64,
        rules=(
            RuleConfig(
                rule=1,
                group="239.1.1.1",
                port=5000,
                source=None,
                outputs=(
                    OutputConfig(1, 1, "239.2.2.1", 6000, generation, "239.2.2.1:6000 on e1 ttl 1"),
                    OutputConfig(2, 2, "198.51.100.2", 6000, 1, "198.51.100.2:6000 ttl 64"),
                ),
                pps=pps,
            ),
            RuleConfig(2, "232.1.1.1", 5000, "192.0.2.9", (), pps=None, bps=8_000_000),
        ),
    )


def test_configure_round_trips_through_json() -> None:
    sent = configure(pps=1000)
    message = json.loads(json.dumps(sent.message()))
    assert message["op"] == "configure"
    assert message["packet_fd"] == 0
    assert Configure.parse(message) == sent


def test_configure_round_trips_through_the_channel(channel: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = channel
    sent = configure()
    wire.send(ours, sent.message())
    got = wire.receive(theirs)
    assert got is not None
    assert Configure.parse(got[0]) == sent


def test_configures_built_alike_are_equal() -> None:
    """The supervisor skips sending a Configure equal to the last one."""
    assert configure() == configure()
    assert hash(configure()) == hash(configure())


@pytest.mark.parametrize(
    "other",
    [
        configure(generation=2),  # a new output socket: new GSO limits
        configure(pps=10),
        Configure(1 << 20, 8, configure().rules),
        Configure(1 << 20, 4, configure().rules[:1]),
    ],
    ids=["socket generation", "rate limit", "ring", "rules"],
)
def test_configures_that_configure_differently_differ(other: Configure) -> None:
    assert other != configure()


def huge_configure(rules: int) -> Configure:
    out = OutputConfig(1, 1, "239.2.2.2", 6000, 3, "239.2.2.2:6000 on out0 ttl 1")
    return Configure(
        128 << 10,
        256,
        tuple(
            RuleConfig(n, f"239.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 5000, None, (out,))
            for n in range(rules)
        ),
    )


def test_a_hundred_thousand_rules_and_six_hundred_descriptors_arrive_whole(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    """max_rules on one input and an output socket each for 600 outputs: more
    than one datagram (4 MiB) and one SCM_RIGHTS message (253) can carry."""
    ours, theirs = channel
    config = huge_configure(100_000)
    r, w = os.pipe()
    fds = [os.dup(r) for _ in range(600)]
    try:
        pieces = wire.frames(config.message(), fds)
        assert len(pieces) > 3 and all(len(d) <= wire.CHUNK + 1 and len(f) <= wire.MAX_FDS for d, f in pieces)
        incoming = wire.Reassembly()
        ours.setblocking(False)
        theirs.setblocking(False)
        got = None
        for data, group in pieces:  # the reader runs dry between pieces, as a non-blocking one does
            wire.send_frame(ours, data, group)
            try:
                got = incoming.receive(theirs)
            except BlockingIOError:
                assert got is None
        assert got is not None
        message, received = got
        assert Configure.parse(message) == config
        assert len(received) == 600
        assert {os.fstat(fd).st_ino for fd in received} == {os.fstat(r).st_ino}
        for fd in received:
            os.close(fd)
    finally:
        for fd in [*fds, r, w]:
            os.close(fd)


def test_a_piece_out_of_place_is_garbage_and_its_descriptors_closed(
    channel: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = channel
    r, w = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        wire.send_frame(ours, b"+" + b'{"op":', [r])
        wire.send_frame(ours, b'{"op":"stats"}', [r])  # a whole message in the middle of one
        with pytest.raises(ValueError, match="cut short"):
            wire.receive(theirs)
        assert len(os.listdir("/proc/self/fd")) == before, "the descriptors that came are closed"
        wire.send(ours, {"op": "stats"})
        assert wire.receive(theirs) == ({"op": "stats"}, [])
    finally:
        os.close(r)
        os.close(w)


def test_small_messages_go_as_one_datagram_of_plain_json() -> None:
    ((data, fds),) = wire.frames({"op": "stats", "id": 3})
    assert data == b'{"op":"stats","id":3}' and fds == []
