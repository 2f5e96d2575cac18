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

from mcrd.loops import check_cycles

#: `source_port = "keep"` (the default): a relayed datagram leaves from the
#: sender's UDP source port, as through a router
KEEP = "keep"
#: `source_port = "ephemeral"`: from the output socket's own port (one the
#: kernel picked), whatever the sender's
EPHEMERAL = "ephemeral"

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
    if value in (KEEP, EPHEMERAL) and isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return check_port(value)
    raise ValueError(f'must be "keep", "ephemeral" or a port number from 1 to 65535, got {value!r}')


#: `ttl = "decrement"`: each datagram leaves with the TTL it came with, less
#: one, and one that came with 1 is not relayed (as a router does)
DECREMENT = "decrement"


def check_output_ttl(value: object) -> int | str:
    """An output's TTL: 1 to 255, or DECREMENT."""
    if value == DECREMENT and isinstance(value, str):
        return DECREMENT
    if isinstance(value, int) and not isinstance(value, bool):
        return check_ttl(value)
    raise ValueError(f'must be from 1 to 255 or "decrement", got {value!r}')


def check_dscp(value: int) -> int:
    if not 0 <= value <= 63:
        raise ValueError(f"must be from 0 to 63, got {value}")
    return value


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
    #: 1-255, or "decrement": the received TTL less one
    ttl: Annotated[int | str, PlainValidator(check_output_ttl)] | None = None
    #: "keep" (the default): the sender's source port; a number: that port;
    #: "ephemeral": the output socket's own
    source_port: Annotated[int | str, PlainValidator(check_source_port)] | None = None
    #: "interface": the relay's address on the output interface; "sender":
    #: the original sender's (the relayed datagram is sent as if from it);
    #: unset: "sender" for SSDP, else "interface"
    source_address: Literal["interface", "sender"] | None = None
    #: 0-63: the DSCP to send with (ECN is kept); unset: each datagram's own
    dscp: Annotated[int, AfterValidator(check_dscp)] | None = None


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
    ttl: int  # 0: the received TTL less one (ttl = "decrement")
    #: the UDP source port: KEEP (the sender's), a number, or None (the
    #: output socket's own)
    source_port: int | str | None = KEEP
    #: send as if from the original sender's address
    keep_source: bool = False
    dscp: int | None = None  # None: each datagram's own
    #: a discovery protocol's output: headers (and for mDNS the payload)
    #: built per datagram
    discovery: bool = False

    @property
    def faithful(self) -> bool:
        """Whether each datagram's headers are built from the received one
        (sent through a raw socket), not left to a UDP socket."""
        return self.discovery or isinstance(self.source_port, int) or self.keep_source or self.ttl == 0

    @property
    def keeps_port(self) -> bool:
        """A UDP output sending each datagram from the sender's port (through
        sockets the worker binds to it)."""
        return self.source_port == KEEP and not self.faithful

    @property
    def broadcast(self) -> bool:
        return self.group == LIMITED_BROADCAST

    def __str__(self) -> str:
        via = f" on {self.interface}" if self.interface else ""
        extra = ""
        if self.source_port is None:
            extra += f" source port {EPHEMERAL}"
        elif self.source_port != KEEP:
            extra += f" source port {self.source_port}"
        if self.keep_source:
            extra += " from the sender"
        if self.dscp is not None:
            extra += f" dscp {self.dscp}"
        return f"{self.group}:{self.port}{via} ttl {self.ttl or DECREMENT}{extra}"


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
            if source_port is None:
                source_port = KEEP if known is None or known.keep_port else None
            elif source_port == EPHEMERAL:
                source_port = None
            address = out.source_address
            if address is None:
                address = "sender" if known is not None and known.keep_address else "interface"
            result.append(
                Destination(
                    group=out.group,
                    port=out.port if out.port is not None else self.input.port,
                    interface=out.interface,
                    ttl=0 if out.ttl == DECREMENT else out.ttl if isinstance(out.ttl, int) else default_ttl,
                    source_port=source_port,
                    keep_source=address == "sender",
                    dscp=out.dscp,
                    discovery=known is not None,
                )
            )
        return result

    def display_name(self) -> str:
        return self.name if self.name is not None else str(self.key)


class ReflectSpec(_Strict):
    """Shorthand for rules that relay one group and port among several
    interfaces, every way: one rule per interface, whose outputs are the
    others. They feed each other, so they run under the loop guard."""

    name: Annotated[str, AfterValidator(check_name)] | None = None
    interfaces: list[IfName] = Field(min_length=2)
    group: Annotated[str, AfterValidator(check_input_group)]
    port: Port
    ttl: Ttl | None = None
    offload: Literal["auto", "off"] | None = None

    @model_validator(mode="after")
    def _check(self) -> ReflectSpec:
        if self.name is not None and len(self.name) > 48:
            raise ValueError(
                f"name must be at most 48 characters (rules add ':<interface>'), got {len(self.name)}"
            )
        if not (is_multicast(self.group) or self.group == LIMITED_BROADCAST):
            raise ValueError(f"group {self.group} must be a multicast group or {LIMITED_BROADCAST}")
        seen = [i for n, i in enumerate(self.interfaces) if i in self.interfaces[:n]]
        if seen:
            raise ValueError(f"interface {seen[0]!r} is listed twice")
        return self

    def rules(self) -> list[RuleSpec]:
        """The rules it stands for, one per interface, named `<name>:<interface>`."""
        base = self.name if self.name is not None else f"{self.group}:{self.port}"
        return [
            RuleSpec(
                name=f"{base}:{here}",
                input=InputSpec(interface=here, group=self.group, port=self.port),
                outputs=[
                    OutputSpec(group=self.group, interface=there, ttl=self.ttl)
                    for there in self.interfaces
                    if there != here
                ],
                offload=self.offload,
            )
            for here in self.interfaces
        ]


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
    errors += check_cycles(rules, label)
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
