"""The data-plane worker: one process per input interface.

Started by the supervisor as a fresh interpreter (`python -m mcrd.worker FD`)
with one end of a channel. Everything else — the filtered AF_PACKET socket and
the output sockets — arrives over that channel as file descriptors, so the
worker itself never needs privilege to open them. It relays datagrams, counts,
and answers the supervisor; it exits when the channel closes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
from time import monotonic
from typing import Any

from mcrd import fastpath, wire
from mcrd.netio import packet_statistics
from mcrd.packet import (
    DROP_REASONS,
    Datagram,
    ip_to_int,
    mdns_multicast_query,
    parse,
    payload_sum,
)
from mcrd.privdrop import drop_privileges
from mcrd.relaying import DF_NATIVE, Recent, Rule, carried_rule, port_key, tables
from mcrd.transmit import Transmitter
from mcrd.wire import Configure

log = logging.getLogger("mcrd.worker")


class Worker:
    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self.packet_sock: socket.socket | None = None
        self.ring: fastpath.Ring | None = None
        self.tx: Transmitter | None = None
        self.owned: list[socket.socket] = []
        self.rules: list[Rule] = []
        # (group << 16 | port) -> the rule, or {source or None: rule} where
        # some rule names a source: one dict lookup per datagram, whatever the
        # number of rules.
        self.table: dict[int, Rule | dict[int | None, Rule]] = {}
        # the same for rules without source or rate limit, keyed by group
        # and port as read from the wire in native byte order
        self.fast: dict[int, Rule] = {}
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.received = 0
        self.running = True
        self.incoming = wire.Reassembly()
        # the loop guard: this host's addresses, and what it relayed lately
        self.local: frozenset[int] = frozenset()
        self.recent = Recent()
        self.busy_poll = 0.0  # seconds to keep polling the ring after the last frame
        #: buffers the current batch's datagrams lie in, besides the ring
        self.pins: list[tuple[bytearray, Any]] = []

    # -- control -----------------------------------------------------------

    def configure(self, config: Configure, fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        for sock in socks:
            sock.setblocking(False)
        packet_sock = socks[0]
        if self.ring is None or self.ring.inode != os.fstat(packet_sock.fileno()).st_ino:
            mapped = fastpath.Ring.of_socket(packet_sock, config.frame_size, config.frame_count)
            if self.ring is not None:
                self.ring.close()
            self.ring = mapped
            self.tx = Transmitter(fastpath.BATCH)
        self.local = frozenset(ip_to_int(a) for a in config.local_addresses)
        self.busy_poll = config.busy_poll / 1e6
        old = {r.ident: r for r in self.rules}
        rules = [carried_rule(spec, socks, old.get(spec.rule)) for spec in config.rules]
        for gone in old.values():  # what the new outputs did not take over
            for out in gone.outputs:
                out.close()
        self.table, self.fast = tables(config.rules, rules)
        self.rules = rules
        for sock in self.owned:  # new descriptors for the same sockets arrived
            sock.close()
        self.owned = socks
        self.packet_sock = packet_sock

    def stats(self) -> dict[str, Any]:
        if self.packet_sock is not None:
            _packets, dropped = packet_statistics(self.packet_sock)
            self.drops["overflow"] += dropped
        return {
            "received": self.received,
            "drops": dict(self.drops),
            "rules": [r.counters() for r in self.rules],
        }

    def handle_channel(self) -> None:
        try:
            got = self.incoming.receive(self.chan)
        except ConnectionError:
            got = None
        except ValueError as exc:  # garbage: the supervisor starts a fresh worker
            log.error("channel: %s; exiting", exc)
            got = None
        if got is None:
            self.running = False
            return
        message, fds = got
        op = message.get("op")
        if op == "configure":
            self.configure(Configure.parse(message), fds)
            wire.send(self.chan, {"op": "configured", "id": message.get("id"), "pid": os.getpid()})
        elif op == "stats":
            wire.send(self.chan, {"op": "stats", "id": message.get("id"), **self.stats()})
        elif op == "stop":
            self.running = False
        else:
            for fd in fds:
                os.close(fd)

    # -- data path ---------------------------------------------------------

    def drain(self, scan: bool = False) -> int:
        """Relay the frames ready in the ring, a batch at most; how many
        there were."""
        ring = self.ring
        if ring is None:
            return 0
        count = ring.ready()
        if not count and scan and ring.rescan():
            count = ring.ready()
        if count:
            self.relay_batch(ring, ring.current * ring.frame_size, count)
            ring.release(count)
        return count

    def relay_batch(self, ring: fastpath.Ring, pos: int, count: int) -> None:
        """Relay the `count` consecutive frames of the ring starting at `pos`.

        The loop below is the hot path: one unpack of the frame and IP/UDP
        headers in native byte order (compared against byte-swapped
        constants, so nothing is converted), one dict lookup, two appends.
        Anything that is not a plain, consistent IPv4/UDP datagram for a
        rule without source or rate limit goes to `slow_frame`.
        """
        m = ring.map
        # where the link and IP headers start: the same for every frame of a socket
        _status, _length, _snap, mac, net, _sec, _nsec = fastpath.FRAME.unpack_from(m, pos)
        step = ring.frame_size
        link = net - mac  # the link header: in tp_snaplen, not in the IP length
        unpack = fastpath.frame_unpacker(mac, net)
        fast, swapped, fragmask = self.fast, fastpath.SWAPPED16, fastpath.FRAGMENT_MASK
        payload_at = ring.base + net + fastpath.HEADERS
        touched: list[Rule] = []
        cur: Rule | None = None
        nowhere: list[int] = []
        add_addr = add_len = add_tos = add_key = nowhere.append  # rebound to the current rule's lists
        slow = self.slow_frame
        for _ in range(count):
            snap, fnet, gso, vihl, tos, total, frag, proto, dst, sport, dport, ulen = unpack(m, pos)
            size = snap - link
            if (
                fnet == net  # the same link header as the first frame of the batch
                and not gso
                and vihl == 0x45
                and proto == 17
                and not frag & fragmask
                and 28 <= size < 65536
                and total == swapped[size]
                and ulen == swapped[size - 20]
            ):
                rule = fast.get(dst << 16 | dport)
                if rule is not None:
                    if rule is not cur:
                        cur = rule
                        if not rule.addrs:
                            touched.append(rule)
                        add_addr, add_len, add_tos = rule.addrs.append, rule.lens.append, rule.toses.append
                        add_key = rule.keeps.append
                    add_addr(payload_at + pos)
                    add_len(size - 28)
                    add_tos(tos)
                    add_key(sport << 16 | frag)  # relaying.port_key: frag holds DF alone here
                    pos += step
                    continue
            slow(ring, pos, touched)
            pos += step
        self.received += count
        tx = self.tx
        assert tx is not None
        for rule in touched:
            tx.send(rule)
        self.pins.clear()

    def slow_frame(self, ring: fastpath.Ring, pos: int, touched: list[Rule]) -> None:
        """One frame the fast path would not take: parsed in full, split into
        its datagrams if it is an aggregate (UDP GSO or GRO), matched by
        source, policed, or counted as a drop. A frame larger than the
        ring's frames arrives whole in the socket's queue (TP_STATUS_COPY)."""
        status, length, snap, mac, net, _sec, _nsec = fastpath.FRAME.unpack_from(ring.map, pos)
        snap -= net - mac  # from the IP header on
        _flags, gso_type, _hdr_len, gso_size = fastpath.VNET.unpack_from(
            ring.map, pos + mac - fastpath.VNET_SIZE
        )
        view, base, at = ring.view, ring.base, pos + net
        if status & fastpath.TP_STATUS_COPY:
            whole = self.copied(ring.view[at : at + snap], net - mac)
            if whole is None:  # the queue had no room for it: it came cut short
                lost = 1
                if gso_type == fastpath.VIRTIO_NET_HDR_GSO_UDP_L4 and gso_size:  # datagrams, not frames
                    lost = max(1, -(-(length - (net - mac) - fastpath.HEADERS) // gso_size))
                    self.received += lost - 1
                self.drops["truncated"] += lost
                return
            base, pin = fastpath.address_of(whole)
            self.pins.append((whole, pin))
            view, at, snap = memoryview(whole), 0, len(whole)
        dgram = parse(view[at : at + snap], snap)
        if dgram.__class__ is str:
            self.drops[dgram] += 1
            return
        assert isinstance(dgram, Datagram)
        rule: Any = self.table.get(dgram.group << 16 | dgram.port)
        if rule.__class__ is dict:
            rule = rule.get(dgram.source) or rule.get(None)
        if rule is None:
            self.drops["unmatched"] += 1
            return
        partial = bool(status & TP_STATUS_CSUMNOTREADY)
        if gso_type == fastpath.VIRTIO_NET_HDR_GSO_UDP_L4 and 0 < gso_size < dgram.end - dgram.start:
            # an aggregate of datagrams of gso_size bytes (the last shorter)
            starts = range(dgram.start, dgram.end, gso_size)
            self.received += len(starts) - 1  # counted as the datagrams they are
            if not rule.slow:  # nothing to look at per datagram: all of them at once
                if not rule.addrs:
                    touched.append(rule)
                rule.addrs.extend(range(base + at + dgram.start, base + at + dgram.end, gso_size))
                rule.lens.extend([gso_size] * (len(starts) - 1))
                rule.lens.append(dgram.end - starts[-1])
                rule.toses.extend([dgram.tos] * len(starts))
                rule.keeps.extend([wire_key(dgram)] * len(starts))
                return
            for first in starts:
                self.take(
                    rule,
                    view,
                    base,
                    at,
                    dgram._replace(start=first, end=min(first + gso_size, dgram.end)),
                    True,
                    touched,
                )
        else:
            self.take(rule, view, base, at, dgram, partial, touched)

    def copied(self, head: memoryview, link: int) -> bytearray | None:
        """The whole IP packet of a frame the ring holds cut short (`head`:
        what it holds of it), from the socket's queue, where the kernel put
        a copy if the queue had room. Copies queue in frame order: the first
        is this frame's if it begins as the frame does; if not, this frame
        got none and the first belongs to a later one, so it stays."""
        sock = self.packet_sock
        assert sock is not None
        skip = fastpath.VNET_SIZE + link
        try:
            first = sock.recv(skip + len(head), socket.MSG_PEEK)
            if first[skip:] != head:
                return None
            data = sock.recv(fastpath.COPY_MAX)
        except OSError:
            return None
        return bytearray(data[skip:])

    def take(
        self,
        rule: Rule,
        view: memoryview,
        base: int,
        at: int,
        dgram: Datagram,
        partial: bool,
        touched: list[Rule],
    ) -> None:
        """Queue one datagram for its rule: its IP header is at `at` of
        `view`, whose first byte is at address `base`."""
        size = dgram.end - dgram.start
        if rule.guard and (
            dgram.source in self.local
            or self.recent.again(
                rule.fingerprint(dgram.source, view[at + dgram.start : at + dgram.end]), monotonic()
            )
        ):
            rule.looped += 1  # this host sent it, or another relay reflected it back
            return
        if rule.policer is not None:
            rule.packets += 1
            rule.octets += size
            if not rule.policer.allow(size, monotonic()):
                rule.limited += 1
                return
            rule.packets -= 1  # counted again with the batch
            rule.octets -= size
        if not rule.addrs:
            touched.append(rule)
        rule.addrs.append(base + at + dgram.start)
        rule.lens.append(size)
        rule.toses.append(dgram.tos)
        rule.keeps.append(wire_key(dgram))
        if rule.raw:
            self.hold(rule, view, base, at, dgram, partial)

    def hold(self, rule: Rule, view: memoryview, base: int, at: int, dgram: Datagram, partial: bool) -> None:
        """Keep a datagram for the rule's faithful outputs, with what its
        checksum must be computed afresh from, if anything: a payload the
        relay rewrote, or one whose checksum the sender left to offload
        (a partial one, as from a local sender over veth, or a segment of
        an aggregate)."""
        address, pin, fresh = base + at + dgram.start, None, None
        if rule.decrements and dgram.ttl <= 1:
            rule.expired += 1  # not relayed where outputs decrement the TTL
        if partial or rule.rewrite is not None:
            payload: bytes | memoryview = view[at + dgram.start : at + dgram.end]
            changed = mdns_multicast_query(bytes(payload)) if rule.rewrite == "mdns" else None
            if changed is not None:
                buffer = bytearray(changed)
                address, pinned = fastpath.address_of(buffer)
                pin, payload = (buffer, pinned), changed
                if rule.guard:  # a reflection of it comes back rewritten: know that too
                    self.recent.again(rule.fingerprint(dgram.source, changed), monotonic())
            if partial or (changed is not None and dgram.checksum):
                fresh = payload_sum(payload)
        rule.held.append((address, dgram.end - dgram.start, dgram, fresh, pin))

    def run(self) -> None:
        poller = select.poll()
        chan_fd = self.chan.fileno()
        poller.register(chan_fd, select.POLLIN)
        registered = -1  # by number: a reconfiguration replaces the descriptor
        while self.running:
            wanted = self.packet_sock.fileno() if self.packet_sock is not None else -1
            if wanted != registered:
                if registered >= 0:
                    poller.unregister(registered)
                if wanted >= 0:
                    poller.register(wanted, select.POLLIN)
                registered = wanted
            for fd, events in poller.poll(1000):
                if fd == chan_fd:
                    self.handle_channel()
                elif fd == registered and events & (select.POLLIN | select.POLLERR):
                    if not self.drain() and not self.drain(scan=True):
                        time.sleep(0.001)  # readable yet no frame of ours: do not spin
                    self.keep_draining()
                    if self.busy_poll:
                        self.spin()
                if not self.running:
                    break

    def keep_draining(self) -> None:
        """Relay batches while there are frames; a message on the channel
        ends it, looked at once a millisecond (not after every batch: each
        look is a system call)."""
        drain, chan = self.drain, self.chan
        look = monotonic() + CHANNEL_LOOK
        while drain():
            if monotonic() > look:
                if _readable(chan):
                    return
                look = monotonic() + CHANNEL_LOOK

    def spin(self) -> None:
        """Busy polling: keep reading the ring until `busy_poll` seconds pass
        without a frame, so that the next datagram is relayed without the
        wakeup of a sleeping process (tens of microseconds to milliseconds
        on a busy or virtual machine). A message on the channel ends the
        spin; it is looked at after each batch and every few hundred empty
        rounds."""
        drain, chan, span = self.drain, self.chan, self.busy_poll
        idle_until = monotonic() + span
        rounds = 0
        look = monotonic() + CHANNEL_LOOK
        while True:
            if drain():
                idle_until = monotonic() + span
                if monotonic() > look:
                    if _readable(chan):
                        return
                    look = monotonic() + CHANNEL_LOOK
            else:
                rounds += 1
                if rounds & 255 == 0 and (_readable(chan) or monotonic() > idle_until):
                    return


#: seconds between looks at the channel while frames keep coming
CHANNEL_LOOK = 0.001
#: tpacket2_hdr.tp_status: the checksum is left to offload (only partly computed)
TP_STATUS_CSUMNOTREADY = 0x8


def wire_key(dgram: Datagram) -> int:
    """A parsed datagram's `port_key`."""
    return port_key(fastpath.SWAPPED16[dgram.sport], DF_NATIVE if dgram.dont_fragment else 0)


def _readable(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mcrd-worker", description="mcrd data-plane worker (started by mcrd)"
    )
    parser.add_argument("channel", type=int, help="descriptor of the channel to the supervisor")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="mcrd-worker[%(process)d]: %(message)s")
    # The supervisor stops us through the channel; a terminal's ^C goes to the
    # whole process group and must not kill the data path before it asks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chan = socket.socket(fileno=args.channel)
    try:
        drop_privileges(args.uid, args.gid)
    except OSError as exc:
        reason = f"cannot drop privileges to {args.uid}:{args.gid}: {exc.strerror or exc}"
        log.error("%s", reason)
        with contextlib.suppress(OSError):
            wire.send(chan, {"op": "boot-failed", "reason": reason})
        return wire.EX_BOOT
    Worker(chan).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
