"""What a worker relays with: its rules, their outputs and policers, the loop
guard's memory of what it relayed, and the lookup tables that find a rule
for a datagram. Values and arithmetic only; the worker's loop and its sends
are `mcrd.worker`.
"""

from __future__ import annotations

import collections
import socket
from time import monotonic
from typing import Any

from mcrd import fastpath
from mcrd.packet import LOOP_WINDOW, Datagram, ip_to_int, negated, words
from mcrd.wire import OutputConfig, RuleConfig


class Output:
    """One output of a rule: the socket it sends on, where to, and what it sent."""

    __slots__ = (
        "delta",
        "dport",
        "dscp",
        "dst",
        "errors",
        "fd",
        "generation",
        "gso_limit",
        "ident",
        "interface",
        "keep_port",
        "kept",
        "label",
        "last_error",
        "name",
        "octets",
        "packets",
        "raw",
        "sock",
        "source",
        "source_text",
        "sport",
        "ttl",
    )

    def __init__(self, sock: socket.socket, config: OutputConfig, group: int = 0, port: int = 0) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = config.output
        self.generation = config.socket
        self.name = fastpath.sockaddr_in(config.group, config.port)  # (address, pin) for sendmmsg
        self.label = config.label
        # a faithful output: headers built per datagram (see Worker.send_raw)
        self.raw = config.raw
        self.ttl = config.ttl
        self.dst = ip_to_int(config.group)
        self.dport = config.port
        self.source = ip_to_int(config.source) if config.source else None  # None: the sender's
        self.source_text = config.source
        self.sport = config.source_port  # None: the sender's
        self.dscp = config.dscp  # None: each datagram's own
        # sending from each sender's port: the socket bound to it, by the key
        # the worker gives a datagram (its port and DF flag, see
        # Worker.port_socket); None where it could not be opened
        self.keep_port = config.keep_port
        self.interface = config.interface
        self.kept: dict[int, socket.socket | None] = {}
        # the checksum change from the rule's input (`group`, `port`) to this
        # output's destination: the same for every datagram
        self.delta = words(self.dst) + negated(group) + self.dport + (~port & 0xFFFF)
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
            if (self.keep_port, self.interface, self.ttl, self.source) == (
                prev.keep_port,
                prev.interface,
                prev.ttl,
                prev.source,
            ):
                self.kept, prev.kept = prev.kept, {}

    def close(self) -> None:
        """Close the sockets this output bound to senders' ports."""
        for sock in self.kept.values():
            if sock is not None:
                sock.close()
        self.kept.clear()

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


#: DF as a 16-bit read in native byte order of the IP flags/fragment field has it
DF_NATIVE = fastpath.SWAPPED16[0x4000]


def port_key(native_sport: int, native_frag: int) -> int:
    """What sockets a datagram is sent from where an output keeps the
    sender's port: its source port and DF flag, as read in native byte order."""
    return native_sport << 16 | native_frag & DF_NATIVE


def key_port(key: int) -> tuple[int, bool]:
    """The source port and DF flag a `port_key` stands for."""
    return fastpath.SWAPPED16[key >> 16], bool(key & DF_NATIVE)


