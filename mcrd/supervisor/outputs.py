"""The output socket pool: one UDP socket per (interface, TTL) the rules send with,
and one raw socket per interface faithful outputs send through.

Rules share these sockets (a worker gets descriptors of them). Each socket
carries a generation number, new for every socket opened, so that a worker
knows when a key's socket was replaced (and what it learnt of the old one's
limits no longer holds) without comparing descriptors.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from mcrd.links import Link
from mcrd.rules import Destination
from mcrd.supervisor.seams import NetIO

log = logging.getLogger("mcrd")


class OutputKey(NamedTuple):
    """What output sockets are shared by: the interface (None: as routed), the
    TTL, and whether the socket is raw (faithful outputs put the TTL in each
    datagram's header: their key's TTL is 0)."""

    interface: str | None
    ttl: int
    raw: bool = False

    @classmethod
    def of(cls, dest: Destination) -> OutputKey:
        if dest.faithful:
            return cls(dest.interface, 0, True)
        return cls(dest.interface, dest.ttl)


class OutputState(StrEnum):
    ACTIVE = "active"
    PENDING = "pending"  # not open: no such interface, or the kernel refused
    DOWN = "down"  # open, on an interface that is down


@dataclass(frozen=True)
class OutputSocket:
    """An open socket (or why there is none), the interface index it was
    bound to, and its generation."""

    sock: socket.socket | None
    ifindex: int | None
    generation: int
    reason: str = ""


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return f"{exc.strerror or exc} (mcrd needs CAP_NET_RAW and CAP_NET_ADMIN)"
    return exc.strerror or str(exc)


class OutputPool:
    """The output sockets by key: opened when a rule needs them, reopened
    when their interface is replaced, closed when no rule uses them."""

    def __init__(self, net: NetIO) -> None:
        self.net = net
        self.sockets: dict[OutputKey, OutputSocket] = {}
        #: faithful outputs that send from the relay's address: which one
        #: (None: there is none to send from)
        self.sources: dict[Destination, str | None] = {}
        self._generations = 0

    def get(self, dest: Destination) -> OutputSocket | None:
        return self.sockets.get(OutputKey.of(dest))

    def source(self, dest: Destination) -> str | None:
        """The address a faithful output sends from, or the one an output
        keeping the sender's port binds its sockets to; None: the sender's
        (or none found)."""
        return self.sources.get(dest)

    def open(self, destinations: Iterable[Destination], link: Callable[[str], Link | None]) -> None:
        """Open (or reopen, or note why not) a socket for every key the
        destinations use; leave sockets whose interface is unchanged alone."""
        destinations = list(destinations)
        # asked again on every pass: an interface's addresses come and go
        self.sources = {
            d: self.net.source_address(d.interface, d.group)
            for d in destinations
            if (d.faithful and not d.keep_source) or d.keeps_port
        }
        for key in dict.fromkeys(OutputKey.of(d) for d in destinations):
            current = self.sockets.get(key)
            found = link(key.interface) if key.interface else None
            if key.interface is not None and found is None:
                self._replace(key, None, None, f"no interface named {key.interface!r}")
                continue
            index = found.index if found else None
            if current is not None and current.sock is not None and current.ifindex == index:
                continue
            try:
                if key.raw:
                    sock = self.net.open_raw_socket(key.interface)
                else:
                    sock = self.net.open_output_socket(key.interface, key.ttl)
            except OSError as exc:
                self._replace(key, None, None, describe_os_error(exc))
                why = describe_os_error(exc)
                what = "raw" if key.raw else f"ttl {key.ttl}"
                log.warning("output via %s %s unavailable: %s", key.interface or "routing", what, why)
                continue
            self._replace(key, sock, index)

    def close_unused(self, destinations: Iterable[Destination]) -> None:
        used = {OutputKey.of(d) for d in destinations}
        for key in [k for k in self.sockets if k not in used]:
            self._close(self.sockets.pop(key))

    def close_all(self) -> None:
        for out in self.sockets.values():
            self._close(out)
        self.sockets.clear()

    def state(self, dest: Destination, link: Callable[[str], Link | None]) -> tuple[OutputState, str]:
        out = self.get(dest)
        if out is None or out.sock is None:
            return OutputState.PENDING, out.reason if out else "not opened yet"
        if dest.faithful and not dest.keep_source and self.source(dest) is None:
            return (
                OutputState.PENDING,
                f"no IPv4 address to send from{' on ' + dest.interface if dest.interface else ''}",
            )
        found = link(dest.interface) if dest.interface else None
        if found is not None and not found.up:
            return OutputState.DOWN, "interface is down"
        return OutputState.ACTIVE, ""

    def _replace(
        self, key: OutputKey, sock: socket.socket | None, index: int | None, reason: str = ""
    ) -> None:
        current = self.sockets.get(key)
        if current is not None:
            self._close(current)
        self._generations += 1
        self.sockets[key] = OutputSocket(sock, index, self._generations, reason)

    @staticmethod
    def _close(out: OutputSocket) -> None:
        if out.sock is not None:
            out.sock.close()
