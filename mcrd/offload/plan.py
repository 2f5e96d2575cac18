"""Offload planning: which rules the kernel relays, and with what.

Pure: values in (rules, modes, interfaces, how outputs leave, what the kernel
refused), an `OffloadPlan` out. No netlink, no bpf(2): `netlink.gather`
supplies the observations and `tc.Tc` carries the plan out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from mcrd.loops import loop_guarded
from mcrd.offload.programs import KernelOutput, KernelRule
from mcrd.rules import Destination, RuleKey, RuleSpec, is_multicast

OffloadMode = Literal["off", "auto"]
MAX_MTU = 65535


@dataclass(frozen=True)
class Iface:
    """What offloading needs to know of a network interface."""

    index: int
    name: str
    up: bool
    ethernet: bool
    mac: str
    mtu: int
    bridge_port: bool = False  # a port of a bridge, which takes its frames


@dataclass(frozen=True)
class Egress:
    """How the kernel would send to one destination: from which interface,
    addresses, to which next-hop MAC; or why that is not known."""

    iface: Iface | None = None
    src_ip: str = ""
    dst_mac: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Decision:
    """Whether a rule is relayed in the kernel, and if not, why (shown by
    `mcrctl list` as its path reason)."""

    kernel: bool
    reason: str = ""


#: The rules offloaded on one input interface, each with its key.
Program = tuple[tuple[RuleKey, KernelRule], ...]


@dataclass(frozen=True)
class Attachment:
    """What goes on one input interface: its dispatcher's rules, in lookup order."""

    index: int
    name: str
    rules: Program


@dataclass
class OffloadPlan:
    """The outcome of planning: a decision per rule, and per input interface
    (by index) what the kernel should hold."""

    decisions: dict[RuleKey, Decision] = field(default_factory=dict)
    programs: dict[int, Attachment] = field(default_factory=dict)

    def shape(self) -> tuple[Attachment, ...]:
        """What the kernel holds for this plan: equal shapes need no change."""
        return tuple(self.programs[i] for i in sorted(self.programs))


def multicast_mac(group: str) -> str:
    low = int(ipaddress.IPv4Address(group)) & 0x7FFFFF
    return f"01:00:5e:{low >> 16:02x}:{(low >> 8) & 0xFF:02x}:{low & 0xFF:02x}"


def plan_offload(
    specs: Iterable[RuleSpec],
    mode_of: Mapping[RuleKey, OffloadMode],
    ifaces: Mapping[str, Iface],
    egress: Mapping[Destination, Egress],
    unavailable: str = "",
    refused: Mapping[RuleKey, str] | None = None,
) -> OffloadPlan:
    """Decide which rules the kernel relays and what each input interface's
    programs hold. `unavailable`: why the kernel can relay nothing (""
    if it can); `refused`: rules whose program the kernel would not take,
    and why."""
    specs = list(specs)
    guarded = loop_guarded(specs)
    why = {
        s.key: _why_not(s, mode_of, ifaces, egress, unavailable, refused or {}, s.key in guarded)
        for s in specs
    }
    # A source-specific rule in user space needs its datagrams to reach the
    # worker: the kernel must not relay them by the catch-all of the same
    # group and port, so that stays in user space too.
    held = {
        (s.input.interface, s.input.group, s.input.port): s.input.source
        for s in specs
        if s.input.source and why[s.key]
    }
    result = OffloadPlan()
    found: dict[str, list[tuple[int, RuleKey, KernelRule]]] = {}
    for spec in specs:
        key, inp = spec.key, spec.input
        source = held.get((inp.interface, inp.group, inp.port))
        if not why[key] and not inp.source and source:
            why[key] = f"the rule for source {source} of the same group and port is in user space"
        if why[key]:
            result.decisions[key] = Decision(False, why[key])
            continue
        result.decisions[key] = Decision(True)
        found.setdefault(inp.interface, []).append((0 if inp.source else 1, key, kernel_rule(spec, egress)))
    for name, rules in found.items():
        iface = ifaces[name]
        ordered = tuple((key, rule) for _order, key, rule in sorted(rules, key=lambda r: r[0]))
        result.programs[iface.index] = Attachment(iface.index, iface.name, ordered)
    return result


