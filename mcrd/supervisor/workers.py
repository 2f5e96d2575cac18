"""Worker processes: their handles, their configuration, and keeping them running.

`WorkerHandle` is one running worker and our end of its channel (requests
with replies by id). `Workers` starts a lane's worker, configures it, samples
its counters and restarts it with backoff when it dies, on the same sockets.

The exit contract: a worker that cannot take up its post (dropping
privileges failed) says why (`boot-failed`) and exits with `wire.EX_BOOT`.
The lane then shows "failed" with that reason and is not restarted, since a
restart would fail alike, until the port's configuration changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mcrd import wire
from mcrd.counters import parse_stats
from mcrd.rules import Destination, RuleKey, RuleSpec
from mcrd.supervisor.outputs import OutputPool
from mcrd.supervisor.ports import InputPort, Lane, PortState
from mcrd.supervisor.seams import Clock, Identity, Seams, WorkerProcess

log = logging.getLogger("mcrd")

CONFIGURE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long resets the backoff
EXIT_GRACE = 1.0  # how long a worker that failed to start may take to exit by itself


def backoff_delay(failures: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


class WorkerBootError(Exception):
    """The worker exited with `wire.EX_BOOT`: it could not take up its post."""


class WorkerHandle:
    """One running worker process and our end of its channel."""

    def __init__(self, process: WorkerProcess, chan: socket.socket, clock: Clock) -> None:
        self.process = process
        self.chan = chan
        self.clock = clock
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.closed = False
        self.boot_failure = ""  # the reason a worker sent before exiting with EX_BOOT
        self.last_heard = clock.monotonic()
        # a worker has no business sending descriptors, nor more than its
        # counts (a reply for 100,000 rules is some 20 MB)
        self.incoming = wire.Reassembly(keep_fds=False, limit=wire.MAX_REPLY)
        self._sending = asyncio.Lock()
        self._room: asyncio.Future[None] | None = None
        chan.setblocking(False)
        asyncio.get_running_loop().add_reader(chan.fileno(), self._readable)

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def _readable(self) -> None:
        for _ in range(64):  # then let the loop breathe: a chatty worker must not starve it
            try:
                got = self.incoming.receive(self.chan)
            except BlockingIOError:
                return
            except ConnectionResetError:
                # It exited with our last request unread. The kernel reports
                # that first; what it sent before (a boot failure) comes next.
                continue
            except (OSError, ValueError) as exc:
                # A worker that speaks garbage is broken or compromised: it goes,
                # and the supervisor starts a fresh one.
                log.error("worker %d sent something unreadable (%s); killing it", self.pid, exc)
                self.kill()
                got = None
            if got is None:
                self.close()
                return
            message, fds = got
            for fd in fds:  # workers have no business sending descriptors
                os.close(fd)
            self.last_heard = self.clock.monotonic()
            if message.get("op") == "boot-failed":
                self.boot_failure = str(message.get("reason", ""))[:300]
                continue
            future = self.pending.pop(message.get("id", 0), None)
            if future is not None and not future.done():
                future.set_result(message)

    async def request(
        self, message: dict[str, Any], fds: list[int] | None = None, timeout: float = REQUEST_TIMEOUT
    ) -> dict[str, Any]:
        if self.closed:
            raise ConnectionError("worker channel is closed")
        ident = self.next_id
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
            # cancellation that meets the reply, and a cancelled worker task
            # then went on to wait for its worker forever (a reload hung).
            # The send is inside it too: a worker that stops reading its
            # channel must not hold the supervisor.
            async with asyncio.timeout(timeout):
                await self._send({**message, "id": ident}, fds or [])
                return await future
        finally:
            self.pending.pop(ident, None)
            if future.done() and not future.cancelled():
                future.exception()  # seen: the send's own error is what the caller gets

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        """Send a message, in pieces when it is large, waiting for room in the
        channel between them rather than blocking the loop; one message at a
        time, so that pieces of two never interleave. A message cut short
        (cancelled, timed out) would leave the worker half of one: it is
        killed, and started afresh."""
        loop = asyncio.get_running_loop()
        async with self._sending:
            pieces = wire.frames(message, fds)
            sent = 0
            try:
                for data, group in pieces:
                    while True:
                        if self.closed:
                            raise ConnectionError("worker channel is closed")
                        try:
                            wire.send_frame(self.chan, data, group)
                            break
                        except BlockingIOError:
                            self._room = loop.create_future()
                            loop.add_writer(self.chan.fileno(), _settle, self._room)
                            try:
                                await self._room
                            finally:
                                self._stop_waiting(None)
                    sent += 1
            except BaseException:
                if 0 < sent < len(pieces):
                    log.error("worker %d: a message to it was cut short; killing it", self.pid)
                    self.kill()
                raise

    def _stop_waiting(self, why: BaseException | None) -> None:
        """No longer wait for room in the channel; a waiter gets `why` (None: cancelled)."""
        room, self._room = self._room, None
        if room is None:
            return
        if not self.closed:
            asyncio.get_running_loop().remove_writer(self.chan.fileno())
        if not room.done():
            if why is None:
                room.cancel()
            else:
                room.set_exception(why)

    def drain(self) -> None:
        """Read what is left on the channel now (the worker has exited)."""
        if not self.closed:
            self._readable()

    def notify(self, message: dict[str, Any]) -> None:
        if self._sending.locked():  # in the middle of another message: it would garble both
            self.kill()
            return
        if not self.closed:
            with contextlib.suppress(OSError):
                wire.send(self.chan, message)

    def close(self) -> None:
        if self.closed:
            return
        self._stop_waiting(ConnectionError("worker channel closed"))
        self.closed = True
        asyncio.get_running_loop().remove_reader(self.chan.fileno())
        self.chan.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("worker channel closed"))

    async def stop(self) -> None:
        """Ask the worker to exit; kill it if it has not within a second."""
        self.notify({"op": "stop"})
        try:
            async with asyncio.timeout(1.0):
                await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()
        self.close()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


T = TypeVar("T")


@dataclass
class Identities(Generic[T]):
    """Small integers standing for rules or outputs on the wire: stable
    while the thing exists, so a worker's counts follow it."""

    ids: dict[T, int] = field(default_factory=dict)
    things: dict[int, T] = field(default_factory=dict)
    last: int = 0

    def of(self, thing: T) -> int:
        found = self.ids.get(thing)
        if found is None:
            self.last += 1
            found = self.ids[thing] = self.last
            self.things[found] = thing
        return found

    def retain(self, keep: set[T]) -> None:
        self.ids = {t: i for t, i in self.ids.items() if t in keep}
        self.things = {i: t for t, i in self.ids.items()}


