"""The reconcile core: converges what runs on the desired rules and the observed links.

One pass at a time, under a lock, on a snapshot of the desired rules taken
when the pass begins: a reload that arrives while a pass awaits a worker is
applied by the next pass, never half by this one. A pass opens the output
sockets the rules need, plans each input port (`ports.plan_port`) and carries
the plan out, closes what no rule uses, then converges the kernel path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mcrd.links import Link, Snapshot
from mcrd.loops import loop_guarded
from mcrd.netio import RingSpec
from mcrd.offload.plan import OffloadMode
from mcrd.rules import RuleSpec
from mcrd.supervisor import views
from mcrd.supervisor.kernel import KernelPath
from mcrd.supervisor.outputs import OutputPool, describe_os_error
from mcrd.supervisor.ports import (
    InputPort,
    PortAction,
    PortPlan,
    close_sockets,
    open_lanes,
    plan_port,
    swap_filter,
    sync_holds,
)
from mcrd.supervisor.seams import Identity, Seams
from mcrd.supervisor.workers import Workers

log = logging.getLogger("mcrd")

SAMPLE_INTERVAL = 1.0
LATE_AFTER = 3.0  # a worker silent this long holds back the watchdog


def local_addresses(snapshot: Snapshot) -> frozenset[str]:
    return frozenset(a for link in snapshot.values() for a in link.addresses)


class Supervisor:
    """Owns the privileged sockets and keeps one worker per lane of each input interface.

    `apply()` sets the desired rules, `observe_links()` the observed
    interfaces; each leads to a reconcile pass. The views for the control
    socket read `observed()`.
    """

    def __init__(
        self,
        rules: list[RuleSpec],
        identity: Identity,
        worker_timeout: float = 10.0,
        lanes: int = 1,
        ring: RingSpec | None = None,
        offload: OffloadMode = "off",
        seams: Seams | None = None,
    ) -> None:
        self.seams = seams or Seams()
        self.clock = self.seams.clock
        self.desired = rules
        self.lanes_per_port = lanes
        self.ring = ring or RingSpec()
        self.outputs = OutputPool(self.seams.net)
        self.workers = Workers(self.seams, identity, self.outputs, worker_timeout)
        self.kernel = KernelPath(self.seams, offload)
        self.ports: dict[str, InputPort] = {}
        self.links: Snapshot | None = None  # None until netlink has told us
        self.started = False  # nothing is touched before start(): the control socket is ours then
        self.stopping = False
        self._lock = asyncio.Lock()
        self._sampler: asyncio.Task[None] | None = None
        self._relink: asyncio.Task[None] | None = None
        self._links_dirty = False
        self._warned: set[tuple[str, str]] = set()

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

    def _relevant(self, snapshot: Snapshot) -> tuple[dict[str, Link], frozenset[str]]:
        """What of the links the rules depend on: those they name, and all of
        this host's addresses (the loop guard's and faithful outputs' concern)."""
        rules = self.desired
        names = {s.input.interface for s in rules} | {
            d.interface for s in rules for d in s.destinations() if d.interface
        }
        return {n: link for n, link in snapshot.items() if n in names}, local_addresses(snapshot)

    def link(self, name: str) -> Link | None:
        if self.links is None:  # no netlink (yet): ask the kernel directly
            try:
                return Link(self.seams.net.ifindex(name), name, True)
            except OSError:
                return None
        return self.links.get(name)

    # -- reconcile ----------------------------------------------------------

    async def apply(self, rules: list[RuleSpec]) -> None:
        self.desired = rules
        await self.reconcile("rules changed")

    async def reconcile(self, why: str) -> None:
        async with self._lock:
            if self.stopping:
                return
            rules = self.desired  # this pass's rules, whatever arrives while it awaits
            log.debug("reconciling: %s", why)
            destinations = [d for s in rules for d in s.destinations()]
            self.outputs.open(destinations, self.link)
            wanted: dict[str, list[RuleSpec]] = {}
            for spec in rules:
                wanted.setdefault(spec.input.interface, []).append(spec)
            for name in [n for n in self.ports if n not in wanted]:
                await self._close_port(self.ports.pop(name), "no rules")
            self.workers.retain(rules)
            self.workers.guarded = loop_guarded(rules)
            self.workers.local_addresses = tuple(sorted(local_addresses(self.links or {})))
            for name, specs in wanted.items():
                port = self.ports.setdefault(name, InputPort(name))
                port.rules = specs
                try:
                    await self._converge_port(port)
                except Exception as exc:  # one port's trouble must not stop the others
                    log.exception("input %s: could not apply its rules", name)
                    port.reason = f"error: {exc}"
            self.outputs.close_unused(destinations)
            self._warn(rules)
            try:
                await self.kernel.sync(rules)
            except Exception:  # offload trouble must not stop a reload: workers relay everything
                log.exception("offload: could not converge the kernel's table")

    def _lanes_for(self, port: InputPort) -> int:
        """How many lanes a port gets: one where a rule is under the loop
        guard, whose memory of what it relayed must see every datagram of
        the interface (the fanout spreads by flow, and a reflected copy
        is another flow than the original)."""
        if any(spec.key in self.workers.guarded for spec in port.rules):
            return 1
        return self.lanes_per_port

    def _warn(self, rules: list[RuleSpec]) -> None:
        """Log each rule warning once, when it appears."""
        now = {(spec.display_name(), w) for spec in rules for w in views.warnings(spec, self.link)}
        for name, warning in sorted(now - self._warned):
            log.warning("rule %s: %s", name, warning)
        self._warned = now

    async def _converge_port(self, port: InputPort) -> None:
        link = self.link(port.interface)
        plan = plan_port(port.interface, port.rules, link, port.held())
        lanes = self._lanes_for(port)
        if plan.action == PortAction.UPDATE and len(port.lanes) != lanes:
            assert link is not None
            log.info("input %s: %d lane(s) now (loop guard); reopening it", port.interface, lanes)
            await self._close_port(port, "reopening")
            plan = plan_port(port.interface, port.rules, link, port.held())
        if plan.action == PortAction.CLOSE:
            if port.open or (link is not None and port.reason != plan.reason):
                log.warning("input %s: %s; its rules are pending", port.interface, plan.reason)
            await self._close_port(port, plan.reason)
        elif plan.action == PortAction.UPDATE:
            await self._update_port(port, plan)
        else:
            if plan.action == PortAction.REOPEN:
                assert link is not None
                log.warning(
                    "input %s: interface was replaced (index %s -> %s)",
                    port.interface,
                    port.ifindex,
                    link.index,
                )
                await self._close_port(port, plan.reason)
            assert link is not None
            self._open_port(port, link, plan)

    def _open_port(self, port: InputPort, link: Link, plan: PortPlan) -> None:
        try:
            open_lanes(port, link, plan, self.seams.net, self.ring, self._lanes_for(port))
        except OSError as exc:
            port.reason = describe_os_error(exc)
            port.settled.set()
            log.warning(
                "input %s: %s; its %d rule(s) are pending", port.interface, port.reason, len(port.rules)
            )
            return
        port.reason = ""
        for lane in port.lanes:
            self.workers.start(port, lane)

    async def _update_port(self, port: InputPort, plan: PortPlan) -> None:
        """Converge an open port on its rules without disturbing the unchanged ones."""
        try:
            sync_holds(port, plan, self.seams.net)
        except OSError as exc:
            log.error("input %s: %s", port.interface, describe_os_error(exc))
        if plan.narrow is not None:
            # Narrow first (nothing the new table lacks reaches the workers),
            # swap the workers' tables, then widen to the new rules.
            swap_filter(port, plan.narrow, self.seams.net)
        await asyncio.gather(*(self.workers.push(port, lane) for lane in port.lanes))
        if plan.narrow is not None:
            swap_filter(port, plan.entries, self.seams.net)
            port.programmed = plan.entries
        for lane in port.lanes:
            if self.workers.retry_failed(port, lane):
                log.info("input %s: its rules changed; starting its worker again", port.interface)
                self.workers.start(port, lane)
        port.retain()

    async def _close_port(self, port: InputPort, reason: str) -> None:
        await self.workers.stop_lanes(port)
        close_sockets(port)
        port.reason = reason
        port.settled.set()

    # -- sampling -------------------------------------------------------------

    async def sample_all(self) -> None:
        await asyncio.gather(
            *(self.workers.sample(p, lane) for p in list(self.ports.values()) for lane in p.lanes),
            self.kernel.sample(self.desired),
        )

    async def _sample_forever(self) -> None:
        while True:
            await self.sample_all()
            try:
                if self.kernel.due(self.desired):
                    async with self._lock:
                        if not self.stopping:
                            await self.kernel.sync(self.desired)
            except Exception:  # the sampler must keep sampling the workers
                log.exception("offload: could not refresh")
            await self.clock.sleep(SAMPLE_INTERVAL)

    def workers_healthy(self) -> bool:
        """Every running worker has answered recently (the watchdog's condition)."""
        now = self.clock.monotonic()
        return all(now - w.last_heard < LATE_AFTER for p in self.ports.values() for w in p.workers())

    # -- views for the control socket ------------------------------------------

    def observed(self) -> views.Observed:
        return views.Observed(
            self.desired, self.ports, self.outputs, self.kernel, self.link, self.clock.monotonic()
        )

    def rule_views(self, origin: Callable[[RuleSpec], str] = lambda spec: "file") -> list[dict[str, Any]]:
        return views.rule_views(self.observed(), origin)

    def stats_view(self) -> dict[str, Any]:
        return views.stats_view(self.observed())

    def worker_views(self) -> list[dict[str, Any]]:
        return views.worker_views(self.observed())

    def counts(self) -> tuple[int, int]:
        """(active, pending) rules."""
        return views.counts(self.observed())

    # -- starting and stopping -------------------------------------------------

    async def start(self) -> None:
        self.started = True
        await self.kernel.clear_leftovers()
        await self.reconcile("start")
        await asyncio.gather(*(p.wait_settled() for p in self.ports.values()))
        self._sampler = asyncio.create_task(self._sample_forever(), name="sampler")

    async def stop(self) -> None:
        self.stopping = True
        self.workers.stopping = True
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
                close_sockets(port)
            self.outputs.close_all()
            await self.kernel.stop()
