"""Input ports: one per input interface, with its sockets and lanes.

A port holds the interface's packet sockets (one per lane; several lanes
share a PACKET_FANOUT group), the group memberships and unicast sinks its
rules need, and what its workers counted. `plan_port` is the pure part: from
the port's rules, the observed interface and what the port holds now, it
decides whether to open, update in place, reopen or close, and which groups
to join and leave, which sinks to open and close, and which filter to swap
in. The functions below it carry a plan out with a `NetIO`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from mcrd.bpf_classic import FilterPrecision
from mcrd.counters import Counts, Ledger
from mcrd.links import Link
from mcrd.netio import RingSpec
from mcrd.packet import FilterEntry, ip_to_int
from mcrd.rules import RuleSpec, is_multicast
from mcrd.supervisor.seams import NetIO

if TYPE_CHECKING:
    from mcrd.supervisor.workers import WorkerHandle
    from mcrd.wire import Configure

Membership = tuple[str, str | None]  # (group, source)
Sink = tuple[str, int]  # (local unicast address, UDP port)


class PortState(StrEnum):
    """A port's or a lane's state, as the control socket shows it."""

    STARTING = "starting"
    ACTIVE = "active"
    RESTARTING = "restarting"
    FAILED = "failed"  # its worker failed to boot: not retried until the rules change
    PENDING = "pending"  # closed: no interface, or its sockets could not be opened


class PortAction(Enum):
    OPEN = "open"
    UPDATE = "update"  # in place: unchanged flows lose nothing
    REOPEN = "reopen"  # the interface was replaced
    CLOSE = "close"


@dataclass(frozen=True)
class Held:
    """What an input port holds: the index of the interface its sockets are
    bound to (None: closed), the filter programmed, the groups joined and
    the sinks open."""

    ifindex: int | None = None
    entries: frozenset[FilterEntry] = frozenset()
    memberships: frozenset[Membership] = frozenset()
    sinks: frozenset[Sink] = frozenset()


@dataclass(frozen=True)
class PortPlan:
    """What to do to a port. For UPDATE, `narrow` is the filter to attach
    before the workers get their new tables (nothing the new tables lack
    reaches them) and `entries` the one after; None when the filter stays."""

    action: PortAction
    reason: str = ""
    entries: frozenset[FilterEntry] = frozenset()
    narrow: frozenset[FilterEntry] | None = None
    join: frozenset[Membership] = frozenset()
    leave: frozenset[Membership] = frozenset()
    open_sinks: frozenset[Sink] = frozenset()
    close_sinks: frozenset[Sink] = frozenset()


def filter_entries(specs: Iterable[RuleSpec]) -> frozenset[FilterEntry]:
    return frozenset(
        FilterEntry(
            ip_to_int(s.input.group), s.input.port, ip_to_int(s.input.source) if s.input.source else None
        )
        for s in specs
    )


def plan_port(interface: str, rules: list[RuleSpec], link: Link | None, held: Held) -> PortPlan:
    """Converge a port on its rules and its interface as observed."""
    if link is None:
        return PortPlan(PortAction.CLOSE, f"no interface named {interface!r}")
    if link.bridge is not None:
        # The bridge takes a port's frames before a packet socket bound to the
        # port sees them: an input there would show active and relay nothing.
        return PortPlan(
            PortAction.CLOSE,
            f"{interface} is a port of bridge {link.bridge}, which takes its frames: "
            f"use {link.bridge} (or a VLAN device on it) as the input",
        )
    entries = filter_entries(rules)
    groups = frozenset((s.input.group, s.input.source) for s in rules if is_multicast(s.input.group))
    sinks = frozenset((s.input.group, s.input.port) for s in rules if not is_multicast(s.input.group))
    if held.ifindex is None or held.ifindex != link.index:
        action = PortAction.OPEN if held.ifindex is None else PortAction.REOPEN
        reason = "" if held.ifindex is None else "interface replaced"
        return PortPlan(action, reason, entries, join=groups, open_sinks=sinks)
    changed = entries != held.entries
    return PortPlan(
        PortAction.UPDATE,
        entries=entries,
        narrow=held.entries & entries if changed else None,
        join=groups - held.memberships,
        leave=held.memberships - groups,
        open_sinks=sinks - held.sinks,
        close_sinks=held.sinks - sinks,
    )


@dataclass
class Lane:
    """One packet socket of an input port and the worker that reads its ring.

    A port has one lane, or several in a PACKET_FANOUT group that spreads
    flows over them by hash (each flow stays in order on one worker).
    """

    index: int
    sock: socket.socket
    ring: RingSpec = field(default_factory=RingSpec)  # the geometry its ring was made with
    worker: WorkerHandle | None = None
    sent: Configure | None = None  # what the worker was last configured with
    failed_with: Configure | None = None  # what its worker failed to boot on
    state: PortState = PortState.STARTING
    reason: str = ""
    restarts: int = 0
    ledger: Ledger = field(default_factory=Ledger)  # its workers' counts, over generations
    task: asyncio.Task[None] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # first start tried

    def live_worker(self) -> WorkerHandle | None:
        return self.worker if self.worker is not None and not self.worker.closed else None


@dataclass
class InputPort:
    """Everything for one input interface: its sockets, its lanes, its counts.

    Lives as long as some rule names the interface; open while the
    interface exists, pending otherwise.
    """

    interface: str
    rules: list[RuleSpec] = field(default_factory=list)
    ifindex: int | None = None
    lanes: list[Lane] = field(default_factory=list)
    precision: FilterPrecision = FilterPrecision.EXACT
    programmed: frozenset[FilterEntry] = frozenset()
    memberships: dict[Membership, socket.socket] = field(default_factory=dict)
    sinks: dict[Sink, socket.socket] = field(default_factory=dict)
    reason: str = ""
    ledger: Ledger = field(default_factory=Ledger)  # what closed lanes counted
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when closed

    @property
    def open(self) -> bool:
        return bool(self.lanes)

    def held(self) -> Held:
        return Held(self.ifindex, self.programmed, frozenset(self.memberships), frozenset(self.sinks))

    @property
    def state(self) -> PortState:
        if not self.lanes:
            return PortState.PENDING
        return next((lane.state for lane in self.lanes if lane.state != PortState.ACTIVE), PortState.ACTIVE)

    @property
    def why(self) -> str:
        if not self.lanes or self.reason:
            return self.reason
        return next((lane.reason for lane in self.lanes if lane.state != PortState.ACTIVE), "")

    def workers(self) -> list[WorkerHandle]:
        return [w for lane in self.lanes if (w := lane.live_worker()) is not None]

    async def wait_settled(self) -> None:
        if self.lanes:
            await asyncio.gather(*(lane.settled.wait() for lane in self.lanes))
        else:
            await self.settled.wait()

    def total(self) -> Counts:
        total = self.ledger.total()
        for lane in self.lanes:
            total = total + lane.ledger.total()
        return total

    def retire_lanes(self) -> None:
        """The lanes are closing: what they counted stays with the port."""
        for lane in self.lanes:
            self.ledger.absorb(lane.ledger.total())
            lane.ledger = Ledger()
        self.retain()

    def retain(self) -> None:
        """Forget what was carried for rules the port no longer has."""
        keys = [s.key for s in self.rules]
        for ledger in (self.ledger, *(lane.ledger for lane in self.lanes)):
            ledger.retain(keys)


def open_lanes(port: InputPort, link: Link, plan: PortPlan, net: NetIO, ring: RingSpec, lanes: int) -> None:
    """Open the port's packet sockets and what its rules hold; on failure
    nothing stays open and OSError says why."""
    try:
        fanout: int | None = None
        shaped = ring.for_mtu(link.mtu)
        for index in range(lanes):
            sock, port.precision = net.open_packet_socket(port.interface, plan.entries, shaped)
            port.lanes.append(Lane(index, sock, shaped))
            if lanes > 1:
                fanout = net.join_fanout(sock, fanout)
        port.programmed = plan.entries
        port.ifindex = link.index
        sync_holds(port, plan, net)
    except OSError:
        close_sockets(port)
        raise


def sync_holds(port: InputPort, plan: PortPlan, net: NetIO) -> None:
    """Join and leave groups, open and close unicast sinks, as planned."""
    for group, source in plan.join:
        port.memberships[group, source] = net.join_group(port.interface, group, source)
    for stale in plan.leave:
        port.memberships.pop(stale).close()  # leaves the group
    for address, number in plan.open_sinks:
        sink = net.open_sink(address, number)
        if sink is not None:  # else the address is not local (yet): tried again next pass
            port.sinks[address, number] = sink
    for unused in plan.close_sinks:
        port.sinks.pop(unused).close()


def swap_filter(port: InputPort, entries: frozenset[FilterEntry], net: NetIO) -> None:
    for lane in port.lanes:
        port.precision = net.attach_best_filter(lane.sock, entries)


def close_sockets(port: InputPort) -> None:
    for sock in port.memberships.values():
        sock.close()
    port.memberships.clear()
    for sink in port.sinks.values():
        sink.close()
    port.sinks.clear()
    for lane in port.lanes:
        lane.sock.close()
    port.lanes.clear()
    port.ifindex = None
    port.programmed = frozenset()
