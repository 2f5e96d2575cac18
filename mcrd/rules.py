"""Relay rules: the data model and every check that does not need the host.

Pure core: values in, values (or error strings) out. No sockets, no files, no
processes, so it is tested table-driven without privileges. The file loader
(`mcrd.config`) turns TOML into these models; the supervisor keys running
state by `RuleSpec.key`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, model_validator

#: `source_port = "keep"`: a relayed datagram leaves from the sender's UDP source port
KEEP = "keep"

IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")

#: TTL used when an output does not set one. Multicast stays on the output's
#: own segment unless the operator says otherwise (the kernel's own default);
#: unicast gets the usual host default.
DEFAULT_MULTICAST_TTL = 1
DEFAULT_UNICAST_TTL = 64


def check_ifname(value: str) -> str:
    if not IFNAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid interface name {value!r}: 1-15 letters, digits, '-', '_' or '.', "
            "not starting with '-' or '.'"
        )
    return value


def _parse_ipv4(value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 address") from None


def check_input_group(value: str) -> str:
    addr = _parse_ipv4(value)
    if addr.is_unspecified:
        raise ValueError(f"{value} cannot be an input address")
    if addr.is_loopback:
        raise ValueError(f"{value} is a loopback address: nothing arrives on an interface for it")
    return str(addr)


LIMITED_BROADCAST = "255.255.255.255"


def check_output_group(value: str) -> str:
    addr = _parse_ipv4(value)
    if addr.is_unspecified:
        raise ValueError(f"{value} cannot be an output destination")
    if addr.is_loopback:
        raise ValueError(f"{value} is a loopback address: it never leaves the host")
    return str(addr)


def check_source(value: str) -> str:
    addr = _parse_ipv4(value)
    if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value} cannot be a sender address: it must be a unicast address")
    return str(addr)


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"must be from 1 to 65535, got {value}")
    return value


def check_source_port(value: object) -> int | str:
    if value == KEEP and isinstance(value, str):
        return KEEP
    if isinstance(value, int) and not isinstance(value, bool):
        return check_port(value)
    raise ValueError(f'must be "keep" or a port number from 1 to 65535, got {value!r}')


def check_ttl(value: int) -> int:
    if not 1 <= value <= 255:
        raise ValueError(f"must be from 1 to 255, got {value}")
    return value


def check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > 64:
        raise ValueError(f"must be at most 64 characters, got {len(value)}")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must contain printable characters only")
    return value


IfName = Annotated[str, AfterValidator(check_ifname)]
Port = Annotated[int, AfterValidator(check_port)]
Ttl = Annotated[int, AfterValidator(check_ttl)]


def is_multicast(addr: str) -> bool:
    return ipaddress.IPv4Address(addr).is_multicast


class Discovery(NamedTuple):
    """A discovery protocol mcrd knows by its group and port, and what its
    rules need by default so that relaying it works with real clients."""

    name: str
    #: relayed datagrams keep the sender's UDP source port: mDNS receivers
    #: ignore responses from any port but 5353 (RFC 6762, section 6)
    keep_port: bool
    #: relayed datagrams keep the sender's address: an SSDP device answers an
    #: M-SEARCH by unicast to the address and port it came from, so with the
    #: relay's own address the answer would go to the relay and be lost
    keep_address: bool


#: by input (group, port)
DISCOVERY: dict[tuple[str, int], Discovery] = {
    ("224.0.0.251", 5353): Discovery("mdns", keep_port=True, keep_address=False),
    ("239.255.255.250", 1900): Discovery("ssdp", keep_port=True, keep_address=True),
}


class _Strict(BaseModel):
    # strict: TOML is typed, so "5000" for a port is a mistake, not a port;
    # forbid: a misspelt key must be an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputSpec(_Strict):
    interface: IfName
    group: Annotated[str, AfterValidator(check_input_group)]
    port: Port
    source: Annotated[str, AfterValidator(check_source)] | None = None


class OutputSpec(_Strict):
    group: Annotated[str, AfterValidator(check_output_group)]
    port: Port | None = None
    interface: IfName | None = None
    ttl: Ttl | None = None
    #: "keep": the sender's source port; a number: that port; unset: the
    #: discovery protocol's need (kept for mDNS and SSDP), else the socket's own
    source_port: Annotated[int | str, PlainValidator(check_source_port)] | None = None
    #: "interface": the relay's address on the output interface; "sender":
    #: the original sender's (the relayed datagram is sent as if from it);
    #: unset: "sender" for SSDP, else "interface"
    source_address: Literal["interface", "sender"] | None = None


class RateLimit(_Strict):
    """Policing for one rule's input: datagrams beyond either rate are dropped and counted."""

    pps: Annotated[int, AfterValidator(lambda v: _positive(v, "datagrams per second"))] | None = None
    bps: Annotated[int, AfterValidator(lambda v: _positive(v, "bits per second"))] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> RateLimit:
        if self.pps is None and self.bps is None:
            raise ValueError("give pps, bps or both")
        return self