def kernel_rule(spec: RuleSpec, egress: Mapping[Destination, Egress]) -> KernelRule:
    """A rule whose every output has a known egress, as its program sees it."""
    outputs, mtu = [], MAX_MTU
    for dest in spec.destinations():
        out = egress[dest]
        assert out.iface is not None
        via = out.iface
        outputs.append(
            KernelOutput(via.index, via.mac, out.dst_mac, out.src_ip, dest.group, dest.port, dest.ttl)
        )
        mtu = min(mtu, via.mtu)
    inp = spec.input
    return KernelRule(inp.group, inp.port, inp.source, mtu, tuple(outputs))


def _why_not(
    spec: RuleSpec,
    mode_of: Mapping[RuleKey, OffloadMode],
    ifaces: Mapping[str, Iface],
    egress: Mapping[Destination, Egress],
    unavailable: str,
    refused: Mapping[RuleKey, str],
    guarded: bool = False,
) -> str:
    """Why a rule stays in user space; "" if the kernel can relay it."""
    if mode_of.get(spec.key, "off") == "off":
        return "offload is off"
    if unavailable:
        return unavailable
    if spec.rate_limit is not None:
        return "rate limits are policed in user space"
    if guarded:
        return "the loop guard runs in user space"
    known = spec.discovery
    if known is not None and known.name == "mdns":
        return "mDNS queries are rewritten in user space (unicast-response questions)"
    for dest in spec.destinations():
        if dest.keep_source:
            return f"output {dest} keeps the sender's address, which user space does"
        if isinstance(dest.source_port, int):
            return f"output {dest} sets the source port, which user space does"
        if dest.source_port is None:
            return f"output {dest} sends from an ephemeral port, which user space does"
        if dest.dscp is not None:
            return f"output {dest} sets DSCP, which user space does"
        if dest.ttl == 0:
            return f"output {dest} decrements the TTL, which user space does"
    iface = ifaces.get(spec.input.interface)
    if iface is None:
        return f"no interface named {spec.input.interface!r}"
    if not iface.ethernet:
        return f"input {iface.name} is not an Ethernet interface"
    if iface.bridge_port:
        return f"input {iface.name} is a bridge port"
    for dest in spec.destinations():
        if dest.interface is None:
            return f"output {dest} names no interface"
        out = egress.get(dest)
        if out is None or out.problem:
            return f"output {dest}: {out.problem if out else 'not looked up yet'}"
    return refused.get(spec.key, "")


BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"


def egress_for(
    dest: Destination,
    ifaces: Mapping[str, Iface],
    addresses: Mapping[int, list[str]],
    route: tuple[str, str] | None,
    neighbours: Mapping[tuple[int, str], str],
    broadcast: bool = False,
) -> Egress:
    """How `dest` leaves: `route` is (source address, next hop) as the
    kernel's route lookup gave them for a unicast destination, `addresses`
    the interfaces' IPv4 addresses in the kernel's order, `neighbours` the
    resolved link-layer addresses by (interface index, address);
    `broadcast`: the route to `dest` is a subnet's broadcast."""
    if dest.interface is None:
        return Egress(problem="names no interface")
    iface = ifaces.get(dest.interface)
    if iface is None:
        return Egress(problem=f"no interface named {dest.interface!r}")
    if not iface.ethernet:
        return Egress(problem=f"{iface.name} is not an Ethernet interface")
    if is_multicast(dest.group) or dest.broadcast:
        own = addresses.get(iface.index, [])
        if not own:
            return Egress(problem=f"{iface.name} has no IPv4 address")
        return Egress(iface, own[0], BROADCAST_MAC if dest.broadcast else multicast_mac(dest.group))
    if route is None:
        return Egress(problem=f"no route to {dest.group} on {iface.name}")
    source, hop = route
    if broadcast:
        return Egress(iface, source, BROADCAST_MAC)
    mac = neighbours.get((iface.index, hop))
    if mac is None:
        return Egress(problem=f"next hop {hop} is not resolved yet")
    return Egress(iface, source, mac)
