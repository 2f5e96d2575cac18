"""The supervisor: owns the privileged sockets and keeps one worker per input interface.

It opens every socket the data path needs (filtered AF_PACKET receive sockets,
group memberships, output sockets bound to their devices) and hands them to
workers, which it spawns as fresh interpreters, never forks. `reconcile()`
converges what is running on the desired rules and the observed interfaces:
a port (an input interface) whose interface is unchanged is updated in place
— filter swapped atomically, memberships joined and left one by one, the
worker's table swapped between two batches — so unchanged flows never lose a
datagram. A worker that dies or stops answering is restarted with backoff on
the same sockets. Depends on the pure core (`rules`, `packet`) and the
`netio` adapter; runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mcrd import channel, netio
from mcrd.links import Link, Snapshot
from mcrd.offload.netlink import gather
from mcrd.offload.plan import Attachment, Egress, Iface, OffloadMode, OffloadPlan, plan_offload
from mcrd.offload.tc import Counts, Tc, add_counts, fit_counts
from mcrd.packet import DROP_REASONS, FilterEntry, ip_to_int
from mcrd.rulebook import rule_id
from mcrd.rules import Destination, RuleKey, RuleSpec, is_multicast

log = logging.getLogger("mcrd")

CONFIGURE_TIMEOUT = 5.0
REQUEST_TIMEOUT = 1.0
SAMPLE_INTERVAL = 1.0
LATE_AFTER = 3.0  # a worker silent this long holds back the watchdog
OFFLOAD_RECHECK = 2.0  # seconds between looks at routes and neighbours for offloaded rules
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a worker that ran this long resets the backoff


def backoff_delay(failures: int) -> float:
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1)))


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return f"{exc.strerror or exc} (mcrd needs CAP_NET_RAW and CAP_NET_ADMIN)"
    return exc.strerror or str(exc)


class WorkerLink:
    """One running worker process and our end of its channel."""

    def __init__(self, process: asyncio.subprocess.Process, chan: socket.socket) -> None:
        self.process = process
        self.chan = chan
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.closed = False
        self.last_heard = time.monotonic()
        chan.setblocking(False)
        asyncio.get_running_loop().add_reader(chan.fileno(), self._readable)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _readable(self) -> None:
        for _ in range(64):  # then let the loop breathe: a chatty worker must not starve it
            try:
                got = channel.receive(self.chan)
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                # A worker that speaks garbage is broken or compromised: it goes,
                # and the supervisor starts a fresh one.
                log.error("worker %d sent something unreadable (%s); killing it", self.pid, exc)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                got = None
            if got is None:
                self.close()
                return
            message, fds = got
            for fd in fds:  # workers have no business sending descriptors
                os.close(fd)
            self.last_heard = time.monotonic()
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
            channel.send(self.chan, {**message, "id": ident}, fds)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
            # cancellation that meets the reply, and a cancelled worker task
            # then went on to wait for its worker forever (a reload hung).
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.pending.pop(ident, None)

    def notify(self, message: dict[str, Any]) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                channel.send(self.chan, message)

    def close(self) -> None:
        if self.closed:
            return
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
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        self.close()


@dataclass
class OutputSocket:
    sock: socket.socket | None
    ifindex: int | None
    reason: str = ""


def _empty_counters() -> dict[str, Any]:
    return {"received": 0, "drops": dict.fromkeys(DROP_REASONS, 0), "rules": {}}


def add_counters(base: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Sum two worker counter snapshots (used to carry counts across restarts)."""
    total = {
        "received": base["received"] + more["received"],
        "drops": {k: base["drops"].get(k, 0) + more["drops"].get(k, 0) for k in DROP_REASONS},
        "rules": {},
    }
    for key in set(base["rules"]) | set(more["rules"]):
        a = base["rules"].get(key, {"packets": 0, "bytes": 0, "limited": 0, "outputs": []})
        b = more["rules"].get(key, {"packets": 0, "bytes": 0, "limited": 0, "outputs": []})
        outs: dict[str, dict[str, Any]] = {}
        for o in [*a["outputs"], *b["outputs"]]:
            prev = outs.get(o["destination"])
            if prev is None:
                outs[o["destination"]] = dict(o)
            else:
                for k in ("packets", "bytes", "errors"):
                    prev[k] += o[k]
                prev["last_error"] = o["last_error"] or prev["last_error"]
        total["rules"][key] = {
            "packets": a["packets"] + b["packets"],
            "bytes": a["bytes"] + b["bytes"],
            "limited": a.get("limited", 0) + b.get("limited", 0),
            "outputs": list(outs.values()),
        }
    return total


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def valid_stats(reply: Any) -> bool:
    """Whether a worker's stats reply has the shape the supervisor adds up.

    Workers run unprivileged and parse hostile packets: what they send is
    checked before the supervisor uses it.
    """
    try:
        if not (_count(reply["received"]) and all(_count(reply["drops"].get(k, 0)) for k in DROP_REASONS)):
            return False
        for counters in reply["rules"].values():
            if not all(_count(counters.get(k, 0)) for k in ("packets", "bytes", "limited")):
                return False
            for out in counters["outputs"]:
                if not (
                    isinstance(out["destination"], str)
                    and isinstance(out.get("last_error", ""), str)
                    and all(_count(out[k]) for k in ("packets", "bytes", "errors"))
                ):
                    return False
    except (KeyError, TypeError, AttributeError):
        return False
    return isinstance(reply["rules"], dict)