def _positive(value: int, what: str) -> int:
    if value < 1:
        raise ValueError(f"must be at least 1 {what}, got {value}")
    return value


class RuleKey(NamedTuple):
    """A rule's identity: its input. Two rules may never share one."""

    interface: str
    group: str
    port: int
    source: str | None

    def __str__(self) -> str:
        src = f" from {self.source}" if self.source else ""
        return f"{self.interface} {self.group}:{self.port}{src}"


@dataclass(frozen=True)
class Destination:
    """An output with every default filled in: what the data path sends to."""

    group: str
    port: int
    interface: str | None
    ttl: int
    #: the UDP source port: KEEP (the sender's), a number, or None (the
    #: output socket's own)
    source_port: int | str | None = None
    #: send as if from the original sender's address
    keep_source: bool = False

    @property
    def faithful(self) -> bool:
        """Whether each datagram's headers are built from the received one
        (sent through a raw socket), not left to a UDP socket."""
        return self.source_port is not None or self.keep_source

    @property
    def broadcast(self) -> bool:
        return self.group == LIMITED_BROADCAST

    def __str__(self) -> str:
        via = f" on {self.interface}" if self.interface else ""
        extra = ""
        if self.source_port is not None:
            extra += f" source port {self.source_port}"
        if self.keep_source:
            extra += " from the sender"
        return f"{self.group}:{self.port}{via} ttl {self.ttl}{extra}"


class RuleSpec(_Strict):
    name: Annotated[str, AfterValidator(check_name)] | None = None
    input: InputSpec
    outputs: list[OutputSpec] = Field(min_length=1)
    rate_limit: RateLimit | None = None
    #: relay in the kernel when it can ("auto") or always in user space
    #: ("off"); unset: [daemon] offload
    offload: Literal["auto", "off"] | None = None
    #: drop datagrams this host sent and datagrams seen again within
    #: LOOP_WINDOW (reflected by another relay); unset: on for rules that
    #: feed each other (two-way rules), off otherwise
    loop_guard: bool | None = None

    @property
    def key(self) -> RuleKey:
        i = self.input
        return RuleKey(i.interface, i.group, i.port, i.source)

    @property
    def discovery(self) -> Discovery | None:
        """The discovery protocol this rule relays, known by its input's group and port."""
        return DISCOVERY.get((self.input.group, self.input.port))

    def destinations(self) -> list[Destination]:
        result = []
        known = self.discovery
        for out in self.outputs:
            multicast = is_multicast(out.group)
            default_ttl = DEFAULT_MULTICAST_TTL if multicast else DEFAULT_UNICAST_TTL
            source_port: int | str | None = out.source_port
            if source_port is None and known is not None and known.keep_port:
                source_port = KEEP
            address = out.source_address
            if address is None:
                address = "sender" if known is not None and known.keep_address else "interface"
            result.append(
                Destination(
                    group=out.group,
                    port=out.port if out.port is not None else self.input.port,
                    interface=out.interface,
                    ttl=out.ttl if out.ttl is not None else default_ttl,
                    source_port=source_port,
                    keep_source=address == "sender",
                )
            )
        return result

    def display_name(self) -> str:
        return self.name if self.name is not None else str(self.key)


def rule_label(index: int, name: str | None) -> str:
    """How errors name a rule: by 1-based position, and by name when it has one."""
    return f"rule {index + 1} ({name!r})" if name else f"rule {index + 1}"


Labeler = Callable[[int, "RuleSpec"], str]


def _default_label(index: int, rule: RuleSpec) -> str:
    return rule_label(index, rule.name)


def check_rule_set(rules: list[RuleSpec], label: Labeler = _default_label) -> list[tuple[int, str]]:
    """Checks that involve more than one rule, or a rule and its own outputs.

    Returns (rule index, message) pairs; an empty list means the set is valid.
    `label` names another rule in a message (rules may come from several sources).
    """
    errors: list[tuple[int, str]] = []
    errors += _check_outputs_per_rule(rules)
    errors += _check_unique(rules, label)
    errors += _check_cycles(rules, label)
    return sorted(errors, key=lambda e: e[0])


def _check_outputs_per_rule(rules: list[RuleSpec]) -> list[tuple[int, str]]:
    errors = []
    for i, rule in enumerate(rules):
        seen: dict[tuple[str, int, str | None], int] = {}
        for j, dest in enumerate(rule.destinations()):
            where = f"outputs[{j}]"
            if is_multicast(dest.group) and dest.interface is None:
                errors.append((i, f"{where}: a multicast output needs an 'interface'"))
            if dest.broadcast and dest.interface is None:
                errors.append(
                    (i, f"{where}: a broadcast to {LIMITED_BROADCAST} needs an 'interface' to leave on")
                )
            if (
                dest.interface == rule.input.interface
                and dest.group == rule.input.group
                and dest.port == rule.input.port
            ):
                errors.append(
                    (
                        i,
                        f"{where}: output {dest.group}:{dest.port} on {dest.interface} is its own input",
                    )
                )
            ident = (dest.group, dest.port, dest.interface)
            if ident in seen:
                errors.append((i, f"{where}: same destination as outputs[{seen[ident]}]"))
            else:
                seen[ident] = j
    return errors


