"""Packets built by hand: IPv4/UDP datagrams (valid or broken on purpose) and
Ethernet frames around them. The checksum is the lab's, so that the tap that
verifies checksums on the wire and these builders agree."""

from __future__ import annotations

import socket
import struct

from lab.packets import inet_checksum

__all__ = ["eth_frame", "inet_checksum", "ipv4_udp"]


def ipv4_udp(
    payload: bytes = b"hello",
    *,
    src: str = "192.0.2.10",
    dst: str = "239.1.1.1",
    sport: int = 4000,
    dport: int = 5000,
    ttl: int = 64,
    total: int | None = None,
    udp_len: int | None = None,
    version: int = 4,
    ihl: int = 5,
    options: bytes | None = None,
    frag: int = 0,
    proto: int = 17,
    ip_checksum: bool = False,
    udp_checksum: bool = False,
) -> bytes:
    """An IPv4 packet carrying a UDP datagram, from the IP header on.

    Lengths are computed unless given (`total`, `udp_len`: to build broken
    ones); `options` default to filler for an `ihl` above 5. Checksums are 0
    (none, as the parser and filters do not read them) unless asked for.
    """
    if options is None:
        options = b"\x01" * (4 * (ihl - 5))
    length = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, udp_len if udp_len is not None else length, 0) + payload
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    if udp_checksum:
        pseudo = s + d + struct.pack("!BBH", 0, 17, length)
        udp = udp[:6] + struct.pack("!H", inet_checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    size = total if total is not None else ihl * 4 + len(udp)
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, size, 7, frag, ttl, proto, 0, s, d) + options
    if ip_checksum:
        header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + udp


def eth_frame(packet: bytes, *, dst_mac: str = "01005e010101", src_mac: str = "020000000001") -> bytes:
    """`packet` in an Ethernet frame (type IPv4); MACs as 12 hex digits."""
    return bytes.fromhex(dst_mac) + bytes.fromhex(src_mac) + b"\x08\x00" + packet
