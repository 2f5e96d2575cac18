"""Fakes for the supervisor's seams (`mcrd.supervisor.seams`): a network
that records what is opened, joined and closed; in-process workers that
speak the real channel protocol; a clock tests move; no kernel tables.

Sockets handed out are real (UDP, unbound), so descriptors cross the real
channel; the fake network knows each by its inode, as a worker sees it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcrd import wire
from mcrd.bpf_classic import FilterPrecision
from mcrd.counters import KernelCounts
from mcrd.netio import RingSpec
from mcrd.offload.plan import Attachment, Egress, Iface
from mcrd.packet import FilterEntry
from mcrd.rules import Destination, RuleKey, RuleSpec
from mcrd.supervisor.seams import Identity, Seams


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class FakeSocket(socket.socket):
    """A real UDP socket that tells the fake network when it is closed."""

    on_close: Callable[[FakeSocket], None] | None = None
    what: tuple[Any, ...] = ()
    ino: int = 0

    def close(self) -> None:
        if self.fileno() >= 0 and self.on_close is not None:
            self.on_close(self)
        super().close()


@dataclass
class FakeNet:
    """The network as the supervisor sees it. `ifaces` maps names to
    indexes; `events` lists ("open"/"close"/"filter", what) in order."""

    ifaces: dict[str, int] = field(default_factory=dict)
    events: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    live: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # by inode
    filters: dict[int, frozenset[FilterEntry]] = field(default_factory=dict)  # by inode
    closing: list[Callable[[FakeSocket], None]] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # an interface's address to send from

    def _socket(self, *what: Any) -> FakeSocket:
        sock = FakeSocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.what, sock.ino, sock.on_close = what, inode(sock.fileno()), self._closed
        self.live[sock.ino] = what
        self.events.append(("open", what))
        return sock

    def _closed(self, sock: FakeSocket) -> None:
        for check in self.closing:
            check(sock)
        self.live.pop(sock.ino, None)
        self.events.append(("close", sock.what))

    def opened(self, kind: str) -> list[tuple[Any, ...]]:
        return [w for w in self.live.values() if w[0] == kind]

    def ifindex(self, name: str) -> int:
        if name not in self.ifaces:
            raise OSError(errno.ENODEV, "No such device")
        return self.ifaces[name]

    def open_packet_socket(
        self, interface: str, entries: Iterable[FilterEntry], ring: RingSpec | None = None
    ) -> tuple[socket.socket, FilterPrecision]:
        index = self.ifindex(interface)
        sock = self._socket("packet", interface, index)
        self.filters[sock.ino] = frozenset(entries)
        return sock, FilterPrecision.EXACT

    def join_fanout(self, sock: socket.socket, group: int | None) -> int:
        return group or 1

    def attach_best_filter(self, sock: socket.socket, entries: Iterable[FilterEntry]) -> FilterPrecision:
        self.filters[inode(sock.fileno())] = frozenset(entries)
        self.events.append(("filter", tuple(sorted(entries))))
        return FilterPrecision.EXACT

    def join_group(self, interface: str, group: str, source: str | None) -> socket.socket:
        self.ifindex(interface)
        return self._socket("member", interface, group, source)

    def open_sink(self, address: str, port: int) -> socket.socket | None:
        return self._socket("sink", address, port)

    def open_output_socket(self, interface: str | None, ttl: int) -> socket.socket:
        if interface is not None:
            self.ifindex(interface)
        return self._socket("output", interface, ttl)

    def open_raw_socket(self, interface: str | None) -> socket.socket:
        if interface is not None:
            self.ifindex(interface)
        return self._socket("raw", interface)

    def source_address(self, interface: str | None, dest: str) -> str | None:
        return self.addresses.get(interface or "")


class FakeWorker:
    """A worker in this process: answers `configure` and `stats` on the
    real channel, or fails to boot. `hold` keeps configure replies back."""

    pids = iter(range(50000, 60000))

    def __init__(self, channel: socket.socket, boot_failure: str = "") -> None:
        self.pid = next(self.pids)
        self.returncode: int | None = None
        self.chan = socket.socket(fileno=os.dup(channel.fileno()))
        self.chan.setblocking(False)
        self.fd = self.chan.fileno()
        self.incoming = wire.Reassembly()  # a large message comes in pieces, over several reads
        self.configs: list[wire.Configure] = []
        self.in_use: set[int] = set()  # inodes of the output sockets of its latest configuration
        self.packets = 0  # what it reports for every rule
        self.stats_reply: dict[str, Any] | None = None  # instead of the real one
        self.hold: asyncio.Event | None = None
        self.exited = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        if boot_failure:
            wire.send(self.chan, {"op": "boot-failed", "reason": boot_failure})
            self.exit(wire.EX_BOOT)
        else:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self.returncode is None:
            readable = loop.create_future()
            loop.add_reader(self.fd, readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(self.fd)
            if self.returncode is not None:
                return
            try:
                got = self.incoming.receive(self.chan)
            except BlockingIOError:
                continue
            if got is None:
                self.exit(0)
                return
            await self._handle(*got)

    async def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "configure":
            config = wire.Configure.parse(message)
            self.configs.append(config)
            self.in_use = {inode(fds[o.fd]) for r in config.rules for o in r.outputs}
            for fd in fds:
                os.close(fd)
            if self.hold is not None:
                await self.hold.wait()
            wire.send(self.chan, {"op": "configured", "id": message["id"], "pid": self.pid})
        elif op == "stats":
            reply = self.stats_reply or self._stats()
            wire.send(self.chan, {"op": "stats", "id": message["id"], **reply})
        elif op == "stop":
            self.exit(0)

    def _stats(self) -> dict[str, Any]:
        config = self.configs[-1]
        return {
            "received": self.packets * len(config.rules),
            "drops": {},
            "rules": [
                {
                    "rule": r.rule,
                    "packets": self.packets,
                    "bytes": self.packets * 100,
                    "limited": 0,
                    "looped": 0,
                    "expired": 0,
                    "outputs": [
                        {
                            "output": o.output,
                            "packets": self.packets,
                            "bytes": self.packets * 100,
                            "errors": 0,
                            "last_error": "",
                        }
                        for o in r.outputs
                    ],
                }
                for r in config.rules
            ],
        }

    def exit(self, code: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        if self.task is not None and asyncio.current_task() is not self.task:
            self.task.cancel()  # it stops listening before the channel closes
        asyncio.get_running_loop().remove_reader(self.fd)
        self.chan.close()
        self.exited.set()

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is not None:
            raise ProcessLookupError
        self.exit(-9)


@dataclass
class FakeSpawner:
    """Starts `FakeWorker`s; `boot_failure` makes the next ones fail to boot."""

    workers: list[FakeWorker] = field(default_factory=list)
    boot_failure: str = ""

    async def __call__(self, channel: socket.socket, identity: Identity) -> FakeWorker:
        worker = FakeWorker(channel, self.boot_failure)
        self.workers.append(worker)
        return worker

    def running(self) -> list[FakeWorker]:
        return [w for w in self.workers if w.returncode is None]


class FakeClock:
    """Time moves only when the supervisor sleeps (a real millisecond each time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0.001)


class NoKernel:
    """Kernel tables on a machine where the kernel cannot relay."""

    missing = "no kernel in this test"

    def clear_leftovers(self) -> int:
        return 0

    def apply(self, programs: dict[int, Attachment]) -> dict[RuleKey, str]:
        return {}

    def take_released(self) -> dict[RuleKey, KernelCounts]:
        return {}

    def counters(self) -> dict[RuleKey, KernelCounts]:
        return {}

    def remove(self) -> None:
        pass


def no_routes(rules: list[RuleSpec]) -> tuple[dict[str, Iface], dict[Destination, Egress]]:
    return {}, {}


@dataclass
class FakeSeams:
    net: FakeNet
    spawner: FakeSpawner
    clock: FakeClock

    def seams(self) -> Seams:
        return Seams(net=self.net, spawn=self.spawner, clock=self.clock, tables=NoKernel(), gather=no_routes)


def fake_seams(**ifaces: int) -> FakeSeams:
    return FakeSeams(FakeNet(dict(ifaces)), FakeSpawner(), FakeClock())


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (on the loop, not the clock) until the condition holds."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.001)
    assert condition(), what
