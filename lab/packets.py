"""The internet checksum (RFC 1071), for checking and building IPv4/UDP by hand.

Used by the lab's checksum tap and by the tests' packet builders.
"""

from __future__ import annotations

import struct


def inet_checksum(data: bytes) -> int:
    """The ones' complement of the ones' complement sum of `data`'s 16-bit
    words; 0 when `data` already contains a correct checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
