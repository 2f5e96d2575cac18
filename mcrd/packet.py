"""IPv4/UDP parsing, as pure functions, and what a socket filter must let through.

The worker's receive socket is an AF_PACKET SOCK_DGRAM socket, so every buffer
here starts at the IPv4 header (the link header is already stripped, which
also makes tunnels and VLAN sub-interfaces look the same as Ethernet).
No sockets here. The classic BPF filter built from `FilterEntry`s is in
mcrd/bpf_classic.py.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

#: Why a received frame was not relayed. The order is the order of the checks.
DROP_REASONS = ("truncated", "malformed", "fragment", "unmatched", "overflow")

_HDR = struct.Struct("!BBHHHBBHII")  # IPv4 header without options
_UDP = struct.Struct("!HHHH")


class Datagram(NamedTuple):
    source: int
    group: int
    port: int
    start: int  # payload offset in the buffer
    end: int


def parse(buf: bytes | bytearray | memoryview, size: int) -> Datagram | str:
    """Parse an IPv4/UDP datagram; return it, or the drop reason as a string."""
    if size < 20:
        return "truncated"
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _HDR.unpack_from(buf, 0)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or total < ihl:
        return "malformed"
    if total > size:
        return "truncated"
    if frag & 0x3FFF:  # more-fragments flag or a fragment offset
        return "fragment"
    if proto != 17:
        return "unmatched"
    if total < ihl + 8:
        return "truncated"
    _sport, dport, ulen, _ucsum = _UDP.unpack_from(buf, ihl)
    if ulen < 8 or ulen > total - ihl:
        return "malformed"
    return Datagram(src, dst, dport, ihl + 8, ihl + ulen)


def ip_to_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


class FilterEntry(NamedTuple):
    """One (group, port, source) an input socket's filter must pass; source None: any."""

    group: int
    port: int
    source: int | None
