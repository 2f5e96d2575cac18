"""Kernel offload: rules relayed by eBPF programs at tc ingress.

For the rules that can be offloaded, mcrd attaches a dispatcher program to
the tc ingress hook of each input interface (through a `clsact` qdisc) and
loads one program per rule (see `mcrd.ebpf`, which assembles them: nothing
is compiled). Before the IP stack or any packet socket sees a datagram,
the dispatcher finds its rule by (group, port, source) in a hash map and
hands it to the rule's program, which takes it if it is no longer than the
smallest output MTU and, for each output, rewrites the Ethernet and IP/UDP
headers with both checksums kept valid, counts, and transmits a clone to
every output but the last, which takes the datagram itself. So the
datagram is consumed: it reaches neither user space nor the host's IP
stack, and an application on the relay host that joined the same group
gets nothing. A rule whose input is also wanted locally keeps
`offload = "off"`.

What mcrd installs is one tc filter per input interface, of kind `bpf`,
named `mcrd:<interface>`, at priority 1 of the ingress hook (and the
`clsact` qdisc, if the interface had none). Reconciling works rule by rule,
as for workers: a new rule's program is added, a changed rule's replaced in
one atomic update (its datagrams meet the old program or the new one, never
neither, and its counters carry over), a removed rule's deleted; the other
rules are not touched. At exit mcrd deletes its filters, and the qdiscs it
created if nothing else uses them; at start it deletes filters named
`mcrd:` that a crash left behind. No other filter or qdisc is touched.

This module's planning is pure; `gather` asks netlink how each output
would be sent, and `Tc` loads and attaches the programs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Literal

from mcrd import ebpf
from mcrd.rules import Destination, RuleSpec, is_multicast

log = logging.getLogger("mcrd.offload")

OffloadMode = Literal["off", "auto"]
ARPHRD_ETHER = 1
FILTER_PREFIX = "mcrd:"
PRIO = 1  # first on the hook: what we relay, we consume
HANDLE = 1
ETH_P_IP = 0x0800
INGRESS_CLSACT = 0xFFFFFFF2  # clsact's ingress hook
INGRESS_QDISC = 0xFFFF0000  # the older `ingress` qdisc's, if the interface has that instead
EGRESS_CLSACT = 0xFFFFFFF3


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


#: The rules offloaded on one input interface, each with the
#: key its counters are reported under.
Program = tuple[tuple[str, ebpf.KernelRule], ...]


@dataclass(frozen=True)
class Attachment:
    """What goes on one input interface."""

    index: int
    name: str
    rules: Program


@dataclass
class Plan:
    decisions: dict[str, Decision] = field(default_factory=dict)  # by rule key
    programs: dict[int, Attachment] = field(default_factory=dict)  # by input interface index

    def shape(self) -> tuple[Attachment, ...]:
        """What the kernel holds for this plan: equal shapes need no change."""
        return tuple(self.programs[i] for i in sorted(self.programs))


def multicast_mac(group: str) -> str:
    low = int(ipaddress.IPv4Address(group)) & 0x7FFFFF
    return f"01:00:5e:{low >> 16:02x}:{(low >> 8) & 0xFF:02x}:{low & 0xFF:02x}"


def plan(
    specs: Iterable[RuleSpec],
    mode_of: dict[str, OffloadMode],
    ports: dict[str, Port],
    egress: dict[Destination, Egress],
    unavailable: str = "",
    refused: dict[str, str] | None = None,
) -> Plan:
    """Decide which rules the kernel relays and what each input interface's
    programs hold. `refused`: rules (by key) whose program the kernel
    would not take, and why."""
    specs = list(specs)
    why: dict[str, str] = {}
    for spec in specs:
        key = str(spec.key)
        if mode_of.get(key, "off") == "off":
            why[key] = "offload is off"
        else:
            why[key] = unavailable or _why_not(spec, ports, egress) or (refused or {}).get(key, "")
    # A source-specific rule in user space needs its datagrams to reach the
    # worker: the kernel must not relay them by the catch-all of the same
    # group and port, so that stays in user space too.
    held = {
        (s.input.interface, s.input.group, s.input.port): s.input.source
        for s in specs
        if s.input.source and why[str(s.key)]
    }
    result = Plan()
    found: dict[str, list[tuple[int, str, ebpf.KernelRule]]] = {}
    for spec in specs:
        key, inp = str(spec.key), spec.input
        source = held.get((inp.interface, inp.group, inp.port))
        if not why[key] and not inp.source and source:
            why[key] = f"the rule for source {source} of the same group and port is in user space"
        if why[key]:
            result.decisions[key] = Decision(False, why[key])
            continue
        result.decisions[key] = Decision(True)
        outputs, mtu = [], 65535
        for dest in spec.destinations():
            out = egress[dest]
            assert out.port is not None
            via = out.port
            rewrite = (out.src_ip, dest.group, dest.port, dest.ttl)
            outputs.append(ebpf.Output(via.index, via.mac, out.dst_mac, *rewrite))
            mtu = min(mtu, out.port.mtu)
        rule = ebpf.KernelRule(inp.group, inp.port, inp.source, mtu, tuple(outputs))
        found.setdefault(inp.interface, []).append((0 if inp.source else 1, key, rule))
    for name, rules in found.items():
        port = ports[name]
        ordered = tuple((key, rule) for _order, key, rule in sorted(rules, key=lambda r: r[0]))
        result.programs[port.index] = Attachment(port.index, port.name, ordered)
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


# -- the adapters: netlink lookups, and the programs in the kernel --------------

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


CAPACITY = 65536  # rules per input interface the kernel's table and program array hold

Counts = list[tuple[int, int]]  # (packets, payload bytes): the rule's, then each output's


@dataclass
class RuleLoaded:
    """A rule in the kernel: its index in the program array (which holds
    the program itself) and its counters."""

    rule: ebpf.KernelRule
    index: int
    counters_fd: int

    def close(self) -> None:
        _close(self.counters_fd)

    def read(self) -> Counts:
        (words,) = ebpf.read_counters(self.counters_fd, 1, ebpf.slot_size(self.rule))
        return [(words[2 * i], words[2 * i + 1]) for i in range(1 + len(self.rule.outputs))]


@dataclass
class Hooked:
    """An input interface with mcrd's dispatcher attached."""

    index: int
    name: str
    parent: int
    created_qdisc: bool
    dispatch_fd: int
    table_fd: int
    programs_fd: int
    rules: dict[str, RuleLoaded] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)  # indexes given back, reused first
    next_index: int = 0

    def take_index(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.next_index >= CAPACITY:
            return None
        self.next_index += 1
        return self.next_index - 1

    def close(self) -> None:
        for loaded in self.rules.values():
            loaded.close()
        _close(self.dispatch_fd, self.table_fd, self.programs_fd)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Tc:
    """Loads the programs and attaches them at tc ingress; adds, replaces
    and removes rules' programs one by one. Blocking (bpf(2) and netlink):
    the supervisor calls it from a thread, and a lock keeps calls apart."""

    def __init__(self) -> None:
        self.hooked: dict[int, Hooked] = {}  # by interface index
        self.carried: dict[str, Counts] = {}  # counts of rules' programs since replaced
        self.refused: dict[tuple[int, str, ebpf.KernelRule], str] = {}  # not retried until changed
        self.unhookable: dict[Attachment, str] = {}  # likewise, for a dispatcher
        self.released: dict[str, Counts] = {}  # final counts of rules that left the kernel
        self.lock = threading.Lock()
        self._missing: str | None = None

    @property
    def missing(self) -> str:
        """Why the kernel cannot relay at all ("" if it can): checked once."""
        if self._missing is None:
            self._missing = self._probe()
        return self._missing

    @staticmethod
    def _probe() -> str:
        fds: list[int] = []
        try:
            fds.append(ebpf.create_table(1))
            fds.append(ebpf.create_program_array(1))
            fds.append(ebpf.load_program(ebpf.dispatch_program(fds[0], fds[1]), "mcrd_probe"))
        except OSError as exc:
            return f"eBPF is not available: {exc.strerror or exc}"
        finally:
            _close(*fds)
        return ""

    def clear_leftovers(self) -> int:
        """Delete filters named `mcrd:` (a crashed mcrd's) from every
        interface, and a clsact qdisc left with nothing else in it."""
        from pyroute2 import IPRoute

        removed = 0
        with self.lock, IPRoute() as ipr:
            hooks: dict[int, int] = {}  # one dump of every qdisc: most interfaces have no ingress hook
            for q in ipr.get_qdiscs():
                kind = q.get_attr("TCA_KIND")
                if kind in ("clsact", "ingress"):
                    hooks[q["index"]] = INGRESS_CLSACT if kind == "clsact" else INGRESS_QDISC
            for index, parent in sorted(hooks.items()):
                if not any(_is_ours(f) for f in _filters(ipr, index, parent)):
                    continue
                with contextlib.suppress(Exception):  # one filter of ours: priority and handle are fixed
                    _delete_filter(ipr, index, parent)
                    removed += 1
                if parent == INGRESS_CLSACT and not _any_filters(ipr, index):
                    with contextlib.suppress(Exception):
                        ipr.tc("del", "clsact", index)
        return removed

    def apply(self, programs: dict[int, Attachment]) -> dict[str, str]:
        """Make the kernel hold `programs`: on each input interface, add the
        rules that are new, replace those that changed, remove the others;
        unchanged rules are not touched. Returns the rules the kernel
        refused (by key), and why; the others are in the kernel."""
        from pyroute2 import IPRoute

        refused: dict[str, str] = {}
        with self.lock, IPRoute() as ipr:
            for index in sorted(set(self.hooked) - set(programs)):
                self._unhook(ipr, index)
            for index, att in sorted(programs.items()):
                hooked = self.hooked.get(index)
                if hooked is None:
                    known = {(key, rule): self.refused.get((index, key, rule)) for key, rule in att.rules}
                    if all(known.values()):  # nothing it could hold: not attached just to go again
                        refused |= {key: reason for (key, _rule), reason in known.items() if reason}
                        continue
                    if att not in self.unhookable:
                        try:
                            hooked = self.hooked[index] = self._hook(ipr, att)
                        except OSError as exc:
                            self.unhookable[att] = (
                                f"the kernel refused the program of {att.name}: {exc.strerror}"
                            )
                            log.error("offload: %s", self.unhookable[att])
                    if hooked is None:
                        refused |= dict.fromkeys((key for key, _rule in att.rules), self.unhookable[att])
                        continue
                wanted = dict(att.rules)
                for key in sorted(set(hooked.rules) - set(wanted)):
                    self._drop(hooked, key)
                for key, rule in att.rules:
                    current = hooked.rules.get(key)
                    if current is not None and current.rule == rule:
                        continue
                    mark = (index, key, rule)
                    if mark not in self.refused:
                        try:
                            self._put(hooked, key, rule)
                            continue
                        except OSError as exc:
                            self.refused[mark] = f"the kernel refused its program: {exc.strerror or exc}"
                            log.error("offload of %s: %s", key, self.refused[mark])
                    refused[key] = self.refused[mark]
                    if current is not None:
                        self._drop(hooked, key)
                if not hooked.rules:
                    self._unhook(ipr, index)
            offloaded = _rules(programs)
            self.refused = {m: r for m, r in self.refused.items() if (m[1], m[2]) in offloaded}
            self.unhookable = {a: r for a, r in self.unhookable.items() if programs.get(a.index) == a}
            self._release({key for hooked in self.hooked.values() for key in hooked.rules})
        return refused

    def _hook(self, ipr: Any, att: Attachment) -> Hooked:
        fds: list[int] = []
        created = False
        try:
            fds.append(ebpf.create_table(CAPACITY))
            fds.append(ebpf.create_program_array(CAPACITY))
            fds.append(ebpf.load_program(ebpf.dispatch_program(fds[0], fds[1]), f"mcrd_{att.index}"))
            parent = _ingress_parent(ipr, att.index)
            if parent is None:
                ipr.tc("add", "clsact", att.index)
                created, parent = True, INGRESS_CLSACT
            ipr.tc(  # `add`: never over a filter that is not ours
                "add-filter",
                "bpf",
                att.index,
                handle=HANDLE,
                fd=fds[2],
                name=f"{FILTER_PREFIX}{att.name}",
                parent=parent,
                classid=1,
                direct_action=True,
                prio=PRIO,
                protocol=ETH_P_IP,
            )
        except Exception as exc:
            _close(*fds)
            if created:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", att.index)
            if isinstance(exc, OSError):
                raise
            raise OSError(getattr(exc, "code", None) or 22, str(exc)) from None
        table, programs, dispatch = fds
        return Hooked(att.index, att.name, parent, created, dispatch, table, programs)

    def _put(self, hooked: Hooked, key: str, rule: ebpf.KernelRule) -> None:
        """Load a rule's program and put it in place: a new rule gets a free
        index and then its table entry; a changed one takes over its old
        index in one atomic update."""
        current = hooked.rules.get(key)
        index = current.index if current else hooked.take_index()
        if index is None:
            raise OSError(28, f"{hooked.name} has {CAPACITY} rules in the kernel already")
        slot = index.to_bytes(4, "little")
        counters = program = -1
        try:
            counters = ebpf.create_counters(1, ebpf.slot_size(rule))
            program = ebpf.load_program(ebpf.rule_program(rule, counters), f"mcrd_{hooked.index}_{index}")
            ebpf.update(hooked.programs_fd, slot, program.to_bytes(4, "little"))
            if current is None:
                try:
                    ebpf.update(hooked.table_fd, ebpf.table_key(rule.group, rule.port, rule.source), slot)
                except OSError:
                    with contextlib.suppress(OSError):
                        ebpf.delete(hooked.programs_fd, slot)
                    raise
        except OSError:
            _close(*(fd for fd in (program, counters) if fd >= 0))
            if current is None:
                hooked.free.append(index)
            raise
        _close(program)  # the program array holds it now
        if current is not None:
            self._carry(key, current)
            current.close()
        hooked.rules[key] = RuleLoaded(rule, index, counters)

    def _drop(self, hooked: Hooked, key: str) -> None:
        loaded = hooked.rules.pop(key)
        rule = loaded.rule
        with contextlib.suppress(OSError):  # the table entry first: no lookup finds the index any more
            ebpf.delete(hooked.table_fd, ebpf.table_key(rule.group, rule.port, rule.source))
        with contextlib.suppress(OSError):
            ebpf.delete(hooked.programs_fd, loaded.index.to_bytes(4, "little"))
        hooked.free.append(loaded.index)
        self._carry(key, loaded)
        loaded.close()

    def _unhook(self, ipr: Any, index: int) -> None:
        hooked = self.hooked.pop(index)
        with contextlib.suppress(Exception):  # gone with its interface, or deleted by hand
            _delete_filter(ipr, index, hooked.parent)
        if hooked.created_qdisc:
            with contextlib.suppress(Exception):
                if not _any_filters(ipr, index):
                    ipr.tc("del", "clsact", index)
        for key, loaded in hooked.rules.items():
            self._carry(key, loaded)
        hooked.close()

    def _release(self, keep: set[str]) -> None:
        """What rules that left the kernel counted goes to `released`."""
        for key in [k for k in self.carried if k not in keep]:
            self.released[key] = add_counts(self.released.get(key, []), self.carried.pop(key))

    def take_released(self) -> dict[str, Counts]:
        """The final counts of the rules that left the kernel since the last
        call: the caller keeps them, so that totals never go back."""
        with self.lock:
            released, self.released = self.released, {}
            return released

    def _carry(self, key: str, loaded: RuleLoaded) -> None:
        with contextlib.suppress(OSError):
            self.carried[key] = add_counts(self.carried.get(key, []), loaded.read())

    def counters(self) -> dict[str, Counts]:
        """What each offloaded rule relayed, by rule key: its own count,
        then each output's; carried over replacements of its program."""
        with self.lock:
            found: dict[str, Counts] = {}
            for hooked in self.hooked.values():
                for key, loaded in hooked.rules.items():
                    with contextlib.suppress(OSError):
                        found[key] = add_counts(self.carried.get(key, []), loaded.read())
            return found

    def remove(self) -> None:
        """Detach everything mcrd attached."""
        from pyroute2 import IPRoute

        with self.lock:
            if self.hooked:
                with IPRoute() as ipr:
                    for index in sorted(self.hooked):
                        self._unhook(ipr, index)
            self._release(set())
            self.refused.clear()
            self.unhookable.clear()


def _rules(programs: dict[int, Attachment]) -> set[tuple[str, ebpf.KernelRule]]:
    return {(key, rule) for att in programs.values() for key, rule in att.rules}


def add_counts(a: Counts, b: Counts) -> Counts:
    """Two rules' counts summed pairwise; the shorter one padded with zeros."""
    return [(p1 + p2, b1 + b2) for (p1, b1), (p2, b2) in zip_longest(a, b, fillvalue=(0, 0))]


def fit_counts(counts: Counts, n: int) -> Counts:
    """Exactly `n` entries: cut, or padded with zeros."""
    return (counts + [(0, 0)] * n)[:n]


def _ingress_parent(ipr: Any, index: int) -> int | None:
    """Where a filter goes on this interface's ingress: its clsact qdisc,
    or an `ingress` qdisc; None if it has neither."""
    for q in ipr.get_qdiscs(index=index):
        kind = q.get_attr("TCA_KIND")
        if kind == "clsact":
            return INGRESS_CLSACT
        if kind == "ingress":
            return INGRESS_QDISC
    return None


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    return [f for f in ipr.get_filters(index=index, parent=parent) if f["handle"]]


def _any_filters(ipr: Any, index: int) -> bool:
    return bool(_filters(ipr, index, INGRESS_CLSACT) or _filters(ipr, index, EGRESS_CLSACT))


def _is_ours(f: Any) -> bool:
    if f.get_attr("TCA_KIND") != "bpf" or f["info"] >> 16 != PRIO or f["handle"] != HANDLE:
        return False
    name = f.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""
    return isinstance(name, str) and name.startswith(FILTER_PREFIX)


def _delete_filter(ipr: Any, index: int, parent: int) -> None:
    ipr.tc("del-filter", "bpf", index, handle=HANDLE, parent=parent, prio=PRIO, protocol=ETH_P_IP)
