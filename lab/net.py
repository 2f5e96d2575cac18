"""Throwaway networks of namespaces and veth pairs, with traffic senders and receivers.

Used by the demo (`python -m lab.demo`), the end-to-end tests and the
benchmarks, so that all three build networks the same way. Needs root.
Not part of the installed package: it runs from a checkout.
Everything a `Lab` creates carries its unique tag and is removed by
`close()` (also on failure: use it as a context manager).

Payloads carry a stream id, a sequence number and a CRC32, so a receiver can
tell what arrived intact, in order, and from which stream.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from pyroute2 import netns as pr_netns

from lab.packets import inet_checksum

_counter = itertools.count()

_HEAD = struct.Struct("!4sIQ")
MAGIC = b"MCRT"
IP_PKTINFO = 8
IP_RECVTTL = 12


def make_payload(stream: int, seq: int, size: int = 64) -> bytes:
    """A test payload of `size` bytes (at least 20): header, filler, CRC32."""
    size = max(size, _HEAD.size + 4)
    filler = bytes((seq + i) & 0xFF for i in range(size - _HEAD.size - 4))
    body = _HEAD.pack(MAGIC, stream, seq) + filler
    return body + struct.pack("!I", zlib.crc32(body))


def check_payload(data: bytes) -> tuple[int, int] | None:
    """(stream, seq) of an intact test payload, None for anything else."""
    if len(data) < _HEAD.size + 4 or zlib.crc32(data[:-4]) != struct.unpack("!I", data[-4:])[0]:
        return None
    magic, stream, seq = _HEAD.unpack_from(data)
    return (stream, seq) if magic == MAGIC else None


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the enclosed code in namespace `ns` (this thread only).

    Sockets created inside stay in that namespace after leaving it.
    """
    pr_netns.pushns(ns)
    try:
        yield
    finally:
        pr_netns.popns()


@dataclass
class Arrival:
    group: str  # destination address of the datagram
    port: int
    source: str
    ttl: int
    payload: bytes

    @property
    def stream_seq(self) -> tuple[int, int] | None:
        return check_payload(self.payload)


class ChecksumTap:
    """Captures the IPv4/UDP frames to `port` arriving on an interface and
    verifies their IP and UDP checksums as they are on the wire. A frame
    whose checksum the sender left to offload (TP_STATUS_CSUMNOTREADY, as
    veth passes them) cannot be verified and is counted apart."""

    SOL_PACKET, PACKET_AUXDATA, TP_STATUS_CSUMNOTREADY = 263, 8, 0x8

    def __init__(self, ns: str, interface: str, port: int) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
            self.sock.setsockopt(self.SOL_PACKET, self.PACKET_AUXDATA, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
            self.sock.bind((interface, 0x0800))
        self.sock.setblocking(False)
        self.port = port
        self.good = self.bad = self.unverifiable = 0

    def drain(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, 64)
            except BlockingIOError:
                return
            status = next(
                (struct.unpack_from("=I", v)[0] for lvl, kind, v in anc if lvl == self.SOL_PACKET),
                0,
            )
            if len(data) < 28 or data[9] != 17 or struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
                continue  # not UDP, or a fragment: its checksum covers the whole datagram
            ihl = (data[0] & 0x0F) * 4
            dport, ulen, csum = struct.unpack_from("!HHH", data, ihl + 2)
            if dport != self.port:
                continue
            if inet_checksum(data[:ihl]) != 0:
                self.bad += 1
            elif status & self.TP_STATUS_CSUMNOTREADY:
                self.unverifiable += 1
            elif csum == 0:
                self.good += 1  # no UDP checksum: allowed on IPv4
            else:
                pseudo = data[12:20] + struct.pack("!BBH", 0, 17, ulen)
                if inet_checksum(pseudo + data[ihl : ihl + ulen]) == 0:
                    self.good += 1
                else:
                    self.bad += 1

    def close(self) -> None:
        self.sock.close()


class Receiver:
    """An ordinary UDP receiver, as an application on the far side would be,
    with a tap that verifies the checksums of what arrives on its interface."""

    def __init__(self, ns: str, group: str, port: int, interface: str | None = None) -> None:
        self.tap = ChecksumTap(ns, interface, port) if interface is not None else None
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: we are root
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            self.sock.bind((group, port))
            if interface is not None and int(group.split(".", maxsplit=1)[0]) in range(224, 240):
                index = socket.if_nametoindex(interface)
                mreq = struct.pack("=4s4si", socket.inet_aton(group), b"\0" * 4, index)
                self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        self.port = port
        self.arrivals: list[Arrival] = []

    def poll(self, timeout: float = 0.0) -> int:
        """Read whatever has arrived, waiting at most `timeout` for the first; returns how many."""
        got = 0
        while True:
            ready, _, _ = select.select([self.sock], [], [], timeout if got == 0 else 0)
            if self.tap is not None:
                self.tap.drain()
            if not ready:
                return got
            data, anc, _flags, addr = self.sock.recvmsg(65536, 256)
            dst, ttl = "", -1
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    dst = socket.inet_ntoa(value[8:12])
                elif level == socket.IPPROTO_IP and kind == socket.IP_TTL:  # IP_RECVTTL delivers IP_TTL
                    ttl = struct.unpack("=i", value[:4])[0]
            self.arrivals.append(Arrival(dst, self.port, addr[0], ttl, data))
            got += 1

    def wait_for(self, done: Callable[[list[Arrival]], bool], timeout: float = 10.0) -> bool:
        """Read until `done(arrivals)` holds; False if it did not within `timeout`."""
        deadline = time.monotonic() + timeout
        while not done(self.arrivals):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.2))
        return True

    def seqs(self, stream: int) -> list[int]:
        out = []
        for a in self.arrivals:
            ss = a.stream_seq
            if ss is not None and ss[0] == stream:
                out.append(ss[1])
        return out

    def close(self) -> None:
        self.sock.close()
        if self.tap is not None:
            self.tap.close()


