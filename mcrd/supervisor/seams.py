"""What the supervisor asks of the world, as parameters: its seams.

The network (`NetIO`: the `mcrd.netio` functions it calls), its worker
processes (`Spawner`), its clock (`Clock`) and the kernel offload's adapter
(`KernelTables`, with the netlink look-up `gather`). `Seams()` holds the real
ones; a component test passes fakes and drives the supervisor in
milliseconds, without root.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from mcrd import netio
from mcrd.bpf_classic import FilterPrecision
from mcrd.counters import KernelCounts
from mcrd.offload.netlink import gather
from mcrd.offload.plan import Attachment, Egress, Iface
from mcrd.offload.tc import Tc
from mcrd.packet import FilterEntry
from mcrd.rules import Destination, RuleKey, RuleSpec

#: (uid, gid) the workers run as
Identity = tuple[int, int]


class NetIO(Protocol):
    """The sockets the supervisor opens: `mcrd.netio` itself in production."""

    def ifindex(self, name: str) -> int: ...
    def open_packet_socket(
        self, interface: str, entries: Iterable[FilterEntry], ring: netio.RingSpec | None = None
    ) -> tuple[socket.socket, FilterPrecision]: ...
    def join_fanout(self, sock: socket.socket, group: int | None) -> int: ...
    def attach_best_filter(self, sock: socket.socket, entries: Iterable[FilterEntry]) -> FilterPrecision: ...
    def join_group(self, interface: str, group: str, source: str | None) -> socket.socket: ...
    def open_sink(self, address: str, port: int) -> socket.socket | None: ...
    def open_output_socket(self, interface: str | None, ttl: int) -> socket.socket: ...
    def open_raw_socket(self, interface: str | None) -> socket.socket: ...
    def source_address(self, interface: str | None, dest: str) -> str | None: ...


class WorkerProcess(Protocol):
    """A started worker: `asyncio.subprocess.Process` in production."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...
    def kill(self) -> None: ...


#: starts a worker on the given end of its channel, running as the identity
Spawner = Callable[[socket.socket, Identity], Awaitable[WorkerProcess]]


def worker_command(channel: socket.socket, identity: Identity) -> list[str]:
    return [
        sys.executable,
        "-P",  # not the current directory on sys.path: the worker starts as root
        "-m",
        "mcrd.worker",
        str(channel.fileno()),
        "--uid",
        str(identity[0]),
        "--gid",
        str(identity[1]),
    ]


async def spawn_worker(channel: socket.socket, identity: Identity) -> WorkerProcess:
    """A worker as a fresh interpreter (never a fork of the supervisor)."""
    return await asyncio.create_subprocess_exec(
        *worker_command(channel, identity),
        pass_fds=(channel.fileno(),),
        cwd="/",
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


class Clock(Protocol):
    def monotonic(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class KernelTables(Protocol):
    """The offload's kernel adapter: `mcrd.offload.tc.Tc` in production."""

    @property
    def missing(self) -> str: ...
    def clear_leftovers(self) -> int: ...
    def apply(self, programs: dict[int, Attachment]) -> dict[RuleKey, str]: ...
    def take_released(self) -> dict[RuleKey, KernelCounts]: ...
    def counters(self) -> dict[RuleKey, KernelCounts]: ...
    def remove(self) -> None: ...


#: looks up the interfaces, routes and neighbours offloaded rules need
Gather = Callable[[list[RuleSpec]], tuple[dict[str, Iface], dict[Destination, Egress]]]


@dataclass
class Seams:
    """The supervisor's ways out; the defaults are the real ones."""

    net: NetIO = netio  # the module itself satisfies the protocol
    spawn: Spawner = spawn_worker
    clock: Clock = field(default_factory=SystemClock)
    tables: KernelTables = field(default_factory=Tc)
    gather: Gather = gather
