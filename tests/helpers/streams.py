"""What the relay tests check of a received stream, and the one-rule file
most of them relay with."""

from __future__ import annotations

from lab.net import Receiver

#: 239.1.1.1:5000 arriving on in0, relayed to 239.2.2.2:6000 on out0.
BASIC = """
[[rule]]
name = "camera"
input = { interface = "in0", group = "239.1.1.1", port = 5000 }
outputs = [ { interface = "out0", group = "239.2.2.2", port = 6000 } ]
"""


def assert_stream(
    rx: Receiver, stream: int, count: int, group: str, port: int, ttl: int | None = None, *, offload: str
) -> None:
    """`rx` got datagrams 0..count-1 of `stream`, intact, in order, to `group`:`port`
    (with `ttl`), none with a bad checksum; with `offload` "auto", every
    checksum must be verifiable (the kernel's rewriting must leave them right)."""
    assert rx.wait_for(lambda a: len(rx.seqs(stream)) >= count), (
        f"{group}:{port} got {len(rx.seqs(stream))} of {count} datagrams of stream {stream}"
    )
    if rx.tap is not None:
        assert rx.tap.bad == 0, f"{rx.tap.bad} datagrams with a bad IP or UDP checksum"
        if offload == "auto":
            assert rx.tap.good >= count, f"only {rx.tap.good} checksums verified of {count}"
    assert rx.seqs(stream) == list(range(count)), "datagrams lost, reordered or duplicated"
    for arrival in rx.arrivals:
        assert arrival.stream_seq is not None, f"corrupted payload {arrival.payload[:32]!r}"
        assert (arrival.group, arrival.port) == (group, port)
        if ttl is not None:
            assert arrival.ttl == ttl
