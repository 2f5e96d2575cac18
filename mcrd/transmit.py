"""The worker's sending side: a batch's datagrams of one rule to each of its
outputs, through UDP sockets (runs of one size as UDP GSO messages, each
datagram with its TOS byte; from each sender's port where the output keeps
it) and raw sockets (faithful outputs, headers built per datagram).

Thin over `fastpath.Sender` and `fastpath.RawSender`, which hold the
message arrays; what a batch holds comes from `Worker.relay_batch`.
"""

from __future__ import annotations

import errno
import logging

from mcrd import fastpath, netio
from mcrd.packet import HEADER, IP_DF, adjust_checksum, finish_checksum, negated, words
from mcrd.relaying import Output, Rule, key_port

log = logging.getLogger("mcrd.worker")

#: a GSO message refused: too large for the path (EMSGSIZE, EINVAL on older
#: kernels), or no checksum offload or GSO on the interface at all
_NO_GSO = frozenset({errno.EINVAL, errno.EMSGSIZE, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_QUEUE_FULL = frozenset({errno.EAGAIN, errno.ENOBUFS})
#: sockets an output binds to senders' ports at most: beyond, the output's
#: own socket sends (a rule with this many senders is not a stream)
MAX_SENDER_PORTS = 64


class Transmitter:
    """Sends what a worker relays; one per ring (its batch size)."""

    def __init__(self, capacity: int) -> None:
        self.udp = fastpath.Sender(capacity)
        self.raw = fastpath.RawSender(capacity)

    def send_raw(self, rule: Rule) -> None:
        """Send the held datagrams to each faithful output: headers built from
        the received ones (DSCP and ECN, DF and, unless the output sets them,
        the source port and address kept; TTL and destination the output's),
        the UDP checksum updated for what changed."""
        sender = self.raw
        held = rule.held
        headers, pack = sender.headers, HEADER.pack_into
        for out in rule.raw:
            # ttl 0: the received one less one; what came with 1 does not go
            items = held if out.ttl else [h for h in held if h[2].ttl > 1]
            for i, (address, size, d, fresh, _pin) in enumerate(items):
                src = d.source if out.source is None else out.source
                sport = d.sport if out.sport is None else out.sport
                if fresh is not None:
                    csum = finish_checksum(fresh, src, out.dst, sport, out.dport, 8 + size)
                else:
                    delta = out.delta
                    if src != d.source:
                        delta += words(src) + negated(d.source)
                    if sport != d.sport:
                        delta += sport + (~d.sport & 0xFFFF)
                    csum = adjust_checksum(d.checksum, delta)
                frag = IP_DF if d.dont_fragment else 0
                pack(
                    headers,
                    28 * i,
                    0x45,
                    d.tos if out.dscp is None else out.dscp << 2 | d.tos & 3,
                    28 + size,
                    0,
                    frag,
                    out.ttl or d.ttl - 1,
                    17,
                    0,
                    src,
                    out.dst,
                    sport,
                    out.dport,
                    8 + size,
                    csum,
                )
                sender.load(i, address, size)
            k = 0
            while k < len(items):
                sent, err = sender.send(out.fd, out.name[0], k, len(items) - k)
                for j in range(k, k + sent):
                    out.packets += 1
                    out.octets += items[j][1]
                k += sent
                if err:
                    failed = len(items) - k if err in _QUEUE_FULL else 1
                    out.errors += failed
                    out.last_error = fastpath.errno_name(err)
                    k += failed
        held.clear()

    def send(self, rule: Rule) -> None:
        """Send the batch's datagrams of a rule to each of its outputs."""
        sender = self.udp
        addrs, lens, toses, keys = rule.addrs, rule.lens, rule.toses, rule.keeps
        total_packets, total_octets = len(lens), sum(lens)
        rule.packets += total_packets
        rule.octets += total_octets
        if rule.raw:
            self.send_raw(rule)
        sender.load(addrs, lens, toses)
        # the usual case: one sender, one port, for the whole batch
        one_key = keys[0] if keys and keys.count(keys[0]) == total_packets else None
        mixed = []
        for out in rule.udp:
            if not out.keep_port:
                self.send_loaded(out, out.fd, total_octets)
            elif one_key is not None:
                self.send_loaded(out, self.port_socket(out, one_key), total_octets)
            else:
                mixed.append(out)
        if mixed:  # several senders' ports: each run of one port on its own
            start = 0
            while start < total_packets:
                key, end = keys[start], start + 1
                while end < total_packets and keys[end] == key:
                    end += 1
                sender.load(addrs[start:end], lens[start:end], toses[start:end])
                octets = sum(lens[start:end])
                for out in mixed:
                    self.send_loaded(out, self.port_socket(out, key), octets)
                start = end
        addrs.clear()
        lens.clear()
        toses.clear()
        keys.clear()

    def send_loaded(self, out: Output, fd: int, total_octets: int) -> None:
        """Send the datagrams loaded in the sender to one output through `fd`
        (of `total_octets` payload bytes in all), as GSO runs where it can."""
        sender = self.udp
        lens, total_packets = sender.lens, sender.loaded
        plan = sender.plan(out.gso_limit)
        k = 0
        while k < len(plan):
            sent, err = sender.send(fd, out.name[0], plan, k, out.dscp)
            if sent:
                first = plan[k][0]
                k += sent
                end = plan[k][0] if k < len(plan) else total_packets
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
                segments = total_packets - first
                k = len(plan)
            else:
                k += 1
            out.errors += segments
            out.last_error = fastpath.errno_name(err)

    def port_socket(self, out: Output, key: int) -> int:
        """The descriptor that sends to `out` from the port (and with the DF
        flag) `key` stands for: a socket this worker bound to it, opened the
        first time the port shows up. Where it cannot be (a port below 1024,
        one another program holds, too many senders), the output's own
        socket sends from its own port, and that is logged once."""
        kept = out.kept
        if key in kept:
            sock = kept[key]
        else:
            port, dont_fragment = key_port(key)
            sock = None
            if len(kept) >= MAX_SENDER_PORTS:
                why = f"more than {MAX_SENDER_PORTS} senders' ports"
            else:
                try:
                    sock = netio.open_port_socket(
                        out.interface, out.ttl, out.source_text, port, dont_fragment
                    )
                    sock.setblocking(False)
                except OSError as exc:
                    why = exc.strerror or str(exc)
            kept[key] = sock
            if sock is None:
                log.warning(
                    "output %s: cannot send from the sender's port %d (%s); sending from its own port",
                    out.label,
                    port,
                    why,
                )
                out.last_error = f"source port {port}: {why}"
        return out.fd if sock is None else sock.fileno()
