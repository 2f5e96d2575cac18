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
import errno
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
from mcrd.packet import DROP_REASONS, Datagram, ip_to_int, parse
from mcrd.privdrop import drop_privileges
from mcrd.wire import Configure, OutputConfig, RuleConfig

log = logging.getLogger("mcrd.worker")


class Output:
    """One output of a rule: the socket it sends on, where to, and what it sent."""

    __slots__ = (
        "errors",
        "fd",
        "generation",
        "gso_limit",
        "ident",
        "label",
        "last_error",
        "name",
        "octets",
        "packets",
        "sock",
    )

    def __init__(self, sock: socket.socket, config: OutputConfig) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = config.output
        self.generation = config.socket
        self.name = fastpath.sockaddr_in(config.group, config.port)  # (address, pin) for sendmmsg
        self.label = config.label
        # largest payload sent with UDP GSO: lowered when the kernel refuses
        # (the interface's MTU), 0 when the interface cannot do it at all
        self.gso_limit = fastpath.GSO_MAX_BYTES
        self.packets = 0
        self.octets = 0
        self.errors = 0
        self.last_error = ""

    def take_over(self, prev: Output) -> None:
        """Carry on from the same output's previous configuration."""
        self.packets, self.octets = prev.packets, prev.octets
        self.errors, self.last_error = prev.errors, prev.last_error
        if prev.generation == self.generation:  # the same socket: the same limits
            self.gso_limit = prev.gso_limit

    def counters(self) -> dict[str, Any]:
        return {
            "output": self.ident,
            "packets": self.packets,
            "bytes": self.octets,
            "errors": self.errors,
            "last_error": self.last_error,
        }


class Policer:
    """Token buckets for datagrams and bits per second, each holding 0.1 s of rate."""

    __slots__ = ("bit_capacity", "bit_tokens", "bps", "last", "packet_capacity", "packet_tokens", "pps")

    BURST = 0.1

    def __init__(self, pps: int | None, bps: int | None, now: float) -> None:
        self.pps = pps
        self.bps = bps
        self.packet_capacity = max(pps * self.BURST, 1.0) if pps else 0.0
        self.bit_capacity = max(bps * self.BURST, 65535 * 8.0) if bps else 0.0
        self.packet_tokens = self.packet_capacity
        self.bit_tokens = self.bit_capacity
        self.last = now

    def allow(self, length: int, now: float) -> bool:
        elapsed = now - self.last
        self.last = now
        bits = length * 8
        if self.pps:
            self.packet_tokens = min(self.packet_tokens + elapsed * self.pps, self.packet_capacity)
            if self.packet_tokens < 1.0:
                return False
        if self.bps:
            self.bit_tokens = min(self.bit_tokens + elapsed * self.bps, self.bit_capacity)
            if self.bit_tokens < bits:
                return False
            self.bit_tokens -= bits
        if self.pps:
            self.packet_tokens -= 1.0
        return True


class Rule:
    """One rule as the worker relays it: its outputs, policer and counts."""

    __slots__ = ("addrs", "ident", "lens", "limited", "octets", "outputs", "packets", "policer")

    def __init__(self, ident: int, outputs: list[Output], policer: Policer | None = None) -> None:
        self.ident = ident
        self.outputs = outputs
        self.policer = policer
        self.packets = 0
        self.octets = 0
        self.limited = 0
        # the current block's datagrams for this rule: ring addresses, lengths
        self.addrs: list[int] = []
        self.lens: list[int] = []

    def counters(self) -> dict[str, Any]:
        return {
            "rule": self.ident,
            "packets": self.packets,
            "bytes": self.octets,
            "limited": self.limited,
            "outputs": [o.counters() for o in self.outputs],
        }