def filter_entries(specs: Iterable[RuleSpec]) -> set[FilterEntry]:
    return {
        FilterEntry(
            ip_to_int(s.input.group), s.input.port, ip_to_int(s.input.source) if s.input.source else None
        )
        for s in specs
    }


@dataclass
class Lane:
    """One packet socket of an input port and the worker that reads its ring.

    A port has one lane, or several in a PACKET_FANOUT group that spreads
    flows over them by hash (each flow stays in order on one worker).
    """

    index: int
    sock: socket.socket
    worker: WorkerLink | None = None
    sent: Any = None  # what the worker was last configured with
    state: str = "starting"
    reason: str = ""
    restarts: int = 0
    carried: dict[str, Any] = field(default_factory=_empty_counters)  # from dead workers
    samples: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # first start tried

    def live_worker(self) -> WorkerLink | None:
        return self.worker if self.worker is not None and not self.worker.closed else None

    def current(self) -> dict[str, Any]:
        latest = self.samples[-1][1] if self.samples else _empty_counters()
        return add_counters(self.carried, latest)

    def carry_counters(self) -> None:
        if self.samples:
            self.carried = add_counters(self.carried, self.samples[-1][1])
        self.samples.clear()


@dataclass
class InputPort:
    """Everything for one input interface: its sockets, its workers, its counters.

    Lives as long as some rule names the interface; `open` while the
    interface exists, pending otherwise.
    """

    interface: str
    rules: list[RuleSpec] = field(default_factory=list)
    ifindex: int | None = None
    lanes: list[Lane] = field(default_factory=list)
    precision: int = 2
    programmed: set[FilterEntry] = field(default_factory=set)
    memberships: dict[tuple[str, str | None], socket.socket] = field(default_factory=dict)
    sinks: dict[tuple[str, int], socket.socket | None] = field(default_factory=dict)
    reason: str = ""
    closed_state: str = "pending"
    carried: dict[str, Any] = field(default_factory=_empty_counters)  # from closed lanes
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set when closed

    @property
    def open(self) -> bool:
        return bool(self.lanes)

    @property
    def state(self) -> str:
        if not self.lanes:
            return self.closed_state
        for lane in self.lanes:
            if lane.state != "active":
                return lane.state
        return "active"

    @property
    def why(self) -> str:
        if not self.lanes or self.reason:
            return self.reason
        return next((lane.reason for lane in self.lanes if lane.state != "active"), "")

    @property
    def restarts(self) -> int:
        return sum(lane.restarts for lane in self.lanes)

    def workers(self) -> list[WorkerLink]:
        return [w for lane in self.lanes if (w := lane.live_worker()) is not None]

    async def wait_settled(self) -> None:
        if self.lanes:
            await asyncio.gather(*(lane.settled.wait() for lane in self.lanes))
        else:
            await self.settled.wait()

    def current(self) -> dict[str, Any]:
        total = self.carried
        for lane in self.lanes:
            total = add_counters(total, lane.current())
        return total

    def carry_counters(self) -> None:
        for lane in self.lanes:
            lane.carry_counters()
            self.carried = add_counters(self.carried, lane.carried)
            lane.carried = _empty_counters()
        self.prune_counters()

    def prune_counters(self) -> None:
        """Forget what was carried for rules the port no longer has."""
        keys = {str(s.key) for s in self.rules}
        holders: list[InputPort | Lane] = [self, *self.lanes]
        for holder in holders:
            holder.carried["rules"] = {k: v for k, v in holder.carried["rules"].items() if k in keys}