def _check_unique(rules: list[RuleSpec], label: Labeler) -> list[tuple[int, str]]:
    errors = []
    by_key: dict[RuleKey, int] = {}
    by_name: dict[str, int] = {}
    for i, rule in enumerate(rules):
        first = by_key.setdefault(rule.key, i)
        if first != i:
            errors.append((i, f"input {rule.key} is already used by {label(first, rules[first])}"))
        if rule.name is not None:
            first = by_name.setdefault(rule.name, i)
            if first != i:
                errors.append((i, f"name {rule.name!r} is already used by {label(first, rules[first])}"))
    return errors


def feeds(dest: Destination, key: RuleKey) -> bool:
    """Whether packets sent to `dest` could arrive as input of the rule `key`.

    The relay's sender address is not known statically, so a source-specific
    input is assumed to match; an output without an interface can leave on any.
    """
    return (
        dest.group == key.group
        and dest.port == key.port
        and (dest.interface is None or dest.interface == key.interface)
    )


def _feed_edges(rules: list[RuleSpec]) -> dict[int, list[int]]:
    """Which rules' outputs could arrive as which other rules' input (by index)."""
    by_input: dict[tuple[str, int], list[int]] = {}
    for j, rule in enumerate(rules):
        by_input.setdefault((rule.input.group, rule.input.port), []).append(j)
    edges: dict[int, list[int]] = {}
    for i, rule in enumerate(rules):
        targets: dict[int, None] = {}
        for dest in rule.destinations():
            for j in by_input.get((dest.group, dest.port), []):
                if j != i and feeds(dest, rules[j].key):
                    targets[j] = None
        edges[i] = list(targets)
    return edges


def _cycles(rules: list[RuleSpec]) -> list[tuple[set[int], dict[int, list[int]]]]:
    """Each set of two or more rules that feed each other, with its edges."""
    edges = _feed_edges(rules)
    return [
        (component, {k: [n for n in edges[k] if n in component] for k in component})
        for component in _strongly_connected(edges)
        if len(component) > 1
    ]


def loop_guarded(rules: list[RuleSpec]) -> set[RuleKey]:
    """The rules whose datagrams go through the loop guard: those that say
    so, and those that feed each other (two-way and N-way rules) unless they
    turn it off."""
    guarded = {r.key for r in rules if r.loop_guard}
    for component, _edges in _cycles(rules):
        guarded |= {rules[k].key for k in component if rules[k].loop_guard is None}
    return guarded


#: the interface on which mcrd hears what this host itself sends
LOOPBACK = "lo"


def _check_cycles(rules: list[RuleSpec], label: Labeler) -> list[tuple[int, str]]:
    """Rules that feed each other are relayed with the loop guard (see
    `loop_guarded`); a cycle is refused only where the guard cannot make it
    safe: when one of its rules turns the guard off, or when it runs through
    the loopback interface, where mcrd would hear its own output and relay
    it again at once. One error per cycle; linear in rules and outputs."""
    errors = []
    for component, edges in _cycles(rules):
        start = min(component)
        cycle = _find_cycle(start, edges)
        assert cycle is not None  # a strongly connected component of two or more has one
        path = " -> ".join(label(k, rules[k]) for k in [*cycle, cycle[0]])
        unguarded = sorted(k for k in component if rules[k].loop_guard is False)
        if any(rules[k].input.interface == LOOPBACK for k in component):
            errors.append(
                (
                    start,
                    f"rules feed each other in a cycle through {LOOPBACK}, "
                    f"where mcrd hears its own output: {path}",
                )
            )
        elif unguarded:
            errors.append(
                (
                    start,
                    f"rules feed each other in a cycle and {label(unguarded[0], rules[unguarded[0]])} "
                    f"turns the loop guard off (loop_guard = false): {path}",
                )
            )
    return errors


def _strongly_connected(edges: dict[int, list[int]]) -> list[set[int]]:
    """Tarjan's algorithm, without recursion (a rule set may be large)."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    found: list[set[int]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, pos = work.pop()
            if pos == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for k in range(pos, len(edges[node])):
                nxt = edges[node][k]
                if nxt not in index:
                    work.append((node, k + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def _find_cycle(start: int, edges: dict[int, list[int]]) -> list[int] | None:
    """A cycle through `start`, as the list of nodes in order, or None."""
    stack: list[tuple[int, list[int]]] = [(start, [start])]
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        for nxt in edges[node]:
            if nxt == start:
                return path
            if nxt not in visited:
                visited.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None
