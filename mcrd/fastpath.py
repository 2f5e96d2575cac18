"""The worker's fast data path: a TPACKET_V2 receive ring read a batch of
frames at a time, and batched zero-copy sends (`sendmmsg`, with UDP GSO where
it works).

The kernel hands each frame to user space as it arrives and wakes the worker
(TPACKET_V3 would hold a block back until it is full or its timeout, some
milliseconds, expires): a datagram arriving alone is relayed at once, and
under load the worker finds many frames ready and relays them as one batch.

Per datagram, Python does one `struct.unpack_from` of the frame and IP/UDP
headers straight out of the ring and two list appends; nothing is copied and
no system call is made. After a block, each rule's datagrams leave with one
`sendmmsg` per output whose messages point into the ring: runs of equal-sized
payloads go as one message each with a `UDP_SEGMENT` control message (the
kernel cuts them into datagrams), or one message per datagram where GSO is not
available on that output. The frames are handed back to the kernel only
after everything in them was sent.

Layouts are those of the Linux UAPI on 64-bit machines (`struct
tpacket2_hdr`, `struct mmsghdr`, `struct cmsghdr`); written in native byte
order, so they hold on any 64-bit Linux.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import mmap
import os
import socket
import struct
from array import array
from collections.abc import Callable
from typing import Any

TP_STATUS_KERNEL = 0

#: struct tpacket2_hdr: tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_sec, tp_nsec
FRAME = struct.Struct("=IIIHHII")
TP_STATUS_COPY = 0x2  # the frame did not fit: the socket's queue has it whole
#: struct virtio_net_hdr before each frame's link header (PACKET_VNET_HDR):
#: flags, gso_type, hdr_len, gso_size (then csum_start, csum_offset)
VNET = struct.Struct("=BBHH")
VNET_SIZE = 10
VIRTIO_NET_HDR_GSO_UDP_L4 = 5  # an aggregate of UDP datagrams of gso_size bytes
#: the largest copy read from the queue: an IP packet of 64 KiB and its headers
COPY_MAX = VNET_SIZE + 64 + 65536
#: frames relayed as one batch at most
BATCH = 512
_ZEROS = memoryview(array("I", bytes(4 * BATCH)))
HEADERS = 28  # IPv4 without options + UDP

#: a 16-bit value as read in native byte order from network byte order
SWAPPED16: list[int] = [struct.unpack("=H", struct.pack("!H", v))[0] for v in range(65536)]
#: the IPv4 more-fragments flag and fragment offset, read the same way
FRAGMENT_MASK = SWAPPED16[0x3FFF]


def native_key(group: int, port: int) -> int:
    """The fast table's key for a group and port: as `frame_unpacker` reads them."""
    dst: int = struct.unpack("=I", struct.pack("!I", group))[0]
    return dst << 16 | SWAPPED16[port]


@functools.lru_cache(maxsize=8)
def frame_unpacker(mac: int, net: int) -> Callable[[Any, int], tuple[int, ...]]:
    """unpack_from for a frame whose link header is at `mac` and IP header
    at `net`: tp_snaplen, tp_net, the virtio header's GSO type (0:
    one datagram, not an aggregate), then version/IHL, TOS, total length,
    flags/fragment offset, protocol, destination, source port, destination
    port, UDP length, the IP/UDP fields in native byte order
    (compare them with SWAPPED16 values)."""
    gso_at = mac - VNET_SIZE + 1
    return struct.Struct(f"=8xI2xH{gso_at - 16}xB{net - gso_at - 1}xBBH2xHxB6xIHHH").unpack_from


SOL_UDP = 17
UDP_SEGMENT = 103
MSG_DONTWAIT = 0x40
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on older kernels (newer allow 128)
GSO_MAX_BYTES = 65507  # the whole run must fit in one UDP datagram's length
MAX_MESSAGES = 1024  # UIO_MAXIOV: sendmmsg sends at most this many per call

