"""Opening the sockets the data path uses. Thin I/O adapter, no policy.

The supervisor calls these (they need CAP_NET_RAW for AF_PACKET and
SO_BINDTODEVICE) and hands the file descriptors to workers.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import ClassVar

from mcrd.bpf_classic import FilterPrecision, compile_filters, drop_all_filter
from mcrd.packet import FilterEntry

ETH_P_IP = 0x0800
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
SO_ATTACH_FILTER = 26
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
MCAST_JOIN_GROUP = 42
MCAST_JOIN_SOURCE_GROUP = 46
IP_FREEBIND = 15
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0  # never set DF: fragment what is larger than the MTU
IP_PMTUDISC_WANT = 1  # set DF on what fits the MTU, fragment what does not

PACKET_RX_RING = 5
PACKET_COPY_THRESH = 7
PACKET_VNET_HDR = 15
PACKET_VERSION = 10
PACKET_FANOUT = 18
TPACKET_V2 = 1
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000

SEND_BUFFER = 8 << 20


@dataclass(frozen=True)
class RingSpec:
    """Geometry of a TPACKET_V2 receive ring: `size` bytes in frames of
    `frame_size`.

    Each frame holds one received frame and the kernel's header before it, so
    `for_mtu` sizes frames to the input interface's MTU: 2 KiB up to an MTU of
    about 1,900, 16 KiB at most (a 9,000-byte jumbo MTU fits). The default 64
    MiB are 32,768 frames of 2 KiB: about 100 ms of a 300,000 datagrams/s
    stream should the worker stall.
    """

    size: int = 64 << 20
    frame_size: int = 2048
    #: microseconds the worker keeps polling the ring after the last frame
    #: before it sleeps in poll(2) (0: at once); see `[daemon] busy_poll`
    busy_poll: int = 0

    MIN_FRAME: ClassVar[int] = 2048
    MAX_FRAME: ClassVar[int] = 16 << 10
    #: room before the IP header: tpacket2_hdr and sockaddr_ll (52 bytes,
    #: aligned), a link header, a VLAN tag and slack
    HEADROOM: ClassVar[int] = 160

    @classmethod
    def of_size(cls, mib: int, busy_poll: int = 0) -> RingSpec:
        return cls(size=mib << 20, busy_poll=busy_poll)

    def for_mtu(self, mtu: int) -> RingSpec:
        frame = self.MIN_FRAME
        while frame < min(mtu + self.HEADROOM, self.MAX_FRAME):
            frame *= 2
        return replace(self, frame_size=frame)

    @property
    def block_size(self) -> int:
        # whole frames, a page at least: frames then lie back to back in the mapping
        return max(self.frame_size, mmap.PAGESIZE)

    @property
    def frame_count(self) -> int:
        per_block = self.block_size // self.frame_size
        return max(64, self.size // self.block_size * per_block)

    def request(self) -> bytes:
        """struct tpacket_req: block_size, block_nr, frame_size, frame_nr."""
        blocks = self.frame_count * self.frame_size // self.block_size
        return struct.pack("=4I", self.block_size, blocks, self.frame_size, self.frame_count)


def _set_ring(sock: socket.socket, ring: RingSpec) -> None:
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, ring.request())


def join_fanout(sock: socket.socket, group: int | None) -> int:
    """Put a bound packet socket in a PACKET_FANOUT group spreading by flow
    hash (so each flow stays in order on one worker); None creates a new
    group with an id the kernel picks. Returns the group's id."""
    if group is None:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, (PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
        group = struct.unpack("=I", sock.getsockopt(SOL_PACKET, PACKET_FANOUT, 4))[0] & 0xFFFF
    else:
        sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | PACKET_FANOUT_HASH << 16)
    return group


def ifindex(name: str) -> int:
    """The interface's index; OSError(ENODEV) when there is no such interface."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise OSError(errno.ENODEV, f"no interface named {name!r}") from None


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """Attach (or atomically replace) a classic BPF socket filter."""
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; };
    # the kernel copies the program during the call, so a local buffer will do.
    holder = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(holder))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def force_buffer(sock: socket.socket, force_opt: int, plain_opt: int, size: int) -> None:
    """Set a socket buffer past the sysctl limit where mcrd may (CAP_NET_ADMIN), up to it otherwise."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain_opt, size)


def attach_best_filter(sock: socket.socket, entries: Iterable[FilterEntry]) -> FilterPrecision:
    """Attach the most precise filter the kernel accepts; returns its precision.

    Replacing a filter charges the new one to the socket before the old one
    is released, so a large swap can fail with ENOMEM under
    net.core.optmem_max (20 KiB on many kernels): then a coarser one goes in,
    and the worker matches the rest.
    """
    candidates = compile_filters(entries)
    for program, precision in candidates:
        try:
            attach_filter(sock, program)
            return precision
        except OSError as exc:
            if exc.errno not in (errno.ENOMEM, errno.EINVAL) or precision == 0:
                raise
    raise AssertionError("unreachable: the last candidate raises or returns")