class Rule:
    """One rule as the worker relays it: its outputs, policer and counts."""

    __slots__ = (
        "addrs",
        "by_sender",
        "decrements",
        "expired",
        "guard",
        "held",
        "ident",
        "keeps",
        "lens",
        "limited",
        "looped",
        "octets",
        "outputs",
        "packets",
        "policer",
        "raw",
        "rewrite",
        "toses",
        "udp",
    )

    def __init__(
        self,
        ident: int,
        outputs: list[Output],
        policer: Policer | None = None,
        guard: bool = False,
        rewrite: str | None = None,
    ) -> None:
        self.ident = ident
        self.outputs = outputs
        self.udp = [o for o in outputs if not o.raw]
        self.raw = [o for o in outputs if o.raw]
        self.policer = policer
        self.guard = guard
        self.rewrite = rewrite
        # what the loop guard knows a datagram by: its payload, and its
        # sender where every output keeps the sender's address (SSDP: two
        # clients' identical searches are two searches, and a reflection by
        # another relay still comes from the same sender)
        self.by_sender = bool(self.raw) and not self.udp and all(o.source is None for o in self.raw)
        self.packets = 0
        self.octets = 0
        self.limited = 0
        self.looped = 0
        self.expired = 0  # came with TTL 1 where outputs decrement it
        self.decrements = any(o.raw and o.ttl == 0 for o in outputs)
        # the current block's datagrams for this rule: ring addresses, lengths
        self.addrs: list[int] = []
        self.lens: list[int] = []
        self.toses: list[int] = []  # their TOS bytes (DSCP and ECN), kept on the way out
        # their source ports and DF flags, as `port_key` makes them, where an
        # output sends from each sender's port (else not collected)
        self.keeps: list[int] = []
        # and for faithful outputs: (payload address, size, the datagram, the
        # payload's sum when its checksum is computed afresh or None, a
        # rewritten payload's pin or None)
        self.held: list[tuple[int, int, Datagram, int | None, Any]] = []

    def fingerprint(self, source: int, payload: bytes | memoryview) -> int:
        data = bytes(payload)
        return hash((source, data)) if self.by_sender else hash(data)

    @property
    def slow(self) -> bool:
        """Whether each datagram needs more than the fast path's lookup."""
        return self.policer is not None or self.guard or bool(self.raw) or self.rewrite is not None

    def counters(self) -> dict[str, Any]:
        return {
            "rule": self.ident,
            "packets": self.packets,
            "bytes": self.octets,
            "limited": self.limited,
            "looped": self.looped,
            "expired": self.expired,
            "outputs": [o.counters() for o in self.outputs],
        }


class Recent:
    """What the loop guard relayed lately: payload hashes and when, for LOOP_WINDOW."""

    LIMIT = 65536  # entries; beyond it the oldest go early

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}
        self.order: collections.deque[tuple[float, int]] = collections.deque()

    def again(self, key: int, now: float) -> bool:
        """Whether `key` was relayed within the window; if not, remember it now."""
        order, seen = self.order, self.seen
        while order and (now - order[0][0] >= LOOP_WINDOW or len(order) > self.LIMIT):
            _at, old = order.popleft()
            if seen.get(old) == _at:
                del seen[old]
        at = seen.get(key)
        if at is not None and now - at < LOOP_WINDOW:
            return True
        seen[key] = now
        order.append((now, key))
        return False


def carried_rule(spec: RuleConfig, socks: list[socket.socket], old: Rule | None) -> Rule:
    """A rule as configured, carrying on the counts (and policer, if its
    limit is the same) of the rule of the same identity before: a reload
    does not reset what was counted."""
    old_outputs = {o.ident: o for o in old.outputs} if old else {}
    outputs = []
    for o in spec.outputs:
        out = Output(socks[o.fd], o, ip_to_int(spec.group), spec.port)
        prev = old_outputs.get(o.output)
        if prev is not None:
            out.take_over(prev)
        outputs.append(out)
    policer = None
    if spec.pps or spec.bps:
        kept = old.policer if old is not None else None
        same = kept is not None and (kept.pps, kept.bps) == (spec.pps, spec.bps)
        policer = kept if same else Policer(spec.pps, spec.bps, monotonic())
    rule = Rule(spec.rule, outputs, policer, spec.guard, spec.rewrite)
    if old is not None:
        rule.packets, rule.octets, rule.limited = old.packets, old.octets, old.limited
        rule.looped, rule.expired = old.looped, old.expired
    return rule


def tables(
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
        if only is not None and len(choices) == 1 and not only.slow:
            fast[fastpath.native_key(key >> 16, key & 0xFFFF)] = only
    return table, fast