_MSGHDR_WORDS = 8  # struct mmsghdr is 64 bytes on 64-bit Linux
_CMSG_BYTES = 24  # CMSG_SPACE(sizeof(uint16_t)), and CMSG_SPACE(sizeof(int))
_CMSG_LEN = 18  # CMSG_LEN(sizeof(uint16_t))
_TOS_CMSG_LEN = 20  # CMSG_LEN(sizeof(int))
#: a message's control data: IP_TOS (the received datagram's DSCP and ECN),
#: then UDP_SEGMENT for a GSO message
_SLOT = 2 * _CMSG_BYTES
IPPROTO_IP = 0
IP_TOS = 1

if struct.calcsize("P") != 8:  # pragma: no cover - every supported port is 64-bit
    raise ImportError("mcrd's data path needs a 64-bit machine")

_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int


def address_of(buffer: Any) -> tuple[int, Any]:
    """The address of a writable buffer, and the object that pins it."""
    pin = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return ctypes.addressof(pin), pin


class Ring:
    """A TPACKET_V2 receive ring mapped from a packet socket: `count` frames
    of `frame_size` bytes, back to back (`netio.RingSpec` lays blocks out so).

    The supervisor created the ring (`netio.open_packet_socket`); a worker
    maps it. A worker that starts on a ring another one left (after a crash)
    resumes at the oldest frame the kernel handed to user space.
    """

    def __init__(self, mapped: mmap.mmap, frame_size: int, count: int, inode: int = 0) -> None:
        self.frame_size = frame_size
        self.count = count
        self.map = mapped
        self.base, self._pin = address_of(self.map)
        self.view = memoryview(self.map)
        # every frame's tp_status, as one strided view: a batch's states are
        # read, and handed back, by one slice each
        self.states = self.view.cast("I")[:: frame_size // 4]
        self.current = 0
        self.inode = inode

    @classmethod
    def of_socket(cls, sock: socket.socket, frame_size: int, count: int) -> Ring:
        mapped = mmap.mmap(sock.fileno(), frame_size * count, mmap.MAP_SHARED)
        return cls(mapped, frame_size, count, os.fstat(sock.fileno()).st_ino)

    def close(self) -> None:
        self.states.release()
        self.view.release()
        del self._pin
        self.map.close()

    def ready(self) -> int:
        """How many frames from the current one on are user space's (a batch
        at most, and not past the ring's end). Each state read touches a
        frame of its own, so they are read a few at first, and more only as
        long as all were ready: the cost follows what is there."""
        current, states = self.current, self.states
        if states[current] == TP_STATUS_KERNEL:
            return 0
        end, chunk, found = min(current + BATCH, self.count), 8, 1
        while found < end - current:
            looked = states[current + found : min(current + found + chunk, end)].tolist()
            try:
                return found + looked.index(TP_STATUS_KERNEL)
            except ValueError:
                found += len(looked)
                chunk *= 4
        return found

    def rescan(self) -> bool:
        """When the current frame is not ours, move to the oldest one that is
        (only on a wakeup that found nothing: a predecessor left us mid-ring).
        True when there is one."""
        oldest: tuple[int, int, int] | None = None
        for index, status in enumerate(self.states.tolist()):
            if status != TP_STATUS_KERNEL:
                sec, nsec = FRAME.unpack_from(self.map, index * self.frame_size)[5:]
                if oldest is None or (sec, nsec) < oldest[:2]:
                    oldest = (sec, nsec, index)
        if oldest is None:
            return False
        self.current = oldest[2]
        return True

    def release(self, count: int) -> None:
        """Hand `count` frames from the current one back to the kernel."""
        current = self.current
        self.states[current : current + count] = _ZEROS[:count]
        self.current = (current + count) % self.count


class Sender:
    """Pre-built send arrays shared by all outputs of a worker.

    `iov` holds (address, length) pairs pointing into the ring; `msgs` the
    mmsghdr array; `cmsgs` per message an IP_TOS control message (DSCP and
    ECN as received) and a UDP_SEGMENT one (used by GSO messages).
    """

    def __init__(self, capacity: int) -> None:
        self._iov_buf = bytearray(16 * capacity)
        self.iov_addr, self._iov_pin = address_of(self._iov_buf)
        self.iov = memoryview(self._iov_buf).cast("Q")
        self._msg_buf = bytearray(8 * _MSGHDR_WORDS * MAX_MESSAGES)
        self.msg_addr, self._msg_pin = address_of(self._msg_buf)
        self.msg = memoryview(self._msg_buf).cast("Q")
        self.msg32 = memoryview(self._msg_buf).cast("I")
        self._cmsg_buf = bytearray(_SLOT * MAX_MESSAGES)
        self.cmsg_addr, self._cmsg_pin = address_of(self._cmsg_buf)
        for i in range(MAX_MESSAGES):
            struct.pack_into("=Qiii", self._cmsg_buf, i * _SLOT, _TOS_CMSG_LEN, IPPROTO_IP, IP_TOS, 0)
            struct.pack_into(
                "=QiiH", self._cmsg_buf, i * _SLOT + _CMSG_BYTES, _CMSG_LEN, SOL_UDP, UDP_SEGMENT, 0
            )
        self.cmsg16 = memoryview(self._cmsg_buf).cast("H")
        self.cmsg32 = memoryview(self._cmsg_buf).cast("I")
        self.loaded = 0  # datagrams in iov
        self.toses: list[int] = []  # each datagram's TOS byte
        self.tos: int | None = 0  # the TOS of them all, or None: they differ
        # a plan: per message (first datagram, datagrams, segment size or 0)
        self.plans: dict[int, list[tuple[int, int, int]]] = {}

    def load(self, addrs: list[int], lens: list[int], toses: list[int]) -> None:
        n = len(addrs)
        self.iov[0 : 2 * n : 2] = array("Q", addrs)
        self.iov[1 : 2 * n : 2] = array("Q", lens)
        self.loaded = n
        self.lens = lens
        self.toses = toses
        # the usual case: one sender's stream, one marking
        self.tos = toses[0] if n and toses.count(toses[0]) == n else None
        self.plans = {}

    def plan(self, gso_limit: int) -> list[tuple[int, int, int]]:
        """Messages for the loaded datagrams: runs of one size up to
        `gso_limit` bytes go as one GSO message; others one per datagram."""
        cached = self.plans.get(gso_limit)
        if cached is not None:
            return cached
        lens, n = self.lens, self.loaded
        out: list[tuple[int, int, int]] = []
        if self.tos is None:  # markings differ: one message each, each with its own
            out = [(i, 1, 0) for i in range(n)]
            self.plans[gso_limit] = out
            return out
        first = lens[0] if n else 0
        if 0 < first <= gso_limit and lens.count(first) == n:  # the usual case: one size
            per = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // first))
            out = [(i, min(per, n - i), first) for i in range(0, n, per)]
        else:
            i = 0
            while i < n:
                size = lens[i]
                if size == 0 or size > gso_limit:
                    out.append((i, 1, 0))
                    i += 1
                    continue
                per = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
                j = i + 1
                while j < n and j - i < per and lens[j] == size:
                    j += 1
                out.append((i, j - i, size if j - i > 1 else 0))
                i = j
        self.plans[gso_limit] = out
        return out

    def send(
        self, fd: int, name_addr: int, plan: list[tuple[int, int, int]], start: int, dscp: int | None = None
    ) -> tuple[int, int]:
        """Send messages plan[start:] (at most MAX_MESSAGES), with the DSCP
        they came with or `dscp` (ECN as it came); returns (messages sent,
        errno of the first that failed or 0)."""
        count = min(len(plan) - start, MAX_MESSAGES)
        msg, msg32, cmsg16, cmsg32 = self.msg, self.msg32, self.cmsg16, self.cmsg32
        iov_addr, cmsg_addr = self.iov_addr, self.cmsg_addr
        tos, toses = self.tos, self.toses
        if dscp is not None:  # the output's DSCP, the datagrams' own ECN
            toses = [dscp << 2 | t & 3 for t in toses]
            tos = None if tos is None else dscp << 2 | tos & 3
        w = 0
        for k in range(start, start + count):
            first, segments, size = plan[k]
            slot = k - start
            msg[w] = name_addr
            msg32[2 * w + 2] = 16  # msg_namelen
            msg[w + 2] = iov_addr + 16 * first
            msg[w + 3] = segments
            msg[w + 4] = cmsg_addr + _SLOT * slot
            cmsg32[slot * (_SLOT // 4) + 4] = toses[first] if tos is None else tos
            if size:
                msg[w + 5] = _SLOT
                cmsg16[slot * (_SLOT // 2) + (_CMSG_BYTES // 2) + 8] = size
            else:
                msg[w + 5] = _CMSG_BYTES
            msg[w + 6] = 0
            w += _MSGHDR_WORDS
        sent = _sendmmsg(fd, self.msg_addr, count, MSG_DONTWAIT)
        if sent < 0:
            return 0, ctypes.get_errno()
        return sent, 0


class RawSender:
    """Sends datagrams whose IP and UDP headers are built one by one (faithful
    outputs, through a raw socket): each message is two iovecs, its header
    in `headers` and its payload where it lies (in the ring, mostly)."""

    def __init__(self, capacity: int) -> None:
        self.headers = bytearray(HEADERS * capacity)
        self.headers_addr, self._headers_pin = address_of(self.headers)
        self._iov_buf = bytearray(32 * capacity)
        self.iov_addr, self._iov_pin = address_of(self._iov_buf)
        self.iov = memoryview(self._iov_buf).cast("Q")
        self._msg_buf = bytearray(8 * _MSGHDR_WORDS * capacity)
        self.msg_addr, self._msg_pin = address_of(self._msg_buf)
        self.msg = memoryview(self._msg_buf).cast("Q")
        self.msg32 = memoryview(self._msg_buf).cast("I")

    def load(self, index: int, payload: int, size: int) -> None:
        """Point message `index` at its header and its payload of `size` bytes at address `payload`."""
        iov = self.iov
        k = 4 * index
        iov[k] = self.headers_addr + HEADERS * index
        iov[k + 1] = HEADERS
        iov[k + 2] = payload
        iov[k + 3] = size

    def send(self, fd: int, name_addr: int, start: int, count: int) -> tuple[int, int]:
        """Send messages start..start+count-1 to the address at `name_addr`;
        returns (messages sent, errno of the first that failed or 0)."""
        count = min(count, MAX_MESSAGES)
        msg, msg32 = self.msg, self.msg32
        for k in range(start, start + count):
            w = k * _MSGHDR_WORDS
            msg[w] = name_addr
            msg32[2 * w + 2] = 16  # msg_namelen
            msg[w + 2] = self.iov_addr + 32 * k
            msg[w + 3] = 2
            msg[w + 4] = 0
            msg[w + 5] = 0
            msg[w + 6] = 0
        sent = _sendmmsg(fd, self.msg_addr + 8 * _MSGHDR_WORDS * start, count, MSG_DONTWAIT)
        if sent < 0:
            return 0, ctypes.get_errno()
        return sent, 0


def sockaddr_in(group: str, port: int) -> tuple[int, Any]:
    buf = bytearray(struct.pack("=H", socket.AF_INET) + struct.pack("!H4s", port, socket.inet_aton(group)))
    buf += bytes(16 - len(buf))
    return address_of(buf)


def errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, str(code))