class Worker:
    def __init__(self, chan: socket.socket) -> None:
        self.chan = chan
        self.packet_sock: socket.socket | None = None
        self.ring: fastpath.Ring | None = None
        self.sender: fastpath.Sender | None = None
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

    # -- control -----------------------------------------------------------

    def configure(self, config: Configure, fds: list[int]) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        for sock in socks:
            sock.setblocking(False)
        packet_sock = socks[0]
        if self.ring is None or self.ring.inode != os.fstat(packet_sock.fileno()).st_ino:
            mapped = fastpath.Ring(packet_sock, config.block_size, config.block_count)
            if self.ring is not None:
                self.ring.close()
            self.ring = mapped
            # a block holds at most one frame per 64 bytes
            self.sender = fastpath.Sender(config.block_size // 64)
        old = {r.ident: r for r in self.rules}
        rules = [_carried_rule(spec, socks, old.get(spec.rule)) for spec in config.rules]
        self.table, self.fast = _tables(config.rules, rules)
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
            got = wire.receive(self.chan)
        except ConnectionError:
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

    def drain(self, scan: bool = False) -> bool:
        """Relay one block of the ring; True when there was one."""
        ring = self.ring
        if ring is None:
            return False
        offset = ring.ready(scan)
        if offset is None:
            return False
        _status, count, first, _seq = fastpath.BLOCK.unpack_from(ring.map, offset)
        self.relay_block(ring, offset + first, count)
        ring.release(offset)
        return True

    def relay_block(self, ring: fastpath.Ring, pos: int, count: int) -> None:
        """Relay the `count` frames of a block starting at `pos`.

        The loop below is the hot path: one unpack of the frame and IP/UDP
        headers in native byte order (compared against byte-swapped
        constants, so nothing is converted), one dict lookup, two appends.
        Anything that is not a plain, consistent IPv4/UDP datagram for a
        rule without source or rate limit goes to `slow_frame`.
        """
        m = ring.map
        net = fastpath.FRAME.unpack_from(m, pos)[4]  # the same for every frame of a socket
        unpack = fastpath.frame_unpacker(net)
        fast, swapped, fragmask = self.fast, fastpath.SWAPPED16, fastpath.FRAGMENT_MASK
        payload_at = ring.base + net + fastpath.HEADERS
        touched: list[Rule] = []
        cur: Rule | None = None
        nowhere: list[int] = []
        add_addr = add_len = nowhere.append  # rebound to the current rule's lists
        slow = self.slow_frame
        for _ in range(count):
            step, snap, fnet, vihl, total, frag, proto, _src, dst, dport, ulen = unpack(m, pos)
            if (
                fnet == net
                and vihl == 0x45
                and proto == 17
                and not frag & fragmask
                and 28 <= snap < 65536
                and total == swapped[snap]
                and ulen == swapped[snap - 20]
            ):
                rule = fast.get(dst << 16 | dport)
                if rule is not None:
                    if rule is not cur:
                        cur = rule
                        if not rule.addrs:
                            touched.append(rule)
                        add_addr, add_len = rule.addrs.append, rule.lens.append
                    add_addr(payload_at + pos)
                    add_len(snap - 28)
                    pos += step
                    continue
            slow(ring, pos, touched)
            pos += step
        self.received += count
        for rule in touched:
            self.send(rule)

    def slow_frame(self, ring: fastpath.Ring, pos: int, touched: list[Rule]) -> None:
        """One frame the fast path would not take: parsed in full, matched
        by source, policed, or counted as a drop."""
        _step, snap, _length, _mac, net = fastpath.FRAME.unpack_from(ring.map, pos)
        at = pos + net
        dgram = parse(ring.view[at : at + snap], snap)
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
        size = dgram.end - dgram.start
        if rule.policer is not None:
            rule.packets += 1
            rule.octets += size
            if not rule.policer.allow(size, monotonic()):
                rule.limited += 1
                return
            rule.packets -= 1  # counted again with the block
            rule.octets -= size
        if not rule.addrs:
            touched.append(rule)
        rule.addrs.append(ring.base + at + dgram.start)
        rule.lens.append(size)

    def send(self, rule: Rule) -> None:
        sender = self.sender
        assert sender is not None
        addrs, lens = rule.addrs, rule.lens
        total_packets, total_octets = len(lens), sum(lens)
        rule.packets += total_packets
        rule.octets += total_octets
        sender.load(addrs, lens)
        for out in rule.outputs:
            plan = sender.plan(out.gso_limit)
            k = 0
            while k < len(plan):
                sent, err = sender.send(out.fd, out.name[0], plan, k)
                if sent:
                    first = plan[k][0]
                    k += sent
                    end = plan[k][0] if k < len(plan) else len(lens)
                    out.packets += end - first
                    out.octets += sum(lens[first:end]) if end - first < total_packets else total_octets
                if not err:
                    continue
                first, segments, gso = plan[k]
                if gso and err in _NO_GSO:
                    # this output cannot send runs this large (MTU) or at all
                    out.gso_limit = gso - 1 if err in (errno.EINVAL, errno.EMSGSIZE) else 0
                    log.info(
                        "output %s: UDP GSO %s (%s); sending datagrams one by one",
                        out.label,
                        f"limited to {out.gso_limit} bytes" if out.gso_limit else "unavailable",
                        fastpath.errno_name(err),
                    )
                    plan = plan[:k] + [(i, 1, 0) for i in range(first, first + segments)] + plan[k + 1 :]
                    continue
                if err in _QUEUE_FULL:  # the rest would fail alike
                    segments = len(lens) - first
                    k = len(plan)
                else:
                    k += 1
                out.errors += segments
                out.last_error = fastpath.errno_name(err)
        addrs.clear()
        lens.clear()

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
                        time.sleep(0.001)  # readable yet no block of ours: do not spin
                    while self.drain() and not _readable(self.chan):
                        pass
                if not self.running:
                    break


#: a GSO message refused: too large for the path (EMSGSIZE, EINVAL on older
#: kernels), or no checksum offload or GSO on the interface at all
_NO_GSO = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_QUEUE_FULL = frozenset({errno.EAGAIN, errno.ENOBUFS})


def _carried_rule(spec: RuleConfig, socks: list[socket.socket], old: Rule | None) -> Rule:
    """A rule as configured, carrying on the counts (and policer, if its
    limit is the same) of the rule of the same identity before: a reload
    does not reset what was counted."""
    old_outputs = {o.ident: o for o in old.outputs} if old else {}
    outputs = []
    for o in spec.outputs:
        out = Output(socks[o.fd], o)
        prev = old_outputs.get(o.output)
        if prev is not None:
            out.take_over(prev)
        outputs.append(out)
    policer = None
    if spec.pps or spec.bps:
        kept = old.policer if old is not None else None
        same = kept is not None and (kept.pps, kept.bps) == (spec.pps, spec.bps)
        policer = kept if same else Policer(spec.pps, spec.bps, monotonic())
    rule = Rule(spec.rule, outputs, policer)
    if old is not None:
        rule.packets, rule.octets, rule.limited = old.packets, old.octets, old.limited
    return rule


def _tables(
    specs: tuple[RuleConfig, ...], rules: list[Rule]
) -> tuple[dict[int, Rule | dict[int | None, Rule]], dict[int, Rule]]:
    """The lookup tables: by (group << 16 | port), a rule or {source: rule};
    and for the fast path, rules without source or rate limit by group and
    port as read from the wire."""
    by_source: dict[int, dict[int | None, Rule]] = {}
    for spec, rule in zip(specs, rules, strict=True):
        source = ip_to_int(spec.source) if spec.source else None
        by_source.setdefault(ip_to_int(spec.group) << 16 | spec.port, {})[source] = rule
    table: dict[int, Rule | dict[int | None, Rule]] = {}
    fast: dict[int, Rule] = {}
    for key, choices in by_source.items():
        only = choices.get(None)
        table[key] = only if only is not None and len(choices) == 1 else choices
        if only is not None and len(choices) == 1 and only.policer is None:
            fast[fastpath.native_key(key >> 16, key & 0xFFFF)] = only
    return table, fast


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
