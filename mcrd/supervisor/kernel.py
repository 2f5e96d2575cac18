"""The kernel path's state: which rules the kernel relays, and what they counted.

The only part of the supervisor that knows `mcrd.offload`. It plans the
offload (pure, `plan_offload`), programs the kernel through its tables
adapter when what the programs should hold changed, and keeps the programs'
counts in one `Ledger`: a rule that leaves the kernel keeps what it counted
there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mcrd.counters import Counts, Ledger, Rates, RuleCounts, from_kernel
from mcrd.offload.plan import Attachment, Decision, Egress, Iface, OffloadMode, OffloadPlan, plan_offload
from mcrd.rules import Destination, RuleKey, RuleSpec
from mcrd.supervisor.seams import Seams

log = logging.getLogger("mcrd")

RECHECK = 2.0  # seconds between looks at routes and neighbours for offloaded rules


class KernelPath:
    """What the kernel relays now (`offloaded`), the programs as last
    attached (`shape`), and their counts (`ledger`)."""

    def __init__(self, seams: Seams, default: OffloadMode) -> None:
        self.tables = seams.tables
        self.gather = seams.gather
        self.clock = seams.clock
        self.default = default
        self.offloaded = OffloadPlan()
        self.shape: tuple[Attachment, ...] = ()
        self.ledger = Ledger()
        self.checked = 0.0

    def mode(self, spec: RuleSpec) -> OffloadMode:
        return spec.offload or self.default

    def wanted(self, rules: list[RuleSpec]) -> bool:
        return any(self.mode(s) != "off" for s in rules)

    def due(self, rules: list[RuleSpec]) -> bool:
        """Whether to look at routes and neighbours again: next hops get resolved, neighbours change."""
        return self.wanted(rules) and self.clock.monotonic() - self.checked > RECHECK

    def decision(self, key: RuleKey) -> Decision | None:
        return self.offloaded.decisions.get(key)

    async def clear_leftovers(self) -> None:
        """Remove the programs a crashed mcrd left attached (in this network
        namespace): once, at start, before mcrd changes anything. Only
        netlink is needed, so this works even where eBPF no longer does."""
        try:
            removed = await asyncio.to_thread(self.tables.clear_leftovers)
        except Exception as exc:
            log.warning("could not check for leftover offload programs: %s", exc)
            return
        if removed:
            log.info("offload: removed %d program(s) a previous mcrd left attached", removed)

    async def sync(self, rules: list[RuleSpec]) -> None:
        """Converge the kernel's programs on the rules it can relay; touch an
        input interface's program only when what it should hold changed."""
        modes: dict[RuleKey, OffloadMode] = {s.key: self.mode(s) for s in rules}
        wanted = [s for s in rules if modes[s.key] != "off"]
        self.checked = self.clock.monotonic()
        if not wanted and not self.shape:
            self.offloaded = plan_offload(rules, modes, {}, {})
            return
        unavailable = self.tables.missing
        ifaces: dict[str, Iface] = {}
        egress: dict[Destination, Egress] = {}
        if not unavailable:
            try:
                ifaces, egress = await asyncio.to_thread(self.gather, wanted)
            except Exception as exc:  # then nothing is offloaded until the next look
                log.error("offload: could not look up interfaces, routes and neighbours: %s", exc)
                unavailable = f"netlink lookup failed: {exc}"
        new = plan_offload(rules, modes, ifaces, egress, unavailable)
        if new.shape() == self.shape:
            self.offloaded = new
            return
        try:
            refused = await asyncio.to_thread(self.tables.apply, new.programs)
        except Exception as exc:  # netlink itself failed: take everything back to user space
            log.error("offload: could not program the kernel (%s); relaying in user space", exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.tables.remove)
            self.shape = ()
            self._keep_released(rules)
            self.ledger.samples.clear()
            self.offloaded = plan_offload(rules, modes, {}, {}, f"the kernel refused: {exc}")
            return
        if refused:  # those rules stay in user space, saying why
            new = plan_offload(rules, modes, ifaces, egress, unavailable, refused)
        log.info("offload: the kernel relays %d rule(s)", sum(1 for d in new.decisions.values() if d.kernel))
        self.shape, self.offloaded = new.shape(), new
        self._keep_released(rules)

    def _keep_released(self, rules: list[RuleSpec]) -> None:
        """Take over the final counts of rules that left the kernel; forget
        those of rules that are gone."""
        specs = {s.key: s for s in rules}
        released = {
            key: from_kernel(key, specs[key].destinations(), counts)
            for key, counts in self.tables.take_released().items()
            if key in specs
        }
        self.ledger.forget_live(released)
        self.ledger.absorb(Counts(rules=released))
        self.ledger.retain(specs)

    async def sample(self, rules: list[RuleSpec]) -> None:
        if not self.shape:
            self.ledger.samples.clear()
            return
        raw = await asyncio.to_thread(self.tables.counters)
        specs = {s.key: s for s in rules}
        counted = {k: from_kernel(k, specs[k].destinations(), c) for k, c in raw.items() if k in specs}
        self.ledger.record(self.clock.monotonic(), Counts(rules=counted))

    def counts(self, spec: RuleSpec) -> RuleCounts:
        """What a rule relayed in the kernel: now, if it is offloaded, and before."""
        return self.ledger.total().rule(spec.key)

    def rates(self) -> Rates:
        return self.ledger.rates()

    async def stop(self) -> None:
        try:  # also when a first attach was still running as mcrd was told to stop
            await asyncio.to_thread(self.tables.remove)
        except Exception as exc:
            log.error("offload: could not remove the kernel's programs: %s", exc)
        self.shape = ()
