"""How each output would leave, asked of the kernel over netlink.

The adapter behind offload planning: interfaces, primary IPv4 addresses,
routes and resolved neighbours, gathered in one blocking call (run it in a
thread) and turned into `Iface` and `Egress` values for `plan.plan_offload`.
"""

from __future__ import annotations

import socket
from typing import Any

from mcrd.links import IFF_UP
from mcrd.offload.plan import Egress, Iface, egress_for
from mcrd.rules import Destination, RuleSpec, is_multicast

ARPHRD_ETHER = 1
RTN_BROADCAST = 3
IFA_F_SECONDARY = 0x01
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


def _bridge_port(msg: Any) -> bool:
    info = msg.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"


def gather(specs: list[RuleSpec]) -> tuple[dict[str, Iface], dict[Destination, Egress]]:
    """Ask the kernel (netlink) about interfaces, addresses, routes and
    neighbours for these rules. Blocking: run it in a thread."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ifaces: dict[str, Iface] = {}
    addresses: dict[int, list[str]] = {}
    neighbours: dict[tuple[int, str], str] = {}
    routes: dict[Destination, tuple[str, str] | None] = {}
    broadcasts: set[Destination] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            ifaces[name] = Iface(
                msg["index"],
                name,
                bool(msg["flags"] & IFF_UP),
                msg.get("ifi_type") == ARPHRD_ETHER and bool(msg.get_attr("IFLA_ADDRESS")),
                msg.get_attr("IFLA_ADDRESS") or "",
                msg.get_attr("IFLA_MTU") or 1500,
                _bridge_port(msg),
            )
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get("flags", 0) & IFA_F_SECONDARY:  # the kernel sends from a primary
                continue
            addresses.setdefault(msg["index"], []).append(msg.get_attr("IFA_LOCAL") or "")
        wanted = {d for s in specs for d in s.destinations() if d.interface and not is_multicast(d.group)}
        for dest in wanted:
            iface = ifaces.get(dest.interface or "")
            if iface is None:
                continue
            try:
                (found,) = ipr.route("get", dst=dest.group, oif=iface.index)
            except NetlinkError:  # no route: the rule stays in user space and says so
                routes[dest] = None
                continue
            routes[dest] = (
                found.get_attr("RTA_PREFSRC") or "",
                found.get_attr("RTA_GATEWAY") or dest.group,
            )
            if found.get("type") == RTN_BROADCAST:
                broadcasts.add(dest)
        for msg in ipr.get_neighbours(family=socket.AF_INET):
            mac = msg.get_attr("NDA_LLADDR")
            if mac and msg.get("state", 0) & NUD_USABLE:
                neighbours[msg["ifindex"], msg.get_attr("NDA_DST")] = mac
    egress = {
        d: egress_for(d, ifaces, addresses, routes.get(d), neighbours, d in broadcasts)
        for s in specs
        for d in s.destinations()
    }
    return ifaces, egress
