"""Parsing IPv4/UDP datagrams as the worker receives them, without sockets."""

from __future__ import annotations

import pytest

from mcrd.packet import Datagram, ip_to_int, parse
from tests.helpers.packets import ipv4_udp


def test_parse_a_datagram() -> None:
    pkt = ipv4_udp(b"payload!")
    d = parse(pkt, len(pkt))
    assert d[:5] == (ip_to_int("192.0.2.10"), ip_to_int("239.1.1.1"), 5000, 28, 36)
    assert isinstance(d, Datagram) and pkt[d.start : d.end] == b"payload!"


def test_parse_with_ip_options_and_ethernet_padding() -> None:
    pkt = ipv4_udp(ihl=6, options=b"\x01\x01\x01\x00", payload=b"x")
    padded = pkt + b"\0" * 20  # trailer beyond the IP total length is not payload
    d = parse(padded, len(padded))
    assert isinstance(d, Datagram) and padded[d.start : d.end] == b"x"


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"\x45" + b"\0" * 10, "truncated"),
        (ipv4_udp(total=200), "truncated"),
        (ipv4_udp()[:24], "truncated"),
        (ipv4_udp(version=6), "malformed"),
        (ipv4_udp(ihl=4), "malformed"),
        (ipv4_udp(total=10), "malformed"),
        (ipv4_udp(udp_len=4), "malformed"),
        (ipv4_udp(udp_len=500), "malformed"),
        (ipv4_udp(frag=0x2000), "fragment"),
        (ipv4_udp(frag=0x0010), "fragment"),
        (ipv4_udp(proto=6), "unmatched"),
    ],
    ids=[
        "runt",
        "total-beyond-end",
        "udp-header-cut",
        "version",
        "ihl",
        "total-short",
        "udp-len-short",
        "udp-len-long",
        "more-fragments",
        "fragment-offset",
        "tcp",
    ],
)
def test_parse_rejects(packet: bytes, reason: str) -> None:
    assert parse(packet, len(packet)) == reason
