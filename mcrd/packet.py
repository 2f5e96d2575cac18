"""IPv4/UDP parsing, as pure functions, and what a socket filter must let through.

Every buffer here starts at the IPv4 header: the worker reads each frame's
IP header where the kernel says it begins (tp_net), past the link header,
so tunnels and VLAN sub-interfaces look the same as Ethernet.
No sockets here. The classic BPF filter built from `FilterEntry`s is in
mcrd/bpf_classic.py.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

#: Why a received frame was not relayed. The order is the order of the checks.
DROP_REASONS = ("truncated", "malformed", "fragment", "unmatched", "overflow")

#: The loop guard drops a datagram whose payload the same worker relayed
#: less than this many seconds ago: a copy another relay reflected back. Short
#: enough that a protocol's own repeats pass (mDNS probes are 250 ms apart,
#: announcements a second or more), long enough for a reflection through
#: another relay, or a few, on a LAN.
LOOP_WINDOW = 0.1

_HDR = struct.Struct("!BBHHHBBHII")  # IPv4 header without options
_UDP = struct.Struct("!HHHH")


class Datagram(NamedTuple):
    source: int
    group: int
    port: int
    start: int  # payload offset in the buffer
    end: int
    sport: int = 0
    tos: int = 0  # DSCP and ECN
    dont_fragment: bool = False
    checksum: int = 0  # the UDP checksum as received (0: none)
    ttl: int = 0


def parse(buf: bytes | bytearray | memoryview, size: int) -> Datagram | str:
    """Parse an IPv4/UDP datagram; return it, or the drop reason as a string."""
    if size < 20:
        return "truncated"
    vihl, tos, total, _ident, frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(buf, 0)
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
    sport, dport, ulen, ucsum = _UDP.unpack_from(buf, ihl)
    if ulen < 8 or ulen > total - ihl:
        return "malformed"
    return Datagram(src, dst, dport, ihl + 8, ihl + ulen, sport, tos, bool(frag & 0x4000), ucsum, ttl)


#: an IPv4 header without options and a UDP header, as a faithful output
#: sends them through a raw socket; the kernel fills in the IP checksum and,
#: left 0, the identification
HEADER = struct.Struct("!BBHHHBBHIIHHHH")
IP_DF = 0x4000


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def words(value: int) -> int:
    """The one's-complement sum of a 32-bit value's two 16-bit words."""
    return (value >> 16) + (value & 0xFFFF)


def negated(value: int) -> int:
    """What subtracts a 32-bit value's words from a one's-complement sum."""
    return (~value >> 16 & 0xFFFF) + (~value & 0xFFFF)


def adjust_checksum(checksum: int, delta: int) -> int:
    """A UDP checksum after header fields changed (RFC 1624): `delta` is the
    sum of the new fields' words and the old ones' `negated` words. A
    datagram sent without a checksum (0) keeps none; a wrong one stays wrong,
    as through a router."""
    if checksum == 0:
        return 0
    return (~_fold((~checksum & 0xFFFF) + delta) & 0xFFFF) or 0xFFFF


def payload_sum(payload: bytes | memoryview) -> int:
    """The one's-complement sum of a payload's 16-bit words, modulo 0xFFFF
    (which is what that sum is: 2**16 is 1 modulo 0xFFFF), in one pass of
    C: the same for every output a datagram goes to."""
    total = int.from_bytes(payload, "big")
    if len(payload) % 2:
        total <<= 8  # a last odd byte is the high half of a word
    return total % 0xFFFF


def finish_checksum(summed: int, source: int, dest: int, sport: int, dport: int, length: int) -> int:
    """The UDP checksum of a datagram whose payload sums to `summed`
    (`payload_sum`); `length` is the UDP length. Never 0 (which means none)."""
    total = summed + words(source) + words(dest) + 17 + length + sport + dport + length
    return 0xFFFF - total % 0xFFFF


def udp_checksum(source: int, dest: int, sport: int, dport: int, payload: bytes) -> int:
    """The UDP checksum of a datagram, computed in full."""
    return finish_checksum(payload_sum(payload), source, dest, sport, dport, 8 + len(payload))


def mdns_multicast_query(payload: bytes) -> bytes | None:
    """An mDNS query that asks for unicast responses (the QU bit of a
    question's class, RFC 6762 section 5.4) turned into one that asks for
    multicast responses; None when there is nothing to change or the payload
    is not a well-formed query.

    Relayed, a QU question would be answered by unicast to the relay's
    address, not to the querier on the other segment; answered by multicast,
    the answer is relayed back like any other, and a querier accepts
    multicast answers to a QU question (section 5.4)."""
    if len(payload) < 12:
        return None
    flags, questions = struct.unpack_from("!HH", payload, 2)
    if flags & 0x8000 or questions == 0:  # a response, or nothing asked
        return None
    out = bytearray(payload)
    at, changed = 12, False
    for _ in range(questions):
        while True:  # the name: labels, ending in a zero or a pointer
            if at >= len(out):
                return None
            size = out[at]
            if size == 0:
                at += 1
                break
            if size & 0xC0 == 0xC0:
                at += 2
                break
            if size & 0xC0:
                return None
            at += 1 + size
        if at + 4 > len(out):
            return None
        if out[at + 2] & 0x80:
            out[at + 2] &= 0x7F
            changed = True
        at += 4
    return bytes(out) if changed else None


def ip_to_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


class FilterEntry(NamedTuple):
    """One (group, port, source) an input socket's filter must pass; source None: any."""

    group: int
    port: int
    source: int | None
