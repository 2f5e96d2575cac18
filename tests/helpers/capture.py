"""Reading relayed datagrams as they are on the wire, header by header, and
putting hand-made ones on it: for the tests of what a faithful output sends
(source port and address, DSCP, TTL, checksum)."""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass

from lab.net import inside
from tests.helpers.packets import inet_checksum

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33


@dataclass(frozen=True)
class Wire:
    """One IPv4/UDP datagram as it arrived."""

    source: str
    dest: str
    sport: int
    dport: int
    ttl: int
    tos: int
    dont_fragment: bool
    payload: bytes
    checksum: int
    checksum_ok: bool


class Capture:
    """Every UDP datagram arriving on `interface` in `ns` (not those it sends)."""

    def __init__(self, ns: str, interface: str) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # bursts: we are root
            self.sock.bind((interface, ETH_P_IP))
        self.sock.setblocking(False)
        self.seen: list[Wire] = []

    def poll(self, timeout: float = 0.0) -> None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 28 or data[9] != 17:
                continue
            ihl = (data[0] & 0x0F) * 4
            sport, dport, ulen, csum = struct.unpack_from("!HHHH", data, ihl)
            pseudo = data[12:20] + struct.pack("!BBH", 0, 17, ulen)
            ok = csum == 0 or inet_checksum(pseudo + data[ihl : ihl + ulen]) == 0
            self.seen.append(
                Wire(
                    socket.inet_ntoa(data[12:16]),
                    socket.inet_ntoa(data[16:20]),
                    sport,
                    dport,
                    data[8],
                    data[1],
                    bool(struct.unpack_from("!H", data, 6)[0] & 0x4000),
                    bytes(data[ihl + 8 : ihl + ulen]),
                    csum,
                    ok,
                )
            )

    def matching(self, port: int, payload: bytes | None = None) -> list[Wire]:
        return [w for w in self.seen if w.dport == port and (payload is None or w.payload == payload)]

    def wait_for(
        self, port: int, payload: bytes | None = None, count: int = 1, timeout: float = 5.0
    ) -> list[Wire]:
        """The datagrams to `port` (with `payload`), once `count` have arrived or the time is up."""
        deadline = time.monotonic() + timeout
        while len(self.matching(port, payload)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.poll(min(left, 0.1))
        return self.matching(port, payload)

    def close(self) -> None:
        self.sock.close()


def inject(ns: str, interface: str, packet: bytes, dst_mac: str = "01005e0000fb") -> None:
    """Put a hand-made IPv4 packet on `interface` in `ns`, as another host would send it."""
    with inside(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    try:
        sock.sendto(packet, (interface, ETH_P_IP, 0, 0, bytes.fromhex(dst_mac)))
    finally:
        sock.close()