class Workers:
    """Starts, configures, samples and restarts the lanes' workers."""

    def __init__(self, seams: Seams, identity: Identity, outputs: OutputPool, worker_timeout: float) -> None:
        self.seams = seams
        self.clock = seams.clock
        self.identity = identity
        self.outputs = outputs
        self.worker_timeout = worker_timeout
        self.rule_ids: Identities[RuleKey] = Identities()
        self.output_ids: Identities[Destination] = Identities()
        self.stopping = False
        #: the rules under the loop guard, and this host's addresses (set by
        #: each reconcile pass before it configures the workers)
        self.guarded: set[RuleKey] = set()
        self.local_addresses: tuple[str, ...] = ()

    def retain(self, rules: list[RuleSpec]) -> None:
        self.rule_ids.retain({s.key for s in rules})
        self.output_ids.retain({d for s in rules for d in s.destinations()})

    def configuration(self, port: InputPort, lane: Lane) -> tuple[wire.Configure, list[int]]:
        """The lane's configure message and its descriptors (the packet socket first)."""
        fds = [lane.sock.fileno()]
        index: dict[int, int] = {}
        rules = []
        for spec in port.rules:
            outs = []
            for dest in spec.destinations():
                out = self.outputs.get(dest)
                if out is None or out.sock is None:
                    continue
                source = self.outputs.source(dest)
                if dest.faithful and not dest.keep_source and source is None:
                    continue  # nothing to send from (yet): pending
                if out.generation not in index:
                    index[out.generation] = len(fds)
                    fds.append(out.sock.fileno())
                fd, ident = index[out.generation], self.output_ids.of(dest)
                outs.append(
                    wire.OutputConfig(
                        ident,
                        fd,
                        dest.group,
                        dest.port,
                        out.generation,
                        str(dest),
                        raw=dest.faithful,
                        ttl=dest.ttl if dest.faithful or dest.keeps_port else 0,
                        source=source,
                        source_port=dest.source_port if isinstance(dest.source_port, int) else None,
                        dscp=dest.dscp,
                        keep_port=dest.keeps_port,
                        interface=dest.interface,
                    )
                )
            limit = spec.rate_limit
            known = spec.discovery
            i = spec.input
            rules.append(
                wire.RuleConfig(
                    self.rule_ids.of(spec.key),
                    i.group,
                    i.port,
                    i.source,
                    tuple(outs),
                    limit.pps if limit else None,
                    limit.bps if limit else None,
                    guard=spec.key in self.guarded,
                    rewrite="mdns" if known is not None and known.name == "mdns" else None,
                )
            )
        ring = lane.ring
        config = wire.Configure(
            ring.frame_size, ring.frame_count, tuple(rules), self.local_addresses, ring.busy_poll
        )
        return config, fds

    async def push(self, port: InputPort, lane: Lane) -> None:
        """Send the lane's worker its configuration, if it changed."""
        worker = lane.live_worker()
        if worker is None:
            return
        config, fds = self.configuration(port, lane)
        if config == lane.sent:
            return
        try:
            await worker.request(config.message(), fds, timeout=CONFIGURE_TIMEOUT)
            lane.sent = config
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.error(
                "input %s: worker %d did not take its new rules (%s); restarting it",
                port.interface,
                worker.pid,
                exc,
            )
            worker.kill()

    def retry_failed(self, port: InputPort, lane: Lane) -> bool:
        """Whether a lane whose worker failed to boot should try again: its configuration changed."""
        return lane.state == PortState.FAILED and self.configuration(port, lane)[0] != lane.failed_with

    async def _spawn(self, port: InputPort, lane: Lane) -> WorkerHandle:
        ours, theirs = wire.socketpair()
        try:
            process = await self.seams.spawn(theirs, self.identity)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        handle = WorkerHandle(process, ours, self.clock)
        config, fds = self.configuration(port, lane)
        try:
            await handle.request(config.message(), fds, timeout=CONFIGURE_TIMEOUT)
        except Exception:
            status = await self._reap(handle)
            handle.drain()  # what it said before it exited, if we sent to a closed channel
            handle.close()
            if status == wire.EX_BOOT:
                lane.failed_with = config
                raise WorkerBootError(handle.boot_failure or "it gave no reason") from None
            raise
        except BaseException:  # cancelled: the supervisor is stopping or the port closing
            handle.close()
            handle.kill()
            await process.wait()
            raise
        lane.sent = config
        return handle

    @staticmethod
    async def _reap(handle: WorkerHandle) -> int:
        """The exit status of a worker that did not take its configuration:
        one on its way out (a boot failure) gets a moment to exit by itself,
        so that its status says why."""
        try:
            async with asyncio.timeout(EXIT_GRACE):
                return await handle.process.wait()
        except TimeoutError:
            handle.kill()
            return await handle.process.wait()

    async def keep(self, port: InputPort, lane: Lane) -> None:
        """Run the lane's worker until the supervisor stops, restarting it
        with backoff when it dies; give up only on a boot failure."""
        failures = 0
        name = port.interface if len(port.lanes) == 1 else f"{port.interface}#{lane.index}"
        while not self.stopping:
            began = self.clock.monotonic()
            try:
                lane.worker = await self._spawn(port, lane)
            except WorkerBootError as exc:
                lane.state, lane.reason = PortState.FAILED, f"worker failed to boot: {exc}"
                log.error("input %s: %s; not restarting it until its rules change", name, lane.reason)
                lane.settled.set()
                return
            except (OSError, TimeoutError, ConnectionError) as exc:
                lane.state, lane.reason = PortState.RESTARTING, f"worker failed to start: {exc}"
                log.error("input %s: %s", name, lane.reason)
                lane.settled.set()
            else:
                lane.state, lane.reason, lane.failed_with = PortState.ACTIVE, "", None
                lane.settled.set()
                worker = lane.worker
                log.info("input %s: worker %d relaying %d rule(s)", name, worker.pid, len(port.rules))
                await self.push(port, lane)  # rules may have changed while it started
                status = await worker.process.wait()
                worker.close()
                if self.stopping:
                    return
                lane.ledger.retire()
                lane.state = PortState.RESTARTING
                lane.reason = f"worker {worker.pid} exited with status {status}"
                lane.restarts += 1
                log.error("input %s: %s", name, lane.reason)
            failures = 1 if self.clock.monotonic() - began > STABLE_AFTER else failures + 1
            delay = backoff_delay(failures)
            log.info("input %s: restarting its worker in %.1fs", name, delay)
            await self.clock.sleep(delay)

    def start(self, port: InputPort, lane: Lane) -> None:
        lane.state, lane.reason = PortState.STARTING, ""
        lane.settled.clear()
        lane.task = asyncio.create_task(self.keep(port, lane), name=f"worker-{port.interface}-{lane.index}")

    async def sample(self, port: InputPort, lane: Lane) -> None:
        """Ask the lane's worker for its counts; kill it if it is silent too long or lies."""
        worker = lane.live_worker()
        if worker is None:
            return
        try:
            reply = await worker.request({"op": "stats"})
        except (TimeoutError, ConnectionError, OSError):
            if self.clock.monotonic() - worker.last_heard > self.worker_timeout:
                log.error(
                    "input %s: worker %d has not answered for %.0fs; killing it",
                    port.interface,
                    worker.pid,
                    self.worker_timeout,
                )
                worker.kill()
            return
        try:
            counts = parse_stats(reply, self.rule_ids.things, self.output_ids.things)
        except ValueError as exc:
            log.error("input %s: worker %d sent %s; restarting it", port.interface, worker.pid, exc)
            worker.kill()
            return
        if lane.worker is worker:
            lane.ledger.record(self.clock.monotonic(), counts)

    async def stop_lanes(self, port: InputPort) -> None:
        """End the lanes' tasks and workers, keeping what they counted."""
        for lane in port.lanes:
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
                lane.task = None
        await asyncio.gather(*(self.sample(port, lane) for lane in port.lanes))
        await asyncio.gather(*(w.stop() for w in port.workers()))
        for lane in port.lanes:
            lane.worker = None
        port.retire_lanes()