class Supervisor:
    def __init__(
        self,
        rules: list[RuleSpec],
        identity: tuple[int, int],
        worker_timeout: float = 10.0,
        lanes: int = 1,
        ring: netio.RingSpec | None = None,
        offload: OffloadMode = "off",
        tc: Tc | None = None,
    ) -> None:
        self.rules = rules
        self.identity = identity  # (uid, gid) the workers run as
        self.worker_timeout = worker_timeout
        self.lanes = lanes  # workers per input interface
        self.ring = ring or netio.RingSpec()
        self.offload_default = offload
        self.tc = tc or Tc()
        self.offloaded = OffloadPlan()  # what the kernel relays now
        self.offload_shape: tuple[Attachment, ...] = ()  # the programs as last attached
        self.offload_samples: list[tuple[float, dict[RuleKey, Counts]]] = []
        # what rules relayed in the kernel before they left it: totals never go back
        self.kernel_before: dict[RuleKey, Counts] = {}
        self.offload_checked = 0.0
        self.started = False  # nothing is touched before start(): the control socket is ours then
        self.ports: dict[str, InputPort] = {}
        self.outputs: dict[tuple[str | None, int], OutputSocket] = {}
        self.links: Snapshot | None = None  # None until netlink has told us
        self.stopping = False
        self._lock = asyncio.Lock()
        self._sampler: asyncio.Task[None] | None = None
        self._relink: asyncio.Task[None] | None = None
        self._links_dirty = False

    # -- observed interfaces -----------------------------------------------

    def observe_links(self, snapshot: Snapshot) -> None:
        """Called by the netlink monitor with every new snapshot."""
        before = self.links
        self.links = snapshot
        if not self.started or (before is not None and self._relevant(before) == self._relevant(snapshot)):
            return
        self._links_dirty = True
        if self._relink is None or self._relink.done():
            self._relink = asyncio.create_task(self._follow_links(), name="relink")

    async def _follow_links(self) -> None:
        while self._links_dirty:  # events that came in meanwhile get one more pass
            self._links_dirty = False
            await self.reconcile("interfaces changed")

    def _relevant(self, snapshot: Snapshot) -> dict[str, Link]:
        names = {s.input.interface for s in self.rules} | {
            d.interface for s in self.rules for d in s.destinations() if d.interface
        }
        return {n: link for n, link in snapshot.items() if n in names}

    def _link(self, name: str) -> Link | None:
        if self.links is None:  # no netlink (yet): ask the kernel directly
            try:
                return Link(netio.ifindex(name), name, True)
            except OSError:
                return None
        return self.links.get(name)

    # -- reconcile ----------------------------------------------------------

    async def apply(self, rules: list[RuleSpec]) -> None:
        self.rules = rules
        await self.reconcile("rules changed")

    async def reconcile(self, why: str) -> None:
        async with self._lock:
            if self.stopping:
                return
            log.debug("reconciling: %s", why)
            self._open_outputs()
            wanted: dict[str, list[RuleSpec]] = {}
            for spec in self.rules:
                wanted.setdefault(spec.input.interface, []).append(spec)
            for name in [n for n in self.ports if n not in wanted]:
                await self._close_port(self.ports.pop(name), "no rules")
            for name, specs in wanted.items():
                port = self.ports.setdefault(name, InputPort(name))
                port.rules = specs
                try:
                    await self._converge_port(port)
                except Exception as exc:  # one port's trouble must not stop the others
                    log.exception("input %s: could not apply its rules", name)
                    port.reason = f"error: {exc}"
            self._close_unused_outputs()
            try:
                await self._sync_offload()
            except Exception:  # offload trouble must not stop a reload: workers relay everything
                log.exception("offload: could not converge the kernel's table")

    # -- kernel offload ---------------------------------------------------------

    def offload_mode(self, spec: RuleSpec) -> OffloadMode:
        return spec.offload or self.offload_default

    async def _clear_leftovers(self) -> None:
        """Remove the programs a crashed mcrd left attached (in this network
        namespace): once, at start, before mcrd changes anything. Only
        netlink is needed, so this works even where eBPF no longer does."""
        try:
            removed = await asyncio.to_thread(self.tc.clear_leftovers)
        except Exception as exc:
            log.warning("could not check for leftover offload programs: %s", exc)
            return
        if removed:
            log.info("offload: removed %d program(s) a previous mcrd left attached", removed)

    async def _sync_offload(self) -> None:
        """Converge the kernel's programs on the rules it can relay; touch an
        input interface's program only when what it should hold changed."""
        modes: dict[RuleKey, OffloadMode] = {s.key: self.offload_mode(s) for s in self.rules}
        wanted = [s for s in self.rules if modes[s.key] != "off"]
        self.offload_checked = time.monotonic()
        if not wanted and not self.offload_shape:
            self.offloaded = plan_offload(self.rules, modes, {}, {})
            return
        unavailable = self.tc.missing
        ifaces: dict[str, Iface] = {}
        egress: dict[Destination, Egress] = {}
        if not unavailable:
            try:
                ifaces, egress = await asyncio.to_thread(gather, wanted)
            except Exception as exc:  # then nothing is offloaded until the next look
                log.error("offload: could not look up interfaces, routes and neighbours: %s", exc)
                unavailable = f"netlink lookup failed: {exc}"
        new = plan_offload(self.rules, modes, ifaces, egress, unavailable)
        shape = new.shape()
        if shape == self.offload_shape:
            self.offloaded = new
            return
        try:
            refused = await asyncio.to_thread(self.tc.apply, new.programs)
        except Exception as exc:  # netlink itself failed: take everything back to user space
            log.error("offload: could not program the kernel (%s); relaying in user space", exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.tc.remove)
            self.offload_shape = ()
            self.offload_samples.clear()
            self._keep_released()
            self.offloaded = plan_offload(self.rules, modes, {}, {}, f"the kernel refused: {exc}")
            return
        if refused:  # those rules stay in user space, saying why
            new = plan_offload(self.rules, modes, ifaces, egress, unavailable, refused)
            shape = new.shape()
        kernel = sum(1 for d in new.decisions.values() if d.kernel)
        log.info("offload: the kernel relays %d rule(s)", kernel)
        self.offload_shape, self.offloaded = shape, new
        self._keep_released()

    def _keep_released(self) -> None:
        """Take over the final counts of rules that left the kernel; forget
        those of rules that are gone."""
        for key, counts in self.tc.take_released().items():
            self.kernel_before[key] = add_counts(self.kernel_before.get(key, []), counts)
        keys = {s.key for s in self.rules}
        self.kernel_before = {k: v for k, v in self.kernel_before.items() if k in keys}

    async def _sample_offload(self) -> None:
        if not self.offload_shape:
            self.offload_samples.clear()
            return
        counters = await asyncio.to_thread(self.tc.counters)
        self.offload_samples = [*self.offload_samples[-1:], (time.monotonic(), counters)]

    def kernel_counters(self, spec: RuleSpec) -> tuple[tuple[int, int], list[tuple[int, int]]] | None:
        """(packets, payload bytes) a rule and each of its outputs relayed
        in the kernel: now, if it is offloaded, and before."""
        key = spec.key
        decision = self.offloaded.decisions.get(key)
        now: list[tuple[int, int]] = []
        if decision is not None and decision.kernel and self.offload_samples:
            now = self.offload_samples[-1][1].get(key, [])
        before = self.kernel_before.get(key, [])
        if not now and not before:
            return None
        counts = fit_counts(add_counts(now, before), 1 + len(spec.outputs))
        return counts[0], counts[1:]

    def kernel_rates(self, spec: RuleSpec) -> tuple[tuple[float, float], list[tuple[float, float]]] | None:
        key = spec.key
        if len(self.offload_samples) < 2 or key not in self.offloaded.decisions:
            return None
        (t0, c0), (t1, c1) = self.offload_samples
        dt = max(t1 - t0, 1e-6)
        n = 1 + len(spec.outputs)
        pairs = zip(fit_counts(c0.get(key, []), n), fit_counts(c1.get(key, []), n), strict=True)
        rates = [(max(0, p1 - p0) / dt, max(0, b1 - b0) * 8 / dt) for (p0, b0), (p1, b1) in pairs]
        return rates[0], rates[1:]

    async def _converge_port(self, port: InputPort) -> None:
        name = port.interface
        link = self._link(name)
        if link is None:
            if port.open:
                log.warning("input %s: interface is gone; its rules are pending", name)
            await self._close_port(port, f"no interface named {name!r}")
        elif port.open and port.ifindex == link.index:
            await self._update_port(port)
        else:
            if port.open:
                log.warning(
                    "input %s: interface was replaced (index %s -> %s)", name, port.ifindex, link.index
                )
                await self._close_port(port, "interface replaced")
            self._open_port(port, link)

    def _open_outputs(self) -> None:
        for spec in self.rules:
            for dest in spec.destinations():
                key = (dest.interface, dest.ttl)
                current = self.outputs.get(key)
                link = self._link(dest.interface) if dest.interface else None
                if dest.interface is not None and link is None:
                    if current is not None and current.sock is not None:
                        current.sock.close()
                    self.outputs[key] = OutputSocket(None, None, f"no interface named {dest.interface!r}")
                    continue
                index = link.index if link else None
                if current is not None and current.sock is not None and current.ifindex == index:
                    continue
                if current is not None and current.sock is not None:
                    current.sock.close()
                try:
                    self.outputs[key] = OutputSocket(
                        netio.open_output_socket(dest.interface, dest.ttl), index
                    )
                except OSError as exc:
                    self.outputs[key] = OutputSocket(None, None, describe_os_error(exc))
                    log.warning("output %s unavailable: %s", dest, self.outputs[key].reason)

    def _close_unused_outputs(self) -> None:
        used = {(d.interface, d.ttl) for s in self.rules for d in s.destinations()}
        for key in [k for k in self.outputs if k not in used]:
            out = self.outputs.pop(key)
            if out.sock is not None:
                out.sock.close()

    def _open_port(self, port: InputPort, link: Link) -> None:
        entries = filter_entries(port.rules)
        try:
            fanout: int | None = None
            for index in range(self.lanes):
                sock, port.precision = netio.open_packet_socket(port.interface, entries, self.ring)
                port.lanes.append(Lane(index, sock))
                if self.lanes > 1:
                    fanout = netio.join_fanout(sock, fanout)
            port.programmed = entries
            port.ifindex = link.index
            self._sync_holds(port)
        except OSError as exc:
            self._close_sockets(port)
            port.closed_state, port.reason = "pending", describe_os_error(exc)
            port.settled.set()
            log.warning(
                "input %s: %s; its %d rule(s) are pending", port.interface, port.reason, len(port.rules)
            )
            return
        port.reason = ""
        for lane in port.lanes:
            lane.task = asyncio.create_task(
                self._keep_worker(port, lane), name=f"worker-{port.interface}-{lane.index}"
            )

    def _sync_holds(self, port: InputPort) -> None:
        """Join the groups and hold the unicast ports the port's rules need, and no others."""
        groups = {(s.input.group, s.input.source) for s in port.rules if is_multicast(s.input.group)}
        for group, source in groups - port.memberships.keys():
            port.memberships[group, source] = netio.join_group(port.interface, group, source)
        for stale in port.memberships.keys() - groups:
            port.memberships.pop(stale).close()  # leaves the group
        unicast = {(s.input.group, s.input.port) for s in port.rules if not is_multicast(s.input.group)}
        for address, number in unicast:
            if port.sinks.get((address, number)) is None:  # new, or its address was not local before
                port.sinks[address, number] = netio.open_sink(address, number)
        for unused in port.sinks.keys() - unicast:
            sink = port.sinks.pop(unused)
            if sink is not None:
                sink.close()

    async def _update_port(self, port: InputPort) -> None:
        """Converge an open port on its rules without disturbing the unchanged ones."""
        new = filter_entries(port.rules)
        try:
            self._sync_holds(port)
        except OSError as exc:
            log.error("input %s: %s", port.interface, describe_os_error(exc))
        if new != port.programmed:
            # Narrow first (nothing the new table lacks reaches the workers),
            # swap the workers' tables, then widen to the new rules.
            for lane in port.lanes:
                netio.attach_best_filter(lane.sock, port.programmed & new)
        await asyncio.gather(*(self._push_config(port, lane) for lane in port.lanes))
        if new != port.programmed:
            for lane in port.lanes:
                port.precision = netio.attach_best_filter(lane.sock, new)
            port.programmed = new
        port.prune_counters()

    def _close_sockets(self, port: InputPort) -> None:
        for sock in port.memberships.values():
            sock.close()
        port.memberships.clear()
        for sink in port.sinks.values():
            if sink is not None:
                sink.close()
        port.sinks.clear()
        for lane in port.lanes:
            lane.sock.close()
        port.lanes.clear()
        port.ifindex = None
        port.programmed = set()

    async def _close_port(self, port: InputPort, reason: str) -> None:
        for lane in port.lanes:
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
                lane.task = None
        await asyncio.gather(*(self._sample(lane, port.interface) for lane in port.lanes))
        await asyncio.gather(*(w.stop() for w in port.workers()))
        for lane in port.lanes:
            lane.worker = None
        port.carry_counters()
        self._close_sockets(port)
        port.closed_state, port.reason = "pending", reason
        port.settled.set()

    # -- workers -------------------------------------------------------------

    def _configure_message(self, port: InputPort, lane: Lane) -> tuple[dict[str, Any], list[int], Any]:
        fds = [lane.sock.fileno()]
        index: dict[int, int] = {}
        rules = []
        for spec in port.rules:
            outs = []
            for dest in spec.destinations():
                out = self.outputs.get((dest.interface, dest.ttl))
                if out is None or out.sock is None:
                    continue
                fd = out.sock.fileno()
                if fd not in index:
                    index[fd] = len(fds)
                    fds.append(fd)
                outs.append(
                    {
                        "fd": index[fd],
                        "group": dest.group,
                        "port": dest.port,
                        "label": str(dest),
                        "sock": id(out.sock),
                    }
                )
            i = spec.input
            limit = spec.rate_limit.model_dump() if spec.rate_limit else None
            rules.append(
                {
                    "key": str(spec.key),
                    "group": i.group,
                    "port": i.port,
                    "source": i.source,
                    "outputs": outs,
                    "rate_limit": limit,
                }
            )
        signature = (id(lane.sock), repr(rules))
        message = {"op": "configure", "packet_fd": 0, "ring": self.ring.message(), "rules": rules}
        return message, fds, signature

    async def _push_config(self, port: InputPort, lane: Lane) -> None:
        worker = lane.live_worker()
        if worker is None:
            return
        message, fds, signature = self._configure_message(port, lane)
        if signature == lane.sent:
            return
        try:
            await worker.request(message, fds, timeout=CONFIGURE_TIMEOUT)
            lane.sent = signature
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.error(
                "input %s: worker %d did not take its new rules (%s); restarting it",
                port.interface,
                worker.pid,
                exc,
            )
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()

    async def _spawn(self, port: InputPort, lane: Lane) -> WorkerLink:
        ours, theirs = channel.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the current directory on sys.path: the worker starts as root
                "-m",
                "mcrd.worker",
                str(theirs.fileno()),
                "--uid",
                str(self.identity[0]),
                "--gid",
                str(self.identity[1]),
                pass_fds=(theirs.fileno(),),
                cwd="/",
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        link = WorkerLink(process, ours)
        try:
            message, fds, signature = self._configure_message(port, lane)
            await link.request(message, fds, timeout=CONFIGURE_TIMEOUT)
            lane.sent = signature
        except BaseException:
            link.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        return link

    async def _keep_worker(self, port: InputPort, lane: Lane) -> None:
        failures = 0
        name = port.interface if self.lanes == 1 else f"{port.interface}#{lane.index}"
        while not self.stopping:
            began = time.monotonic()
            try:
                lane.worker = await self._spawn(port, lane)
            except (OSError, TimeoutError, ConnectionError) as exc:
                lane.state, lane.reason = "restarting", f"worker failed to start: {exc}"
                log.error("input %s: %s", name, lane.reason)
                lane.settled.set()
            else:
                lane.state, lane.reason = "active", ""
                lane.settled.set()
                worker = lane.worker
                log.info("input %s: worker %d relaying %d rule(s)", name, worker.pid, len(port.rules))
                await self._push_config(port, lane)  # rules may have changed while it started
                status = await worker.process.wait()
                worker.close()
                if self.stopping:
                    return
                try:
                    lane.carry_counters()
                except (KeyError, TypeError) as exc:  # never let counters stop the restarts
                    log.error("input %s: dropping unreadable counters: %s", name, exc)
                    lane.samples.clear()
                lane.state = "restarting"
                lane.reason = f"worker {worker.pid} exited with status {status}"
                lane.restarts += 1
                log.error("input %s: %s", name, lane.reason)
            failures = 1 if time.monotonic() - began > STABLE_AFTER else failures + 1
            delay = backoff_delay(failures)
            log.info("input %s: restarting its worker in %.1fs", name, delay)
            await asyncio.sleep(delay)

    async def _sample(self, lane: Lane, interface: str) -> None:
        worker = lane.live_worker()
        if worker is None:
            return
        try:
            reply = await worker.request({"op": "stats"})
        except (TimeoutError, ConnectionError, OSError):
            if time.monotonic() - worker.last_heard > self.worker_timeout:
                log.error(
                    "input %s: worker %d has not answered for %.0fs; killing it",
                    interface,
                    worker.pid,
                    self.worker_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            return
        if not valid_stats(reply):
            log.error("input %s: worker %d sent malformed counters; restarting it", interface, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            return
        if lane.worker is worker:
            lane.samples = [*lane.samples[-1:], (time.monotonic(), reply)]

    async def sample_all(self) -> None:
        await asyncio.gather(
            *(self._sample(lane, p.interface) for p in list(self.ports.values()) for lane in p.lanes),
            self._sample_offload(),
        )

    async def _sample_forever(self) -> None:
        while True:
            await self.sample_all()
            try:
                if (
                    any(self.offload_mode(s) != "off" for s in self.rules)
                    and time.monotonic() - self.offload_checked > OFFLOAD_RECHECK
                ):
                    # next hops get resolved, neighbours change: look again
                    async with self._lock:
                        if not self.stopping:
                            await self._sync_offload()
            except Exception:  # the sampler must keep sampling the workers
                log.exception("offload: could not refresh")
            await asyncio.sleep(SAMPLE_INTERVAL)

    def workers_healthy(self) -> bool:
        """Every running worker has answered recently (the watchdog's condition)."""
        now = time.monotonic()
        return all(now - w.last_heard < LATE_AFTER for p in self.ports.values() for w in p.workers())

    async def start(self) -> None:
        self.started = True
        await self._clear_leftovers()
        await self.reconcile("start")
        await asyncio.gather(*(p.wait_settled() for p in self.ports.values()))
        self._sampler = asyncio.create_task(self._sample_forever(), name="sampler")

    # -- views for the control socket ------------------------------------------

    def rule_state(self, spec: RuleSpec) -> tuple[str, str]:
        port = self.ports.get(spec.input.interface)
        if port is None:
            return "pending", "not applied yet"
        if port.state == "active":
            link = self._link(port.interface)
            return ("active", "") if link is None or link.up else ("active", "interface is down")
        return port.state, port.why

    def output_state(self, dest: Destination) -> tuple[str, str]:
        out = self.outputs.get((dest.interface, dest.ttl))
        if out is None or out.sock is None:
            return "pending", out.reason if out else "not opened yet"
        link = self._link(dest.interface) if dest.interface else None
        if link is not None and not link.up:
            return "down", "interface is down"
        return "active", ""

    def rule_views(self, origin: Callable[[RuleSpec], str] = lambda spec: "file") -> list[dict[str, Any]]:
        views = []
        for spec in self.rules:
            state, reason = self.rule_state(spec)
            outputs = []
            for dest in spec.destinations():
                ostate, oreason = self.output_state(dest)
                outputs.append({"destination": str(dest), "state": ostate, "reason": oreason})
            decision = self.offloaded.decisions.get(spec.key)
            views.append(
                {
                    "name": spec.name,
                    "id": rule_id(spec.key),
                    "key": str(spec.key),
                    "origin": origin(spec),
                    "input": spec.input.model_dump(),
                    "outputs": outputs,
                    "state": state,
                    "reason": reason,
                    "path": "kernel" if decision and decision.kernel else "user",
                    "path_reason": decision.reason if decision else "",
                }
            )
        return views

    @staticmethod
    def _rates(port: InputPort) -> dict[tuple[str, str], tuple[float, float]]:
        """(packets/s, bits/s) per (rule key, destination; "" for the input),
        over each lane's last sample, summed over the lanes."""
        rates: dict[tuple[str, str], tuple[float, float]] = {}

        def add(key: tuple[str, str], now: dict[str, Any], before: dict[str, Any], dt: float) -> None:
            pps = (now["packets"] - before["packets"]) / dt
            bps = (now["bytes"] - before["bytes"]) * 8 / dt
            a, b = rates.get(key, (0.0, 0.0))
            rates[key] = (a + pps, b + bps)

        for lane in port.lanes:
            if len(lane.samples) < 2:
                continue
            (t0, s0), (t1, s1) = lane.samples
            dt = max(t1 - t0, 1e-6)
            for key, c in s1["rules"].items():
                prev = s0["rules"].get(key, {"packets": 0, "bytes": 0, "outputs": []})
                add((key, ""), c, prev, dt)
                prev_outs = {o["destination"]: o for o in prev["outputs"]}
                for o in c["outputs"]:
                    before = prev_outs.get(o["destination"], {"packets": 0, "bytes": 0})
                    add((key, o["destination"]), o, before, dt)
        return rates

    def stats_view(self) -> dict[str, Any]:
        rules = []
        interfaces = []
        for port in self.ports.values():
            counters = port.current()
            rates = self._rates(port)
            pids = [w.pid for w in port.workers()]
            interfaces.append(
                {
                    "interface": port.interface,
                    "worker": pids[0] if pids else None,
                    "workers": pids,
                    "state": port.state,
                    "filter": ["udp", "groups", "exact"][port.precision],
                    "received": counters["received"],
                    "drops": counters["drops"],
                }
            )
            for spec in port.rules:
                key = str(spec.key)
                c = counters["rules"].get(key, {"packets": 0, "bytes": 0, "limited": 0, "outputs": []})
                by_dest = {o["destination"]: o for o in c["outputs"]}
                pps, bps = rates.get((key, ""), (0.0, 0.0))
                kernel = self.kernel_counters(spec)
                krates = self.kernel_rates(spec)
                if kernel is not None:  # what the kernel relayed, added to what the workers did
                    c = {**c, "packets": c["packets"] + kernel[0][0], "bytes": c["bytes"] + kernel[0][1]}
                if krates is not None:
                    pps, bps = pps + krates[0][0], bps + krates[0][1]
                outputs = []
                for n, d in enumerate(spec.destinations()):
                    label = str(d)
                    o = by_dest.get(
                        label, {"destination": label, "packets": 0, "bytes": 0, "errors": 0, "last_error": ""}
                    )
                    opps, obps = rates.get((key, label), (0.0, 0.0))
                    if kernel is not None:
                        o = {
                            **o,
                            "packets": o["packets"] + kernel[1][n][0],
                            "bytes": o["bytes"] + kernel[1][n][1],
                        }
                    if krates is not None:
                        opps, obps = opps + krates[1][n][0], obps + krates[1][n][1]
                    outputs.append({**o, "pps": round(opps, 1), "bps": round(obps, 1)})
                rules.append(
                    {
                        "name": spec.name,
                        "id": rule_id(spec.key),
                        "key": key,
                        "packets": c["packets"],
                        "bytes": c["bytes"],
                        "pps": round(pps, 1),
                        "bps": round(bps, 1),
                        "drops": {"rate_limit": c.get("limited", 0)},
                        "outputs": outputs,
                    }
                )
        return {"rules": rules, "interfaces": interfaces}

    def worker_views(self) -> list[dict[str, Any]]:
        views = []
        for p in self.ports.values():
            lanes: list[Lane | None] = list(p.lanes) or [None]  # a closed port shows why
            for lane in lanes:
                worker = lane.live_worker() if lane else None
                views.append(
                    {
                        "interface": p.interface,
                        "lane": lane.index if lane else 0,
                        "pid": worker.pid if worker else None,
                        "state": lane.state if lane else p.state,
                        "reason": lane.reason if lane else p.reason,
                        "restarts": lane.restarts if lane else 0,
                        "received": lane.current()["received"] if lane else 0,
                        "rules": len(p.rules),
                        "last_heard": round(time.monotonic() - worker.last_heard, 1) if worker else None,
                    }
                )
        return views

    def counts(self) -> tuple[int, int]:
        """(active, pending) rules."""
        active = sum(1 for s in self.rules if self.rule_state(s)[0] == "active")
        return active, len(self.rules) - active

    # -- stopping ----------------------------------------------------------------

    async def stop(self) -> None:
        self.stopping = True
        for task in (self._sampler, self._relink):
            if task is not None:
                task.cancel()
        async with self._lock:
            workers = [w for p in self.ports.values() for w in p.workers()]
            for port in self.ports.values():
                for lane in port.lanes:
                    if lane.task is not None:
                        lane.task.cancel()
            await asyncio.gather(*(w.stop() for w in workers))
            for port in self.ports.values():
                self._close_sockets(port)
            for out in self.outputs.values():
                if out.sock is not None:
                    out.sock.close()
            self.outputs.clear()
            try:  # also when a first attach was still running as mcrd was told to stop
                await asyncio.to_thread(self.tc.remove)
            except Exception as exc:
                log.error("offload: could not remove the kernel's programs: %s", exc)
            self.offload_shape = ()