def open_packet_socket(
    interface: str, entries: Iterable[FilterEntry], ring: RingSpec | None = None
) -> tuple[socket.socket, FilterPrecision]:
    """An AF_PACKET receive socket on one interface, filtered in the kernel,
    with a TPACKET_V2 receive ring, and the precision of its filter.

    Created with protocol 0 so that it receives nothing until the filter is
    attached, the ring set up and it is bound: no foreign frame slips in
    between.
    """
    index = ifindex(interface)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        precision = attach_best_filter(sock, entries)
        # Bound to ETH_P_IP, the socket only sees incoming frames already;
        # this keeps our own transmissions out should the binding ever widen.
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        # A virtio header before each frame says whether it is an aggregate
        # of datagrams (UDP GSO from a sender on this host or a veth peer,
        # GRO on a NIC) and of what size each is; SOCK_RAW only.
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        # A frame larger than the ring's frames (an aggregate, a jumbo frame
        # beyond them) goes whole to the socket's queue as well, which may
        # hold four times as much as the ring: aggregates are large.
        sock.setsockopt(SOL_PACKET, PACKET_COPY_THRESH, 1)
        ring = ring or RingSpec()
        force_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, 4 * ring.size)
        _set_ring(sock, ring)
        sock.bind((interface, ETH_P_IP))
        if ifindex(interface) != index:
            raise OSError(errno.ENODEV, f"interface {interface!r} was replaced while opening it")
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, precision


def _sockaddr_in(addr: str) -> bytes:
    # struct sockaddr_storage holding a sockaddr_in
    return struct.pack("=H2s4s", socket.AF_INET, b"\0\0", socket.inet_aton(addr)).ljust(128, b"\0")


def join_group(interface: str, group: str, source: str | None) -> socket.socket:
    """A socket that only holds an IGMP membership on `interface`.

    It is never bound, so the kernel queues nothing on it; closing it leaves
    the group. MCAST_JOIN_* take the interface by index, which stays right
    when several interfaces share an address.
    """
    index = ifindex(interface)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if source is None:
            req = struct.pack("=I4x", index) + _sockaddr_in(group)
            sock.setsockopt(socket.IPPROTO_IP, MCAST_JOIN_GROUP, req)
        else:
            req = struct.pack("=I4x", index) + _sockaddr_in(group) + _sockaddr_in(source)
            sock.setsockopt(socket.IPPROTO_IP, MCAST_JOIN_SOURCE_GROUP, req)
    except BaseException:
        sock.close()
        raise
    return sock


def open_sink(address: str, port: int) -> socket.socket | None:
    """Hold a unicast input's port so the host does not answer the sender
    with ICMP port-unreachable for every datagram mcrd relays. The socket
    accepts nothing (drop-all filter). None when the address is not local or
    another program already owns the port (it then gets the datagrams)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        attach_filter(sock, drop_all_filter())
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EACCES):
            return None  # not local, taken, or a port below 1024 without CAP_NET_BIND_SERVICE
        raise
    return sock


def open_output_socket(interface: str | None, ttl: int) -> socket.socket:
    """A UDP socket that sends out of `interface` with `ttl`.

    Bound to the device so the kernel routes, resolves neighbours and
    fragments on that interface only. Non-blocking: a full queue is a counted
    send error for that output, never a stall for the others. Nothing is ever
    received on it (drop-all filter).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        attach_filter(sock, drop_all_filter())
        _send_via(sock, interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        _output_options(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def open_port_socket(
    interface: str | None, ttl: int, source: str | None, port: int, dont_fragment: bool
) -> socket.socket:
    """A UDP socket like `open_output_socket`'s, bound to `port` (on `source`,
    or any address): for an output that keeps each sender's source port.
    Workers open these themselves, as the ports they need show up in the
    traffic, with no privilege: a port below 1024, or one another socket
    on this host holds without sharing it, fails (OSError).

    The don't-fragment flag is the socket's, for datagrams that came with it
    or without: set on what fits the output's MTU (a larger datagram is
    fragmented, its fragments without it, rather than lost), or never."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        attach_filter(sock, drop_all_filter())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the other workers of the input
        _send_via(sock, interface)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        mode = IP_PMTUDISC_WANT if dont_fragment else IP_PMTUDISC_DONT
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
        _output_options(sock)
        sock.bind((source or "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _send_via(sock: socket.socket, interface: str | None) -> None:
    """Send out of `interface` only, multicast included (None: as routed)."""
    if interface is not None:
        index = ifindex(interface)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", b"", b"", index))


def _output_options(sock: socket.socket) -> None:
    # The relay's own output is for other hosts: looping it back to local
    # sockets would cost a copy per packet and could feed a local rule.
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    # Without it the kernel refuses every send to a broadcast address (EACCES).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    force_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER)
    sock.setblocking(False)


def open_raw_socket(interface: str | None) -> socket.socket:
    """A raw IPv4 socket that sends whole datagrams, headers included, out of
    `interface` (as routed when None): for faithful outputs, whose source
    port, source address, DSCP and DF the worker copies from each received
    datagram. It receives nothing (protocol IPPROTO_RAW). The kernel fills in
    the IP checksum and the identification; it never fragments such a
    datagram (a send larger than the path's MTU fails with EMSGSIZE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        _send_via(sock, interface)
        _output_options(sock)
    except BaseException:
        sock.close()
        raise
    return sock


def source_address(interface: str | None, dest: str) -> str | None:
    """The address the kernel sends from to `dest` out of `interface` (as
    routed when None): what a faithful output puts in its datagrams'
    source; None when there is none (no IPv4 address there, no route)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _send_via(sock, interface)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.connect((dest, 9))
        address: str = sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()
    return None if address == "0.0.0.0" else address


def packet_statistics(sock: socket.socket) -> tuple[int, int]:
    """(received, dropped) since the last call; the kernel resets them on read.
    (struct tpacket_stats_v3 begins like struct tpacket_stats.)"""
    packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return packets, drops
