"""Following network interfaces and their IPv4 addresses through netlink.

A thread holds a pyroute2 netlink socket subscribed to link and address
events, keeps a table of what exists, and hands a fresh snapshot to the
supervisor's loop after every batch of events. The snapshot is observed state;
the supervisor reconciles against it. A thread (not the asyncio loop) because
pyroute2's blocking API is the one that is the same across 0.7 to 0.9.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("mcrd.links")

IFF_UP = 0x1
IFF_MULTICAST = 0x1000
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool
    addresses: frozenset[str] = frozenset()
    multicast: bool = True  # IFF_MULTICAST: WireGuard and most point-to-point tunnels lack it
    bridge: str | None = None  # the bridge this interface is a port of
    mtu: int = 1500


Snapshot = dict[str, Link]  # by name


class LinkTable:
    """Applies netlink messages to a table of links; pure apart from the messages."""

    def __init__(self) -> None:
        self.by_index: dict[int, Link] = {}
        self.masters: dict[int, int | None] = {}  # a bridge port's bridge, by index

    def apply(self, msg: Any) -> None:
        event = msg.get("event")
        index = msg.get("index")
        if event == "RTM_NEWLINK":
            name = msg.get_attr("IFLA_IFNAME")
            old = self.by_index.get(index)
            flags = msg.get("flags", 0)
            info = msg.get_attr("IFLA_LINKINFO")
            port_kind = info.get_attr("IFLA_INFO_SLAVE_KIND") if info is not None else None
            self.by_index[index] = Link(
                index,
                name,
                bool(flags & IFF_UP),
                old.addresses if old else frozenset(),
                bool(flags & IFF_MULTICAST),
                mtu=msg.get_attr("IFLA_MTU") or 1500,
            )
            self.masters[index] = msg.get_attr("IFLA_MASTER") if port_kind == "bridge" else None
        elif event == "RTM_DELLINK":
            self.by_index.pop(index, None)
            self.masters.pop(index, None)
        elif event in ("RTM_NEWADDR", "RTM_DELADDR") and msg.get("family") == socket.AF_INET:
            link = self.by_index.get(index)
            addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if link is None or addr is None:
                return
            addrs = link.addresses | {addr} if event == "RTM_NEWADDR" else link.addresses - {addr}
            self.by_index[index] = replace(link, addresses=frozenset(addrs))

    def snapshot(self) -> Snapshot:
        def bridge(index: int) -> str | None:
            master = self.by_index.get(self.masters.get(index) or -1)
            return master.name if master is not None else None

        return {link.name: replace(link, bridge=bridge(link.index)) for link in self.by_index.values()}


class LinkMonitor:
    def __init__(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[Snapshot], None]) -> None:
        self.loop = loop
        self.on_change = on_change
        self.thread = threading.Thread(target=self._run, name="netlink", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _post(self, table: LinkTable) -> None:
        snap = table.snapshot()
        try:
            self.loop.call_soon_threadsafe(self.on_change, snap)
        except RuntimeError:  # the loop is closed: we are shutting down
            raise SystemExit from None

    def _run(self) -> None:
        from pyroute2 import IPRoute

        while True:
            try:
                with IPRoute() as ipr:
                    ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
                    table = LinkTable()
                    for msg in ipr.get_links():
                        table.apply(msg)
                    for msg in ipr.get_addr(family=socket.AF_INET):
                        table.apply(msg)
                    self._post(table)
                    while True:
                        for msg in ipr.get():
                            table.apply(msg)
                        self._post(table)
            except SystemExit:
                return
            except Exception:
                log.exception("netlink monitor failed; reopening in 1s")
                time.sleep(1.0)
