"""Kernel offload: rules relayed by an nftables netdev ingress chain.

For a rule that can be offloaded, mcrd installs one nftables rule in the
ingress chain of its input interface. It matches the rule's datagrams
(plain IPv4 without options, not a fragment, UDP to the group and port,
from the source if one is given, no longer than the smallest output MTU)
before the IP stack or any packet socket sees them, and for each output
rewrites the Ethernet and IP/UDP headers (`... set`, which keeps both
checksums valid), counts, and transmits a copy with `dup to`; the last
output takes the original with `fwd to`. So the datagram is consumed: it
reaches neither user space nor the host's IP stack, and an application on
the relay host that joined the same group gets nothing (rewriting happens
in place, and nftables cannot put back the original source address). A
rule whose input is also wanted locally keeps `offload = "off"`. Nothing is
compiled: `nft` loads the rules, atomically.

Everything mcrd installs lives in one table, `netdev mcrd`, which it
replaces whole in one transaction whenever the wanted rules change (packets
see the old table or the new one, never neither), seeds the new table's
counters with the old ones' values, deletes at exit, and deletes at start
should a crash have left it. Nothing outside that table is touched.

This module's planning and rendering are pure; `Nft` runs the `nft` command
and `gather` asks netlink how each output would be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mcrd.rulebook import rule_id
from mcrd.rules import Destination, RuleSpec, is_multicast

log = logging.getLogger("mcrd.offload")

OffloadMode = Literal["off", "auto"]
TABLE = "mcrd"
REMOVE = f"table netdev {TABLE}\ndelete table netdev {TABLE}\n"  # whether it exists or not
PRIORITY = -500  # before the usual ingress chains: what we relay, we consume
HEADERS = 28  # IPv4 without options + UDP: nft counts IP bytes, mcrd payload bytes
ARPHRD_ETHER = 1


@dataclass(frozen=True)
class Port:
    """What offloading needs to know of an interface."""

    index: int
    name: str
    up: bool
    ethernet: bool
    mac: str
    mtu: int


@dataclass(frozen=True)
class Egress:
    """How the kernel would send to one destination: from which interface,
    addresses, to which next-hop MAC; or why that is not known."""

    port: Port | None = None
    src_ip: str = ""
    dst_mac: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Decision:
    kernel: bool
    reason: str = ""  # why the rule stays in user space


@dataclass
class Plan:
    decisions: dict[str, Decision] = field(default_factory=dict)  # by rule key
    # input interface -> its nft rules; each names its counters
    chains: dict[Port, list[str]] = field(default_factory=dict)
    counters: list[str] = field(default_factory=list)

    def transaction(self, installed: Plan | None) -> str:
        """An nft script taking the table from `installed` (None: nothing of
        ours) to this plan in one atomic transaction. Only the chains (input
        interfaces) whose rules changed are replaced, whole; counters that
        stay keep their values, so nothing is lost to a reload; the table
        goes when nothing is left in it."""
        before = installed.chains if installed else {}
        lines = [f"add table netdev {TABLE}"]
        lines += [f"add counter netdev {TABLE} {name}" for name in self.counters]
        for port in sorted(before, key=lambda p: p.index):
            if self.chains.get(port) == before[port]:
                continue  # unchanged: not touched at all
            name = f"in_{port.index}"
            # `add` first: on kernels that drop a chain with its device, it is back to be deleted
            lines += [f"add chain netdev {TABLE} {name}", f"flush chain netdev {TABLE} {name}"]
            lines.append(f"delete chain netdev {TABLE} {name}")
        for port, rules in sorted(self.chains.items(), key=lambda item: item[0].index):
            if before.get(port) == rules:
                continue
            chain = f"in_{port.index}"
            lines.append(
                f"add chain netdev {TABLE} {chain} "
                f'{{ type filter hook ingress device "{port.name}" priority {PRIORITY}; policy accept; }}'
            )
            lines += [f"add rule netdev {TABLE} {chain} {rule}" for rule in rules]
        stale = sorted(set(installed.counters) - set(self.counters)) if installed else []
        lines += [f"delete counter netdev {TABLE} {name}" for name in stale]
        if not self.chains:
            lines.append(f"delete table netdev {TABLE}")
        return "\n".join(lines) + "\n"

    def shape(self) -> str:
        """What the kernel holds for this plan: equal shapes need no change."""
        return self.transaction(None)


def multicast_mac(group: str) -> str:
    low = int(ipaddress.IPv4Address(group)) & 0x7FFFFF
    return f"01:00:5e:{low >> 16:02x}:{(low >> 8) & 0xFF:02x}:{low & 0xFF:02x}"


def rule_counter(spec: RuleSpec) -> str:
    return f"r_{rule_id(spec.key)}"


def output_counter(spec: RuleSpec, n: int) -> str:
    return f"o_{rule_id(spec.key)}_{n}"


def plan(
    specs: Iterable[RuleSpec],
    mode_of: dict[str, OffloadMode],
    ports: dict[str, Port],
    egress: dict[Destination, Egress],
    unavailable: str = "",
) -> Plan:
    """Decide which rules the kernel relays and render their nft rules."""
    result = Plan()
    chains: dict[str, list[tuple[int, str]]] = {}
    for spec in specs:
        key = str(spec.key)
        if mode_of.get(key, "off") == "off":
            result.decisions[key] = Decision(False, "offload is off")
            continue
        why = unavailable or _why_not(spec, ports, egress)
        if why:
            result.decisions[key] = Decision(False, why)
            continue
        result.decisions[key] = Decision(True)
        inp = spec.input
        dests = spec.destinations()
        outs = [egress[d] for d in dests]
        mtu = min(o.port.mtu for o in outs if o.port)
        match = [
            "ip hdrlength 5",
            "ip frag-off & 0x3fff == 0",
            f"ip daddr {inp.group}",
            "ip protocol udp",
            f"udp dport {inp.port}",
        ]
        if inp.source:
            match.append(f"ip saddr {inp.source}")
        match.append(f"ip length <= {mtu}")  # larger ones go to user space, which fragments
        parts = [*match, f'counter name "{rule_counter(spec)}"']
        for n, (dest, out) in enumerate(zip(dests, outs, strict=True)):
            assert out.port is not None
            parts += [
                f"ether saddr set {out.port.mac}",
                f"ether daddr set {out.dst_mac}",
                f"ip saddr set {out.src_ip}",
                f"ip daddr set {dest.group}",
                f"udp dport set {dest.port}",
                f"ip ttl set {dest.ttl}",
                f'counter name "{output_counter(spec, n)}"',
                f'{"fwd" if n == len(dests) - 1 else "dup"} to "{out.port.name}"',
            ]
            result.counters.append(output_counter(spec, n))
        result.counters.append(rule_counter(spec))
        # source-specific rules before the catch-all of the same group and port
        chains.setdefault(inp.interface, []).append((0 if inp.source else 1, " ".join(parts)))
    for name, rules in chains.items():
        result.chains[ports[name]] = [text for _order, text in sorted(rules, key=lambda r: r[0])]
    result.counters.sort()
    return result


def _why_not(spec: RuleSpec, ports: dict[str, Port], egress: dict[Destination, Egress]) -> str:
    if spec.rate_limit is not None:
        return "rate limits are policed in user space"
    port = ports.get(spec.input.interface)
    if port is None:
        return f"no interface named {spec.input.interface!r}"
    if not port.ethernet:
        return f"input {port.name} is not an Ethernet interface"
    for dest in spec.destinations():
        if dest.interface is None:
            return f"output {dest} names no interface"
        out = egress.get(dest)
        if out is None or out.problem:
            return f"output {dest}: {out.problem if out else 'not looked up yet'}"
    return ""


def egress_for(
    dest: Destination,
    ports: dict[str, Port],
    addresses: dict[int, list[str]],
    route: tuple[str, str] | None,
    neighbours: dict[tuple[int, str], str],
) -> Egress:
    """How `dest` leaves: `route` is (source address, next hop) as the
    kernel's route lookup gave them for a unicast destination, `addresses`
    the interfaces' IPv4 addresses in the kernel's order, `neighbours` the
    resolved link-layer addresses by (interface index, address)."""
    if dest.interface is None:
        return Egress(problem="names no interface")
    port = ports.get(dest.interface)
    if port is None:
        return Egress(problem=f"no interface named {dest.interface!r}")
    if not port.ethernet:
        return Egress(problem=f"{port.name} is not an Ethernet interface")
    if is_multicast(dest.group):
        own = addresses.get(port.index, [])
        if not own:
            return Egress(problem=f"{port.name} has no IPv4 address")
        return Egress(port, own[0], multicast_mac(dest.group))
    if route is None:
        return Egress(problem=f"no route to {dest.group} on {port.name}")
    source, hop = route
    mac = neighbours.get((port.index, hop))
    if mac is None:
        return Egress(problem=f"next hop {hop} is not resolved yet")
    return Egress(port, source, mac)


# -- the adapters: netlink lookups and the nft command -------------------------

NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


def gather(specs: list[RuleSpec]) -> tuple[dict[str, Port], dict[Destination, Egress]]:
    """Ask the kernel (netlink) about interfaces, addresses, routes and
    neighbours for these rules. Blocking: run it in a thread."""
    from pyroute2 import IPRoute

    ports: dict[str, Port] = {}
    addresses: dict[int, list[str]] = {}
    neighbours: dict[tuple[int, str], str] = {}
    routes: dict[Destination, tuple[str, str] | None] = {}
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            ports[name] = Port(
                msg["index"],
                name,
                bool(msg["flags"] & 1),
                msg.get("ifi_type") == ARPHRD_ETHER and bool(msg.get_attr("IFLA_ADDRESS")),
                msg.get_attr("IFLA_ADDRESS") or "",
                msg.get_attr("IFLA_MTU") or 1500,
            )
        for msg in ipr.get_addr(family=2):
            if msg.get("flags", 0) & 0x01:  # IFA_F_SECONDARY: the kernel sends from a primary
                continue
            addresses.setdefault(msg["index"], []).append(msg.get_attr("IFA_LOCAL") or "")
        wanted = {d for s in specs for d in s.destinations() if d.interface and not is_multicast(d.group)}
        for dest in wanted:
            port = ports.get(dest.interface or "")
            if port is None:
                continue
            try:
                (found,) = ipr.route("get", dst=dest.group, oif=port.index)
            except Exception:  # no route: the rule stays in user space and says so
                routes[dest] = None
                continue
            routes[dest] = (
                found.get_attr("RTA_PREFSRC") or "",
                found.get_attr("RTA_GATEWAY") or dest.group,
            )
        for msg in ipr.get_neighbours(family=2):
            mac = msg.get_attr("NDA_LLADDR")
            if mac and msg.get("state", 0) & NUD_USABLE:
                neighbours[msg["ifindex"], msg.get_attr("NDA_DST")] = mac
    egress = {
        d: egress_for(d, ports, addresses, routes.get(d), neighbours) for s in specs for d in s.destinations()
    }
    return ports, egress


class Nft:
    """Runs `nft` for the table mcrd owns."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("nft") or ""

    @property
    def missing(self) -> str:
        return "" if self.binary else "nftables (the nft command) is not installed"

    async def run(self, *args: str, script: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.binary,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await proc.communicate(script.encode() if script is not None else None)
        except BaseException:  # cancelled (mcrd stopping): nft finishes its transaction alone
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if proc.returncode != 0:
            raise OSError(f"nft {' '.join(args)}: {err.decode(errors='replace').strip()}")
        return out.decode()

    async def apply(self, script: str) -> None:
        await self.run("-f", "-", script=script)

    async def counters(self) -> dict[str, tuple[int, int]]:
        """Our table's counters; empty when there is no table."""
        try:
            text = await self.run("-j", "list", "counters", "table", "netdev", TABLE)
        except OSError:
            return {}
        return parse_counters(text)

    async def remove(self) -> None:
        await self.apply(REMOVE)


def parse_counters(text: str) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    try:
        items = json.loads(text).get("nftables", [])
    except (ValueError, AttributeError):
        return found
    for item in items:
        c: Any = item.get("counter") if isinstance(item, dict) else None
        if isinstance(c, dict) and c.get("table") == TABLE and isinstance(c.get("name"), str):
            packets, octets = c.get("packets", 0), c.get("bytes", 0)
            if isinstance(packets, int) and isinstance(octets, int):
                found[c["name"]] = (packets, octets)
    return found
