"""One-way latency added by a relay, per datagram: bench/run.py --latency.

A paced sender in the generator's namespace sends sequenced datagrams at a
steady rate. Two packet taps with kernel receive timestamps (SO_TIMESTAMPNS,
the same clock: one host) see each datagram arrive on the relay's input
interface and on the first sink's interface; the difference is what the
relay added, its own queueing and wakeups included and the generator's
excluded. Also the spread of the gaps between consecutive datagrams, in and
out: a relay that holds datagrams back and sends them in bursts widens it.
The taps see frames before the sinks' nftables drop them (packet taps run
first in the receive path).
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from lab.net import inside

MAGIC = b"MCRDLAT!"
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33

SENDER = r"""
import socket, struct, sys, time
rate, count = float(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
filler = b"." * 48
start = time.perf_counter()
for n in range(count):
    due = start + n / rate
    while time.perf_counter() < due:  # busy-wait: sleep's granularity is too coarse at 10,000/s
        pass
    s.sendto(b"MCRDLAT!" + struct.pack("!Q", n) + filler, ("239.1.1.1", 5000))
"""


class Tap:
    """Kernel receive timestamps of the sequenced datagrams arriving on an interface."""

    def __init__(self, ns: str, interface: str) -> None:
        with inside(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
            self.sock.bind((interface, ETH_P_ALL))
        self.sock.setblocking(False)
        self.seen: dict[int, int] = {}  # sequence -> nanoseconds

    def drain(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            try:
                data, anc, _flags, addr = self.sock.recvmsg(2048, 64)
            except BlockingIOError:
                return
            if addr[2] == PACKET_OUTGOING or len(data) < 44:
                continue
            at = data.find(MAGIC, 28)
            if at < 0:
                continue
            (seq,) = struct.unpack_from("!Q", data, at + len(MAGIC))
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("=qq", value[:16])
                    self.seen.setdefault(seq, sec * 1_000_000_000 + nsec)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Latency:
    sent: int
    through: int
    p50_us: float
    p99_us: float
    max_us: float
    gap_in_us: float  # standard deviation of the gaps between datagrams, in
    gap_out_us: float  # and out


def measure(gen: str, relay: str, sink: str, rate: float, seconds: float, cpu: str) -> Latency:
    """The sender, and this process reading the taps, run on `cpu`: the
    relay's core is left to the relay, as in the throughput runs."""
    count = int(rate * seconds)
    taps = Tap(relay, "in0"), Tap(sink, "eth0")
    os.sched_setaffinity(0, {int(cpu)})
    try:
        sender = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                gen,
                "taskset",
                "-c",
                cpu,
                sys.executable,
                "-c",
                SENDER,
                str(rate),
                str(count),
            ]
        )
        while sender.poll() is None:  # drain as it goes: the taps' queues are finite
            for tap in taps:
                tap.drain()
            time.sleep(0.01)  # pacing the reads, not waiting for a result
        time.sleep(0.2)  # what is in flight
        for tap in taps:
            tap.drain()
    finally:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        for tap in taps:
            tap.close()
    arrived, left = taps[0].seen, taps[1].seen
    both = sorted(set(arrived) & set(left))
    if len(both) < 3:
        return Latency(count, len(both), float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    delays = sorted((left[s] - arrived[s]) / 1000 for s in both)

    def spread(stamps: dict[int, int]) -> float:
        gaps = [(stamps[b] - stamps[a]) / 1000 for a, b in itertools.pairwise(both) if b == a + 1]
        return statistics.pstdev(gaps) if len(gaps) > 1 else float("nan")

    return Latency(
        count,
        len(both),
        delays[len(delays) // 2],
        delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        delays[-1],
        spread(arrived),
        spread(left),
    )