@contextmanager
def collecting(*receivers: Receiver) -> Iterator[None]:
    """Keep reading the receivers in a thread while the block runs, so their
    socket buffers never overflow however long the block takes."""
    stop = threading.Event()

    def loop() -> None:
        socks = {r.sock: r for r in receivers}
        while not stop.is_set():
            ready, _, _ = select.select(list(socks), [], [], 0.05)
            for sock in ready:
                socks[sock].poll(0)

    thread = threading.Thread(target=loop, name="collector", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for r in receivers:
            r.poll(0)


SOL_UDP = 17
UDP_SEGMENT = 103


class TrafficSender:
    """Sends test payloads from a namespace's interface, as an application would."""

    def __init__(self, ns: str, interface: str, ttl: int = 1, source: str | None = None) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            index = socket.if_nametoindex(interface)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            self.sock.setsockopt(
                socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", b"", b"", index)
            )
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            if source is not None:
                self.sock.bind((source, 0))

    def send(self, group: str, port: int, payload: bytes) -> None:
        self.sock.sendto(payload, (group, port))

    def stream(
        self,
        group: str,
        port: int,
        stream: int,
        count: int,
        rate: float = 2000.0,
        size: int = 64,
        first: int = 0,
    ) -> None:
        """Send `count` sequenced payloads at about `rate` per second."""
        start = time.monotonic()
        for n in range(count):
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the sender, not waiting for a result
            self.send(group, port, make_payload(stream, first + n, size))

    def stream_gso(
        self, group: str, port: int, stream: int, count: int, per: int, rate: float, size: int = 64
    ) -> None:
        """Send `count` sequenced payloads of `size` bytes in runs of `per`,
        each run one `sendmsg` with UDP GSO (as QUIC stacks and mcrd itself
        send), at about `rate` payloads per second. A veth carries each run
        to the far side as one frame, an aggregate of datagrams."""
        start = time.monotonic()
        for first in range(0, count, per):
            delay = start + first / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the sender, not waiting for a result
            run = b"".join(make_payload(stream, n, size) for n in range(first, min(first + per, count)))
            segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
            self.sock.sendmsg([run], segment, 0, (group, port))

    def stream_until(
        self, stop: threading.Event, group: str, port: int, stream: int, rate: float = 1000.0, size: int = 64
    ) -> int:
        """Send sequenced payloads at about `rate` per second until `stop`; returns how many."""
        start = time.monotonic()
        n = 0
        while not stop.is_set():
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the sender, not waiting for a result
            self.send(group, port, make_payload(stream, n, size))
            n += 1
        return n

    @contextmanager
    def streaming(
        self, group: str, port: int, stream: int, rate: float = 1000.0, size: int = 64
    ) -> Iterator[list[int]]:
        """Stream sequenced payloads from a thread while the block runs; the
        list it gives holds, once the block has ended, how many were sent."""
        stop = threading.Event()
        sent: list[int] = []
        thread = threading.Thread(
            target=lambda: sent.append(self.stream_until(stop, group, port, stream, rate, size))
        )
        thread.start()
        try:
            yield sent
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        self.sock.close()


class Lab:
    """Namespaces and veth links with unique names, all removed on close."""

    def __init__(self, prefix: str = "mcrl") -> None:
        self.tag = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"
        self.namespaces: list[str] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def netns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(
        self, ns_a: str, if_a: str, ns_b: str, if_b: str, addr_a: str | None = None, addr_b: str | None = None
    ) -> None:
        """A veth pair from `ns_a`/`if_a` to `ns_b`/`if_b`; addresses in CIDR form."""
        run(
            "ip",
            "link",
            "add",
            "dev",
            if_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            ns_b,
        )
        for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            if addr:
                run("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")

    def ip(self, ns: str, *args: str) -> None:
        run("ip", "-n", ns, *args)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        run("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")

    def close(self) -> None:
        for name in reversed(self.namespaces):
            # whatever a failed test left running in there goes too
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.namespaces.clear()
