"""Faithful outputs' arithmetic, without sockets: UDP checksums updated for
changed header fields, mDNS questions turned from unicast-response to
multicast-response, and the loop guard's memory of what it relayed."""

from __future__ import annotations

import random
import struct

import pytest

from mcrd.packet import (
    LOOP_WINDOW,
    Datagram,
    adjust_checksum,
    ip_to_int,
    mdns_multicast_query,
    negated,
    parse,
    udp_checksum,
    words,
)
from mcrd.relaying import Recent
from tests.helpers.packets import inet_checksum, ipv4_udp


def reference(src: str, dst: str, sport: int, dport: int, payload: bytes) -> int:
    """The checksum as the test lab computes it: over the datagram as it would be on the wire."""
    packet = ipv4_udp(payload, src=src, dst=dst, sport=sport, dport=dport, udp_checksum=True)
    return int(struct.unpack_from("!H", packet, 26)[0])


@pytest.mark.parametrize("size", [0, 1, 2, 63, 64, 1400])
def test_the_full_checksum_agrees_with_the_lab(size: int) -> None:
    payload = bytes(random.Random(size).randrange(256) for _ in range(size))
    want = reference("192.0.2.10", "224.0.0.251", 5353, 5353, payload)
    got = udp_checksum(ip_to_int("192.0.2.10"), ip_to_int("224.0.0.251"), 5353, 5353, payload)
    assert got == want


@pytest.mark.parametrize("seed", range(20))
def test_an_updated_checksum_equals_one_computed_afresh(seed: int) -> None:
    rng = random.Random(seed)
    payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))

    def addr() -> str:
        return ".".join(str(rng.randrange(256)) for _ in range(4))

    old = (addr(), addr(), rng.randrange(1, 65536), rng.randrange(1, 65536))
    new = (addr(), addr(), rng.randrange(1, 65536), rng.randrange(1, 65536))
    before = reference(*old, payload)
    delta = (
        words(ip_to_int(new[0]))
        + negated(ip_to_int(old[0]))
        + words(ip_to_int(new[1]))
        + negated(ip_to_int(old[1]))
        + new[2]
        + (~old[2] & 0xFFFF)
        + new[3]
        + (~old[3] & 0xFFFF)
    )
    assert adjust_checksum(before, delta) == reference(*new, payload)


def test_a_datagram_without_checksum_keeps_none() -> None:
    assert adjust_checksum(0, 12345) == 0


def test_parse_reads_what_a_faithful_output_keeps() -> None:
    packet = bytearray(ipv4_udp(b"abc", sport=5353, frag=0x4000, udp_checksum=True))
    packet[1] = 0xB9  # DSCP EF, ECN 1
    d = parse(packet, len(packet))
    assert isinstance(d, Datagram)
    assert (d.sport, d.tos, d.dont_fragment) == (5353, 0xB9, True)
    assert d.checksum == struct.unpack_from("!H", packet, 26)[0] != 0
    # the datagram as the relay sends it checks out with the updated checksum
    assert inet_checksum(bytes(packet[12:20]) + struct.pack("!BBH", 0, 17, 11) + bytes(packet[20:])) == 0


def question(name: bytes, qtype: int, qclass: int) -> bytes:
    return name + struct.pack("!HH", qtype, qclass)


def query(*questions: bytes, flags: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0, flags, len(questions), 0, 0, 0) + b"".join(questions)


NAME = b"\x05_http\x04_tcp\x05local\x00"


def test_unicast_response_questions_become_multicast_ones() -> None:
    compressed = b"\x03foo\xc0\x0c"  # foo + a pointer to the first name
    text = query(question(NAME, 12, 0x8001), question(compressed, 33, 0x8001), question(NAME, 16, 0x0001))
    changed = mdns_multicast_query(text)
    assert changed == query(question(NAME, 12, 1), question(compressed, 33, 1), question(NAME, 16, 1))


@pytest.mark.parametrize(
    "payload",
    [
        query(question(NAME, 12, 1)),  # asks for multicast answers already
        query(question(NAME, 12, 0x8001), flags=0x8400),  # a response: its cache-flush bit is not QU
        b"\x00" * 11,  # shorter than a header
        query(question(b"\x05_ht", 12, 0x8001))[:-6],  # a name that runs off the end
        query(question(b"\x45abc\x00", 12, 0x8001)),  # a label type DNS does not have
        query()[:4] + struct.pack("!H", 3) + query()[6:] + question(NAME, 12, 0x8001),  # fewer than it says
        b"",
    ],
    ids=["multicast", "response", "short", "truncated-name", "bad-label", "missing-question", "empty"],
)
def test_anything_else_is_left_alone(payload: bytes) -> None:
    assert mdns_multicast_query(payload) is None


def test_the_guard_remembers_for_the_window_only() -> None:
    recent = Recent()
    assert not recent.again(1, 100.0)
    assert recent.again(1, 100.0 + LOOP_WINDOW / 2)  # a reflection
    assert not recent.again(2, 100.0 + LOOP_WINDOW / 2)
    assert not recent.again(1, 100.0 + LOOP_WINDOW * 1.01)  # a protocol's own repeat, later
    assert recent.again(1, 100.0 + LOOP_WINDOW * 1.5)


def test_the_guards_memory_is_bounded() -> None:
    recent = Recent()
    for k in range(Recent.LIMIT + 100):
        recent.again(k, 5.0)
    assert len(recent.seen) <= Recent.LIMIT + 1
    assert not recent.again(0, 5.0)  # the oldest went early
